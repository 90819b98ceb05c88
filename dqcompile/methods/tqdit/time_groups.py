"""TQ-DiT's time groups (TGQ): split the calibration timesteps into groups, compute each layer's and
attention's activation parameters per group (two-region ones under MRQ), and write them into the plan."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from dqcompile.calib.runner import timestep_key
from dqcompile.methods.tqdit.common import (
    ATTENTION,
    ATTENTION_TABLES,
    GROUPS,
    LINEAR_TABLES,
    POST_GELU,
    STATISTICS,
    SUMMARY,
    AttentionSamples,
    AttentionSite,
    AttentionTables,
    TimeGroups,
    TwoRegionTables,
    UniformTables,
    quantized_sites,
    statistics_needed,
    time_groups_active,
)
from dqcompile.passes.context import PassContext
from dqcompile.plan import ActivationPlan, AttentionPlan
from dqcompile.quant import compute_qparams, qrange
from dqcompile.quant.mrq import gelu_scales, search_softmax_low_scale
from dqcompile.quant.uniform import MIN_SCALE


def assign_time_groups(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: the calibration run (ctx.input_stats).

    Guarantees: ctx.annotations["tqdit.groups"] is TimeGroups.split of every calibration timestep
    into options.time_groups consecutive groups (fewer real ones when fewer timesteps were seen).
    The graph is not changed.
    """
    timesteps = {key for stats in ctx.input_stats.values() for key in stats}
    if statistics_needed(ctx):
        timesteps |= {timestep_key(sample) for sample in ctx.require_calibration("TQ-DiT's time groups")}
    ctx.annotations[GROUPS] = TimeGroups.split(timesteps, ctx.spec.options.time_groups)


def time_group_params(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: assign_time_groups, ctx.input_stats of the static layers, and collect_tqdit_statistics
    for attention. Acts with quantized activations.

    Guarantees, with G = options.time_groups and each group's range the min / max over its
    calibration timesteps:
    - ctx.annotations["tqdit.linear_tables"][layer] for every quantized layer: TwoRegionTables
      (gelu_scales of the range) for post-GELU layers when options.mrq, else UniformTables
      (compute_qparams of the range, per tensor, the spec's symmetry); tensors [G];
    - ctx.annotations["tqdit.attention_tables"][site] for every quantized attention: symmetric
      per-head steps max|.| / (2^(b-1) - 1) of Q, K, V [G, H], and with MRQ the post-softmax fine
      step [G] that search_softmax_low_scale picks on the group's samples.
    Groups past the real ones repeat the last real group. ctx.plan.summary["tqdit"]["attention"] lists every
    attention site: why it stays float, or its fine softmax steps per real group. The graph is not changed.
    """
    if not time_groups_active(ctx):
        return
    groups: TimeGroups = ctx.annotations[GROUPS]
    post_gelu = ctx.annotations.get(POST_GELU, set()) if ctx.spec.options.mrq else set()
    tables: dict[str, UniformTables | TwoRegionTables] = {}
    for plan in ctx.plan.quantized_layers():
        low, high = _group_ranges(ctx, plan.name, groups)
        bits = plan.activations.bits
        if plan.name in post_gelu:
            tables[plan.name] = TwoRegionTables(*gelu_scales(low, high, bits))
            plan.notes.append(f"TGQ {groups.real} time groups; MRQ post-GELU (negative / positive steps)")
        else:
            ranges = torch.stack([low, high], dim=1)
            qparams = compute_qparams(ranges, bits, symmetric=plan.activations.symmetric, granularity="token")
            tables[plan.name] = UniformTables(qparams.scale.reshape(-1), qparams.zero.reshape(-1))
            plan.notes.append(f"TGQ {groups.real} time groups")
    ctx.annotations[LINEAR_TABLES] = tables
    statistics = ctx.annotations.get(STATISTICS)
    attention = {
        site.name: _attention_tables(site, statistics.attention[site.name], groups, ctx)
        for site in quantized_sites(ctx)
    }
    ctx.annotations[ATTENTION_TABLES] = attention
    ctx.plan.summary.setdefault(SUMMARY, {})["attention"] = {
        name: {
            "kept_float": site.float_reason,
            "softmax_low_scale": None if name not in attention or attention[name].p_low_scale is None
            else attention[name].p_low_scale[: groups.real].tolist(),
        }
        for name, site in ctx.annotations.get(ATTENTION, {}).items()
    }


def _group_ranges(ctx: PassContext, layer: str, groups: TimeGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 [G] min and max of a layer's input over each group's calibration timesteps."""
    stats = ctx.input_stats.get(layer)
    if not stats:
        raise ValueError(f"layer {layer}: TQ-DiT's static activations need calibration statistics of its input")
    lows, highs = [], []
    for members in groups.members:
        seen = [stats[t] for t in members if t in stats]
        if not seen:
            raise ValueError(f"layer {layer}: no calibration input at timesteps {members}")
        lows.append(torch.stack([s.minimum.min() for s in seen]).min())
        highs.append(torch.stack([s.maximum.max() for s in seen]).max())
    return torch.stack(lows).float().cpu(), torch.stack(highs).float().cpu()


def _attention_tables(
    site: AttentionSite, samples: AttentionSamples, groups: TimeGroups, ctx: PassContext
) -> AttentionTables:
    bits = ctx.spec.activations.bits
    source = [min(g, groups.real - 1) for g in range(groups.count)]
    steps = samples.absmax[source] / qrange(bits, symmetric=True)[1]
    steps = steps.clamp_min(MIN_SCALE)
    p_low_scale = None
    if ctx.spec.options.mrq:
        chosen = []
        for g in range(groups.real):
            q, k, v = (torch.cat(rows[g]) for rows in (samples.q, samples.k, samples.v))
            probs = torch.softmax(site.scale * (q @ k.transpose(-1, -2)), dim=-1)
            chosen.append(search_softmax_low_scale(probs, v, bits))
        p_low_scale = torch.tensor([chosen[g] for g in source], dtype=torch.float32)
    return AttentionTables(steps[:, 0].contiguous(), steps[:, 1].contiguous(), steps[:, 2].contiguous(), p_low_scale)


def write_plans(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: time_group_params (and hessian_search, which refines its tables). Acts with quantized
    activations.

    Guarantees: every quantized layer's activation plan is time-grouped: "two_region" with
    low_scale / high_scale (float32 [G]) for post-GELU layers under MRQ, else "static" with scale
    (float32 [G]) and zero (int32 [G]); every quantized attention has an AttentionPlan with its
    q_scale, k_scale, v_scale (float32 [G, H]) and, under MRQ, p_low_scale (float32 [G]); the plan's
    time_boundaries are the groups' (float32 [G - 1]).
    """
    if not time_groups_active(ctx):
        return
    groups: TimeGroups = ctx.annotations[GROUPS]
    for plan in ctx.plan.quantized_layers():
        tables = ctx.annotations[LINEAR_TABLES][plan.name]
        old = plan.activations
        if isinstance(tables, TwoRegionTables):
            plan.activations = ActivationPlan(kind="two_region", bits=old.bits, symmetric=old.symmetric, time_grouped=True)
            plan.activations.set_tensors(low_scale=tables.low_scale.float(), high_scale=tables.high_scale.float())
        else:
            plan.activations = ActivationPlan(kind="static", bits=old.bits, symmetric=old.symmetric, time_grouped=True)
            plan.activations.set_tensors(scale=tables.scale.float(), zero=tables.zero.to(torch.int32))
    for site in quantized_sites(ctx):
        tables = ctx.annotations[ATTENTION_TABLES][site.name]
        tensors = {name: getattr(tables, name).float() for name in ("q_scale", "k_scale", "v_scale")}
        if tables.p_low_scale is not None:
            tensors["p_low_scale"] = tables.p_low_scale.float()
        ctx.plan.attention[site.name] = AttentionPlan(
            name=site.name, node_name=site.node_name, heads=site.heads, head_dim=site.head_dim, softmax_scale=site.scale,
            bits=ctx.spec.activations.bits, two_region_softmax=tables.p_low_scale is not None, tensors=tensors,
        )
    ctx.plan.time_boundaries = groups.boundaries.clone()
