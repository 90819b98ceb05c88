"""The pipeline: decide a plan for a captured graph, then lower it once.

    decide:  plan_layers -> method.analyze -> [calibration run] -> method.calibrate
             -> gptq_weights -> static_activation_params -> round_weights
    lower:   passes/lower.py, from the plan alone

Deciding passes never emit dqcompile ops; the lowering never decides. `load` runs only `lower`,
from a saved plan.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule

from dqcompile.calib.probes import InputStatistics
from dqcompile.calib.runner import run_calibration
from dqcompile.capture import CallBinding
from dqcompile.methods import get_method
from dqcompile.passes.context import PassContext
from dqcompile.passes.gptq import collect_hessians, gptq_weights, request_hessians
from dqcompile.passes.plan_layers import plan_layers
from dqcompile.passes.round_weights import round_weights
from dqcompile.passes.static_activation_params import static_activation_params
from dqcompile.plan import ModelPlan
from dqcompile.spec import QuantSpec


def _checked(gm: GraphModule) -> None:
    gm.graph.lint()


def observe_static_layers(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: plan_layers. Guarantees: every layer whose activation plan is static is in ctx.observe."""
    ctx.observe |= {plan.name for plan in ctx.plan.quantized_layers() if plan.activations.kind == "static"}


def calibrate(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: the analysis passes (ctx.observe, ctx.probes). Acts when they asked for anything.

    Guarantees: every calibration sample ran through the graph once with the probes attached (an
    InputStatistics probe on each linear node of each observed layer, plus ctx.probes); the
    statistics are in ctx.input_stats and the Hessians in ctx.hessians. Refuses, with what needs it,
    a spec that needs calibration when no samples were given.
    """
    if not ctx.observe and not ctx.probes:
        return
    samples = ctx.require_calibration(f"static activations or method {ctx.spec.method!r}")
    statistics: list[InputStatistics] = []
    for name in sorted(ctx.observe, key=list(ctx.plan.layers).index):
        shared: InputStatistics | None = None
        for node_name in ctx.plan.layers[name].node_names:
            probe = InputStatistics(node_name, name, shared.stats if shared else {})
            shared = shared or probe
            statistics.append(probe)
    run_calibration(gm, ctx.binding, samples, [*statistics, *ctx.probes], progress=ctx.progress)
    for probe in statistics:
        ctx.input_stats[probe.layer] = probe.stats
    collect_hessians(ctx)


def decide(
    gm: GraphModule,
    binding: CallBinding,
    spec: QuantSpec,
    calibration: list[dict[str, Any]] | None,
    *,
    progress: bool = True,
) -> ModelPlan:
    """The plan for a captured graph (its float parameters are the graph module's own copies: folds
    rewrite them). The graph's nodes are not changed."""
    ctx = PassContext(spec=spec, binding=binding, calibration=calibration, progress=progress)
    method = get_method(spec.method)
    plan_layers(gm, ctx)
    for analysis in (*method.analyze, observe_static_layers, request_hessians):
        analysis(gm, ctx)
        _checked(gm)
    calibrate(gm, ctx)
    for step in (*method.calibrate, gptq_weights, static_activation_params, round_weights):
        step(gm, ctx)
        _checked(gm)
    return ctx.plan
