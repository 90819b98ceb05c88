"""Triton integer GEMMs with the numerics of `torch.ops.dqcompile.int_linear` (docs/CONTRACTS.md).

    acc[m, n, g] = sum_{k in group g} qx[m, k] qw[n, k]                       (exact, int32)
    y[m, n]      = sum_g x_scale[m, g] w_scale[n, g] (acc[m, n, g] - x_zero[m, g] wsum[n, g]) + bias[n]

One persistent kernel covers every variant through compile-time flags:
- a persistent grid: one program per SM (or fewer when there are fewer tiles), output tiles strided over
  the programs in grouped ("swizzled") order, so that programs running together share activation rows
  and weight columns in L2; the tile loop is flattened into the K loop (`tl.range(flatten=True)`), so
  the software pipeline keeps loading the next tile's operands while the current tile's epilogue runs;
- operands through TMA (tensor descriptors built in the kernel, `tl.make_tensor_descriptor`) on Hopper
  and later, or through pointer loads (the Triton interpreter, older GPUs, operands TMA cannot address);
- per output channel (group_size 0): one int32 accumulator over all of K, one float epilogue; or per
  group (group_size g): an int32 accumulator per group, rescaled into a float32 accumulator at the end of
  each group (a K block never straddles two groups);
- W8A8 / W6A8 (int8 weight containers, K-major [N, K]) or W4A8 (packed uint8 [N, K/2] in the chunked
  layout of dqcompile/quant/packing.py: byte i of a 128-column chunk holds column i low and 64 + i high,
  so a 128-column K step loads 64 bytes per weight row, sign-extends `(b << 4) >> 4` and `b >> 4`, and
  does two dots against the two 64-column halves of the activation tile; the weight crosses memory at
  half the bytes and is unpacked in registers, with no interleave; from `W4_UNPACK_ROWS` rows on the
  launcher unpacks the weight to int8 codes first and runs the int8 path);
- optionally swapped operands (SWAP_AB): the tile computes out^T = W X^T, so the weight is the dot's
  first operand. Int8 tensor cores take the first operand from registers and the second from shared
  memory; swapping lets the unpacked int4 weight feed the tensor cores straight from registers, and
  lets a few activation rows (the adaLN / timestep linears, M = 16..64) sit in the narrow dimension of
  the instruction (16 wide) instead of the 64-row one;
- symmetric activations (x_zero None: no zero-point term, no weight sums needed) or asymmetric (the
  precomputed weight code sums `w_sum` enter the epilogue);
- an accumulator-only mode that stores the raw int32 products (`triton_int_matmul`).

The float epilogue is the reference's, operation for operation: (x_scale * w_scale) * float(acc - x_zero wsum),
groups added in order, then + bias, in float32, each product and sum rounded on its own (libdevice's
mul_rn / add_rn, which the compiler never contracts into an FMA), then one cast: outputs equal the
reference backend's bit for bit, not only within the output dtype's rounding.

Launchers are traceable by `torch.library.triton_op`: they look at shapes, strides and dtypes only (no
`.item()`, no data-dependent branch), allocate their outputs with torch.empty, decide the tile config
from static shapes, and launch through `torch.library.wrap_triton`, so that Inductor's generated code
launches the kernel with no Python body per call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dqcompile.backends.triton import GEMM_GROUP_MULTIPLE, require_kernel_device
from dqcompile.backends.triton.jitutils import INTERPRETING, add_rn, as_rows, launcher, mul_rn, round_to
from dqcompile.quant.packing import CHUNK, unpack_int4

__all__ = [
    "GemmConfig",
    "choose_gemm_config",
    "gemm_candidate_configs",
    "set_autotune",
    "triton_int_linear",
    "triton_int_matmul",
    "weight_group_sums",
]

# Nominal SM count used when no CUDA device is present (the Triton interpreter): H100 / H200 SXM.
_DEFAULT_SM_COUNT = 132
# Columns per K step of the int4 per-channel path: one packed chunk (64 bytes of a weight row).
_INT4_CHUNK = tl.constexpr(CHUNK)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one GEMM launch.

    block_k is the K step of int8 weights; packed int4 weights step by one 128-column chunk per
    channel-wise K step (two 64-column dots), or by 64 columns in grouped mode, whatever block_k says.
    tma: None chooses TMA wherever the device and the operands allow it; True / False force it (True on
    operands TMA cannot address raises). num_programs: the persistent grid's size; 0 means ctas_per_sm
    programs per SM (2: two programs share each SM, one's epilogue and MMA waits overlapping the other's
    main loop, which is what int8 needs from Triton, see `_MEASURED`).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    tma: bool | None = None
    flatten: bool = True
    warp_specialize: bool = False
    num_programs: int = 0
    ctas_per_sm: int = 1

    def label(self) -> str:
        flags = "".join(f for f, on in (("S", self.swap_ab), ("W", self.warp_specialize), ("F", self.flatten)) if on)
        tma = {None: "", True: "T", False: "P"}[self.tma]
        return (f"{self.block_m}x{self.block_n}x{self.block_k}g{self.group_m}w{self.num_warps}s{self.num_stages}"
                f"{flags}{tma}" + (f"p{self.num_programs}" if self.num_programs else "")
                + (f"c{self.ctas_per_sm}" if self.ctas_per_sm != 1 else ""))


def set_autotune(enabled: bool) -> None:
    """Kept for old callers: tile configs now come from `choose_gemm_config`'s table, measured per shape
    with `benchmarks/bench_gemm.py --sweep` (a launcher that benchmarks at call time cannot be traced)."""
    del enabled


# ------------------------------------------------------------------------------------------ the kernel

@triton.jit
def _along_m(v, SWAP_AB: tl.constexpr):
    """A per-row vector (length BLOCK_M) broadcast against the accumulator tile."""
    if SWAP_AB:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _along_n(v, SWAP_AB: tl.constexpr):
    """A per-column vector (length BLOCK_N) broadcast against the accumulator tile."""
    if SWAP_AB:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr, SWAP_AB: tl.constexpr):
    """An accumulator tile: [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] with SWAP_AB."""
    if SWAP_AB:
        return tl.zeros((BLOCK_N, BLOCK_M), dtype=dtype)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=dtype)


@triton.jit
def _dot(x, w, acc, SWAP_AB: tl.constexpr):
    """acc + x w^T ([BM, BN]), or with SWAP_AB acc + w x^T ([BN, BM]); x [BM, k], w [BN, k] int8."""
    if SWAP_AB:
        return tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
    else:
        return tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)


@triton.jit
def _load_x(x_desc, qx_ptr, rows, m0, k0, K, stride_xm,
            WIDTH: tl.constexpr, USE_TMA: tl.constexpr, MASK_K: tl.constexpr):
    """Activation codes: rows m0.. (`rows`, already wrapped into [0, M)), columns [k0, k0 + WIDTH)."""
    if USE_TMA:
        return x_desc.load([m0, k0])
    else:
        offs_k = k0 + tl.arange(0, WIDTH)
        ptrs = qx_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # M * K may pass 2^31
        if MASK_K:
            return tl.load(ptrs, mask=(offs_k < K)[None, :], other=0)
        else:
            return tl.load(ptrs)


@triton.jit
def _load_w(w_desc, qw_ptr, cols, n0, kb0, KW, stride_wn,
            WIDTH: tl.constexpr, USE_TMA: tl.constexpr, MASK_K: tl.constexpr):
    """Weight bytes [BN, WIDTH]: rows n0.. (`cols`, wrapped into [0, N)), bytes [kb0, kb0 + WIDTH) of KW."""
    if USE_TMA:
        return w_desc.load([n0, kb0])
    else:
        offs_k = kb0 + tl.arange(0, WIDTH)
        ptrs = qw_ptr + cols[:, None] * stride_wn + offs_k[None, :]
        if MASK_K:
            return tl.load(ptrs, mask=(offs_k < KW)[None, :], other=0)
        else:
            return tl.load(ptrs)


@triton.jit
def _nibble(packed, SHIFT):
    """Sign-extended nibble of each byte: SHIFT 4 takes the low nibble, 0 the high one (int8 result)."""
    b = packed.to(tl.int8, bitcast=True)
    return ((b << SHIFT).to(tl.int8) >> 4).to(tl.int8)


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row-tiles advance together across N so their rows stay in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _int_gemm_kernel(
    qx_ptr, qw_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, out_ptr,
    M, N, K, KW, num_programs,
    stride_xm, stride_wn, stride_om,
    stride_xs_m, stride_xs_g, stride_xz_m, stride_xz_g, stride_ws_n, stride_ws_g, stride_wsum_n,
    GROUP_SIZE: tl.constexpr,
    W_INT4: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_ONLY: tl.constexpr,
    MASK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
    USE_TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """Output tiles pid, pid + num_programs, ...; see the module docstring for the math.

    K is the activation width, KW the weight row's width in its own elements (K, or K / 2 packed).
    Per channel, int4 steps one 128-column chunk at a time (BLOCK_K is 128); grouped int4 steps 64
    columns (BLOCK_K 64), the low or high nibbles of one chunk's 64 bytes.
    """
    HALF: tl.constexpr = _INT4_CHUNK // 2
    # Activation tiles are half a chunk wide for int4 (one per dot), BLOCK_K otherwise; weight tiles are
    # BLOCK_K bytes wide for int8 and HALF bytes (one chunk, or the half-chunk's bytes) for int4.
    X_WIDTH: tl.constexpr = HALF if W_INT4 else BLOCK_K
    W_WIDTH: tl.constexpr = HALF if W_INT4 else BLOCK_K
    if USE_TMA:
        x_desc = tl.make_tensor_descriptor(qx_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, X_WIDTH])
        w_desc = tl.make_tensor_descriptor(qw_ptr, shape=[N, KW], strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, W_WIDTH])
    else:
        x_desc = qx_ptr
        w_desc = qw_ptr

    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    tile_c = start - num_programs
    for tile in tl.range(start, num_tiles, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        # Out-of-range rows / columns read a valid row instead (wrap-around) so the pointer loads need no
        # M / N masks; their results are dropped by the masked store. (TMA fills them with zeros.)
        rows = (m0 + tl.arange(0, BLOCK_M)) % M
        cols = (n0 + tl.arange(0, BLOCK_N)) % N

        if GROUP_SIZE == 0:
            acc = _zeros(BLOCK_M, BLOCK_N, tl.int32, SWAP_AB)
            if W_INT4:
                for kc in range(0, K, _INT4_CHUNK):
                    packed = _load_w(w_desc, qw_ptr, cols, n0, kc // 2, KW, stride_wn, HALF, USE_TMA, MASK_K)
                    if MASK_K:  # a last chunk of width w < 128 splits at w / 2
                        half = tl.minimum(HALF, (K - kc) // 2)
                    else:
                        half = HALF
                    x_low = _load_x(x_desc, qx_ptr, rows, m0, kc, K, stride_xm, HALF, USE_TMA, MASK_K)
                    x_high = _load_x(x_desc, qx_ptr, rows, m0, kc + half, K, stride_xm, HALF, USE_TMA, MASK_K)
                    acc = _dot(x_low, _nibble(packed, 4), acc, SWAP_AB)
                    acc = _dot(x_high, _nibble(packed, 0), acc, SWAP_AB)
            else:
                for k0 in range(0, K, BLOCK_K):
                    x = _load_x(x_desc, qx_ptr, rows, m0, k0, K, stride_xm, BLOCK_K, USE_TMA, MASK_K)
                    w = _load_w(w_desc, qw_ptr, cols, n0, k0, KW, stride_wn, BLOCK_K, USE_TMA, MASK_K)
                    acc = _dot(x, w, acc, SWAP_AB)
        else:
            result = _zeros(BLOCK_M, BLOCK_N, tl.float32, SWAP_AB)
            for group in range(K // GROUP_SIZE):
                group_acc = _zeros(BLOCK_M, BLOCK_N, tl.int32, SWAP_AB)
                # Unrolled: each group is a fixed number of K blocks (BLOCK_K divides GROUP_SIZE).
                for step in tl.static_range(GROUP_SIZE // BLOCK_K):
                    k0 = group * GROUP_SIZE + step * BLOCK_K
                    x = _load_x(x_desc, qx_ptr, rows, m0, k0, K, stride_xm, BLOCK_K, USE_TMA, False)
                    if W_INT4:  # 64 columns: the low or the high nibbles of their chunk's 64 bytes
                        chunk = k0 // _INT4_CHUNK
                        packed = _load_w(w_desc, qw_ptr, cols, n0, chunk * HALF, KW, stride_wn, HALF, USE_TMA,
                                         False)
                        w = _nibble(packed, 4 - 4 * ((k0 // HALF) % 2))
                    else:
                        w = _load_w(w_desc, qw_ptr, cols, n0, k0, KW, stride_wn, BLOCK_K, USE_TMA, False)
                    group_acc = _dot(x, w, group_acc, SWAP_AB)
                if HAS_ZERO:
                    x_zero = tl.load(x_zero_ptr + rows * stride_xz_m + group * stride_xz_g)
                    w_sum = tl.load(w_sum_ptr + cols * stride_wsum_n + group)
                    group_acc = group_acc - _along_m(x_zero, SWAP_AB) * _along_n(w_sum, SWAP_AB)
                x_scale = tl.load(x_scale_ptr + rows * stride_xs_m + group * stride_xs_g)
                w_scale = tl.load(w_scale_ptr + cols * stride_ws_n + group * stride_ws_g)
                scale = mul_rn(_along_m(x_scale, SWAP_AB), _along_n(w_scale, SWAP_AB))
                result = add_rn(result, mul_rn(scale, group_acc.to(tl.float32)))

        # Epilogue. Its tile coordinates come from a counter of their own (as in Triton's persistent
        # matmul), which keeps the flattened loop's prologue and epilogue independent.
        tile_c += num_programs
        pid_m_c, pid_n_c = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m_c * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n_c * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_c = offs_m % M
        cols_c = offs_n % N
        if GROUP_SIZE == 0:
            if ACC_ONLY:
                result = acc
            else:
                if HAS_ZERO:
                    x_zero = tl.load(x_zero_ptr + rows_c * stride_xz_m)
                    w_sum = tl.load(w_sum_ptr + cols_c * stride_wsum_n)
                    acc = acc - _along_m(x_zero, SWAP_AB) * _along_n(w_sum, SWAP_AB)
                x_scale = tl.load(x_scale_ptr + rows_c * stride_xs_m)
                w_scale = tl.load(w_scale_ptr + cols_c * stride_ws_n)
                scale = mul_rn(_along_m(x_scale, SWAP_AB), _along_n(w_scale, SWAP_AB))
                result = mul_rn(scale, acc.to(tl.float32))
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols_c).to(tl.float32)
            result = add_rn(result, _along_n(bias, SWAP_AB))
        if SWAP_AB:
            out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
            out_mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
        else:
            out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptrs, round_to(result, out_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------------------------------ configs

def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SM_COUNT


def _int8_block_k(group_size: int) -> int:
    """The int8 K step: 128, or the largest of 128 / 64 / GEMM_GROUP_MULTIPLE (32) that divides the group.
    Not less: Triton refuses an int8 dot narrower than 32 on sm_90 (wgmma consumes K in steps of 32 bytes),
    which the interpreter does not check."""
    if group_size == 0:
        return 128
    for block_k in (128, 64, GEMM_GROUP_MULTIPLE):
        if group_size % block_k == 0:
            return block_k
    raise ValueError(f"group_size must be a multiple of {GEMM_GROUP_MULTIPLE} for the Triton GEMM, got {group_size}")


def int4_in_kernel(k: int, group_size: int) -> bool:
    """Whether the kernel unpacks int4 weights itself for this K and group size.

    Per channel: any even K. Grouped: groups of a multiple of 64 columns over a K made of whole 128-column
    chunks, so that each 64-column step is one nibble half of one chunk and lies in one group. Other
    group sizes (32, 96, ... or a K with a partial chunk) unpack the weight to int8 codes first.
    """
    return group_size == 0 or (group_size % 64 == 0 and k % CHUNK == 0)


# Tile configs measured fastest per DiT-XL/2 shape on an H200 (132 SMs), with bf16 output: the sweep of
# `benchmarks/bench_gemm.py --sweep` (benchmarks/results/gemm_h200.json, commit 9dd27cf), keyed by
# (M bucket, N, K, int4). Every config there was checked bit for bit against the reference before it was
# timed. What the sweep shows: Triton 3.6 never issues an int8 wgmma asynchronously (its pipeliner makes a
# dot async only with a float32 accumulator), so each K step's MMAs drain before the next start; the fastest
# configs are those where another program on the same SM fills that gap: two 128x128 programs of one
# warpgroup per SM (ctas_per_sm=2) beat every one-program tiling by 15-40 %.
_W8_TWO_PER_SM = GemmConfig(128, 128, 128, 8, 4, 3, ctas_per_sm=2)
_W4_TWO_PER_SM = GemmConfig(128, 128, 128, 8, 4, 3, swap_ab=True, ctas_per_sm=2)
_W4_LARGE = GemmConfig(256, 128, 128, 8, 8, 3, swap_ab=True)
_MEASURED: dict[tuple[int, int, int, bool], GemmConfig] = {
    **{(m, n, k, False): _W8_TWO_PER_SM for m in (4096, 16384)
       for n, k in ((3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608))},
    (4096, 3456, 1152, True): _W4_TWO_PER_SM, (4096, 1152, 1152, True): _W4_TWO_PER_SM,
    (4096, 4608, 1152, True): _W4_LARGE, (4096, 1152, 4608, True): _W4_TWO_PER_SM,
    **{(16384, n, k, True): _W4_LARGE for n, k in ((3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608))},
}


# From this many activation rows on, `triton_int_linear` unpacks an int4 weight to int8 codes
# (`triton_unpack_int4`, one memory-bound kernel) and runs the int8 GEMM, instead of unpacking in the main
# loop. The in-kernel path feeds the MMA from registers with two dots per 128-column step, each drained
# synchronously: on an H200 it ran at 0.46-0.58x of the int8 kernel at 4,096 and 16,384 rows
# (benchmarks/results/gemm_h200.json), where unpacking fc1's weight writes 5.3 MB. With few rows the GEMM
# streams the weight and int4's halved bytes win, so the in-kernel path stays there. The weight stays
# stored as int4. In the DiT-XL/2 step on an H200 (bench_dit, CUDA graphs) w4a8 then ran at 0.95x of w8a8
# at 16 images and 0.99x at 64 (commit 914b990; 0.68x and 0.64x with the in-kernel path).
W4_UNPACK_ROWS = 1024


def size_hint(size: int | torch.SymInt, fallback: int = 4096) -> int:
    """A size's value for a tuning decision, read without adding a guard when it is symbolic.

    Tile configs and grid sizes are choices, not conditions of correctness (every config computes every
    M), so deciding them from the first call's row count instead of comparing the symbolic M keeps a
    dynamic-batch compile valid for every batch: comparisons would guard on M's bucket, and a second
    batch size would recompile the whole model (on an H200, longer than the first compile).
    `fallback` serves sizes with no hint (unbacked).
    """
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else fallback
    return int(size)


def _m_bucket(m: int) -> int:
    return 16 if m <= 16 else 64 if m <= 64 else 4096 if m <= 8192 else 16384


def gemm_candidate_configs(m: int, group_size: int, *, w_int4: bool = False) -> list[GemmConfig]:
    """Configs worth trying for M rows, in order of preference (the first ones measured fastest)."""
    block_k = 128 if group_size == 0 else (64 if w_int4 else _int8_block_k(group_size))
    if group_size and m > 64:  # two accumulators (int32 per group, float32 across groups): smaller tiles
        if w_int4:
            return [GemmConfig(128, 64, block_k, 8, 4, 4, swap_ab=True),
                    GemmConfig(128, 64, block_k, 8, 8, 4, swap_ab=True)]
        return [GemmConfig(128, 64, block_k, 8, 8, 4), GemmConfig(64, 128, block_k, 8, 4, 4)]
    if m <= 64:
        # Weight streaming with a few rows: 64 output channels per program; pointer loads measured faster
        # than TMA here (no descriptor to build per program), and narrower or wider tiles slower.
        block_m = max(16, triton.next_power_of_2(m))
        return [GemmConfig(block_m, 64, block_k, 1, 4, 4, swap_ab=True, tma=False),
                GemmConfig(block_m, 64, block_k, 1, 4, 4, swap_ab=True),
                GemmConfig(block_m, 128, block_k, 1, 4, 4, swap_ab=True)]
    if w_int4:
        return [_W4_TWO_PER_SM if m <= 8192 else _W4_LARGE, _W4_LARGE if m <= 8192 else _W4_TWO_PER_SM,
                GemmConfig(128, 128, block_k, 8, 8, 4, swap_ab=True)]
    return [_W8_TWO_PER_SM, GemmConfig(128, 256, block_k, 8, 8, 4), GemmConfig(256, 128, block_k, 8, 8, 3),
            GemmConfig(128, 128, block_k, 8, 4, 4)]


def choose_gemm_config(m: int, n: int, k: int, group_size: int, device: torch.device, *,
                       w_int4: bool = False) -> GemmConfig:
    """The tile config for an [M, K] x [N, K] GEMM, from static shapes only (traceable; a symbolic M by
    its hint, see `size_hint`).

    The measured table first (the DiT-XL/2 shapes); otherwise the first candidate, which the sweep measured
    fastest on every DiT shape of its M range. (`_launch` lowers the pipeline depth where the output tile
    would not fit in shared memory, e.g. float32 or int32 outputs.)
    """
    m = size_hint(m)
    measured = _MEASURED.get((_m_bucket(m), int(n), int(k), w_int4)) if group_size == 0 else None
    if measured is not None:
        return measured
    return gemm_candidate_configs(m, group_size, w_int4=w_int4)[0]


def weight_group_sums(qw: torch.Tensor, w_bits: int, group_size: int) -> torch.Tensor:
    """wsum[n, g] = sum of the weight codes of output n in input group g, int32 [N, G].

    Needed only for asymmetric activations (the x_zero * wsum term). Depends on the weight alone,
    so a caller with a fixed weight computes it once and passes it as `w_sum`.
    """
    codes = unpack_int4(qw) if w_bits == 4 else qw
    n, k = codes.shape
    groups = 1 if group_size == 0 else k // group_size
    return codes.reshape(n, groups, -1).sum(dim=-1, dtype=torch.int32)


# ------------------------------------------------------------------------------------------ launch

def _allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the in-kernel TMA descriptors (128 bytes per descriptor and program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Triton needs an allocator for kernels with global scratch (tl.make_tensor_descriptor).

    Triton keeps it in a context variable that other code (Inductor's launcher) also sets; setting ours
    costs nothing and makes eager launches work whatever ran before.
    """
    if hasattr(triton, "set_allocator"):
        triton.set_allocator(_allocator)


# Shared memory a program may use on Hopper (227 KiB) when the device cannot be asked (the interpreter).
_DEFAULT_SMEM_PER_BLOCK = 232448


def _smem_estimate(config: GemmConfig, block_k: int, w_int4: bool, out_size: int) -> int:
    """Bytes of shared memory the kernel takes, an upper bound: the pipeline's operand buffers plus the
    output tile that the epilogue's layout conversion stages (Triton 3.6 reported 147,456 + 131,096 bytes
    for 128x256x128, three stages, int32 out: over the 232,448 a block may have)."""
    x_bytes = config.block_m * block_k
    w_bytes = config.block_n * (CHUNK // 2 if w_int4 else block_k)  # int4 steps load a chunk's 64 bytes
    return config.num_stages * (x_bytes + w_bytes) + config.block_m * config.block_n * out_size + 1024


def _fit_stages(config: GemmConfig, block_k: int, w_int4: bool, out_size: int, device: torch.device) -> GemmConfig:
    """The config with its pipeline shortened (down to 2 stages) until its shared memory fits the device."""
    if device.type != "cuda":
        return config
    limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) \
        or _DEFAULT_SMEM_PER_BLOCK
    while config.num_stages > 2 and _smem_estimate(config, block_k, w_int4, out_size) > limit:
        config = replace(config, num_stages=config.num_stages - 1)
    return config


def _tma_allowed(device: torch.device) -> bool:
    if INTERPRETING or device.type != "cuda" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


class Rows(NamedTuple):
    """A tensor the kernel addresses as an [M, C] matrix: the tensor (its storage) and the element strides
    between rows and between columns."""

    tensor: torch.Tensor
    row_stride: int
    col_stride: int


def _matrix(t: torch.Tensor) -> Rows:
    """A 2-D tensor as it stands."""
    return Rows(t, t.stride(0), t.stride(1))


def _per_row(t: torch.Tensor, leading: tuple[int, ...], columns: int) -> Rows:
    """A per-row tensor (scales or zero points: [*leading, columns], or anything broadcastable to it) as
    M = prod(leading) rows; one of exactly that shape, contiguous, as it is (no reshape: `as_rows`)."""
    if t.dim() == len(leading) + 1 and tuple(t.shape) == (*leading, columns) and t.is_contiguous():
        return Rows(t, columns, 1)
    return _matrix(torch.broadcast_to(t, (*leading, columns)).reshape(-1, columns))


def _tma_addressable(rows: Rows) -> bool:
    """TMA needs a 16-byte aligned base and row stride, and unit stride along rows (shapes / strides only:
    the storage itself comes 16-byte aligned from torch's allocators)."""
    size = rows.tensor.element_size()
    return (rows.col_stride == 1 and (rows.row_stride * size) % 16 == 0
            and (rows.tensor.storage_offset() * size) % 16 == 0)


def _launch(qx: Rows, qw: Rows, x_scale: Rows | None, x_zero: Rows | None,
            w_scale: Rows | None, w_sum: torch.Tensor | None, bias: torch.Tensor | None,
            out: Rows, m: int, n: int, k: int, w_int4: bool, group_size: int, acc_only: bool,
            config: GemmConfig) -> None:
    """Launch the kernel on [M, K] codes, the [N, K'] weight, [M, G] activation scales / zeros, [N, G] weight
    scales, [N, G] contiguous w_sum and an [M, N] output, each addressed by its strides."""
    if w_int4:
        block_k = CHUNK if group_size == 0 else 64
    else:
        block_k = config.block_k
    if group_size and group_size % block_k:
        raise ValueError(f"block_k={block_k} must divide group_size={group_size}")
    device = qx.tensor.device
    config = _fit_stages(config, block_k, w_int4, out.tensor.element_size(), device)
    mask_k = k % (CHUNK if w_int4 else block_k) != 0
    tma_possible = (_tma_allowed(device) or (INTERPRETING and config.tma is True)) \
        and _tma_addressable(qx) and _tma_addressable(qw) and not (w_int4 and mask_k)
    use_tma = tma_possible if config.tma is None else config.tma
    if use_tma and not tma_possible:
        raise ValueError(f"config {config} asks for TMA, which these operands or this device do not allow")
    if use_tma and not INTERPRETING:
        _ensure_allocator()
    # The persistent programs stride over the tiles, so any count is correct; sized from M's hint.
    tiles = triton.cdiv(size_hint(m), config.block_m) * triton.cdiv(n, config.block_n)
    programs = max(1, min(tiles, config.num_programs or config.ctas_per_sm * _sm_count(device)))
    # Unused pointer arguments get a live tensor so the signature stays fixed; the flags skip them.
    unused = Rows(out.tensor, 0, 0)
    x_scale_arg, x_zero_arg, w_scale_arg = (rows if rows is not None else unused for rows in (x_scale, x_zero, w_scale))
    launcher(_int_gemm_kernel)[(programs,)](
        qx.tensor, qw.tensor, x_scale_arg.tensor, x_zero_arg.tensor, w_scale_arg.tensor,
        w_sum if w_sum is not None else out.tensor,
        bias if bias is not None else out.tensor, out.tensor,
        m, n, k, qw.tensor.shape[1], programs,
        qx.row_stride, qw.row_stride, out.row_stride,
        x_scale_arg.row_stride, x_scale_arg.col_stride,
        x_zero_arg.row_stride, x_zero_arg.col_stride,
        w_scale_arg.row_stride, w_scale_arg.col_stride,
        w_sum.stride(0) if w_sum is not None else 0,
        GROUP_SIZE=group_size,
        W_INT4=w_int4,
        HAS_ZERO=x_zero is not None,
        HAS_BIAS=bias is not None,
        ACC_ONLY=acc_only,
        MASK_K=mask_k,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        GROUP_M=config.group_m,
        SWAP_AB=config.swap_ab,
        USE_TMA=use_tma,
        FLATTEN=config.flatten and group_size == 0,
        WARP_SPECIALIZE=config.warp_specialize,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _unpack_int4_kernel(packed_ptr, out_ptr, N, K, stride_packed, BLOCK_N: tl.constexpr, CHUNK_BYTES: tl.constexpr):
    """BLOCK_N rows of one chunk of packed int4 codes (dqcompile.quant.packing's layout) into int8 codes.

    Byte i of the chunk at column c0 (w columns wide) holds column c0 + i in its low nibble and column
    c0 + w / 2 + i in its high nibble, so each half of the chunk's output is one contiguous span.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk_start = tl.program_id(1) * (2 * CHUNK_BYTES)
    half_width = tl.minimum(K - chunk_start, 2 * CHUNK_BYTES) // 2
    lanes = tl.arange(0, CHUNK_BYTES)
    mask = (rows < N)[:, None] & (lanes < half_width)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    packed = tl.load(packed_ptr + rows64 * stride_packed + chunk_start // 2 + lanes[None, :], mask=mask, other=0)
    # Sign extension of a 4-bit two's complement nibble v: (v ^ 8) - 8.
    wide = packed.to(tl.int32)
    low = ((wide & 0xF) ^ 8) - 8
    high = ((wide >> 4) ^ 8) - 8
    out_row = out_ptr + rows64 * K + chunk_start + lanes[None, :]
    tl.store(out_row, low.to(tl.int8), mask=mask)
    tl.store(out_row + half_width, high.to(tl.int8), mask=mask)


def triton_unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`dqcompile.quant.packing.unpack_int4` of a 2-D packed weight [N, K/2] as one Triton kernel: int8
    codes [N, K], contiguous.

    Aten's unpack (shift, mask, stack) compiles under Inductor to a gather-like pointwise kernel that ran
    at about a quarter of the H200's bandwidth in the step's profile (1.4 ms per DiT-XL/2 step at 16
    images); this one reads each chunk's bytes once and writes its two halves as contiguous spans.
    """
    n, half_k = packed.shape
    k = 2 * half_k
    out = torch.empty((n, k), dtype=torch.int8, device=packed.device)
    if out.numel() == 0:
        return out
    packed = _row_major(packed)
    block_n = 32
    launcher(_unpack_int4_kernel)[(triton.cdiv(n, block_n), triton.cdiv(k, CHUNK))](
        packed, out, n, k, packed.stride(0), BLOCK_N=block_n, CHUNK_BYTES=CHUNK // 2, num_warps=4,
    )
    return out


def triton_int_linear(qx: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor | None,
                      qw: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                      w_bits: int, group_size: int, out_dtype: torch.dtype,
                      w_sum: torch.Tensor | None = None, *, config: GemmConfig | None = None) -> torch.Tensor:
    """`dqcompile::int_linear` on Triton: y[..., N] from int8 qx[..., K] and an int8 / packed-int4 weight.

    The positional arguments are those of the `int_linear_triton` schema (docs/CONTRACTS.md).

    Args:
        qx: int8 [..., K] activation codes (leading dims are flattened to M rows).
        x_scale: float32, broadcastable to [..., G]; G = 1 (group_size 0) or K / group_size.
        x_zero: int32, broadcastable to [..., G]; None for symmetric activations (skips the zero term).
        qw: int8 [N, K] (w_bits 6 or 8) or packed uint8 [N, K/2] (w_bits 4).
        w_scale: float32 [N, G] (or [N] when G = 1).
        bias: [N] of any float dtype, or None.
        w_bits: 4, 6 or 8.
        group_size: 0 (per output channel) or the group length, a multiple of 32 dividing K.
        out_dtype: torch.bfloat16, torch.float16 or torch.float32.
        w_sum: `weight_group_sums(qw, w_bits, group_size)`, precomputed once per weight; computed here
            when x_zero is given and w_sum is not.
        config: force a tile config (tests, the benchmark sweep); default `choose_gemm_config`.
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
    if group_size != 0 and (group_size % GEMM_GROUP_MULTIPLE != 0 or k % group_size != 0):
        raise ValueError(f"group_size {group_size} must be a multiple of {GEMM_GROUP_MULTIPLE} dividing K={k} "
                         "(the Triton GEMM; other group sizes run on the reference op)")
    groups = 1 if group_size == 0 else k // group_size
    leading = tuple(qx.shape[:-1])
    out = torch.empty((*leading, n), dtype=out_dtype, device=qx.device)
    if out.numel() == 0:
        return out
    if groups == 1:
        group_size = 0  # one group spanning K is the per-channel path

    qx_codes, m, qx_row_stride = as_rows(qx)
    qw = _row_major(qw)
    xs = _per_row(x_scale.float(), leading, groups)
    xz = _per_row(x_zero.to(torch.int32), leading, groups) if x_zero is not None else None
    ws = _matrix(w_scale.float().reshape(n, groups))
    if xz is not None and w_sum is None:
        w_sum = weight_group_sums(qw, w_bits, group_size)
    if w_sum is not None:
        w_sum = w_sum.to(torch.int32).reshape(n, groups).contiguous()
    bias = bias.contiguous() if bias is not None else None
    # Unpacked to int8 codes first: group sizes the int4 path cannot step through, and many rows, where the
    # GEMM is bound by its MMAs rather than by reading the weight (see W4_UNPACK_ROWS).
    if w_int4 and (not int4_in_kernel(k, group_size) or size_hint(m) >= W4_UNPACK_ROWS):
        qw, w_int4 = triton_unpack_int4(qw), False
    config = config or choose_gemm_config(m, n, k, group_size, qx.device, w_int4=w_int4)
    if not w_int4 and group_size and group_size % config.block_k:
        config = replace(config, block_k=_int8_block_k(group_size))
    _launch(Rows(qx_codes, qx_row_stride, 1), _matrix(qw), xs, xz, ws, w_sum, bias, Rows(out, n, 1), m, n, k, w_int4, group_size, False,
            config)
    return out


def triton_int_matmul(a: torch.Tensor, b: torch.Tensor, *, w_bits: int = 8,
                      config: GemmConfig | None = None) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [N, K] -> int32 [M, N] (b packed uint8 [N, K/2] when w_bits is 4).

    The `int_matmul` op for shapes torch._int_mm refuses (M <= 16), and the raw-accumulator path of the
    GEMM kernel: the same main loop as `triton_int_linear`, no epilogue.
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
    a, b = _row_major(a), _row_major(b)
    m, n = out.shape
    config = config or choose_gemm_config(m, n, k, 0, a.device, w_int4=w_int4)
    _launch(_matrix(a), _matrix(b), None, None, None, None, None, _matrix(out), m, n, k, w_int4, 0, True, config)
    return out
