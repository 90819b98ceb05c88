"""Small Triton helpers shared by the kernels: float32 operations rounded on their own, and casts that
round the same way on the GPU and in the Triton interpreter (TRITON_INTERPRET=1, the CPU tests).

The interpreter has no libdevice, and it casts float32 to bfloat16 by truncating the mantissa; these
helpers fall back to plain operations there and round bfloat16 casts on the bits, so that interpreted
kernels give the GPU's results.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - old Triton
    libdevice = None

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETED = tl.constexpr(INTERPRETING)


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """x [..., C] as M = prod(x.shape[:-1]) rows of C for a kernel: (x or a row-major copy, M, the element
    stride between rows).

    A contiguous x is taken as it is, with no reshape: torch.compile traces a launcher once per call site,
    and with a symbolic batch each reshape costs milliseconds of symbolic shape reasoning there
    (benchmarks/bench_launcher_trace.py).
    """
    channels = x.shape[-1]
    if x.is_contiguous():
        return x, math.prod(x.shape[:-1]), channels
    x2 = x.reshape(-1, channels)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x2.shape[0], x2.stride(0)


def launcher(kernel: Any) -> Any:
    """How a launcher launches `kernel`: through `torch.library.wrap_triton(kernel)` while torch traces (a
    torch.library.triton_op body under make_fx / AOTAutograd, or dynamo), so that the launch is recorded and
    Inductor's generated code makes it; directly in plain eager code on real tensors, as triton_op's own
    eager path does. (Eager launches through the wrapper measured 0.52-0.82 ms per GEMM on an H200 where
    the kernel takes 0.02-0.2 ms: torch dispatches them as a higher-order op.) Directly under the
    interpreter too, unless something traces: torch before 2.12 refuses to wrap an interpreted kernel."""
    if not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0:
        return kernel
    return torch.library.wrap_triton(kernel)


@triton.jit
def mul_rn(a, b):
    """float32 a * b, rounded on its own: never contracted with a following add into an FMA."""
    if _INTERPRETED:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def add_rn(a, b):
    """float32 a + b, rounded on its own."""
    if _INTERPRETED:
        return a + b
    else:
        return libdevice.add_rn(a, b)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype` (to nearest, ties to even, as torch and the GPU cast), as `dtype`.

    In the interpreter a bfloat16 target is rounded on the float32 bits first (finite values), since
    its own cast truncates.
    """
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
