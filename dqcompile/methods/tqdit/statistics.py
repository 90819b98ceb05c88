"""Pass: run the float graph again over the calibration samples and gather what TQ-DiT's searches need.

Two runs per calibration call, node by node, through the calibration runner's probes (the graph
itself is not touched):
1. as recorded, without gradients: per-head max |.| of each attention's Q, K and V, and a few batch
   rows of them for the post-softmax split search (time_group_params);
2. with HO only, the denoising loss with gradients. The call's input x_t came from the float model's
   own trajectory and the float model predicts eps_fp from it; with eps fresh Gaussian noise,
       x_t' = x_t + sqrt(1 - abar_t) (eps - eps_fp)
   is the same x0 estimate noised with eps instead (sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps), so
   L = ||eps_theta(x_t') - eps||^2 is the model's training loss at a point where its target is known,
   and dL/dO at each linear's output O is not zero (against eps_fp as the target it would be: the
   float model is at the optimum of its own output, the defect of the public code, docs/methods.md).
   Rows of each quantized linear's input X and of g = dL/dO are kept for hessian_search.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from dqcompile.calib.probes import CalibrationCall
from dqcompile.calib.runner import run_graph, timestep_key
from dqcompile.methods.tqdit.common import (
    GROUPS,
    STATISTICS,
    SUMMARY,
    AttentionSamples,
    LayerRows,
    TimeGroups,
    TQDiTStatistics,
    peak_memory_mib,
    quantized_sites,
    statistics_needed,
)
from dqcompile.passes.context import PassContext

# Batch rows of Q, K, V kept per attention and time group for the softmax split search: the first and
# the last row of each call (under classifier-free guidance, a conditional and an unconditional one).
ATTENTION_SEARCH_ROWS = 4
# Rows are drawn with this seed, so a calibration run is reproducible.
ROW_SEED = 0

Callback = Callable[[tuple, Any], None]


@dataclass
class _NodeProbe:
    """A probe (dqcompile.calib.probes) that hands a node's arguments and result to a callback."""

    node_name: str
    callback: Callback

    def __call__(self, call: CalibrationCall, args: tuple, result: Any) -> None:
        self.callback(args, result)


def _run(gm: GraphModule, inputs: dict[str, Any], callbacks: dict[str, Callback]) -> Tensor:
    """The graph's first output for keyword graph inputs, with the callbacks as probes."""
    return run_graph(gm, inputs, [_NodeProbe(name, callback) for name, callback in callbacks.items()])


def noise_levels(options: Any) -> Tensor:
    """sqrt(1 - abar_t) for t = 0 .. T - 1 of the spec's noise schedule (float32 [T])."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=options.num_train_timesteps, beta_schedule=options.beta_schedule)
    return (1 - scheduler.alphas_cumprod).sqrt().float()


def _noisy_sample(inputs: dict[str, Any], prediction: Tensor) -> str:
    """The input that holds x_t: a float tensor shaped like the prediction, whose channels may be
    doubled by a learned variance (DiT's out_channels = 2 in_channels)."""
    for name, value in inputs.items():
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and value.dim() == prediction.dim() >= 2
            and value.shape[0] == prediction.shape[0]
            and value.shape[2:] == prediction.shape[2:]
            and value.shape[1] <= prediction.shape[1]
        ):
            return name
    raise ValueError(
        "TQ-DiT's Hessian-guided search needs the noisy sample among the model's inputs: a float tensor "
        f"shaped like its prediction {tuple(prediction.shape)} (channels may be doubled); none of "
        f"{', '.join(inputs)} is (set tqdit.hessian=False for this model)"
    )


def collect_tqdit_statistics(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: the calibration run, assign_time_groups, find_attention_sites. Acts with quantized
    attention or HO (statistics_needed).

    Guarantees: ctx.annotations["tqdit.statistics"] holds, per time group, each quantized
    attention's per-head max |Q|, |K|, |V| and up to ATTENTION_SEARCH_ROWS batch rows of them, and
    with options.hessian up to options.hessian_rows rows of every quantized linear's input with the
    denoising loss's gradient at its output (see the module docstring). ctx.plan.summary["tqdit"]
    records the number of calibration calls and rows, the time taken and the peak memory. The graph
    is not changed.
    """
    if not statistics_needed(ctx):
        return
    samples = ctx.require_calibration("TQ-DiT's attention scales and Hessian-guided search")
    calls = [(timestep_key(sample), ctx.binding.graph_kwargs((), dict(sample))[0]) for sample in samples]
    start = time.perf_counter()
    options = ctx.spec.options
    groups: TimeGroups = ctx.annotations[GROUPS]
    statistics = TQDiTStatistics()
    attention_recorders = _attention_recorders(ctx, groups, statistics)
    linear_recorders = _linear_recorders(ctx, groups, calls, statistics) if options.hessian else {}
    levels = noise_levels(options) if options.hessian else None
    generator = torch.Generator().manual_seed(ROW_SEED)
    total_rows = 0
    for key, inputs in tqdm(calls, desc="tqdit statistics", disable=not ctx.progress, leave=False):
        group = groups.index(key)
        with torch.no_grad():
            prediction = _run(gm, inputs, {name: make(group) for name, make in attention_recorders.items()})
        total_rows += prediction.shape[0]
        if levels is not None:
            sigma = float(levels[min(max(round(key), 0), len(levels) - 1)])
            callbacks = {name: make(group, generator) for name, make in linear_recorders.items()}
            _denoising_backward(gm, inputs, prediction, sigma, callbacks, generator)
    ctx.annotations[STATISTICS] = statistics
    peak, peak_kind = peak_memory_mib(prediction.device)
    ctx.plan.summary.setdefault(SUMMARY, {}).update(
        calibration_calls=len(calls),
        calibration_rows=total_rows,
        timesteps=sum(len(members) for members in groups.members[: groups.real]),
        time_groups=groups.real,
        statistics_seconds=time.perf_counter() - start,
        peak_memory_mib=peak,
        peak_memory_kind=peak_kind,
    )


def _denoising_backward(
    gm: GraphModule,
    inputs: dict[str, Any],
    prediction: Tensor,
    sigma: float,
    callbacks: dict[str, Callback],
    generator: torch.Generator,
) -> None:
    """One forward and backward of the denoising loss at x_t' (module docstring), recording through
    `callbacks`; every float input requires grad, so the loss reaches every linear fed by one."""
    name = _noisy_sample(inputs, prediction)
    x_t = inputs[name]
    channels = x_t.shape[1]
    noise = torch.randn(x_t.shape, generator=generator).to(device=x_t.device, dtype=torch.float32)
    noisy = x_t.float() + sigma * (noise - prediction[:, :channels].float())
    def differentiable(value: Any) -> Any:
        return value.detach().requires_grad_() if isinstance(value, Tensor) and value.is_floating_point() else value

    leaves = pytree.tree_map(differentiable, {**inputs, name: noisy.to(x_t.dtype)})
    with torch.enable_grad():
        output = _run(gm, leaves, callbacks)
        loss = (output[:, :channels].float() - noise).square().sum()
        loss.backward()


def _attention_recorders(
    ctx: PassContext, groups: TimeGroups, statistics: TQDiTStatistics
) -> dict[str, Callable[[int], Callback]]:
    """Per quantized attention node: its recorder for a time group, filling statistics.attention."""
    recorders = {}
    for site in quantized_sites(ctx):
        samples = AttentionSamples(
            absmax=torch.zeros(groups.count, 3, site.heads),
            q=[[] for _ in range(groups.count)],
            k=[[] for _ in range(groups.count)],
            v=[[] for _ in range(groups.count)],
        )
        statistics.attention[site.name] = samples
        recorders[site.node_name] = _attention_recorder(samples)
    return recorders


def _linear_recorders(
    ctx: PassContext, groups: TimeGroups, calls: list[tuple[float, dict[str, Any]]], statistics: TQDiTStatistics
) -> dict[str, Callable[[int, torch.Generator], Callback]]:
    """Per linear node of a quantized layer: its recorder for a time group, filling statistics.linears
    with at most options.hessian_rows rows per layer and group (spread evenly over the group's calls)."""
    calls_in_group = Counter(groups.index(key) for key, _ in calls)
    recorders = {}
    for plan in ctx.plan.quantized_layers():
        rows = LayerRows([[] for _ in range(groups.count)], [[] for _ in range(groups.count)])
        statistics.linears[plan.name] = rows
        budget = {
            group: math.ceil(ctx.spec.options.hessian_rows / (count * len(plan.node_names)))
            for group, count in calls_in_group.items()
        }
        for node_name in plan.node_names:
            recorders[node_name] = _linear_recorder(rows, budget)
    return recorders


def _attention_recorder(samples: AttentionSamples) -> Callable[[int], Callback]:
    def for_group(group: int) -> Callback:
        def record(args: tuple, result: Any) -> None:
            q, k, v = args[:3]
            for slot, value in enumerate((q, k, v)):
                head_max = value.detach().abs().amax(dim=(0, 2, 3)).float().cpu()
                samples.absmax[group, slot] = torch.maximum(samples.absmax[group, slot], head_max)
            kept = sum(rows.shape[0] for rows in samples.q[group])
            picks = list(dict.fromkeys((0, q.shape[0] - 1)))[: ATTENTION_SEARCH_ROWS - kept]
            if picks:
                for store, value in ((samples.q, q), (samples.k, k), (samples.v, v)):
                    store[group].append(value.detach()[picks].float())

        return record

    return for_group


def _linear_recorder(rows: LayerRows, budget: dict[int, int]) -> Callable[[int, torch.Generator], Callback]:
    def for_group(group: int, generator: torch.Generator) -> Callback:
        def record(args: tuple, result: Any) -> None:
            if not isinstance(result, Tensor) or not result.requires_grad:
                return  # not downstream of any float input: no loss gradient reaches it
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            picked = torch.randperm(x.shape[0], generator=generator)[: budget[group]].to(x.device)
            rows.inputs[group].append(x[picked].float())
            # Gradients arrive in backward order; a slot keeps each one beside its input rows.
            grads, slot = rows.grads[group], len(rows.grads[group])
            grads.append(None)

            def keep_gradient(grad: Tensor) -> None:
                grads[slot] = grad.detach().reshape(-1, grad.shape[-1])[picked].float()

            result.register_hook(keep_gradient)

        return record

    return for_group
