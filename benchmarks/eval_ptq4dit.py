"""PTQ4DiT on the embedded Fashion-MNIST DiT: per-layer SQNR before / after balancing, FID / KID of FP, RTN,
CSB and CSB + SSC at w8a8 and w4a8, and the calibration time.

    python benchmarks/eval_ptq4dit.py --device cuda [--samples 5000] [--steps 50] [--guidance 1.5] [--out ptq4dit.json]
    python benchmarks/eval_ptq4dit.py --device cpu --samples 64 --steps 5 --batch-size 64     # smoke check

Every model samples the same classes (balanced) from the same noise with DDIM and classifier-free guidance;
FID / KID are against the Fashion-MNIST test split in the feature space of the shipped classifier
(dqcompile.eval). The quantized variants share one spec (ptq4dit-w8a8 / ptq4dit-w4a8: per-channel weights,
8-bit static per-tensor activations) and differ only in the method: RTN (no balancing), CSB, CSB + SSC.
Calibration: `calibration_set` with the evaluation's sampler (DDIM, --steps steps, --guidance), 25 timesteps
(or --steps if fewer), 32 images each.

Per-layer SQNR, 10 log10(|Y|^2 / |Y - Y_q|^2), isolates each balanced layer: its float input X (recorded
from the float model on the calibration set) and weight W give Y = X W^T; Y_q uses the layer's quantizers
(static per-tensor asymmetric 8-bit activations from the calibration range, symmetric per-channel weights)
on X / b and W diag(b), with b = 1 (RTN), the CSB vector or the CSB + SSC vector.

Writes the JSON given by --out (metadata, settings, timings, metrics, per-layer SQNR) and prints markdown
tables last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dqcompile  # noqa: E402
from bench_common import run_metadata, timed  # noqa: E402
from dqcompile.calib.runner import run_calibration  # noqa: E402
from dqcompile.data import from_model_space, load_fashion_mnist  # noqa: E402
from dqcompile.eval import generative_metrics, sample  # noqa: E402
from dqcompile.models import NUM_CLASSES, load_embedded_model  # noqa: E402
from dqcompile.passes.annotate_linears import annotate_linears  # noqa: E402
from dqcompile.passes.context import PassContext  # noqa: E402
from dqcompile.passes.find_adaln_pairs import analyze_balance_pairs, balanced_layers, iter_pairs  # noqa: E402
from dqcompile.passes.observers import insert_observers, remove_observers  # noqa: E402
from dqcompile.passes.salience_balance import ANNOTATION, pair_key, salience_balance  # noqa: E402
from dqcompile.quant import compute_qparams, dequantize, quantize, quantize_weight  # noqa: E402
from dqcompile.spec import PTQ4DiTOptions, QuantSpec  # noqa: E402

BITS = ("w8a8", "w4a8")
WEIGHT_BITS = {"w8a8": 8, "w4a8": 4}
VARIANTS = ("RTN", "CSB", "CSB+SSC")


def variant_spec(bits: str, variant: str) -> QuantSpec:
    spec = QuantSpec.from_preset(f"ptq4dit-{bits}")
    if variant == "RTN":
        return spec.replace(method="rtn", name=f"rtn-{bits}-static")
    return spec.replace(ptq4dit=PTQ4DiTOptions(ssc=variant == "CSB+SSC"), name=f"{variant.lower()}-{bits}")


def balancing_vectors(model: torch.nn.Module, calibration: dqcompile.CalibrationSet) -> tuple[PassContext, dict]:
    """The pipeline up to the balancing vectors: pairs, calibration statistics, CSB and CSB + SSC vectors.

    Returns the context (its input_stats are the unbalanced statistics) and {variant: {layer: b}}.
    """
    captured = dqcompile.capture(model, calibration[0], copy_parameters=True)
    gm = captured.graph_module
    ctx = PassContext(spec=variant_spec("w8a8", "CSB+SSC"), progress=False)
    annotate_linears(gm, ctx)
    analyze_balance_pairs(gm, ctx)
    insert_observers(gm, ctx, ctx.observe)
    run_calibration(gm, captured.binding, calibration, progress=False)
    remove_observers(gm, ctx)
    vectors: dict[str, dict[str, torch.Tensor]] = {"RTN": {}}
    for variant in ("CSB", "CSB+SSC"):
        ctx.spec = variant_spec("w8a8", variant)
        salience_balance(gm, ctx)
        vectors[variant] = {
            layer: ctx.annotations[ANNOTATION][pair_key(pair)].vector
            for pair in iter_pairs(ctx) for layer in balanced_layers(pair) if ctx.layers[layer].quantized
        }
    vectors["RTN"] = {layer: torch.ones_like(b) for layer, b in vectors["CSB"].items()}
    return ctx, vectors


@torch.no_grad()
def layer_sqnr(model: torch.nn.Module, calibration: dqcompile.CalibrationSet) -> list[dict[str, Any]]:
    """Per balanced layer and variant: the SQNR (dB) of its quantized output on the calibration set, at
    each width ("w4a8 CSB"), and split into its two sources: weights alone quantized ("w4 CSB w-only",
    float activations X / b) and activations alone ("a8 CSB a-only", float weights W b). Balancing trades
    one against the other, and the split shows which side a variant wins or loses on.
    """
    ctx, vectors = balancing_vectors(model, calibration)
    layers = sorted(vectors["CSB"], key=list(ctx.layers).index)
    # Per (layer, variant), fixed over the calibration batches: b, W b, the activation quantizer of X / b,
    # and per width the dequantized weight.
    balanced: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, Any, dict[str, torch.Tensor]]] = {}
    for layer in layers:
        weight = model.get_submodule(layer).weight.float()
        stats = ctx.input_stats[layer].values()
        for variant, per_layer in vectors.items():
            b = per_layer[layer].to(weight.device)
            low = min(float((s.minimum / b).min()) for s in stats)
            high = max(float((s.maximum / b).max()) for s in stats)
            act = compute_qparams(torch.tensor([low, high], device=weight.device), 8, symmetric=False,
                                  granularity="tensor")
            w_hats = {bits: quantize_weight(weight * b, WEIGHT_BITS[bits]).dequantize() for bits in BITS}
            balanced[(layer, variant)] = (b, weight * b, act, w_hats)
    signal: dict[str, float] = {layer: 0.0 for layer in layers}
    noise: dict[str, dict[str, float]] = {layer: {} for layer in layers}  # layer -> column -> error energy

    def add(layer: str, column: str, error: torch.Tensor) -> None:
        noise[layer][column] = noise[layer].get(column, 0.0) + float(error.square().sum())

    def record(layer: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].float()
            reference = x @ module.weight.float().T
            signal[layer] += float(reference.square().sum())
            for variant in vectors:
                b, weight_b, act, w_hats = balanced[(layer, variant)]
                x_b = x / b
                x_hat = dequantize(quantize(x_b, act), act)
                add(layer, f"a8 {variant} a-only", x_hat @ weight_b.T - reference)
                for bits, w_hat in w_hats.items():
                    add(layer, f"{bits} {variant}", x_hat @ w_hat.T - reference)
                    add(layer, f"{bits[:2]} {variant} w-only", x_b @ w_hat.T - reference)
        return hook

    handles = [model.get_submodule(layer).register_forward_pre_hook(record(layer)) for layer in layers]
    try:
        for batch in calibration:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [{"layer": layer, **{column: 10 * math.log10(signal[layer] / energy) if energy > 0 else math.inf
                                for column, energy in noise[layer].items()}} for layer in layers]


def evaluate(model: torch.nn.Module, labels: torch.Tensor, reference: torch.Tensor, args: argparse.Namespace) -> dict:
    images, sampling_s = timed(sample, model, labels, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                               batch_size=args.batch_size, device=args.device, progress=False)
    metrics = generative_metrics(from_model_space(images.cpu()), reference, prc=False, isc=False, device=args.device)
    return {"fid": metrics["fid"], "kid_mean": metrics["kid_mean"], "kid_std": metrics["kid_std"], "sampling_s": sampling_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000, help="images per model (default 5000)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per model call (default 1000)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration images per timestep (default 32)")
    parser.add_argument("--calib-timesteps", type=int, default=25, help="calibration timesteps (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="folder with the Fashion-MNIST release files (default: dqcompile.data's search)")
    parser.add_argument("--out", type=Path, help="JSON results file")
    args = parser.parse_args()

    model = load_embedded_model(device=args.device)
    reference, _ = load_fashion_mnist("test", root=args.data)
    labels = torch.arange(args.samples) % NUM_CLASSES

    calibration, trajectory_s = timed(
        dqcompile.calibration_set, model, num_timesteps=min(args.calib_timesteps, args.steps),
        samples_per_timestep=args.calib_samples, num_inference_steps=args.steps, scheduler="ddim",
        guidance_scale=args.guidance, seed=args.seed + 1,
    )

    sqnr = layer_sqnr(model, calibration)
    results = [{"model": "FP", "bits": "fp32", "quantize_s": 0.0, **evaluate(model, labels, reference, args)}]
    for bits in BITS:
        for variant in VARIANTS:
            qmodel, quantize_s = timed(dqcompile.quantize, model, variant_spec(bits, variant), calibration=calibration,
                                       progress=False)
            results.append({"model": variant, "bits": bits, "quantize_s": quantize_s,
                            **evaluate(qmodel, labels, reference, args)})
            del qmodel

    settings = {key: value for key, value in vars(args).items() if key != "out"}
    output = {**run_metadata(), "settings": settings, "calibration_trajectories_s": trajectory_s,
              "calibration_batches": len(calibration), "calibration_timesteps": calibration.timesteps,
              "results": results, "layer_sqnr_db": sqnr}
    if args.out:
        args.out.write_text(json.dumps(output, indent=2))

    print(f"\nPer-layer SQNR (dB) of balanced layers, isolated, on the calibration set ({len(calibration)} batches):")
    columns = [f"{bits} {variant}" for bits in BITS for variant in VARIANTS]
    columns += [f"{bits[:2]} {variant} w-only" for bits in BITS for variant in VARIANTS]
    columns += [f"a8 {variant} a-only" for variant in VARIANTS]
    print("| layer | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in sqnr:
        print(f"| {row['layer']} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    print(f"\n{output['device']}, {args.samples} samples, DDIM {args.steps} steps, guidance {args.guidance}; "
          f"calibration trajectories {trajectory_s:.1f} s ({len(calibration)} timesteps x {2 * args.calib_samples} rows)")
    print("| model | bits | FID | KID (x1e3) | quantize + calibrate (s) | sampling (s) |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['model']} | {row['bits']} | {row['fid']:.2f} | {1e3 * row['kid_mean']:.2f} +- "
              f"{1e3 * row['kid_std']:.2f} | {row['quantize_s']:.1f} | {row['sampling_s']:.1f} |")


if __name__ == "__main__":
    main()
