"""The pass pipeline: which passes run, in which order, for a spec."""

from __future__ import annotations

from torch.fx import GraphModule

from dqcompile.calib.runner import run_calibration
from dqcompile.capture import CallBinding
from dqcompile.methods import method_passes
from dqcompile.passes.annotate_linears import annotate_linears
from dqcompile.passes.context import PassContext
from dqcompile.passes.lower_linears import lower_linears
from dqcompile.passes.observers import insert_observers, remove_observers
from dqcompile.passes.quantize_weights import quantize_weights
from dqcompile.passes.static_activation_params import static_activation_params


def _checked(gm: GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()


def static_layers(ctx: PassContext) -> set[str]:
    """Layers whose activation parameters come from calibration statistics."""
    return {
        plan.name
        for plan in ctx.quantized_layers()
        if plan.spec.act_quantized and plan.spec.act_mode == "static_tensor"
    }


def run_pipeline(gm: GraphModule, binding: CallBinding, ctx: PassContext) -> None:
    """capture -> analyze -> observe + calibrate -> method passes -> quantize weights -> lower.

    The graph is linted after every stage. When ctx.restoring (load), calibration is skipped: the
    passes only build the structure, and the saved tensors replace every value afterwards.
    """
    method = method_passes(ctx.spec.method)
    annotate_linears(gm, ctx)
    for analysis in method.analyze:
        analysis(gm, ctx)
        _checked(gm)
    ctx.observe |= static_layers(ctx)
    if ctx.observe and not ctx.restoring:
        if not ctx.calibration:
            raise ValueError(
                f"spec {ctx.spec.name!r} needs calibration data (static activations or method "
                f"{ctx.spec.method!r}): pass calibration=... (see dqcompile.calibration_set)"
            )
        insert_observers(gm, ctx, ctx.observe)
        _checked(gm)
        run_calibration(gm, binding, ctx.calibration, progress=ctx.progress)
        remove_observers(gm, ctx)
        _checked(gm)
    for calibrated in method.calibrated:
        calibrated(gm, ctx)
        _checked(gm)
    static_activation_params(gm, ctx)
    quantize_weights(gm, ctx)
    lower_linears(gm, ctx)
    _checked(gm)
    for lowered in method.lowered:
        lowered(gm, ctx)
        _checked(gm)
