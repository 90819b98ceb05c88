"""Memoized answers to torch.compile's question "which arguments does this Triton launch write?".

For every launch of a user-defined Triton kernel that it traces, torch works out which tensor arguments
the kernel writes by compiling the kernel to TTIR and walking it
(`torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors`; `identify_mutated_tensors`
before torch 2.12). It asks at up to four stages (functionalization in AOTAutograd's metadata pass and
again in its trace, then twice in Inductor's lowering) and keeps no answer, so a DiT-XL/2 graph with
about 250 dqcompile launches pays for some 1,000 TTIR compilations: 60-90 ms each for the GEMM and
quantizer kernels on this project's CPU (`benchmarks/bench_mutation_analysis.py`). An open upstream
change works the answer out once per graph node (pytorch/pytorch#193227); until torch has it, this
module memoizes it.

The answer depends only on the kernel, its constexpr and scalar arguments, which arguments are tensors
and their dtypes (torch's analysis replaces every tensor by an empty one of the same dtype and every
symbolic size by 2), so that is the key. Only dqcompile's own kernels are memoized; every other kernel
goes to torch's function unchanged. If torch has neither function, nothing is installed and compiles
just take longer.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
from collections.abc import Callable, Hashable
from typing import Any, Optional

import sympy
import torch

# torch's analysis function, by the name each torch version gives it.
_ANALYSIS_NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")
_lock = threading.Lock()
_installed = False


def _kernel_module(kernel: Any) -> str:
    """The module that defines a JITFunction's (or an Autotuner's) Python function."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__module__", "") or ""


def _argument_key(value: Any) -> Hashable:
    """What of an argument can change torch's answer: a tensor's dtype, that a size is symbolic, or the
    value of a constant."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    inductor_ir = sys.modules.get("torch._inductor.ir")  # loaded whenever Inductor lowers
    if inductor_ir is not None and isinstance(value, inductor_ir.TensorBox):
        return ("tensor", value.get_dtype())
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("symbolic",)
    hash(value)  # raises TypeError for an unhashable constant: that launch is not memoized
    return ("constant", type(value).__qualname__, value)


def _launch_key(kernel: Any, kwargs: dict[str, Any], tma_descriptor_metadata: Any) -> Optional[Hashable]:
    """The memo key of one launch, or None when it cannot be keyed (it is then analysed every time)."""
    try:
        arguments = tuple(sorted((name, _argument_key(value)) for name, value in kwargs.items()))
        return (id(kernel), arguments, repr(sorted(tma_descriptor_metadata.items())) if tma_descriptor_metadata else "")
    except TypeError:
        return None


def _memoized(analysis: Callable[..., Any]) -> Callable[..., Any]:
    answers: dict[Hashable, Any] = {}
    kernels: dict[int, Any] = {}  # keeps each keyed kernel alive, so its id() is never reused

    @functools.wraps(analysis)
    def memoized_analysis(kernel: Any, kwargs: dict[str, Any], tma_descriptor_metadata: Any, *args: Any,
                          **options: Any) -> Any:
        key = None
        if _kernel_module(kernel).startswith("dqcompile.") and not args and not options:
            key = _launch_key(kernel, kwargs, tma_descriptor_metadata)
        if key is None:
            return analysis(kernel, kwargs, tma_descriptor_metadata, *args, **options)
        if key not in answers:
            answers[key] = analysis(kernel, kwargs, tma_descriptor_metadata)
            kernels[id(kernel)] = kernel
        # A copy: the lowering keeps what it is given, and one answer serves many launches.
        return copy.deepcopy(answers[key])

    memoized_analysis.dqcompile_answers = answers  # type: ignore[attr-defined]
    return memoized_analysis


def memoize_mutation_analysis() -> bool:
    """Install the memo on torch's analysis (once per process); whether torch has one to memoize."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from torch._higher_order_ops import triton_kernel_wrap
        except ImportError:
            return False
        for name in _ANALYSIS_NAMES:
            analysis = getattr(triton_kernel_wrap, name, None)
            if analysis is not None:
                setattr(triton_kernel_wrap, name, _memoized(analysis))
                _installed = True
                return True
        return False
