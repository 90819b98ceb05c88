"""TQ-DiT evidence on the embedded Fashion-MNIST DiT: the paper's ablation at w8a8 and w6a6.

    python benchmarks/eval_tqdit.py [--samples 5000] [--steps 20] [--device cuda] [--out results/tqdit.json]

Rows, per (weight, activation) width, each sampled from the same noise as the float model (DDIM,
classifier-free guidance 1.5, class labels 0..9 in turn) and scored by dqcompile.eval against the
Fashion-MNIST test split. Every row is method "tqdit": per output channel weights, static per-tensor
activations, and Q K^T and softmax(.) V on integer codes with per-head scales:

- rtn: round-to-nearest weights, min / max activation ranges over all timesteps, uniform softmax codes;
- +mrq: two-region codes for post-softmax and post-GELU (fc2 input) activations;
- +tgq: + activation parameters per group of consecutive timesteps (10 groups);
- +ho: + the Fisher-weighted scale search (the presets tqdit-w8a8, tqdit-w6a6, with HO on 2048 rows per
  layer and time group where the presets keep 512: the GPU affords them).

Calibration: dqcompile.calibration_set with the evaluation's sampler (DDIM, --steps steps, every step
recorded, --calibration-samples images per step with guidance); HO's denoising loss uses the embedded
model's noise schedule. Per row the JSON records quantize() wall time, its peak CUDA memory
(torch.cuda.max_memory_allocated, reset before the call), and the method's own summary (calibration
calls and rows, statistics and search seconds). Writes the JSON (--out) after every row and a markdown
table beside it (.md). Run time on one H100 with the defaults: about 10 minutes (2026-11-21: 3-5 s per
quantize, 10 s with HO; 46 s of sampling per RTN row, 66 s per MRQ row; about 5 s of metrics per row);
--widths splits it into two runs.
CPU smoke check: --device cpu --samples 32 --steps 4 --calibration-samples 4 --hessian-rows 512.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dqcompile  # noqa: E402
from bench_common import run_metadata, score_images, timed, timed_with_peak  # noqa: E402
from dqcompile import QuantSpec  # noqa: E402
from dqcompile.data import load_fashion_mnist  # noqa: E402
from dqcompile.eval import sample  # noqa: E402
from dqcompile.models import NUM_CLASSES, load_embedded_config, load_embedded_model  # noqa: E402
from dqcompile.spec import TQDiTOptions  # noqa: E402

ROWS = ("rtn", "+mrq", "+tgq", "+ho")
WIDTHS = {"w8a8": "tqdit-w8a8", "w6a6": "tqdit-w6a6"}


def row_spec(row: str, width: str, schedule: dict[str, Any], time_groups: int, hessian_rows: int) -> QuantSpec:
    """The spec of one ablation row: the preset with the row's TQ-DiT parts switched on."""
    on = ROWS.index(row)
    options = TQDiTOptions(
        mrq=on >= 1,
        time_groups=time_groups if on >= 2 else 1,
        hessian=on >= 3,
        quantize_attention=True,
        hessian_rows=hessian_rows,
        beta_schedule=schedule["beta_schedule"],
        num_train_timesteps=schedule["num_train_timesteps"],
    )
    return QuantSpec.from_preset(WIDTHS[width]).replace(tqdit=options, name=f"tqdit-{width}-{row}")


def timed_quantize(
    model: torch.nn.Module, spec: QuantSpec, calibration: Any, device: str
) -> tuple[Any, dict[str, float]]:
    qmodel, seconds, peak = timed_with_peak(dqcompile.quantize, model, spec, calibration, progress=False)
    cost = {"quantize_seconds": seconds}
    if torch.device(device).type == "cuda":
        cost["quantize_peak_cuda_mib"] = peak / 2**20
    return qmodel, cost


def markdown(results: dict[str, Any]) -> str:
    meta, config = results["metadata"], results["config"]
    lines = [
        f"Embedded Fashion-MNIST DiT, {config['samples']} samples per row, DDIM {config['steps']} steps, guidance "
        f"{config['guidance']}, reference: the test split (10000). Calibration: {results['calibration']['calls']} "
        f"calls ({results['calibration']['timesteps']} timesteps x {config['calibration_samples']} images with "
        f"guidance). {meta['device']}, torch {meta['torch']}, {meta['date']}, commit {meta['commit'][:10]}.",
        "",
        "| width | configuration | FID | KID x 1000 | IS | precision | recall | PSNR vs FP (dB) | quantize (s) "
        "| HO search (s) | quantize peak (MiB) | sample (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        m, summary = row["metrics"], row.get("tqdit", {})
        lines.append(
            f"| {row['width']} | {row['row']} | {m['fid']:.2f} | {1000 * m['kid_mean']:.2f} | {m['isc_mean']:.2f} | "
            f"{m['precision']:.3f} | {m['recall']:.3f} | {row.get('psnr_db_vs_fp', float('nan')):.2f} | "
            f"{row.get('quantize_seconds', 0.0):.1f} | {summary.get('hessian_seconds', 0.0):.1f} | "
            f"{row.get('quantize_peak_cuda_mib', summary.get('peak_memory_mib', float('nan'))):.0f} | "
            f"{row['sample_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000, help="images per row (default 5000)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--batch-size", type=int, default=500, help="images per model call")
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--time-groups", type=int, default=10)
    parser.add_argument("--hessian-rows", type=int, default=2048,
                        help="HO rows per layer and time group (default 2048; the spec's default is 512)")
    parser.add_argument("--calibration-samples", type=int, default=32, help="images per calibration timestep")
    parser.add_argument("--model-dir", help="checkpoint folder (default: the shipped embedded model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/tqdit.json")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_embedded_model(device=args.device, directory=args.model_dir)
    schedule = load_embedded_config(args.model_dir)["scheduler"]
    reference, _ = load_fashion_mnist("test")
    labels = torch.arange(args.samples) % NUM_CLASSES
    options = dict(steps=args.steps, guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size,
                   device=args.device, progress=False)
    calibration, calibration_seconds = timed(
        dqcompile.calibration_set, model, num_timesteps=args.steps, samples_per_timestep=args.calibration_samples,
        num_inference_steps=args.steps, scheduler="ddim", guidance_scale=args.guidance, seed=args.seed + 1,
        progress=False,
    )
    results: dict[str, Any] = {
        "metadata": run_metadata(),
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "calibration": {"calls": len(calibration), "timesteps": len(set(calibration.timesteps)),
                        "rows": sum(batch["hidden_states"].shape[0] for batch in calibration),
                        "record_seconds": calibration_seconds},
        "rows": [],
    }

    def score(name: str, width: str, images: torch.Tensor, sample_seconds: float, extra: dict[str, Any],
              fp_uint8: torch.Tensor | None) -> torch.Tensor:
        uint8, scores = score_images(images, reference, fp_uint8, args.device)
        row = {"row": name, "width": width, "sample_seconds": sample_seconds, **extra, **scores}
        results["rows"].append(row)
        out.write_text(json.dumps(results, indent=2, default=str))
        print(f"{width:5s} {name:6s} FID {row['metrics']['fid']:8.2f}  ({sample_seconds:.0f} s sampling, "
              f"{time.perf_counter() - started:.0f} s so far)", flush=True)
        return uint8

    def timed_sample(sampled_model: torch.nn.Module) -> tuple[torch.Tensor, float]:
        return timed(sample, sampled_model, labels, **options)

    fp_images, fp_seconds = timed_sample(model)
    fp_uint8 = score("float", "fp32", fp_images, fp_seconds, {}, None)
    for width in args.widths:
        for row in args.rows:
            spec = row_spec(row, width, schedule, args.time_groups, args.hessian_rows)
            qmodel, cost = timed_quantize(model, spec, calibration, args.device)
            summary = dict(qmodel.graph_module.meta.get("tqdit", {}))
            summary.pop("hessian_errors", None)
            images, sample_seconds = timed_sample(qmodel)
            score(row, width, images, sample_seconds, {**cost, "tqdit": summary}, fp_uint8)
            del qmodel

    results["total_seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
