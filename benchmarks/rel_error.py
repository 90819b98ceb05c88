"""Relative L2 error of a quantized DiT's output against fp32, per preset.

    python benchmarks/rel_error.py [--model tiny|embedded] [--out results.json]

tiny: a randomly initialised diffusers DiT (4 layers, 128 wide, 256 tokens), seed 0; embedded: the
trained Fashion-MNIST DiT shipped with the package. Inputs are Gaussian noise at 8 timesteps spread
over [0, 1000) and random classes; the error is ||q - fp|| / ||fp|| over all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dqcompile  # noqa: E402
from bench_common import run_metadata  # noqa: E402

PRESETS = ("w8a8", "w6a6", "w4a8")


def build_model(kind: str) -> torch.nn.Module:
    if kind == "embedded":
        from dqcompile.fmnist import load_embedded_model

        return load_embedded_model()
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=4,
        sample_size=32, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = build_model(args.model)
    config = model.config
    generator = torch.Generator().manual_seed(1)
    batch = 8
    inputs = {
        "hidden_states": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator),
        "timestep": torch.linspace(0, 999, batch).round().long(),
        "class_labels": torch.randint(0, config.num_embeds_ada_norm, (batch,), generator=generator),
    }
    with torch.no_grad():
        reference = model(**inputs).sample
        rows = []
        for preset in PRESETS:
            qmodel = dqcompile.quantize(model, preset, progress=False)
            output = qmodel(**inputs).sample
            rows.append({"preset": preset, "rel_l2": float((output - reference).norm() / reference.norm()),
                         "quantized_layers": qmodel.report.quantized_count,
                         "weight_mib": qmodel.report.quantized_weight_bytes / 2**20,
                         "float_weight_mib": qmodel.report.float_weight_bytes / 2**20})
    result = {**run_metadata(), "model": args.model, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print("| preset | rel. L2 vs fp32 | quantized linears | linear weights (MiB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['preset']} | {row['rel_l2']:.4f} | {row['quantized_layers']} | "
              f"{row['float_weight_mib']:.2f} -> {row['weight_mib']:.2f} |")


if __name__ == "__main__":
    main()
