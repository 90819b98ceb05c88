"""Pass: static per-tensor activation parameters from calibration statistics."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from dqcompile.passes.context import PassContext
from dqcompile.quant import compute_qparams


def static_activation_params(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: ctx.input_stats for every quantized layer whose activation mode is static_tensor.

    Guarantees: each such layer's module (placeholders when ctx.restoring) holds buffers `input_scale` (float32 [1]) and
    `input_zero` (int32 [1]) covering the range seen over all calibration timesteps.
    """
    for plan in ctx.quantized_layers():
        if plan.spec.act_mode != "static_tensor" or not plan.spec.act_quantized:
            continue
        owner = gm.get_submodule(plan.name)
        if ctx.restoring:
            owner.register_buffer("input_scale", torch.ones(1))
            owner.register_buffer("input_zero", torch.zeros(1, dtype=torch.int32))
            continue
        stats = ctx.input_stats.get(plan.name)
        if not stats:
            raise ValueError(f"layer {plan.name}: static activation quantization needs calibration statistics")
        low = min(s.minimum.min() for s in stats.values())
        high = max(s.maximum.max() for s in stats.values())
        qparams = compute_qparams(
            torch.stack([low, high]).float(),
            plan.spec.act_bits,
            symmetric=plan.spec.act_symmetric,
            granularity="tensor",
        )
        owner.register_buffer("input_scale", qparams.scale.reshape(1).float())
        owner.register_buffer("input_zero", qparams.zero.reshape(1).to(torch.int32))
