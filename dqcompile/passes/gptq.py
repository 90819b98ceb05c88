"""Passes: GPTQ weight rounding from each layer's calibration Hessian (Q-DiT's public code offers it
beside RTN with a clipping search; any spec can ask for it with weights.rounding="gptq"), and the
GPTQ algorithm itself.

GPTQ (Frantar et al., 2023) quantizes a weight one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
output error, H = 2 X^T X / n: the layer's outputs on calibration inputs move less than with
round-to-nearest, whose columns each round alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import GraphModule
from tqdm.auto import tqdm

from dqcompile.calib.probes import HessianAccumulator
from dqcompile.passes.context import PassContext
from dqcompile.quant import QParams, QuantizedWeight, dequantize, pack_int4, quantize, quantize_weight
from dqcompile.quant.uniform import num_groups

PACKED_BITS = 4


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int = 0,
    *,
    clip_search: bool = False,
    unit_gain: bool = False,
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ of a [N, K] weight with its input Hessian [K, K]; symmetric codes as `quantize_weight`.

    Scales: one per output channel or per group of group_size input columns, from min/max (or the clip
    search, unit_gain as `quantize_weight`'s) of the group's weights as they stand when GPTQ reaches the group's first column, so
    they include the error already pushed into the group (the GPTQ paper's lazy group scales). With
    act_order, columns go in order of decreasing diag(H) and the scales are fixed up front from the
    original weights, since a group is then not reached in one piece. Input columns the calibration
    never excited (diag(H) = 0) get code 0.
    damping: added to the diagonal as damping * mean(diag(H)) (GPTQ's 1%), so H can be inverted.
    block_size: columns whose error updates are applied together (the result does not depend on it
    up to float rounding; it only batches the work).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq_quantize needs W [N, K] and H [K, K], got {tuple(weight.shape)} and {tuple(hessian.shape)}")
    n, k = weight.shape
    groups = num_groups(k, group_size)
    size = k // groups
    if bits == PACKED_BITS and size % 2:
        raise ValueError(f"GPTQ with {bits}-bit weights needs an even group size, got {size}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    def scale_of(columns: Tensor) -> Tensor:  # [N] from the [N, size] weights of one group
        return quantize_weight(columns, bits, clip_search=clip_search, unit_gain=unit_gain).scale[:, 0]

    scales = torch.zeros(n, groups, device=w.device)
    if act_order:
        scales = quantize_weight(w, bits, group_size=group_size, clip_search=clip_search,
                                 unit_gain=unit_gain).scale.clone()
        order = torch.argsort(torch.diag(h), descending=True)
    else:
        order = torch.arange(k, device=w.device)
    w, h = w[:, order], h[order][:, order]
    h += damping * torch.diag(h).mean() * torch.eye(k, device=h.device)
    # The upper Cholesky factor of H^-1: row i holds the error-propagation coefficients of column i
    # onto the later columns, with the remaining columns' inverse Hessian already conditioned on it.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True).float()

    codes = torch.zeros(n, k, dtype=torch.int8, device=w.device)
    zero = torch.zeros(n, 1, dtype=torch.int32, device=w.device)
    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        for i in range(stop - start):
            column = int(order[start + i])
            group = column // size
            if not act_order and column % size == 0:
                # The group's columns as they stand now: this block's updated ones, then later blocks'.
                scales[:, group] = scale_of(torch.cat([block[:, i:], w[:, stop:]], dim=1)[:, :size])
            qp = QParams(scale=scales[:, group : group + 1], zero=zero, bits=bits, symmetric=True, group_size=0)
            q = quantize(block[:, i : i + 1], qp)
            codes[:, start + i] = q[:, 0]
            error = (block[:, i] - dequantize(q, qp)[:, 0]) / h_inv[start + i, start + i]
            block[:, i:] -= error[:, None] * h_inv[start + i, start + i : stop][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    codes = codes[:, torch.argsort(order)]
    qweight = pack_int4(codes) if bits == PACKED_BITS else codes
    return QuantizedWeight(qweight=qweight, scale=scales, bits=bits, group_size=group_size)


def request_hessians(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: plan_layers. Acts when spec.weights.rounding is "gptq".

    Guarantees: the calibration run will accumulate the input Hessian of every quantized layer (one
    HessianAccumulator probe per linear node, the nodes of a layer sharing their sums), whose
    H = 2 X^T X / n collect_hessians puts into ctx.hessians; the layers are observed too (which
    refuses non-finite inputs with the layer's name).
    """
    if ctx.spec.weights.rounding != "gptq":
        return
    for plan in ctx.plan.quantized_layers():
        sums: dict = {"xtx": None, "rows": 0}
        ctx.probes += [HessianAccumulator(node_name, plan.name, sums) for node_name in plan.node_names]
        ctx.observe.add(plan.name)


def collect_hessians(ctx: PassContext) -> None:
    """After the calibration run: each layer's Hessian from its accumulators into ctx.hessians."""
    for probe in ctx.probes:
        if isinstance(probe, HessianAccumulator) and probe.layer not in ctx.hessians:
            ctx.hessians[probe.layer] = probe.hessian()


def gptq_weights(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: request_hessians and a calibration run (ctx.hessians), after any pass that rewrites the
    float weights (a fold, which also rescales the Hessians). Acts when spec.weights.rounding is "gptq".

    Guarantees: every quantized layer's weight plan holds GPTQ's codes and scales with its own group
    size, and its report note says GPTQ. Raises ValueError naming the layer when its Hessian cannot
    be used.
    """
    if ctx.spec.weights.rounding != "gptq":
        return
    options = ctx.spec.weights.gptq
    for plan in tqdm(ctx.plan.quantized_layers(), desc="GPTQ", disable=not ctx.progress, leave=False):
        weight = gm.get_parameter(plan.weight_name)
        hessian = ctx.hessians[plan.name]
        try:
            quantized = gptq_quantize(
                weight, hessian.to(weight.device), plan.weight.bits, plan.weight.group_size,
                clip_search=plan.weight.clip_search, unit_gain=plan.weight.clip_unit_gain, damping=options.damping,
                block_size=options.block_size, act_order=options.act_order,
            )
        except (RuntimeError, ValueError) as error:  # torch.linalg raises RuntimeError subclasses
            raise ValueError(f"layer {plan.name}: GPTQ failed: {error}") from error
        plan.weight.set_rounded(quantized.qweight, quantized.scale, "gptq")
        plan.notes.append(f"GPTQ (damping {options.damping:g}, block {options.block_size})")
