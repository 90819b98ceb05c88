"""What multi-region quantization (MRQ) costs on integer kernels, against one region.

    python benchmarks/bench_mrq_cost.py [--device cpu] [--threads 2] [--out results/mrq_cost.json]

MRQ gives each value a code in one of two regions with different steps; an integer product then runs
once per region (dqcompile/quant/mrq.py): for the post-GELU fc2 input, quantize_act_mrq + two
int_linear calls + an add, against quantize_act_static + one int_linear; for attention, int_attention
with two-region softmax codes (two P V products) against uniform ones. Shapes: the embedded
Fashion-MNIST DiT's fc2 (768 -> 192) and attention (6 heads x 32, 256 tokens) at 16 rows (8 images with
guidance), and DiT-XL/2's fc2 (4608 -> 1152) at 4 rows. Times are medians of --runs runs of the
benchmarks' one timer (bench_common.median_ms) on the reference backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dqcompile.backends.ops  # noqa: E402,F401  (registers torch.ops.dqcompile)
from bench_common import median_ms, run_metadata  # noqa: E402
from dqcompile.quant import quantize_weight  # noqa: E402
from dqcompile.quant.mrq import softmax_low_scales  # noqa: E402

OPS = torch.ops.dqcompile
TOKENS = 256


def fc2_case(name: str, rows: int, k: int, n: int, device: str, runs: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(rows, TOKENS, k, generator=generator), approximate="tanh").to(device)
    weight = quantize_weight(torch.randn(n, k, generator=generator), 8)
    qweight, weight_scale = weight.qweight.to(device), weight.scale.to(device)
    bias = torch.randn(n, generator=generator).to(device)
    scale = (x.max() - x.min()).reshape(1) / 255
    zero = (-128 - torch.round(x.min() / scale)).to(torch.int32)
    low, high = torch.tensor([0.17 / 128], device=device), (x.max() / 127).reshape(1)
    mrq_zero = torch.zeros(1, dtype=torch.int32, device=device)

    def one_region() -> torch.Tensor:
        q = OPS.quantize_act_static(x, scale, zero, 8)
        return OPS.int_linear(q, scale, zero, qweight, weight_scale, bias, 8, 0, torch.float32)

    def two_regions() -> torch.Tensor:
        q_low, q_high = OPS.quantize_act_mrq(x, low, high, 8, True)
        return (OPS.int_linear(q_low, low, mrq_zero, qweight, weight_scale, None, 8, 0, torch.float32)
                + OPS.int_linear(q_high, high, mrq_zero, qweight, weight_scale, bias, 8, 0, torch.float32))

    def float_linear() -> torch.Tensor:
        return torch.nn.functional.linear(x, weight.dequantize().to(device), bias)

    return _row(name, f"[{rows}x{TOKENS}, {k}] x [{n}, {k}]", one_region, two_regions, float_linear, runs)


def attention_case(name: str, rows: int, heads: int, head_dim: int, device: str, runs: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, heads, TOKENS, head_dim, generator=generator).to(device) for _ in range(3))
    steps = [x.abs().amax(dim=(0, 2, 3)).reshape(1, heads, 1, 1) / 127 for x in (q, k, v)]
    p_low = torch.tensor(softmax_low_scales(8)[3], device=device)
    scale = head_dim**-0.5
    return _row(
        name,
        f"[{rows}, {heads}, {TOKENS}, {head_dim}]",
        lambda: OPS.int_attention(q, k, v, *steps, None, 8, scale),
        lambda: OPS.int_attention(q, k, v, *steps, p_low, 8, scale),
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        runs,
    )


def _row(name: str, shape: str, one_region, two_regions, float_version, runs: int) -> dict:
    one = median_ms(one_region, runs=runs)["ms"]
    two = median_ms(two_regions, runs=runs)["ms"]
    return {"case": name, "shape": shape, "one_region_ms": one, "two_regions_ms": two,
            "float_ms": median_ms(float_version, runs=runs)["ms"], "mrq_over_one_region": two / one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [
        fc2_case("fc2, embedded DiT", 16, 768, 192, args.device, args.runs),
        fc2_case("fc2, DiT-XL/2", 4, 4608, 1152, args.device, args.runs),
        attention_case("attention, embedded DiT", 16, 6, 32, args.device, args.runs),
    ]
    result = {**run_metadata(), "threads": torch.get_num_threads(), "backend": "reference", "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}, {result['threads']} threads, reference backend")
    print("| case | shape | one region (ms) | two regions (ms) | MRQ / one region | float (ms) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['shape']} | {row['one_region_ms']:.2f} | {row['two_regions_ms']:.2f} | "
              f"{row['mrq_over_one_region']:.2f}x | {row['float_ms']:.2f} |")


if __name__ == "__main__":
    main()
