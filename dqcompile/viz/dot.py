"""The graph view as Graphviz DOT, and as SVG when Graphviz's `dot` is installed.

A static picture cannot fold, so the DOT graph is drawn at one fixed level: every leaf module (a module
with no submodule: a Linear, a LayerNorm, a timestep projection) is one box, and the operations of the
modules around them (the residual adds and modulation of a block) stay single boxes; each of those
enclosing modules is a cluster. For DiT-XL that is about sixty boxes a block.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dqcompile.viz.graph import FLOAT, GraphView, heat_color

PAIR_COLOR = "#8e44ad"
DOT_TIMEOUT_S = 300


@dataclass
class DotFiles:
    dot: Path
    svg: Path | None
    message: str


def _quote(*lines: str) -> str:
    """A DOT string of one or more lines."""
    return '"' + "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines) + '"'


def dot_source(view: GraphView) -> str:
    """The DOT text of the view (see the module docstring for what one box is)."""
    has_children = {m.parent for m in view.modules if m.parent >= 0}
    layer_of_module = {layer.module: i for i, layer in enumerate(view.layers) if view.modules[layer.module].path == layer.name}

    def unit(node_id: int) -> str:
        module = view.nodes[node_id].module
        return f"m{module}" if module != 0 and module not in has_children else f"n{node_id}"

    lines = [
        "digraph dqcompile {",
        f"  label={_quote(view.title)}; labelloc=t; rankdir=TB; compound=true;",
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="monospace", fontsize=10];',
        '  edge [color="#8a94a6", arrowsize=0.6];',
    ]
    boxes: dict[str, str] = {}  # unit -> its node statement
    for node in view.nodes:
        key = unit(node.id)
        if key in boxes:
            continue
        if key.startswith("m"):
            boxes[key] = _module_box(view, node.module, layer_of_module.get(node.module))
        else:
            boxes[key] = _op_box(view, node.id)
    members: dict[int, list[str]] = {}  # cluster (module) -> the boxes drawn directly in it
    for key in boxes:
        index = int(key[1:])
        owner = view.modules[index].parent if key.startswith("m") else view.nodes[index].module
        members.setdefault(owner, []).append(key)

    children: dict[int, list[int]] = {}
    for module in view.modules[1:]:
        children.setdefault(module.parent, []).append(module.id)

    def cluster(module_id: int, indent: str) -> None:
        for key in members.get(module_id, []):
            lines.append(indent + boxes[key])
        for child in children.get(module_id, []):
            if child not in has_children:
                continue
            module = view.modules[child]
            lines.append(f"{indent}subgraph cluster_{child} {{")
            lines.append(f'{indent}  label={_quote(module.path + " · " + module.cls)}; style="rounded,dashed"; color="#aab4c3";')
            cluster(child, indent + "  ")
            lines.append(indent + "}")

    cluster(0, "  ")
    edges = set()
    for node in view.nodes:
        for source in node.inputs:
            edge = (unit(source), unit(node.id))
            if edge[0] != edge[1]:
                edges.add(edge)
    lines += [f"  {a} -> {b};" for a, b in sorted(edges)]
    for pair in view.pairs:
        for source_layer in pair.sources:
            source = unit(_output_node(view, source_layer))
            for consumer in pair.consumers:
                target = unit(_output_node(view, consumer))
                if source != target:
                    lines.append(f'  {source} -> {target} [style=dashed, color="{PAIR_COLOR}", constraint=false, '
                                 f'label={_quote(pair.kind)}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _output_node(view: GraphView, layer_name: str) -> int:
    index = next(i for i, layer in enumerate(view.layers) if layer.name == layer_name)
    return max(node.id for node in view.nodes if node.layer == index)


def _module_box(view: GraphView, module_id: int, layer_index: int | None) -> str:
    """A leaf module: a layer shows its precision (fill) and SQNR (label and heat-coloured border)."""
    module = view.modules[module_id]
    if layer_index is None:
        return f"m{module_id} [label={_quote(module.path, module.cls)}];"
    layer = view.layers[layer_index]
    precision = view.precisions[layer.precision]
    if layer.sqnr_db is None or precision.label == FLOAT:
        return f'm{module_id} [label={_quote(module.path, precision.label)}, fillcolor="{precision.color}"];'
    label = _quote(module.path, precision.label, f"SQNR {layer.sqnr_db:.1f} dB")
    return f'm{module_id} [label={label}, fillcolor="{precision.color}", color="{heat_color(layer.sqnr_db)}", penwidth=3];'


def _op_box(view: GraphView, node_id: int) -> str:
    node = view.nodes[node_id]
    if node.op in ("input", "output"):
        return f'n{node_id} [label={_quote(node.name)}, shape=oval, fillcolor="#1f2a3a", fontcolor="#ffffff"];'
    fill = view.precisions[view.layers[node.layer].precision].color if node.layer >= 0 else "#ffffff"
    return f'n{node_id} [label={_quote(node.name, node.op)}, fillcolor="{fill}"];'


def write_dot(view: GraphView, path: str | Path, *, svg: bool = True) -> DotFiles:
    """Write `path` (.dot) and, when svg and Graphviz's dot is on PATH, `path` with suffix .svg.

    Without Graphviz (or when dot fails or runs past DOT_TIMEOUT_S) only the .dot is written, and the
    message says so and how to render it later.
    """
    dot_path = Path(path)
    dot_path.parent.mkdir(parents=True, exist_ok=True)
    dot_path.write_text(dot_source(view), encoding="utf-8")
    if not svg:
        return DotFiles(dot_path, None, f"wrote {dot_path}")
    executable = shutil.which("dot")
    svg_path = dot_path.with_suffix(".svg")
    later = f"render it with `dot -Tsvg {dot_path} -o {svg_path}`"
    if executable is None:
        return DotFiles(dot_path, None, f"wrote {dot_path} only: Graphviz (dot) is not installed; {later}")
    try:
        subprocess.run([executable, "-Tsvg", str(dot_path), "-o", str(svg_path)], check=True, capture_output=True,
                       timeout=DOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return DotFiles(dot_path, None, f"wrote {dot_path} only: dot ran past {DOT_TIMEOUT_S} s; {later}")
    except subprocess.CalledProcessError as error:
        return DotFiles(dot_path, None, f"wrote {dot_path} only: dot failed ({error.stderr.decode(errors='replace').strip()})")
    return DotFiles(dot_path, svg_path, f"wrote {dot_path} and {svg_path}")
