"""What a LoRA adapter costs on a quantized model: the float branch s * B (A x) beside each integer GEMM.

    python benchmarks/bench_lora.py --out lora_cpu.json                # embedded model, w8a8, CPU
    python benchmarks/bench_lora.py --device cuda --rows 16 64         # on a GPU

The embedded Fashion-MNIST DiT quantized (default w8a8), then the same model with a random adapter of
each --ranks on every quantized linear (attention q, k, v, out and both MLP linears of every block):
ms per forward (bench_common's timer, median of --repeats runs after a warm-up run), eager, under
torch.no_grad, and the overhead against the model without an adapter. JSON: run metadata, settings,
per rows: ms of the base and of each rank, and the overhead in percent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import median_ms, run_metadata  # noqa: E402

import dqcompile  # noqa: E402
from dqcompile.example_inputs import default_example_inputs  # noqa: E402
from dqcompile.fmnist import load_embedded_model  # noqa: E402


def random_adapter(model: torch.nn.Module, layers: list[str], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT-style state dict of rank `rank` on `layers` (random values: speed does not depend on them)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in layers:
        out_features, in_features = model.get_parameter(f"{name}.weight").shape
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="w8a8")
    parser.add_argument("--rows", type=int, nargs="+", default=[32], help="samples per forward (default 32)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_embedded_model().to(args.device).eval()
    qmodel = dqcompile.quantize(model, args.spec, progress=False)
    layers = [name for name, layer in qmodel.plan.layers.items() if layer.quantized]
    results: dict[str, Any] = {}
    with torch.no_grad():
        for rows in args.rows:
            inputs = {k: v.to(args.device) for k, v in default_example_inputs(model, batch=rows).items()}
            base = median_ms(lambda: qmodel(**inputs), runs=args.repeats, device=args.device)["ms"]
            entry: dict[str, Any] = {"base_ms": round(base, 2)}
            for rank in args.ranks:
                qmodel.load_lora_weights(random_adapter(model, layers, rank), f"rank{rank}")
                ms = median_ms(lambda: qmodel(**inputs), runs=args.repeats, device=args.device)["ms"]
                qmodel.unload_lora_weights()
                entry[f"rank_{rank}"] = {"ms": round(ms, 2), "overhead_percent": round(100 * (ms / base - 1), 1)}
            results[str(rows)] = entry
            print(f"{rows} rows: base {base:.1f} ms; " + "; ".join(
                f"rank {rank}: {entry[f'rank_{rank}']['ms']:.1f} ms (+{entry[f'rank_{rank}']['overhead_percent']}%)"
                for rank in args.ranks))
    output = {**run_metadata(), "threads": torch.get_num_threads(), "spec": args.spec, "adapted_layers": len(layers),
              "settings": {"rows": args.rows, "ranks": args.ranks, "repeats": args.repeats}, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
