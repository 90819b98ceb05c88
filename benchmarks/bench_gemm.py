"""Throughput of dqcompile's Triton kernels at DiT-XL/2 shapes, against cuBLAS bf16 and cuBLAS int8.

    python benchmarks/bench_gemm.py --out runs/gemm.json [--autotune] [--compile-baseline]

GEMMs (rows M = 16, 4096, 16384; qkv 1152->3456, proj 1152->1152, fc1 1152->4608, fc2 4608->1152):
  bf16          F.linear in bf16 (cuBLAS), the baseline
  int_mm        torch._int_mm, int8 -> int32 with no scales at all (cuBLAS int8; refuses M <= 16)
  w8a8          triton_int_linear, int8 weights per channel, symmetric per-token activations, bf16 out
  w8a8_asym     the same with asymmetric activations (zero-point term in the epilogue)
  w8a8_e2e      quantize_act (Triton, per token) + w8a8: the whole quantized linear from bf16 input
  w4a8          packed int4 weights per channel, unpacked in the kernel
  w4a8_g128     packed int4 weights, groups of 128, asymmetric activations (Q-DiT style)
Figures are TOP/s (TFLOP/s for bf16) = 2 M N K / median time of triton.testing.do_bench.

Fused LayerNorm + adaLN modulate + quantize ([B, 256, 1152] bf16, B = 16 and 64) against the unfused
torch composition (layer_norm, * (1 + scale) + shift, then the reference quantize_act), and against bf16
LayerNorm + modulate alone (what the float model pays); optionally the unfused composition under
torch.compile (--compile-baseline; adds Inductor compile time).

Every kernel is checked against the reference backend before it is timed. Progress is printed as it
goes and the JSON file is rewritten after every figure, so a run cut short still leaves its results.
A time budget (--budget-s) skips what is left once exceeded, so the run ends in about 3 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
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

from dqcompile.backends import reference  # noqa: E402
from dqcompile.backends.triton import (  # noqa: E402
    ln_modulate_quantize,
    quantize_act,
    set_autotune,
    triton_int_linear,
    weight_group_sums,
)
from dqcompile.quant.packing import pack_int4  # noqa: E402
from bench_common import git_commit  # noqa: E402

LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
ROWS = (16, 4096, 16384)
GEMM_METHODS = ("bf16", "int_mm", "w8a8", "w8a8_asym", "w8a8_e2e", "w4a8", "w4a8_g128")
LN_BATCHES = (16, 64)
LN_TOKENS, LN_CHANNELS = 256, 1152
DEVICE = "cuda"


class Run:
    """Collects results, logs each as it comes, and keeps the JSON file current."""

    def __init__(self, out: Path, budget_s: float, meta: dict) -> None:
        self.out = out
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict = {"meta": meta, "gemm": [], "ln_modulate_quantize": [], "skipped": []}
        self.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, what: str) -> bool:
        if self.elapsed() > self.budget_s:
            self.data["skipped"].append(what)
            self.log(f"skip {what}: time budget {self.budget_s:.0f} s spent")
            return True
        return False

    def log(self, line: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {line}", flush=True)

    def flush(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1))


def _median_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _check_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within one bf16 rounding step (relative), as the backend contract allows."""
    diff = (actual.float() - expected.float()).abs()
    bound = torch.finfo(expected.dtype).eps * expected.float().abs() + 1e-6
    bad = int((diff > bound).sum())
    if bad:
        raise AssertionError(f"{what}: {bad} outputs beyond one {expected.dtype} rounding step "
                             f"(max abs diff {diff.max().item():.3g})")


def _gemm_case(run: Run, layer: str, m: int, k: int, n: int) -> None:
    """Check then time every GEMM method at one shape; appends one record."""
    device = DEVICE
    gen = torch.Generator(device=device).manual_seed(m + k + n)
    x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device=device, generator=gen, dtype=torch.bfloat16)
    codes8 = torch.randint(-127, 128, (n, k), device=device, generator=gen, dtype=torch.int8)
    codes4 = torch.randint(-7, 8, (n, k), device=device, generator=gen, dtype=torch.int8)
    packed4 = pack_int4(codes4)
    w_scale = torch.rand(n, 1, device=device, generator=gen) * 1e-3 + 1e-4
    w_scale_g = torch.rand(n, k // 128, device=device, generator=gen) * 1e-3 + 1e-4
    qx, xs, xz = reference.quantize_act(x, 8, 0, True)
    qx_a, xs_a, xz_a = reference.quantize_act(x, 8, 0, False)
    qx_g, xs_g, xz_g = reference.quantize_act(x, 8, 128, False)
    wsum4_g = weight_group_sums(packed4, 4, 128)
    wsum8 = weight_group_sums(codes8, 8, 0)
    bf16 = torch.bfloat16

    def e2e() -> torch.Tensor:
        q, s, _ = quantize_act(x, 8, 0, True)
        return triton_int_linear(q, s, None, codes8, w_scale, bias, 8, 0, bf16)

    # method -> (kernel call, reference output or None when there is nothing to compare)
    methods: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor | None]] = {
        "bf16": (lambda: F.linear(x, w, bias), None),
        "w8a8": (lambda: triton_int_linear(qx, xs, None, codes8, w_scale, bias, 8, 0, bf16),
                 reference.int_linear(qx, xs, xz, codes8, w_scale, bias, 8, 0, bf16)),
        "w8a8_asym": (lambda: triton_int_linear(qx_a, xs_a, xz_a, codes8, w_scale, bias, 8, 0, bf16, w_sum=wsum8),
                      reference.int_linear(qx_a, xs_a, xz_a, codes8, w_scale, bias, 8, 0, bf16)),
        "w8a8_e2e": (e2e, reference.int_linear(qx, xs, xz, codes8, w_scale, bias, 8, 0, bf16)),
        "w4a8": (lambda: triton_int_linear(qx, xs, None, packed4, w_scale, bias, 4, 0, bf16),
                 reference.int_linear(qx, xs, xz, packed4, w_scale, bias, 4, 0, bf16)),
        "w4a8_g128": (lambda: triton_int_linear(qx_g, xs_g, xz_g, packed4, w_scale_g, bias, 4, 128, bf16,
                                                w_sum=wsum4_g),
                      reference.int_linear(qx_g, xs_g, xz_g, packed4, w_scale_g, bias, 4, 128, bf16)),
    }
    if m > 16:
        methods["int_mm"] = (lambda: torch._int_mm(qx, codes8.t()), reference.int_matmul(qx, codes8))

    record: dict = {"layer": layer, "m": m, "k": k, "n": n, "tops": {}, "ms": {}, "first_call_s": {}}
    if m <= 16:
        record["tops"]["int_mm"] = None
        record["int_mm_note"] = "torch._int_mm refuses M <= 16"
    for name in GEMM_METHODS:
        if name not in methods:
            continue
        if run.over_budget(f"{layer} M={m} {name}"):
            continue
        fn, expected = methods[name]
        t0 = time.perf_counter()
        actual = fn()
        torch.cuda.synchronize()
        record["first_call_s"][name] = round(time.perf_counter() - t0, 3)
        if expected is not None:
            if expected.dtype == torch.int32:
                if not torch.equal(actual, expected):
                    raise AssertionError(f"{name} {layer} M={m}: int32 result differs from the reference")
            else:
                _check_close(actual, expected, f"{name} {layer} M={m}")
                record.setdefault("bit_exact_vs_reference", {})[name] = torch.equal(actual, expected)
        ms = _median_ms(fn)
        record["ms"][name] = round(ms, 5)
        record["tops"][name] = round(2 * m * n * k / (ms * 1e-3) / 1e12, 1)
        run.log(f"{layer:5s} M={m:6d} {name:10s} {ms * 1e3:9.1f} us  {record['tops'][name]:7.1f} TOP/s"
                f"  (first call {record['first_call_s'][name]:.2f} s)")
    run.data["gemm"].append(record)
    run.flush()


def _unfused(x: torch.Tensor, mod_scale: torch.Tensor, mod_shift: torch.Tensor, symmetric: bool):
    """The eager graph the fusion replaces: bf16 LayerNorm, modulate, then per-token quantization."""
    h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + mod_scale[:, None]) + mod_shift[:, None]
    return reference.quantize_act(h, 8, 0, symmetric)


def _ln_case(run: Run, batch: int, compile_baseline: bool) -> None:
    if run.over_budget(f"ln_modulate_quantize B={batch}"):
        return
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    x = torch.randn(batch, LN_TOKENS, LN_CHANNELS, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 2
    mod_scale = torch.randn(batch, LN_CHANNELS, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.5
    mod_shift = torch.randn(batch, LN_CHANNELS, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.5
    record: dict = {"batch": batch, "tokens": LN_TOKENS, "channels": LN_CHANNELS, "us": {}, "gbps": {}}

    # Correctness: the kernel's own h quantizes exactly as the reference would; codes match the
    # float32 composition within one step (LayerNorm sums round differently; see the tests).
    q, xs, xz, h = ln_modulate_quantize(x, None, None, 1e-6, mod_scale, mod_shift, 8, 0, True,
                                        return_normalized=True)
    q_own, xs_own, xz_own = reference.quantize_act(h, 8, 0, True)
    if not (torch.equal(q, q_own) and torch.equal(xs, xs_own) and torch.equal(xz, xz_own)):
        raise AssertionError("ln_modulate_quantize: codes are not the reference quantization of its own h")
    h_ref = F.layer_norm(x.float(), (LN_CHANNELS,), eps=1e-6) * (1 + mod_scale.float()[:, None]) \
        + mod_shift.float()[:, None]
    code_diff = (q.int() - reference.quantize_act(h_ref, 8, 0, True)[0].int()).abs()
    if code_diff.max() > 1:
        raise AssertionError(f"ln_modulate_quantize: codes differ from the float32 composition by {code_diff.max()}")
    record["codes_off_by_one_vs_fp32_composition"] = float(code_diff.float().mean())

    # Traffic of the fused kernel: bf16 in, int8 codes + float32 scale + int32 zero out.
    rows = batch * LN_TOKENS
    bytes_moved = rows * LN_CHANNELS * (2 + 1) + rows * 8
    cases: dict[str, Callable[[], object]] = {
        "fused_triton": lambda: ln_modulate_quantize(x, None, None, 1e-6, mod_scale, mod_shift, 8, 0, True),
        "unfused_torch": lambda: _unfused(x, mod_scale, mod_shift, True),
        "bf16_ln_modulate_only": lambda: F.layer_norm(x, (LN_CHANNELS,), eps=1e-6) * (1 + mod_scale[:, None])
        + mod_shift[:, None],
    }
    if compile_baseline:
        compiled = torch.compile(_unfused)
        t0 = time.perf_counter()
        compiled(x, mod_scale, mod_shift, True)
        torch.cuda.synchronize()
        record["compile_s"] = round(time.perf_counter() - t0, 1)
        cases["unfused_torch_compile"] = lambda: compiled(x, mod_scale, mod_shift, True)
    for name, fn in cases.items():
        us = _median_ms(fn) * 1e3
        record["us"][name] = round(us, 2)
        record["gbps"][name] = round(bytes_moved / (us * 1e-6) / 1e9, 1)
        run.log(f"ln+mod+quant B={batch:3d} {name:22s} {us:8.1f} us  ({record['gbps'][name]:7.1f} GB/s "
                "at the fused kernel's traffic)")
    run.data["ln_modulate_quantize"].append(record)
    run.flush()


def _print_table(run: Run) -> None:
    print("\nGEMM throughput, TOP/s (bf16: TFLOP/s); w8a8_e2e includes the activation quantization")
    header = f"{'layer':5s} {'M':>6s} " + " ".join(f"{name:>10s}" for name in GEMM_METHODS) + f" {'w8a8/bf16':>10s}"
    print(header)
    for record in run.data["gemm"]:
        cells = []
        for name in GEMM_METHODS:
            value = record["tops"].get(name)
            cells.append(f"{value:10.1f}" if value is not None else f"{'-':>10s}")
        bf16, w8a8 = record["tops"].get("bf16"), record["tops"].get("w8a8")
        ratio = f"{w8a8 / bf16:10.2f}" if bf16 and w8a8 else f"{'-':>10s}"
        print(f"{record['layer']:5s} {record['m']:6d} " + " ".join(cells) + " " + ratio)
    print("\nLayerNorm + modulate + quantize, microseconds")
    for record in run.data["ln_modulate_quantize"]:
        print(f"B={record['batch']:3d} x {record['tokens']} x {record['channels']}: "
              + ", ".join(f"{name} {us:.1f}" for name, us in record["us"].items()))
    meta = run.data["meta"]
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}, "
          f"commit {meta['git_commit']}, {run.elapsed():.0f} s; skipped: {run.data['skipped'] or 'nothing'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--autotune", action="store_true", help="time every candidate tile config once per shape")
    parser.add_argument("--compile-baseline", action="store_true",
                        help="also time the unfused LayerNorm + modulate + quantize under torch.compile")
    parser.add_argument("--budget-s", type=float, default=170.0, help="skip remaining figures after this long")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm.py needs a CUDA device")
    set_autotune(args.autotune)
    meta = {
        "device": torch.cuda.get_device_name(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "autotune": args.autotune,
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms, L2 flushed between runs",
    }
    run = Run(args.out, args.budget_s, meta)
    run.log(f"{meta['device']} torch {meta['torch']} triton {meta['triton']} commit {meta['git_commit']}")
    for batch in LN_BATCHES:
        _ln_case(run, batch, args.compile_baseline)
    for m in ROWS:
        for layer, (k, n) in LAYERS.items():
            _gemm_case(run, layer, m, k, n)
    run.flush()
    _print_table(run)


if __name__ == "__main__":
    main()
