// The console's pages, switched by the URL's fragment (#corpora, #query, #cache, #reports).

import { api, apiKey, setApiKey } from "./api.js";
import { showCache, stopCache } from "./cache.js";
import { setUpCorpora, showCorpora } from "./corpora.js";
import { notify, reportFailure } from "./dom.js";
import { setUpPlayground, showPlayground } from "./playground.js";
import { showReports } from "./reports.js";

const PAGES = { corpora: showCorpora, query: showPlayground, cache: showCache, reports: showReports };

async function show() {
  const name = location.hash.slice(1) in PAGES ? location.hash.slice(1) : "corpora";
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${name}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === name);
  if (name !== "cache") stopCache();
  document.body.dataset.page = name;
  document.body.dataset.ready = "false";
  try {
    await PAGES[name]();
  } catch (error) {
    reportFailure(error);
  } finally {
    document.body.dataset.ready = "true";
  }
}

async function useKey(event) {
  event.preventDefault();
  setApiKey(document.getElementById("api-key").value.trim());
  notify("");
  await showModel();
  await show();
}

async function showModel() {
  try {
    const settings = await api("/ui/api/settings");
    document.getElementById("model-name").textContent = settings.model;
  } catch (error) {
    document.getElementById("model-name").textContent = "";
    if (error.status === 401) notify("This server needs an API key: enter it above.");
    else reportFailure(error);
  }
}

document.getElementById("api-key").value = apiKey();
document.getElementById("key-form").addEventListener("submit", useKey);
setUpCorpora();
setUpPlayground();
window.addEventListener("hashchange", show);
showModel();
show();
