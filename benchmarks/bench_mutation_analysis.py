"""What torch.compile's "which arguments does this launch write?" analysis costs per dqcompile launch (CPU).

For every traced launch of a user-defined Triton kernel, torch compiles the kernel to TTIR and walks it
to find the arguments it writes, at up to four stages of one compile (AOTAutograd's functionalization
in its metadata pass and in its trace, and twice in Inductor's lowering); dqcompile memoizes the answer
(dqcompile/backends/triton/mutation_analysis.py). This records one launch of each launcher at DiT-XL/2's
shapes (16 images of 256 tokens, hidden 1,152; launches recorded, not run), then times torch's analysis
of each against the memoized one. TTIR generation needs a target, not a GPU: the analysis is pointed at
an H200's (sm_90), as tests/test_triton_sm90.py compiles for it.

    python benchmarks/bench_mutation_analysis.py --out benchmarks/results/mutation_analysis_cpu.json

The per-forward figure multiplies by bench_launcher_trace.py's launches per forward and by the four
stages; the GPU compile time itself is bench_dit.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import run_metadata  # noqa: E402
from bench_launcher_trace import BATCH, HIDDEN, LAUNCHES_PER_FORWARD, TOKENS  # noqa: E402

STAGES = 4  # functionalization twice (AOT metadata pass and trace), Inductor's lowering twice


class _H200Driver:
    """The one thing torch's analysis asks the Triton driver: the target to generate TTIR for."""

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def record_launches() -> dict[str, tuple[Any, dict[str, Any]]]:
    """One launch per launcher at DiT-XL/2's shapes: name -> (kernel, arguments by name)."""
    from dqcompile.backends.triton import gemm, quantize

    recorded: list[tuple[Any, dict[str, Any]]] = []

    def recording_launcher(kernel: Any) -> Any:
        class Grid:
            def __getitem__(self, grid: Any) -> Any:
                return lambda *args, **kwargs: recorded.append((kernel, {**dict(zip(kernel.arg_names, args)),
                                                                         **kwargs}))
        return Grid()

    for module in (gemm, quantize):
        module.launcher = recording_launcher
        module.require_kernel_device = lambda *tensors: None
    gemm._tma_allowed = lambda device: True
    gemm._sm_count = lambda device: 132
    gemm._ensure_allocator = lambda: None

    rows = BATCH * TOKENS
    qx = torch.randint(-127, 128, (rows, HIDDEN), dtype=torch.int8)
    qw = torch.randint(-127, 128, (3 * HIDDEN, HIDDEN), dtype=torch.int8)
    x = torch.randn(BATCH, TOKENS, HIDDEN, dtype=torch.bfloat16)
    modulation = torch.randn(BATCH, HIDDEN, dtype=torch.bfloat16)
    launches = {
        "int_linear": lambda: gemm.triton_int_linear(qx, torch.rand(rows, 1), torch.zeros(rows, 1, dtype=torch.int32),
                                                     qw, torch.rand(3 * HIDDEN), None, 8, 0, torch.bfloat16),
        "ln_modulate_quantize": lambda: quantize.ln_modulate_quantize(x, None, None, 1e-6, modulation, modulation,
                                                                      8, 0, False),
        "gelu_quantize": lambda: quantize.gelu_quantize(torch.randn(BATCH, TOKENS, 4 * HIDDEN, dtype=torch.bfloat16),
                                                        "tanh", 8, 0, False),
        "quantize_act": lambda: quantize.quantize_act(x, 8, 0, False),
    }
    by_name = {}
    for name, launch in launches.items():
        recorded.clear()
        launch()
        (by_name[name],) = recorded
    return by_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the analysis compiles the real kernels to TTIR")
    import triton
    from torch._higher_order_ops import triton_kernel_wrap

    from dqcompile.backends.triton.mutation_analysis import _ANALYSIS_NAMES, _memoized

    triton.runtime.driver.set_active(_H200Driver())
    analysis = next(getattr(triton_kernel_wrap, name) for name in _ANALYSIS_NAMES if hasattr(triton_kernel_wrap, name))
    memoized = _memoized(analysis)
    result = {**run_metadata(), "shapes": {"batch": BATCH, "tokens": TOKENS, "hidden": HIDDEN},
              "stages_per_compile": STAGES, "launchers": {}}
    for name, (kernel, kwargs) in record_launches().items():
        torch_ms, memo_ms = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            answer = analysis(kernel, kwargs, {})
            torch_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            memo_answer = memoized(kernel, kwargs, {})
            memo_ms.append((time.perf_counter() - start) * 1000)
        assert repr(memo_answer) == repr(answer), (name, memo_answer, answer)
        entry = {"torch_ms": statistics.median(torch_ms), "memoized_ms": statistics.median(memo_ms),
                 "launches_per_forward": LAUNCHES_PER_FORWARD[name]}
        result["launchers"][name] = entry
        print(f"{name}: torch {entry['torch_ms']:.1f} ms, memoized {entry['memoized_ms']:.3f} ms per call", flush=True)
    # Per compile: torch analyses every launch at every stage; memoized, the first analysis of each kernel
    # configuration is torch's (one per launcher here; DiT-XL/2's four GEMM shapes may make a few more).
    entries = result["launchers"].values()
    result["per_compile_s_torch"] = sum(e["torch_ms"] * e["launches_per_forward"] * STAGES for e in entries) / 1000
    result["per_compile_s_memoized"] = sum(e["torch_ms"] + e["memoized_ms"] * (e["launches_per_forward"] * STAGES - 1)
                                           for e in entries) / 1000
    print(f"DiT-XL/2 compile ({sum(LAUNCHES_PER_FORWARD.values())} launches x {STAGES} stages): "
          f"torch {result['per_compile_s_torch']:.1f} s, memoized {result['per_compile_s_memoized']:.2f} s")
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
