"""Tests of dqcompile.quant: the uniform quantizer, int4 packing and weight quantization."""

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dqcompile.quant import (
    GRANULARITIES,
    QParams,
    compute_qparams,
    dequantize,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    quantize_weight,
    unpack_int4,
)
from dqcompile.quant.uniform import divide

# float32 unit roundoff.
UNIT_ROUNDOFF = 2.0**-24


def expand_to(x: torch.Tensor, stat: torch.Tensor, group_size: int) -> torch.Tensor:
    """Broadcast a [..., G] statistic to x's shape (each group's value over its g elements)."""
    groups = stat.shape[-1]
    grouped_shape = (*x.shape[:-1], groups, x.shape[-1] // groups)
    return stat.unsqueeze(-1).expand(grouped_shape).reshape(x.shape)


def half_step_slack(x: torch.Tensor, x_hat: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Float slack on top of the exact bound |x - x_hat| <= s/2.

    x / s and s * (q - z) are one float32 rounding each (relative error at most u, so absolute at most
    u|x| and u|x_hat|); and the rounding of s itself moves the ends of the code grid by at most
    (2^b - 1) u steps, which matters only for values at the ends of the range. Doubled for margin.
    """
    return 2 * UNIT_ROUNDOFF * (x.abs() + x_hat.abs() + scale * 2**bits)


@st.composite
def quantizer_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, bool, str, int]:
    """A random tensor (values over many magnitudes, some zero slices, outliers) and quantizer settings."""
    granularity = draw(st.sampled_from(GRANULARITIES))
    group_size = draw(st.sampled_from([1, 2, 4, 8])) if granularity == "group" else 0
    leading = draw(st.lists(st.integers(1, 4), min_size=1 if granularity == "channel" else 0, max_size=3))
    last_dim = (group_size or 1) * draw(st.integers(1, 6))
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = 10.0 ** draw(st.integers(-6, 6))
    x = torch.randn(*leading, last_dim, generator=generator) * magnitude
    x += draw(st.floats(-3, 3)) * magnitude  # an offset, so asymmetric ranges are really asymmetric
    if draw(st.booleans()):
        x.view(-1, last_dim)[0] = 0.0  # an all-zero row
    if draw(st.booleans()):
        x.view(-1)[-1] = 50 * magnitude  # an outlier
    return x, bits, symmetric, granularity, group_size


@settings(max_examples=300, deadline=None)
@given(quantizer_cases())
def test_error_at_most_half_a_step_and_codes_in_range(case: tuple[torch.Tensor, int, bool, str, int]) -> None:
    x, bits, symmetric, granularity, group_size = case
    qp = compute_qparams(x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    q = quantize(x, qp)
    x_hat = dequantize(q, qp)
    qmin, qmax = qrange(bits, symmetric)

    assert q.dtype == torch.int8 and q.shape == x.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert bool((qp.scale > 0).all()) and bool(torch.isfinite(x_hat).all())
    assert int(qp.zero.min()) >= qmin and int(qp.zero.max()) <= qmax
    if symmetric:
        assert bool((qp.zero == 0).all())
    # clip_ratio 1: every element lies inside its slice's range, so every element is within half a step.
    scale = expand_to(x, qp.scale.broadcast_to(*x.shape[:-1], qp.scale.shape[-1]), group_size)
    error = (x - x_hat).abs()
    assert bool((error <= scale / 2 + half_step_slack(x, x_hat, scale, bits)).all())


@settings(max_examples=100, deadline=None)
@given(quantizer_cases(), st.floats(0.3, 1.0))
def test_clipped_error_at_most_half_a_step_inside_the_range(
    case: tuple[torch.Tensor, int, bool, str, int], clip_ratio: float
) -> None:
    x, bits, symmetric, granularity, group_size = case
    qp = compute_qparams(
        x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size, clip_ratio=clip_ratio
    )
    x_hat = dequantize(quantize(x, qp), qp)
    qmin, qmax = qrange(bits, symmetric)
    full = (*x.shape[:-1], qp.scale.shape[-1])
    scale = expand_to(x, qp.scale.broadcast_to(full), group_size)
    zero = expand_to(x, qp.zero.broadcast_to(full), group_size).double()
    inside = (x >= scale * (qmin - zero)) & (x <= scale * (qmax - zero))
    error = (x - x_hat).abs()
    bound = scale / 2 + half_step_slack(x, x_hat, scale, bits)
    assert bool((error <= bound)[inside].all())
    # Outside the range the value is clamped to the nearest end.
    assert bool((x_hat.abs() <= x.abs() + bound)[~inside].all())


@settings(max_examples=100, deadline=None)
@given(quantizer_cases())
def test_zero_is_exact_for_asymmetric(case: tuple[torch.Tensor, int, bool, str, int]) -> None:
    x, bits, _, granularity, group_size = case
    x = x.clone()
    x.view(-1)[::3] = 0.0
    x_hat = fake_quantize(x, bits, symmetric=False, granularity=granularity, group_size=group_size)
    assert bool((x_hat.view(-1)[::3] == 0).all())


def test_positive_only_range_still_holds_zero() -> None:
    x = torch.tensor([[3.0, 4.0, 5.0, 6.0]])
    qp = compute_qparams(x, 8, symmetric=False, granularity="token")
    assert int(qp.zero) == -128  # code -128 is 0.0: the range was extended down to 0
    assert dequantize(torch.tensor([[-128]], dtype=torch.int8), qp).item() == 0.0


def test_all_zero_slices_get_a_positive_scale_and_round_trip_to_zero() -> None:
    x = torch.zeros(3, 8)
    for symmetric in (True, False):
        qp = compute_qparams(x, 4, symmetric=symmetric, granularity="group", group_size=4)
        assert bool((qp.scale > 0).all())
        assert bool((dequantize(quantize(x, qp), qp) == 0).all())


def test_qparams_shapes_per_granularity() -> None:
    x = torch.randn(2, 3, 8)
    expected = {"tensor": (1, 1, 1), "channel": (2, 1, 1), "token": (2, 3, 1), "group": (2, 3, 4)}
    for granularity, shape in expected.items():
        group_size = 2 if granularity == "group" else 0
        qp = compute_qparams(x, 8, symmetric=False, granularity=granularity, group_size=group_size)
        assert tuple(qp.scale.shape) == shape and tuple(qp.zero.shape) == shape
        assert qp.scale.dtype == torch.float32 and qp.zero.dtype == torch.int32


def test_symmetric_scale_and_codes_match_the_formula() -> None:
    x = torch.tensor([[-1.0, 0.3, 0.0, 0.9]])
    qp = compute_qparams(x, 8, symmetric=True, granularity="token")
    assert qp.scale.item() == pytest.approx(1.0 / 127.0)
    assert quantize(x, qp).tolist() == [[-127, 38, 0, 114]]  # round(0.3 * 127 = 38.1), round(114.3)


def test_bf16_input_keeps_its_dtype_through_fake_quantize() -> None:
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert fake_quantize(x, 8, symmetric=True, granularity="token").dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, r"bits must be an integer in 2\.\.8, got 1"),
        ({"bits": 9}, r"bits must be an integer in 2\.\.8, got 9"),
        ({"granularity": "row"}, r"granularity must be one of 'tensor', 'channel', 'token', 'group', got 'row'"),
        ({"granularity": "group", "group_size": 3}, r"group_size 3 does not divide the last dim of size 8"),
        ({"granularity": "group", "group_size": 0}, r"granularity 'group' needs a positive group_size"),
        ({"granularity": "token", "group_size": 4}, r"group_size is only used with granularity 'group'"),
        ({"clip_ratio": 0.0}, r"clip_ratio must be in \(0, 1\]"),
        ({"clip_ratio": 1.5}, r"clip_ratio must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, message: str) -> None:
    arguments = {"bits": 8, "symmetric": True, "granularity": "token", "group_size": 0} | kwargs
    bits = arguments.pop("bits")
    with pytest.raises(ValueError, match=message):
        compute_qparams(torch.randn(2, 8), bits, **arguments)


def test_qrange() -> None:
    assert qrange(8, True) == (-127, 127) and qrange(8, False) == (-128, 127)
    assert qrange(4, True) == (-7, 7) and qrange(4, False) == (-8, 7)
    assert qrange(2, True) == (-1, 1) and qrange(2, False) == (-2, 1)


# --- int4 packing ---------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 4), max_size=2),
    st.integers(1, 16),
    st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trips_bit_exactly(leading: list[int], half_k: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (*leading, 2 * half_k), generator=generator, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*leading, half_k)
    assert torch.equal(unpack_int4(packed), q)


def test_every_byte_unpacks_and_packs_back() -> None:
    every_byte = torch.arange(256, dtype=torch.uint8).view(8, 32)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_pack_layout_halves_of_each_128_column_chunk() -> None:
    """Byte i of a 128-column chunk: column i low, column 64 + i high; a last chunk of width w splits at w/2."""
    packed = pack_int4(torch.tensor([[1, -1, -8, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0x81, 0x7F]]
    codes = torch.randint(-8, 8, (3, 128 + 128 + 36), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    wide = pack_int4(codes).to(torch.int16)
    low, high = ((wide & 0xF) ^ 8) - 8, ((wide >> 4) ^ 8) - 8
    for start, width in ((0, 128), (128, 128), (256, 36)):
        chunk = slice(start // 2, (start + width) // 2)
        assert torch.equal(low[:, chunk].to(torch.int8), codes[:, start:start + width // 2])
        assert torch.equal(high[:, chunk].to(torch.int8), codes[:, start + width // 2:start + width])


def test_pack_refuses_odd_width_and_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match=r"even last dim, got shape \(2, 3\)"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"codes in \[-8, 7\], got values in \[-9, 8\]"):
        pack_int4(torch.tensor([[-9, 8]], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"needs int8 codes"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"needs uint8"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.int8))


# --- weight quantization --------------------------------------------------------------------------------


def heavy_tailed_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight with Student-t-like tails, where clipping pays off."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, k, generator=generator)
    chi = torch.randn(n, k, 3, generator=generator).square().mean(-1).sqrt()
    return normal / chi


@pytest.mark.parametrize("bits", [8, 6, 4, 3])
@pytest.mark.parametrize("group_size", [0, 16])
def test_quantize_weight_layout_and_error(bits: int, group_size: int) -> None:
    w = torch.randn(24, 64)
    qw = quantize_weight(w, bits, group_size)
    groups = 64 // group_size if group_size else 1
    assert qw.scale.shape == (24, groups) and qw.scale.dtype == torch.float32
    if bits == 4:
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (24, 32)
    else:
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (24, 64)
    codes = qw.codes()
    qmax = 2 ** (bits - 1) - 1
    assert int(codes.abs().max()) <= qmax
    w_hat = qw.dequantize()
    step = expand_to(w, qw.scale, group_size)
    assert bool(((w - w_hat).abs() <= step / 2 + half_step_slack(w, w_hat, step, bits)).all())


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [0, 32])
def test_clip_search_never_worse_than_rtn(bits: int, group_size: int) -> None:
    w = heavy_tailed_weight(64, 128)
    groups = 128 // group_size if group_size else 1

    def squared_error(clip_search: bool) -> torch.Tensor:
        w_hat = quantize_weight(w, bits, group_size, clip_search=clip_search).dequantize()
        return (w_hat - w).square().view(64, groups, -1).sum(-1)

    rtn, searched = squared_error(False), squared_error(True)
    assert bool((searched <= rtn).all())
    if bits <= 4:  # heavy tails at low bit width: clipping must actually help
        assert searched.sum() < rtn.sum()


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("group_size", [0, 32])
def test_unit_gain_clip_search(bits: int, group_size: int) -> None:
    """With unit_gain every searched group has unit gain against the float group (<w_hat, w> = <w, w>
    up to float32 rounding; the plain search shrinks clipped groups, by about 0.5 % at 4 bits), its
    error is at most that of the round-to-nearest codes given their own unit-gain scale (ratio 1.0 is
    the first candidate), and at low bit widths with heavy tails it beats plain round to nearest."""
    w = heavy_tailed_weight(64, 128)
    groups = 128 // group_size if group_size else 1
    grouped = w.view(64, groups, -1)
    searched = quantize_weight(w, bits, group_size, clip_search=True, unit_gain=True).dequantize()
    searched = searched.view(64, groups, -1)
    gain = (searched * grouped).sum(-1) / grouped.square().sum(-1)
    assert torch.allclose(gain, torch.ones_like(gain), rtol=0, atol=1e-5), float((gain - 1).abs().max())
    plain = quantize_weight(w, bits, group_size, clip_search=True).dequantize().view(64, groups, -1)
    if bits <= 4:  # the plain search does shrink: what unit_gain exists to undo
        assert float(((plain * grouped).sum() / grouped.square().sum())) < 0.999

    rtn = quantize_weight(w, bits, group_size).dequantize().view(64, groups, -1)
    rtn_unit_gain = rtn * (grouped.square().sum(-1) / (rtn * grouped).sum(-1)).unsqueeze(-1)
    searched_error = (searched - grouped).square().sum(-1)
    assert bool((searched_error <= (rtn_unit_gain - grouped).square().sum(-1) * (1 + 1e-5)).all())
    if bits <= 4:
        assert searched_error.sum() < (rtn - grouped).square().sum()
    with pytest.raises(ValueError, match="needs clip_search=True"):
        quantize_weight(w, bits, group_size, unit_gain=True)


def test_clip_search_is_fast_on_a_dit_xl_sized_weight() -> None:
    w = torch.randn(1152, 4608)
    quantize_weight(w, 4, 128, clip_search=True)  # warm-up: first-call allocations
    start = time.perf_counter()
    quantize_weight(w, 4, 0, clip_search=True)
    # About 0.3 s on 2 idle CPU cores. The bound only guards against losing the vectorisation (a loop over
    # the 1152 x 36 groups takes minutes): shared CI machines under load run this several times slower.
    assert time.perf_counter() - start < 10.0


def test_quantize_weight_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"2-D \[N, K\] weight"):
        quantize_weight(torch.randn(2, 3, 4), 8)
    with pytest.raises(ValueError, match=r"group_size 5 does not divide the last dim of size 64"):
        quantize_weight(torch.randn(8, 64), 8, 5)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8, got 16"):
        quantize_weight(torch.randn(8, 64), 16)


def test_qparams_refuses_wrong_dtypes() -> None:
    with pytest.raises(ValueError, match=r"float32 scale and an int32 zero"):
        QParams(scale=torch.ones(1, dtype=torch.float16), zero=torch.zeros(1, dtype=torch.int32), bits=8,
                symmetric=True, group_size=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_and_codes_are_the_same_on_cuda_and_cpu(symmetric: bool) -> None:
    """The quantizer is one function of its input on every device. On CUDA torch computes
    `tensor / python_number` as a product with the reciprocal; scales divided that way came out one ulp
    off the CPU's for some tokens, and then some codes too."""
    x = torch.randn(4096, 1152, generator=torch.Generator().manual_seed(0)) * 3
    cpu = compute_qparams(x, 8, symmetric=symmetric, granularity="token")
    gpu = compute_qparams(x.cuda(), 8, symmetric=symmetric, granularity="token")
    assert torch.equal(gpu.scale.cpu(), cpu.scale) and torch.equal(gpu.zero.cpu(), cpu.zero)
    assert torch.equal(quantize(x.cuda(), gpu).cpu(), quantize(x, cpu))


def test_divide_is_the_correctly_rounded_quotient() -> None:
    numerator = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) * 100
    exact = (numerator.double() / 127).float()  # float64 quotient, rounded once to float32
    assert torch.equal(divide(numerator, 127), exact)
