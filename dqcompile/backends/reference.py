"""Reference implementations of the dqcompile ops: the specification of their numerics.

Every other backend matches these functions: integer accumulators exactly, float outputs within the
output dtype's rounding (docs/CONTRACTS.md). They are plain functions over tensors; ``ops.py`` registers
them as ``torch.ops.dqcompile.*`` for every device, and they run on CPU and CUDA alike.

Notation: ``qx`` are activation codes ``[..., K]``, ``qw`` weight codes ``[N, K]``, ``G`` the number of
groups of the K dim (1, or ``K / group_size``), ``g`` the group size.
"""

import torch
from torch import Tensor

from dqcompile.quant.uniform import QParams, compute_qparams, num_groups, quantize
from dqcompile.quant.weights import QuantizedWeight

# int8 x int8 products are at most 2^14 in magnitude (-128 * -128), so an int32 accumulator is exact for
# K < 2^17 and may overflow beyond.
MAX_INT_MATMUL_K = 2**17 - 1
# int_linear's zero-corrected group sums, sum_k (qx - x_zero) qw, have terms up to 255 * 128 < 2^15.
MAX_INT_LINEAR_GROUP = 2**16 - 1


def quantize_act(x: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic quantization of the last dim of ``x``, one (scale, zero) per token or per group.

    For each token and group (``group_size`` 0: the whole last dim), with ``qmin, qmax = qrange(bits, symmetric)``:
        symmetric:  s = max|x| / qmax,                 z = 0
        asymmetric: lo = min(min x, 0), hi = max(max x, 0),
                    s = (hi - lo) / (qmax - qmin),     z = qmin - round(lo / s)
        q = clamp(round(x / s) + z, qmin, qmax)
    (s never below ``uniform.MIN_SCALE``; see there.)

    Returns:
        q: int8, shaped like ``x``; scale: float32 ``[..., G]``; zero: int32 ``[..., G]``.
    """
    qp = compute_qparams(
        x, bits, symmetric=symmetric, granularity="group" if group_size else "token", group_size=group_size
    )
    return quantize(x, qp), qp.scale, qp.zero


def quantize_act_static(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Static quantization with calibrated ``scale`` (float32) and ``zero`` (int32), broadcast against ``[..., 1]``.

        q = clamp(round(x / scale) + zero, -2^(bits-1), 2^(bits-1) - 1)     (int8, shaped like ``x``)

    The op carries no symmetric flag, so codes span the full ``bits``-bit two's complement range. For
    symmetric parameters (zero 0, scale = amax / (2^(bits-1) - 1)) the one extra code -2^(bits-1) is only
    reached by values below the calibrated -amax, which the symmetric range would clip one step earlier.
    """
    qp = QParams(scale=scale, zero=zero, bits=bits, symmetric=False, group_size=0)
    return quantize(x, qp)


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer matmul: ``a`` int8 ``[M, K]`` x ``b`` int8 ``[N, K]`` -> int32 ``[M, N]``, ``sum_k a[m,k] b[n,k]``.

    Uses ``torch._int_mm`` where its shape rules allow, otherwise an exact float64 matmul.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"int_matmul needs int8 [M, K] and int8 [N, K], "
            f"got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"int_matmul: K differs, a is {tuple(a.shape)} and b is {tuple(b.shape)}")
    if a.shape[1] > MAX_INT_MATMUL_K:
        raise ValueError(f"int_matmul: K = {a.shape[1]} may overflow the int32 accumulator (K <= {MAX_INT_MATMUL_K})")
    if _int_mm_accepts(a, b):
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    return _int_matmul_float64(a, b)


def _int_mm_accepts(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch._int_mm(a, b.t())`` runs for these shapes on this device.

    CPU (torch >= 2.11): any shape, empty ones included. CUDA (cuBLASLt): M > 16, K > 0 and a multiple of
    8, N a multiple of 8 (N > 0 here: nothing to gain from an empty launch). Other devices: never.
    """
    (m, k), n = a.shape, b.shape[0]
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        return m > 16 and k > 0 and k % 8 == 0 and n > 0 and n % 8 == 0
    return False


def _int_matmul_float64(a: Tensor, b: Tensor) -> Tensor:
    """``int_matmul`` through a float64 matmul, exact.

    Every product a[m,k] b[n,k] and every partial sum, in whatever order and blocking the BLAS uses, is an
    integer of magnitude at most K * 2^14 <= 2^31 (K is capped by the int32 output anyway), far below
    2^53: float64 represents all of them exactly, so no rounding ever happens. Float64 rather than
    float32 (exact only for K <= 2^10) because float32 matmuls may silently run in TF32 / bf16
    (``torch.backends.*.allow_tf32``, ``set_float32_matmul_precision``); float64 has no such mode. int64
    matmul would also be exact but has no CUDA kernel and no BLAS on CPU.
    """
    return (a.double() @ b.double().t()).to(torch.int32)


def int_linear(
    qx: Tensor,
    x_scale: Tensor,
    x_zero: Tensor,
    qw: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    w_bits: int,
    group_size: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """Integer linear layer, ``[..., K]`` x ``[N, K]`` -> ``[..., N]``.

    With groups of ``g = group_size`` input channels (``group_size`` 0: one group, G = 1):
        acc[m, n, j] = sum_{k in group j} qx[m, k] qw[n, k]                       (exact, int32)
        wsum[n, j]   = sum_{k in group j} qw[n, k]
        y[m, n] = sum_j (x_scale[m, j] w_scale[n, j]) * float(acc[m, n, j] - x_zero[m, j] wsum[n, j]) + bias[n]
    The epilogue runs in float32 (groups summed in order j = 0, 1, ...), then casts to ``out_dtype``.
    ``acc - x_zero * wsum = sum_k (qx - x_zero) qw`` is exact in int32 as well: |qx - x_zero| <= 255, and
    a group spans at most ``MAX_INT_LINEAR_GROUP`` input channels.

    Args:
        qx: int8 ``[..., K]`` activation codes.
        x_scale, x_zero: float32 / int32, broadcast against ``[..., G]``.
        qw: int8 ``[N, K]`` codes, or packed uint8 ``[N, K/2]`` when ``w_bits == 4``.
        w_scale: float32 ``[N, G]``.
        bias: ``[N]`` or None.
        out_dtype: dtype of the result.
    """
    codes_w = QuantizedWeight(qweight=qw, scale=w_scale, bits=w_bits, group_size=group_size).codes()
    k = qx.shape[-1]
    if qx.dtype != torch.int8 or codes_w.shape[1] != k:
        raise ValueError(f"int_linear needs int8 qx [..., K] matching weights [N, K], got {qx.dtype} "
                         f"{tuple(qx.shape)} and {tuple(codes_w.shape)}")
    if x_scale.dtype != torch.float32 or x_zero.dtype != torch.int32:
        raise ValueError(f"int_linear needs a float32 x_scale and an int32 x_zero, got {x_scale.dtype} and "
                         f"{x_zero.dtype}")
    groups = num_groups(k, group_size)
    size = k // groups
    if size > MAX_INT_LINEAR_GROUP:
        raise ValueError(f"int_linear: a group of {size} input channels may overflow the int32 accumulator "
                         f"(at most {MAX_INT_LINEAR_GROUP}; use group_size)")
    leading = qx.shape[:-1]
    rows = qx.reshape(-1, k)
    row_scale = x_scale.broadcast_to(*leading, groups).reshape(-1, groups)
    row_zero = x_zero.broadcast_to(*leading, groups).reshape(-1, groups)

    y = torch.zeros(rows.shape[0], codes_w.shape[0], dtype=torch.float32, device=qx.device)
    for j in range(groups):
        cols = slice(j * size, (j + 1) * size)
        acc = int_matmul(rows[:, cols], codes_w[:, cols])
        wsum = codes_w[:, cols].sum(dim=1, dtype=torch.int32)
        centered = acc - row_zero[:, j, None] * wsum
        y += (row_scale[:, j, None] * w_scale[:, j]) * centered.float()
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype).reshape(*leading, codes_w.shape[0])


def weight_only_linear(
    x: Tensor, qw: Tensor, w_scale: Tensor, bias: Tensor | None, w_bits: int, group_size: int
) -> Tensor:
    """Linear with quantized weights and float activations (activation bits 16), ``[..., K]`` -> ``[..., N]``.

        w_hat[n, k] = w_scale[n, j] * qw[n, k]   for k in group j          (float32)
        y = (float32(x) @ w_hat^T + float32(bias)).to(x.dtype)
    """
    w_hat = QuantizedWeight(qweight=qw, scale=w_scale, bits=w_bits, group_size=group_size).dequantize()
    if w_hat.shape[1] != x.shape[-1]:
        raise ValueError(f"weight_only_linear: x {tuple(x.shape)} does not match weights {tuple(w_hat.shape)}")
    bias_f32 = None if bias is None else bias.float()
    return torch.nn.functional.linear(x.float(), w_hat, bias_f32).to(x.dtype)
