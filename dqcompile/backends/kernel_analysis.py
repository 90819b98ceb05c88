"""One analysis per distinct Triton launch while a graph compiles, not one per call site.

torch.compile analyses every user-defined Triton launch it meets (a `triton_op`'s `wrap_triton` launch) to
learn which of its tensors the kernel reads and writes: it generates the kernel's Triton IR and walks it.
It does so at each call site, twice (functionalization in AOTAutograd, then Inductor's lowering), and a
quantized DiT-XL/2 has about 280 call sites of a handful of distinct launches (the 28 blocks repeat the
same shapes). On an H200 host that analysis was most of the compile time the kernels add: the quantized
model's AOT metadata pass took 35 s against bf16's 7.5 s and Inductor's lowering 50 s against 6 s
(benchmarks/results/dit_h200.json, "compile_phases_s").

The result depends only on the kernel, its constexpr and scalar values and the tensors' dtypes (the
generated IR sees nothing else: torch replaces each symbolic size by a value derived from its expression
and fake tensors by empty real ones), so `memoized_kernel_analysis` caches it under that key for the duration of one compile.
torch names the function `identify_accessed_tensors` (2.12 and later) or `identify_mutated_tensors`
(earlier); whichever exists is wrapped, and with neither (a torch that changed it) nothing is.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import sympy
import torch

log = logging.getLogger(__name__)

ANALYSIS_FUNCTIONS = ("identify_accessed_tensors", "identify_mutated_tensors")


def _argument_key(value: Any) -> tuple | None:
    """What of one kernel argument can change the kernel's IR; None when it is not understood."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype))
    if hasattr(value, "get_dtype") and hasattr(value, "get_size"):  # an Inductor IR buffer (TensorBox)
        return ("tensor", str(value.get_dtype()))
    if isinstance(value, torch.SymInt):  # functionalization's symbolic sizes
        return ("symbolic", str(value.node.expr))
    if isinstance(value, sympy.Basic):  # Inductor's symbolic sizes
        return ("symbolic", str(value))
    if isinstance(value, (bool, int, float, str)) or value is None:
        # Exact values: Triton specializes integers on divisibility and on 1, constexprs on their value.
        return (type(value).__name__, value)
    if isinstance(value, torch.dtype):
        return ("dtype", str(value))
    return None


def analysis_key(kernel: Any, kwargs: dict[str, Any], *rest: Any) -> tuple | None:
    """The cache key of one analysis call, or None when an argument is not one `_argument_key` knows."""
    parts = []
    for name, value in kwargs.items():
        part = _argument_key(value)
        if part is None:
            return None
        parts.append((name, *part))
    try:
        extra = repr(rest)
    except Exception:  # noqa: BLE001 - an unprintable extra argument: do not cache
        return None
    return (id(kernel), tuple(parts), extra)


def _memoize(analyse: Callable[..., Any], cache: dict[tuple, Any]) -> Callable[..., Any]:
    def memoized(kernel: Any, kwargs: dict[str, Any], *rest: Any) -> Any:
        key = analysis_key(kernel, kwargs, *rest)
        if key is None:
            return analyse(kernel, kwargs, *rest)
        if key not in cache:
            cache[key] = (kernel, analyse(kernel, kwargs, *rest))  # the kernel kept alive: its id stays unique
        return copy.deepcopy(cache[key][1])

    return memoized


@contextlib.contextmanager
def memoized_kernel_analysis() -> Iterator[dict[tuple, Any]]:
    """Within the block, torch's analysis of user-defined Triton launches runs once per distinct launch.

    Yields the cache (key -> (kernel, result)), which tests and logs may read."""
    cache: dict[tuple, Any] = {}
    try:
        from torch._higher_order_ops import triton_kernel_wrap as module
    except ImportError:  # pragma: no cover - torch without user-defined Triton kernel support
        yield cache
        return
    originals = {name: getattr(module, name) for name in ANALYSIS_FUNCTIONS if hasattr(module, name)}
    for name, analyse in originals.items():
        setattr(module, name, _memoize(analyse, cache))
    try:
        yield cache
    finally:
        for name, analyse in originals.items():
            setattr(module, name, analyse)
        if cache:
            log.info("dqcompile backend: %d distinct Triton launches analysed", len(cache))
