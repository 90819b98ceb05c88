"""Fused dynamic activation quantization in Triton, with the numerics of `dqcompile::quantize_act`.

Quantization of one group h[0..L) (a token, or g consecutive channels of a token), all in float32:

    symmetric,  qmax = 2^(b-1) - 1:
        scale = max(max|h| / qmax, MIN_SCALE)
        q     = clamp(round(h / scale), -qmax, qmax),                 zero = 0
    asymmetric, qmin = -2^(b-1), qmax = 2^(b-1) - 1, range extended to hold 0:
        lo = min(min h, 0), hi = max(max h, 0)
        scale = max((hi - lo) / (qmax - qmin), MIN_SCALE)
        zero  = qmin - round(lo / scale)
        q     = clamp(round(h / scale) + zero, qmin, qmax)            x_hat = scale * (q - zero)

Divisions are correctly rounded (div_rn, or `_divide_by_group`'s reciprocal with an FMA correction; plain
`/` is approximate on NVIDIA GPUs) and round() is
round-half-to-even, both as in torch, and MIN_SCALE (the smallest normal float32, which keeps an all-zero
group from dividing 0 by 0) is dqcompile.quant.uniform's: codes and scales agree bit for bit with the
reference backend (dqcompile/backends/reference.py) given the same float32 input.

`ln_modulate_quantize` runs LayerNorm, the adaLN modulation h * (1 + scale) + shift and the quantization
in one kernel: the normalized activation never goes to memory, only int8 codes and per-group scales do.
That fusion is what int8 needs to pay on Hopper: there cuBLAS's int8 GEMM is no faster than bf16 at
DiT-XL/2's shapes, so a separate quantize pass, one more round trip of the activation through memory,
eats whatever the integer GEMM gains (docs/design.md, "Peers and anchors"). It computes in float32
throughout, so for bf16 inputs it is the float32 composition, without the bf16 roundings between the
eager ops.

`gelu_quantize` computes aten.gelu (approximate "none" or "tanh") and quantizes its output in one pass:
the fc2 input of a DiT block, which otherwise makes a round trip through memory in bf16. The GELU is
aten's formula in float32, rounded to the input dtype as aten's output is, so the codes are those of
`quantize_act(gelu(x))` (see `gelu_quantize` for how exact that is).

Tiles are 3-D [rows, groups, group length], so one layout serves per-token (one group of length C) and
per-group quantization. A row is held in two power-of-two segments (`_row_segments`: 4,608 = 4,096 + 512),
masked, so any C is served with little padding.

`quantize_act_static` applies calibrated parameters (PTQ4DiT's and TQ-DiT's static activations): one
elementwise pass, codes clamp(round(x / scale) + zero) over the full code range, with the scale per
tensor or per row (TQ-DiT's time groups pick a row's scale by its sample's timestep).

The launchers are traceable by `torch.library.triton_op`: shapes, strides and dtypes decide everything,
outputs are allocated inside, and kernels launch through `torch.library.wrap_triton`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dqcompile.backends.triton import require_kernel_device
from dqcompile.backends.triton.jitutils import as_rows, launcher, round_to
from dqcompile.quant.uniform import MIN_SCALE

__all__ = ["GELU_APPROXIMATIONS", "gelu_quantize", "ln_modulate_quantize", "quantize_act", "quantize_act_static"]

# Round half to even, as torch.round. On the GPU: libdevice's rint. The interpreter has no libdevice, so
# there adding then subtracting 1.5 * 2^23 rounds a float32 of magnitude < 2^22 to the nearest integer,
# ties to even (the rounding of float32 addition); larger magnitudes come out only approximately
# rounded, but keep their sign and size, and those are clamped to the code range anyway.
_ROUND_MAGIC = tl.constexpr(12582912.0)
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_MIN_SCALE = tl.constexpr(MIN_SCALE)
# `_divide_by_group`'s fast division needs an exact FMA remainder, which underflows for dividends below
# about 2^-102; a code can hang on such a dividend's quotient only in a group whose scale is below about
# 2^-101 (a code boundary (k + 1/2) * scale is at least scale / 2). Blocks holding a nonzero group under
# this scale divide with div_rn instead: groups of values below ~1e-27, which real activations never are.
_FAST_DIVISION_MIN_SCALE = tl.constexpr(2.0 ** -96)
# Elements per program for the memory-bound kernels: enough work per program to hide latency with
# few rows (a 1,152-wide row is 1,152 lanes in two segments, so two rows per program).
_TILE_ELEMENTS = 4096
# aten.gelu's constants (ATen/native/cuda/ActivationGeluKernel.cu), as float32.
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_GELU_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2) * 2 / sqrt(pi) * 0.5
_GELU_KAPPA = tl.constexpr(0.044715)
# GELU variant codes of the kernels' PRE_OP: none, exact (erf), tanh approximation.
GELU_APPROXIMATIONS = {"none": 1, "tanh": 2}


@triton.jit
def _round_half_even(v):
    if _INTERPRETED:
        return (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return libdevice.rint(v)


@triton.jit
def _tanh(v):
    if _INTERPRETED:  # 1 - 2 / (e^2v + 1): close enough for the interpreter tests, which allow an ulp
        v = tl.minimum(tl.maximum(v, -20.0), 20.0)  # tanh(+-20) is +-1 in float32; avoids exp overflow
        return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)
    return libdevice.tanh(v)


@triton.jit
def _gelu(x, PRE_OP: tl.constexpr):
    """aten.gelu in float32, operation for operation as its CUDA kernel evaluates it.

    "none": x * 0.5 * (1 + erf(x * sqrt(1/2))). "tanh": 0.5 * x * (1 + tanh(beta * (x + kappa * x^3))),
    where nvcc contracts x + kappa * x^3 into one FMA (its default, -fmad=true), so the kernel does too.
    """
    if PRE_OP == 1:
        return (x * 0.5) * (1.0 + tl.math.erf(x * _SQRT1_2))
    else:
        cube = (x * x) * x
        inner = _GELU_BETA * tl.fma(cube, _GELU_KAPPA, x)
        return (0.5 * x) * (1.0 + _tanh(inner))


@triton.jit
def _segment(G0: tl.constexpr, L0: tl.constexpr, SEG_G: tl.constexpr, SEG_L: tl.constexpr,
             NUM_GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr):
    """Column offsets [1, SEG_G, SEG_L] of a row segment (groups G0.. and lanes L0.. of each group) and the
    mask of those inside the row."""
    offs_g = G0 + tl.arange(0, SEG_G)
    offs_l = L0 + tl.arange(0, SEG_L)
    cols = offs_g[None, :, None] * GROUP_LEN + offs_l[None, None, :]
    in_row = (offs_g < NUM_GROUPS)[None, :, None] & (offs_l < GROUP_LEN)[None, None, :]
    return cols, in_row


@triton.jit
def _group_range(h, valid, SYMMETRIC: tl.constexpr):
    """(lo, hi) [R, G] of float32 h [R, G, L] over its valid lanes, widened to hold 0 (then 0 is exact).
    Symmetric: (0, max |h|)."""
    if SYMMETRIC:
        hi = tl.max(tl.where(valid, tl.abs(h), 0.0), axis=2)
        lo = tl.zeros(hi.shape, dtype=tl.float32)
    else:
        lo = tl.minimum(tl.min(tl.where(valid, h, 0.0), axis=2), 0.0)
        hi = tl.maximum(tl.max(tl.where(valid, h, 0.0), axis=2), 0.0)
    return lo, hi


@triton.jit
def _scale_zero(lo, hi, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """float32 scale and int32 zero point [R, G] of groups whose range `_group_range` gave."""
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    if SYMMETRIC:
        scale = tl.maximum(tl.math.div_rn(hi, tl.full(hi.shape, QMAX, tl.float32)), _MIN_SCALE)
        zero = tl.zeros(scale.shape, dtype=tl.int32)
    else:
        QMIN: tl.constexpr = -(1 << (BITS - 1))
        scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, QMAX - QMIN, tl.float32)), _MIN_SCALE)
        # lo <= 0 <= hi puts round(lo / scale) in [-(2^b - 1), 0], so the zero point is in [QMIN, QMAX].
        zero = (QMIN - _round_half_even(tl.math.div_rn(lo, scale))).to(tl.int32)
    return scale, zero


@triton.jit
def _needs_exact_division(lo, hi, scale):
    """Whether a block of groups [R, G] (range lo..hi, scale) holds a nonzero group whose scale is below
    `_FAST_DIVISION_MIN_SCALE`, where `_divide_by_group` must divide exactly (a scalar)."""
    return tl.max(((hi > lo) & (scale < _FAST_DIVISION_MIN_SCALE)).to(tl.int32)) > 0


@triton.jit
def _divide_by_group(h, scale, exact):
    """h / scale for a divisor shared by a whole group: div_rn's correctly rounded quotient wherever the
    quotient's last bit can change a code.

    div_rn per element refines an approximate reciprocal with an FMA step, multiplies, corrects the
    quotient with two FMAs (remainder h - q * scale, exact in the FMA; then q + remainder * r) and
    checks the operands' range, with a slow path for the extremes. Here the reciprocal is correctly
    rounded once per group, at least as accurate as div_rn's refined one, and each element pays the
    multiply and the two correcting FMAs alone. The range check has nothing to catch: scale >=
    MIN_SCALE, whose reciprocal is finite and normal, and |h / scale| is at most 2^bits. A group holding
    an inf has an infinite scale and a NaN remainder; its first quotient is kept, which is IEEE's h / inf
    (0 for finite h, NaN for inf). Below |h| ~ 2^-102 the remainder underflows and the quotient may be an
    ulp off; that moves no code unless the group's scale is tiny too, and blocks with such a group
    (`exact`, from `_needs_exact_division`) take div_rn. The interpreter, whose FMA rounds twice,
    divides. The CUDA test `test_cuda_quantize_act_division_is_correctly_rounded` checks codes against
    the reference's division on magnitudes from 2^-60 to 2^60, tiny and subnormal groups, exact ties and
    an inf; the DiT-shape tests check 18.9M codes.
    """
    if _INTERPRETED:
        return tl.math.div_rn(h, scale)
    if exact:
        quotient = tl.math.div_rn(h, scale)
    else:
        reciprocal = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        first = h * reciprocal
        remainder = tl.fma(-first, scale, h)
        quotient = tl.where(remainder == remainder, tl.fma(remainder, reciprocal, first), first)
    return quotient


@triton.jit
def _store_segment(q_ptr, scale_ptr, zero_ptr, h_ptr, rows, row_ok, h, cols, valid, scale, zero, exact,
                   G0: tl.constexpr, SEG_G: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr,
                   BITS: tl.constexpr, STORE_H: tl.constexpr):
    """Codes of float32 h [R, G, L] (a row segment) into the contiguous [rows, C] int8 output, and the
    segment's group scales and zero points [R, G] into theirs. `exact`: see `_divide_by_group`.

    Codes are clamped while still float, so the integer conversion never sees an out-of-range value (an
    all-but-zero group divided by MIN_SCALE); padding lanes of h must be finite (their codes are dropped).
    """
    QMIN: tl.constexpr = -(1 << (BITS - 1))
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    codes = _round_half_even(_divide_by_group(h, scale[:, :, None], exact)) + zero[:, :, None].to(tl.float32)
    codes = tl.minimum(tl.maximum(codes, QMIN), QMAX)
    offs = rows[:, None, None] * (NUM_GROUPS * GROUP_LEN) + cols  # rows are int64: offsets may pass 2^31
    tl.store(q_ptr + offs, codes.to(tl.int8), mask=valid)
    if STORE_H:
        tl.store(h_ptr + offs, h, mask=valid)
    groups = G0 + tl.arange(0, SEG_G)
    group_offs = rows[:, None] * NUM_GROUPS + groups[None, :]
    group_ok = row_ok[:, None] & (groups < NUM_GROUPS)[None, :]
    tl.store(scale_ptr + group_offs, scale, mask=group_ok)
    tl.store(zero_ptr + group_offs, zero, mask=group_ok)


@triton.jit
def _quantize_segments(q_ptr, scale_ptr, zero_ptr, h_ptr, rows, row_ok, h_a, cols_a, valid_a, h_b, cols_b, valid_b,
                       A_G: tl.constexpr, B_G0: tl.constexpr, B_G: tl.constexpr, NUM_GROUPS: tl.constexpr,
                       GROUP_LEN: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, STORE_H: tl.constexpr):
    """Quantize a row held in segments A and B (B ignored when B_G is 0; see `_row_segments`) and store its
    codes, scales and zero points. Per token (one group split over both segments) the two share one range."""
    lo_a, hi_a = _group_range(h_a, valid_a, SYMMETRIC)
    if B_G > 0:
        lo_b, hi_b = _group_range(h_b, valid_b, SYMMETRIC)
        if NUM_GROUPS == 1:
            lo_a = tl.minimum(lo_a, lo_b)
            hi_a = tl.maximum(hi_a, hi_b)
            lo_b, hi_b = lo_a, hi_a
        scale_b, zero_b = _scale_zero(lo_b, hi_b, BITS, SYMMETRIC)
        _store_segment(q_ptr, scale_ptr, zero_ptr, h_ptr, rows, row_ok, h_b, cols_b, valid_b, scale_b, zero_b,
                       _needs_exact_division(lo_b, hi_b, scale_b), B_G0, B_G, NUM_GROUPS, GROUP_LEN, BITS, STORE_H)
    scale_a, zero_a = _scale_zero(lo_a, hi_a, BITS, SYMMETRIC)
    _store_segment(q_ptr, scale_ptr, zero_ptr, h_ptr, rows, row_ok, h_a, cols_a, valid_a, scale_a, zero_a,
                   _needs_exact_division(lo_a, hi_a, scale_a), 0, A_G, NUM_GROUPS, GROUP_LEN, BITS, STORE_H)


@triton.jit
def _load_activation(x_ptr, rows, stride_xr, cols, valid, PRE_OP: tl.constexpr):
    """A row segment of x as float32; PRE_OP 1 / 2 apply aten.gelu (approximate "none" / "tanh") in
    float32, rounded to x's dtype first as aten's output is (padding lanes: gelu(0) = 0)."""
    x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * stride_xr + cols, mask=valid, other=0.0)
    if PRE_OP != 0:
        x = round_to(_gelu(x.to(tl.float32), PRE_OP), x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _quantize_act_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, h_ptr,
    R, stride_xr,
    NUM_GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    PRE_OP: tl.constexpr, STORE_H: tl.constexpr, BLOCK_R: tl.constexpr,
    A_G: tl.constexpr, A_L: tl.constexpr, B_G0: tl.constexpr, B_L0: tl.constexpr, B_G: tl.constexpr,
    B_L: tl.constexpr,
):
    """BLOCK_R rows of x [R, NUM_GROUPS * GROUP_LEN] -> codes (contiguous [R, C]), scale / zero [R, G].

    A row is held as two segments, A (A_G x A_L lanes) and B (B_G x B_L from group B_G0, lane B_L0; none
    when B_G is 0), so that a row whose length is not a power of two pads little (see `_row_segments`).
    PRE_OP 0 quantizes x itself; 1 / 2 quantize aten.gelu(x) (see `_load_activation`).
    """
    # int64 rows: a batch of thousands of images at 256 tokens passes 2^31 elements (an illegal address on
    # an H200 with 10,000 images of the benchmark model in int32).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols_a, in_row_a = _segment(0, 0, A_G, A_L, NUM_GROUPS, GROUP_LEN)
    valid_a = row_ok[:, None, None] & in_row_a
    h_a = _load_activation(x_ptr, rows, stride_xr, cols_a, valid_a, PRE_OP)
    if B_G > 0:
        cols_b, in_row_b = _segment(B_G0, B_L0, B_G, B_L, NUM_GROUPS, GROUP_LEN)
        valid_b = row_ok[:, None, None] & in_row_b
        h_b = _load_activation(x_ptr, rows, stride_xr, cols_b, valid_b, PRE_OP)
    else:  # no second segment: _quantize_segments ignores these
        h_b, cols_b, valid_b = h_a, cols_a, valid_a
    _quantize_segments(q_ptr, scale_ptr, zero_ptr, h_ptr, rows, row_ok, h_a, cols_a, valid_a, h_b, cols_b, valid_b,
                       A_G, B_G0, B_G, NUM_GROUPS, GROUP_LEN, BITS, SYMMETRIC, STORE_H)


@triton.jit
def _modulate_segment(x, mean, rstd, cols, in_row, valid, sample, offs_t,
                      ln_weight_ptr, ln_bias_ptr, mod_scale_ptr, mod_shift_ptr,
                      stride_msb, stride_mst, stride_msc, stride_mhb, stride_mht, stride_mhc,
                      HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr, MOD_PER_TOKEN: tl.constexpr):
    """LayerNorm (given the rows' mean and rstd) and h * (1 + scale) + shift of a row segment, float32."""
    h = tl.where(valid, x - mean[:, None, None], 0.0) * rstd[:, None, None]
    if HAS_LN_WEIGHT:
        h = h * tl.load(ln_weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_LN_BIAS:
        h = h + tl.load(ln_bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    # Per-sample modulation (the usual adaLN case) is loaded once per program and broadcast over tokens.
    if MOD_PER_TOKEN:
        mod_scale_offs = sample * stride_msb + offs_t[:, None, None] * stride_mst + cols * stride_msc
        mod_shift_offs = sample * stride_mhb + offs_t[:, None, None] * stride_mht + cols * stride_mhc
        mod_mask = valid
    else:
        mod_scale_offs = sample * stride_msb + cols * stride_msc
        mod_shift_offs = sample * stride_mhb + cols * stride_mhc
        mod_mask = in_row
    mod_scale = tl.load(mod_scale_ptr + mod_scale_offs, mask=mod_mask, other=0.0).to(tl.float32)
    mod_shift = tl.load(mod_shift_ptr + mod_shift_offs, mask=mod_mask, other=0.0).to(tl.float32)
    # Padding lanes stay 0 (a broadcast shift would make them nonzero), as _group_range expects.
    return tl.where(valid, h * (1.0 + mod_scale) + mod_shift, 0.0)


@triton.jit
def _ln_modulate_quantize_kernel(
    x_ptr, ln_weight_ptr, ln_bias_ptr, mod_scale_ptr, mod_shift_ptr,
    q_ptr, scale_ptr, zero_ptr, h_ptr,
    T, eps,
    stride_xb, stride_xt,
    stride_msb, stride_mst, stride_msc,
    stride_mhb, stride_mht, stride_mhc,
    NUM_GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_LN_WEIGHT: tl.constexpr, HAS_LN_BIAS: tl.constexpr, MOD_PER_TOKEN: tl.constexpr,
    STORE_H: tl.constexpr, BLOCK_T: tl.constexpr,
    A_G: tl.constexpr, A_L: tl.constexpr, B_G0: tl.constexpr, B_L0: tl.constexpr, B_G: tl.constexpr,
    B_L: tl.constexpr,
):
    """BLOCK_T tokens of sample b: LayerNorm, h * (1 + scale) + shift, quantize; outputs are [B, T, ...].
    Rows are held in two segments as in `_quantize_act_kernel`."""
    C: tl.constexpr = NUM_GROUPS * GROUP_LEN
    sample = tl.program_id(1).to(tl.int64)  # int64 offsets: B * T * C may pass 2^31
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    rows = sample * T + offs_t
    x_base = x_ptr + sample * stride_xb + offs_t[:, None, None] * stride_xt

    # Two-pass mean / variance from registers: the row is loaded once.
    cols_a, in_row_a = _segment(0, 0, A_G, A_L, NUM_GROUPS, GROUP_LEN)
    valid_a = t_ok[:, None, None] & in_row_a
    x_a = tl.load(x_base + cols_a, mask=valid_a, other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(x_a, axis=2), axis=1)
    if B_G > 0:
        cols_b, in_row_b = _segment(B_G0, B_L0, B_G, B_L, NUM_GROUPS, GROUP_LEN)
        valid_b = t_ok[:, None, None] & in_row_b
        x_b = tl.load(x_base + cols_b, mask=valid_b, other=0.0).to(tl.float32)
        total += tl.sum(tl.sum(x_b, axis=2), axis=1)
    mean = total / C
    centered_a = tl.where(valid_a, x_a - mean[:, None, None], 0.0)
    squares = tl.sum(tl.sum(centered_a * centered_a, axis=2), axis=1)
    if B_G > 0:
        centered_b = tl.where(valid_b, x_b - mean[:, None, None], 0.0)
        squares += tl.sum(tl.sum(centered_b * centered_b, axis=2), axis=1)
    var = squares / C
    # eps to float32 first, as aten's LayerNorm does: Inductor passes a Python float argument that
    # torch.compile did not specialise as a float64 scalar, and float64 would reach sqrt_rn.
    rstd = tl.math.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var + tl.cast(eps, tl.float32)))

    h_a = _modulate_segment(x_a, mean, rstd, cols_a, in_row_a, valid_a, sample, offs_t,
                            ln_weight_ptr, ln_bias_ptr, mod_scale_ptr, mod_shift_ptr,
                            stride_msb, stride_mst, stride_msc, stride_mhb, stride_mht, stride_mhc,
                            HAS_LN_WEIGHT, HAS_LN_BIAS, MOD_PER_TOKEN)
    if B_G > 0:
        h_b = _modulate_segment(x_b, mean, rstd, cols_b, in_row_b, valid_b, sample, offs_t,
                                ln_weight_ptr, ln_bias_ptr, mod_scale_ptr, mod_shift_ptr,
                                stride_msb, stride_mst, stride_msc, stride_mhb, stride_mht, stride_mhc,
                                HAS_LN_WEIGHT, HAS_LN_BIAS, MOD_PER_TOKEN)
    else:  # no second segment: _quantize_segments ignores these
        h_b, cols_b, valid_b = h_a, cols_a, valid_a
    _quantize_segments(q_ptr, scale_ptr, zero_ptr, h_ptr, rows, t_ok, h_a, cols_a, valid_a, h_b, cols_b, valid_b,
                       A_G, B_G0, B_G, NUM_GROUPS, GROUP_LEN, BITS, SYMMETRIC, STORE_H)


@triton.jit
def _quantize_static_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, n_elements, channels, stride_xr,
                            SCALE_PER_ROW: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                            BLOCK: tl.constexpr):
    """q = clamp(round(x / scale) + zero, QMIN, QMAX) over the flattened [rows, channels] x, int64 offsets."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = offs < n_elements
    row = offs // channels
    x = tl.load(x_ptr + row * stride_xr + offs % channels, mask=in_range, other=0.0).to(tl.float32)
    if SCALE_PER_ROW:
        scale = tl.load(scale_ptr + row, mask=in_range, other=1.0)
        zero = tl.load(zero_ptr + row, mask=in_range, other=0).to(tl.float32)
    else:
        scale = tl.load(scale_ptr)
        zero = tl.load(zero_ptr).to(tl.float32)
    codes = _round_half_even(tl.math.div_rn(x, scale)) + zero
    codes = tl.minimum(tl.maximum(codes, QMIN), QMAX)
    tl.store(q_ptr + offs, codes.to(tl.int8), mask=in_range)


def quantize_act_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """`dqcompile::quantize_act_static` on Triton: codes of x with calibrated (scale, zero).

    Args:
        x: [..., C] of any float dtype.
        scale: float32, zero: int32, each broadcastable to [..., 1]: one per tensor, or one per row.
        bits: 2..8; the codes span the full two's-complement range [-2^(bits-1), 2^(bits-1) - 1].

    Returns:
        int8 codes shaped like x, bit for bit the reference's (`reference.quantize_act_static`).
    """
    require_kernel_device(x)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8] for int8 containers, got {bits}")
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if q.numel() == 0:
        return q
    channels = x.shape[-1]
    x2, _, row_stride = as_rows(x)
    per_row = scale.numel() != 1 or zero.numel() != 1
    if per_row:  # one (scale, zero) per row of x2 (a copy of at most one value per row)
        row_shape = (*x.shape[:-1], 1)
        scale = torch.broadcast_to(scale, row_shape).reshape(-1).contiguous()
        zero = torch.broadcast_to(zero, row_shape).reshape(-1).contiguous()
    block = 1024
    launcher(_quantize_static_kernel)[(triton.cdiv(q.numel(), block),)](
        x2, q, scale.float(), zero.to(torch.int32), q.numel(), channels, row_stride,
        SCALE_PER_ROW=per_row, QMIN=-(2 ** (bits - 1)), QMAX=2 ** (bits - 1) - 1, BLOCK=block, num_warps=4,
    )
    return q


def _group_layout(channels: int, group_size: int, bits: int) -> tuple[int, int]:
    """(num_groups, group_len) of the last dim, after validating the arguments."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8] for int8 containers, got {bits}")
    if group_size < 0 or (group_size and channels % group_size):
        raise ValueError(f"group_size {group_size} must be 0 or divide the last dim {channels}")
    group_len = group_size or channels
    return channels // group_len, group_len


def _row_segments(num_groups: int, group_len: int) -> dict[str, int]:
    """The two segments a row is held in (the kernels' A_* and B_* constexprs), each a power-of-two tile.

    One tile padded to the next power of two would waste up to half its lanes, and every lane of the
    fc2 input ([., 4608] padded to 8,192) runs a GELU and a division: on an H200 that kernel took 4.8x
    aten's GELU alone (110 against 23 us at [4096, 4608]; 52.8 us in two segments). Instead A is the largest power of two that fits and B the power of two that covers
    the rest: 4,608 = 4,096 + 512 and 1,152 = 1,024 + 128 exactly. Per token (one group) the split is along
    the lanes and the kernels merge the two segments' ranges; per group it is along the groups, each group
    a power-of-two tile of lanes.
    """
    along, lanes = (group_len, 1) if num_groups == 1 else (num_groups, triton.next_power_of_2(group_len))
    first = 1 << (along.bit_length() - 1)
    rest = along - first
    second = triton.next_power_of_2(rest) if rest else 0
    if num_groups == 1:
        return dict(A_G=1, A_L=first, B_G0=0, B_L0=first, B_G=1 if rest else 0, B_L=second)
    return dict(A_G=first, A_L=lanes, B_G0=first, B_L0=0, B_G=second, B_L=lanes)


def _rows_per_program(segments: dict[str, int]) -> tuple[int, int]:
    """(rows per program, a power of two; num_warps): about _TILE_ELEMENTS elements per program, 4 warps.

    Four warps were the fastest or tied in every case of benchmarks/bench_quantize.py on an H200
    (results/quantize_h200_eccabc2.json: [4096, 4608] plain 22.6 us against 25.3 with 8 warps; GELU + quantize
    43.6 against 43.8; [4096, 1152] 8.3 against 11.2 at one row per program).
    """
    row_elements = segments["A_G"] * segments["A_L"] + segments["B_G"] * segments["B_L"]
    rows = max(1, _TILE_ELEMENTS // row_elements)
    return 1 << (rows.bit_length() - 1), 4


def _quantize_rows(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, pre_op: int,
                   store_h: bool) -> tuple[torch.Tensor, ...]:
    """Launch `_quantize_act_kernel` over the rows of x's last dim; returns (q, scale, zero[, h])."""
    require_kernel_device(x)
    channels = x.shape[-1]
    num_groups, group_len = _group_layout(channels, group_size, bits)
    leading = tuple(x.shape[:-1])
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((*leading, num_groups), dtype=torch.float32, device=x.device)
    zero = torch.empty((*leading, num_groups), dtype=torch.int32, device=x.device)
    h = torch.empty(x.shape, dtype=torch.float32, device=x.device) if store_h else None
    if q.numel() != 0:
        x2, rows, row_stride = as_rows(x)
        segments = _row_segments(num_groups, group_len)
        block_r, num_warps = _rows_per_program(segments)
        launcher(_quantize_act_kernel)[(triton.cdiv(rows, block_r),)](
            x2, q, scale, zero, h if h is not None else q, rows, row_stride,
            NUM_GROUPS=num_groups, GROUP_LEN=group_len, BITS=bits, SYMMETRIC=symmetric,
            PRE_OP=pre_op, STORE_H=store_h, BLOCK_R=block_r, **segments, num_warps=num_warps,
        )
    return (q, scale, zero) + ((h,) if store_h else ())


def quantize_act(x: torch.Tensor, bits: int, group_size: int,
                 symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dqcompile::quantize_act` on Triton: dynamic quantization of the last dim of x.

    Returns (q int8 like x, scale float32 [..., G], zero int32 [..., G]); G = 1 for group_size 0.
    """
    return _quantize_rows(x, bits, group_size, symmetric, 0, False)


def gelu_quantize(x: torch.Tensor, approximate: str, bits: int, group_size: int, symmetric: bool, *,
                  return_activation: bool = False) -> tuple[torch.Tensor, ...]:
    """`quantize_act(aten.gelu(x, approximate=approximate), bits, group_size, symmetric)` in one kernel.

    The GELU runs in float32 with aten's CUDA formula (`_gelu`) and is rounded to x's dtype, as aten's
    output is; the quantization is `quantize_act`'s, bit for bit given that GELU output. On a GPU the GELU
    is aten's operation for operation (libdevice's erf / tanh are the CUDA math library's), so the codes
    are those of the unfused ops; the CUDA tests check that. In the interpreter erf and tanh come from
    numpy / exp, a rounding step away from the CPU's aten.gelu at times.

    Args:
        x: [..., C] of any float dtype (fc1's output).
        approximate: "none" or "tanh", as aten.gelu's argument.
        bits, group_size, symmetric: as in `quantize_act`.
        return_activation: also return the float32 GELU output the codes were made from (tests).

    Returns:
        (q int8 like x, scale float32 [..., G], zero int32 [..., G]), plus the activation on request.
    """
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {sorted(GELU_APPROXIMATIONS)}, got {approximate!r}")
    return _quantize_rows(x, bits, group_size, symmetric, GELU_APPROXIMATIONS[approximate], return_activation)


def _modulation_view(mod: torch.Tensor, shape: torch.Size, name: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[B, C] (per sample) or anything broadcastable to x's [B, T, C]: the tensor and its (b, t, c) strides
    as a [B, T, C] view (stride 0 on T for per-sample modulation).

    The per-sample case, DiT's, is read through strides with no view op (see `jitutils.as_rows` on why).
    """
    if mod.dim() == 2 and tuple(mod.shape) == (shape[0], shape[2]):
        return mod, (mod.stride(0), 0, mod.stride(1))
    if mod.dim() == 2 and mod.shape[0] == shape[0]:
        mod = mod.unsqueeze(1)
    try:
        view = torch.broadcast_to(mod, shape)
    except RuntimeError as error:
        raise ValueError(f"{name} of shape {tuple(mod.shape)} does not broadcast to x {tuple(shape)}") from error
    return view, (view.stride(0), view.stride(1), view.stride(2))


def ln_modulate_quantize(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                         eps: float, scale: torch.Tensor, shift: torch.Tensor, bits: int, group_size: int,
                         symmetric: bool, *, return_normalized: bool = False) -> tuple[torch.Tensor, ...]:
    """quantize_act(LayerNorm(x) * (1 + scale) + shift) in one kernel.

    Args:
        x: [B, T, C] (or [T, C], taken as one sample) of any float dtype.
        ln_weight, ln_bias: [C] or None (diffusers' DiT uses LayerNorm(elementwise_affine=False)).
        eps: LayerNorm epsilon.
        scale, shift: per-sample [B, C], or anything broadcastable to [B, T, C].
        bits, group_size, symmetric: as in `quantize_act`.
        return_normalized: also return the float32 modulated activation h the codes were made from
            (a debugging / testing aid; costs a float32 write).

    Returns:
        (q int8 [..., C], x_scale float32 [..., G], x_zero int32 [..., G]) shaped like x, plus h when
        return_normalized.
    """
    require_kernel_device(x)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C] or [T, C], got {tuple(x.shape)}")
    batch, tokens, channels = x.shape
    num_groups, group_len = _group_layout(channels, group_size, bits)
    for name, param in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if param is not None and param.shape != (channels,):
            raise ValueError(f"{name} must be [{channels}], got {tuple(param.shape)}")
    ln_weight = ln_weight.contiguous() if ln_weight is not None else None
    ln_bias = ln_bias.contiguous() if ln_bias is not None else None
    mod_scale, mod_scale_strides = _modulation_view(scale, x.shape, "scale")
    mod_shift, mod_shift_strides = _modulation_view(shift, x.shape, "shift")
    if x.stride(-1) != 1:
        x = x.contiguous()

    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    x_scale = torch.empty((batch, tokens, num_groups), dtype=torch.float32, device=x.device)
    x_zero = torch.empty((batch, tokens, num_groups), dtype=torch.int32, device=x.device)
    h = torch.empty(x.shape, dtype=torch.float32, device=x.device) if return_normalized else None
    if q.numel() != 0:
        segments = _row_segments(num_groups, group_len)
        block_t, num_warps = _rows_per_program(segments)
        launcher(_ln_modulate_quantize_kernel)[(triton.cdiv(tokens, block_t), batch)](
            x,
            ln_weight if ln_weight is not None else x,
            ln_bias if ln_bias is not None else x,
            mod_scale, mod_shift,
            q, x_scale, x_zero, h if h is not None else q,
            tokens, float(eps),
            x.stride(0), x.stride(1),
            *mod_scale_strides, *mod_shift_strides,
            NUM_GROUPS=num_groups, GROUP_LEN=group_len, BITS=bits, SYMMETRIC=symmetric,
            HAS_LN_WEIGHT=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None,
            MOD_PER_TOKEN=mod_scale_strides[1] != 0 or mod_shift_strides[1] != 0,
            STORE_H=return_normalized, BLOCK_T=block_t, **segments, num_warps=num_warps,
        )
    outputs = (q, x_scale, x_zero) + ((h,) if return_normalized else ())
    if squeeze:
        outputs = tuple(t.squeeze(0) for t in outputs)
    return outputs
