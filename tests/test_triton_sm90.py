"""Every Triton launch the kernels make for DiT-XL/2's shapes compiles for Hopper (sm_90), on a CPU.

The interpreter tests (test_triton_kernels.py) check what the kernels compute, but the interpreter neither
type-checks nor lowers them: a kernel can pass there and fail to compile on the GPU. Triton compiles for a
target without a GPU (ptxas ships with it), so this test records the launches the public launchers make
(with `launcher`, `require_kernel_device` and the device queries replaced by what an H200 answers) and
compiles each to a cubin for sm_90.

Scalars are typed as Inductor types them in the code it generates: a Python float argument of a
user-defined kernel that torch.compile did not specialise arrives as a float64 scalar (`fp64`), which is
how the LayerNorm epsilon broke `tl.sqrt_rn` on an H200 (commit cad9007); both fp32 and fp64 are compiled.
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="compiles real kernels; the interpreter replaces them")

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from dqcompile.backends.triton import gemm, quantize  # noqa: E402
from dqcompile.quant.packing import pack_int4  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)
H200_SHARED_MEMORY = 232448  # bytes a block may opt into on an H200
_POINTER_TYPES = {torch.int8: "*i8", torch.uint8: "*u8", torch.int32: "*i32", torch.float32: "*fp32",
                  torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas")


class _Recorder:
    """Stands in for `launcher(kernel)[grid]`: records (kernel, args, kwargs) instead of launching."""

    def __init__(self, launches: list[tuple[Any, tuple, dict]]) -> None:
        self.launches = launches

    def __call__(self, kernel: Any) -> Any:
        launches = self.launches

        class _Grid:
            def __getitem__(self, grid: Any) -> Any:
                return lambda *args, **kwargs: launches.append((kernel, args, kwargs))

        return _Grid()


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, tuple, dict]]:
    recorded: list[tuple[Any, tuple, dict]] = []
    for module in (gemm, quantize):
        monkeypatch.setattr(module, "launcher", _Recorder(recorded))
        monkeypatch.setattr(module, "require_kernel_device", lambda *tensors: None)
    monkeypatch.setattr(gemm, "_tma_allowed", lambda device: True)
    monkeypatch.setattr(gemm, "_sm_count", lambda device: 132)
    monkeypatch.setattr(gemm, "_ensure_allocator", lambda: None)
    return recorded


def _scalar_type(value: Any, float_type: str) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return float_type
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _compile(kernel: Any, args: tuple, kwargs: dict, float_type: str) -> Any:
    """The launch compiled for sm_90 as Inductor or a direct launch would type it."""
    names = kernel.arg_names
    constexprs = {name: value for name, value in kwargs.items() if name not in _OPTIONS}
    values = dict(zip(names, args))
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(values[name], torch.Tensor):
            signature[name] = _POINTER_TYPES[values[name].dtype]
        else:
            signature[name] = _scalar_type(values[name], float_type)
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    options = {name: kwargs[name] for name in _OPTIONS if name in kwargs}
    return triton.compile(source, target=H200, options=options)


def _dit_activations(rows: int, channels: int = 1152) -> torch.Tensor:
    return torch.randn(1, rows, channels, dtype=torch.bfloat16)


def _record_quantize(rows: int) -> None:
    x = _dit_activations(rows)
    quantize.quantize_act(x, 8, 0, False)
    quantize.quantize_act(x, 8, 128, True)
    quantize.gelu_quantize(torch.randn(1, rows, 4608, dtype=torch.bfloat16), "tanh", 8, 0, False)
    quantize.ln_modulate_quantize(x, None, None, 1e-6, torch.randn(1, 1152), torch.randn(1, 1152), 8, 0, False)
    quantize.quantize_act_static(x, torch.tensor([0.05]), torch.tensor([0], dtype=torch.int32), 8)
    quantize.quantize_act_static(x, torch.rand(1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.int32), 6)


def _record_gemm(rows: int) -> None:
    qx = torch.randint(-128, 128, (rows, 1152), dtype=torch.int8)
    x_scale, x_zero = torch.rand(rows, 1), torch.randint(-10, 10, (rows, 1), dtype=torch.int32)
    qw = torch.randint(-128, 128, (3456, 1152), dtype=torch.int8)
    w_scale, bias = torch.rand(3456), torch.randn(3456, dtype=torch.bfloat16)
    gemm.triton_int_linear(qx, x_scale, x_zero, qw, w_scale, bias, 8, 0, torch.bfloat16)
    qw4 = pack_int4(torch.randint(-8, 8, (3456, 1152), dtype=torch.int8))
    gemm.triton_int_linear(qx, x_scale, x_zero, qw4, w_scale, bias, 4, 0, torch.bfloat16)
    groups = 1152 // 128
    gemm.triton_int_linear(qx, torch.rand(rows, groups), None, qw4, torch.rand(3456, groups), bias, 4, 128,
                           torch.bfloat16)


@pytest.mark.parametrize("rows", [16 * 256, 512, 16])
def test_every_launch_compiles_for_sm90(launches: list, rows: int) -> None:
    """DiT-XL/2's activation quantizers and GEMMs at 16 images (4096 rows: int4 weights are unpacked by
    their own kernel and run the int8 kernel), at 512 rows (the int4 kernel's large tiles) and at 16 rows
    (the weight-streaming tiles) compile to cubins that fit an H200's shared memory, with float scalars
    as fp32 and as fp64."""
    _record_quantize(rows)
    _record_gemm(rows)
    unpacks = 2 if rows >= gemm.W4_UNPACK_ROWS else 0  # the two int4 GEMMs unpack their weight first
    assert len(launches) == 9 + unpacks
    assert sum(kernel.fn.__name__ == "_unpack_int4_kernel" for kernel, _, _ in launches) == unpacks
    for kernel, args, kwargs in launches:
        float_types = ("fp32", "fp64") if any(isinstance(a, float) for a in args) else ("fp32",)
        for float_type in float_types:
            compiled = _compile(kernel, args, kwargs, float_type)
            assert "cubin" in compiled.asm, kernel.fn.__name__
            assert compiled.metadata.shared <= H200_SHARED_MEMORY, (kernel.fn.__name__, kwargs)
