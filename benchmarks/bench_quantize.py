"""The fused activation quantizers against their bandwidth bound, tile configs swept, on a CUDA GPU.

    python benchmarks/bench_quantize.py --out runs/quantize.json [--baseline old_quantize.py]

Why: in the DiT-XL/2 step's profile (docs/fast_path.md) the quantizers cost 2.65 ms against about 1.1 ms
for the bf16 kernels they replace, and GELU + quantize (fc2's input) alone 55 us a call against bf16
GELU's 26.5 us. This script measures where that goes, per shape:

  bf16_gelu          aten's GELU (tanh) in bf16: what the fused kernel replaces
  bf16_to_int8_copy  an elementwise pass reading 2 bytes and writing 1 per element: the memory bound of
                     quantizing a bf16 activation (the scales add 8 bytes a row)
  inductor_aten      gelu + per-row absmax + divide + round + clamp as aten ops under torch.compile
                     (what Inductor makes of it, and whether its codes are the reference's)
  triton rows x warps  dqcompile's kernel at each tile config (rows per program, warps); `default`
                     marks the config `_rows_per_program` picks
  baseline           the same kernel from an older quantize.py (--baseline, a file path: the A/B of a
                     kernel change, e.g. `git show <commit>:dqcompile/backends/triton/quantize.py`)

Every Triton variant's codes and scales are checked bit for bit against the reference ops first.
Times: median GPU time of one call from CUDA-graph replays of consecutive calls (bench_gemm's timer).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import run_metadata  # noqa: E402
from bench_gemm import _median_ms  # noqa: E402

from dqcompile.backends import reference  # noqa: E402
from dqcompile.backends.triton import quantize  # noqa: E402

# (rows per program, warps) swept for every case.
TILE_CONFIGS = [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16)]
# (name, shape, GELU approximation or None for plain quantization): fc2's input at 16 and 64 images, and
# the attention output / a 1,152-wide activation at 16 images.
CASES = [("gelu_quantize", (4096, 4608), "tanh"), ("gelu_quantize", (16384, 4608), "tanh"),
         ("quantize_act", (4096, 4608), None), ("quantize_act", (4096, 1152), None)]


def _load_baseline(path: Path):
    """An older quantize.py as a module of the same package (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("dqcompile.backends.triton._baseline_quantize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(module, x: torch.Tensor, approximate: str | None) -> tuple[torch.Tensor, ...]:
    if approximate is None:
        return module.quantize_act(x, 8, 0, True)
    return module.gelu_quantize(x, approximate, 8, 0, True)


def _expected(x: torch.Tensor, approximate: str | None) -> tuple[torch.Tensor, ...]:
    return reference.quantize_act(x if approximate is None else F.gelu(x, approximate=approximate), 8, 0, True)


def _exact(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> bool | str:
    if all(torch.equal(a, b) for a, b in zip(actual, expected)):
        return True
    return f"{int((actual[0] != expected[0]).sum())} codes, {int((actual[1] != expected[1]).sum())} scales differ"


def _inductor_quantizer(approximate: str | None) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Symmetric per-row int8 quantization (of GELU(x)) written as aten ops, for Inductor to fuse."""
    def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = (x if approximate is None else F.gelu(x, approximate=approximate)).float()
        scale = torch.clamp(h.abs().amax(dim=-1, keepdim=True) / 127, min=torch.finfo(torch.float32).tiny)
        return torch.clamp(torch.round(h / scale), -127, 127).to(torch.int8), scale
    return torch.compile(quantize_rows, dynamic=False)


def _case(record: dict, x: torch.Tensor, approximate: str | None, baseline) -> None:
    expected = _expected(x, approximate)
    times = record["us"]
    exactness = record["bit_exact"]
    if approximate is not None:
        times["bf16_gelu"] = round(_median_ms(lambda: F.gelu(x, approximate=approximate)) * 1e3, 2)
    as_int16 = x.view(torch.int16)
    times["bf16_to_int8_copy"] = round(_median_ms(lambda: as_int16.to(torch.int8)) * 1e3, 2)
    compiled = _inductor_quantizer(approximate)
    codes, scale = compiled(x)
    exactness["inductor_aten"] = _exact((codes, scale.squeeze(-1)), (expected[0], expected[1].squeeze(-1)))
    times["inductor_aten"] = round(_median_ms(lambda: compiled(x)) * 1e3, 2)
    if baseline is not None:
        exactness["baseline"] = _exact(_launch(baseline, x, approximate), expected)
        times["baseline"] = round(_median_ms(lambda: _launch(baseline, x, approximate)) * 1e3, 2)
    default = quantize._rows_per_program
    channels = x.shape[-1]
    record["default_config"] = list(default(quantize._row_segments(1, channels)))
    try:
        for rows, warps in TILE_CONFIGS:
            quantize._rows_per_program = lambda segments, rows=rows, warps=warps: (rows, warps)
            name = f"triton r{rows} w{warps}"
            exactness[name] = _exact(_launch(quantize, x, approximate), expected)
            times[name] = round(_median_ms(lambda: _launch(quantize, x, approximate)) * 1e3, 2)
    finally:
        quantize._rows_per_program = default
    # GB/s of the kernel's own traffic (bf16 in, int8 codes and a float32 + int32 scale pair per row out)
    moved = x.numel() * 3 + x.shape[0] * 8
    record["gb_per_s"] = {name: round(moved / (us * 1e-6) / 1e9) for name, us in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, help="an older quantize.py to time beside the current one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quantize.py times CUDA kernels: no CUDA device here")
    baseline = _load_baseline(args.baseline) if args.baseline else None
    data = {"meta": run_metadata() | {"baseline": str(args.baseline) if args.baseline else None}, "cases": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, shape, approximate in CASES:
        x = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 2
        record = {"kernel": name, "shape": list(shape), "gelu": approximate, "us": {}, "bit_exact": {}}
        data["cases"].append(record)
        try:
            _case(record, x, approximate, baseline)
        except Exception as error:  # noqa: BLE001 - keep the other cases
            record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        print(json.dumps(record), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
