"""Does a weight clip search shrink the model? Evidence for the unit-gain clip search (CPU, minutes).

For one Fashion-MNIST DiT and a few specs (default: Q-DiT w4a8 without clipping, with the plain clip
search, with the unit-gain clip search) it measures, on the CPU in float32:
- per kind of quantized linear, the weight gain <w_hat, w> / <w, w> and the weight SQNR of each spec's
  weight rounding (no activations);
- the whole quantized model's output against the float model's on calibration inputs at 5 timesteps
  of the protocol's sampler: relative L2 error and gain <out, ref> / <ref, ref>;
- `--images` images sampled with the protocol's sampler (DDIM 20, guidance 1.5): PSNR against the float
  model's images from the same noise, and the images' standard deviation against the float model's.

    python benchmarks/clip_gain.py --model benchmark --out benchmarks/results/clip_gain_benchmark_cpu.json

FID needs thousands of images: the GPU tables (docs/methods_quality.md) decide; this says why.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dqcompile  # noqa: E402
from bench_common import run_metadata  # noqa: E402
from evaluate import load_model, parse_spec  # noqa: E402

from dqcompile.fmnist import make_scheduler  # noqa: E402
from dqcompile.quant import quantize_weight  # noqa: E402
from dqcompile.sampling import sample  # noqa: E402

SPECS = ("qdit-w4a8:weights.clip_search=false", "qdit-w4a8", "qdit-w4a8:weights.clip_unit_gain=true")


def weight_gains(model: torch.nn.Module, spec: dqcompile.QuantSpec) -> dict[str, dict[str, float]]:
    """Mean weight gain and SQNR (dB) per kind of quantized linear (the module path after the block index)."""
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or spec.keep_float_reason(name) is not None:
            continue
        weight_plan, _ = spec.layer_plans(name, module.in_features)
        w = module.weight.detach().float()
        w_hat = quantize_weight(w, weight_plan.bits, weight_plan.group_size, clip_search=weight_plan.clip_search,
                                unit_gain=weight_plan.clip_unit_gain).dequantize()
        gain = float((w_hat * w).sum() / w.square().sum())
        sqnr = float(10 * torch.log10(w.square().sum() / (w_hat - w).square().sum()))
        by_kind[name.split(".", 2)[-1] if name.startswith("transformer_blocks.") else name].append((gain, sqnr))
    return {kind: {"gain": statistics.fmean(g for g, _ in v), "min_gain": min(g for g, _ in v),
                   "sqnr_db": statistics.fmean(s for _, s in v), "layers": len(v)} for kind, v in by_kind.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="benchmark", help="embedded, benchmark or a checkpoint folder")
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, config, description = load_model(args.model, "cpu", torch.float32)
    scheduler = make_scheduler("ddim", config["scheduler"], clip_sample=False, timestep_spacing="leading")
    null_class = config["null_class_id"]
    calibration = list(dqcompile.calibration_set(
        model, num_timesteps=5, samples_per_timestep=8, num_inference_steps=20, scheduler=scheduler,
        guidance_scale=1.5, null_class=null_class, seed=1, progress=False))
    labels = torch.arange(args.images) % 10

    def images(m: torch.nn.Module) -> torch.Tensor:
        return sample(m, labels, scheduler=scheduler, null_class_id=null_class, steps=20, guidance_scale=1.5,
                      seed=0, batch_size=args.images, device="cpu", progress=False).float()

    with torch.no_grad():
        reference_outputs = [model(**batch).sample for batch in calibration]
        reference_images = images(model)
    result: dict[str, Any] = {**run_metadata(), "model": description, "images": args.images,
                              "float_image_std": float(reference_images.std()), "rows": []}
    for text in args.specs:
        started = time.perf_counter()
        spec = parse_spec(text)
        qmodel = dqcompile.quantize(model, spec, progress=False)
        outputs = []
        with torch.no_grad():
            for batch, reference in zip(calibration, reference_outputs, strict=True):
                out = qmodel(**batch).sample
                outputs.append({"timestep": int(batch["timestep"].flatten()[0]),
                                "rel_l2": float((out - reference).norm() / reference.norm()),
                                "gain": float((out * reference).sum() / reference.square().sum())})
            sampled = images(qmodel)
        mse = float((sampled - reference_images).square().mean())
        row = {"spec": text, "weights": weight_gains(model, spec), "outputs": outputs,
               "psnr_db": 10 * torch.log10(torch.tensor(4.0 / mse)).item(),  # images in [-1, 1]: peak-to-peak 2
               "image_std": float(sampled.std()), "seconds": time.perf_counter() - started}
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=2))
        gains = [w["gain"] for w in row["weights"].values()]
        print(f"{text}: weight gain {min(gains):.4f}-{max(gains):.4f}; output rel L2 / gain at t={outputs[0]['timestep']}: "
              f"{outputs[0]['rel_l2']:.4f} / {outputs[0]['gain']:.4f}; {args.images} images: PSNR {row['psnr_db']:.2f} dB, "
              f"std {row['image_std']:.4f} (float {result['float_image_std']:.4f}); {row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
