// Cache page: the chunk-cache tiers from /v1/cache/stats (an admin route), sampled while
// the page is open; bytes by tier and each tier's share of lookups over time, one point
// per sampling interval that had lookups.

import { api } from "./api.js";
import { lineChart } from "./charts.js";
import { element, formatBytes, reportFailure } from "./dom.js";

const POLL_MS = 2000;
const KEEP_SAMPLES = 300;
const samples = [];
let timer = null;

function enabledTiers(stats) {
  return Object.entries(stats.chunks.tiers).filter(([, tier]) => tier.enabled);
}

function showTable(stats) {
  const rows = enabledTiers(stats).map(([name, tier]) =>
    element(
      "tr",
      { "data-tier": name },
      element("td", { text: name }),
      element("td", { class: "num", text: String(tier.entries) }),
      element("td", { class: "num", text: formatBytes(tier.bytes) }),
      element("td", { class: "num", text: formatBytes(tier.capacity_bytes) }),
      element("td", { class: "num", text: String(tier.hits) }),
      element("td", { class: "num", text: String(tier.evictions) }),
    ),
  );
  document.querySelector("#tier-table tbody").replaceChildren(...rows);
  const chunks = stats.chunks;
  const lookups = chunks.hits + chunks.misses;
  const engine = stats.engine;
  const figures = [
    ["chunk lookups", String(lookups)],
    ["chunk hit rate", lookups ? `${((100 * chunks.hits) / lookups).toFixed(1)}%` : "-"],
    ["knowledge-tree nodes", String(chunks.tree_nodes)],
    ["replacement policy", chunks.policy],
    ["engine prefix-cache hit rate", engine.prefix_cache_queries ? `${((100 * engine.prefix_cache_hits) / engine.prefix_cache_queries).toFixed(1)}%` : "-"],
    ["engine KV blocks in use", `${(100 * engine.usage).toFixed(1)}%`],
  ];
  document
    .getElementById("cache-figures")
    .replaceChildren(...figures.flatMap(([name, value]) => [element("dt", { text: name }), element("dd", { text: value })]));
}

function showCharts() {
  if (!samples.length) return;
  const start = samples[0].at;
  const tiers = enabledTiers(samples[samples.length - 1].stats).map(([name]) => name);
  const seconds = (sample) => (sample.at - start) / 1000;
  lineChart(
    document.getElementById("bytes-chart"),
    tiers.map((name) => ({ name, points: samples.map((s) => [seconds(s), s.stats.chunks.tiers[name].bytes]) })),
    { x: "seconds", y: "", xFormat: (v) => v.toFixed(0), yFormat: formatBytes },
  );
  const rates = tiers.map((name) => ({ name, points: [] }));
  for (let i = 1; i < samples.length; i += 1) {
    const before = samples[i - 1].stats.chunks;
    const after = samples[i].stats.chunks;
    const lookups = after.hits + after.misses - (before.hits + before.misses);
    if (lookups <= 0) continue; // no lookups in this interval: no rate to show
    tiers.forEach((name, j) => {
      const hits = after.tiers[name].hits - before.tiers[name].hits;
      rates[j].points.push([seconds(samples[i]), hits / lookups]);
    });
  }
  lineChart(document.getElementById("hits-chart"), rates, {
    x: "seconds",
    y: "",
    yRange: [0, 1],
    xFormat: (v) => v.toFixed(0),
    yFormat: (v) => `${(100 * v).toFixed(0)}%`,
  });
}

async function sample() {
  try {
    const stats = await api("/v1/cache/stats");
    samples.push({ at: Date.now(), stats });
    if (samples.length > KEEP_SAMPLES) samples.shift();
    showTable(stats);
    showCharts();
    document.getElementById("cache-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    stopCache();
    reportFailure(error);
  }
}

export async function showCache() {
  stopCache();
  await sample();
  timer = setInterval(sample, POLL_MS);
}

export function stopCache() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}
