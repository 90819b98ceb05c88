"""The CPU paths of the reference ops (exact, bit-identical to the formulas of ``reference.py``), and the
int_linear decomposition the "aten" backend gives Inductor.

Exact integer GEMMs. An int8 x int8 product is an integer of magnitude at most 2^14, so a sum of at most
`FLOAT32_EXACT_K` of them, in any order and blocking, is an integer of magnitude at most 2^24, which float32
holds exactly (and the reduced-precision inputs a float32 matmul may use, TF32 or bf16, hold every int8
value exactly). A float32 BLAS GEMM over the codes therefore returns the exact int32 sums, and longer sums go
through float64 (exact up to 2^53). On CPUs without VNNI, ``torch._int_mm`` runs a plain loop, 20x slower
than that float GEMM (docs/cpu_path.md); where it is the faster exact path (VNNI / AMX), it is used instead
(`int_mm_is_faster`, decided once per process by timing both; ``DQCOMPILE_CPU_INT_GEMM=int_mm|float``
forces one). Either way the integers are the same, so outputs do not depend on the choice.

No intermediate the size of the output is materialised more than once: the GEMM writes straight into the
result, and the epilogue (zero-point term, scales, bias) runs in place on blocks of rows small enough to
stay in cache, with the reference's float32 operations in the reference's order.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from torch import Tensor

from dqcompile.quant.packing import unpack_int4

# int8 x int8 sums of at most this many products stay within float32's exact integers (2^24).
FLOAT32_EXACT_K = 2**10
# float32 holds every integer of magnitude up to 2^24 exactly.
FLOAT32_EXACT_INT = 2**24
# Sums of at most this many products (q - z) w, |q - z| <= 256 and |w| <= 128, stay within 2^24.
FLOAT32_EXACT_CENTERED_K = 2**9
# Rows per block of the elementwise passes: the block's float32 [rows, N] (or [rows, K]) stays within this
# many bytes, so that a block's passes after the first find it in cache. Not smaller: every ATen call is a
# parallel region, whose barrier costs a scheduler time slice when the cores are shared with other work.
BLOCK_BYTES = 1 << 22
MIN_BLOCK_ROWS = 256


def exact_float_dtype(k: int) -> torch.dtype:
    """float32 when sums of ``k`` int8 products are exact in it, else float64."""
    return torch.float32 if k <= FLOAT32_EXACT_K else torch.float64


def _block_rows(width: int) -> int:
    return max(MIN_BLOCK_ROWS, BLOCK_BYTES // (4 * max(width, 1)))


def int_mm_accepts(m: int, k: int, n: int) -> bool:
    """Shapes for which CPU ``torch._int_mm`` is safe: none of M, K, N below 2.

    Its oneDNN path takes leading dimensions from strides, and a size-1 dimension's stride is arbitrary:
    with K = 1 the transposed weight [1, N] has strides (1, 1), the call is rejected inside oneDNN, and
    the result is left uninitialised (silently wrong; pytorch/pytorch#195066). Degenerate shapes take the
    float path, which is exact for them too.
    """
    return m >= 2 and k >= 2 and n >= 2


@functools.cache
def int_mm_is_faster() -> bool:
    """Whether ``torch._int_mm`` beats the exact float32 GEMM on this CPU (timed once, on a 256 x 512 x 512
    product), unless ``DQCOMPILE_CPU_INT_GEMM`` is "int_mm" or "float"."""
    forced = os.environ.get("DQCOMPILE_CPU_INT_GEMM", "auto")
    if forced in ("int_mm", "float"):
        return forced == "int_mm"
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (256, 512), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (512, 512), generator=generator, dtype=torch.int8)

    def best(run) -> float:
        run()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    float_time = best(lambda: torch.mm(a.float(), b.float().t()))
    int_time = best(lambda: torch._int_mm(a, b.t()))
    return int_time < float_time


def exact_int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """int8 ``[M, K]`` x int8 ``[N, K]`` -> the exact int32 ``[M, N]`` sums, on the CPU (shapes checked by the caller)."""
    (m, k), n = a.shape, b.shape[0]
    if int_mm_accepts(m, k, n) and int_mm_is_faster():
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    exact = exact_float_dtype(k)
    return torch.mm(a.to(exact), b.to(exact).t()).to(torch.int32)


def quantize_rows(x: Tensor, scale: Tensor, zero: Tensor, groups: int, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(x / scale) + zero, qmin, qmax)`` as int8, for x float32 ``[M, K]`` and scale / zero
    ``[M, G]`` (any strides, broadcast views included): `uniform.quantize`'s operations, element for element,
    on blocks of rows with one reused buffer instead of four full-size temporaries."""
    m, k = x.shape
    size = k // groups
    q = torch.empty((m, k), dtype=torch.int8)
    rows = _block_rows(k)
    buffer = torch.empty((min(rows, m), groups, size), dtype=torch.float32)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        block = buffer[: stop - start]
        torch.div(x[start:stop].view(stop - start, groups, size), scale[start:stop].unsqueeze(-1), out=block)
        block.round_().add_(zero[start:stop].unsqueeze(-1)).clamp_(qmin, qmax)
        q[start:stop].view(stop - start, groups, size).copy_(block)
    return q


def int_linear_rows(rows: Tensor, row_scale: Tensor, row_zero: Tensor | None, codes_w: Tensor, w_scale: Tensor,
                    w_sum: Tensor | None, bias: Tensor | None, groups: int) -> Tensor:
    """The reference's int_linear on the CPU, float32 ``[M, N]``, bit for bit.

    ``rows`` int8 ``[M, K]``, ``row_scale`` / ``row_zero`` ``[M, G]``, ``codes_w`` int8 ``[N, K]``, ``w_scale``
    float32 ``[N, G]``, ``w_sum`` int32 ``[N, G]`` (needed when ``row_zero`` is given). The reference computes

        y = 0;  y += (x_scale[:, j] w_scale[:, j]) * float(acc_j - x_zero[:, j] wsum[:, j])  for j = 0, 1, ...;  y += bias

    Here ``acc_j - z wsum_j`` comes exact from the GEMM: from codes with the zero point already subtracted
    when a group is at most `FLOAT32_EXACT_CENTERED_K` long (float32 sums of (q - z) w are then exact);
    else float32 sums of q w when the group is at most `FLOAT32_EXACT_K` long and ``z wsum`` is an exact
    float32 integer, ``acc - z wsum`` then being one correctly rounded subtraction of two exact integers,
    which is float(exact difference); else float64 or int32 sums, converted once. The products and sums
    after it are the reference's float32 operations in the reference's order.
    """
    m, k = rows.shape
    n = codes_w.shape[0]
    size = k // groups
    use_int_mm = groups == 1 and int_mm_accepts(m, k, n) and int_mm_is_faster()
    exact = exact_float_dtype(size)
    centered_inputs = False
    if row_zero is not None and exact == torch.float32 and m and n:
        zero_max = int(row_zero.abs().max())
        if not use_int_mm and size <= FLOAT32_EXACT_CENTERED_K and zero_max <= 128:
            # Subtract the zero point from the codes before the GEMM: |q - z| <= 256, so the sums
            # sum_k (q - z) w are exact in float32, and they are acc - z wsum itself.
            centered_inputs = True
        elif zero_max * int(w_sum.abs().max()) > FLOAT32_EXACT_INT:
            # |z * wsum| must be an exact float32 integer too (true in contract: |z| <= 128, g <= 2^10).
            exact = torch.float64
    w_exact = codes_w.to(exact) if not use_int_mm else None
    zero_exact = None if row_zero is None else row_zero.to(torch.int32 if use_int_mm else exact)
    w_sum_exact = None if row_zero is None or centered_inputs else w_sum.to(torch.int32 if use_int_mm else exact)

    y = torch.empty((m, n), dtype=torch.float32)
    if groups == 1:
        # One GEMM over all rows (a GEMM per block would repack the weight each time), written into y when
        # float32 holds its sums and the zero-point term exactly, else converted into y once.
        if use_int_mm:
            acc = torch._int_mm(rows, codes_w.t())
        elif centered_inputs:
            acc = torch.mm(rows.to(exact).sub_(zero_exact[:, :1]), w_exact.t(), out=y)
        elif exact == torch.float32:
            acc = torch.mm(rows.to(exact), w_exact.t(), out=y)
        else:
            acc = torch.mm(rows.to(exact), w_exact.t())
        if w_sum_exact is not None:
            acc.addr_(zero_exact[:, 0], w_sum_exact[:, 0], alpha=-1)
        if acc is not y:
            y.copy_(acc)  # the one rounding of float(acc - z wsum), as the reference's .float()
            del acc
        # y = 0 + t, then + bias: adding (bias + 0) to t gives the same bits, -0 included.
        addend = 0.0 if bias is None else bias.float() + 0.0
        block_rows = _block_rows(n)
        scales = torch.empty((min(block_rows, m), n), dtype=torch.float32)
        for start in range(0, m, block_rows):
            stop = min(start + block_rows, m)
            block_scale = torch.mul(row_scale[start:stop, 0, None], w_scale[:, 0], out=scales[: stop - start])
            y[start:stop].mul_(block_scale).add_(addend)
        return y

    y.zero_()
    # [G, M, g] x [G, g, N] -> [G, M, N]: every group's exact sums in one batched GEMM.
    a = rows.view(m, groups, size).transpose(0, 1).to(exact)
    if centered_inputs:
        a.sub_(zero_exact.t().unsqueeze(-1))
    acc = torch.bmm(a, w_exact.view(n, groups, size).permute(1, 2, 0))
    for j in range(groups):
        term = acc[j]
        if w_sum_exact is not None:
            term.addr_(zero_exact[:, j], w_sum_exact[:, j], alpha=-1)
        if exact != torch.float32:
            term = term.float()
        term.mul_(torch.mul(row_scale[:, j, None], w_scale[:, j]))
        y.add_(term)
    if bias is not None:
        y.add_(bias.float())
    return y


def int_linear_decomposed(qx: Tensor, x_scale: Tensor, x_zero: Tensor | None, qw: Tensor, w_scale: Tensor,
                          bias: Tensor | None, w_bits: int, group_size: int, out_dtype: torch.dtype,
                          w_sum: Tensor | None = None) -> Tensor:
    """``int_linear`` in ATen ops for Inductor: one exact float GEMM (batched over groups; an extern BLAS
    call), the epilogue as elementwise ops that Inductor fuses into one loop. The reference's formulas with
    a float32 epilogue; compiled, within the output dtype's rounding of the reference."""
    codes_w = unpack_int4(qw) if w_bits == 4 else qw
    n, k = codes_w.shape
    groups = 1 if group_size == 0 else k // group_size
    size = k // groups
    leading = qx.shape[:-1]
    rows = qx.reshape(-1, k)
    exact = exact_float_dtype(size)
    row_scale = x_scale.broadcast_to(*leading, groups).reshape(-1, groups)
    if groups == 1:
        acc = torch.mm(rows.to(exact), codes_w.to(exact).t())
        if x_zero is not None:
            if w_sum is None:
                w_sum = codes_w.sum(dim=-1, dtype=torch.int32, keepdim=True)
            row_zero = x_zero.broadcast_to(*leading, 1).reshape(-1, 1)
            acc = acc - row_zero.to(exact) * w_sum.reshape(1, n).to(exact)
        y = (row_scale * w_scale.reshape(1, n)) * acc.float()
    else:
        # [G, M, g] x [G, g, N] -> [G, M, N]: every group's exact sums in one batched GEMM.
        a = rows.reshape(-1, groups, size).transpose(0, 1).to(exact)
        b = codes_w.reshape(n, groups, size).permute(1, 2, 0).to(exact)
        acc = torch.bmm(a, b)
        if x_zero is not None:
            if w_sum is None:
                w_sum = codes_w.reshape(n, groups, size).sum(dim=-1, dtype=torch.int32)
            row_zero = x_zero.broadcast_to(*leading, groups).reshape(-1, groups)
            acc = acc - row_zero.t().unsqueeze(-1).to(exact) * w_sum.t().unsqueeze(1).to(exact)
        terms = (row_scale.t().unsqueeze(-1) * w_scale.reshape(n, groups).t().unsqueeze(1)) * acc.float()
        y = terms.sum(dim=0)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*leading, n)
