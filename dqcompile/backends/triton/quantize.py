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

Divisions are correctly rounded (div_rn; plain `/` is approximate on NVIDIA GPUs) and round() is
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

Tiles are 3-D [rows, groups, group length], padded to powers of two and masked, so one layout serves
per-token (one group of length C) and per-group quantization, and any C (1152 is not a power of two).

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
from dqcompile.backends.triton.jitutils import launcher, round_to
from dqcompile.quant.uniform import MIN_SCALE

__all__ = ["GELU_APPROXIMATIONS", "gelu_quantize", "ln_modulate_quantize", "quantize_act"]

# Round half to even, as torch.round. On the GPU: libdevice's rint. The interpreter has no libdevice, so
# there adding then subtracting 1.5 * 2^23 rounds a float32 of magnitude < 2^22 to the nearest integer,
# ties to even (the rounding of float32 addition); larger magnitudes come out only approximately
# rounded, but keep their sign and size, and those are clamped to the code range anyway.
_ROUND_MAGIC = tl.constexpr(12582912.0)
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_MIN_SCALE = tl.constexpr(MIN_SCALE)
# Elements per program for the memory-bound kernels: enough work per program to hide latency with
# few rows (C = 1152 pads to 2048, so two rows per program).
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
def _quantize_groups(h, valid, BITS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Quantize float32 h [R, G, L] group-wise along the last axis (padding masked out by `valid`).

    Codes are clamped while still float, so the int conversion never sees an out-of-range value (an
    all-but-zero group divided by MIN_SCALE); padding lanes of h must be finite (the caller drops them).

    Returns (int32 codes [R, G, L], float32 scale [R, G], int32 zero [R, G]).
    """
    if SYMMETRIC:
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        amax = tl.max(tl.where(valid, tl.abs(h), 0.0), axis=2)
        scale = tl.maximum(tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), _MIN_SCALE)
        codes = _round_half_even(tl.math.div_rn(h, scale[:, :, None]))
        codes = tl.minimum(tl.maximum(codes, -QMAX), QMAX).to(tl.int32)
        zero = tl.zeros(scale.shape, dtype=tl.int32)
    else:
        QMIN: tl.constexpr = -(1 << (BITS - 1))
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        # The range always holds 0 (then 0 is exact); padding lanes, set to 0, cannot widen it.
        lo = tl.minimum(tl.min(tl.where(valid, h, 0.0), axis=2), 0.0)
        hi = tl.maximum(tl.max(tl.where(valid, h, 0.0), axis=2), 0.0)
        levels = tl.full(lo.shape, QMAX - QMIN, tl.float32)
        scale = tl.maximum(tl.math.div_rn(hi - lo, levels), _MIN_SCALE)
        # lo <= 0 <= hi puts round(lo / scale) in [-(2^b - 1), 0], so the zero point is in [QMIN, QMAX].
        zero = QMIN - _round_half_even(tl.math.div_rn(lo, scale))
        codes = _round_half_even(tl.math.div_rn(h, scale[:, :, None])) + zero[:, :, None]
        codes = tl.minimum(tl.maximum(codes, QMIN), QMAX).to(tl.int32)
        zero = zero.to(tl.int32)
    return codes, scale, zero


@triton.jit
def _quantize_act_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, h_ptr,
    R, stride_xr,
    NUM_GROUPS: tl.constexpr, GROUP_LEN: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    PRE_OP: tl.constexpr, STORE_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """BLOCK_R rows of x [R, NUM_GROUPS * GROUP_LEN] -> codes (contiguous [R, C]), scale / zero [R, G].

    PRE_OP 0 quantizes x itself; 1 / 2 quantize aten.gelu(x) (approximate "none" / "tanh"), computed in
    float32 and rounded to x's dtype first, as aten's output is.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_g = tl.arange(0, BLOCK_G)
    offs_l = tl.arange(0, BLOCK_L)
    cols = offs_g[None, :, None] * GROUP_LEN + offs_l[None, None, :]
    valid = ((offs_r < R)[:, None, None] & (offs_g < NUM_GROUPS)[None, :, None]
             & (offs_l < GROUP_LEN)[None, None, :])
    x = tl.load(x_ptr + offs_r[:, None, None] * stride_xr + cols, mask=valid, other=0.0)
    if PRE_OP != 0:
        x = round_to(_gelu(x.to(tl.float32), PRE_OP), x_ptr.dtype.element_ty)  # padding lanes: gelu(0) = 0
    x = x.to(tl.float32)
    codes, scale, zero = _quantize_groups(x, valid, BITS, SYMMETRIC)
    row_offs = offs_r[:, None, None] * (NUM_GROUPS * GROUP_LEN) + cols
    tl.store(q_ptr + row_offs, codes.to(tl.int8), mask=valid)
    if STORE_H:
        tl.store(h_ptr + row_offs, x, mask=valid)
    group_offs = offs_r[:, None] * NUM_GROUPS + offs_g[None, :]
    group_valid = (offs_r < R)[:, None] & (offs_g < NUM_GROUPS)[None, :]
    tl.store(scale_ptr + group_offs, scale, mask=group_valid)
    tl.store(zero_ptr + group_offs, zero, mask=group_valid)


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
    STORE_H: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """BLOCK_T tokens of sample b: LayerNorm, h * (1 + scale) + shift, quantize; outputs are [B, T, ...]."""
    C: tl.constexpr = NUM_GROUPS * GROUP_LEN
    sample = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, BLOCK_G)
    offs_l = tl.arange(0, BLOCK_L)
    cols = offs_g[None, :, None] * GROUP_LEN + offs_l[None, None, :]
    col_valid = (offs_g < NUM_GROUPS)[None, :, None] & (offs_l < GROUP_LEN)[None, None, :]
    valid = (offs_t < T)[:, None, None] & col_valid

    x = tl.load(x_ptr + sample * stride_xb + offs_t[:, None, None] * stride_xt + cols,
                mask=valid, other=0.0).to(tl.float32)
    # Two-pass mean / variance from registers: the row is loaded once.
    mean = tl.sum(tl.sum(x, axis=2), axis=1) / C
    centered = tl.where(valid, x - mean[:, None, None], 0.0)
    var = tl.sum(tl.sum(centered * centered, axis=2), axis=1) / C
    # eps to float32 first, as aten's LayerNorm does: Inductor passes a Python float argument that
    # torch.compile did not specialise as a float64 scalar, and float64 would reach sqrt_rn.
    rstd = tl.math.div_rn(tl.full(var.shape, 1.0, tl.float32), tl.sqrt_rn(var + tl.cast(eps, tl.float32)))
    h = centered * rstd[:, None, None]
    if HAS_LN_WEIGHT:
        h = h * tl.load(ln_weight_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    if HAS_LN_BIAS:
        h = h + tl.load(ln_bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)

    # Per-sample modulation (the usual adaLN case) is loaded once per program and broadcast over tokens.
    if MOD_PER_TOKEN:
        mod_scale_offs = sample * stride_msb + offs_t[:, None, None] * stride_mst + cols * stride_msc
        mod_shift_offs = sample * stride_mhb + offs_t[:, None, None] * stride_mht + cols * stride_mhc
        mod_mask = valid
    else:
        mod_scale_offs = sample * stride_msb + cols * stride_msc
        mod_shift_offs = sample * stride_mhb + cols * stride_mhc
        mod_mask = col_valid
    mod_scale = tl.load(mod_scale_ptr + mod_scale_offs, mask=mod_mask, other=0.0).to(tl.float32)
    mod_shift = tl.load(mod_shift_ptr + mod_shift_offs, mask=mod_mask, other=0.0).to(tl.float32)
    # Padding lanes stay 0 (a broadcast shift would make them nonzero), as _quantize_groups expects.
    h = tl.where(valid, h * (1.0 + mod_scale) + mod_shift, 0.0)

    codes, scale, zero = _quantize_groups(h, valid, BITS, SYMMETRIC)
    row_offs = (sample * T + offs_t)[:, None, None] * C + cols
    tl.store(q_ptr + row_offs, codes.to(tl.int8), mask=valid)
    if STORE_H:
        tl.store(h_ptr + row_offs, h, mask=valid)
    group_offs = (sample * T + offs_t)[:, None] * NUM_GROUPS + offs_g[None, :]
    group_valid = (offs_t < T)[:, None] & (offs_g < NUM_GROUPS)[None, :]
    tl.store(scale_ptr + group_offs, scale, mask=group_valid)
    tl.store(zero_ptr + group_offs, zero, mask=group_valid)


def _group_layout(channels: int, group_size: int, bits: int) -> tuple[int, int, int, int]:
    """(num_groups, group_len, BLOCK_G, BLOCK_L) for the last dim, after validating the arguments."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8] for int8 containers, got {bits}")
    if group_size < 0 or (group_size and channels % group_size):
        raise ValueError(f"group_size {group_size} must be 0 or divide the last dim {channels}")
    group_len = group_size or channels
    num_groups = channels // group_len
    return num_groups, group_len, triton.next_power_of_2(num_groups), triton.next_power_of_2(group_len)


def _rows_per_program(block_g: int, block_l: int) -> tuple[int, int]:
    """(rows per program, num_warps): about _TILE_ELEMENTS elements per program."""
    row_elements = block_g * block_l
    rows = max(1, _TILE_ELEMENTS // row_elements)
    return rows, 8 if rows * row_elements >= 4096 else 4


def _quantize_rows(x: torch.Tensor, bits: int, group_size: int, symmetric: bool, pre_op: int,
                   store_h: bool) -> tuple[torch.Tensor, ...]:
    """Launch `_quantize_act_kernel` over the rows of x's last dim; returns (q, scale, zero[, h])."""
    require_kernel_device(x)
    channels = x.shape[-1]
    num_groups, group_len, block_g, block_l = _group_layout(channels, group_size, bits)
    leading = tuple(x.shape[:-1])
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty((*leading, num_groups), dtype=torch.float32, device=x.device)
    zero = torch.empty((*leading, num_groups), dtype=torch.int32, device=x.device)
    h = torch.empty(x.shape, dtype=torch.float32, device=x.device) if store_h else None
    if q.numel() != 0:
        x2 = x.reshape(-1, channels)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        block_r, num_warps = _rows_per_program(block_g, block_l)
        launcher(_quantize_act_kernel)[(triton.cdiv(rows, block_r),)](
            x2, q, scale, zero, h if h is not None else q, rows, x2.stride(0),
            NUM_GROUPS=num_groups, GROUP_LEN=group_len, BITS=bits, SYMMETRIC=symmetric,
            PRE_OP=pre_op, STORE_H=store_h,
            BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_L=block_l, num_warps=num_warps,
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


def _modulation_view(mod: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """[B, C] (per sample) or anything broadcastable to x's [B, T, C], as a [B, T, C] view (stride 0 on T)."""
    if mod.dim() == 2 and mod.shape[0] == shape[0]:
        mod = mod.unsqueeze(1)
    try:
        return torch.broadcast_to(mod, shape)
    except RuntimeError as error:
        raise ValueError(f"{name} of shape {tuple(mod.shape)} does not broadcast to x {tuple(shape)}") from error


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
    num_groups, group_len, block_g, block_l = _group_layout(channels, group_size, bits)
    for name, param in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if param is not None and param.shape != (channels,):
            raise ValueError(f"{name} must be [{channels}], got {tuple(param.shape)}")
    ln_weight = ln_weight.contiguous() if ln_weight is not None else None
    ln_bias = ln_bias.contiguous() if ln_bias is not None else None
    mod_scale = _modulation_view(scale, x.shape, "scale")
    mod_shift = _modulation_view(shift, x.shape, "shift")
    if x.stride(-1) != 1:
        x = x.contiguous()

    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    x_scale = torch.empty((batch, tokens, num_groups), dtype=torch.float32, device=x.device)
    x_zero = torch.empty((batch, tokens, num_groups), dtype=torch.int32, device=x.device)
    h = torch.empty(x.shape, dtype=torch.float32, device=x.device) if return_normalized else None
    if q.numel() != 0:
        block_t, num_warps = _rows_per_program(block_g, block_l)
        launcher(_ln_modulate_quantize_kernel)[(triton.cdiv(tokens, block_t), batch)](
            x,
            ln_weight if ln_weight is not None else x,
            ln_bias if ln_bias is not None else x,
            mod_scale, mod_shift,
            q, x_scale, x_zero, h if h is not None else q,
            tokens, float(eps),
            x.stride(0), x.stride(1),
            *mod_scale.stride(), *mod_shift.stride(),
            NUM_GROUPS=num_groups, GROUP_LEN=group_len, BITS=bits, SYMMETRIC=symmetric,
            HAS_LN_WEIGHT=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None,
            MOD_PER_TOKEN=mod_scale.stride(1) != 0 or mod_shift.stride(1) != 0,
            STORE_H=return_normalized,
            BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_L=block_l, num_warps=num_warps,
        )
    outputs = (q, x_scale, x_zero) + ((h,) if return_normalized else ())
    if squeeze:
        outputs = tuple(t.squeeze(0) for t in outputs)
    return outputs
