"""CPU speed of the embedded Fashion-MNIST DiT: fp32 against dqcompile w8a8 / w4a8, eager and compiled.

    python benchmarks/bench_cpu.py --out cpu.json                  # 32 and 100 rows, 2 threads
    python benchmarks/bench_cpu.py --rows 32 --repeats 5 --no-compile
    python benchmarks/bench_cpu.py --profile-linear                 # where a quantized linear's time goes

A "row" is one sample of the batch (each is 256 tokens of the 32 x 32 image in 2 x 2 patches, so 32 rows
feed the linears 8,192 token rows). Each figure is the median wall time of `--repeats` consecutive
forwards after warm-up calls, under torch.no_grad, with `--threads` intra-op threads. Compiled variants
record their compile time (first call) too. The machine's load average is recorded beside every
variant: on a shared machine other processes' work shows up in the figures, so read them with it.

On a machine shared with other work, `--omp-passive` (OMP_WAIT_POLICY=PASSIVE) stops OpenMP's idle threads
from spinning: with active waiting, every ATen call's barrier then costs a time slice, which made a 6 MB
elementwise add 5x slower on 2 threads than on 1 here (30 ms against 6 ms; 1.6 ms passive), and penalises
the variant with the most ATen calls most. On a quiet machine leave it off (the default policy is faster).

JSON: run metadata (device, torch, date, commit), the settings, and per rows and variant: ms median,
min and max, compile seconds, load average before and after, speed-up against fp32 eager and compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Must precede the OpenMP runtime's start (the torch import): see --omp-passive.
if "--omp-passive" in sys.argv:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import median_ms, run_metadata, timed  # noqa: E402

import dqcompile  # noqa: E402
from dqcompile.example_inputs import default_example_inputs  # noqa: E402
from dqcompile.fmnist import load_embedded_model  # noqa: E402

VARIANTS = ("fp32 eager", "fp32 compiled", "w8a8 eager", "w8a8 compiled", "w4a8 eager", "w4a8 compiled")


def build_variants(model: torch.nn.Module, names: list[str], compile_models: bool) -> dict[str, Callable]:
    """name -> a callable taking the forward's keyword inputs; quantized models are built once per preset."""
    callables: dict[str, Callable] = {}
    quantized: dict[str, torch.nn.Module] = {}
    for name in names:
        precision, mode = name.split()
        if mode == "compiled" and not compile_models:
            continue
        if precision == "fp32":
            target = model
        else:
            if precision not in quantized:
                quantized[precision] = dqcompile.quantize(model, precision, progress=False)
            target = quantized[precision]
        if mode == "compiled":
            backend = "inductor" if precision == "fp32" else "dqcompile"
            target = torch.compile(target, backend=backend)
        callables[name] = target
    return callables


def run(rows_list: list[int], names: list[str], repeats: int, warmup: int, compile_models: bool) -> dict[str, Any]:
    model = load_embedded_model()
    variants = build_variants(model, names, compile_models)
    results: dict[str, Any] = {}
    for rows in rows_list:
        inputs = default_example_inputs(model, batch=rows)
        per_rows: dict[str, Any] = {}
        for name, target in variants.items():
            load_before = os.getloadavg()[0]
            with torch.no_grad():
                entry: dict[str, Any] = {}
                if name.endswith("compiled"):
                    _, seconds = timed(lambda: target(**inputs))  # compiles (or recompiles for a new batch)
                    entry["first_call_s"] = round(seconds, 1)
                timing = median_ms(lambda: target(**inputs), runs=repeats, warmup=warmup, device="cpu")
                entry.update({key: round(value, 2) for key, value in timing.items()})
            entry["load_before"], entry["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
            per_rows[name] = entry
            print(f"rows {rows:4d}  {name:14s} {entry['ms']:9.1f} ms  (min {entry['min_ms']:.1f}, "
                  f"load {entry['load_before']:.2f} -> {entry['load_after']:.2f})", flush=True)
        for name, entry in per_rows.items():
            for baseline in ("fp32 eager", "fp32 compiled"):
                if baseline in per_rows and name != baseline:
                    entry[f"speedup_vs_{baseline.replace(' ', '_')}"] = round(per_rows[baseline]["ms"] / entry["ms"], 3)
        results[str(rows)] = per_rows
    return results


def profile_linear(tokens: int, k: int, n: int, w_bits: int, repeats: int) -> dict[str, Any]:
    """torch.profiler's self CPU time per op of one fp32 linear against its quantized twin (eager)."""
    from torch.profiler import ProfilerActivity, profile

    from dqcompile.quant import quantize_weight

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=generator)
    w = torch.randn(n, k, generator=generator)
    bias = torch.randn(n, generator=generator)
    weight = quantize_weight(w, w_bits, 0)
    ops = torch.ops.dqcompile

    def fp32() -> torch.Tensor:
        return torch.nn.functional.linear(x, w, bias)

    def quantized() -> torch.Tensor:
        qx, x_scale, x_zero = ops.quantize_act(x, 8, 0, False)
        return ops.int_linear(qx, x_scale, x_zero, weight.qweight, weight.scale, bias, w_bits, 0, torch.float32)

    report: dict[str, Any] = {"shape": {"tokens": tokens, "k": k, "n": n, "w_bits": w_bits}}
    for name, function in (("fp32 linear", fp32), (f"w{w_bits}a8 linear", quantized)):
        for _ in range(2):
            function()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                function()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        report[name] = {
            "ms_per_call": round(sum(e.self_cpu_time_total for e in rows) / 1e3 / repeats, 3),
            "self_ms_per_call": {e.key: round(e.self_cpu_time_total / 1e3 / repeats, 3) for e in rows
                                 if e.self_cpu_time_total / repeats >= 10},
        }
        print(name, json.dumps(report[name], indent=1), flush=True)
    return report


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 100])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    parser.add_argument("--profile-linear", action="store_true",
                        help="profile one fc1-shaped linear (8,192 x 192 -> 768), fp32 against w8a8 and w4a8")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE, for a machine shared with other work (see above)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    record: dict[str, Any] = {**run_metadata(), "threads": torch.get_num_threads(),
                              "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                              "command": " ".join(sys.argv),
                              "load_average_start": [round(v, 2) for v in os.getloadavg()]}
    started = time.perf_counter()
    if args.profile_linear:
        record["profile_linear"] = [profile_linear(8192, 192, 768, bits, args.repeats) for bits in (8, 4)]
    else:
        record["settings"] = {"rows": args.rows, "repeats": args.repeats, "warmup": args.warmup,
                              "compile": not args.no_compile}
        record["results"] = run(args.rows, args.variants, args.repeats, args.warmup, not args.no_compile)
    record["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    record["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(record, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
