"""The reference ops' CPU paths (dqcompile/backends/cpu_path.py) give the specification's bits.

The oracle below is the reference int_linear as it was written before the CPU path existed (commit
130afe6), with its int32 products taken from an int64 matmul: the CPU path must reproduce its output bit
for bit (compared as raw bits, so even the sign of a zero counts), whichever exact GEMM it picks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dqcompile.backends import cpu_path, reference
from dqcompile.quant import QuantizedWeight, compute_qparams, quantize, quantize_weight
from dqcompile.quant.packing import pack_int4
from dqcompile.quant.uniform import QParams

ops = torch.ops.dqcompile


def oracle_int_linear(qx, x_scale, x_zero, qw, w_scale, bias, w_bits, group_size, out_dtype):
    """The pre-CPU-path reference loop, with exact int64 products."""
    codes_w = QuantizedWeight(qweight=qw, scale=w_scale, bits=w_bits, group_size=group_size).codes()
    k = qx.shape[-1]
    groups = 1 if group_size == 0 else k // group_size
    size = k // groups
    leading = qx.shape[:-1]
    rows = qx.reshape(-1, k)
    row_scale = x_scale.broadcast_to(*leading, groups).reshape(-1, groups)
    row_zero = None if x_zero is None else x_zero.broadcast_to(*leading, groups).reshape(-1, groups)
    y = torch.zeros(rows.shape[0], codes_w.shape[0], dtype=torch.float32)
    for j in range(groups):
        cols = slice(j * size, (j + 1) * size)
        centered = (rows[:, cols].long() @ codes_w[:, cols].long().t()).to(torch.int32)
        if row_zero is not None:
            centered = centered - row_zero[:, j, None] * codes_w[:, cols].sum(dim=1, dtype=torch.int32)
        y += (row_scale[:, j, None] * w_scale[:, j]) * centered.float()
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype).reshape(*leading, codes_w.shape[0])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes, shapes and bit patterns (torch.equal would call -0.0 and 0.0 equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


@pytest.fixture(params=["float", "int_mm"])
def gemm(request, monkeypatch) -> str:
    """Run a test once with each exact CPU GEMM (the timing-based choice forced either way)."""
    monkeypatch.setattr(cpu_path, "int_mm_is_faster", lambda: request.param == "int_mm")
    return request.param


def linear_case(m: int, k: int, n: int, w_bits: int, group_size: int, zero: str, seed: int,
                bias: bool = True) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator) + 0.5
    weight = quantize_weight(torch.randn(n, k, generator=generator), w_bits, group_size)
    qx, x_scale, x_zero = reference.quantize_act(x, 8, group_size, zero == "symmetric")
    if zero == "none":
        x_zero = None
    elif zero == "large":  # outside the contract's code range: the float32 zero-point term would round
        x_zero = torch.full_like(x_zero, 20_000)
    b = torch.randn(n, generator=generator) if bias else None
    return qx, x_scale, x_zero, weight.qweight, weight.scale, b, w_bits, group_size


@pytest.mark.parametrize(("m", "k", "n", "w_bits", "group_size"), [
    (300, 64, 40, 8, 0),      # several row blocks
    (37, 96, 24, 4, 32),      # packed int4, three groups
    (20, 128, 16, 6, 64),
    (9, 2048, 8, 8, 0),       # K > 2^10: float64 sums
    (5, 2048, 8, 8, 1024),    # groups of exactly 2^10
    (4, 1, 7, 8, 0),          # K = 1
    (1, 16, 1, 8, 0),         # M = N = 1
])
@pytest.mark.parametrize("zero", ["asymmetric", "symmetric", "none", "large"])
def test_int_linear_cpu_is_bit_identical_to_the_reference_loop(gemm, m, k, n, w_bits, group_size, zero) -> None:
    case = linear_case(m, k, n, w_bits, group_size, zero, seed=m + k + n)
    for out_dtype in (torch.float32, torch.bfloat16):
        expected = oracle_int_linear(*case, out_dtype)
        assert same_bits(ops.int_linear(*case, out_dtype), expected)
    # A precomputed w_sum gives the same bits.
    qx, x_scale, x_zero, qw, w_scale, b, w_bits, group_size = case
    w_sum = reference.weight_group_sums(qw, w_bits, group_size)
    assert same_bits(ops.int_linear(*case, torch.float32, w_sum), oracle_int_linear(*case, torch.float32))


def test_int_linear_without_bias_keeps_the_sign_of_zero(gemm) -> None:
    # All-zero codes: every product is 0, and the reference's 0 + 0 * s is +0.0.
    qx = torch.zeros(3, 32, dtype=torch.int8)
    weight = quantize_weight(torch.randn(5, 32), 8)
    args = (qx, torch.ones(3, 1), None, weight.qweight, -weight.scale, None, 8, 0, torch.float32)
    assert same_bits(ops.int_linear(*args), oracle_int_linear(*args))
    assert not torch.signbit(ops.int_linear(*args)).any()


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 2**16),
       use_int_mm=st.booleans())
def test_small_shapes_property(m: int, k: int, n: int, seed: int, use_int_mm: bool) -> None:
    """int_matmul is exact and int_linear (per channel and with one-column groups, asymmetric
    activations) is bit-identical to the oracle, for every small M, K, N including 1."""
    original = cpu_path.int_mm_is_faster
    cpu_path.int_mm_is_faster = lambda: use_int_mm
    try:
        generator = torch.Generator().manual_seed(seed)
        a = torch.randint(-128, 128, (m, k), generator=generator, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
        result = ops.int_matmul(a, b)
        assert result.dtype == torch.int32 and torch.equal(result.long(), a.long() @ b.long().t())
        for group_size in (0, 1):
            case = linear_case(m, k, n, 8, group_size, "asymmetric", seed)
            assert same_bits(ops.int_linear(*case, torch.float32), oracle_int_linear(*case, torch.float32))
    finally:
        cpu_path.int_mm_is_faster = original


def test_linear_with_one_input_channel_is_accurate(gemm) -> None:
    """The bug of CPU torch._int_mm with K = 1 (garbage in the output): Linear(1, N) and group_size 1
    must compute x_hat w_hat^T up to float32 rounding."""
    generator = torch.Generator().manual_seed(3)
    for k, group_size in ((1, 0), (16, 1)):
        x = torch.randn(64, k, generator=generator)
        weight = quantize_weight(torch.randn(48, k, generator=generator), 8, group_size)
        qx, x_scale, x_zero = ops.quantize_act(x, 8, group_size, False)
        y = ops.int_linear(qx, x_scale, x_zero, weight.qweight, weight.scale, None, 8, group_size, torch.float32)
        groups = x_scale.shape[-1]
        x_hat = ((qx.double().view(64, groups, -1) - x_zero.double()[..., None]) * x_scale.double()[..., None])
        w_hat = weight.codes().double().view(48, groups, -1) * weight.scale.double()[..., None]
        expected = x_hat.reshape(64, k) @ w_hat.reshape(48, k).t()
        assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-6


@pytest.mark.parametrize(("shape", "group_size", "symmetric"), [
    ((700, 96), 0, False), ((3, 250, 64), 16, True), ((2, 5, 1), 0, False), ((0, 8), 0, True)])
def test_quantizers_on_cpu_are_bit_identical_to_uniform_quantize(shape, group_size, symmetric) -> None:
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=generator) * 3 + 0.25
    q, scale, zero = ops.quantize_act(x, 8, group_size, symmetric)
    granularity = "group" if group_size else "token"
    qp = compute_qparams(x, 8, symmetric=symmetric, granularity=granularity, group_size=group_size)
    assert torch.equal(q, quantize(x, qp)) and torch.equal(scale, qp.scale) and torch.equal(zero, qp.zero)
    x_bf16 = x.to(torch.bfloat16)
    q16, _, _ = ops.quantize_act(x_bf16, 6, group_size, symmetric)
    qp16 = compute_qparams(x_bf16, 6, symmetric=symmetric, granularity=granularity, group_size=group_size)
    assert torch.equal(q16, quantize(x_bf16, qp16))
    if x.dim() == 3:
        q_sample, s_sample, z_sample = ops.quantize_act_per_sample(x, 8, group_size, symmetric)
        qp_sample = QParams(scale=s_sample, zero=z_sample, bits=8, symmetric=symmetric, group_size=group_size)
        assert torch.equal(q_sample, quantize(x, qp_sample))
    static = ops.quantize_act_static(x, torch.tensor([0.01]), torch.tensor([3], dtype=torch.int32), 8)
    qp_static = QParams(scale=torch.tensor([0.01]), zero=torch.tensor([3], dtype=torch.int32), bits=8,
                        symmetric=False, group_size=0)
    assert torch.equal(static, quantize(x, qp_static))


def test_int4_weights_from_packed_codes_match() -> None:
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(-7, 8, (24, 64), generator=generator, dtype=torch.int8)
    scale = torch.rand(24, 2, generator=generator) + 0.1
    qx, x_scale, x_zero = ops.quantize_act(torch.randn(10, 64, generator=generator), 8, 32, False)
    packed = ops.int_linear(qx, x_scale, x_zero, pack_int4(codes), scale, None, 4, 32, torch.float32)
    unpacked = ops.int_linear(qx, x_scale, x_zero, codes, scale, None, 8, 32, torch.float32)
    assert same_bits(packed, unpacked)


def test_decomposition_matches_the_reference_eagerly() -> None:
    for w_bits, group_size, zero in ((8, 0, "asymmetric"), (4, 32, "asymmetric"), (8, 0, "none")):
        case = linear_case(33, 64, 24, w_bits, group_size, zero, seed=w_bits)
        expected = ops.int_linear(*case, torch.float32)
        actual = cpu_path.int_linear_decomposed(*case, torch.float32)
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=1e-6 * expected.abs().max().item())
