// Line and scatter charts drawn as inline SVG, sized to the element they draw into.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#2457c5", "#e07b39", "#2e9e6a", "#b93c8f", "#7a5cc7", "#8a8f98", "#c9a227", "#3aa6b9"];
const MARGIN = { left: 58, right: 16, top: 12, bottom: 34 };

function node(parent, name, attributes = {}, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  parent.appendChild(element);
  return element;
}

function extent(values, includeZero) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (includeZero) low = Math.min(0, low);
  if (!Number.isFinite(low) || !Number.isFinite(high)) return [0, 1];
  if (low === high) return [low - 1, high + 1];
  const pad = (high - low) * 0.06;
  return [includeZero && low === 0 ? 0 : low - pad, high + pad];
}

function frame(svg, xRange, yRange, labels) {
  svg.replaceChildren();
  const width = svg.clientWidth || 600;
  const height = svg.clientHeight || 220;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const innerW = width - MARGIN.left - MARGIN.right;
  const innerH = height - MARGIN.top - MARGIN.bottom;
  const x = (v) => MARGIN.left + ((v - xRange[0]) / (xRange[1] - xRange[0])) * innerW;
  const y = (v) => MARGIN.top + innerH - ((v - yRange[0]) / (yRange[1] - yRange[0])) * innerH;
  for (let i = 0; i <= 4; i += 1) {
    const yv = yRange[0] + ((yRange[1] - yRange[0]) * i) / 4;
    node(svg, "line", { class: "axis", x1: MARGIN.left, x2: width - MARGIN.right, y1: y(yv), y2: y(yv) });
    node(svg, "text", { x: MARGIN.left - 6, y: y(yv) + 4, "text-anchor": "end" }, labels.yFormat(yv));
    const xv = xRange[0] + ((xRange[1] - xRange[0]) * i) / 4;
    node(svg, "text", { x: x(xv), y: height - MARGIN.bottom + 16, "text-anchor": "middle" }, labels.xFormat(xv));
  }
  node(svg, "text", { x: MARGIN.left + innerW / 2, y: height - 4, "text-anchor": "middle" }, labels.x);
  if (labels.y) {
    const middle = MARGIN.top + innerH / 2;
    node(svg, "text", { x: 12, y: middle, transform: `rotate(-90 12 ${middle})`, "text-anchor": "middle" }, labels.y);
  }
  return { x, y, width };
}

function legend(svg, names, width) {
  names.forEach((name, i) => {
    const top = MARGIN.top + 4 + i * 14;
    node(svg, "rect", { x: width - 120, y: top - 8, width: 9, height: 9, fill: PALETTE[i % PALETTE.length] });
    node(svg, "text", { x: width - 106, y: top }, name);
  });
}

// series: [{name, points: [[x, y], ...]}]; labels.yRange fixes the y axis (else from data)
export function lineChart(svg, series, labels) {
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  const yRange = labels.yRange || extent(ys.length ? ys : [0, 1], true);
  const { x, y, width } = frame(svg, extent(xs.length ? xs : [0, 1]), yRange, labels);
  series.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    const path = s.points.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    if (path) node(svg, "path", { d: path, fill: "none", stroke: color, "stroke-width": 2 });
  });
  legend(svg, series.map((s) => s.name), width);
}

// points: [{label, x, y, low, high}] with optional vertical interval [low, high]
export function scatterChart(svg, points, labels) {
  const xs = points.map((p) => p.x);
  const ys = points.flatMap((p) => [p.y, p.low ?? p.y, p.high ?? p.y]);
  const { x, y, width } = frame(svg, extent(xs, true), extent(ys, true), labels);
  const placed = [];
  points.forEach((p, i) => {
    const color = PALETTE[i % PALETTE.length];
    if (p.low !== undefined && p.high !== undefined) {
      node(svg, "line", { x1: x(p.x), x2: x(p.x), y1: y(p.low), y2: y(p.high), stroke: color, "stroke-width": 1.5, opacity: 0.6 });
    }
    const dot = node(svg, "circle", { cx: x(p.x), cy: y(p.y), r: 5, fill: color });
    node(dot, "title", {}, `${p.label}: ${labels.xFormat(p.x)}, ${labels.yFormat(p.y)}`);
    const box = labelBox(p.label, x(p.x), y(p.y), width, placed);
    if (box) node(svg, "text", { x: box.x, y: box.y, "text-anchor": box.anchor }, p.label);
  });
}

// Where a point's label fits without covering one already placed (null: the point's
// tooltip and the table name it instead).
function labelBox(text, px, py, width, placed) {
  const w = text.length * 6;
  const anchor = px + 7 + w > width - MARGIN.right ? "end" : "start";
  const left = anchor === "start" ? px + 7 : px - 7 - w;
  for (const dy of [-6, 12, -18, 24]) {
    const box = { left, right: left + w, top: py + dy - 10, bottom: py + dy + 2 };
    const clear = placed.every((o) => box.right < o.left || box.left > o.right || box.bottom < o.top || box.top > o.bottom);
    if (clear) {
      placed.push(box);
      return { x: anchor === "start" ? px + 7 : px - 7, y: py + dy, anchor };
    }
  }
  return null;
}
