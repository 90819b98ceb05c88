"""The `dqcompile` command line.

Its commands work on the embedded Fashion-MNIST DiT, so the command line (unlike the compiler's modules)
imports the example package dqcompile.fmnist.
"""

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


def _embedded_model(device: str):
    """The embedded Fashion-MNIST DiT on `device` (tests swap in a tiny model here)."""
    from dqcompile.fmnist import load_embedded_model

    return load_embedded_model(device=device)


def _cmd_quantize(args: argparse.Namespace) -> int:
    import dqcompile

    model = _embedded_model(args.device)
    spec = dqcompile.QuantSpec.resolve(args.spec)
    if args.group_plan:
        spec = spec.with_group_plan(args.group_plan)
    qmodel = dqcompile.quantize(model, spec)
    print(qmodel.report)
    folder = dqcompile.save(qmodel, args.out)
    print(f"saved to {folder}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from dqcompile.fmnist.fitness import FITNESS_BUILDERS
    from dqcompile.methods.qdit import search_group_sizes

    log_path = Path(args.log or Path(args.out).with_suffix(".log"))
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("dqcompile.search")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    model = _embedded_model(args.device)
    # The fitness samples the embedded model with its defaults (dqcompile.fmnist.fitness); the search
    # records a callable fitness as "custom".
    fitness = FITNESS_BUILDERS[args.fitness](model, samples=args.samples, steps=args.steps,
                                             guidance_scale=args.guidance, seed=args.seed,
                                             batch_size=256)
    plan = search_group_sizes(
        model, fitness, args.spec, candidates=tuple(int(g) for g in args.candidates.split(",")), budget=args.budget,
        population=args.population, iterations=args.iterations, top_k=args.top_k, crossover=args.crossover,
        mutation=args.mutation, mutation_prob=args.mutation_prob, fitness_name=args.fitness, seed=args.seed,
        checkpoint=args.checkpoint,
    )
    plan.save(args.out)
    logger.removeHandler(handler)
    search = plan.search
    print(f"best {plan.fitness_kind} {plan.fitness:.4f} at {plan.bitops / 1e9:.3f} GBitOps per sample (budget "
          f"{plan.budget / 1e9:.3f}); {search['evaluations']} evaluations, {search['evaluation_seconds']:.0f} s")
    print(f"wrote {args.out} (apply: dqcompile quantize --spec {args.spec} --group-plan {args.out}) and {log_path}")
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from dqcompile.fmnist import make_scheduler
    from dqcompile.viz.command import run_viz

    run_viz(_embedded_model(args.device), scheduler=make_scheduler("ddim"), spec=args.spec, out=args.out, images=args.samples, steps=args.steps, csv_path=args.csv,
            mode=args.mode, device=args.device, seed=args.seed, screenshot_path=args.screenshot)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dqcompile.fmnist.demo import run_demo

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
    demo.add_argument("--samples", type=int, default=50, help="images per model for the metrics (default 50)")
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
    quantize.add_argument("--group-plan", help="a group plan JSON from `dqcompile search` (per-layer group sizes)")
    quantize.set_defaults(run=_cmd_quantize)

    search = sub.add_parser("search", help="Q-DiT evolutionary search of per-layer group sizes on the embedded model")
    search.add_argument("--spec", default="qdit-w4a8", help="base preset: bits, rounding, starting group sizes")
    search.add_argument("--fitness", choices=("fid", "proxy"), default="fid",
                        help="fid: FID vs the test split; proxy: MSE of final images vs the float model (default fid)")
    search.add_argument("--samples", type=int, default=256, help="images per evaluation (default 256)")
    search.add_argument("--steps", type=int, default=20, help="DDIM steps per evaluation (default 20)")
    search.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    search.add_argument("--candidates", default="32,64,128,192,288", help="group sizes, comma-separated")
    search.add_argument("--budget", type=float, help="BitOps per sample (default: the spec's configuration)")
    search.add_argument("--population", type=int, default=50)
    search.add_argument("--iterations", type=int, default=10)
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--crossover", type=int, default=25)
    search.add_argument("--mutation", type=int, default=25)
    search.add_argument("--mutation-prob", type=float, default=0.1)
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--checkpoint", help="checkpoint JSON, written after every evaluation; resumed when it exists")
    search.add_argument("--device", default="cpu")
    search.add_argument("--out", required=True, help="the plan JSON to write")
    search.add_argument("--log", help="log file of each generation's best (default: OUT with suffix .log)")
    search.set_defaults(run=_cmd_search)

    viz = sub.add_parser("viz", help="graph page of the quantized embedded model, with each layer's error (SQNR)")
    viz.add_argument("--spec", default="w4a8", help="preset name (default w4a8)")
    viz.add_argument("--out", default="graph.html", help="the page to write; .dot (and .svg with Graphviz) beside it")
    viz.add_argument("--samples", type=int, default=8,
                     help="images whose DDIM trajectories give the inputs for the errors and calibration; 0: no errors (default 8)")
    viz.add_argument("--steps", type=int, default=10, help="DDIM steps per trajectory (default 10)")
    viz.add_argument("--mode", choices=("isolated", "accumulated"), default="isolated",
                     help="isolated: each layer on float inputs (its own error); accumulated: on the quantized model's own")
    viz.add_argument("--csv", help="also write the per-layer errors, worst first, as CSV")
    viz.add_argument("--screenshot", help="also a PNG of the page opened on the worst layer (needs chromium)")
    viz.add_argument("--device", default="cpu")
    viz.add_argument("--seed", type=int, default=0)
    viz.set_defaults(run=_cmd_viz)

    listing = sub.add_parser("presets", help="list the spec presets")
    listing.set_defaults(run=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
