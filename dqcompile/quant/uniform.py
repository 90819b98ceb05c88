"""Uniform (linear) quantizer math as pure functions over tensors.

Conventions (docs/CONTRACTS.md, "Integer conventions"):

- Symmetric, ``b`` bits: zero point 0, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
  ``s = max|x| / (2^(b-1) - 1)``.
- Asymmetric, ``b`` bits: codes in ``[-2^(b-1), 2^(b-1) - 1]`` (the unsigned codes of docs/methods.md shifted
  down by ``2^(b-1)`` so they fit an int8 container), ``x_hat = s * (q - z)`` with an int32 zero point
  ``z``. The range ``[min, max]`` is first extended to hold 0, so 0 is always exactly representable:
  ``s = (max - min) / (2^b - 1)``, ``z = qmin - round(min / s)``.
- ``q = clamp(round(x / s) + z, qmin, qmax)`` (round half to even, as ``torch.round``).

Granularity of ``(s, z)``, always stored with shape ``[..., G]``: one entry per group of the last dim,
with leading dims that broadcast against ``x.shape[:-1]``; applying them views ``x`` as ``[..., G, g]``.

- ``"tensor"``:  one (s, z) for the whole tensor; shape ``[1, ..., 1]``.
- ``"channel"``: one per output channel (dim 0 of a weight); shape ``[N, 1, ..., 1]``.
- ``"token"``:   one per row, reducing over the last dim only; shape ``[*x.shape[:-1], 1]``.
- ``"group"``:   one per ``group_size`` consecutive elements of the last dim; shape ``[*x.shape[:-1], K/g]``.
"""

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Granularity = Literal["tensor", "channel", "token", "group"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)

MIN_BITS = 2
MAX_BITS = 8  # codes live in int8 containers

# An all-zero slice would get scale 0, and then x / s = 0 / 0 = NaN. Any positive scale maps an all-zero
# slice to code z and back to exactly 0, so the floor only has to be positive; the smallest normal float32
# is the least intrusive choice (it only ever replaces scales of slices whose values are all below
# ~1e-36) and keeps 1 / s finite for kernels that multiply by a reciprocal.
MIN_SCALE = torch.finfo(torch.float32).tiny


def check_bits(bits: int) -> None:
    """Raise ValueError unless ``bits`` is an integer in ``MIN_BITS..MAX_BITS``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The code range ``(qmin, qmax)`` of a ``bits``-bit quantizer (both ends included)."""
    check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def num_groups(last_dim: int, group_size: int) -> int:
    """Number of groups G of the last dim: ``last_dim / group_size``, or 1 when ``group_size`` is 0.

    Raises ValueError for a negative group size or one that does not divide ``last_dim``.
    """
    if group_size == 0:
        return 1
    if group_size < 0:
        raise ValueError(f"group_size must be 0 (one group) or a positive divisor of the last dim, got {group_size}")
    if last_dim % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the last dim of size {last_dim}")
    return last_dim // group_size


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor.

    Attributes:
        scale: float32 ``[..., G]``, positive.
        zero: int32 ``[..., G]``; all zeros when ``symmetric``.
        bits: code width, 2..8.
        symmetric: selects the code range (see ``qrange``).
        group_size: elements of the last dim per group; 0 means one group spans the last dim.
    """

    scale: Tensor
    zero: Tensor
    bits: int
    symmetric: bool
    group_size: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.scale.dtype != torch.float32 or self.zero.dtype != torch.int32:
            raise ValueError(
                f"QParams needs a float32 scale and an int32 zero, got {self.scale.dtype} and {self.zero.dtype}"
            )


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """View ``x [..., K]`` as ``[..., G, g]``."""
    groups = num_groups(x.shape[-1], group_size)
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def divide(numerator: Tensor, denominator: float) -> Tensor:
    """``numerator / denominator``, correctly rounded on every device.

    On CUDA torch divides by a Python number as a product with its reciprocal, a second rounding that put
    scales one ulp off the CPU's (and the Triton kernels') now and then, and with them some codes; dividing
    by a tensor keeps the single rounding of a true division everywhere.
    """
    return numerator / torch.full_like(numerator, denominator)


def compute_qparams(
    x: Tensor,
    bits: int,
    *,
    symmetric: bool,
    granularity: Granularity,
    group_size: int = 0,
    clip_ratio: float | Tensor = 1.0,
) -> QParams:
    """Min/max quantization parameters of ``x`` at the given granularity.

    Args:
        x: float tensor ``[..., K]`` (statistics are taken in float32).
        bits: code width, 2..8.
        symmetric: symmetric (zero point 0) or asymmetric.
        granularity: ``"tensor"``, ``"channel"`` (dim 0), ``"token"`` (last dim) or ``"group"``.
        group_size: elements per group; required (> 0) for ``"group"`` and 0 otherwise.
        clip_ratio: shrinks the range to ``clip_ratio * [min, max]`` (values outside get clamped);
            a float in (0, 1] or a tensor of such values broadcasting against the ``[..., G]`` statistics.
    """
    check_bits(bits)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}")
    if granularity == "group" and group_size <= 0:
        raise ValueError(f"granularity 'group' needs a positive group_size, got {group_size}")
    if granularity != "group" and group_size != 0:
        raise ValueError(f"group_size is only used with granularity 'group', got group_size={group_size} "
                         f"with granularity {granularity!r}")
    if granularity == "channel" and x.dim() < 2:
        raise ValueError(f"granularity 'channel' needs a tensor of at least 2 dims, got shape {tuple(x.shape)}")
    if isinstance(clip_ratio, Tensor):
        clip_ok = bool(((clip_ratio > 0) & (clip_ratio <= 1)).all())
    else:
        clip_ok = 0.0 < clip_ratio <= 1.0
    if not clip_ok:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")

    grouped = _grouped(x.float(), group_size)  # [..., G, g]
    lo, hi = torch.aminmax(grouped, dim=-1)  # [..., G]
    if granularity == "channel":
        lo = lo.flatten(1).amin(dim=1).view(-1, *[1] * (x.dim() - 1))
        hi = hi.flatten(1).amax(dim=1).view(-1, *[1] * (x.dim() - 1))
    elif granularity == "tensor":
        lo = lo.amin().view([1] * x.dim())
        hi = hi.amax().view([1] * x.dim())

    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(hi, -lo) * clip_ratio
        scale = divide(amax, qmax).clamp_min(MIN_SCALE)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = lo.clamp_max(0.0) * clip_ratio
        hi = hi.clamp_min(0.0) * clip_ratio
        scale = divide(hi - lo, qmax - qmin).clamp_min(MIN_SCALE)
        # lo <= 0 <= hi puts round(lo / s) in [-(2^b - 1), 0], hence z in [qmin, qmax]: 0 maps to code z.
        zero = (qmin - torch.round(lo / scale)).to(torch.int32)
    return QParams(scale=scale, zero=zero, bits=bits, symmetric=symmetric, group_size=group_size)


def quantize(x: Tensor, qp: QParams) -> Tensor:
    """Integer codes of ``x``: ``clamp(round(x / s) + z, qmin, qmax)`` as int8, shaped like ``x``."""
    qmin, qmax = qrange(qp.bits, qp.symmetric)
    grouped = _grouped(x.float(), qp.group_size)
    # Division rather than multiplication by 1/s: one rounding, which the half-step error bound relies on.
    codes = torch.div(grouped, qp.scale.unsqueeze(-1)).round_().add_(qp.zero.unsqueeze(-1))
    return codes.clamp_(qmin, qmax).to(torch.int8).reshape(x.shape)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    """Float32 values of the codes ``q``: ``s * (q - z)``, shaped like ``q``."""
    grouped = _grouped(q, qp.group_size)
    # q - z is a small integer, exact in float32; the product with s is the only rounding.
    centered = grouped.to(torch.float32, copy=True).sub_(qp.zero.unsqueeze(-1))
    return centered.mul_(qp.scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize(
    x: Tensor,
    bits: int,
    *,
    symmetric: bool,
    granularity: Granularity,
    group_size: int = 0,
    clip_ratio: float | Tensor = 1.0,
) -> Tensor:
    """Quantize then dequantize ``x`` (arguments as ``compute_qparams``); returns ``x``'s dtype."""
    qp = compute_qparams(
        x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size, clip_ratio=clip_ratio
    )
    return dequantize(quantize(x, qp), qp).to(x.dtype)
