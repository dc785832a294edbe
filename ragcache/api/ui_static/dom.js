// Small helpers for building the pages' elements and telling the user what happened.

export function element(tag, attributes = {}, ...children) {
  const made = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "onclick") made.addEventListener("click", value);
    else if (key === "text") made.textContent = value;
    else made.setAttribute(key, value);
  }
  for (const child of children) made.append(child);
  return made;
}

export function notify(message, ok = false) {
  const notice = document.getElementById("notice");
  notice.textContent = message;
  notice.className = ok ? "ok" : "";
  notice.hidden = !message;
}

export function reportFailure(error) {
  notify(error.message || String(error));
}

export function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  return seconds < 1 ? `${(seconds * 1000).toFixed(0)} ms` : `${seconds.toFixed(2)} s`;
}
