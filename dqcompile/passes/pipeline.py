"""The pass pipeline: which passes run, in which order, for a spec."""

from __future__ import annotations

from torch.fx import GraphModule

from dqcompile.calib.runner import run_calibration
from dqcompile.capture import CallBinding
from dqcompile.passes.annotate_linears import annotate_linears
from dqcompile.passes.context import PassContext
from dqcompile.passes.lower_linears import lower_linears
from dqcompile.passes.observers import insert_observers, remove_observers
from dqcompile.passes.quantize_weights import quantize_weights
from dqcompile.passes.static_activation_params import static_activation_params


def _checked(gm: GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()


def layers_to_observe(ctx: PassContext) -> set[str]:
    """Layers whose input statistics the spec needs from calibration."""
    return {
        plan.name
        for plan in ctx.quantized_layers()
        if plan.spec.act_quantized and plan.spec.act_mode == "static_tensor"
    }


def needs_calibration(ctx: PassContext) -> bool:
    return bool(layers_to_observe(ctx))


def run_pipeline(gm: GraphModule, binding: CallBinding, ctx: PassContext) -> None:
    """capture -> analyze -> observe + calibrate -> quantize weights -> lower, checking the graph after each."""
    annotate_linears(gm, ctx)
    observed = layers_to_observe(ctx)
    if observed and ctx.restoring:
        static_activation_params(gm, ctx)
    elif observed:
        if not ctx.calibration:
            raise ValueError(
                f"spec {ctx.spec.name!r} uses static activation quantization and needs calibration data: "
                "pass calibration=... (see dqcompile.calibration_set)"
            )
        insert_observers(gm, ctx, observed)
        _checked(gm)
        run_calibration(gm, binding, ctx.calibration, progress=ctx.progress)
        remove_observers(gm, ctx)
        _checked(gm)
        static_activation_params(gm, ctx)
    quantize_weights(gm, ctx)
    lower_linears(gm, ctx)
    _checked(gm)
