"""Pass: attention matmuls on integer codes (TQ-DiT): scaled_dot_product_attention -> dqcompile.int_attention."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

import dqcompile.backends.ops  # noqa: F401  (registers torch.ops.dqcompile)
from dqcompile.passes.context import PassContext
from dqcompile.passes.tqdit_common import (
    ATTENTION_ROOT,
    ATTENTION_TABLES,
    AttentionSite,
    AttentionTables,
    graph_device,
    quantized_sites,
    select_group,
    tag_new_nodes,
    time_group_index,
)

INT_ATTENTION = torch.ops.dqcompile.int_attention.default


def tables_path(site: AttentionSite) -> str:
    """The submodule holding a site's tables: tqdit_attention.<module path with "." -> "__">."""
    return f"{ATTENTION_ROOT}.{site.name.replace('.', '__').replace('#', '_')}"


def quantize_attention(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: annotate_attention, time_group_params (or ctx.restoring). Acts for method "tqdit" with
    quantized activations and spec.tqdit.quantize_attention.

    Guarantees: every attention site without a float_reason is one int_attention node with
        q_scale, k_scale, v_scale: the buffers q_scale / k_scale / v_scale ([G, H]) of submodule
            tables_path(site), at each row's time group, shaped [B, H, 1, 1];
        p_low_scale: its buffer p_low_scale ([G]) likewise, shaped [B, 1, 1, 1], with spec.tqdit.mrq;
            None (uniform softmax codes) without;
        bits: spec.activations.bits; scale: the site's softmax scale.
    Placeholder scales (1) when restoring.
    """
    sites = quantized_sites(ctx)
    if not sites:
        return
    found: dict[str, AttentionTables] = ctx.annotations.get(ATTENTION_TABLES, {})
    index = time_group_index(gm, ctx)
    nodes = {node.name: node for node in gm.graph.nodes}
    for site in sites:
        path = tables_path(site)
        _register_tables(gm, ctx, site, path, found.get(site.name))
        node = nodes[site.node_name]
        q, k, v = node.args[:3]
        with gm.graph.inserting_before(node):
            before = set(gm.graph.nodes)
            q_scale, k_scale, v_scale = (
                select_group(gm, f"{path}.{name}", index, like, [site.heads])
                for name, like in (("q_scale", q), ("k_scale", k), ("v_scale", v))
            )
            p_low_scale = select_group(gm, f"{path}.p_low_scale", index, q, []) if ctx.spec.tqdit.mrq else None
            attention = gm.graph.call_function(
                INT_ATTENTION,
                (q, k, v, q_scale, k_scale, v_scale, p_low_scale, ctx.spec.activations.bits, site.scale),
            )
            tag_new_nodes([n for n in gm.graph.nodes if n not in before], node)
        attention.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(attention)
        gm.graph.erase_node(node)
    gm.recompile()


def _register_tables(
    gm: GraphModule, ctx: PassContext, site: AttentionSite, path: str, tables: AttentionTables | None
) -> None:
    if tables is None and not ctx.restoring:
        raise ValueError(f"attention {site.name}: no per-head scales were computed")
    groups = ctx.spec.tqdit.time_groups
    if tables is None:
        ones = torch.ones(groups, site.heads)
        tables = AttentionTables(ones, ones, ones, torch.ones(groups) if ctx.spec.tqdit.mrq else None)
    holder = nn.Module()
    device = graph_device(gm)
    for name in ("q_scale", "k_scale", "v_scale", "p_low_scale"):
        value = getattr(tables, name)
        if value is not None:
            holder.register_buffer(name, value.float().to(device).clone())
    gm.add_submodule(path, holder)
