"""Reference implementations of the dqcompile ops: the specification of their numerics.

Every other backend matches these functions: integer accumulators exactly, float outputs within the
output dtype's rounding (docs/CONTRACTS.md). They are plain functions over tensors; ``ops.py`` registers
them as ``torch.ops.dqcompile.*`` for every device, and they run on CPU and CUDA alike.

Notation: ``qx`` are activation codes ``[..., K]``, ``qw`` weight codes ``[N, K]``, ``G`` the number of
groups of the K dim (1, or ``K / group_size``), ``g`` the group size.
"""

import math

import torch
from torch import Tensor

from dqcompile.backends import cpu_path
from dqcompile.quant.mrq import mrq_quantize
from dqcompile.quant.packing import unpack_int4
from dqcompile.quant.uniform import MIN_SCALE, QParams, divide, num_groups, qrange, quantize
from dqcompile.quant.weights import QuantizedWeight

# int8 x int8 products are at most 2^14 in magnitude (-128 * -128), so an int32 accumulator is exact for
# K < 2^17 and may overflow beyond.
MAX_INT_MATMUL_K = 2**17 - 1
# int_linear's zero-corrected group sums, sum_k (qx - x_zero) qw, have terms up to 255 * 128 < 2^15.
MAX_INT_LINEAR_GROUP = 2**16 - 1
# int_attention's P V sums with uniform softmax codes: |code| <= 128 and the zero-point correction
# 128 * sum_j v_j add terms up to 2^15 per key, so at most 2^16 - 1 keys keep them inside int32.
MAX_ATTENTION_KEYS = 2**16 - 1
# int8 x int8 sums of at most this many products stay within float32's exact integers (2^24).
FLOAT32_EXACT_K = 2**10


def _quantize(x: Tensor, qp: QParams) -> Tensor:
    """``uniform.quantize(x, qp)``; on the CPU the same operations on blocks of rows (`cpu_path.quantize_rows`)."""
    if x.device.type != "cpu" or x.numel() == 0:
        return quantize(x, qp)
    k = x.shape[-1]
    groups = num_groups(k, qp.group_size)
    leading = x.shape[:-1]
    qmin, qmax = qrange(qp.bits, qp.symmetric)
    rows = x.float().reshape(-1, k)
    scale = qp.scale.broadcast_to(*leading, groups).reshape(-1, groups)
    zero = qp.zero.broadcast_to(*leading, groups).reshape(-1, groups)
    return cpu_path.quantize_rows(rows, scale, zero, groups, qmin, qmax).reshape(x.shape)


def _dynamic_qparams(x: Tensor, bits: int, symmetric: bool, group_size: int) -> QParams:
    """``compute_qparams(x, bits, symmetric=symmetric, granularity="group" / "token", group_size=group_size)``
    by the same operations, except that the minimum and maximum come from ``amin`` / ``amax`` (the same
    values: a min is exact) instead of ``aminmax``, which is 20x slower on the CPU for rows this short."""
    groups = num_groups(x.shape[-1], group_size)
    grouped = x.float().reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = divide(torch.maximum(hi, -lo), qmax).clamp_min(MIN_SCALE)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = lo.clamp_max(0.0)
        scale = divide(hi.clamp_min(0.0) - lo, qmax - qmin).clamp_min(MIN_SCALE)
        zero = (qmin - torch.round(lo / scale)).to(torch.int32)
    return QParams(scale=scale, zero=zero, bits=bits, symmetric=symmetric, group_size=group_size)


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
    qp = _dynamic_qparams(x, bits, symmetric, group_size)
    return _quantize(x, qp), qp.scale, qp.zero


def quantize_act_per_sample(x: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic quantization with one (scale, zero) per sample (dim 0) and group of the last dim.

    Q-DiT's sample-wise dynamic activations: for ``x [B, T..., K]``, the min / max of each group are
    taken over all tokens of a sample (every dim but the first and the last), and then the formulas of
    ``quantize_act`` apply. ``group_size`` 0: one group spans the last dim.

    Returns:
        q: int8, shaped like ``x``; scale: float32 ``[B, 1..., G]``; zero: int32 ``[B, 1..., G]``
        (as many dims as ``x``, so they broadcast against ``[B, T..., G]`` like per-token parameters).
    """
    if x.dim() < 2:
        raise ValueError(f"quantize_act_per_sample needs x [B, ..., K], got shape {tuple(x.shape)}")
    batch, k = x.shape[0], x.shape[-1]
    groups = num_groups(k, group_size)
    tokens = math.prod(x.shape[1:-1])
    # [B, T, G, g] -> [B, G, T * g]: each row holds one group of one sample, so "token" granularity
    # reduces over exactly the values that share a (scale, zero).
    per_group = x.reshape(batch, tokens, groups, k // groups).transpose(1, 2).reshape(batch, groups, -1)
    rows = _dynamic_qparams(per_group, bits, symmetric, 0)
    shape = (batch, *[1] * (x.dim() - 2), groups)
    qp = QParams(
        scale=rows.scale.reshape(shape), zero=rows.zero.reshape(shape), bits=bits, symmetric=symmetric,
        group_size=group_size,
    )
    return _quantize(x, qp), qp.scale, qp.zero


def ln_modulate_quantize(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    eps: float,
    mod_scale: Tensor,
    mod_shift: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_act(LayerNorm(x) * (1 + mod_scale) + mod_shift)``: the adaLN input of a quantized linear.

    LayerNorm normalizes the last dim of ``x`` ``[B, T, C]`` (``ln_weight``, ``ln_bias``: ``[C]`` or None);
    ``mod_scale`` and ``mod_shift`` broadcast against ``x`` (per sample: ``[B, 1, C]``). Everything runs
    in float32, whatever ``x``'s dtype: for float32 inputs this is exactly the unfused composition of the
    same ops; for bf16 / fp16 inputs it skips the roundings between them (as a fused kernel does).

    Returns ``quantize_act``'s (q int8 like ``x``, scale float32 ``[B, T, G]``, zero int32 ``[B, T, G]``).
    """
    weight = None if ln_weight is None else ln_weight.float()
    bias = None if ln_bias is None else ln_bias.float()
    normalized = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    modulated = normalized * (1 + mod_scale.float()) + mod_shift.float()
    return quantize_act(modulated, bits, group_size, symmetric)


def gelu_quantize(x: Tensor, approximate: str, bits: int, group_size: int,
                  symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_act(gelu(x, approximate), bits, group_size, symmetric)``: the fc2 input of a DiT MLP.

    The GELU runs in ``x``'s dtype, exactly as the unfused graph computes it (ATen computes it in float32
    and rounds to ``x``'s dtype), so the fused op is bit-identical to the composition it replaces.
    """
    return quantize_act(torch.nn.functional.gelu(x, approximate=approximate), bits, group_size, symmetric)


def weight_group_sums(qw: Tensor, w_bits: int, group_size: int) -> Tensor:
    """``wsum[n, g] = sum_{k in group g} qw[n, k]`` as int32 ``[N, G]``: what int_linear's zero-point term needs.

    ``qw`` int8 ``[N, K]`` or packed uint8 ``[N, K/2]`` (``w_bits`` 4). It depends on the weight alone, so
    callers compute it once and pass it to ``int_linear`` as ``w_sum``.
    """
    codes = unpack_int4(qw) if w_bits == 4 else qw
    n, k = codes.shape
    return codes.reshape(n, num_groups(k, group_size), -1).sum(dim=-1, dtype=torch.int32)


def quantize_act_static(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Static quantization with calibrated ``scale`` (float32) and ``zero`` (int32), broadcast against ``[..., 1]``.

        q = clamp(round(x / scale) + zero, -2^(bits-1), 2^(bits-1) - 1)     (int8, shaped like ``x``)

    The op carries no symmetric flag, so codes span the full ``bits``-bit two's complement range. For
    symmetric parameters (zero 0, scale = amax / (2^(bits-1) - 1)) the one extra code -2^(bits-1) is only
    reached by values below the calibrated -amax, which the symmetric range would clip one step earlier.
    """
    qp = QParams(scale=scale, zero=zero, bits=bits, symmetric=False, group_size=0)
    return _quantize(x, qp)


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer matmul: ``a`` int8 ``[M, K]`` x ``b`` int8 ``[N, K]`` -> int32 ``[M, N]``, ``sum_k a[m,k] b[n,k]``.

    CPU: an exact float GEMM over the codes, or ``torch._int_mm`` where that is faster and safe
    (`cpu_path.exact_int_matmul`). CUDA: ``torch._int_mm`` where its shape rules allow, otherwise an exact
    float64 matmul.
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
    if a.device.type == "cpu":
        return cpu_path.exact_int_matmul(a, b)
    if _int_mm_accepts(a, b):
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    return _int_matmul_float64(a, b)


def _int_mm_accepts(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch._int_mm(a, b.t())`` runs correctly for these shapes on this device.

    CPU: none of M, K, N below 2 (`cpu_path.int_mm_accepts`: a K = 1 call silently returns garbage), and
    then only where it is faster than the exact float GEMM (`cpu_path.int_mm_is_faster`). CUDA
    (cuBLASLt): M > 16, K > 0 and a multiple of 8, N a multiple of 8 (N > 0 here: nothing to gain from an
    empty launch). Other devices: never.
    """
    (m, k), n = a.shape, b.shape[0]
    if a.device.type == "cpu":
        return cpu_path.int_mm_accepts(m, k, n) and cpu_path.int_mm_is_faster()
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
    x_zero: Tensor | None,
    qw: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    w_bits: int,
    group_size: int,
    out_dtype: torch.dtype,
    w_sum: Tensor | None = None,
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
        x_scale, x_zero: float32 / int32, broadcast against ``[..., G]``; x_zero None for symmetric
            activations: no zero-point term, the same result as a zero of 0.
        qw: int8 ``[N, K]`` codes, or packed uint8 ``[N, K/2]`` when ``w_bits == 4``.
        w_scale: float32 ``[N, G]``.
        bias: ``[N]`` or None.
        out_dtype: dtype of the result.
        w_sum: int32 ``[N, G]``, ``weight_group_sums(qw, w_bits, group_size)`` computed once by the caller
            (the lowering stores it beside the weight), or None to compute it here when x_zero is given.
    """
    codes_w = QuantizedWeight(qweight=qw, scale=w_scale, bits=w_bits, group_size=group_size).codes()
    k = qx.shape[-1]
    if qx.dtype != torch.int8 or codes_w.shape[1] != k:
        raise ValueError(f"int_linear needs int8 qx [..., K] matching weights [N, K], got {qx.dtype} "
                         f"{tuple(qx.shape)} and {tuple(codes_w.shape)}")
    if x_scale.dtype != torch.float32 or (x_zero is not None and x_zero.dtype != torch.int32):
        raise ValueError(f"int_linear needs a float32 x_scale and an int32 x_zero (or None), got {x_scale.dtype} "
                         f"and {None if x_zero is None else x_zero.dtype}")
    groups = num_groups(k, group_size)
    size = k // groups
    if size > MAX_INT_LINEAR_GROUP:
        raise ValueError(f"int_linear: a group of {size} input channels may overflow the int32 accumulator "
                         f"(at most {MAX_INT_LINEAR_GROUP}; use group_size)")
    n = codes_w.shape[0]
    if w_sum is not None and (w_sum.dtype != torch.int32 or tuple(w_sum.shape) != (n, groups)):
        raise ValueError(f"int_linear needs w_sum int32 [N, G] = {[n, groups]}, got {w_sum.dtype} "
                         f"{list(w_sum.shape)}")
    leading = qx.shape[:-1]
    rows = qx.reshape(-1, k)
    row_scale = x_scale.broadcast_to(*leading, groups).reshape(-1, groups)
    row_zero = None if x_zero is None else x_zero.broadcast_to(*leading, groups).reshape(-1, groups)

    if qx.device.type == "cpu":
        if row_zero is not None and w_sum is None:
            w_sum = weight_group_sums(codes_w, 8, group_size)
        y = cpu_path.int_linear_rows(rows.contiguous(), row_scale, row_zero, codes_w.contiguous(), w_scale.float(),
                                     w_sum, bias, groups)
        return y.to(out_dtype).reshape(*leading, n)

    y = torch.zeros(rows.shape[0], n, dtype=torch.float32, device=qx.device)
    for j in range(groups):
        cols = slice(j * size, (j + 1) * size)
        centered = int_matmul(rows[:, cols], codes_w[:, cols])
        if row_zero is not None:
            wsum = codes_w[:, cols].sum(dim=1, dtype=torch.int32) if w_sum is None else w_sum[:, j]
            centered = centered - row_zero[:, j, None] * wsum
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


def quantize_act_mrq(
    x: Tensor, low_scale: Tensor, high_scale: Tensor, bits: int, split_at_zero: bool
) -> tuple[Tensor, Tensor]:
    """Two-region (MRQ) codes of ``x``: int8 ``(q_low, q_high)`` shaped like ``x``, each zero where the
    value lies in the other region, so ``x_hat = low_scale q_low + high_scale q_high``.

    ``split_at_zero`` True (post-GELU): negatives ``q_low = clamp(round(x / low_scale), -2^(b-1), 0)``,
    the rest ``q_high = clamp(round(x / high_scale), 0, 2^(b-1) - 1)``. False (post-softmax): values
    whose ``round(x / low_scale)`` is at most ``2^(b-1) - 1`` take it as ``q_low``, the others
    ``q_high = clamp(round(x / high_scale), 0, 2^(b-1) - 1)``. Scales are float32 and broadcast
    against ``x`` (dqcompile/quant/mrq.py).
    """
    return mrq_quantize(x, low_scale, high_scale, bits, split_at_zero)


def int_matmul_batched(a: Tensor, b: Tensor) -> Tensor:
    """Exact batched integer matmul: int8 ``[..., M, K]`` x int8 ``[..., N, K]`` -> int32 ``[..., M, N]``.

    Through a float matmul that cannot round: every product is an integer of magnitude at most 2^14,
    so for K <= ``FLOAT32_EXACT_K`` every partial sum, in any order, is an integer of magnitude at most
    2^24, which float32 holds exactly; and the reduced-precision inputs a float32 matmul may use (TF32,
    bf16) hold every int8 value exactly too. Larger K goes through float64, exact as explained in
    ``_int_matmul_float64``. (Attention's Q K^T has K = head dim, and P V has K = keys: 256 for DiT
    at 256 px.)
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() < 2 or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"int_matmul_batched needs int8 [..., M, K] and int8 [..., N, K] with the same "
                         f"batch dims, got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-1] or a.shape[-1] > MAX_INT_MATMUL_K:
        raise ValueError(f"int_matmul_batched: K must match and be at most {MAX_INT_MATMUL_K}, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return _exact_products(a, b).to(torch.int32)


def _exact_products(a: Tensor, b: Tensor) -> Tensor:
    """``int_matmul_batched`` before the cast: the exact integer sums, held in float32 or float64."""
    exact = torch.float32 if a.shape[-1] <= FLOAT32_EXACT_K else torch.float64
    return a.to(exact) @ b.to(exact).transpose(-1, -2)


def _head_codes(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Symmetric codes of ``x [B, H, N, d]`` with a per-head (per row and head) ``scale [B or 1, H, 1, 1]``."""
    qp = QParams(scale=scale, zero=torch.zeros_like(scale, dtype=torch.int32), bits=bits, symmetric=True, group_size=0)
    return quantize(x, qp)


def int_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_scale: Tensor,
    k_scale: Tensor,
    v_scale: Tensor,
    p_low_scale: Tensor | None,
    bits: int,
    scale: float,
) -> Tensor:
    """Attention ``softmax(scale Q K^T) V`` on integer codes: q ``[B, H, Nq, d]``, k, v ``[B, H, Nk, d]``.

        cq, ck, cv = symmetric ``bits``-bit codes of q, k, v with per-head scales (float32, broadcast
                     against ``[B, H, 1, 1]``): clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)
        S = cq ck^T                                            exact integer sums (int32 range)
        P = softmax((q_scale k_scale scale) * float(S))        float32, over the keys
        p_low_scale None: P uniform on [0, 1], codes u = clamp(round(P (2^b - 1)) - 2^(b-1)) and
            O = v_scale / (2^b - 1) * float(u cv + 2^(b-1) sum_keys cv)           (exact int32 sums)
        else (MRQ, post-softmax layout of ``quantize_act_mrq`` with high step 1 / 2^(b-1)):
            O = v_scale * (p_low_scale * float(p_low cv) + 2^-(b-1) * float(p_high cv))
    The result is cast to q's dtype. ``p_low_scale`` broadcasts against ``[B, H, 1, 1]``.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"int_attention needs q [B, H, Nq, d] and k, v [B, H, Nk, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] > MAX_ATTENTION_KEYS:
        raise ValueError(f"int_attention: {k.shape[2]} keys may overflow the int32 accumulator (at most "
                         f"{MAX_ATTENTION_KEYS})")
    cq, ck, cv = _head_codes(q, q_scale, bits), _head_codes(k, k_scale, bits), _head_codes(v, v_scale, bits)
    # The exact sums Q K^T enter the float epilogue straight from the float product that computed them
    # (float32 rounds them as it would the int32), sparing an int32 round trip of the largest tensor.
    logits = _exact_products(cq, ck).float() * (q_scale * k_scale * scale)
    probs = torch.softmax(logits, dim=-1)
    cv_t = cv.transpose(-1, -2)
    if p_low_scale is None:
        levels = 2**bits - 1
        zero = torch.full((), -(2 ** (bits - 1)), dtype=torch.int32, device=q.device)
        p_step = torch.full((), 1.0 / levels, dtype=torch.float32, device=q.device)
        codes = quantize(probs, QParams(scale=p_step, zero=zero, bits=bits, symmetric=False, group_size=0))
        value_sums = cv.sum(dim=-2, keepdim=True, dtype=torch.int32)
        centered = int_matmul_batched(codes, cv_t) - zero * value_sums
        out = (v_scale * p_step) * centered.float()
    else:
        high = 2.0 ** -(bits - 1)
        p_low, p_high = mrq_quantize(probs, p_low_scale, torch.tensor(high, device=q.device), bits, False)
        out = v_scale * (p_low_scale * int_matmul_batched(p_low, cv_t).float()
                         + high * int_matmul_batched(p_high, cv_t).float())
    return out.to(q.dtype)

