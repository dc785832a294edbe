// Query playground: pick a corpus, a fusion method and its budget; the answer streams in,
// then the sources with where their KV came from and what the fusion did to it.

import { api, streamEvents } from "./api.js";
import { PALETTE } from "./charts.js";
import { element, formatSeconds, notify, reportFailure } from "./dom.js";

// The request field that is each method's budget, and the label the page shows for it.
const BUDGETS = {
  cacheblend: ["recompute_ratio", "recompute ratio"],
  gradual: ["recompute_ratio", "recompute ratio"],
  gradual_weighted: ["recompute_ratio", "recompute ratio"],
  queryblend: ["recompute_ratio", "recompute ratio"],
  sinkblend: ["recompute_ratio", "recompute ratio"],
  legolink: ["legolink_k", "tokens per chunk"],
  cachefocus: ["focus_keep", "chunks kept"],
};

let settings = null;

function budgetFor(method) {
  return BUDGETS[method] || null;
}

function showBudget() {
  const method = document.getElementById("query-method").value;
  const budget = budgetFor(method);
  const input = document.getElementById("query-budget");
  const label = document.getElementById("budget-label");
  input.disabled = !budget;
  label.firstChild.textContent = budget ? `${budget[1]} ` : "budget (none) ";
  if (budget && settings) input.value = settings[budget[0]];
  else input.value = "";
}

async function fillCorpora() {
  const select = document.getElementById("query-corpus");
  const current = select.value;
  const { data } = await api("/v1/corpora");
  select.replaceChildren(...data.map((c) => element("option", { value: c.name, text: c.name })));
  if (data.some((c) => c.name === current)) select.value = current;
}

async function loadSettings() {
  settings = await api("/ui/api/settings");
  const select = document.getElementById("query-method");
  select.replaceChildren(...settings.methods.map((m) => element("option", { value: m, text: m })));
  select.value = settings.method;
  document.getElementById("query-max-tokens").max = String(1 << 20);
  document.getElementById("query-k").max = String(settings.max_k);
  showBudget();
}

function sourceItem(source) {
  const marks = [];
  if (source.pruned) marks.push(element("span", { class: "badge pruned", text: "pruned" }));
  if (source.cache_tier) {
    marks.push(element("span", { class: "badge cached", text: `cached: ${source.cache_tier}` }));
  } else {
    marks.push(element("span", { class: "badge computed", text: "computed now" }));
  }
  const name = source.source.split("/").pop();
  return element(
    "li",
    { class: "source" },
    ...marks,
    element("strong", { text: name }),
    element("span", { class: "muted", text: `  score ${source.score.toFixed(3)}  chars ${source.char_start}-${source.char_end}` }),
    element("div", { class: "source-text", text: source.text.slice(0, 400) }),
  );
}

function bar(title, parts) {
  const total = parts.reduce((sum, [, value]) => sum + value, 0) || 1;
  const shown = parts.filter(([, value]) => value > 0);
  return element(
    "div",
    { class: "kv-use" },
    element("h3", { text: title }),
    element(
      "div",
      { class: "kv-bar" },
      ...shown.map(([name, value], i) => {
        const span = element("span", { title: `${name}: ${value} tokens` });
        span.style.width = `${(100 * value) / total}%`;
        span.style.background = PALETTE[i % PALETTE.length];
        return span;
      }),
    ),
    element(
      "div",
      { class: "legend" },
      ...shown.map(([name, value], i) => {
        const swatch = element("span", { class: "swatch" });
        swatch.style.background = PALETTE[i % PALETTE.length];
        return element("span", { "data-mark": name }, swatch, `${name} ${value}`);
      }),
    ),
  );
}

function showResult(result, clientTtft) {
  document.getElementById("sources").replaceChildren(...result.sources.map(sourceItem));
  const cache = result.cache;
  const figures = [
    ["method", cache.method],
    ["TTFT (server)", formatSeconds(result.timings.ttft)],
    ["TTFT (this page)", formatSeconds(clientTtft)],
    ["total", formatSeconds(result.timings.total)],
    ["prompt tokens", String(result.prompt_tokens)],
    ["answer tokens", String(result.completion_tokens)],
    ["finish", result.finish_reason || "-"],
  ];
  document
    .getElementById("query-timings")
    .replaceChildren(...figures.flatMap(([name, value]) => [element("dt", { text: name }), element("dd", { "data-figure": name, text: value })]));
  const byTier = Object.entries(cache.tokens_by_tier).map(([tier, tokens]) => [`from ${tier}`, tokens]);
  const exact = cache.exact_tokens;
  document.getElementById("kv-use").replaceChildren(
    bar("Where the context KV came from", [...byTier, ["computed now", cache.computed_tokens]]),
    bar("What fusion did with it", [
      ["exact", exact],
      ["reused", Math.max(0, cache.reused_tokens - exact)],
      ["repaired", cache.recomputed_tokens],
      ["pruned", cache.pruned_tokens],
    ]),
  );
}

async function ask(event) {
  event.preventDefault();
  const method = document.getElementById("query-method").value;
  const body = {
    corpus: document.getElementById("query-corpus").value,
    query: document.getElementById("query-text").value,
    method,
    k: Number(document.getElementById("query-k").value),
    max_tokens: Number(document.getElementById("query-max-tokens").value),
    stream: true,
  };
  const budget = budgetFor(method);
  const budgetValue = document.getElementById("query-budget").value;
  if (budget && budgetValue !== "") body[budget[0]] = Number(budgetValue);
  const answer = document.getElementById("answer");
  answer.textContent = "";
  answer.dataset.state = "streaming";
  document.getElementById("sources").replaceChildren();
  document.getElementById("kv-use").replaceChildren();
  document.getElementById("query-timings").replaceChildren();
  notify("");
  const started = performance.now();
  let clientTtft = null;
  try {
    await streamEvents("/v1/query", body, ({ event, data }) => {
      if (event === "token") {
        if (clientTtft === null) clientTtft = (performance.now() - started) / 1000;
        answer.textContent += data.text;
      } else if (event === "result") {
        answer.textContent = data.answer;
        showResult(data, clientTtft);
      } else if (event === "error") {
        notify(`${data.type}: ${data.message}`);
      }
    });
  } catch (error) {
    reportFailure(error);
  } finally {
    answer.dataset.state = "done";
  }
}

export function setUpPlayground() {
  document.getElementById("query-form").addEventListener("submit", ask);
  document.getElementById("query-method").addEventListener("change", showBudget);
}

export async function showPlayground() {
  if (!settings) await loadSettings();
  await fillCorpora();
}
