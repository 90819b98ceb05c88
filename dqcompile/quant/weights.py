"""Round-to-nearest weight quantization, per output channel or per group, with an optional MSE clip search.

Weights are symmetric (docs/CONTRACTS.md): zero point 0, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
scales float32 ``[N, G]``; 4-bit codes are stored packed two to a byte.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from dqcompile.quant.packing import pack_int4, unpack_int4
from dqcompile.quant.uniform import QParams, check_bits, compute_qparams, dequantize, num_groups, quantize

PACKED_BITS = 4

# Clip ratios tried by the MSE search: 1.0 down to 0.5 in steps of 0.05. 1.0 comes first and only a
# strictly smaller error replaces it, so the search never does worse than plain round-to-nearest.
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[N, K]`` weight.

    Attributes:
        qweight: int8 ``[N, K]`` codes, or uint8 ``[N, K/2]`` packed codes when ``bits == 4``.
        scale: float32 ``[N, G]``; ``G = 1`` per output channel, ``K / group_size`` per group.
        bits: code width.
        group_size: input channels per group; 0 means one group per output channel.
    """

    qweight: Tensor
    scale: Tensor
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        expected = torch.uint8 if self.bits == PACKED_BITS else torch.int8
        if self.qweight.dtype != expected or self.qweight.dim() != 2:
            raise ValueError(f"{self.bits}-bit weights must be 2-D {expected}, got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        in_features = self.qweight.shape[1] * (2 if self.bits == PACKED_BITS else 1)
        expected_scale = (self.qweight.shape[0], num_groups(in_features, self.group_size))
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != expected_scale:
            raise ValueError(f"weight scale must be float32 {expected_scale}, got {self.scale.dtype} "
                             f"{tuple(self.scale.shape)}")

    def codes(self) -> Tensor:
        """The int8 ``[N, K]`` codes (unpacked when stored packed)."""
        return unpack_int4(self.qweight) if self.bits == PACKED_BITS else self.qweight

    def dequantize(self) -> Tensor:
        """Float32 ``[N, K]`` weight: ``scale[n, g] * code[n, k]`` for k in group g."""
        zero = torch.zeros_like(self.scale, dtype=torch.int32)
        qp = QParams(scale=self.scale, zero=zero, bits=self.bits, symmetric=True, group_size=self.group_size)
        return dequantize(self.codes(), qp)


def quantize_weight(w: Tensor, bits: int, group_size: int = 0, clip_search: bool = False) -> QuantizedWeight:
    """Symmetric round-to-nearest quantization of a ``[N, K]`` weight.

    Args:
        w: float weight ``[N, K]`` (``Y = X W^T``: rows are output channels).
        bits: code width, 2..8; 4-bit codes come back packed.
        group_size: 0 for one scale per output channel, else one per ``group_size`` consecutive input channels.
        clip_search: choose, per output channel / group, the clip ratio among ``CLIP_RATIOS`` that minimises
            the squared reconstruction error: the RTN-with-MSE-clipping of Q-DiT's public code (whose
            GPTQ-derived quantizer scores ``|err|^2.4`` over a finer grid; the squared error is what the
            reconstruction of the layer output cares about).
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight needs a 2-D [N, K] weight, got shape {tuple(w.shape)}")
    granularity = "group" if group_size else "channel"
    w = w.float()
    qp = compute_qparams(w, bits, symmetric=True, granularity=granularity, group_size=group_size)
    if clip_search:
        qp = _search_clip(w, qp, granularity)
    codes = quantize(w, qp)
    qweight = pack_int4(codes) if bits == PACKED_BITS else codes
    return QuantizedWeight(qweight=qweight, scale=qp.scale, bits=bits, group_size=group_size)


def _search_clip(w: Tensor, rtn: QParams, granularity: str) -> QParams:
    """Per output channel / group, the scale of the clip ratio with the least squared error (RTN first)."""
    groups = num_groups(w.shape[-1], rtn.group_size)
    w_grouped = w.reshape(w.shape[0], groups, -1)

    def squared_error(qp: QParams) -> Tensor:  # [N, G]
        w_hat = dequantize(quantize(w, qp), qp).reshape(w_grouped.shape)
        return w_hat.sub_(w_grouped).square_().sum(dim=-1)

    best_scale, best_error = rtn.scale, squared_error(rtn)
    for ratio in CLIP_RATIOS[1:]:
        qp = compute_qparams(
            w, rtn.bits, symmetric=True, granularity=granularity, group_size=rtn.group_size, clip_ratio=ratio
        )
        error = squared_error(qp)
        better = error < best_error
        best_scale = torch.where(better, qp.scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return QParams(scale=best_scale, zero=rtn.zero, bits=rtn.bits, symmetric=True, group_size=rtn.group_size)


def weight_group_sums(qweight: Tensor, bits: int, group_size: int) -> Tensor:
    """wsum[n, g] = sum of the weight codes of output n in input group g, int32 [N, G].

    The zero-point term of an integer linear with asymmetric activations needs it (x_zero * wsum);
    it depends on the weight alone, so the lowering computes it once per layer.
    """
    codes = unpack_int4(qweight) if bits == PACKED_BITS else qweight
    n, k = codes.shape
    return codes.reshape(n, num_groups(k, group_size), -1).sum(dim=-1, dtype=torch.int32)
