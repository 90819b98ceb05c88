"""The memo on torch's analysis of what a Triton launch writes (dqcompile/backends/triton/mutation_analysis.py):
one analysis per kernel configuration, the same answers as torch's, and nothing memoized that is not
dqcompile's or cannot be keyed."""

from __future__ import annotations

import os
import types
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="generates real TTIR; the interpreter tests run elsewhere")
triton = pytest.importorskip("triton")

from dqcompile.backends.triton import jitutils, mutation_analysis  # noqa: E402


def _kernel(module: str) -> Any:
    """A stand-in for a JITFunction whose Python function lives in `module`."""
    function = types.FunctionType((lambda: None).__code__, {}, "kernel")
    function.__module__ = module
    return types.SimpleNamespace(fn=function)


class _Analysis:
    """torch's analysis, counted: answers with the names of the tensor arguments, in a mutable list."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, kernel: Any, kwargs: dict[str, Any], tma_descriptor_metadata: Any) -> list[str]:
        self.calls += 1
        return [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]


def test_one_analysis_per_kernel_configuration() -> None:
    analysis = _Analysis()
    memoized = mutation_analysis._memoized(analysis)
    kernel = _kernel("dqcompile.backends.triton.quantize")
    launch = {"x_ptr": torch.empty(8, dtype=torch.bfloat16), "q_ptr": torch.empty(8, dtype=torch.int8), "R": 8,
              "BITS": 8}
    first = memoized(kernel, launch, {})
    assert first == ["x_ptr", "q_ptr"] and analysis.calls == 1
    first.append("changed")  # a caller changing its answer changes nobody else's
    assert memoized(kernel, {**launch, "x_ptr": torch.empty(3, dtype=torch.bfloat16)}, {}) == ["x_ptr", "q_ptr"]
    assert analysis.calls == 1  # same dtypes and constants: the memo answers
    for changed in ({"x_ptr": torch.empty(8, dtype=torch.float32)}, {"BITS": 6}, {"R": 9}, {"q_ptr": None}):
        memoized(kernel, {**launch, **changed}, {})
    assert analysis.calls == 5  # a dtype, a constexpr, a scalar, a tensor that is absent: each analysed


def test_symbolic_sizes_share_an_answer_and_differ_from_constants() -> None:
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    analysis = _Analysis()
    memoized = mutation_analysis._memoized(analysis)
    kernel = _kernel("dqcompile.backends.triton.gemm")
    shape_env = ShapeEnv()
    rows = [shape_env.create_unbacked_symint(), shape_env.create_unbacked_symint()]
    for size in rows:
        memoized(kernel, {"out_ptr": torch.empty(1), "M": size}, {})
    assert analysis.calls == 1
    memoized(kernel, {"out_ptr": torch.empty(1), "M": 16}, {})
    assert analysis.calls == 2


def test_other_kernels_and_unkeyable_launches_are_analysed_every_time() -> None:
    analysis = _Analysis()
    memoized = mutation_analysis._memoized(analysis)
    for _ in range(2):
        memoized(_kernel("user_kernels"), {"out_ptr": torch.empty(1)}, {})
        memoized(_kernel("dqcompile.backends.triton.gemm"), {"out_ptr": torch.empty(1), "shape": [1, 2]}, {})
    assert analysis.calls == 4


def test_traced_launches_install_the_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    installs = []
    monkeypatch.setattr(jitutils, "memoize_mutation_analysis", lambda: installs.append(True))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: ("wrapped", kernel))
    assert jitutils.launcher("kernel") == ("wrapped", "kernel")
    assert installs == [True]
    assert mutation_analysis.memoize_mutation_analysis()
    from torch._higher_order_ops import triton_kernel_wrap

    installed = [getattr(triton_kernel_wrap, name) for name in mutation_analysis._ANALYSIS_NAMES
                 if hasattr(triton_kernel_wrap, name)]
    assert len(installed) == 1 and hasattr(installed[0], "dqcompile_answers")


class _H200Driver:
    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def test_memoized_answers_are_torchs_for_the_real_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's analysis of a quantizer launch and a GEMM launch, with TTIR generated for sm_90 on this CPU:
    the memo gives the same answers (the outputs are what the kernels write), analysing each once."""
    from torch._higher_order_ops import triton_kernel_wrap

    from dqcompile.backends.triton import gemm, quantize

    analysis = next(getattr(triton_kernel_wrap, name) for name in mutation_analysis._ANALYSIS_NAMES
                    if hasattr(triton_kernel_wrap, name))
    analysis = getattr(analysis, "__wrapped__", analysis)  # torch's own, should the memo be installed already
    recorded: list[tuple[Any, dict[str, Any]]] = []

    def recording_launcher(kernel: Any) -> Any:
        class Grid:
            def __getitem__(self, grid: Any) -> Any:
                return lambda *args, **kwargs: recorded.append((kernel, {**dict(zip(kernel.arg_names, args)),
                                                                         **kwargs}))
        return Grid()

    for module in (gemm, quantize):
        monkeypatch.setattr(module, "launcher", recording_launcher)
        monkeypatch.setattr(module, "require_kernel_device", lambda *tensors: None)
    monkeypatch.setattr(gemm, "_tma_allowed", lambda device: True)
    monkeypatch.setattr(gemm, "_sm_count", lambda device: 132)
    monkeypatch.setattr(gemm, "_ensure_allocator", lambda: None)
    quantize.quantize_act(torch.randn(64, 256, dtype=torch.bfloat16), 8, 0, False)
    gemm.triton_int_linear(torch.zeros(64, 256, dtype=torch.int8), torch.rand(64, 1), None,
                           torch.zeros(128, 256, dtype=torch.int8), torch.rand(128), None, 8, 0, torch.bfloat16)
    monkeypatch.setattr(triton.runtime.driver, "_active", _H200Driver())  # what torch asks: the target
    counted = _Analysis()

    def torchs(kernel: Any, kwargs: dict[str, Any], tma_descriptor_metadata: Any) -> Any:
        counted(kernel, kwargs, tma_descriptor_metadata)
        return analysis(kernel, kwargs, tma_descriptor_metadata)

    memoized = mutation_analysis._memoized(torchs)
    written = []
    for kernel, kwargs in recorded:
        answer = analysis(kernel, kwargs, {})
        for _ in range(3):
            assert repr(memoized(kernel, kwargs, {})) == repr(answer)
        writes = answer.read_writes.writes if hasattr(answer, "read_writes") else answer
        written.append(sorted(getattr(dep, "name", dep) for dep in writes))
    assert written == [["q_ptr", "scale_ptr", "zero_ptr"], ["out_ptr"]]
    assert counted.calls == 2
