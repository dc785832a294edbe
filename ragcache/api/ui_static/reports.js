// Reports page: the evaluation reports in server.reports_dir. A fusion sweep (a summary
// of settings with TTFT speedup and quality) is plotted as speedup against quality, with
// its 95% interval where the report has one; any other report is shown as its JSON.

import { api } from "./api.js";
import { scatterChart } from "./charts.js";
import { element, reportFailure } from "./dom.js";

// The quality figure plotted, first one the report has.
const QUALITY = [
  ["gap_closed", "share of the gap to full prefill closed"],
  ["first_token", "first token agrees with full prefill"],
  ["agree16", "16 tokens agree with full prefill"],
];

function number(value, digits = 3) {
  if (value === undefined || value === null) return "-";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function qualityOf(summary) {
  const rows = Object.values(summary);
  return QUALITY.find(([key]) => rows.some((row) => typeof row[key] === "number")) || QUALITY[1];
}

function showFusion(report) {
  const [key, label] = qualityOf(report.summary);
  const points = Object.entries(report.summary)
    .filter(([, row]) => typeof row.speedup === "number" && typeof row[key] === "number")
    .map(([name, row]) => ({
      label: name,
      x: row.speedup,
      y: row[key],
      low: row[`${key}_lo`],
      high: row[`${key}_hi`],
    }));
  const chart = document.getElementById("report-chart");
  chart.removeAttribute("hidden"); // an SVG element has no hidden property, only the attribute
  scatterChart(chart, points, {
    x: "TTFT speedup over full prefill (x)",
    y: label,
    xFormat: (v) => `${v.toFixed(1)}x`,
    yFormat: (v) => v.toFixed(2),
  });
  const columns = ["examples", "speedup", key, `${key}_lo`, `${key}_hi`, "ttft_s", "recompute_fraction", "f1"];
  const table = element(
    "table",
    { class: "report-table" },
    element("thead", {}, element("tr", {}, element("th", { text: "setting" }), ...columns.map((c) => element("th", { class: "num", text: c })))),
    element(
      "tbody",
      {},
      ...Object.entries(report.summary).map(([name, row]) =>
        element("tr", {}, element("td", { text: name }), ...columns.map((c) => element("td", { class: "num", text: number(row[c]) }))),
      ),
    ),
  );
  document.getElementById("report-body").replaceChildren(table);
}

function showOther(report) {
  document.getElementById("report-chart").setAttribute("hidden", "");
  const shown = { ...report };
  delete shown.command;
  document.getElementById("report-body").replaceChildren(element("pre", { text: JSON.stringify(shown, null, 2).slice(0, 20000) }));
}

async function open(entry) {
  for (const item of document.querySelectorAll("#report-list li")) {
    item.classList.toggle("selected", item.dataset.report === entry.name);
  }
  try {
    const report = await api(`/ui/api/reports/${encodeURIComponent(entry.name)}`);
    document.getElementById("report-title").textContent = entry.name;
    document.getElementById("report-command").textContent = report.command || "(no command recorded)";
    if (entry.kind === "fusion") showFusion(report);
    else showOther(report);
  } catch (error) {
    reportFailure(error);
  }
}

export async function showReports() {
  const { folder, data } = await api("/ui/api/reports");
  document.getElementById("reports-folder").textContent = data.length ? folder : `no reports in ${folder}`;
  const fusionFirst = [...data].sort((a, b) => (a.kind === b.kind ? 0 : a.kind === "fusion" ? -1 : 1));
  document.getElementById("report-list").replaceChildren(
    ...fusionFirst.map((entry) =>
      element("li", { "data-report": entry.name, "data-kind": entry.kind, text: entry.name, onclick: () => open(entry) }),
    ),
  );
  const first = fusionFirst.find((entry) => entry.readable);
  if (first) await open(first);
}
