"""Pass: round to nearest every quantized weight that no method rounded."""

from __future__ import annotations

from torch.fx import GraphModule
from tqdm.auto import tqdm

from dqcompile.passes.context import PassContext
from dqcompile.quant import quantize_weight


def round_weights(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: plan_layers, and every pass that rewrites float weights (a fold) or rounds them itself
    (GPTQ, a scale search) before it: a weight plan is rounded by exactly one pass, and this one
    takes the layers no other pass rounded (round to nearest is the default rounding).

    Guarantees: every quantized layer's weight plan holds int8 [N, K] codes (packed uint8 [N, K/2]
    for 4 bits) and float32 [N, G] scales. The graph's float weights are left as they are.
    """
    pending = [plan for plan in ctx.plan.quantized_layers() if not plan.weight.rounded]
    for plan in tqdm(pending, desc="round weights", disable=not ctx.progress, leave=False):
        weight = gm.get_parameter(plan.weight_name).detach().float()
        quantized = quantize_weight(weight, plan.weight.bits, group_size=plan.weight.group_size,
                                    clip_search=plan.weight.clip_search, unit_gain=plan.weight.clip_unit_gain)
        plan.weight.set_rounded(quantized.qweight, quantized.scale, "rtn+clip" if plan.weight.clip_search else "rtn")
