"""Multi-region quantization (MRQ, TQ-DiT): one activation, two regions, each with its own step.

A value gets a ``b``-bit code whose top bit names the region and whose other ``b - 1`` bits are the
magnitude in that region's step. Two layouts, for the two activations TQ-DiT treats this way:

- post-GELU (the fc2 input; ``split_at_zero=True``): negative values (GELU's tail, down to about -0.17)
  take codes ``-2^(b-1) .. -1`` with step ``low_scale``; the rest take ``0 .. 2^(b-1) - 1`` with step
  ``high_scale``. As one signed ``b``-bit code, the region is the sign bit.
- post-softmax (probabilities in [0, 1]; ``split_at_zero=False``): a value whose fine code
  ``round(x / low_scale)`` fits in ``b - 1`` bits (``x < (2^(b-1) - 1/2) low_scale``) takes it; any
  other value takes ``round(x / high_scale)``, clamped to ``2^(b-1) - 1``, with
  ``high_scale = 1 / 2^(b-1)`` (``softmax_high_scale``) so that the coarse region reaches 1. The split
  ``2^(b-1) low_scale`` is searched among powers of two (``softmax_low_scales``).

Integer form (what the kernels compute on): two int8 code tensors ``q_low`` and ``q_high``, each zero
wherever the value lies in the other region, so that

    x_hat = low_scale * q_low + high_scale * q_high

and a product with integer codes ``w`` is ``low_scale (q_low . w) + high_scale (q_high . w)``: two exact
integer dot products, rescaled and summed in float.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dqcompile.quant.uniform import MIN_SCALE, check_bits, divide


def _codes_and_steps(
    x: Tensor, low_scale: Tensor, high_scale: Tensor, bits: int, split_at_zero: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Each element's code (integer-valued float32), whether it is in the low region, and its step."""
    check_bits(bits)
    top = 2 ** (bits - 1) - 1
    values = x.float()
    if split_at_zero:
        in_low, smallest = values < 0, -(top + 1)
    else:
        # round(x / low) <= top exactly when x / low < top + 1/2 (top is odd, so a tie rounds up to top + 1).
        in_low, smallest = torch.div(values, low_scale) < top + 0.5, 0
    # One step per element, blended with a 0 / 1 mask (exact: s * 1 + t * 0 = s; and much faster than
    # torch.where on the CPU); the division is then the same as the region test's for fine values.
    mask = in_low.to(values.dtype)
    step = low_scale * mask + high_scale * (1 - mask)
    return torch.div(values, step).round_().clamp_(smallest, top), in_low, step


def mrq_quantize(
    x: Tensor, low_scale: Tensor, high_scale: Tensor, bits: int, split_at_zero: bool
) -> tuple[Tensor, Tensor]:
    """The two int8 code tensors ``(q_low, q_high)`` of ``x`` (layouts in the module docstring).

    ``low_scale`` and ``high_scale`` are float32 and broadcast against ``x`` (e.g. ``[B, 1, 1]`` per
    sample, or one element). Rounding is half to even (``torch.round``), after one division.
    """
    codes, in_low, _ = _codes_and_steps(x, low_scale, high_scale, bits, split_at_zero)
    codes = codes.to(torch.int8)
    q_low = codes * in_low  # int8: the code in the low region, 0 elsewhere
    return q_low, codes - q_low


def mrq_dequantize(q_low: Tensor, q_high: Tensor, low_scale: Tensor, high_scale: Tensor) -> Tensor:
    """Float32 values of two-region codes: ``low_scale * q_low + high_scale * q_high``.

    At most one of the two codes of an element is non-zero, so the sum adds an exact zero.
    """
    return q_low.float() * low_scale + q_high.float() * high_scale


def fake_quantize_mrq(x: Tensor, low_scale: Tensor, high_scale: Tensor, bits: int, split_at_zero: bool) -> Tensor:
    """Quantize then dequantize with two regions (float32, broadcast shape of ``x`` and the scales):
    ``mrq_dequantize(*mrq_quantize(...))``, computed as code times its region's step."""
    codes, _, step = _codes_and_steps(x, low_scale, high_scale, bits, split_at_zero)
    return codes.mul_(step)


def softmax_high_scale(bits: int) -> float:
    """The coarse step of post-softmax MRQ, ``1 / 2^(b-1)``: its ``b - 1`` magnitude bits span [0, 1)."""
    check_bits(bits)
    return 2.0 ** -(bits - 1)


def softmax_low_scales(bits: int) -> list[float]:
    """The fine steps the split search tries: ``high / 2^m`` for m = 0 .. b - 1 (the split at
    ``2^(b-1) low_scale`` is a power of two); m = 0 is one uniform region."""
    high = softmax_high_scale(bits)
    return [high / 2.0**m for m in range(bits)]


def gelu_scales(minimum: Tensor, maximum: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Min / max steps of post-GELU MRQ: ``-minimum / 2^(b-1)`` and ``maximum / (2^(b-1) - 1)``.

    Each is float32 and never below ``uniform.MIN_SCALE`` (a region that saw no value keeps a valid step).
    """
    check_bits(bits)
    low = (-minimum.float()).clamp_min(0) / 2 ** (bits - 1)
    high = divide(maximum.float().clamp_min(0), 2 ** (bits - 1) - 1)
    return low.clamp_min(MIN_SCALE), high.clamp_min(MIN_SCALE)


def search_softmax_low_scale(probs: Tensor, values: Tensor, bits: int) -> float:
    """The fine step of post-softmax MRQ that minimises the attention output error.

    probs ``[..., Nq, Nk]`` (softmax outputs) and values ``[..., Nk, d]`` (V) of calibration samples;
    the error is ``||(P_hat - P) V||^2`` over all of them. Candidates: ``softmax_low_scales(bits)``, in
    order, a later one replacing the best only when strictly better (so ties keep one region).
    """
    high = torch.tensor(softmax_high_scale(bits), device=probs.device)
    best_scale, best_error = 0.0, float("inf")
    for low in softmax_low_scales(bits):
        error = (fake_quantize_mrq(probs, torch.tensor(low, device=probs.device), high, bits, False) - probs.float())
        error = float((error @ values.float()).square().sum())
        if error < best_error:
            best_scale, best_error = low, error
    return best_scale
