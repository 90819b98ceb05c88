"""`dqcompile demo`: quantize the embedded Fashion-MNIST DiT and compare it with the float model.

Both models sample the same classes from the same noise; the report folder gets a side-by-side grid,
metrics.json and the layer report, and a table is printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import dqcompile
from dqcompile.fmnist.data import from_model_space, load_fashion_mnist
from dqcompile.fmnist.dit import NUM_CLASSES, load_embedded_model, make_scheduler
from dqcompile.fmnist.grid import save_image_grid
from dqcompile.fmnist.metrics import fidelity_to_reference, generative_metrics
from dqcompile.fmnist.sampling import sample
from dqcompile.spec import QuantSpec


def _timed_sample(model: torch.nn.Module, labels: torch.Tensor, steps: int, **kwargs: Any) -> tuple[torch.Tensor, float]:
    """Images and milliseconds per denoising step (one model call over every image of the batch)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = sample(model, labels, steps=steps, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images, (time.perf_counter() - start) * 1000 / steps


def run_demo(
    *,
    out: str | Path = "dqcompile-demo",
    spec: str = "w8a8",
    samples: int = 50,
    steps: int = 20,
    guidance: float = 1.5,
    device: str = "cpu",
    seed: int = 0,
    calibration_samples: int = 8,
) -> dict[str, Any]:
    """Run the demo and return its metrics (also written to `out`/metrics.json)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    quant_spec = QuantSpec.resolve(spec)
    model = load_embedded_model(device=device)

    calibration = None
    start = time.perf_counter()
    if quant_spec.needs_calibration:
        calibration = dqcompile.calibration_set(
            model, num_timesteps=steps, samples_per_timestep=calibration_samples, num_inference_steps=steps,
            scheduler=make_scheduler("ddim"), guidance_scale=guidance, seed=seed,
        )
    qmodel = dqcompile.quantize(model, quant_spec, calibration=calibration)
    quantize_seconds = time.perf_counter() - start

    labels = torch.arange(samples) % NUM_CLASSES
    options = dict(guidance_scale=guidance, seed=seed, batch_size=min(samples, 100), device=device)
    fp_images, fp_ms = _timed_sample(model, labels, steps, **options)
    q_images, q_ms = _timed_sample(qmodel, labels, steps, **options)

    fp_uint8, q_uint8 = from_model_space(fp_images.cpu()), from_model_space(q_images.cpu())
    reference, _ = load_fashion_mnist("test")
    fp_metrics = generative_metrics(fp_uint8, reference, device=device)
    q_metrics = generative_metrics(q_uint8, reference, device=device)
    fidelity = fidelity_to_reference(q_uint8, fp_uint8)

    shown = min(samples, 4 * NUM_CLASSES)
    grid = torch.cat([fp_images[:shown].cpu(), q_images[:shown].cpu()])
    save_image_grid(grid, rows=2 * (shown // NUM_CLASSES or 1), path=folder / "fp_vs_quantized.png")
    (folder / "layers.txt").write_text(str(qmodel.report) + "\n")

    report = qmodel.report
    result = {
        "spec": quant_spec.name,
        "samples": samples,
        "steps": steps,
        "guidance": guidance,
        "device": device,
        "quantize_seconds": quantize_seconds,
        "fp": {**fp_metrics, "ms_per_step": fp_ms},
        "quantized": {**q_metrics, "ms_per_step": q_ms},
        "psnr_db_vs_fp": fidelity["psnr_db"],
        "rel_l2_vs_fp": fidelity["rel_l2"],
        "linear_weight_mib": {"fp": report.float_weight_bytes / 2**20, "quantized": report.quantized_weight_bytes / 2**20},
    }
    (folder / "metrics.json").write_text(json.dumps(result, indent=2))
    print(_table(result))
    print(f"\nwrote {folder / 'fp_vs_quantized.png'} (top: float, bottom: {quant_spec.name}), "
          f"{folder / 'metrics.json'}, {folder / 'layers.txt'}")
    return result


def _table(result: dict[str, Any]) -> str:
    fp, q = result["fp"], result["quantized"]
    weights = result["linear_weight_mib"]
    rows = [
        ("", "float", result["spec"]),
        ("FID (vs test split)", f"{fp['fid']:.2f}", f"{q['fid']:.2f}"),
        ("KID", f"{fp['kid_mean']:.3f}", f"{q['kid_mean']:.3f}"),
        ("PSNR vs float (dB)", "", f"{result['psnr_db_vs_fp']:.2f}"),
        ("linear weights (MiB)", f"{weights['fp']:.2f}", f"{weights['quantized']:.2f}"),
        ("ms per step", f"{fp['ms_per_step']:.1f}", f"{q['ms_per_step']:.1f}"),
        # > 1: the quantized model is faster. Eager on both sides (docs/cpu_path.md: compiled figures).
        ("speed vs float", "1.00x", f"{fp['ms_per_step'] / q['ms_per_step']:.2f}x"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)
