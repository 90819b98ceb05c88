"""Exact integer products on the CPU, and the int_linear decomposition the "aten" backend gives Inductor.

Exactness by construction: an int8 x int8 product is an integer of magnitude at most 2^14, so a sum of at
most `FLOAT32_EXACT_K` of them, in any order and blocking, is an integer of magnitude at most 2^24, which
float32 holds exactly (and the reduced-precision inputs a float32 matmul may use, TF32 or bf16, hold every
int8 value exactly). A float32 GEMM over the codes therefore returns the exact int32 sums. Longer sums go
through float64 (exact up to 2^53).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dqcompile.quant.packing import unpack_int4

# int8 x int8 sums of at most this many products stay within float32's exact integers (2^24).
FLOAT32_EXACT_K = 2**10


def exact_float_dtype(k: int) -> torch.dtype:
    """float32 when sums of ``k`` int8 products are exact in it, else float64."""
    return torch.float32 if k <= FLOAT32_EXACT_K else torch.float64


def int_linear_decomposed(qx: Tensor, x_scale: Tensor, x_zero: Tensor | None, qw: Tensor, w_scale: Tensor,
                          bias: Tensor | None, w_bits: int, group_size: int, out_dtype: torch.dtype,
                          w_sum: Tensor | None = None) -> Tensor:
    """``int_linear`` in ATen ops for Inductor: one exact float GEMM (batched over groups), the epilogue as
    elementwise ops that Inductor fuses into one loop. Same formulas as the reference, float32 epilogue."""
    codes_w = unpack_int4(qw) if w_bits == 4 else qw
    n, k = codes_w.shape
    groups = 1 if group_size == 0 else k // group_size
    size = k // groups
    leading = qx.shape[:-1]
    rows = qx.reshape(-1, k)
    exact = exact_float_dtype(size)
    # [G, M, g] x [G, g, N] -> [G, M, N]: every group's exact sums in one batched GEMM.
    a = rows.reshape(-1, groups, size).transpose(0, 1).to(exact)
    b = codes_w.reshape(n, groups, size).permute(1, 2, 0).to(exact)
    acc = torch.bmm(a, b)
    row_scale = x_scale.broadcast_to(*leading, groups).reshape(-1, groups)
    if x_zero is not None:
        if w_sum is None:
            w_sum = codes_w.reshape(n, groups, size).sum(dim=-1, dtype=torch.int32)
        row_zero = x_zero.broadcast_to(*leading, groups).reshape(-1, groups)
        acc = acc - (row_zero.t().unsqueeze(-1).to(exact) * w_sum.t().unsqueeze(1).to(exact))
    terms = (row_scale.t().unsqueeze(-1) * w_scale.reshape(n, groups).t().unsqueeze(1)) * acc.float()
    y = terms.sum(dim=0)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*leading, n)
