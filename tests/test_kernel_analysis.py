"""The compile backend's cache of torch's user-kernel analysis (dqcompile.backends.kernel_analysis)."""

from __future__ import annotations

import pytest
import sympy
import torch

from dqcompile.backends.kernel_analysis import (
    ANALYSIS_FUNCTIONS,
    analysis_key,
    memoized_kernel_analysis,
)

triton_kernel_wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")


def _installed_name() -> str:
    names = [name for name in ANALYSIS_FUNCTIONS if hasattr(triton_kernel_wrap, name)]
    if not names:
        pytest.skip("this torch has neither analysis function")
    return names[0]


def test_one_analysis_per_distinct_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launches that differ only in tensor shapes share one analysis; a dtype, an integer or a constexpr
    that differs gets its own; results are copies; the original function is back after the block."""
    name = _installed_name()
    calls: list[dict] = []

    def analyse(kernel: object, kwargs: dict, metadata: dict) -> list[str]:
        calls.append(kwargs)
        return ["out_ptr"]

    monkeypatch.setattr(triton_kernel_wrap, name, analyse)
    kernel = object()
    base = {"x_ptr": torch.empty(4, 8, dtype=torch.bfloat16), "out_ptr": torch.empty(4, 8), "M": 4096, "BLOCK": 128}
    with memoized_kernel_analysis() as cache:
        memoized = getattr(triton_kernel_wrap, name)
        first = memoized(kernel, base, {})
        again = memoized(kernel, {**base, "x_ptr": torch.empty(64, 8, dtype=torch.bfloat16)}, {})
        assert first == again == ["out_ptr"] and first is not again
        memoized(kernel, {**base, "x_ptr": torch.empty(4, 8, dtype=torch.float16)}, {})
        memoized(kernel, {**base, "M": 4097}, {})
        memoized(kernel, {**base, "BLOCK": 64}, {})
        memoized(object(), base, {})
        assert len(calls) == 5 and len(cache) == 5
    assert getattr(triton_kernel_wrap, name) is analyse


def test_symbolic_sizes_key_on_their_expression() -> None:
    s0, s1 = sympy.symbols("s0 s1", positive=True, integer=True)
    kernel = object()
    assert analysis_key(kernel, {"M": s0 * 256}) == analysis_key(kernel, {"M": s0 * 256})
    assert analysis_key(kernel, {"M": s0 * 256}) != analysis_key(kernel, {"M": s1 * 256})
    assert analysis_key(kernel, {"f": lambda: None}) is None  # not understood: analysed every time
