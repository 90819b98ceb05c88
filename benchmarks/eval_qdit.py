"""Q-DiT evidence on the embedded Fashion-MNIST DiT: the paper's ablation at w4a8 and w6a8, and the search.

    python benchmarks/eval_qdit.py [--samples 5000] [--steps 20] [--device cuda] [--out results/qdit.json]

Rows, per weight width (activations 8 bits), each sampled from the same noise as the float model
(DDIM, classifier-free guidance 1.5, class labels 0..9 in turn) and scored by dqcompile.eval against
the Fashion-MNIST test split:

- rtn: per output channel round-to-nearest weights, static per-tensor activations (calibrated);
- group128: weights in groups of 128 with the MSE clip search (96 on the 192-wide layers, where 128 does
  not divide the width), activations still static per tensor;
- group128+dynamic: + activations quantized at run time per token and group (preset qdit-wXa8, the
  public code's granularity);
- searched: + the group sizes of an evolutionary search run here (fitness: FID of --search-samples
  images of --search-steps steps; a reduced budget of evaluations, see --search-*);
and, when named in --rows:
- group128+dynamic-sample: group128+dynamic with per-sample groups (the paper's granularity);
- gptq: group128+dynamic with GPTQ rounding in place of RTN.

Writes the JSON (--out) after every row, and a markdown table beside it (.md). Run time on one H100
with the defaults: 516 s (2026-11-21: 30 s of sampling per per-channel row, 48-50 s per group row,
about a minute per search).
CPU smoke check (a few minutes): --device cpu --samples 32 --steps 4 --bits 4 --reference-size 1000
--search-fitness proxy --search-samples 8 --search-steps 2 --search-population 4 --search-iterations 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dqcompile  # noqa: E402
from bench_common import run_metadata, score_images, timed  # noqa: E402
from dqcompile import ActivationSpec, QDiTOptions, QuantSpec, WeightSpec  # noqa: E402
from dqcompile.data import load_fashion_mnist  # noqa: E402
from dqcompile.eval import sample  # noqa: E402
from dqcompile.models import NUM_CLASSES, load_embedded_model  # noqa: E402
from dqcompile.search import search_group_sizes  # noqa: E402

ROWS = ("rtn", "group128", "group128+dynamic", "searched")
EXTRA_ROWS = ("group128+dynamic-sample", "gptq")


def row_spec(row: str, bits: int, plan: Any = None) -> QuantSpec:
    """The spec of one ablation row at w{bits}a8."""
    preset = QuantSpec.from_preset(f"qdit-w{bits}a8")
    static = ActivationSpec(bits=8, mode="static_tensor")
    if row == "rtn":
        return QuantSpec(weights=WeightSpec(bits=bits), activations=static, name=f"rtn-w{bits}a8")
    if row == "group128":
        return preset.replace(activations=static, name=f"group128-w{bits}a8")
    if row == "group128+dynamic":
        return preset
    if row == "group128+dynamic-sample":
        return preset.replace(activations=ActivationSpec(bits=8, mode="dynamic_sample_group"),
                              name=f"qdit-sample-w{bits}a8")
    if row == "searched":
        return preset.with_group_plan(plan).replace(name=f"qdit-searched-w{bits}a8")
    if row == "gptq":
        return preset.replace(qdit=QDiTOptions(fit_group_sizes=True, rounding="gptq"), name=f"qdit-gptq-w{bits}a8")
    raise ValueError(f"unknown row {row!r}")


def block_table(group_sizes: dict[str, int]) -> str:
    """A plan as one markdown row per transformer block (diffusers DiT layer names), else one per layer."""
    blocks: dict[str, dict[str, int]] = {}
    for name, size in group_sizes.items():
        prefix, _, rest = name.partition(".")
        index, _, layer = rest.partition(".")
        if prefix != "transformer_blocks" or not index.isdigit():
            return "\n".join(["| layer | group size |", "|---|---|"] + [f"| {n} | {g} |" for n, g in group_sizes.items()])
        blocks.setdefault(index, {})[layer] = size
    columns = list(dict.fromkeys(layer for block in blocks.values() for layer in block))
    lines = ["| block | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {index} | " + " | ".join(str(block.get(c, "")) for c in columns) + " |" for index, block in blocks.items()]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    meta, config = results["metadata"], results["config"]
    lines = [
        f"Embedded Fashion-MNIST DiT, {config['samples']} samples per row, DDIM {config['steps']} steps, guidance "
        f"{config['guidance']}, reference: {config['reference_size']} test-split images. {meta['device']}, "
        f"torch {meta['torch']}, "
        f"{meta['date']}, commit {meta['commit'][:10]}.",
        "",
        "| weights | configuration | FID | KID x 1000 | IS | precision | recall | PSNR vs FP (dB) | quantize (s) | sample (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        m = row["metrics"]
        psnr = f"{row['psnr_db_vs_fp']:.2f}" if "psnr_db_vs_fp" in row else ""
        lines.append(
            f"| {row['weights']} | {row['row']} | {m['fid']:.2f} | {1000 * m['kid_mean']:.2f} | {m['isc_mean']:.2f} | "
            f"{m['precision']:.3f} | {m['recall']:.3f} | {psnr} | {row['quantize_seconds']:.1f} | "
            f"{row['sample_seconds']:.1f} |"
        )
    for name, search in results["searches"].items():
        s = search["search"]
        histogram = ", ".join(f"{g}: {n}" for g, n in sorted(Counter(search["group_sizes"].values()).items()))
        lines += [
            "",
            f"Search {name}: fitness {search['fitness_kind']} on {s['samples']} images x {s['steps']} steps; "
            f"population {s['population']}, {s['iterations']} iterations, top {s['top_k']}, {s['crossover']} crossover "
            f"+ {s['mutation']} mutation children (p = {s['mutation_prob']}); {s['evaluations']} evaluations, "
            f"{search['wall_seconds']:.0f} s in all ({s['setup_seconds']:.0f} s setup, {s['evaluation_seconds']:.0f} s "
            f"evaluating). Best fitness {search['fitness']:.4g}, the spec's uniform configuration's "
            f"{s['spec_fitness'] if s['spec_fitness'] is not None else float('nan'):.4g}; "
            f"cost {search['bitops'] / 1e9:.3f} GBitOps per sample, budget {search['budget'] / 1e9:.3f}. "
            f"Group sizes (size: layers): {histogram}.",
            "",
            block_table(search["group_sizes"]),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000, help="images per row (default 5000)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--batch-size", type=int, default=500, help="images per model call")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 6], help="weight widths (default 4 6)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=[*ROWS, *EXTRA_ROWS],
                        help=f"rows per weight width, in this order (default: {' '.join(ROWS)})")
    parser.add_argument("--search-fitness", choices=("fid", "proxy"), default="fid")
    parser.add_argument("--search-samples", type=int, default=256)
    parser.add_argument("--search-steps", type=int, default=20)
    parser.add_argument("--search-population", type=int, default=8)
    parser.add_argument("--search-iterations", type=int, default=2)
    parser.add_argument("--search-top-k", type=int, default=3)
    parser.add_argument("--search-crossover", type=int, default=3)
    parser.add_argument("--search-mutation", type=int, default=3)
    parser.add_argument("--calibration-timesteps", type=int, default=10)
    parser.add_argument("--calibration-samples", type=int, default=16, help="images per calibration timestep")
    parser.add_argument("--reference-size", type=int, default=10000,
                        help="test-split images the rows are scored against (default: all 10000)")
    parser.add_argument("--model-dir", help="checkpoint folder (default: the shipped embedded model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/qdit.json")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = load_embedded_model(device=args.device, directory=args.model_dir)
    reference = load_fashion_mnist("test")[0][: args.reference_size]
    labels = torch.arange(args.samples) % NUM_CLASSES
    options = dict(steps=args.steps, guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size,
                   device=args.device, progress=False)
    results: dict[str, Any] = {
        "metadata": run_metadata(),
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "rows": [],
        "searches": {},
    }

    def score(name: str, weights: str, images: torch.Tensor, quantize_seconds: float, sample_seconds: float,
              fp_uint8: torch.Tensor | None) -> torch.Tensor:
        uint8, scores = score_images(images, reference, fp_uint8, args.device)
        row = {"row": name, "weights": weights, "quantize_seconds": quantize_seconds, "sample_seconds": sample_seconds,
               **scores}
        results["rows"].append(row)
        out.write_text(json.dumps(results, indent=2))
        print(f"{weights:5s} {name:26s} FID {row['metrics']['fid']:8.2f}  ({sample_seconds:.0f} s sampling, "
              f"{time.perf_counter() - started:.0f} s so far)", flush=True)
        return uint8

    fp_images, fp_seconds = timed(sample, model, labels, **options)
    fp_uint8 = score("float", "fp32", fp_images, 0.0, fp_seconds, None)

    calibration = None
    for bits in args.bits:
        plan = None
        if "searched" in args.rows:
            search, search_seconds = timed(
                search_group_sizes, model, f"qdit-w{bits}a8", population=args.search_population,
                iterations=args.search_iterations, top_k=args.search_top_k, crossover=args.search_crossover,
                mutation=args.search_mutation, fitness=args.search_fitness, samples=args.search_samples,
                steps=args.search_steps, guidance_scale=args.guidance, seed=args.seed,
                batch_size=min(args.batch_size, args.search_samples), progress=False,
            )
            plan = search
            results["searches"][f"w{bits}a8"] = {**search.to_dict(), "wall_seconds": search_seconds}
            print(f"w{bits}a8 search: {search.search['evaluations']} evaluations, {search_seconds:.0f} s, best "
                  f"{search.fitness_kind} {search.fitness:.4g}", flush=True)
        for row in args.rows:
            spec = row_spec(row, bits, plan)
            if spec.needs_calibration and calibration is None:
                # Trajectories of the evaluation's own sampler (DDIM, same steps and guidance).
                calibration = dqcompile.calibration_set(
                    model, num_timesteps=min(args.calibration_timesteps, args.steps),
                    samples_per_timestep=args.calibration_samples, num_inference_steps=args.steps,
                    scheduler="ddim", guidance_scale=args.guidance, seed=args.seed, progress=False,
                )
            qmodel, quantize_seconds = timed(
                dqcompile.quantize, model, spec, calibration if spec.needs_calibration else None, progress=False
            )
            images, sample_seconds = timed(sample, qmodel, labels, **options)
            score(row, f"w{bits}a8", images, quantize_seconds, sample_seconds, fp_uint8)

    results["total_seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
