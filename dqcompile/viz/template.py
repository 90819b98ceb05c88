"""The graph page's inline style and script (kept here as text so the package ships no data files).

The script reads the view's JSON from <script id="graph-data">, lays the graph out for the current fold
state and draws it as SVG:
- a compound layered layout: an expanded module is a frame holding its own layout; inside it, each
  child (a collapsed module, a layer, or an op) goes one row below the lowest child it reads from,
  children taken in graph order, rows ordered by the mean position of what they read (fewer crossings);
- edges between what is visible: an edge into or out of a folded module attaches to its box;
- search (the box, or the URL fragment #search=TEXT) unfolds what hides the matches, outlines them
  and scrolls to the first; Enter or the arrows step through them;
- clicking a folded module unfolds it, clicking a frame's header folds it, clicking anything shows
  its details in the side panel.
"""

STYLE = r"""
:root { --match: #ff00c8; --pair: #8e44ad; --line: #8a94a6; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; background: #f6f7f9; }
header { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center;
  padding: 8px 14px; background: #1f2a3a; color: #eef2f7; }
header h1 { font-size: 15px; margin: 0; font-weight: 600; }
header .stats b { color: #fff; }
header input[type=search] { width: 300px; padding: 4px 8px; border-radius: 4px; border: 1px solid #5b6b82; }
header button, header select { padding: 3px 8px; border-radius: 4px; border: 1px solid #5b6b82; background: #2e3d52; color: #eef2f7; cursor: pointer; }
#search-status { min-width: 90px; display: inline-block; }
main { display: flex; height: calc(100vh - 52px); min-height: 420px; }
#graph-pane { flex: 1; overflow: auto; background: #fff; border-right: 1px solid #d5dae1; }
#side { width: 340px; overflow: auto; padding: 10px 12px; }
#side h2, #summary h2 { font-size: 13px; margin: 12px 0 6px; text-transform: uppercase; letter-spacing: .04em; color: #56627a; }
.legend-row { display: flex; align-items: center; gap: 6px; margin: 2px 0; }
.swatch { display: inline-block; width: 14px; height: 14px; border: 1px solid #0003; border-radius: 3px; flex: none; }
.heat-bar { height: 12px; border-radius: 3px; border: 1px solid #0003; }
.heat-ticks { display: flex; justify-content: space-between; font-size: 11px; color: #56627a; }
#details dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 8px; margin: 0; }
#details dt { color: #56627a; } #details dd { margin: 0; word-break: break-all; }
#summary { padding: 6px 14px 30px; overflow-x: auto; }
table { border-collapse: collapse; background: #fff; margin-bottom: 8px; }
th, td { border: 1px solid #d5dae1; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr[data-layer] { cursor: pointer; } tr[data-layer]:hover { background: #f1f5ff; }
svg text { font: 11px ui-monospace, "DejaVu Sans Mono", Menlo, monospace; fill: #1d2430; pointer-events: none; }
svg .sub { fill: #4a5468; font-size: 10px; }
.on-dark text, .on-dark text.sub { fill: #fff; }
.unit { cursor: pointer; }
.unit rect.box { stroke: #5b6b82; stroke-width: 1; }
.unit.op rect.box { fill: #fff; }
.unit.io rect.box { fill: #1f2a3a; } .unit.io text { fill: #fff; }
.unit.module rect.box { fill: #f3f5f9; stroke-dasharray: none; stroke-width: 1.5; }
.unit.selected rect.box { stroke: #000; stroke-width: 2.5; }
.unit.match rect.box, .frame.match rect.frame-box { stroke: var(--match); stroke-width: 4; }
.frame rect.frame-box { fill: #fbfcfd; stroke: #aab4c3; stroke-dasharray: 4 3; }
.frame rect.frame-head { fill: #e6eaf0; cursor: pointer; }
path.edge { fill: none; stroke: var(--line); stroke-width: 1.2; }
path.edge.from-input { stroke-opacity: 0.35; stroke-dasharray: 2 3; }
.unit.int-op rect.box { stroke: #4e79a7; stroke-width: 2; }
path.pair { fill: none; stroke: var(--pair); stroke-width: 2; stroke-dasharray: 6 4; }
text.pair-label { fill: var(--pair); font-weight: bold; }
.badge { fill: var(--pair); }
"""

SCRIPT = r"""
(function () {
"use strict";
const D = JSON.parse(document.getElementById("graph-data").textContent);
const SVGNS = "http://www.w3.org/2000/svg";
const NODE_H = 24, BOX_H = 38, HEAD_H = 22, PAD = 10, GAP_X = 14, GAP_Y = 26, CHAR_W = 6.7;

const modules = D.modules.map(([path, cls, parent], id) => ({id, path, cls, parent, children: [], direct: [], nodes: []}));
const nodes = D.nodes.map(([name, op, module, layer, inputs], id) => ({id, name, op, module, layer, inputs, users: []}));
const dbValue = v => v === "inf" ? Infinity : v === "-inf" ? -Infinity : v;
const layers = D.layers.map(([name, module, precision, shape, calls, note, sqnr, heat, wSqnr, aSqnr]) =>
  ({name, module, precision, shape, calls, note, sqnr: dbValue(sqnr), heat, wSqnr: dbValue(wSqnr ?? null), aSqnr: dbValue(aSqnr ?? null), node: -1}));
const precisions = D.precisions.map(([label, weights, activations, color]) => ({label, weights, activations, color}));

for (const m of modules) if (m.parent >= 0) modules[m.parent].children.push(m.id);
for (const m of modules) m.depth = m.parent < 0 ? 0 : -1;
function depthOf(m) { const mod = modules[m]; if (mod.depth < 0) mod.depth = depthOf(mod.parent) + 1; return mod.depth; }
modules.forEach(m => depthOf(m.id));
for (const n of nodes) {
  n.chain = [];
  for (let m = n.module; m >= 0; m = modules[m].parent) n.chain.unshift(m);
  for (const m of n.chain) modules[m].nodes.push(n.id);
  modules[n.module].direct.push(n.id);
  for (const i of n.inputs) nodes[i].users.push(n.id);
  if (n.layer >= 0) layers[n.layer].node = n.id;  // the last node of a layer is its output op
}
for (const m of modules) {
  m.first = m.nodes.length ? m.nodes[0] : Infinity;
  m.rel = m.parent > 0 && m.path.startsWith(modules[m.parent].path + ".") ? m.path.slice(modules[m.parent].path.length + 1) : m.path;
  m.layer = -1;
}
layers.forEach((l, i) => { if (modules[l.module].path === l.name && modules[l.module].children.length === 0) modules[l.module].layer = i; });
// Per module: layers inside, by precision, and the worst SQNR inside.
for (const m of modules) { m.layerCount = 0; m.byPrecision = new Array(precisions.length).fill(0); m.worst = -1; }
const measured = l => layers[l].sqnr !== null && precisions[layers[l].precision].label !== "float";
layers.forEach((l, i) => {
  for (let m = l.module; m >= 0; m = modules[m].parent) {
    const mod = modules[m];
    mod.layerCount += 1; mod.byPrecision[l.precision] += 1;
    if (measured(i) && (mod.worst < 0 || l.sqnr < layers[mod.worst].sqnr)) mod.worst = i;
  }
});
const layerByName = new Map(layers.map((l, i) => [l.name, i]));
const pairs = D.pairs.map(([kind, sources, consumers, note]) =>
  ({kind, sources: sources.map(s => layerByName.get(s)), consumers: consumers.map(c => layerByName.get(c)), note}));

let expanded = new Set();
let colourMode = "precision";
let matches = [], current = -1, selected = null;
const keyOf = u => (u.kind === "m" ? "m" : "n") + u.id;

function defaultFold() {
  expanded = new Set([0]);
  // Unfold wrappers: a module that is its parent's only child module, with no ops of its own beside it.
  let m = 0;
  while (modules[m].children.filter(c => modules[c].first < Infinity).length === 1 &&
         modules[m].direct.filter(n => nodes[n].op !== "input" && nodes[n].op !== "output").length === 0) {
    m = modules[m].children.find(c => modules[c].first < Infinity);
    if (modules[m].layer >= 0) break;
    expanded.add(m);
  }
}

function dark(hex) {  // text goes white on fills darker than mid grey
  const v = parseInt(hex.slice(1), 16), r = v >> 16, g = (v >> 8) & 255, b = v & 255;
  return 0.299 * r + 0.587 * g + 0.114 * b < 140;
}
function fmtDb(s) { return s === null ? "" : s === Infinity ? "exact" : s.toFixed(1) + " dB"; }
function layerFill(l) {
  const layer = layers[l];
  if (colourMode === "sqnr" && measured(l)) return layer.heat;
  return precisions[layer.precision].color;
}
function shortPrecision(p) {
  const prec = precisions[p];
  if (prec.label === "float") return "float";
  const w = prec.weights.replace(/^int(\d+) per channel$/, "W$1 ch").replace(/^int(\d+) group (\d+)$/, "W$1 g$2");
  const a = prec.activations === "float" ? "A16" : prec.activations
    .replace(/^int(\d+) dynamic per token$/, "A$1 tok").replace(/^int(\d+) dynamic group (\d+)$/, "A$1 g$2")
    .replace(/^int(\d+) static per tensor$/, "A$1 static");
  return w + " · " + a;
}

// ---- layout -------------------------------------------------------------------------------------
function unitIn(n, m) {  // the unit of compound m that holds node n
  const node = nodes[n], d = modules[m].depth;
  return node.chain.length - 1 === d ? {kind: "n", id: n} : {kind: "m", id: node.chain[d + 1]};
}
function inside(n, m) { return nodes[n].chain[modules[m].depth] === m; }

function measure(u) {
  if (u.kind === "n") {
    const n = nodes[u.id];
    return {w: Math.max(64, n.name.length * CHAR_W + 16), h: NODE_H};
  }
  const m = modules[u.id];
  if (expanded.has(u.id)) return layoutCompound(u.id);
  return {w: Math.max(96, Math.max(m.rel.length, boxSub(u.id).length) * CHAR_W + 20), h: BOX_H};
}
function boxSub(m) {
  const mod = modules[m];
  if (mod.layer >= 0) {
    const l = layers[mod.layer];
    return shortPrecision(l.precision) + (measured(mod.layer) ? " · " + fmtDb(l.sqnr) : "");
  }
  let text = mod.cls + " · " + mod.nodes.length + " ops";
  if (mod.layerCount) text += " · " + mod.layerCount + " linear";
  if (mod.worst >= 0) text += " · worst " + fmtDb(layers[mod.worst].sqnr);
  return text;
}

function layoutCompound(m) {
  const mod = modules[m];
  const units = [];
  for (const c of mod.children) if (modules[c].first < Infinity) units.push({kind: "m", id: c, first: modules[c].first});
  for (const n of mod.direct) units.push({kind: "n", id: n, first: n});
  units.sort((a, b) => a.first - b.first);
  const index = new Map(units.map((u, i) => [keyOf(u), i]));
  const preds = units.map(() => new Set());
  units.forEach((u, i) => {
    const members = u.kind === "n" ? [u.id] : modules[u.id].nodes;
    for (const n of members) for (const src of nodes[n].inputs) {
      if (!inside(src, m)) continue;
      const j = index.get(keyOf(unitIn(src, m)));
      if (j !== i && units[j].first < u.first) preds[i].add(j);
    }
  });
  const rank = [], rows = [];
  units.forEach((u, i) => {
    let r = 0;
    for (const j of preds[i]) r = Math.max(r, rank[j] + 1);
    rank.push(r);
    (rows[r] = rows[r] || []).push(i);
    u.size = measure(u);
  });
  const cx = new Array(units.length);
  let y = HEAD_H + PAD;
  for (const row of rows) {
    if (!row) continue;
    const bary = i => { const p = [...preds[i]]; return p.length ? p.reduce((s, j) => s + cx[j], 0) / p.length : Infinity; };
    row.sort((a, b) => (bary(a) - bary(b)) || (units[a].first - units[b].first));
    const width = row.reduce((s, i) => s + units[i].size.w, 0) + GAP_X * (row.length - 1);
    let x = -width / 2, height = 0;
    for (const i of row) {
      units[i].x = x; units[i].y = y; cx[i] = x + units[i].size.w / 2;
      x += units[i].size.w + GAP_X; height = Math.max(height, units[i].size.h);
    }
    y += height + GAP_Y;
  }
  const minX = Math.min(0, ...units.map(u => u.x)), maxX = Math.max(0, ...units.map(u => u.x + u.size.w));
  for (const u of units) u.x += PAD - minX;
  const title = (m === 0 ? (mod.cls || "model") : mod.rel + " · " + mod.cls);
  const w = Math.max(maxX - minX + 2 * PAD, title.length * CHAR_W + 40);
  return {w, h: y - GAP_Y + PAD + (units.length ? 0 : NODE_H), units, title};
}

// ---- drawing ------------------------------------------------------------------------------------
function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function text(parent, x, y, s, cls) { const t = el("text", {x, y}, parent); if (cls) t.setAttribute("class", cls); t.textContent = s; return t; }

let placed = new Map();  // unit key -> {x, y, w, h}
function render() {
  const svg = document.getElementById("graph");
  svg.textContent = "";
  placed = new Map();
  const root = layoutCompound(0);
  const frames = el("g", {}, svg), edgeLayer = el("g", {}, svg), pairLayer = el("g", {}, svg), boxes = el("g", {}, svg);
  const matchKeys = new Set(matches.map(keyOf));
  (function draw(layout, m, ox, oy) {
    const frame = el("g", {"class": "frame" + (matchKeys.has("m" + m) ? " match" : ""), "data-path": modules[m].path}, frames);
    el("rect", {"class": "frame-box", x: ox, y: oy, width: layout.w, height: layout.h, rx: 6}, frame);
    const head = el("rect", {"class": "frame-head", x: ox, y: oy, width: layout.w, height: HEAD_H, rx: 6}, frame);
    text(frame, ox + 8, oy + 15, (m === 0 ? "" : "▾ ") + layout.title);
    if (m !== 0) head.addEventListener("click", () => { expanded.delete(m); select({kind: "m", id: m}); render(); });
    placed.set("m" + m, {x: ox, y: oy, w: layout.w, h: layout.h, frame: true});
    for (const u of layout.units) {
      const x = ox + u.x, y = oy + u.y;
      if (u.kind === "m" && expanded.has(u.id)) { draw(u.size, u.id, x, y); continue; }
      placed.set(keyOf(u), {x, y, w: u.size.w, h: u.size.h});
      drawBox(boxes, u, x, y, u.size, matchKeys.has(keyOf(u)));
    }
  })(root, 0, 0, 0);
  svg.setAttribute("width", root.w + 2); svg.setAttribute("height", root.h + 2);
  svg.setAttribute("viewBox", "0 0 " + (root.w + 2) + " " + (root.h + 2));
  drawEdges(edgeLayer);
  drawPairs(pairLayer);
  document.getElementById("visible-count").textContent = String(placed.size - [...placed.values()].filter(p => p.frame).length);
}

function drawBox(parent, u, x, y, size, isMatch) {
  const g = el("g", {}, parent);
  let cls = "unit", fill = null;
  if (u.kind === "n") {
    const n = nodes[u.id];
    cls += n.op === "input" || n.op === "output" ? " io" : n.op.startsWith("dqcompile.") && n.layer < 0 ? " op int-op" : " op";
    if (n.layer >= 0) { cls += " layer-op p" + layers[n.layer].precision; fill = layerFill(n.layer); }
    g.setAttribute("data-name", n.name);
    el("title", {}, g).textContent = n.name + "\n" + n.op;
  } else {
    const mod = modules[u.id];
    g.setAttribute("data-path", mod.path);
    if (mod.layer >= 0) { cls += " layer p" + layers[mod.layer].precision; fill = layerFill(mod.layer); }
    else { cls += " module"; if (colourMode === "sqnr" && mod.worst >= 0) fill = layers[mod.worst].heat; }
    el("title", {}, g).textContent = mod.path + " (" + mod.cls + ")";
  }
  if (isMatch) cls += " match";
  if (selected && keyOf(selected) === keyOf(u)) cls += " selected";
  const rect = el("rect", {"class": "box", x, y, width: size.w, height: size.h, rx: u.kind === "n" ? 4 : 6}, g);
  if (fill) { rect.setAttribute("style", "fill:" + fill); if (dark(fill)) cls += " on-dark"; }
  g.setAttribute("class", cls);
  const worst = unitWorst(u);
  if (colourMode === "precision" && worst >= 0) {  // the error as a strip on the left
    el("rect", {"class": "heat", x: x + 1, y: y + 1, width: 6, height: size.h - 2, style: "fill:" + layers[worst].heat}, g);
  }
  if (u.kind === "n") {
    text(g, x + 10, y + 16, nodes[u.id].name);
  } else {
    const mod = modules[u.id];
    text(g, x + 10, y + 15, mod.rel);
    text(g, x + 10, y + 30, boxSub(u.id), "sub");
    if (mod.layer < 0 && mod.layerCount) {  // the precisions inside, as a strip along the bottom
      let sx = x + 1;
      mod.byPrecision.forEach((count, p) => {
        if (!count) return;
        const w = (size.w - 2) * count / mod.layerCount;
        el("rect", {x: sx, y: y + size.h - 5, width: w, height: 4, style: "fill:" + precisions[p].color}, g);
        sx += w;
      });
    }
    const key = "m" + u.id;  // a dot: pairs whose both ends this folded box hides
    const inner = pairs.filter(p => p.sources.some(s => pairRep(s) === key) && p.consumers.some(c => pairRep(c) === key)).length;
    if (inner) { el("circle", {"class": "badge", cx: x + size.w - 9, cy: y + 9, r: 6}, g); }
  }
  g.addEventListener("click", () => {
    if (u.kind === "m" && !expanded.has(u.id)) expanded.add(u.id);
    select(u); render();
  });
}

function unitWorst(u) {  // the layer whose SQNR a box shows: its own, or the worst inside a folded module
  if (u.kind === "m") return modules[u.id].worst;
  const l = nodes[u.id].layer;
  return l >= 0 && measured(l) ? l : -1;
}
function repKey(n) {  // the visible unit that shows node n
  for (const m of nodes[n].chain) if (m !== 0 && !expanded.has(m)) return "m" + m;
  return "n" + n;
}
function pairRep(l) { return l === undefined ? null : repKey(layers[l].node); }
function anchor(key, bottom) {
  const p = placed.get(key);
  return p ? [p.x + p.w / 2, bottom ? p.y + p.h : p.y] : null;
}
function curve(a, b) {
  if (b[1] > a[1]) {
    const dy = Math.max(20, (b[1] - a[1]) / 2);
    return "M" + a[0] + "," + a[1] + " C" + a[0] + "," + (a[1] + dy) + " " + b[0] + "," + (b[1] - dy) + " " + b[0] + "," + b[1];
  }
  const side = Math.max(a[0], b[0]) + 60;  // an edge that goes up: around the side
  return "M" + a[0] + "," + a[1] + " C" + side + "," + (a[1] + 60) + " " + side + "," + (b[1] - 60) + " " + b[0] + "," + b[1];
}
function drawEdges(parent) {
  const seen = new Set();
  for (const n of nodes) {
    const to = repKey(n.id);
    for (const i of n.inputs) {
      const from = repKey(i), key = from + ">" + to;
      if (from === to || seen.has(key)) continue;
      seen.add(key);
      const a = anchor(from, true), b = anchor(to, false);
      if (a && b) el("path", {"class": nodes[i].op === "input" ? "edge from-input" : "edge", d: curve(a, b)}, parent);
    }
  }
}
function drawPairs(parent) {
  const seen = new Set();
  for (const p of pairs) for (const s of p.sources) for (const c of p.consumers) {
    const from = pairRep(s), to = pairRep(c), key = from + ">" + to;
    if (from === to || seen.has(key)) continue;
    seen.add(key);
    const a = anchor(from, true), b = anchor(to, false);
    if (!a || !b) continue;
    el("path", {"class": "pair", d: curve(a, b)}, parent);
    text(parent, (a[0] + b[0]) / 2 + 4, (a[1] + b[1]) / 2, p.kind, "pair-label");
  }
}

// ---- details, search, controls ------------------------------------------------------------------
function select(u) {
  selected = u;
  const box = document.getElementById("details");
  const rows = [];
  const add = (k, v) => rows.push("<dt>" + esc(k) + "</dt><dd>" + esc(String(v)) + "</dd>");
  if (u.kind === "n") {
    const n = nodes[u.id];
    add("node", n.name); add("op", n.op); add("module", modules[n.module].path || "(root)");
    if (n.layer >= 0) layerRows(n.layer, add);
    add("inputs", n.inputs.map(i => nodes[i].name).join(", ") || "-");
    add("users", n.users.map(i => nodes[i].name).join(", ") || "-");
  } else {
    const m = modules[u.id];
    add("module", m.path || "(root)"); add("class", m.cls); add("ops", m.nodes.length); add("linear layers", m.layerCount);
    if (m.worst >= 0) add("worst SQNR", fmtDb(layers[m.worst].sqnr) + " (" + layers[m.worst].name + ")");
    if (m.layer >= 0) layerRows(m.layer, add);
  }
  box.innerHTML = "<dl>" + rows.join("") + "</dl>";
}
function layerRows(l, add) {
  const layer = layers[l];
  add("layer", layer.name); add("precision", precisions[layer.precision].label);
  add("shape", layer.shape[0] + " x " + layer.shape[1]); add("calls", layer.calls);
  if (layer.sqnr !== null) add("SQNR (" + D.error_mode + ")", fmtDb(layer.sqnr));
  if (layer.wSqnr !== null) add("weights alone", fmtDb(layer.wSqnr));
  if (layer.aSqnr !== null) add("activations alone", fmtDb(layer.aSqnr));
  if (layer.note) add("note", layer.note);
  for (const p of pairs) {
    const note = p.note ? " (" + p.note + ")" : "";
    if (p.sources.includes(l)) add(p.kind + " pair, to", p.consumers.map(c => layers[c].name).join(", ") + note);
    if (p.consumers.includes(l)) add(p.kind + " pair, from", p.sources.map(s => layers[s].name).join(", ") + note);
  }
}
function esc(s) { return s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]); }

function reveal(u) {  // unfold every module that hides unit u
  const chain = u.kind === "n" ? nodes[u.id].chain : [];
  if (u.kind === "m") for (let m = modules[u.id].parent; m >= 0; m = modules[m].parent) chain.unshift(m);
  for (const m of chain) expanded.add(m);
}
function search(query) {
  const q = query.trim().toLowerCase();
  matches = []; current = -1;
  if (q) {
    const hit = new Set();
    modules.forEach(m => { if (m.id !== 0 && m.first < Infinity && m.path.toLowerCase().includes(q)) hit.add(m.id); });
    for (const m of [...hit]) for (let p = modules[m].parent; p >= 0; p = modules[p].parent) if (hit.has(p)) { hit.delete(m); break; }
    for (const m of hit) matches.push({kind: "m", id: m, first: modules[m].first});
    for (const n of nodes) {
      if (!(n.name.toLowerCase().includes(q) || n.op.toLowerCase().includes(q))) continue;
      if (n.chain.some(m => hit.has(m))) continue;
      matches.push({kind: "n", id: n.id, first: n.id});
    }
    matches.sort((a, b) => a.first - b.first);
    matches.forEach(reveal);
  }
  document.getElementById("search-status").textContent =
    q ? (matches.length === 1 ? "1 match" : matches.length + " matches") : "";
  render();
  if (matches.length) step(1);
}
function step(delta) {
  if (!matches.length) return;
  current = (current + delta + matches.length) % matches.length;
  select(matches[current]);
  render();
  const p = placed.get(keyOf(matches[current]));
  const pane = document.getElementById("graph-pane");
  if (p) pane.scrollTo({left: p.x + p.w / 2 - pane.clientWidth / 2, top: p.y + p.h / 2 - pane.clientHeight / 2});
  document.getElementById("search-status").textContent = (current + 1) + " of " + matches.length + (matches.length === 1 ? " match" : " matches");
}

function readHash() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  if (params.has("colour") && ["precision", "sqnr"].includes(params.get("colour"))) colourMode = params.get("colour");
  document.getElementById("colour-mode").value = colourMode;
  const q = params.get("search") || "";
  document.getElementById("search").value = q;
  search(q);
}

const input = document.getElementById("search");
let timer = null;
input.addEventListener("input", () => {
  clearTimeout(timer);
  timer = setTimeout(() => {
    history.replaceState(null, "", input.value ? "#search=" + encodeURIComponent(input.value) : "#");
    search(input.value);
  }, 250);
});
input.addEventListener("keydown", e => { if (e.key === "Enter") { e.preventDefault(); step(e.shiftKey ? -1 : 1); } });
document.getElementById("next").addEventListener("click", () => step(1));
document.getElementById("prev").addEventListener("click", () => step(-1));
document.getElementById("expand-all").addEventListener("click", () => { modules.forEach(m => expanded.add(m.id)); render(); });
document.getElementById("fold").addEventListener("click", () => { defaultFold(); render(); });
document.getElementById("colour-mode").addEventListener("change", e => { colourMode = e.target.value; render(); });
for (const row of document.querySelectorAll("tr[data-layer]")) {
  row.addEventListener("click", () => {
    const l = layerByName.get(row.getAttribute("data-layer"));
    const mod = modules[layers[l].module];
    const u = mod.layer === l ? {kind: "m", id: mod.id} : {kind: "n", id: layers[l].node};
    matches = [u]; current = -1; reveal(u); step(1);
    document.getElementById("graph-pane").scrollIntoView();
  });
}
window.addEventListener("hashchange", readHash);
defaultFold();
readHash();
})();
"""
