"""Pass: static activation parameters read per time group (TGQ) instead of one per tensor."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

import dqcompile.backends.ops  # noqa: F401  (registers torch.ops.dqcompile)
from dqcompile.passes.context import META_KEY, PassContext
from dqcompile.passes.tqdit_common import (
    LINEAR_TABLES,
    UniformTables,
    graph_device,
    select_group,
    tag_new_nodes,
    time_group_index,
    time_groups_active,
)

QUANTIZE_STATIC = torch.ops.dqcompile.quantize_act_static.default


def lower_time_groups(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: lower_linears, then lower_mrq_linears; time_group_params (or ctx.restoring). Acts for
    method "tqdit" with quantized activations.

    Guarantees: for every quantize_act_static node of a quantized layer, the scale and zero it and its
    int_linear read are the layer's buffers input_scale_groups (float32 [G]) and input_zero_groups
    (int32 [G]) at each row's time group (time_group_index, select_group), shaped [B, 1, ...]; the
    per-tensor buffers input_scale / input_zero are removed. Placeholder tables (scale 1, zero 0)
    when restoring, which the saved tensors then replace.
    """
    if not time_groups_active(ctx):
        return
    tables = ctx.annotations.get(LINEAR_TABLES, {})
    groups = ctx.spec.tqdit.time_groups
    index = time_group_index(gm, ctx)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != QUANTIZE_STATIC:
            continue
        layer = node.meta.get(META_KEY, {}).get("layer")
        owner = gm.get_submodule(layer)
        if not hasattr(owner, "input_scale_groups"):
            found = tables.get(layer)
            if found is None and not ctx.restoring:
                raise ValueError(f"layer {layer}: no time-group activation parameters were computed")
            if found is not None and not isinstance(found, UniformTables):
                raise ValueError(f"layer {layer}: expected uniform tables, got {type(found).__name__}")
            scale = found.scale if found is not None else torch.ones(groups)
            zero = found.zero if found is not None else torch.zeros(groups, dtype=torch.int32)
            device = graph_device(gm)
            owner.register_buffer("input_scale_groups", scale.float().to(device))
            owner.register_buffer("input_zero_groups", zero.to(device=device, dtype=torch.int32))
        x, scale_attr, zero_attr, _ = node.args
        with gm.graph.inserting_before(node):
            before = set(gm.graph.nodes)
            scale = select_group(gm, f"{layer}.input_scale_groups", index, x, [])
            zero = select_group(gm, f"{layer}.input_zero_groups", index, x, [])
            tag_new_nodes([n for n in gm.graph.nodes if n not in before], node, layer)
        scale_attr.replace_all_uses_with(scale)
        zero_attr.replace_all_uses_with(zero)
        gm.graph.erase_node(scale_attr)
        gm.graph.erase_node(zero_attr)
        for name in ("input_scale", "input_zero"):
            if name in owner._buffers:
                delattr(owner, name)
    gm.recompile()
