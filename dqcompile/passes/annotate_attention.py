"""Pass: find the attention matmuls (aten.scaled_dot_product_attention) that TQ-DiT can run on integers."""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from dqcompile.passes.context import META_KEY, PassContext
from dqcompile.passes.tqdit_common import ATTENTION, AttentionSite

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# aten.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, *, scale, enable_gqa)
_POSITIONAL = ("attn_mask", "dropout_p", "is_causal")


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else "attention"


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


def annotate_attention(gm: GraphModule, ctx: PassContext) -> None:
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
        name = base = _module_path(node)
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
