"""The graph page: one self-contained HTML file (inline style, script and data; nothing fetched at view time).

The header counts, legend and summary tables are written here as plain HTML, so they read without the
script; the script (dqcompile/viz/template.py) draws the graph and runs search and folding.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

from dqcompile.viz.errors import MODE_MEANING
from dqcompile.viz.graph import FLOAT, HEAT_HIGH_DB, HEAT_LOW_DB, GraphView, LayerInfo, heat_color
from dqcompile.viz.template import SCRIPT, STYLE


def _db(value: float | None) -> str:
    if value is None:
        return ""
    return "exact" if value == math.inf else f"{value:.2f}"


def _quantized(view: GraphView, layer: LayerInfo) -> bool:
    return view.precisions[layer.precision].label != FLOAT


def _legend(view: GraphView) -> str:
    counts = [0] * len(view.precisions)
    for layer in view.layers:
        counts[layer.precision] += 1
    rows = [
        f'<div class="legend-row"><span class="swatch p{i}" style="background:{p.color}"></span>'
        f"{escape(p.label)} <small>({counts[i]})</small></div>"
        for i, p in enumerate(view.precisions)
    ]
    rows.append('<div class="legend-row"><span class="swatch" style="background:#fff"></span>other operation</div>')
    if view.error_mode:
        rows.append(
            f'<h2>SQNR ({escape(view.error_mode)})</h2><div class="heat-bar" style="background:linear-gradient(to right,'
            f'{heat_color(HEAT_LOW_DB)},{heat_color((HEAT_LOW_DB + HEAT_HIGH_DB) / 2)},{heat_color(HEAT_HIGH_DB)})"></div>'
            '<div class="heat-ticks">'
            f"<span>&le; {HEAT_LOW_DB:g} dB</span><span>{(HEAT_LOW_DB + HEAT_HIGH_DB) / 2:g} dB</span>"
            f"<span>&ge; {HEAT_HIGH_DB:g} dB</span></div>"
            f"<small>{escape(MODE_MEANING[view.error_mode])}. Folded modules show their worst layer.</small>"
        )
    if view.pairs:
        rows.append('<div class="legend-row"><span class="swatch" style="background:#8e44ad"></span>'
                    "balancing pair link: adaLN -> the linears it modulates, V -> output projection "
                    "(dot: a folded module holds pairs)</div>")
    return "\n".join(rows)


def _precision_table(view: GraphView) -> str:
    rows = []
    for i, precision in enumerate(view.precisions):
        members = [layer for layer in view.layers if layer.precision == i]
        errors = [layer.sqnr_db for layer in members if layer.sqnr_db is not None]
        worst = min(errors) if errors and precision.label != FLOAT else None
        worst_layer = next((l.name for l in members if l.sqnr_db == worst), "") if worst is not None else ""
        rows.append(
            f'<tr><td><span class="swatch" style="background:{precision.color}"></span> {escape(precision.label)}</td>'
            f'<td class="num">{len(members)}</td><td class="num">{sum(l.calls for l in members)}</td>'
            f'<td class="num">{_db(worst)}</td><td>{escape(worst_layer)}</td></tr>'
        )
    return (
        '<table id="precision-table"><tr><th>precision</th><th>layers</th><th>calls</th><th>worst SQNR dB</th>'
        "<th>worst layer</th></tr>" + "".join(rows) + "</table>"
    )


def _layer_table(view: GraphView) -> str:
    layers = list(view.layers)
    if view.error_mode:
        # Worst first; float layers (no error measured) after the quantized ones, in graph order.
        layers.sort(key=lambda l: (l.sqnr_db is None, l.sqnr_db if l.sqnr_db is not None else 0.0))
    head = "<tr><th>layer</th><th>shape</th><th>precision</th>"
    head += f"<th>SQNR dB ({escape(view.error_mode)})</th>" if view.error_mode else ""
    split = any(layer.weight_sqnr_db is not None for layer in layers)
    head += "<th>weights alone dB</th><th>activations alone dB</th>" if split else ""
    head += "<th>calls</th><th>note</th></tr>"
    rows = []
    for layer in layers:
        precision = view.precisions[layer.precision]
        rows.append(
            f'<tr data-layer="{escape(layer.name)}"><td>{escape(layer.name)}</td>'
            f'<td class="num">{layer.shape[0]}x{layer.shape[1]}</td>'
            f'<td><span class="swatch p{layer.precision}" style="background:{precision.color}"></span> {escape(precision.label)}</td>'
            + (f'<td class="num">{_db(layer.sqnr_db)}</td>' if view.error_mode else "")
            + (f'<td class="num">{_db(layer.weight_sqnr_db)}</td><td class="num">{_db(layer.activation_sqnr_db)}</td>'
               if split else "")
            + f'<td class="num">{layer.calls}</td><td>{escape(layer.note)}</td></tr>'
        )
    return '<table id="layer-table">' + head + "".join(rows) + "</table>"


def _pair_table(view: GraphView) -> str:
    if not view.pairs:
        return "<p>No pairs given (render(..., pairs=find_adaln_pairs(model)) draws them).</p>"
    notes = {layer.name: layer.note for layer in view.layers}
    rows = []
    for pair in view.pairs:
        # What the balancing did is in the pair's note, or in the report's notes of the layers it feeds.
        balancing = pair.note or "; ".join(dict.fromkeys(notes[c] for c in pair.consumers if notes[c]))
        rows.append(
            f"<tr><td>{escape(pair.kind)}</td><td>{escape(', '.join(pair.sources))}</td>"
            f"<td>{escape(', '.join(pair.consumers))}</td><td>{escape(balancing)}</td></tr>"
        )
    return ('<table id="pair-table"><tr><th>kind</th><th>from</th><th>to (balanced layers)</th><th>balancing</th></tr>'
            + "".join(rows) + "</table>")


def _script_json(data: dict) -> str:
    """JSON safe inside <script>: no "<" at all, so no "</script>" or "<!--" (JSON strings read \\u003c back)."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def page(view: GraphView) -> str:
    """The whole page as text."""
    quantized = sum(_quantized(view, layer) for layer in view.layers)
    worst = min(
        (l for l in view.layers if l.sqnr_db is not None and _quantized(view, l)), key=lambda l: l.sqnr_db, default=None
    )
    worst_text = f" · worst SQNR <b>{_db(worst.sqnr_db)} dB</b> ({escape(worst.name)})" if worst else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(view.title)}</title>
<style>{STYLE}</style></head>
<body>
<header>
  <h1>{escape(view.title)}</h1>
  <span class="stats"><b id="node-count">{len(view.nodes)}</b> operations · <b id="layer-count">{len(view.layers)}</b> linear layers
    (<b id="quantized-count">{quantized}</b> quantized) · <b id="module-count">{len(view.modules) - 1}</b> modules{worst_text} ·
    showing <b id="visible-count">0</b> boxes</span>
  <input id="search" type="search" placeholder="search a layer, module or op (e.g. to_q)" aria-label="search">
  <button id="prev" title="previous match (shift+Enter)">&#9664;</button><span id="search-status"></span><button id="next" title="next match (Enter)">&#9654;</button>
  <button id="fold" title="fold every module (blocks as boxes)">fold</button><button id="expand-all">unfold all</button>
  <label>colour <select id="colour-mode"><option value="precision">precision</option><option value="sqnr">SQNR</option></select></label>
</header>
<main>
  <div id="graph-pane"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg></div>
  <aside id="side">
    <h2>Precision</h2>
    <section id="legend">{_legend(view)}</section>
    <h2>Selected</h2>
    <section id="details"><p>Click a box: a folded module unfolds, a frame's header folds it.</p></section>
  </aside>
</main>
<section id="summary">
  <h2>Summary</h2>
  {_precision_table(view)}
  <h2>Linear layers{' (worst first)' if view.error_mode else ''}</h2>
  {_layer_table(view)}
  <h2>Balancing pairs</h2>
  {_pair_table(view)}
</section>
<script id="graph-data" type="application/json">{_script_json(view.to_json())}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_html(view: GraphView, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(view), encoding="utf-8")
    return path
