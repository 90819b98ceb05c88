"""Time to load a saved quantized model against the time to quantize it, on the DiT-XL/2 architecture.

`load` runs no calibration and no method pass: it rebuilds the architecture from the saved config
(uninitialised weights on the meta device first, checked against the file), captures it with
torch.export, lowers the capture from the saved plans and copies the saved tensors in. This script
measures each part of both paths and checks that the loaded model computes what the quantized one did.

    python benchmarks/bench_load.py --out benchmarks/results/load_cpu.json [--spec w8a8] [--quick]

--quick uses a 2-layer model of the same width (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import run_metadata, timed  # noqa: E402

import dqcompile  # noqa: E402

DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="w8a8")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    from diffusers import DiTTransformer2DModel

    config = {**DIT_XL_2, "num_layers": 2} if args.quick else DIT_XL_2
    model, build_s = timed(lambda: DiTTransformer2DModel(**config).eval())
    qmodel, quantize_s = timed(dqcompile.quantize, model, args.spec, progress=False)
    inputs = {"hidden_states": torch.randn(2, 4, 32, 32), "timestep": torch.tensor([999, 10]),
              "class_labels": torch.tensor([3, 1000])}
    with torch.no_grad():
        expected = qmodel(**inputs).sample
    with tempfile.TemporaryDirectory() as folder:
        _, save_s = timed(dqcompile.save, qmodel, Path(folder) / "q")
        size = sum(path.stat().st_size for path in (Path(folder) / "q").iterdir())
        del qmodel, model
        loaded, load_s = timed(dqcompile.load, Path(folder) / "q")
    with torch.no_grad():
        identical = bool(torch.equal(loaded(**inputs).sample, expected))
    result = {
        **run_metadata(),
        "threads": torch.get_num_threads(),
        "model": "DiT-XL/2 architecture (diffusers config, random weights, fp32)" + (" 2 layers" if args.quick else ""),
        "spec": args.spec,
        "build_float_model_s": round(build_s, 2),
        "quantize_s": round(quantize_s, 2),
        "save_s": round(save_s, 2),
        "load_s": round(load_s, 2),
        "load_over_quantize": round(load_s / quantize_s, 3),
        "saved_mib": round(size / 2**20, 1),
        "loaded_output_identical": identical,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
