"""render(): a model or graph -> the HTML page, and the DOT (and SVG) beside it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.fx import GraphModule

from dqcompile.capture import Captured, ExampleInputs, capture
from dqcompile.example_inputs import default_example_inputs
from dqcompile.model import QuantizedModel
from dqcompile.viz.dot import write_dot
from dqcompile.viz.errors import LayerError
from dqcompile.viz.graph import PairLike, GraphView, build_graph_view
from dqcompile.viz.html import write_html

Source = QuantizedModel | Captured | GraphModule | nn.Module


@dataclass
class RenderedFiles:
    """What render() wrote; message says whether the SVG was made (and why not)."""

    html: Path
    dot: Path | None
    svg: Path | None
    message: str


def graph_view(
    model_or_graph: Source,
    *,
    errors: Iterable[LayerError] | None = None,
    pairs: Iterable[PairLike] | None = None,
    title: str | None = None,
    example_inputs: ExampleInputs | None = None,
) -> GraphView:
    """The view of a QuantizedModel (its lowered graph, with the report's notes), a Captured or a
    GraphModule (as they are), or a float nn.Module (captured on example_inputs, by default the inputs
    dqcompile builds for known diffusers transformers)."""
    notes: dict[str, str] = {}
    if isinstance(model_or_graph, QuantizedModel):
        gm = model_or_graph.graph_module
        notes = {row.name: row.note for row in model_or_graph.report.layers if row.note}
        default_title = f"{model_or_graph.source_class.rpartition('.')[2]} · {model_or_graph.spec.name}"
    elif isinstance(model_or_graph, Captured):
        gm, default_title = model_or_graph.graph_module, "captured graph (float)"
    elif isinstance(model_or_graph, GraphModule):
        gm, default_title = model_or_graph, "graph"
    elif isinstance(model_or_graph, nn.Module):
        inputs = example_inputs if example_inputs is not None else default_example_inputs(model_or_graph)
        gm = capture(model_or_graph, inputs).graph_module
        default_title = f"{type(model_or_graph).__name__} · float"
    else:
        raise TypeError(
            f"render takes a QuantizedModel, Captured, GraphModule or nn.Module, got {type(model_or_graph).__name__}"
        )
    return build_graph_view(gm, title=title or f"dqcompile: {default_title}", errors=errors, pairs=pairs, notes=notes)


def render(
    model_or_graph: Source,
    path: str | Path,
    *,
    errors: Iterable[LayerError] | None = None,
    pairs: Iterable[PairLike] | None = None,
    title: str | None = None,
    dot: bool = True,
    example_inputs: ExampleInputs | None = None,
) -> RenderedFiles:
    """Write the graph page to `path` (.html) and, when dot, the DOT file beside it (.dot), rendered to
    .svg when Graphviz is installed.

    errors: from dqcompile.viz.layer_errors; shown as each layer's SQNR (heat scale, tables).
    pairs: salience-balancing pairs, e.g. dqcompile.find_adaln_pairs(model)
        (or mappings with "source" and "consumers" layer names), drawn as links from the adaLN linear
        to the layers it modulates, and from value projections to output projections.
    """
    view = graph_view(model_or_graph, errors=errors, pairs=pairs, title=title, example_inputs=example_inputs)
    html_path = write_html(view, path)
    if not dot:
        return RenderedFiles(html_path, None, None, f"wrote {html_path}")
    dot_files = write_dot(view, html_path.with_suffix(".dot"))
    return RenderedFiles(html_path, dot_files.dot, dot_files.svg, f"wrote {html_path}; {dot_files.message}")
