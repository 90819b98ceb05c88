"""TQ-DiT's analysis passes: the attention matmuls that can run on integer codes, the linears whose
input is a GELU output (post-GELU MRQ), and the layers calibration must observe."""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from dqcompile.graph import module_path, nodes_by_name
from dqcompile.methods.tqdit.common import ATTENTION, POST_GELU, AttentionSite, statistics_needed
from dqcompile.passes.context import META_KEY, PassContext

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# aten.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, *, scale, enable_gqa)
_POSITIONAL = ("attn_mask", "dropout_p", "is_causal")


def _float_reason(arguments: dict[str, object]) -> str | None:
    if arguments.get("attn_mask") is not None:
        return "attention mask"
    if arguments.get("dropout_p", 0.0):
        return "attention dropout"
    if arguments.get("is_causal", False):
        return "causal attention"
    if arguments.get("enable_gqa", False):
        return "grouped-query attention"
    return None


def find_attention_sites(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: a captured graph.

    Guarantees: ctx.annotations["tqdit.attention"] maps a name (the attention's module path, "#i"
    appended for a second one in the same module) to an AttentionSite for every
    scaled_dot_product_attention node with 4-d operands, which carries meta["dqcompile"]["attention"].
    A site with a mask, dropout, causal or grouped-query attention records why it stays in float
    (DiT attention has none of them). The graph is not changed.
    """
    sites: dict[str, AttentionSite] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != SDPA:
            continue
        query = node.args[0].meta["val"]
        if query.dim() != 4:
            continue
        arguments = dict(zip(_POSITIONAL, node.args[3:]))
        arguments.update(node.kwargs)
        heads, head_dim = int(query.shape[1]), int(query.shape[-1])
        scale = arguments.get("scale")
        name = base = module_path(node) if node.meta.get("nn_module_stack") else "attention"
        count = 1
        while name in sites:
            name, count = f"{base}#{count}", count + 1
        sites[name] = AttentionSite(
            name=name,
            node_name=node.name,
            heads=heads,
            head_dim=head_dim,
            scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
            float_reason=_float_reason(arguments),
        )
        node.meta.setdefault(META_KEY, {})["attention"] = name
    ctx.annotations[ATTENTION] = sites


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
    """Needs: plan_layers.

    Guarantees: ctx.annotations["tqdit.post_gelu"] is the set of quantized layers every one of whose
    linear nodes takes aten.gelu's output as input (possibly through eval-mode dropout or a copy).
    The graph is not changed.
    """
    nodes = nodes_by_name(gm)
    ctx.annotations[POST_GELU] = {
        plan.name for plan in ctx.plan.quantized_layers()
        if all(_is_gelu(_source(nodes[name].args[0])) for name in plan.node_names)
    }


def _is_gelu(node: Node) -> bool:
    return node.op == "call_function" and node.target == GELU


def observe_quantized_layers(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: plan_layers. Guarantees: with attention quantization or HO, every quantized layer is in
    ctx.observe (the time groups are drawn from what calibration saw). The graph is not changed."""
    if statistics_needed(ctx):
        ctx.observe |= {plan.name for plan in ctx.plan.quantized_layers()}
