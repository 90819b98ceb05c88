"""Triton integer GEMMs with the numerics of `torch.ops.dqcompile.int_linear` (docs/CONTRACTS.md).

    acc[m, n, g] = sum_{k in group g} qx[m, k] qw[n, k]                       (exact, int32)
    y[m, n]      = sum_g x_scale[m, g] w_scale[n, g] (acc[m, n, g] - x_zero[m, g] wsum[n, g]) + bias[n]

One kernel covers every variant through compile-time flags:
- per output channel (group_size 0): one int32 accumulator over all of K, one float epilogue;
- per group (group_size g, K % g == 0): an int32 accumulator per group, rescaled into a float32
  accumulator at the end of each group (BLOCK_K divides g, so a group never straddles a K block);
- W8A8 / W6A8 (int8 weight containers) or W4A8 (packed uint8 [N, K/2], unpacked to int8 in registers
  right before the dot, so the weight crosses memory at half the bytes);
- symmetric activations (x_zero None: no zero-point term, no weight sums needed) or asymmetric;
- an accumulator-only mode that stores the raw int32 products (`triton_int_matmul`), the exact
  integer path used by tests and by the `int_matmul` op where torch._int_mm refuses the shape.

Hopper choices: int8 tensor-core dots with BLOCK_K = 128 (wgmma consumes K in steps of 32 bytes),
large 128x128 / 128x256 tiles for large M with 3-4 pipeline stages, grouped ("swizzled") program order
so that programs running together share A rows and B columns in L2, and the whole epilogue in registers.

The float epilogue is the reference's, operation for operation: (x_scale * w_scale) * float(acc - x_zero wsum),
groups added in order, then + bias, in float32 without FMA contraction, then one cast; so outputs equal the
reference backend's bit for bit, not only within the output dtype's rounding.
Small M (the adaLN / timestep linears see 16 rows) gets 16-row tiles and narrow N tiles so that enough
programs exist to stream the weight from every SM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
import triton.testing

from dqcompile.backends.triton import require_kernel_device
from dqcompile.quant.packing import unpack_int4

__all__ = [
    "GemmConfig",
    "choose_gemm_config",
    "gemm_candidate_configs",
    "set_autotune",
    "triton_int_linear",
    "triton_int_matmul",
    "weight_group_sums",
]


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# Nominal SM count used when no CUDA device is present (the Triton interpreter): H100 SXM.
_DEFAULT_SM_COUNT = 132
_AUTOTUNE = os.environ.get("DQCOMPILE_TRITON_AUTOTUNE", "0") == "1"
_AUTOTUNE_CACHE: dict[tuple, GemmConfig] = {}


def set_autotune(enabled: bool) -> None:
    """Turn benchmark-based config selection on or off (default: the DQCOMPILE_TRITON_AUTOTUNE env var).

    When on, the first call for a new (M bucket, N, K, variant) times every candidate config with
    triton.testing.do_bench and caches the fastest; when off, `choose_gemm_config` decides at no cost.
    """
    global _AUTOTUNE
    _AUTOTUNE = enabled


@triton.jit
def _load_weight_tile(qw_ptr, offs_n, k_start, K, stride_wn,
                      BLOCK_K: tl.constexpr, W_INT4: tl.constexpr, EVEN_K: tl.constexpr):
    """Load weight columns offs_n, inputs [k_start, k_start + BLOCK_K) as an int8 [BLOCK_K, BLOCK_N] tile.

    The tile is K-major in memory (qw is [N, K]), the operand layout int8 tensor cores require.
    W_INT4: qw is uint8 [N, K/2]; byte j holds column 2j in its low nibble and 2j+1 in its high nibble,
    each 4-bit two's complement; nibbles are sign-extended with shifts and interleaved back in K order.
    """
    if W_INT4:
        offs_kp = k_start // 2 + tl.arange(0, BLOCK_K // 2)
        ptrs = qw_ptr + offs_n[:, None] * stride_wn + offs_kp[None, :]
        if EVEN_K:
            packed = tl.load(ptrs)
        else:
            packed = tl.load(ptrs, mask=(offs_kp * 2 < K)[None, :], other=0)
        # Shift the low nibble to the top of the byte, then arithmetic-shift back: sign extension.
        low = ((packed << 4).to(tl.uint8).to(tl.int8, bitcast=True) >> 4).to(tl.int8)
        high = (packed.to(tl.int8, bitcast=True) >> 4).to(tl.int8)
        return tl.trans(tl.interleave(low, high))
    else:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        ptrs = qw_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]
        if EVEN_K:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(offs_k < K)[:, None], other=0)


@triton.jit
def _load_act_tile(qx_ptr, offs_m, k_start, K, stride_xm, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Load activation rows offs_m, inputs [k_start, k_start + BLOCK_K) as an int8 [BLOCK_M, BLOCK_K] tile."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    ptrs = qx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    if EVEN_K:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs_k < K)[None, :], other=0)


@triton.jit
def _int_linear_kernel(
    qx_ptr, qw_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    stride_xs_m, stride_xs_g, stride_xz_m, stride_xz_g, stride_ws_n, stride_ws_g, stride_wsum_n,
    GROUP_SIZE: tl.constexpr,
    W_INT4: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_ONLY: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile; see the module docstring for the math."""
    # Grouped program order: GROUP_M row-tiles advance together across N so their A rows stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows / columns read a valid row instead (wrap-around) so the hot loop needs no
    # M / N masks; their results are dropped by the masked store.
    rows = offs_m % M
    cols = offs_n % N

    if GROUP_SIZE == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k_start in range(0, K, BLOCK_K):
            a = _load_act_tile(qx_ptr, rows, k_start, K, stride_xm, BLOCK_K, EVEN_K)
            b = _load_weight_tile(qw_ptr, cols, k_start, K, stride_wn, BLOCK_K, W_INT4, EVEN_K)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if ACC_ONLY:
            result = acc
        else:
            if HAS_ZERO:
                x_zero = tl.load(x_zero_ptr + rows * stride_xz_m)
                w_sum = tl.load(w_sum_ptr + cols * stride_wsum_n)
                acc = acc - x_zero[:, None] * w_sum[None, :]
            x_scale = tl.load(x_scale_ptr + rows * stride_xs_m)
            w_scale = tl.load(w_scale_ptr + cols * stride_ws_n)
            result = (x_scale[:, None] * w_scale[None, :]) * acc.to(tl.float32)
    else:
        result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for group in range(0, K // GROUP_SIZE):
            group_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            # Unrolled: each group is a fixed number of K blocks (BLOCK_K divides GROUP_SIZE).
            for step in tl.static_range(GROUP_SIZE // BLOCK_K):
                k_start = group * GROUP_SIZE + step * BLOCK_K
                a = _load_act_tile(qx_ptr, rows, k_start, K, stride_xm, BLOCK_K, True)
                b = _load_weight_tile(qw_ptr, cols, k_start, K, stride_wn, BLOCK_K, W_INT4, True)
                group_acc = tl.dot(a, b, group_acc, out_dtype=tl.int32)
            if HAS_ZERO:
                x_zero = tl.load(x_zero_ptr + rows * stride_xz_m + group * stride_xz_g)
                w_sum = tl.load(w_sum_ptr + cols * stride_wsum_n + group)
                group_acc = group_acc - x_zero[:, None] * w_sum[None, :]
            x_scale = tl.load(x_scale_ptr + rows * stride_xs_m + group * stride_xs_g)
            w_scale = tl.load(w_scale_ptr + cols * stride_ws_n + group * stride_ws_g)
            result += (x_scale[:, None] * w_scale[None, :]) * group_acc.to(tl.float32)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols).to(tl.float32)
        result = result + bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SM_COUNT


def _block_k_for(group_size: int) -> int:
    """The K block: 128 for int8 on Hopper, or the largest of 128 / 64 / 32 / 16 that divides the group."""
    if group_size == 0:
        return 128
    for block_k in (128, 64, 32, 16):
        if group_size % block_k == 0:
            return block_k
    raise ValueError(f"group_size must be a multiple of 16 for the Triton kernels, got {group_size}")


def gemm_candidate_configs(m: int, group_size: int) -> list[GemmConfig]:
    """Configs worth trying for M rows, in order of preference (the autotuner times all of them)."""
    block_k = _block_k_for(group_size)
    if m <= 16:
        return [GemmConfig(16, 32, block_k, 1, 4, 4), GemmConfig(16, 64, block_k, 1, 4, 4),
                GemmConfig(16, 128, block_k, 1, 4, 3)]
    if m <= 64:
        return [GemmConfig(64, 64, block_k, 8, 4, 4), GemmConfig(64, 128, block_k, 8, 4, 4)]
    if m <= 256:
        return [GemmConfig(128, 128, block_k, 8, 8, 4), GemmConfig(64, 128, block_k, 8, 4, 4)]
    return [GemmConfig(128, 256, block_k, 8, 8, 3), GemmConfig(128, 128, block_k, 8, 8, 4),
            GemmConfig(128, 128, block_k, 8, 4, 4)]


def choose_gemm_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> GemmConfig:
    """Fixed heuristic: the first candidate whose tile count fills the SMs in whole-enough waves.

    A wave is one program per SM; a last wave that is mostly empty wastes the machine (e.g. 160 tiles
    of 128x256 on 132 SMs run as two waves, the second 21% full), so a smaller tile that splits the
    work into fuller waves wins. Small M instead wants at least one program per SM to stream weights.
    """
    sm_count = _sm_count(device)
    candidates = gemm_candidate_configs(m, group_size)
    best, best_efficiency = candidates[0], -1.0
    for config in candidates:
        tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
        waves = triton.cdiv(tiles, sm_count)
        efficiency = tiles / (waves * sm_count) if waves > 1 else min(1.0, tiles / sm_count)
        if efficiency >= 0.8:
            return config
        if efficiency > best_efficiency:
            best, best_efficiency = config, efficiency
    return best


def weight_group_sums(qw: torch.Tensor, w_bits: int, group_size: int) -> torch.Tensor:
    """wsum[n, g] = sum of the weight codes of output n in input group g, int32 [N, G].

    Needed only for asymmetric activations (the x_zero * wsum term). Depends on the weight alone,
    so a caller with a fixed weight computes it once and passes it as `w_sum`.
    """
    codes = unpack_int4(qw) if w_bits == 4 else qw
    n, k = codes.shape
    groups = 1 if group_size == 0 else k // group_size
    return codes.reshape(n, groups, -1).sum(dim=-1, dtype=torch.int32)


def _launch(qx: torch.Tensor, qw: torch.Tensor, x_scale: torch.Tensor | None, x_zero: torch.Tensor | None,
            w_scale: torch.Tensor | None, w_sum: torch.Tensor | None, bias: torch.Tensor | None,
            out: torch.Tensor, k: int, w_int4: bool, group_size: int, acc_only: bool,
            config: GemmConfig) -> None:
    """Launch the kernel on 2-D operands; scale / zero tensors are [M, G] / [N, G] (any strides)."""
    m, n = out.shape
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    # Unused pointer arguments get a live tensor so the signature stays fixed; the flags skip them.
    placeholder = out
    x_scale_arg = x_scale if x_scale is not None else placeholder
    x_zero_arg = x_zero if x_zero is not None else placeholder
    w_scale_arg = w_scale if w_scale is not None else placeholder
    _int_linear_kernel[grid](
        qx, qw, x_scale_arg, x_zero_arg, w_scale_arg,
        w_sum if w_sum is not None else placeholder,
        bias if bias is not None else placeholder, out,
        m, n, k,
        qx.stride(0), qw.stride(0), out.stride(0),
        x_scale_arg.stride(0), x_scale_arg.stride(1) if x_scale is not None else 0,
        x_zero_arg.stride(0), x_zero_arg.stride(1) if x_zero is not None else 0,
        w_scale_arg.stride(0), w_scale_arg.stride(1) if w_scale is not None else 0,
        w_sum.stride(0) if w_sum is not None else 0,
        GROUP_SIZE=group_size,
        W_INT4=w_int4,
        HAS_ZERO=x_zero is not None,
        HAS_BIAS=bias is not None,
        ACC_ONLY=acc_only,
        EVEN_K=k % config.block_k == 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        # No FMA contraction: the epilogue then performs the reference's float32 operations in the
        # reference's order, and the outputs are bit-identical to it (the dots are integer anyway).
        enable_fp_fusion=False,
    )


def _pick_config(key: tuple, m: int, n: int, k: int, group_size: int, device: torch.device,
                 launch: Callable[[GemmConfig], None]) -> GemmConfig:
    """The heuristic config, or with autotuning on the fastest candidate (timed once per key)."""
    if not _AUTOTUNE or device.type != "cuda":
        return choose_gemm_config(m, n, k, group_size, device)
    if key not in _AUTOTUNE_CACHE:
        timings = {config: triton.testing.do_bench(lambda c=config: launch(c), warmup=5, rep=20)
                   for config in gemm_candidate_configs(m, group_size)}
        _AUTOTUNE_CACHE[key] = min(timings, key=timings.get)
    return _AUTOTUNE_CACHE[key]


def _as_rows(t: torch.Tensor, leading: tuple[int, ...], groups: int) -> torch.Tensor:
    """Broadcast a per-row tensor ([..., G], [..., 1], [1] or scalar) to [M, G] without copying when possible."""
    return torch.broadcast_to(t, (*leading, groups)).reshape(-1, groups)


def triton_int_linear(qx: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor | None,
                      qw: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      w_bits: int, group_size: int, out_dtype: torch.dtype, *,
                      w_sum: torch.Tensor | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """`dqcompile::int_linear` on Triton: y[..., N] from int8 qx[..., K] and an int8 / packed-int4 weight.

    Args:
        qx: int8 [..., K] activation codes (leading dims are flattened to M rows).
        x_scale: float32, broadcastable to [..., G]; G = 1 (group_size 0) or K / group_size.
        x_zero: int32, broadcastable to [..., G]; None for symmetric activations (skips the zero term).
        qw: int8 [N, K] (w_bits 6 or 8) or packed uint8 [N, K/2] (w_bits 4).
        w_scale: float32 [N, G] (or [N] when G = 1).
        bias: [N] of any float dtype, or None.
        w_bits: 4, 6 or 8.
        group_size: 0 (per output channel) or the group length, a multiple of 16 dividing K.
        out_dtype: torch.bfloat16, torch.float16 or torch.float32.
        w_sum: optional precomputed `weight_group_sums(qw, w_bits, group_size)`; computed here if
            x_zero is given and w_sum is not.
        config: force a tile config (tests); default heuristic or autotuned.
    """
    require_kernel_device(qx, qw)
    if qx.dtype != torch.int8:
        raise TypeError(f"qx must be int8, got {qx.dtype}")
    w_int4 = w_bits == 4
    if w_bits not in (4, 6, 8):
        raise ValueError(f"w_bits must be 4, 6 or 8, got {w_bits}")
    expected_w_dtype = torch.uint8 if w_int4 else torch.int8
    if qw.dtype != expected_w_dtype or qw.dim() != 2:
        raise TypeError(f"qw must be 2-D {expected_w_dtype} for w_bits={w_bits}, got {qw.dtype} {tuple(qw.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    k = qx.shape[-1]
    n = qw.shape[0]
    if qw.shape[1] * (2 if w_int4 else 1) != k:
        raise ValueError(f"qw {tuple(qw.shape)} does not match K={k} for w_bits={w_bits}")
    if group_size != 0 and (k % group_size != 0):
        raise ValueError(f"group_size {group_size} does not divide K={k}")
    groups = 1 if group_size == 0 else k // group_size
    leading = tuple(qx.shape[:-1])
    out = torch.empty((*leading, n), dtype=out_dtype, device=qx.device)
    if out.numel() == 0:
        return out
    if groups == 1:
        group_size = 0  # one group spanning K is the per-channel path

    qx2 = qx.reshape(-1, k)
    if qx2.stride(-1) != 1:
        qx2 = qx2.contiguous()
    qw = qw if qw.stride(-1) == 1 else qw.contiguous()
    m = qx2.shape[0]
    xs = _as_rows(x_scale.float(), leading, groups)
    xz = _as_rows(x_zero.to(torch.int32), leading, groups) if x_zero is not None else None
    ws = w_scale.float().reshape(n, groups)
    if xz is not None and w_sum is None:
        w_sum = weight_group_sums(qw, w_bits, group_size)
    if w_sum is not None:
        w_sum = w_sum.to(torch.int32).reshape(n, groups).contiguous()
    bias = bias.contiguous() if bias is not None else None
    out2 = out.view(m, n)

    def launch(c: GemmConfig) -> None:
        _launch(qx2, qw, xs, xz, ws, w_sum, bias, out2, k, w_int4, group_size, False, c)

    if config is None:
        key = (triton.next_power_of_2(m), n, k, group_size, w_int4, xz is not None, bias is not None,
               out_dtype, qx.device)
        config = _pick_config(key, m, n, k, group_size, qx.device, launch)
    if group_size != 0 and group_size % config.block_k != 0:
        raise ValueError(f"config.block_k={config.block_k} must divide group_size={group_size}")
    launch(config)
    return out


def triton_int_matmul(a: torch.Tensor, b: torch.Tensor, *, w_bits: int = 8,
                      config: GemmConfig | None = None) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [N, K] -> int32 [M, N] (b packed uint8 [N, K/2] when w_bits is 4).

    The `int_matmul` op for shapes torch._int_mm refuses (M <= 16), and the raw-accumulator debug path
    of the GEMM kernel: the same main loop as `triton_int_linear`, no epilogue.
    """
    require_kernel_device(a, b)
    if a.dtype != torch.int8 or a.dim() != 2:
        raise TypeError(f"a must be 2-D int8, got {a.dtype} {tuple(a.shape)}")
    w_int4 = w_bits == 4
    k = a.shape[1]
    if b.shape[1] * (2 if w_int4 else 1) != k:
        raise ValueError(f"b {tuple(b.shape)} does not match K={k} for w_bits={w_bits}")
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    if out.numel() == 0:
        return out
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    config = config or choose_gemm_config(a.shape[0], b.shape[0], k, 0, a.device)
    _launch(a, b, None, None, None, None, None, out, k, w_int4, 0, True, config)
    return out
