"""Pass: static per-tensor activation parameters from calibration statistics."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from dqcompile.passes.context import PassContext
from dqcompile.quant import compute_qparams


def static_activation_params(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: ctx.input_stats of every quantized layer whose activation plan is "static" and still
    has no tensors (a method may have set them already: TQ-DiT's time groups).

    Guarantees: each such plan holds scale (float32 [1]) and zero (int32 [1]) covering the range
    seen over all calibration timesteps, with the spec's symmetry.
    """
    for plan in ctx.plan.quantized_layers():
        activations = plan.activations
        if activations.kind != "static" or activations.tensors:
            continue
        stats = ctx.input_stats.get(plan.name)
        if not stats:
            raise ValueError(f"layer {plan.name}: static activation quantization needs calibration statistics")
        low = min(s.minimum.min() for s in stats.values())
        high = max(s.maximum.max() for s in stats.values())
        qparams = compute_qparams(torch.stack([low, high]).float(), activations.bits,
                                  symmetric=activations.symmetric, granularity="tensor")
        activations.set_tensors(scale=qparams.scale.reshape(1).float(), zero=qparams.zero.reshape(1).to(torch.int32))
