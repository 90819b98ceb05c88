"""Pass: find the quantized linears whose input is a GELU output (the MLP's fc2), for post-GELU MRQ."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from dqcompile.passes.context import META_KEY, PassContext
from dqcompile.passes.tqdit_common import POST_GELU

GELU = torch.ops.aten.gelu.default
# Ops that hand their single tensor input on unchanged in value at inference (dropout in eval mode is
# captured with train=False), so a linear behind them still sees GELU's output distribution.
_PASS_THROUGH = {
    torch.ops.aten.dropout.default,
    torch.ops.aten.clone.default,
    torch.ops.aten.contiguous.default,
    torch.ops.aten.alias.default,
}


def _source(node: Node) -> Node:
    while node.op == "call_function" and node.target in _PASS_THROUGH:
        node = node.args[0]
    return node


def find_post_gelu_linears(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: annotate_linears.

    Guarantees: ctx.annotations["tqdit.post_gelu"] is the set of quantized layers every one of whose
    linear nodes takes aten.gelu's output as input (possibly through eval-mode dropout or a copy).
    The graph is not changed.
    """
    fed_by_gelu: dict[str, bool] = {}
    for node in gm.graph.nodes:
        layer = node.meta.get(META_KEY, {}).get("layer")
        plan = ctx.layers.get(layer) if layer else None
        if plan is None or not plan.quantized or node.op != "call_function":
            continue
        source = _source(node.args[0])
        is_gelu = source.op == "call_function" and source.target == GELU
        fed_by_gelu[layer] = fed_by_gelu.get(layer, True) and is_gelu
    ctx.annotations[POST_GELU] = {layer for layer, gelu in fed_by_gelu.items() if gelu}
