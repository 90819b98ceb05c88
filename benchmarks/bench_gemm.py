"""Throughput of dqcompile's Triton GEMMs at DiT-XL/2 shapes against cuBLAS bf16, int8 and fp8, in one run.

    python benchmarks/bench_gemm.py --out runs/gemm.json [--sweep] [--jobs 12] [--budget-s 200]

Shapes: qkv 1152->3456, proj 1152->1152, fc1 1152->4608, fc2 4608->1152 at M = 4,096 and 16,384 rows (the
GEMM targets), and the same with the adaLN linear 1152->6912 at M = 16 and 64 rows (--small-m).
Per shape, in the same process:
  bf16      F.linear in bf16 (cuBLAS), the baseline
  int_mm    torch._int_mm, int8 x int8 -> int32, no scales at all (cuBLAS int8)
  fp8       torch._scaled_mm, e4m3 with row-wise scales (per row of x, per column of w), bf16 out, fast accumulation
  w8a8      triton_int_linear: int8 weights per channel, symmetric per-token activations, bias, bf16 out
  w4a8      the same with packed int4 weights (unpacked in the kernel)
  w8a8_asym the zero-point term on (asymmetric activations, precomputed weight sums)
  w8a8_e2e  quantize_act + w8a8: the whole quantized linear from a bf16 input
With --sweep, w8a8 and w4a8 run every tile config of the sweep lists below and keep the fastest; without
it, the config `choose_gemm_config` picks. Every Triton figure is checked bit for bit against the reference
backend first. Figures are TOP/s (TFLOP/s for bf16 and fp8) = 2 M N K / median time. Times are medians of CUDA-event
timings of CUDA-graph replays of N consecutive calls (the GPU's time; Inductor's generated code launches
these kernels with no Python in between), the same method for every row; the eager time of one call as
Python sees it (launch included, L2 flushed) is recorded beside the baselines and the default configs.

Fused quantizers: LayerNorm + adaLN modulate + quantize ([B, 256, 1152], B = 16, 64) and GELU + quantize
(fc2's input, [M, 4608]) against their unfused torch compositions.

The JSON is rewritten after every figure, so a run cut short keeps what it measured; a time budget skips
what is left once spent. `--jobs N` compiles the sweep's kernels in N processes first (Triton's disk cache
then serves the timing process). A short table is printed last. `--dry-run` runs the same code on CPU in
the Triton interpreter at shapes scaled down (a check of the script itself, no meaningful figures).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
import triton.testing  # noqa: E402

from bench_common import median_ms  # noqa: E402

from dqcompile.backends import reference  # noqa: E402
from dqcompile.backends.triton.gemm import (  # noqa: E402
    GemmConfig,
    choose_gemm_config,
    triton_int_linear,
    weight_group_sums,
)
from dqcompile.backends.triton.quantize import (  # noqa: E402
    gelu_quantize,
    ln_modulate_quantize,
    quantize_act,
)
from dqcompile.quant.packing import pack_int4  # noqa: E402

LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
SMALL_LAYERS = {**LAYERS, "adaln": (1152, 6912)}
ROWS = (4096, 16384)
SMALL_ROWS = (16, 64)
DRY_RUN = "--dry-run" in sys.argv
DEVICE = "cpu" if DRY_RUN else "cuda"
C = GemmConfig

# Tile configs timed by --sweep for M >= 4096 (labels: BMxBNxBK, gGROUP_M, wWARPS, sSTAGES, S swapped
# operands, F flattened tile loop, P pointer loads instead of TMA, pN programs).
SWEEP_W8 = [
    C(128, 256, 128, 8, 8, 3), C(128, 256, 128, 8, 8, 4), C(128, 128, 128, 8, 8, 4), C(128, 128, 128, 8, 8, 5),
    C(256, 128, 128, 8, 8, 3), C(128, 256, 128, 8, 16, 3), C(256, 128, 128, 8, 16, 3), C(128, 256, 256, 8, 8, 2),
    C(128, 128, 256, 8, 8, 3),
    C(128, 128, 128, 8, 4, 4), C(64, 256, 128, 8, 4, 4), C(128, 64, 128, 8, 4, 5),
    C(128, 128, 128, 8, 8, 2, num_programs=264), C(128, 128, 128, 8, 4, 3, num_programs=264),
    C(128, 256, 128, 8, 8, 3, flatten=False), C(128, 256, 128, 8, 8, 3, tma=False),
]
SWEEP_W4 = [
    C(128, 128, 128, 8, 8, 4, swap_ab=True), C(256, 128, 128, 8, 8, 3, swap_ab=True),
    C(128, 64, 128, 8, 4, 4, swap_ab=True), C(128, 256, 128, 8, 8, 4, swap_ab=True),
    C(256, 64, 128, 8, 8, 4, swap_ab=True), C(128, 256, 128, 8, 8, 3), C(128, 128, 128, 8, 8, 4),
    C(256, 128, 128, 8, 16, 3), C(128, 128, 128, 8, 4, 3, swap_ab=True, num_programs=264),
]


def sweep_small(m: int) -> list[GemmConfig]:
    block_m = max(16, triton.next_power_of_2(m))
    return [C(block_m, 64, 128, 1, 4, 4, swap_ab=True), C(block_m, 128, 128, 1, 4, 4, swap_ab=True),
            C(block_m, 32, 128, 1, 4, 4, swap_ab=True), C(block_m, 64, 128, 1, 4, 4, swap_ab=True, tma=False)]


def git_commit() -> str:
    """DQCOMPILE_COMMIT first (a copied tree may carry a stale .git), else git, else 'unknown'."""
    if os.environ.get("DQCOMPILE_COMMIT"):
        return os.environ["DQCOMPILE_COMMIT"]
    try:
        import subprocess

        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


class Run:
    """Collects results, logs each as it comes, and keeps the JSON file current."""

    def __init__(self, out: Path, budget_s: float, meta: dict) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict = {"meta": meta, "gemm": [], "fused": [], "skipped": [], "errors": []}
        self.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, what: str) -> bool:
        if self.elapsed() > self.budget_s:
            self.data["skipped"].append(what)
            return True
        return False

    def log(self, line: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {line}", flush=True)

    def flush(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1))


def _median_ms(fn: Callable[[], object], quick: bool = False) -> float:
    """Median time of one call, from CUDA-graph replays of `calls` consecutive calls (events around each
    replay): the GPU's time alone, without the Python launch cost of an eager call (which Inductor's
    generated code does not pay either). Consecutive calls leave the operands in L2 where they fit, the same
    for every method."""
    if DRY_RUN:
        return median_ms(fn, runs=1, warmup=0, device="cpu")["ms"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    calls = max(3, min(200, int((1.0 if quick else 3.0) / estimate)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    timing = median_ms(graph.replay, runs=7 if quick else 15, warmup=1, device="cuda")
    del graph
    return timing["ms"] / calls


def _eager_ms(fn: Callable[[], object]) -> float:
    """Median time of one eager call as a Python caller sees it (launch included), L2 flushed before each."""
    if DRY_RUN:
        return _median_ms(fn)
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _tops(m: int, n: int, k: int, ms: float) -> float:
    return round(2 * m * n * k / (ms * 1e-3) / 1e12, 1)


class Problem:
    """Inputs of one GEMM shape: bf16 x / w, int8 and int4 weight codes, activation codes, fp8 operands."""

    def __init__(self, m: int, k: int, n: int) -> None:
        gen = torch.Generator(device=DEVICE).manual_seed(m + 7 * k + n)
        self.m, self.k, self.n = m, k, n
        self.x = torch.randn(m, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
        self.w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.02
        self.bias = torch.randn(n, device=DEVICE, generator=gen, dtype=torch.bfloat16)
        self.codes8 = torch.randint(-127, 128, (n, k), device=DEVICE, generator=gen, dtype=torch.int8)
        self.packed4 = pack_int4(torch.randint(-7, 8, (n, k), device=DEVICE, generator=gen, dtype=torch.int8))
        self.w_scale = torch.rand(n, 1, device=DEVICE, generator=gen) * 1e-3 + 1e-4
        self.qx, self.xs, self.xz = reference.quantize_act(self.x, 8, 0, True)
        self.qx_a, self.xs_a, self.xz_a = reference.quantize_act(self.x, 8, 0, False)
        self.wsum8 = weight_group_sums(self.codes8, 8, 0)
        # fp8 e4m3 with row-wise scales, as torchao's Float8 row-wise recipe: x per row, w per output channel.
        fp8 = torch.float8_e4m3fn
        amax_x = self.x.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        amax_w = self.w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        self.x_fp8 = (self.x.float() * (448.0 / amax_x)).to(fp8)
        self.w_fp8 = (self.w.float() * (448.0 / amax_w)).to(fp8)
        self.x_fp8_scale = (amax_x / 448.0).float()
        self.w_fp8_scale = (amax_w / 448.0).float().t().contiguous()

    def w8a8(self, config: GemmConfig | None) -> Callable[[], torch.Tensor]:
        return lambda: triton_int_linear(self.qx, self.xs, None, self.codes8, self.w_scale, self.bias, 8, 0,
                                         torch.bfloat16, config=config)

    def w4a8(self, config: GemmConfig | None) -> Callable[[], torch.Tensor]:
        return lambda: triton_int_linear(self.qx, self.xs, None, self.packed4, self.w_scale, self.bias, 4, 0,
                                         torch.bfloat16, config=config)

    def expected(self, w_bits: int) -> torch.Tensor:
        qw = self.codes8 if w_bits == 8 else self.packed4
        return reference.int_linear(self.qx, self.xs, self.xz, qw, self.w_scale, self.bias, w_bits, 0,
                                    torch.bfloat16)


def _fp8_linear(p: Problem, record: dict) -> Callable[[], torch.Tensor]:
    """cuBLAS fp8 through torch._scaled_mm with row-wise scales and the bias fused, or without the bias where
    this torch refuses a bias with row-wise scales (recorded)."""
    def with_bias() -> torch.Tensor:
        return torch._scaled_mm(p.x_fp8, p.w_fp8.t(), scale_a=p.x_fp8_scale, scale_b=p.w_fp8_scale, bias=p.bias,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    def without_bias() -> torch.Tensor:
        return torch._scaled_mm(p.x_fp8, p.w_fp8.t(), scale_a=p.x_fp8_scale, scale_b=p.w_fp8_scale,
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    try:
        with_bias()
        return with_bias
    except Exception as error:  # noqa: BLE001
        record["fp8_note"] = f"bias refused with row-wise scales ({type(error).__name__}); timed without bias"
        return without_bias


def _check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> bool:
    """Bit-identical to the reference? Raises beyond one output rounding step (the contract)."""
    if torch.equal(actual, expected):
        return True
    diff = (actual.float() - expected.float()).abs()
    bound = torch.finfo(expected.dtype).eps * expected.float().abs() + 1e-6
    bad = int((diff > bound).sum())
    if bad:
        raise AssertionError(f"{what}: {bad} outputs beyond one {expected.dtype} rounding step "
                             f"(max abs diff {diff.max().item():.3g})")
    return False


def _time_triton(run: Run, record: dict, name: str, fn: Callable[[], torch.Tensor], expected: torch.Tensor,
                 label: str, quick: bool) -> float | None:
    """Check then time one Triton config; records it under record[name][label]."""
    p = record["_problem"]
    try:
        exact = _check(fn(), expected, f"{name} {label} {record['layer']} M={p.m}")
        ms = _median_ms(fn, quick)
    except Exception as error:  # noqa: BLE001  (a config the device refuses: out of shared memory, ...)
        message = f"{record['layer']} M={p.m} {name} {label}: {type(error).__name__}: {str(error)[:300]}"
        run.data["errors"].append(message)
        run.log("ERROR " + message)
        return None
    record[name][label] = {"ms": round(ms, 5), "tops": _tops(p.m, p.n, p.k, ms), "bit_exact": exact}
    return ms


def _gemm_case(run: Run, layer: str, m: int, k: int, n: int, sweep: bool) -> None:
    if run.over_budget(f"{layer} M={m}"):
        return
    p = Problem(m, k, n)
    record: dict = {"layer": layer, "m": m, "k": k, "n": n, "baselines": {}, "w8a8": {}, "w4a8": {}, "other": {},
                    "_problem": p}
    # cuBLAS baselines.
    baselines: dict[str, Callable[[], torch.Tensor]] = {"bf16": lambda: F.linear(p.x, p.w, p.bias)}
    if m > 16:
        baselines["int_mm"] = lambda: torch._int_mm(p.qx, p.codes8.t())
        baselines["fp8"] = _fp8_linear(p, record)
    for name, fn in baselines.items():
        try:
            fn()
            ms = _median_ms(fn)
            record["baselines"][name] = {"ms": round(ms, 5), "tops": _tops(m, n, k, ms),
                                         "eager_ms": round(_eager_ms(fn), 5)}
        except Exception as error:  # noqa: BLE001
            run.data["errors"].append(f"{layer} M={m} {name}: {type(error).__name__}: {str(error)[:300]}")
    if "int_mm" in record["baselines"] and not torch.equal(baselines["int_mm"](), reference.int_matmul(p.qx, p.codes8)):
        run.data["errors"].append(f"{layer} M={m} int_mm: differs from the reference int_matmul")

    # Triton: the default config, then the sweep.
    for name, w_bits, make in (("w8a8", 8, p.w8a8), ("w4a8", 4, p.w4a8)):
        expected = p.expected(w_bits)
        default = choose_gemm_config(m, n, k, 0, p.x.device, w_int4=w_bits == 4)
        record.setdefault("default_config", {})[name] = default.label()
        if _time_triton(run, record, name, make(default), expected, default.label(), quick=False) is not None:
            record[name][default.label()]["eager_ms"] = round(_eager_ms(make(default)), 5)
        if sweep:
            configs = sweep_small(m) if m <= 64 else (SWEEP_W8 if w_bits == 8 else SWEEP_W4)
            for config in configs:
                if config.label() not in record[name]:
                    _time_triton(run, record, name, make(config), expected, config.label(), quick=True)
        timed = {label: r for label, r in record[name].items()}
        if timed:
            best = min(timed, key=lambda label: timed[label]["ms"])
            record.setdefault("best", {})[name] = best
    # The zero-point term, and the whole quantized linear from bf16, with the default config.
    if m > 64:
        expected = reference.int_linear(p.qx_a, p.xs_a, p.xz_a, p.codes8, p.w_scale, p.bias, 8, 0, torch.bfloat16)
        _time_triton(run, record, "other", lambda: triton_int_linear(
            p.qx_a, p.xs_a, p.xz_a, p.codes8, p.w_scale, p.bias, 8, 0, torch.bfloat16, p.wsum8), expected,
            "w8a8_asym", quick=True)

        def e2e() -> torch.Tensor:
            q, s, _ = quantize_act(p.x, 8, 0, True)
            return triton_int_linear(q, s, None, p.codes8, p.w_scale, p.bias, 8, 0, torch.bfloat16)

        _time_triton(run, record, "other", e2e, p.expected(8), "w8a8_e2e", quick=True)
    del record["_problem"]
    summary = _summary(record)
    record["summary"] = summary
    run.data["gemm"].append(record)
    run.flush()
    run.log(f"{layer:5s} M={m:6d} " + "  ".join(f"{key} {value}" for key, value in summary.items()))


def _summary(record: dict) -> dict:
    """bf16 / int_mm / fp8 / best w8a8 / best w4a8 TOP/s and the ratios the targets use."""
    base = {name: r["tops"] for name, r in record["baselines"].items()}
    out = dict(base)
    for name in ("w8a8", "w4a8"):
        best = record.get("best", {}).get(name)
        if best:
            out[name] = record[name][best]["tops"]
            out[f"{name}_config"] = best
        default = record.get("default_config", {}).get(name)
        if default in record[name]:
            out[f"{name}_default"] = record[name][default]["tops"]
    if out.get("w8a8") and base.get("bf16"):
        out["w8a8/bf16"] = round(out["w8a8"] / base["bf16"], 2)
    if out.get("w8a8") and base.get("fp8"):
        out["w8a8/fp8"] = round(out["w8a8"] / base["fp8"], 2)
    if out.get("w4a8") and out.get("w8a8"):
        out["w4a8/w8a8"] = round(out["w4a8"] / out["w8a8"], 2)
    return out


def _fused_cases(run: Run) -> None:
    """LayerNorm + modulate + quantize and GELU + quantize against their unfused compositions."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for batch in (1,) if DRY_RUN else (16, 64):
        if run.over_budget(f"ln_modulate_quantize B={batch}"):
            return
        x = torch.randn(batch, 256, 1152, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 2
        mod_scale = torch.randn(batch, 1152, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.5
        mod_shift = torch.randn(batch, 1152, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.5

        def unfused() -> object:
            h = F.layer_norm(x, (1152,), eps=1e-6) * (1 + mod_scale[:, None]) + mod_shift[:, None]
            return reference.quantize_act(h, 8, 0, True)

        cases = {"fused_triton": lambda: ln_modulate_quantize(x, None, None, 1e-6, mod_scale, mod_shift, 8, 0, True),
                 "unfused_torch": unfused}
        record = {"kernel": "ln_modulate_quantize", "shape": [batch, 256, 1152],
                  "us": {name: round(_median_ms(fn) * 1e3, 2) for name, fn in cases.items()}}
        run.data["fused"].append(record)
        run.log(f"ln+mod+quant B={batch}: {record['us']}")
    for m in (64,) if DRY_RUN else (4096, 16384):
        if run.over_budget(f"gelu_quantize M={m}"):
            return
        x = torch.randn(m, 4608, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 2
        exact = {}
        for approximate in ("tanh", "none"):
            fused = gelu_quantize(x, approximate, 8, 0, True)
            unfused = reference.quantize_act(F.gelu(x, approximate=approximate), 8, 0, True)
            exact[approximate] = all(torch.equal(a, b) for a, b in zip(fused, unfused)) or (
                f"{int((fused[0] != unfused[0]).sum())} codes, {int((fused[1] != unfused[1]).sum())} scales differ")
        cases = {"fused_triton": lambda: gelu_quantize(x, "tanh", 8, 0, True),
                 "gelu_then_triton_quantize": lambda: quantize_act(F.gelu(x, approximate="tanh"), 8, 0, True),
                 "unfused_torch": lambda: reference.quantize_act(F.gelu(x, approximate="tanh"), 8, 0, True),
                 "bf16_gelu_only": lambda: F.gelu(x, approximate="tanh")}
        record = {"kernel": "gelu_quantize", "shape": [m, 4608], "bit_exact_vs_unfused": exact,
                  "us": {name: round(_median_ms(fn) * 1e3, 2) for name, fn in cases.items()}}
        run.data["fused"].append(record)
        run.log(f"gelu+quant M={m}: {record['us']} bit-exact {exact}")
    run.flush()


def _precompile_worker(jobs: list[tuple[str, int, int, int, str]]) -> list[str]:
    """Launch each (kind, m, k, n, config repr) once so that Triton's disk cache holds its kernel."""
    failures = []
    for kind, m, k, n, config_repr in jobs:
        config = eval(config_repr, {"GemmConfig": GemmConfig})  # noqa: S307  (our own repr)
        qx = torch.zeros(m, k, dtype=torch.int8, device=DEVICE)
        qw = torch.zeros(n, k // 2 if kind == "w4a8" else k, dtype=torch.uint8 if kind == "w4a8" else torch.int8,
                         device=DEVICE)
        try:
            triton_int_linear(qx, torch.ones(m, 1, device=DEVICE), None, qw, torch.ones(n, 1, device=DEVICE),
                              torch.zeros(n, device=DEVICE, dtype=torch.bfloat16), 4 if kind == "w4a8" else 8, 0,
                              torch.bfloat16, config=config)
        except Exception as error:  # noqa: BLE001
            failures.append(f"{kind} {config.label()}: {type(error).__name__}: {str(error)[:200]}")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return failures


def _precompile(run: Run, jobs: int, shapes: list[tuple[int, int, int]], sweep: bool) -> None:
    """Compile the kernels the run will launch in `jobs` processes (compilation is single-threaded per kernel)."""
    work: dict[str, tuple[str, int, int, int, str]] = {}
    for m, k, n in shapes:
        for kind, w4 in (("w8a8", False), ("w4a8", True)):
            configs = [choose_gemm_config(m, n, k, 0, torch.device(DEVICE), w_int4=w4)]
            if sweep:
                configs += sweep_small(m) if m <= 64 else (SWEEP_W4 if w4 else SWEEP_W8)
            for config in configs:
                # Kernels specialize on constexprs (the program count among them) and on divisibility by 16
                # of the integer arguments: at M >= 4096 every shape has more tiles than programs, so one
                # launch per (kind, config) covers them all; small M compiles per shape.
                key = f"{kind} {config.label()}" + (f" {m} {k} {n}" if m <= 64 else "")
                work.setdefault(key, (kind, m, k, n, repr(config)))
    items = list(work.values())
    chunks = [items[i::jobs] for i in range(jobs)]
    t0 = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            for failures in pool.map(_precompile_worker, [c for c in chunks if c]):
                for failure in failures:
                    run.data["errors"].append("precompile " + failure)
    except Exception as error:  # noqa: BLE001  (the timing process compiles what is missing)
        run.data["errors"].append(f"precompile: {type(error).__name__}: {str(error)[:300]}")
    run.log(f"precompiled {len(items)} GEMM kernels in {jobs} processes, {time.perf_counter() - t0:.1f} s")


def _print_table(run: Run) -> None:
    print("\nGEMM throughput, TOP/s (bf16, fp8: TFLOP/s); w8a8 / w4a8: the fastest config timed "
          "(default-config figure in brackets)")
    print(f"{'layer':6s} {'M':>6s} {'bf16':>7s} {'int_mm':>7s} {'fp8':>7s} {'w8a8':>15s} {'w4a8':>15s} "
          f"{'w8/bf16':>8s} {'w8/fp8':>7s} {'w4/w8':>6s}  best configs")
    for record in run.data["gemm"]:
        s = record["summary"]

        def cell(key: str, width: int = 7) -> str:
            value = s.get(key)
            return f"{value:{width}.1f}" if isinstance(value, (int, float)) else f"{'-':>{width}s}"

        def tri(key: str) -> str:
            best, default = s.get(key), s.get(f"{key}_default")
            if best is None:
                return f"{'-':>15s}"
            return f"{best:7.1f} [{default if default is not None else '-':>5}]"

        ratios = " ".join(f"{s.get(key, '-'):>{w}}" for key, w in (("w8a8/bf16", 8), ("w8a8/fp8", 7),
                                                                      ("w4a8/w8a8", 6)))
        print(f"{record['layer']:6s} {record['m']:6d} {cell('bf16')} {cell('int_mm')} {cell('fp8')} {tri('w8a8')} "
              f"{tri('w4a8')} {ratios}  {s.get('w8a8_config', '-')} / {s.get('w4a8_config', '-')}")
    for record in run.data["fused"]:
        print(f"{record['kernel']} {record['shape']}: " + ", ".join(f"{k} {v:.1f} us" for k, v in record["us"].items())
              + (f"; bit-exact vs unfused {record['bit_exact_vs_unfused']}" if "bit_exact_vs_unfused" in record
                 else ""))
    meta = run.data["meta"]
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, commit "
          f"{meta['git_commit']}, {run.elapsed():.0f} s; skipped: {run.data['skipped'] or 'nothing'}; "
          f"errors: {len(run.data['errors'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--sweep", action="store_true", help="time every config of the sweep lists per shape")
    parser.add_argument("--small-m", action="store_true", help="also M = 16 and 64 (adaLN / timestep linears)")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-quantizer timings")
    parser.add_argument("--jobs", type=int, default=0, help="compile the kernels in this many processes first")
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset of " + ",".join(LAYERS))
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip remaining figures after this long")
    parser.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter at tiny shapes")
    args = parser.parse_args()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run needs TRITON_INTERPRET=1 in the environment")
        global ROWS, SMALL_ROWS, SWEEP_W8, SWEEP_W4
        ROWS, SMALL_ROWS = (96,), (16,)
        LAYERS.update(qkv=(128, 192), proj=(128, 64), fc1=(128, 256), fc2=(256, 64))
        SMALL_LAYERS.update(LAYERS, adaln=(128, 96))
        SWEEP_W8, SWEEP_W4 = SWEEP_W8[-2:], SWEEP_W4[:2]
    elif not torch.cuda.is_available():
        sys.exit("bench_gemm.py needs a CUDA device")
    meta = {
        "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "sm_count": None if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "timing": "ms: median over CUDA-graph replays (CUDA events around each) of N consecutive calls, divided by "
                  "N (N fills ~3 ms, ~1 ms for sweep configs): GPU time without Python launch cost, operands "
                  "warm in L2 where they fit, the same for every method; eager_ms: triton.testing.do_bench "
                  "median of single eager calls, L2 flushed, launch included",
    }
    run = Run(args.out, args.budget_s, meta)
    run.log(f"{meta['device']} torch {meta['torch']} triton {meta['triton']} commit {meta['git_commit']}")
    layers = [name for name in args.layers.split(",") if name]
    cases = [(layer, m, *LAYERS[layer]) for m in ROWS for layer in layers]
    if args.small_m:
        cases += [(layer, m, *SMALL_LAYERS[layer]) for m in SMALL_ROWS for layer in SMALL_LAYERS]
    if args.jobs > 1:
        _precompile(run, args.jobs, [(m, k, n) for _, m, k, n in cases], args.sweep)
    for layer, m, k, n in cases:
        try:
            _gemm_case(run, layer, m, k, n, args.sweep)
        except Exception as error:  # noqa: BLE001  (one shape's failure does not cost the others)
            run.data["errors"].append(f"{layer} M={m}: {type(error).__name__}: {str(error)[:300]}")
            run.log(f"ERROR {layer} M={m}: {type(error).__name__}: {error}")
    if not args.no_fused:
        try:
            _fused_cases(run)
        except Exception as error:  # noqa: BLE001  (keep the GEMM figures and the table)
            run.data["errors"].append(f"fused: {type(error).__name__}: {str(error)[:300]}")
            run.log(f"ERROR fused: {type(error).__name__}: {error}")
    run.flush()
    _print_table(run)


if __name__ == "__main__":
    main()
