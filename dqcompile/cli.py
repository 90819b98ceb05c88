"""The `dqcompile` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dqcompile.spec import presets


def _cmd_presets(args: argparse.Namespace) -> int:
    from dqcompile.spec import QuantSpec
    from dqcompile.report import describe_activations, describe_weights

    for name in presets():
        layer = QuantSpec.from_preset(name).layer("any")
        print(f"{name:12s} weights {describe_weights(layer):28s} activations {describe_activations(layer)}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import dqcompile
    from dqcompile.models import load_embedded_model

    model = load_embedded_model(device=args.device)
    qmodel = dqcompile.quantize(model, args.spec)
    print(qmodel.report)
    folder = dqcompile.save(qmodel, args.out)
    print(f"saved to {folder}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dqcompile.demo import run_demo

    run_demo(
        out=args.out, spec=args.spec, samples=args.samples, steps=args.steps, guidance=args.guidance,
        device=args.device, seed=args.seed,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqcompile", description="Post-training quantization compiler for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize the embedded Fashion-MNIST DiT, sample FP and quantized grids, print metrics")
    demo.add_argument("--spec", default="w8a8", help="preset name (see `dqcompile presets`); default w8a8")
    demo.add_argument("--samples", type=int, default=100, help="images per model for the metrics (default 100)")
    demo.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    demo.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="dqcompile-demo", help="report folder (default ./dqcompile-demo)")
    demo.set_defaults(run=_cmd_demo)

    quantize = sub.add_parser("quantize", help="quantize the embedded model and save it (safetensors + plan.json)")
    quantize.add_argument("--spec", default="w8a8")
    quantize.add_argument("--device", default="cpu")
    quantize.add_argument("--out", required=True)
    quantize.set_defaults(run=_cmd_quantize)

    listing = sub.add_parser("presets", help="list the spec presets")
    listing.set_defaults(run=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
