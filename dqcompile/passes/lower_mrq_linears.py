"""Pass: post-GELU linears (fc2) on two-region activation codes (MRQ), as two integer products."""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import dqcompile.backends.ops  # noqa: F401  (registers torch.ops.dqcompile)
from dqcompile.passes.context import META_KEY, PassContext
from dqcompile.passes.tqdit_common import (
    LINEAR_TABLES,
    POST_GELU,
    TwoRegionTables,
    graph_device,
    select_group,
    tag_new_nodes,
    time_group_index,
    time_groups_active,
)

OPS = torch.ops.dqcompile


def lower_mrq_linears(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: lower_linears, find_post_gelu_linears, time_group_params (or ctx.restoring). Acts for
    method "tqdit" with quantized activations and spec.tqdit.mrq.

    Guarantees: for every post-GELU quantized layer, each quantize_act_static -> int_linear pair becomes
        q_low, q_high = quantize_act_mrq(x, low, high, bits, split_at_zero=True)
        y = int_linear(q_low, low, 0, W) + int_linear(q_high, high, 0, W, bias)     (float32, then y's dtype)
    with low / high the layer's buffers input_low_scale_groups / input_high_scale_groups (float32 [G])
    at each row's time group, and 0 its int32 buffer input_mrq_zero; both products are exact int32
    sums, and since every element is non-zero in at most one code tensor, y = (low q_low + high q_high) W^T
    + bias up to float rounding. input_scale / input_zero are removed. Placeholder steps (1) when restoring.
    """
    if not time_groups_active(ctx) or not ctx.spec.tqdit.mrq:
        return
    layers = ctx.annotations.get(POST_GELU, set())
    tables = ctx.annotations.get(LINEAR_TABLES, {})
    index = time_group_index(gm, ctx)
    for node in list(gm.graph.nodes):
        layer = node.meta.get(META_KEY, {}).get("layer")
        if layer not in layers or node.op != "call_function" or node.target != OPS.int_linear.default:
            continue
        _register_tables(gm, ctx, layer, tables.get(layer))
        _lower(gm, node, layer, index)
    gm.graph.eliminate_dead_code()
    for layer in layers:
        owner = gm.get_submodule(layer)
        for name in ("input_scale", "input_zero"):
            if name in owner._buffers:
                delattr(owner, name)
    gm.recompile()


def _register_tables(gm: GraphModule, ctx: PassContext, layer: str, found: object) -> None:
    owner = gm.get_submodule(layer)
    if hasattr(owner, "input_low_scale_groups"):
        return
    if found is None and not ctx.restoring:
        raise ValueError(f"layer {layer}: no multi-region activation parameters were computed")
    if found is not None and not isinstance(found, TwoRegionTables):
        raise ValueError(f"layer {layer}: expected two-region tables, got {type(found).__name__}")
    groups = ctx.spec.tqdit.time_groups
    device = graph_device(gm)
    low = found.low_scale if found is not None else torch.ones(groups)
    high = found.high_scale if found is not None else torch.ones(groups)
    owner.register_buffer("input_low_scale_groups", low.float().to(device))
    owner.register_buffer("input_high_scale_groups", high.float().to(device))
    owner.register_buffer("input_mrq_zero", torch.zeros(1, dtype=torch.int32, device=device))


def _lower(gm: GraphModule, int_linear: Node, layer: str, index: Node | None) -> None:
    graph = gm.graph
    quantized, _, _, qweight, weight_scale, bias, w_bits, group_size, out_dtype = int_linear.args
    x, _, _, bits = quantized.args
    with graph.inserting_before(int_linear):
        before = set(graph.nodes)
        low = select_group(gm, f"{layer}.input_low_scale_groups", index, x, [])
        high = select_group(gm, f"{layer}.input_high_scale_groups", index, x, [])
        zero = graph.get_attr(f"{layer}.input_mrq_zero")
        codes = graph.call_function(OPS.quantize_act_mrq.default, (x, low, high, bits, True))
        q_low = graph.call_function(operator.getitem, (codes, 0))
        q_high = graph.call_function(operator.getitem, (codes, 1))
        weights = (qweight, weight_scale)
        y_low = graph.call_function(
            OPS.int_linear.default, (q_low, low, zero, *weights, None, w_bits, group_size, torch.float32)
        )
        y_high = graph.call_function(
            OPS.int_linear.default, (q_high, high, zero, *weights, bias, w_bits, group_size, torch.float32)
        )
        output = graph.call_function(torch.ops.aten.add.Tensor, (y_low, y_high))
        if out_dtype != torch.float32:
            output = graph.call_function(torch.ops.aten._to_copy.default, (output,), {"dtype": out_dtype})
        tag_new_nodes([n for n in graph.nodes if n not in before], int_linear, layer)
    output.meta["val"] = int_linear.meta["val"]
    int_linear.replace_all_uses_with(output)
    graph.erase_node(int_linear)
