"""What a Triton launcher costs torch.compile: milliseconds to trace one call with a symbolic batch (CPU).

torch.compile traces the Python body of each `triton_op` launcher once per call site, under fake tensors
with a symbolic batch when the batch is dynamic (AOTAutograd's metadata pass, then the trace it compiles),
so DiT-XL/2's forward pays for about 168 GEMM and 112 quantizer launchers on every trace. This runs each
launcher at DiT-XL/2's shapes (16 images of 256 tokens, hidden 1,152) under a fresh FakeTensorMode whose
batch dimension is symbolic and whose weights are static, as dynamo presents them, with the kernel launch
itself replaced by a no-op (the launch is recorded, not run: no GPU needed). It runs under the Triton
interpreter's device rules, so set TRITON_INTERPRET=1:

    TRITON_INTERPRET=1 python benchmarks/bench_launcher_trace.py --out benchmarks/results/launcher_trace_cpu.json

The figure per forward is the sum over DiT-XL/2's launches; the GPU compile profile (bench_dit.py
--profile-compile) says how much of the compile it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_metadata  # noqa: E402

BATCH, TOKENS, HIDDEN, LAYERS = 16, 256, 1152, 28
# Launches per DiT-XL/2 forward: q, k, v, out, fc1, fc2 GEMMs; the two adaLN LayerNorm quantizers
# (attention and MLP inputs); the GELU quantizer (fc2 input); the attention output's quantizer.
LAUNCHES_PER_FORWARD = {"int_linear": 6 * LAYERS, "ln_modulate_quantize": 2 * LAYERS,
                        "gelu_quantize": LAYERS, "quantize_act": LAYERS}


class _NoLaunch:
    """Stands in for torch.library.wrap_triton(kernel): indexing with a grid gives a launch that does nothing."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def trace_ms(launch: Callable[..., object], tensors: tuple[torch.Tensor, ...], dynamic_batch: tuple[bool, ...],
             repeats: int) -> float:
    """Median milliseconds of one `launch(*fakes)` under a fresh FakeTensorMode (first call not counted)."""
    times = []
    for repeat in range(repeats + 1):
        mode = FakeTensorMode(shape_env=ShapeEnv())
        with mode:
            fakes = [mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[
                DimDynamic.DYNAMIC if dim == 0 and dynamic else DimDynamic.STATIC for dim in range(t.dim())]))
                for t, dynamic in zip(tensors, dynamic_batch, strict=True)]
            start = time.perf_counter()
            launch(*fakes)
            if repeat:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (the launchers take CPU tensors only under the interpreter)")
    torch.library.wrap_triton = _NoLaunch  # the launchers look it up at each call
    from dqcompile.backends.triton import gemm, quantize

    gen = torch.Generator().manual_seed(0)
    qx = torch.randint(-127, 128, (BATCH, TOKENS, HIDDEN), dtype=torch.int8, generator=gen)
    x_scale, x_zero = torch.rand(BATCH, TOKENS, 1), torch.zeros(BATCH, TOKENS, 1, dtype=torch.int32)
    qw = torch.randint(-127, 128, (3 * HIDDEN, HIDDEN), dtype=torch.int8, generator=gen)
    w_scale, bias = torch.rand(3 * HIDDEN, 1), torch.randn(3 * HIDDEN, dtype=torch.bfloat16)
    w_sum = gemm.weight_group_sums(qw, 8, 0)
    x = torch.randn(BATCH, TOKENS, HIDDEN, dtype=torch.bfloat16)
    hidden = torch.randn(BATCH, TOKENS, 4 * HIDDEN, dtype=torch.bfloat16)
    modulation = torch.randn(BATCH, HIDDEN, dtype=torch.bfloat16)
    cases = {
        "int_linear": (lambda qx, xs, xz, qw, ws, b, wsum: gemm.triton_int_linear(qx, xs, xz, qw, ws, b, 8, 0,
                                                                                  torch.bfloat16, wsum),
                       (qx, x_scale, x_zero, qw, w_scale, bias, w_sum), (True, True, True, False, False, False, False)),
        "ln_modulate_quantize": (lambda x, m: quantize.ln_modulate_quantize(x, None, None, 1e-6, m, m, 8, 0, False),
                                 (x, modulation), (True, True)),
        "gelu_quantize": (lambda h: quantize.gelu_quantize(h, "tanh", 8, 0, False), (hidden,), (True,)),
        "quantize_act": (lambda x: quantize.quantize_act(x, 8, 0, False), (x,), (True,)),
        "torch.empty_like (floor: one op on a fresh symbolic batch)": (lambda x: torch.empty_like(x), (x,), (True,)),
    }
    result = {**run_metadata(), "shapes": {"batch": BATCH, "tokens": TOKENS, "hidden": HIDDEN}, "launchers": {}}
    for name, (launch, tensors, dynamic) in cases.items():
        ms = trace_ms(launch, tensors, dynamic, args.repeats)
        result["launchers"][name] = {"trace_ms": ms, "launches_per_forward": LAUNCHES_PER_FORWARD.get(name)}
        print(f"{name}: {ms:.1f} ms per traced call", flush=True)
    per_forward = sum(entry["trace_ms"] * entry["launches_per_forward"] for entry in result["launchers"].values()
                      if entry["launches_per_forward"])
    result["per_forward_s"] = per_forward / 1000
    print(f"DiT-XL/2 forward ({sum(LAUNCHES_PER_FORWARD.values())} launches): {per_forward / 1000:.1f} s per trace")
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
