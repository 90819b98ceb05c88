"""Pass: round the weights of the quantized layers to integers."""

from __future__ import annotations

from torch.fx import GraphModule
from tqdm.auto import tqdm

from dqcompile.passes.context import PassContext
from dqcompile.quant import quantize_weight


def quantize_weights(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: annotate_linears (and any pass that rewrites float weights, such as a fold, before it).

    Guarantees: every quantized layer's module holds buffers `qweight` (int8 [N, K], or packed
    uint8 [N, K/2] for 4 bits) and `weight_scale` (float32 [N, G]). Layers that already hold them
    (quantized by a method pass, such as GPTQ) are left as they are. The float weights are still
    there; lower_linears removes them once no node reads them.
    """
    for plan in tqdm(ctx.quantized_layers(), desc="quantize weights", disable=not ctx.progress, leave=False):
        owner = gm.get_submodule(plan.name)
        if hasattr(owner, "qweight") and hasattr(owner, "weight_scale"):
            continue
        weight = gm.get_parameter(plan.weight_name).detach().float()
        quantized = quantize_weight(
            weight, plan.spec.weight_bits, group_size=plan.spec.weight_group_size, clip_search=plan.spec.clip_search
        )
        owner.register_buffer("qweight", quantized.qweight)
        owner.register_buffer("weight_scale", quantized.scale.float())
