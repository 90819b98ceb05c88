"""Pass: TQ-DiT's Hessian-guided optimization (HO) of weight and activation scales.

For a linear with output O = X W^T + b and its quantized estimate O_hat, the second-order change of
a loss L is approximated with the diagonal Fisher information, E[g^2] with g = dL/dO:

    error = sum over rows r and outputs n of (g[r, n] (O[r, n] - O_hat[r, n]))^2

over calibration rows of each time group, L being the denoising loss (collect_tqdit_statistics).
Scales are searched on a grid of multipliers of their min / max start, as in the public code (it
tries 100 candidates in 0.01 .. 1.2): weights per output channel (the error is a sum over output
channels, and W's row n only moves output n, so each channel's best multiplier is found at once),
activations per time group, alternating weight and activation rounds. The grid holds 1.0 and a
candidate replaces the current value only when strictly better, so no step raises the error and the
result is never worse than the start (round to nearest, min / max ranges) on the calibration rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule
from tqdm.auto import tqdm

from dqcompile.methods.tqdit.common import (
    GROUPS,
    LINEAR_TABLES,
    STATISTICS,
    SUMMARY,
    LayerRows,
    TimeGroups,
    TwoRegionTables,
    UniformTables,
    peak_memory_mib,
)
from dqcompile.passes.context import PassContext
from dqcompile.quant import QParams, compute_qparams, dequantize, pack_int4, quantize
from dqcompile.quant.mrq import fake_quantize_mrq

# The public code's candidate range: multipliers of the initial scale.
GRID_RANGE = (0.01, 1.2)
# Candidates are evaluated together in batches of at most this many tensor elements (float32: 256 MiB).
ELEMENT_BUDGET = 2**26

Tables = UniformTables | TwoRegionTables | None


def candidate_grid(count: int) -> list[float]:
    """1.0, then `count` multipliers evenly spaced over GRID_RANGE."""
    return [1.0, *torch.linspace(*GRID_RANGE, count).tolist()]


@dataclass
class LayerSearch:
    """The outcome for one layer: weight steps float32 [N, G_w], activation tables (None for float
    activations), and the Fisher-weighted error before (alphas 1) and after the search."""

    weight_scale: Tensor
    tables: Tables
    error_before: float
    error_after: float


def _fake_activation(x: Tensor, tables: Tables, group: int, bits: int, alphas: Tensor) -> Tensor:
    """x quantized then dequantized as the lowered graph does in `group`, with the group's steps times
    each row of `alphas` ([C, regions]): float32 [C, *x.shape]."""
    candidates = alphas.shape[0]
    if tables is None:
        return x.expand(candidates, *x.shape)
    shape = (candidates, *[1] * x.dim())
    if isinstance(tables, TwoRegionTables):
        low = (tables.low_scale[group] * alphas[:, 0]).reshape(shape)
        high = (tables.high_scale[group] * alphas[:, 1]).reshape(shape)
        return fake_quantize_mrq(x, low, high, bits, True)
    # quantize_act_static's numerics: full two's complement code range (see its docstring).
    qparams = QParams(
        scale=(tables.scale[group] * alphas[:, 0]).reshape(shape), zero=tables.zero[group].reshape([1] * len(shape)),
        bits=bits, symmetric=False, group_size=0,
    )
    return dequantize(quantize(x.expand(candidates, *x.shape), qparams), qparams)


def _chunks(grid: list[float], elements_per_candidate: int) -> list[list[float]]:
    """The grid in pieces whose candidates together hold at most ELEMENT_BUDGET elements."""
    size = max(1, ELEMENT_BUDGET // max(elements_per_candidate, 1))
    return [grid[i : i + size] for i in range(0, len(grid), size)]


def search_layer(
    weight: Tensor,
    weight_bits: int,
    weight_group_size: int,
    tables: Tables,
    act_bits: int,
    rows: list[tuple[Tensor, Tensor] | None],
    grid: list[float],
    rounds: int,
) -> LayerSearch:
    """HO for one linear (module docstring).

    weight float [N, K] (the bias cancels in O - O_hat); tables: the layer's activation tables per time group
    (UniformTables or post-GELU TwoRegionTables, on any device) or None for float activations;
    rows[g]: (X [r, K], g = dL/dO [r, N]) of time group g, or None for a group without rows (it keeps
    its start). Returns the chosen weight steps and tables (new tensors; the inputs are not changed).
    """
    device = weight.device
    weight = weight.float()
    granularity = "group" if weight_group_size else "channel"
    start = compute_qparams(weight, weight_bits, symmetric=True, granularity=granularity, group_size=weight_group_size)
    tables = _tables_to(tables, device)
    regions = 0 if tables is None else (2 if isinstance(tables, TwoRegionTables) else 1)
    alpha_w = torch.ones(weight.shape[0], device=device)
    alpha_a = torch.ones(len(rows), max(regions, 1), device=device)
    groups = [g for g, pair in enumerate(rows) if pair is not None]
    grads = {g: rows[g][1] for g in groups}
    # g * (X W^T) per group: the weighted float output, the bias left out as it cancels in O - O_hat.
    targets = {g: rows[g][1] * (rows[g][0] @ weight.T) for g in groups}

    def w_hat(alphas: Tensor) -> Tensor:  # alphas [C, N] -> [C, N, K]
        qparams = QParams(scale=start.scale * alphas[..., None], zero=start.zero, bits=weight_bits, symmetric=True,
                          group_size=weight_group_size)
        return dequantize(quantize(weight.expand(alphas.shape[0], *weight.shape), qparams), qparams)

    def x_hat(g: int, alphas: Tensor) -> Tensor:  # alphas [C, regions] -> [C, r, K]
        return _fake_activation(rows[g][0], tables, g, act_bits, alphas)

    def error(x: Tensor, w: Tensor, target: Tensor, grad: Tensor) -> Tensor:  # [C or 1, r, K], [C or 1, N, K]
        """Per output channel sum over rows of (g (O - O_hat))^2: [C, N]."""
        weighted = torch.addcmul(target, grad, x @ w.transpose(-1, -2), value=-1)
        return torch.linalg.vector_norm(weighted, dim=-2).square()

    def total_error(w: Tensor) -> float:
        return float(sum(error(x_hat(g, alpha_a[g : g + 1]), w, targets[g], grads[g]).sum() for g in groups))

    all_targets, all_grads = torch.cat([targets[g] for g in groups]), torch.cat([grads[g] for g in groups])
    current_w = w_hat(alpha_w[None])
    error_before = total_error(current_w)
    for _ in range(rounds):
        # Weights: every group's rows at once, each output channel keeping its best multiplier.
        inputs = torch.cat([x_hat(g, alpha_a[g : g + 1]) for g in groups], dim=1)
        best = error(inputs, current_w, all_targets, all_grads)[0]
        for chunk in _chunks(grid, weight.numel() + all_grads.numel()):
            alphas = torch.tensor(chunk, device=device)
            trial = error(inputs, w_hat(alphas[:, None].expand(-1, weight.shape[0])), all_targets, all_grads)
            # The first minimum of the chunk, taken where strictly better: the outcome of trying the
            # candidates one by one in grid order.
            chunk_best, pick = trial.min(dim=0)
            better = chunk_best < best
            alpha_w = torch.where(better, alphas[pick], alpha_w)
            best = torch.where(better, chunk_best, best)
        current_w = w_hat(alpha_w[None])
        # Activations: each time group and region in turn.
        for g in groups:
            for region in range(regions):
                best_error = error(x_hat(g, alpha_a[g : g + 1]), current_w, targets[g], grads[g]).sum()
                for chunk in _chunks(grid, rows[g][0].numel() + grads[g].numel()):
                    trials = alpha_a[g].repeat(len(chunk), 1)
                    trials[:, region] = torch.tensor(chunk, device=device)
                    trial = error(x_hat(g, trials), current_w, targets[g], grads[g]).sum(dim=1)
                    chunk_best, pick = trial.min(dim=0)
                    if chunk_best < best_error:
                        best_error, alpha_a[g] = chunk_best, trials[pick]
    return LayerSearch(
        weight_scale=(start.scale * alpha_w[:, None]),
        tables=_scaled_tables(tables, alpha_a),
        error_before=error_before,
        error_after=total_error(current_w),
    )


def _tables_to(tables: Tables, device: torch.device) -> Tables:
    return None if tables is None else type(tables)(*(t.to(device) for t in vars(tables).values()))


def _scaled_tables(tables: Tables, alphas: Tensor) -> Tables:
    """The tables with each group's steps times its multipliers ([G, regions]), on the CPU."""
    if tables is None:
        return None
    tables = _tables_to(tables, torch.device("cpu"))
    factors = alphas.cpu()
    if isinstance(tables, TwoRegionTables):
        return TwoRegionTables(tables.low_scale * factors[:, 0], tables.high_scale * factors[:, 1])
    return UniformTables(tables.scale * factors[:, 0], tables.zero)


def _group_rows(rows: LayerRows) -> list[tuple[Tensor, Tensor] | None]:
    grouped: list[tuple[Tensor, Tensor] | None] = []
    for inputs, grads in zip(rows.inputs, rows.grads):
        pairs = [(x, g) for x, g in zip(inputs, grads) if g is not None]
        grouped.append((torch.cat([x for x, _ in pairs]), torch.cat([g for _, g in pairs])) if pairs else None)
    return grouped


def hessian_search(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: time_group_params and collect_tqdit_statistics. Acts when options.hessian.

    Guarantees: every quantized layer with recorded rows has its weight plan rounded with the
    searched per-channel steps, and its tables in ctx.annotations["tqdit.linear_tables"] hold the
    searched activation steps (groups past the real ones repeat the last real group). Each layer's
    plan notes its Fisher-weighted error before and after; ctx.plan.summary["tqdit"] adds the search
    time, the grid size, the errors and the peak memory. ctx.annotations["tqdit.statistics"] is
    released. The graph is not changed.
    """
    options = ctx.spec.options
    if not options.hessian:
        return
    start_time = time.perf_counter()
    statistics = ctx.annotations.pop(STATISTICS)  # its rows are not needed after the search
    groups: TimeGroups = ctx.annotations[GROUPS]
    tables = ctx.annotations.get(LINEAR_TABLES, {})
    grid = candidate_grid(options.hessian_candidates)
    errors: dict[str, tuple[float, float]] = {}
    for plan in tqdm(ctx.plan.quantized_layers(), desc="tqdit hessian search", disable=not ctx.progress, leave=False):
        layer_rows = statistics.linears.get(plan.name)
        rows = _group_rows(layer_rows) if layer_rows is not None else []
        if not any(rows):
            plan.notes.append("HO skipped: no loss gradient reaches this layer")
            continue
        weight = gm.get_parameter(plan.weight_name).detach()
        layer_tables = tables.get(plan.name) if plan.activations.quantized else None
        found = search_layer(
            weight, plan.weight.bits, plan.weight.group_size, layer_tables,
            plan.activations.bits, rows, grid, options.hessian_rounds,
        )
        if found.tables is not None:
            tables[plan.name] = _repeat_last_real(found.tables, groups)
        qweight = _rounded(weight, found.weight_scale, plan.weight.bits, plan.weight.group_size)
        plan.weight.set_rounded(qweight, found.weight_scale, "hessian search")
        errors[plan.name] = (found.error_before, found.error_after)
        change = 100 * (found.error_after / found.error_before - 1) if found.error_before else 0.0
        plan.notes.append(
            f"HO: Fisher-weighted error {found.error_before:.3g} -> {found.error_after:.3g} ({change:+.0f}%)"
        )
    summary = ctx.plan.summary.setdefault(SUMMARY, {})
    peak, peak_kind = peak_memory_mib(next(gm.parameters()).device)
    summary.update(
        hessian_seconds=time.perf_counter() - start_time,
        hessian_candidates=len(grid),
        hessian_rounds=options.hessian_rounds,
        hessian_errors=errors,
        peak_memory_mib=max(peak, summary.get("peak_memory_mib", 0.0)),
        peak_memory_kind=peak_kind,
    )


def _repeat_last_real(tables: UniformTables | TwoRegionTables, groups: TimeGroups) -> UniformTables | TwoRegionTables:
    source = torch.tensor([min(g, groups.real - 1) for g in range(groups.count)])
    return type(tables)(*(t[source] for t in vars(tables).values()))


def _rounded(weight: Tensor, scale: Tensor, bits: int, group_size: int) -> Tensor:
    """The weight's codes with the searched steps (packed for 4 bits)."""
    qparams = QParams(scale=scale, zero=torch.zeros_like(scale, dtype=torch.int32), bits=bits, symmetric=True,
                      group_size=group_size)
    codes = quantize(weight.float(), qparams)
    return pack_int4(codes) if bits == 4 else codes
