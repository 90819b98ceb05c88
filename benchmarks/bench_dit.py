"""Milliseconds per denoising step of the DiT-XL/2 architecture: bf16, torchao and dqcompile side by side.

    python benchmarks/bench_dit.py --out runs/dit.json                    # every variant, ~8 min on an H100
    python benchmarks/bench_dit.py --out runs/dit.json --variants compile,dqcompile_w8a8
    python benchmarks/bench_dit.py --quick --out /tmp/dit_quick.json      # tiny config on CPU: a smoke check

The model: diffusers DiTTransformer2DModel with DiT-XL/2's config (28 layers, 16 heads x 72, patch 2,
32x32x4 latents: 256 tokens), random weights (speed does not depend on them), bf16 on CUDA. A denoising
step with classifier-free guidance is one transformer forward on 2 x images rows (conditional and null
class); 8 and 32 images give 16 and 64 rows.

Variants (--variants picks a subset and its order):
  eager              the bf16 model as it is
  compile            torch.compile(model), Inductor's default mode: the baseline to beat
  compile_ro         torch.compile(model, mode="reduce-overhead"): Inductor with CUDA graphs
  dqcompile_w8a8     dqcompile.quantize(model, "w8a8"), torch.compile(backend="dqcompile"): Triton kernels
  dqcompile_w8a8_ro  the same with mode="reduce-overhead"
  dqcompile_w4a8     as dqcompile_w8a8 with the "w4a8" preset (packed int4 weights)
  torchao_fp8        torchao Float8DynamicActivationFloat8Weight (per row) + torch.compile
  torchao_int8       torchao Int8DynamicActivationInt8Weight + torch.compile
torchao quantizes the same linears as dqcompile (every nn.Linear but the spec's keep_float ones: timestep
and class embeddings, adaLN modulation, final projection), so both compress the same layers; torchao
variants are skipped, with a note, when torchao is not installed. They compile with static shapes
(one compile per row count: with the batch marked dynamic, earlier runs did not finish compiling).
GEMM throughput per shape is benchmarks/bench_gemm.py's.

Timing, one method for every variant: CUDA events around N consecutive calls (no cache flush between
them, as a sampler runs its steps), ms per call, median of 5 such runs. Figures per variant and row
count: ms per step as a user calls it; the same step captured once as a CUDA graph and its replays timed
the same way (what the GPU alone needs); host ms (the CPU's time to issue one step, the GPU idle
before); the first call (compile) in seconds, with torch.compile's own phase times; weight memory (every parameter and buffer, tensor
subclasses by their inner tensors); the relative L2 error of the output against the bf16 model's; and a
per-kernel-class breakdown of GPU time (GEMM, quantize, attention, other) from torch.profiler. Compiled
dqcompile and bf16 variants mark the batch dimension dynamic, so one compile serves both row counts.

Each variant runs in its own subprocess (with --gpus, pinned to its GPU's share of the CPU cores), under a time limit (the rest of --budget-s, at most
--variant-timeout-s), so a compile that hangs or fails costs only its own figures. Progress goes to
stdout as it happens; the JSON file (--out) is rewritten after every variant, with the run's device,
date and commit (bench_common.run_metadata), and a Markdown table for the README is printed at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import cpu_groups, median_ms, run_metadata  # noqa: E402

DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
VARIANTS = ("eager", "compile", "compile_ro", "dqcompile_w8a8", "dqcompile_w8a8_ro", "dqcompile_w4a8", "torchao_fp8",
            "torchao_int8")
COMPILED = {"compile", "compile_ro", "dqcompile_w8a8", "dqcompile_w8a8_ro", "dqcompile_w4a8", "torchao_fp8",
            "torchao_int8"}
# Compiled with static shapes: one compile per row count (see the module docstring).
STATIC_SHAPES = {"torchao_fp8", "torchao_int8"}
# Consecutive calls per timed run, and runs per figure (the median is reported).
CALLS_PER_RUN, RUNS = 20, 5
# --profile-compile (passed to the workers as this variable): cProfile each compiling first call; it slows
# the compile, so its first-call seconds are not the compile time of other runs.
PROFILE_COMPILE = os.environ.get("BENCH_DIT_PROFILE_COMPILE") == "1"
# A variant is not started with less time left than this: a DiT-XL/2 compile alone takes about a minute.
MIN_VARIANT_S = 45.0


class Skipped(Exception):
    """A variant that cannot run here (a missing package, no CUDA); the message says why."""


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# ------------------------------------------------------------------------------------------ setup

def build_model(config: dict, device: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import DiTTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(bf16) warns about modules to keep in float32: DiT has none
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of 675M parameters on CPU is slow
        model = DiTTransformer2DModel(**config)
    return model.to(dtype).eval()


def guided_inputs(config: dict, rows: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One guided step's transformer inputs: rows / 2 images twice, with their class and the null class."""
    generator = torch.Generator().manual_seed(rows)
    images = rows // 2
    latents = torch.randn(images, config["in_channels"], config["sample_size"], config["sample_size"],
                          generator=generator)
    labels = torch.randint(0, config["num_embeds_ada_norm"], (images,), generator=generator)
    null = torch.full((images,), config["num_embeds_ada_norm"])  # the class-dropout label
    return {
        "hidden_states": torch.cat([latents, latents]).to(device, dtype),
        "timestep": torch.full((rows,), 500, device=device),
        "class_labels": torch.cat([labels, null]).to(device),
    }


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; tensor subclasses (torchao's quantized weights) by their inner tensors."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def keeps_float(fqn: str) -> bool:
    """Whether dqcompile's presets leave this linear in float (the same rule decides torchao's layers)."""
    from dqcompile.spec import QuantSpec

    return QuantSpec.resolve("w8a8").keep_float_reason(fqn) is not None


def torchao_config(kind: str) -> Any:
    """torchao's config object for `kind` ("fp8" or "int8"), by the names of torchao >= 0.10 or older ones."""
    try:
        import torchao.quantization as tq
    except ImportError as error:
        raise Skipped(f"torchao is not installed ({error})") from None
    if kind == "fp8":
        from torchao.quantization.granularity import PerRow

        if hasattr(tq, "Float8DynamicActivationFloat8WeightConfig"):
            return tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return tq.float8_dynamic_activation_float8_weight(granularity=PerRow())
    if hasattr(tq, "Int8DynamicActivationInt8WeightConfig"):
        return tq.Int8DynamicActivationInt8WeightConfig()
    return tq.int8_dynamic_activation_int8_weight()


def prepare(variant: str, model: nn.Module, device: str) -> tuple[Callable[..., Any], nn.Module, dict]:
    """(the callable to time, the module holding its weights, notes) for a model variant."""
    mode = "reduce-overhead" if variant.endswith("_ro") else None
    base = variant.removesuffix("_ro")
    if base == "eager":
        return model, model, {}
    if base == "compile":
        return torch.compile(model, mode=mode), model, {"mode": mode or "default"}
    if base.startswith("torchao_"):
        from torchao.quantization import quantize_

        config = torchao_config(base.removeprefix("torchao_"))
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not keeps_float(fqn))
        return torch.compile(model, dynamic=False), model, {"torchao_config": type(config).__name__}
    import dqcompile

    qmodel = dqcompile.quantize(model, base.removeprefix("dqcompile_"), progress=False)
    notes = {"mode": mode or "default", "report": str(qmodel.report).splitlines()[0]}
    return torch.compile(qmodel, backend="dqcompile", mode=mode), qmodel, notes


# ------------------------------------------------------------------------------------------ timing

def step_ms(fn: Callable[[], object], device: str) -> float:
    """ms per call with bench_common's timer: CALLS_PER_RUN consecutive calls per run, median of RUNS runs
    after a warm-up run (CUDA events on the GPU)."""
    return median_ms(fn, calls=CALLS_PER_RUN, runs=RUNS, warmup=1, device=device)["ms"]


def cuda_graph_ms(step: Callable[[dict], object], inputs: dict[str, torch.Tensor]) -> float:
    """Median ms of the step captured once as a CUDA graph and replayed (no Python, no launch overhead)."""
    static = {name: tensor.clone() for name, tensor in inputs.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static)
    return step_ms(graph.replay, "cuda")


def host_ms(step: Callable[[dict], object], batch: dict[str, torch.Tensor]) -> float:
    """Median ms the CPU spends issuing one step (Python, dispatch, launches), the GPU idle beforehand:
    when this exceeds the GPU time (the CUDA graph figure), the step is bound by the host."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(batch)
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def profile_step(step: Callable[[dict], object], batch: dict[str, torch.Tensor], top: int = 12) -> dict:
    """torch.profiler over 3 steps: the ops with the most CPU time and the kernels with the most GPU time,
    per step, so a figure that misses its target says where its time goes."""
    from torch.profiler import ProfilerActivity, profile

    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(batch)
        torch.cuda.synchronize()
    events = prof.key_averages()

    def rows(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
        return [{"name": e.key[:120], "calls_per_step": e.count / steps,
                 "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                 "self_gpu_ms_per_step": round(e.self_device_time_total / 1e3 / steps, 3)} for e in ranked]

    classes: dict[str, float] = {}
    for event in events:
        if event.self_device_time_total > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kernel_class(event.key)
            classes[kind] = classes.get(kind, 0.0) + event.self_device_time_total / 1e3 / steps
    return {"by_cpu": rows("self_cpu_time_total"), "by_gpu": rows("self_device_time_total"),
            "gpu_ms_per_step": round(sum(e.self_device_time_total for e in events) / 1e3 / steps, 3),
            "gpu_ms_by_class": {kind: round(ms, 3) for kind, ms in sorted(classes.items())}}


# Kernel-name fragments of each class, checked in this order (a fused quantizing GEMM counts as GEMM).
KERNEL_CLASSES = (
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "int_linear", "_int_mm", "matmul", "mm_", "scaled_mm", "wgmma")),
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax")),
    ("quantize", ("quantize", "quant", "amax", "round", "clamp")),
)


def kernel_class(name: str) -> str:
    """GEMM, attention, quantize or other, from a CUDA kernel's name."""
    lowered = name.lower()
    for kind, fragments in KERNEL_CLASSES:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_model_variant(variant: str, config: dict, rows_list: list[int], device: str,
                      dtype: torch.dtype, save_partial: Callable[[dict], None] = lambda result: None) -> dict:
    """The figures of one variant; `save_partial` gets them after each row count (a variant stopped at its
    time limit keeps the row counts it finished)."""
    from torch._dynamo.utils import counters

    if variant.startswith("torchao_"):  # find out before building the model
        if device != "cuda":
            raise Skipped("the torchao variants run on CUDA only")
        torchao_config(variant.removeprefix("torchao_"))
    backend_log = _collect_backend_log()
    model = build_model(config, device, dtype)
    inputs = {rows: guided_inputs(config, rows, device, dtype) for rows in rows_list}
    reference = model(**inputs[rows_list[0]], return_dict=False)[0].float()

    start = time.perf_counter()
    fn, holder, notes = prepare(variant, model, device)
    synchronize(device)
    result: dict[str, Any] = {"prepare_s": round(time.perf_counter() - start, 1), "notes": notes,
                              "weight_bytes": weight_bytes(holder), "rows": {}}
    log(f"{variant}: prepared in {result['prepare_s']} s, weights {result['weight_bytes'] / 2**20:.1f} MiB")

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn(**batch, return_dict=False)[0]

    for index, rows in enumerate(rows_list):
        batch = inputs[rows]
        if variant in COMPILED and variant not in STATIC_SHAPES and index == 0:
            for tensor in batch.values():  # one compile for every row count
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        # Said before the call: a variant stopped at its time limit shows it was compiling.
        compiling = variant in COMPILED and (index == 0 or variant in STATIC_SHAPES)
        log(f"{variant}: {rows} rows: first call" + (" (compiling)" if compiling else ""))
        profiler = cProfile.Profile() if compiling and PROFILE_COMPILE else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        output = step(batch)
        synchronize(device)
        if profiler:
            profiler.disable()
        figures: dict[str, Any] = {"first_call_s": round(time.perf_counter() - start, 1)}
        if compiling:
            figures["compile_phases_s"] = compile_phases()
        if profiler:
            figures["compile_profile"] = profile_text(profiler)
        if index == 0:
            error = (output.float() - reference).norm() / reference.norm()
            result["rel_l2_vs_bf16"] = float(error)
        figures["ms_per_step"] = round(step_ms(lambda: step(batch), device), 3)
        if device == "cuda":
            figures["host_ms_per_step"] = round(host_ms(step, batch), 3)
            figures["profile"] = profile_step(step, batch)
            try:
                figures["ms_per_step_cuda_graph"] = round(cuda_graph_ms(step, batch), 3)
            except Exception as error:  # a variant whose step cannot be captured still has its other figures
                figures["cuda_graph_error"] = f"{type(error).__name__}: {error}"[:500]
        result["rows"][str(rows)] = figures
        save_partial({**result, "status": "partial", "note": f"stopped after {len(result['rows'])} row counts"})
        log(f"{variant}: {rows} rows: first call {figures['first_call_s']} s, {figures['ms_per_step']} ms/step"
            + (f", CUDA graph {figures['ms_per_step_cuda_graph']} ms" if "ms_per_step_cuda_graph" in figures else "")
            + (f", host {figures['host_ms_per_step']} ms" if "host_ms_per_step" in figures else ""))
    if variant in COMPILED:
        result["dynamo"] = {"unique_graphs": counters["stats"]["unique_graphs"],
                            "graph_breaks": sum(counters["graph_break"].values())}
    if backend_log:
        result["backend_log"] = backend_log
    return result


def profile_text(profiler: cProfile.Profile, top: int = 45) -> str:
    """The functions of a profiled first call with the most cumulative and the most own time, as text."""
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(top)
    # The calls a compile of the quantized model adds: user-kernel analysis (TTIR), Triton and Inductor
    # compiles, dqcompile's own passes.
    stats.print_stats("triton_kernel_wrap|ttir|dqcompile|async_compile|codecache|triton/compiler|autotun|"
                      "compile_fx|lowering|scheduler|wrapper", top)
    stats.sort_stats("tottime").print_stats(top // 2)
    return stream.getvalue()


def compile_phases() -> dict[str, float]:
    """Seconds spent so far in each timed phase of torch.compile (dynamo's `dynamo_timed` metrics: tracing,
    AOT, Inductor codegen, waiting for kernel compiles, ...), summed over compiles: where a slow compile goes."""
    from torch._dynamo.utils import compilation_time_metrics

    return {name: round(sum(times), 2) for name, times in compilation_time_metrics.items() if sum(times) >= 0.05}


def _collect_backend_log() -> list[str]:
    """The dqcompile backend's INFO lines (kernels chosen, fusions), gathered into a list."""
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("dqcompile.backends.compile")
    logger.setLevel(logging.INFO)
    logger.addHandler(ListHandler())
    return lines


# ------------------------------------------------------------------------------------------ worker / parent

def worker(variant: str, quick: bool, rows_list: list[int], result_path: Path) -> None:
    """Runs one variant in this process and writes its figures (or why it did not run) to result_path."""
    device = "cpu" if quick else "cuda"
    dtype = torch.float32 if quick else torch.bfloat16
    config = TINY_DIT if quick else DIT_XL_2
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise Skipped("no CUDA device (use --quick for the CPU smoke check)")
        with torch.no_grad():
            result = run_model_variant(variant, config, rows_list, device, dtype,
                                       lambda partial: result_path.write_text(json.dumps(partial)))
        result["status"] = "ok"
    except Skipped as reason:
        result = {"status": "skipped", "note": str(reason)}
        log(f"{variant}: skipped: {reason}")
    except Exception as error:
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
        log(f"{variant}: failed: {result['error'][:300]}")
    result_path.write_text(json.dumps(result))


def cpu_share(gpu: str | None, gpus: str | None) -> set[int] | None:
    """The CPU cores of the variant on `gpu` when variants run side by side on several GPUs: whole physical
    cores split evenly (bench_common.cpu_groups), so that one variant's compile does not slow the other's host-side timings (unpinned, a compile
    beside a timed step raised bf16 compile's host time from 10.0 to 16.4 ms on an H200 host)."""
    if gpu is None or not gpus or "," not in gpus:
        return None
    order = gpus.split(",")
    return set(cpu_groups(len(order))[order.index(gpu)]) or None


def run_variant_process(variant: str, args: argparse.Namespace, rows_list: list[int], timeout_s: float,
                        gpu: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--worker", variant, "--result", str(result_path),
                   "--images", ",".join(str(rows // 2) for rows in rows_list)] + (["--quick"] if args.quick else [])
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
        cpus = cpu_share(gpu, args.gpus)
        start = time.perf_counter()
        try:
            completed = subprocess.run(command, timeout=timeout_s, cwd=REPO_ROOT, env=env,
                                       preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        except subprocess.TimeoutExpired:
            note = f"stopped after {timeout_s:.0f} s (time limit)"
            if result_path.exists():  # the row counts finished before the limit
                return {**json.loads(result_path.read_text()), "status": "partial", "note": note}
            return {"status": "timeout", "note": note}
        wall_s = round(time.perf_counter() - start, 1)
        if not result_path.exists():
            return {"status": "failed", "error": f"the worker exited with code {completed.returncode}", "wall_s": wall_s}
        return {**json.loads(result_path.read_text()), "wall_s": wall_s}


def markdown_table(results: dict, rows_list: list[int]) -> str:
    baseline = results.get("compile", {}).get("rows", {})
    header = ["variant", "weights MiB"] + [f"ms/step {r} rows" for r in rows_list] \
        + [f"CUDA graph {r} rows" for r in rows_list] + [f"vs compile {r} rows" for r in rows_list] \
        + ["compile s", "rel. L2 vs bf16"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, result in results.items():
        if result.get("status") not in ("ok", "partial"):
            note = result.get("note") or result.get("error", "")
            lines.append(f"| {variant} | {result.get('status')}: {note[:80]} |" + " |" * (len(header) - 2))
            continue
        figures = result["rows"]
        cells = [variant, f"{result['weight_bytes'] / 2**20:.1f}"]
        cells += [f"{figures[str(r)]['ms_per_step']:.2f}" if str(r) in figures else "-" for r in rows_list]
        cells += [f"{figures[str(r)]['ms_per_step_cuda_graph']:.2f}"
                  if "ms_per_step_cuda_graph" in figures.get(str(r), {}) else "-" for r in rows_list]
        cells += [f"{baseline[str(r)]['ms_per_step'] / figures[str(r)]['ms_per_step']:.2f}x"
                  if str(r) in baseline and str(r) in figures else "-" for r in rows_list]
        cells += [f"{figures[str(rows_list[0])]['first_call_s']:.0f}", f"{result['rel_l2_vs_bf16']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON results path (required unless --worker)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--images", default=None, help="images per step, comma-separated (default 8,32; --quick 1,2)")
    parser.add_argument("--quick", action="store_true", help="tiny DiT in float32 on CPU: a smoke check")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no variant after this long")
    parser.add_argument("--variant-timeout-s", type=float, default=300.0, help="time limit of one variant")
    parser.add_argument("--gpus", default=None,
                        help="GPU indices to run variants on side by side, one variant per GPU at a time (e.g. 0,1)")
    parser.add_argument("--profile-compile", action="store_true",
                        help="cProfile each compiling first call (top functions in the JSON; slows the compile)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    images = [int(n) for n in (args.images or ("1,2" if args.quick else "8,32")).split(",")]
    rows_list = [2 * n for n in images]
    if args.profile_compile:
        os.environ["BENCH_DIT_PROFILE_COMPILE"] = "1"  # the workers read it at import
    if args.worker:
        worker(args.worker, args.quick, rows_list, args.result)
        return
    if args.out is None:
        parser.error("--out is required")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    variants = list(dict.fromkeys(variants))  # the order given: the GPUs take them off one queue

    config = TINY_DIT if args.quick else DIT_XL_2
    data: dict[str, Any] = {
        "meta": {**run_metadata(), "model": "DiTTransformer2DModel", "config": config,
                 "dtype": "float32" if args.quick else "bfloat16", "quick": args.quick, "images": images,
                 "rows": rows_list, "timing": f"ms per transformer forward (one guided denoising step): CUDA "
                 f"events around {CALLS_PER_RUN} consecutive calls, median of {RUNS} runs; the same for "
                 "CUDA-graph replays"},
        "variants": {},
    }
    start = time.perf_counter()
    log(f"{data['meta']['device']}, torch {data['meta']['torch']}, commit {data['meta']['commit']}: "
        f"{', '.join(variants)} at {rows_list} rows")
    pending = list(variants)
    lock = threading.Lock()

    def run_queue(gpu: str | None) -> None:
        """Take variants off the shared queue, one at a time, on one GPU."""
        while True:
            with lock:
                if not pending:
                    return
                variant = pending.pop(0)
            remaining = args.budget_s - (time.perf_counter() - start)
            if remaining < MIN_VARIANT_S:
                result = {"status": "skipped", "note": f"time budget {args.budget_s:.0f} s spent"}
                log(f"{variant}: skipped, time budget spent")
            else:
                log(f"{variant}: starting on GPU {gpu} (limit {min(remaining, args.variant_timeout_s):.0f} s)")
                result = run_variant_process(variant, args, rows_list, min(remaining, args.variant_timeout_s), gpu)
                result["gpu"] = gpu
            with lock:
                data["variants"][variant] = result
                data["meta"]["elapsed_s"] = round(time.perf_counter() - start, 1)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(data, indent=1))

    gpus = args.gpus.split(",") if args.gpus else [None]
    threads = [threading.Thread(target=run_queue, args=(gpu,)) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    data["variants"] = {variant: data["variants"][variant] for variant in variants if variant in data["variants"]}
    table = markdown_table(data["variants"], rows_list)
    data["markdown_table"] = table
    data["meta"]["elapsed_s"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(data, indent=1))
    meta = data["meta"]
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['date']}, commit {meta['commit'][:12]}, "
          f"{meta['elapsed_s']:.0f} s\n\n{table}", flush=True)


if __name__ == "__main__":
    main()
