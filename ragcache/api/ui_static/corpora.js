// Corpora page: create and delete corpora, upload documents with progress, delete one.

import { api, upload } from "./api.js";
import { element, notify, reportFailure } from "./dom.js";

let selected = null;
const JOB_POLL_MS = 400;

function encoded(name) {
  return encodeURIComponent(name);
}

export async function refreshCorpora() {
  const { data } = await api("/v1/corpora");
  const body = document.querySelector("#corpus-table tbody");
  body.replaceChildren(
    ...data.map((corpus) =>
      element(
        "tr",
        { "data-corpus": corpus.name, class: corpus.name === selected ? "selected" : "" },
        element("td", {}, element("a", { href: "#corpora", text: corpus.name, onclick: () => select(corpus.name) })),
        element("td", { class: "num", text: String(corpus.num_documents) }),
        element("td", { class: "num", text: String(corpus.num_chunks) }),
        element("td", {}, element("button", { class: "danger", text: "Delete", onclick: () => deleteCorpus(corpus.name) })),
      ),
    ),
  );
  if (selected && !data.some((corpus) => corpus.name === selected)) await select(null);
  return data;
}

async function select(name) {
  selected = name;
  document.getElementById("upload-form").hidden = !name;
  document.getElementById("corpus-title").textContent = name ? `Documents of ${name}` : "Documents";
  for (const row of document.querySelectorAll("#corpus-table tbody tr")) {
    row.classList.toggle("selected", row.dataset.corpus === name);
  }
  await refreshDocuments();
}

async function refreshDocuments() {
  const body = document.querySelector("#document-table tbody");
  if (!selected) {
    body.replaceChildren();
    return;
  }
  const corpus = await api(`/v1/corpora/${encoded(selected)}`);
  body.replaceChildren(
    ...corpus.documents.map((doc) =>
      element(
        "tr",
        { "data-doc": doc.doc_id },
        element("td", { class: "id", text: doc.doc_id }),
        element("td", { text: doc.source }),
        element("td", { class: "num", text: String(doc.num_tokens) }),
        element("td", {}, element("button", { class: "danger", text: "Delete", onclick: () => deleteDocument(doc.doc_id) })),
      ),
    ),
  );
}

async function deleteDocument(docId) {
  try {
    await api(`/v1/corpora/${encoded(selected)}/documents/${encoded(docId)}`, { method: "DELETE" });
    notify(`deleted ${docId} from ${selected}`, true);
    await refreshCorpora();
    await refreshDocuments();
  } catch (error) {
    reportFailure(error);
  }
}

async function deleteCorpus(name) {
  if (!window.confirm(`Delete the corpus ${name} and all its documents?`)) return;
  try {
    await api(`/v1/corpora/${encoded(name)}`, { method: "DELETE" });
    notify(`deleted corpus ${name}`, true);
    await refreshCorpora();
  } catch (error) {
    reportFailure(error);
  }
}

async function waitForJob(job, bar, status) {
  for (;;) {
    const current = await api(`/v1/jobs/${encoded(job.job_id)}`);
    bar.max = Math.max(current.total, 1);
    bar.value = current.total ? current.done : 0;
    status.textContent = `${current.status} ${current.stage} ${current.done}/${current.total}`;
    if (current.status === "succeeded" || current.status === "failed") return current;
    await new Promise((resolve) => setTimeout(resolve, JOB_POLL_MS));
  }
}

async function uploadFiles(event) {
  event.preventDefault();
  const files = document.getElementById("upload-files").files;
  if (!selected || !files.length) return;
  const sendBar = document.getElementById("upload-bar");
  const ingestBar = document.getElementById("ingest-bar");
  const status = document.getElementById("upload-status");
  document.getElementById("upload-progress").hidden = false;
  sendBar.value = 0;
  ingestBar.value = 0;
  status.textContent = "sending";
  try {
    const job = await upload(`/v1/corpora/${encoded(selected)}/documents`, files, (share) => {
      sendBar.value = share;
    });
    sendBar.value = 1;
    const finished = await waitForJob(job, ingestBar, status);
    document.getElementById("upload-files").value = "";
    await refreshCorpora();
    await refreshDocuments();
    if (finished.status === "failed") {
      status.textContent = "failed";
      notify(`ingest failed: ${finished.error?.message || "unknown error"}`);
    } else {
      const result = finished.result;
      ingestBar.value = ingestBar.max;
      status.textContent = `done in ${result.seconds.toFixed(1)} s`;
      notify(
        `${result.added.length} added, ${result.replaced.length} replaced, ` +
          `${result.skipped.length} unchanged; ${result.chunks_added} chunks`,
        true,
      );
    }
  } catch (error) {
    status.textContent = "failed";
    reportFailure(error);
  }
}

async function createCorpus(event) {
  event.preventDefault();
  const name = document.getElementById("new-corpus-name").value.trim();
  const description = document.getElementById("new-corpus-description").value;
  try {
    await api("/v1/corpora", { method: "POST", body: { name, description } });
    notify(`created corpus ${name}`, true);
    event.target.reset();
    selected = name;
    await refreshCorpora();
    await select(name);
  } catch (error) {
    reportFailure(error);
  }
}

export function setUpCorpora() {
  document.getElementById("create-corpus").addEventListener("submit", createCorpus);
  document.getElementById("upload-form").addEventListener("submit", uploadFiles);
}

export async function showCorpora() {
  await refreshCorpora();
  await refreshDocuments();
}
