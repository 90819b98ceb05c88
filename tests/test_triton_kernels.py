"""Triton kernels (dqcompile/backends/triton) against the reference backend, the specification.

Two ways these run:
- CPU, through the Triton interpreter at tiny shapes. The interpreter must be switched on
  (TRITON_INTERPRET=1) before any Triton kernel is defined, which a pytest process that has imported
  other tests cannot promise; so `test_interpreter_suite` re-runs this file in a fresh subprocess with
  the variable set, where the `interp`-named tests run and the launcher skips itself. One command
  covers both: `python -m pytest tests/test_triton_kernels.py`.
- CUDA (`cuda` marker, skipped without a GPU): the same checks at DiT-XL/2 shapes.

What is checked: integer accumulators exactly (`triton_int_matmul`, and unit-scale linears whose float32
output is an exact integer); float outputs within one rounding step of the output dtype; activation codes,
scales and zero points bit for bit; the fused LayerNorm + modulate + quantize against the unfused
composition (see `_check_ln_modulate_quantize` for why the comparison has two parts).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dqcompile.backends import reference
from dqcompile.quant.packing import pack_int4

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRETING
REPO_ROOT = Path(__file__).resolve().parent.parent

interp = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 subprocess")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

if INTERPRETING or HAS_CUDA:
    from dqcompile.backends.triton import (
        GemmConfig,
        ln_modulate_quantize,
        quantize_act,
        triton_int_linear,
        triton_int_matmul,
    )


# ---------------------------------------------------------------- helpers

def _weights(n: int, k: int, w_bits: int, device: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], the tensor the kernel takes: codes, or packed uint8 for 4 bits)."""
    qmax = 2 ** (w_bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (n, k), dtype=torch.int8, generator=gen).to(device)
    return codes, (pack_int4(codes) if w_bits == 4 else codes)


def _activations(m: int, k: int, group_size: int, symmetric: bool, device: str,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-quantized activations of a random float input with a few outlier channels."""
    x = torch.randn(m, k, generator=gen)
    x[:, ::7] *= 8.0
    x = x + 0.5 * torch.rand(m, 1, generator=gen)  # off-center rows exercise asymmetric zero points
    return reference.quantize_act(x.to(device), 8, group_size, symmetric)


def _exact_linear_int64(qx: torch.Tensor, x_zero: torch.Tensor, codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """sum_g (acc[m, n, g] - x_zero[m, g] wsum[n, g]) in int64, independent of the reference backend."""
    m, k = qx.shape
    groups = k // group_size if group_size else 1
    xg = qx.long().reshape(m, groups, -1)
    wg = codes.long().reshape(codes.shape[0], groups, -1)
    acc = torch.einsum("mgk,ngk->mng", xg, wg)
    return (acc - x_zero.long().reshape(m, groups)[:, None, :] * wg.sum(-1)[None, :, :]).sum(-1)


def _assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to one rounding step of the output dtype: the backend contract.

    On a GPU the kernel's float32 epilogue is the reference's, operation for operation, so outputs are
    in fact bit-identical (bench_gemm.py reports it); the Triton interpreter, however, casts float32 to
    bfloat16 by truncation instead of rounding to nearest, one step off at times.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = torch.finfo(expected.dtype).eps
    scale = expected.float().abs().amax().clamp_min(1.0)
    tolerance = 4 * torch.finfo(torch.float32).eps * scale if expected.dtype == torch.float32 else 0.0
    diff = (actual.float() - expected.float()).abs()
    bound = eps * expected.float().abs() + tolerance + 1e-30
    assert bool((diff <= bound).all()), f"max diff {diff.max().item()} beyond one {expected.dtype} rounding step"


def _check_int_linear(m: int, k: int, n: int, w_bits: int, group_size: int, symmetric: bool,
                      out_dtype: torch.dtype, device: str, config: GemmConfig | None = None) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k + n + w_bits + group_size)
    qx, x_scale, x_zero = _activations(m, k, group_size, symmetric, device, gen)
    codes, qw = _weights(n, k, w_bits, device, gen)
    groups = k // group_size if group_size else 1
    w_scale = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    expected = reference.int_linear(qx, x_scale, x_zero, qw, w_scale, bias, w_bits, group_size, out_dtype)
    actual = triton_int_linear(qx, x_scale, None if symmetric else x_zero, qw, w_scale, bias,
                               w_bits, group_size, out_dtype, config=config)
    _assert_within_rounding(actual, expected)


def _check_int_linear_exact(m: int, k: int, n: int, w_bits: int, group_size: int, device: str,
                            config: GemmConfig | None = None) -> None:
    """Unit scales, no bias, float32 out: y is the integer sum itself, exact while |y| < 2^24."""
    gen = torch.Generator().manual_seed(7 * m + k + n)
    groups = k // group_size if group_size else 1
    qx = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen).to(device)
    x_zero = torch.randint(-128, 128, (m, groups), dtype=torch.int32, generator=gen).to(device)
    codes, qw = _weights(n, k, w_bits, device, gen)
    ones_x = torch.ones(m, groups, device=device)
    ones_w = torch.ones(n, groups, device=device)
    actual = triton_int_linear(qx, ones_x, x_zero, qw, ones_w, None, w_bits, group_size, torch.float32,
                               config=config)
    expected = _exact_linear_int64(qx.cpu(), x_zero.cpu(), codes.cpu(), group_size)
    assert expected.abs().max() < 2**24
    assert torch.equal(actual.cpu().long(), expected) and bool((actual == actual.round()).all())


def _check_int_matmul(m: int, k: int, n: int, w_bits: int, device: str, config: GemmConfig | None = None) -> None:
    gen = torch.Generator().manual_seed(m + 3 * k + 5 * n)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen).to(device)
    codes, b = _weights(n, k, w_bits, device, gen)
    actual = triton_int_matmul(a, b, w_bits=w_bits, config=config)
    assert actual.dtype == torch.int32
    assert torch.equal(actual, reference.int_matmul(a, codes))


def _check_quantize_act(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> None:
    q, scale, zero = quantize_act(x, bits, group_size, symmetric)
    q_ref, scale_ref, zero_ref = reference.quantize_act(x, bits, group_size, symmetric)
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(zero, zero_ref)


def _check_ln_modulate_quantize(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
                                mod_scale: torch.Tensor, mod_shift: torch.Tensor, group_size: int,
                                symmetric: bool) -> None:
    """The fused kernel against quantize_act(layer_norm(x) * (1 + scale) + shift), all in float32.

    Exact code agreement with torch's layer_norm is not a property any reimplementation has: the mean and
    variance are sums whose order (and so last-bit rounding) differs between implementations, and a value
    within an ulp of a rounding boundary then lands on either side. So the check splits in two:
    1. the kernel's own modulated activation h (returned on request) equals the torch composition to
       float32 precision, and
    2. the codes, scales and zero points are bit for bit the reference quantization of that h;
    and, as a summary, codes differ from the full reference composition by at most 1, rarely.
    """
    channels = x.shape[-1]
    q, x_scale, x_zero, h = ln_modulate_quantize(x, ln_weight, ln_bias, 1e-6, mod_scale, mod_shift, 8,
                                                 group_size, symmetric, return_normalized=True)
    normed = torch.nn.functional.layer_norm(x.float(), (channels,), ln_weight, ln_bias, 1e-6)
    if mod_scale.dim() == 2:
        mod_scale, mod_shift = mod_scale[:, None], mod_shift[:, None]
    h_ref = normed * (1 + mod_scale.float()) + mod_shift.float()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    q_own, scale_own, zero_own = reference.quantize_act(h, 8, group_size, symmetric)
    assert torch.equal(q, q_own) and torch.equal(x_scale, scale_own) and torch.equal(x_zero, zero_own)
    q_ref, scale_ref, _ = reference.quantize_act(h_ref, 8, group_size, symmetric)
    code_diff = (q.int() - q_ref.int()).abs()
    assert code_diff.max() <= 1 and code_diff.float().mean() < 0.01
    torch.testing.assert_close(x_scale, scale_ref, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- launcher (parent process)

@pytest.mark.skipif(INTERPRETING, reason="this is the interpreter run itself")
def test_interpreter_suite() -> None:
    """Run the `interp` tests of this file on CPU in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interp", __file__],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"interpreter tests failed:\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"


def test_cpu_tensors_without_interpreter_are_refused() -> None:
    if INTERPRETING:
        pytest.skip("the interpreter accepts CPU tensors")
    pytest.importorskip("triton")
    from dqcompile.backends.triton import triton_int_linear as kernel

    qx = torch.zeros(2, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        kernel(qx, torch.ones(2, 1), None, torch.zeros(16, 32, dtype=torch.int8), torch.ones(16, 1), None, 8, 0,
               torch.float32)


def test_backend_registration() -> None:
    from dqcompile.backends import get_backend

    kernels = get_backend("triton")
    assert kernels.int_linear.__name__ == "triton_int_linear"
    assert kernels.ln_modulate_quantize.__name__ == "ln_modulate_quantize"
    assert get_backend("reference").ln_modulate_quantize is reference.ln_modulate_quantize
    assert kernels.quantize_act_static is reference.quantize_act_static


# ---------------------------------------------------------------- interpreter tests (tiny shapes)

# A small tile config forces several programs, several K blocks per group and the grouped program order.
SMALL_TILES = GemmConfig(16, 16, 16, 2, 4, 2) if INTERPRETING else None


@interp
@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("k,n", [(32, 16), (64, 48)])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_interp_int_matmul_exact(m: int, k: int, n: int, w_bits: int) -> None:
    _check_int_matmul(m, k, n, w_bits, "cpu")
    _check_int_matmul(m, k, n, w_bits, "cpu", config=SMALL_TILES)


@interp
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (5, 32, 16), (16, 64, 16), (33, 64, 48)])
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("group_size", [0, 16, 32])
def test_interp_int_linear_exact_integers(m: int, k: int, n: int, w_bits: int, group_size: int) -> None:
    _check_int_linear_exact(m, k, n, w_bits, group_size, "cpu")
    _check_int_linear_exact(m, k, n, w_bits, group_size, "cpu", config=SMALL_TILES)


@interp
@pytest.mark.parametrize("m,k,n", [(1, 32, 16), (5, 64, 48), (16, 64, 16), (33, 64, 48)])
@pytest.mark.parametrize("w_bits,group_size,symmetric", [
    (8, 0, True), (8, 0, False), (8, 16, False), (8, 32, True), (6, 0, False),
    (4, 0, True), (4, 0, False), (4, 16, True), (4, 32, False),
])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_interp_int_linear_matches_reference(m: int, k: int, n: int, w_bits: int, group_size: int,
                                             symmetric: bool, out_dtype: torch.dtype) -> None:
    _check_int_linear(m, k, n, w_bits, group_size, symmetric, out_dtype, "cpu")


@interp
def test_interp_int_linear_leading_dims_broadcast_and_small_tiles() -> None:
    """[B, T, K] input, per-token [B, T, 1] scales, a per-tensor zero; also the forced small tiles."""
    gen = torch.Generator().manual_seed(3)
    qx = torch.randint(-128, 128, (2, 3, 64), dtype=torch.int8, generator=gen)
    x_scale = torch.rand(2, 3, 1, generator=gen) + 0.1
    x_zero = torch.tensor([5], dtype=torch.int32)
    codes, qw = _weights(48, 64, 4, "cpu", gen)
    w_scale = torch.rand(48, 1, generator=gen)
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    expected = reference.int_linear(qx, x_scale, x_zero, qw, w_scale, bias, 4, 0, torch.bfloat16)
    for config in (None, SMALL_TILES):
        actual = triton_int_linear(qx, x_scale, x_zero, qw, w_scale, bias, 4, 0, torch.bfloat16, config=config)
        assert actual.shape == (2, 3, 48)
        _assert_within_rounding(actual, expected)
    for group_size in (16, 32):
        _check_int_linear(33, 64, 48, 8, group_size, False, torch.float32, "cpu", config=SMALL_TILES)


@interp
@pytest.mark.parametrize("shape", [(1, 32), (5, 64), (33, 64), (2, 3, 48)])
@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_interp_quantize_act_bit_exact(shape: tuple[int, ...], group_size: int, symmetric: bool, bits: int) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + group_size)
    x = torch.randn(shape, generator=gen) * 3 + torch.rand(shape[:-1] + (1,), generator=gen)
    _check_quantize_act(x, bits, group_size, symmetric)


@interp
def test_interp_quantize_act_edge_cases() -> None:
    """Exact .5 ties (round half to even), an all-zero token, one-signed tokens, bf16 input, 32-wide groups."""
    ties = torch.arange(-127, 128, dtype=torch.float32)[:64] + 0.5
    ties[0] = -127.0  # amax 127 -> scale exactly 1, so x / scale keeps the ties
    x = torch.stack([ties, torch.zeros(64), torch.rand(64) + 1.0, -torch.rand(64) - 1.0])
    for symmetric in (True, False):
        for group_size in (0, 32):
            _check_quantize_act(x, 8, group_size, symmetric)
    _check_quantize_act(torch.randn(5, 64).to(torch.bfloat16), 8, 32, False)


@interp
@pytest.mark.parametrize("batch,tokens,channels", [(1, 1, 32), (2, 5, 64), (3, 4, 48)])
@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("affine", [False, True])
def test_interp_ln_modulate_quantize(batch: int, tokens: int, channels: int, group_size: int, symmetric: bool,
                                     affine: bool) -> None:
    gen = torch.Generator().manual_seed(batch * 100 + tokens + channels)
    x = torch.randn(batch, tokens, channels, generator=gen) * 2 + 0.3
    mod_scale = torch.randn(batch, channels, generator=gen) * 0.5
    mod_shift = torch.randn(batch, channels, generator=gen) * 0.5
    ln_weight = torch.randn(channels, generator=gen) if affine else None
    ln_bias = torch.randn(channels, generator=gen) if affine else None
    _check_ln_modulate_quantize(x, ln_weight, ln_bias, mod_scale, mod_shift, group_size, symmetric)


@interp
def test_interp_ln_modulate_quantize_layouts() -> None:
    """[B, 1, C] and per-token [B, T, C] modulation, a 2-D [T, C] input, and bf16 inputs."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 64, generator=gen)
    per_sample = torch.randn(2, 1, 64, generator=gen), torch.randn(2, 1, 64, generator=gen)
    per_token = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)
    for mod_scale, mod_shift in (per_sample, per_token):
        _check_ln_modulate_quantize(x, None, None, mod_scale, mod_shift, 16, False)
    _check_ln_modulate_quantize(x.bfloat16(), None, None, per_sample[0].bfloat16(), per_sample[1].bfloat16(), 0, True)
    q, x_scale, x_zero = ln_modulate_quantize(x[0], None, None, 1e-6, per_token[0][0], per_token[1][0], 8, 0, True)
    q_batched, _, _ = ln_modulate_quantize(x[:1], None, None, 1e-6, per_token[0][:1], per_token[1][:1], 8, 0, True)
    assert q.shape == (5, 64) and x_scale.shape == (5, 1) and torch.equal(q, q_batched[0])


@interp
def test_interp_bad_arguments_raise() -> None:
    qx = torch.zeros(4, 64, dtype=torch.int8)
    qw = torch.zeros(16, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="group_size"):
        triton_int_linear(qx, torch.ones(4, 3), None, qw, torch.ones(16, 3), None, 8, 24, torch.float32)
    with pytest.raises(TypeError, match="uint8"):
        triton_int_linear(qx, torch.ones(4, 1), None, qw, torch.ones(16, 1), None, 4, 0, torch.float32)
    with pytest.raises(ValueError, match="bits"):
        quantize_act(torch.zeros(4, 64), 9, 0, True)
    with pytest.raises(ValueError, match="does not broadcast"):
        ln_modulate_quantize(torch.zeros(2, 3, 64), None, None, 1e-6, torch.zeros(2, 32), torch.zeros(2, 32), 8, 0,
                             True)


@pytest.mark.cuda
@needs_cuda
# ---------------------------------------------------------------- CUDA tests (DiT-XL/2 shapes)

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("m", [16, 4096])
@pytest.mark.parametrize("k,n", [(1152, 3456), (4608, 1152)])
@pytest.mark.parametrize("w_bits,group_size,symmetric", [
    (8, 0, True), (8, 0, False), (8, 128, False), (4, 0, True), (4, 128, False), (6, 64, True),
])
def test_cuda_int_linear(m: int, k: int, n: int, w_bits: int, group_size: int, symmetric: bool) -> None:
    _check_int_linear(m, k, n, w_bits, group_size, symmetric, torch.bfloat16, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("m,k,n", [(16, 1152, 6912), (4096, 1152, 3456), (16384, 4608, 1152)])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_cuda_int_matmul_exact(m: int, k: int, n: int, w_bits: int) -> None:
    _check_int_matmul(m, k, n, w_bits, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("group_size", [0, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_quantize_act(group_size: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    for shape in ((16, 256, 1152), (4096, 4608)):
        x = (torch.randn(shape, generator=gen) * 3).cuda().to(torch.bfloat16)
        _check_quantize_act(x, 8, group_size, symmetric)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("group_size", [0, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_ln_modulate_quantize(group_size: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(16, 256, 1152, generator=gen) * 2).cuda()
    mod_scale = (torch.randn(16, 1152, generator=gen) * 0.5).cuda()
    mod_shift = (torch.randn(16, 1152, generator=gen) * 0.5).cuda()
    _check_ln_modulate_quantize(x, None, None, mod_scale, mod_shift, group_size, symmetric)
    _check_ln_modulate_quantize(x.bfloat16(), None, None, mod_scale.bfloat16(), mod_shift.bfloat16(), group_size,
                                symmetric)
