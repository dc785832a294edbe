// Calls to the ragcache API with the key typed into the page (sent as a bearer token).

const KEY_STORE = "ragcache.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

function headers(extra = {}) {
  const all = { ...extra };
  const key = apiKey();
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

export class ApiError extends Error {
  constructor(status, error) {
    const where = error.request_id ? ` (request ${error.request_id})` : "";
    super(`${status}: ${error.message || "request failed"}${where}`);
    this.status = status;
    this.error = error;
  }
}

async function failure(response) {
  let error = { message: response.statusText };
  try {
    error = (await response.json()).error || error;
  } catch (_) {
    // a body that is not JSON keeps the status text
  }
  return new ApiError(response.status, error);
}

export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Multipart upload through XMLHttpRequest, the one browser API that reports upload progress.
export function upload(path, files, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    const request = new XMLHttpRequest();
    request.open("POST", path);
    for (const [name, value] of Object.entries(headers())) request.setRequestHeader(name, value);
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    request.onload = () => {
      let reply = {};
      try {
        reply = JSON.parse(request.responseText);
      } catch (_) {
        reply = { error: { message: request.statusText } };
      }
      if (request.status >= 200 && request.status < 300) resolve(reply);
      else reject(new ApiError(request.status, reply.error || {}));
    };
    request.onerror = () => reject(new ApiError(0, { message: "the server could not be reached" }));
    request.send(form);
  });
}

// POST a JSON body and hand each server-sent event ({event, data}) to onEvent as it arrives.
export async function streamEvents(path, body, onEvent) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      const text = data.join("\n");
      if (text && text !== "[DONE]") onEvent({ event, data: JSON.parse(text) });
    }
  }
}
