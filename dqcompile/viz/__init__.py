"""Graph view for debugging a quantized model: where the error comes from.

    from dqcompile.viz import render, layer_errors, format_layer_errors
    errors = layer_errors(model, qmodel, calibration_samples)          # SQNR of each quantized layer
    render(qmodel, "graph.html", errors=errors)                       # + graph.dot (+ graph.svg with Graphviz)
    print(format_layer_errors(errors))                                # worst first

The page is one self-contained HTML file: the graph folded by module (click to unfold), boxes coloured by
precision and granularity, each layer's SQNR as a heat scale, adaLN pairs as links, search by name
(also as the URL fragment #search=to_q), and summary tables.
"""

from dqcompile.viz.errors import LayerError, format_layer_errors, layer_errors
from dqcompile.viz.graph import GraphView, build_graph_view
from dqcompile.viz.render import RenderedFiles, graph_view, render

__all__ = [
    "GraphView",
    "LayerError",
    "RenderedFiles",
    "build_graph_view",
    "format_layer_errors",
    "graph_view",
    "layer_errors",
    "render",
]
