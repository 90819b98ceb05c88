"""Image quality of quantized variants of the embedded Fashion-MNIST DiT, under one protocol.

    python benchmarks/evaluate.py --configs fp,w8a8,w4a8,ptq4dit-w4a8,ptq4dit-w4a8:ptq4dit.ssc=false \
        --samples 5000 --steps 50 --guidance 1.5 --out results.json

A config is `fp` (the float model) or a preset name with optional `field=value` overrides of the
spec, dotted for nested fields (`weights.group_size=128`, `activations.mode=dynamic_group`,
`ptq4dit.ssc=false`). Every config samples the same classes from the same noise; FID, KID, IS and
precision/recall are against the Fashion-MNIST test split with the shipped classifier's features
(dqcompile.eval), PSNR / relative L2 against the float model's images. Calibrated specs get a
calibration set recorded from the float model's own sampling (dqcompile.calibration_set), once.
Results are written after every config, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dqcompile  # noqa: E402
from bench_common import run_metadata, timed, timed_with_peak  # noqa: E402
from dqcompile.data import from_model_space, load_fashion_mnist  # noqa: E402
from dqcompile.eval import fidelity_to_reference, generative_metrics, sample  # noqa: E402
from dqcompile.models import NUM_CLASSES, load_embedded_model  # noqa: E402
from dqcompile.spec import QuantSpec  # noqa: E402


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _override(obj: Any, path: list[str], value: Any) -> Any:
    """A copy of the frozen dataclass `obj` with the field at `path` set to `value`."""
    head, *rest = path
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"{type(obj).__name__} has no field {head!r}")
    new = _override(getattr(obj, head), rest, value) if rest else value
    return dataclasses.replace(obj, **{head: new})


def parse_config(config: str) -> QuantSpec | None:
    """`fp` -> None; `preset[:field=value,...]` -> the spec."""
    if config == "fp":
        return None
    preset, _, overrides = config.partition(":")
    spec = QuantSpec.from_preset(preset)
    for item in filter(None, overrides.split(",")):
        field, _, value = item.partition("=")
        spec = _override(spec, field.split("."), _parse_value(value))
    return dataclasses.replace(spec, name=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", required=True, help="comma-separated: fp and preset[:overrides]")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.5, help="0 or 1: no guidance")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--calib-timesteps", type=int, default=25)
    parser.add_argument("--calib-per-timestep", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    configs = args.configs.split(",")
    specs = {config: parse_config(config) for config in configs}  # refuse a bad config before any work
    dtype = getattr(torch, args.dtype)
    model = load_embedded_model(device=args.device, dtype=dtype)
    labels = torch.arange(args.samples) % NUM_CLASSES
    reference, _ = load_fashion_mnist("test")
    guidance = args.guidance if args.guidance > 1 else None
    sampling = dict(steps=args.steps, guidance_scale=guidance, seed=args.seed, batch_size=args.batch_size,
                    device=args.device)
    result: dict[str, Any] = {
        **run_metadata(),
        "protocol": {"samples": args.samples, "steps": args.steps, "guidance": guidance, "scheduler": "ddim",
                     "dtype": args.dtype, "seed": args.seed, "reference": "Fashion-MNIST test split (10000)",
                     "calibration": {"timesteps": args.calib_timesteps, "per_timestep": args.calib_per_timestep}},
        "rows": [],
    }

    fp_images, fp_seconds = timed(sample, model, labels, **sampling)
    fp_uint8 = from_model_space(fp_images.float().cpu())
    calibration = None
    for config in configs:
        spec = specs[config]
        row: dict[str, Any] = {"config": config}
        if spec is None:
            images_uint8, row["sample_seconds"] = fp_uint8, fp_seconds
        else:
            if spec.needs_calibration and calibration is None:
                calibration, row["calibration_set_seconds"] = timed(
                    dqcompile.calibration_set, model, num_timesteps=args.calib_timesteps,
                    samples_per_timestep=args.calib_per_timestep, seed=args.seed, guidance_scale=guidance,
                    progress=False)
            qmodel, row["quantize_seconds"], peak = timed_with_peak(
                dqcompile.quantize, model, spec, calibration=calibration if spec.needs_calibration else None,
                progress=False)
            if peak is not None:
                row["quantize_peak_gib"] = peak / 2**30
            row["linear_weight_mib"] = qmodel.report.quantized_weight_bytes / 2**20
            images, row["sample_seconds"] = timed(sample, qmodel, labels, **sampling)
            images_uint8 = from_model_space(images.float().cpu())
            row.update(fidelity_to_reference(images_uint8, fp_uint8))
            del qmodel
        row.update(generative_metrics(images_uint8, reference, device=args.device))
        result["rows"].append(row)
        args.out.write_text(json.dumps(result, indent=2, default=float))
        print(json.dumps(row, default=float), flush=True)

    print(f"\nDDIM {args.steps} steps, guidance {guidance}, {args.samples} samples, {args.dtype}, {result['device']}")
    print("| config | FID | KID | IS | precision | recall | PSNR vs fp (dB) | quantize (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        psnr = f"{row['psnr_db']:.2f}" if "psnr_db" in row else ""
        quant = f"{row['quantize_seconds']:.1f}" if "quantize_seconds" in row else ""
        print(f"| {row['config']} | {row['fid']:.2f} | {row['kid_mean']:.3f} | {row['isc_mean']:.2f} | "
              f"{row['precision']:.3f} | {row['recall']:.3f} | {psnr} | {quant} |")


if __name__ == "__main__":
    main()
