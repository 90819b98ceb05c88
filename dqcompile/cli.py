"""The `dqcompile` command line.

Its commands work on the embedded Fashion-MNIST DiT, so the command line (unlike the compiler's modules)
imports the example package dqcompile.fmnist.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dqcompile.spec import presets


def _cmd_presets(args: argparse.Namespace) -> int:
    from dqcompile.methods import get_method
    from dqcompile.report import describe_activations, describe_weights
    from dqcompile.spec import QuantSpec

    for name in presets():
        spec = QuantSpec.from_preset(name)
        weights, activations = spec.layer_plans("any", in_features=1152)  # DiT-XL/2's width: no fitting
        method = get_method(spec.method).description
        print(f"{name:18s} weights {describe_weights(weights):30s} activations {describe_activations(activations):34s} "
              f"{method}")
    return 0


def _calibration(model, spec, samples: int, steps: int, guidance: float, seed: int):
    """The calibration set a calibrated spec needs, from the embedded model's own DDIM sampling (as the
    demo records it); None for specs that need none."""
    import dqcompile
    from dqcompile.fmnist import make_scheduler

    if not spec.needs_calibration:
        return None
    return dqcompile.calibration_set(model, num_timesteps=steps, samples_per_timestep=samples, num_inference_steps=steps,
                                     scheduler=make_scheduler("ddim"), guidance_scale=guidance, seed=seed)


def _writable(path: str, folder: bool) -> Path:
    """An output path, checked before any work: its parent must exist (or be creatable) and be
    writable, and the path must not already be a file where a folder goes (or the reverse)."""
    target = Path(path)
    parent = target.parent.resolve()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot write {target}: {error.strerror or error}") from None
    if target.exists() and target.is_dir() != folder:
        raise ValueError(f"cannot write {target}: it is a {'folder' if target.is_dir() else 'file'}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {target}: {parent} is not writable")
    return target


def _embedded_model(device: str):
    """The embedded Fashion-MNIST DiT on `device` (tests swap in a tiny model here)."""
    from dqcompile.fmnist import load_embedded_model

    return load_embedded_model(device=device)


def _cmd_quantize(args: argparse.Namespace) -> int:
    import dqcompile

    out = _writable(args.out, folder=True)
    spec = dqcompile.QuantSpec.resolve(args.spec)
    if args.group_plan:
        spec = spec.with_group_plan(args.group_plan)
    model = _embedded_model(args.device)
    calibration = _calibration(model, spec, args.calibration_samples, args.calibration_steps, args.guidance, args.seed)
    qmodel = dqcompile.quantize(model, spec, calibration=calibration)
    if args.group_plan:
        unknown = sorted({name for name, _ in spec.group_sizes} - set(qmodel.plan.layers))
        if unknown:
            raise ValueError(f"the group plan {args.group_plan} names {len(unknown)} layer(s) the model does not have "
                             f"(e.g. {unknown[0]}): it was searched on another model")
    print(qmodel.report)
    folder = dqcompile.save(qmodel, out)
    print(f"saved to {folder}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import logging

    from dqcompile.fmnist.fitness import FITNESS_BUILDERS
    from dqcompile.methods.qdit import search_group_sizes

    _writable(args.out, folder=False)

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

    _writable(args.out, folder=False)
    run_viz(_embedded_model(args.device), scheduler=make_scheduler("ddim"), spec=args.spec, out=args.out, images=args.samples, steps=args.steps, csv_path=args.csv,
            mode=args.mode, device=args.device, seed=args.seed, screenshot_path=args.screenshot)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dqcompile.fmnist.demo import run_demo

    _writable(args.out, folder=True)
    run_demo(
        out=args.out, spec=args.spec, samples=args.samples, steps=args.steps, guidance=args.guidance,
        device=args.device, seed=args.seed,
    )
    return 0


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value

    parse.__name__ = f"integer >= {least}"
    return parse


POSITIVE, NON_NEGATIVE = _at_least(1), _at_least(0)


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a finite, non-negative guidance scale")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dqcompile", description="Post-training quantization compiler for diffusion transformers.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="quantize the embedded Fashion-MNIST DiT, sample FP and quantized grids, print metrics")
    demo.add_argument("--spec", default="w8a8", help="preset name (see `dqcompile presets`); default w8a8")
    demo.add_argument("--samples", type=_at_least(2), default=50, help="images per model for the metrics (default 50)")
    demo.add_argument("--steps", type=POSITIVE, default=20, help="DDIM steps (default 20)")
    demo.add_argument("--guidance", type=_guidance, default=1.5, help="classifier-free guidance scale (default 1.5)")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="dqcompile-demo", help="report folder (default ./dqcompile-demo)")
    demo.set_defaults(run=_cmd_demo)

    quantize = sub.add_parser("quantize", help="quantize the embedded model and save it (safetensors + plan.json)")
    quantize.add_argument("--spec", default="w8a8")
    quantize.add_argument("--device", default="cpu")
    quantize.add_argument("--out", required=True)
    quantize.add_argument("--group-plan", help="a group plan JSON from `dqcompile search` (per-layer group sizes)")
    quantize.add_argument("--calibration-samples", type=POSITIVE, default=8,
                          help="images per timestep of the calibration set a calibrated spec records (default 8)")
    quantize.add_argument("--calibration-steps", type=POSITIVE, default=20,
                          help="DDIM steps (and timesteps) of the calibration trajectories (default 20)")
    quantize.add_argument("--guidance", type=_guidance, default=1.5, help="guidance of the calibration sampling")
    quantize.add_argument("--seed", type=NON_NEGATIVE, default=0)
    quantize.set_defaults(run=_cmd_quantize)

    search = sub.add_parser("search", help="Q-DiT evolutionary search of per-layer group sizes on the embedded model")
    search.add_argument("--spec", default="qdit-w4a8", help="base preset: bits, rounding, starting group sizes")
    search.add_argument("--fitness", choices=("fid", "proxy"), default="fid",
                        help="fid: FID vs the test split; proxy: MSE of final images vs the float model (default fid)")
    search.add_argument("--samples", type=POSITIVE, default=256, help="images per evaluation (default 256)")
    search.add_argument("--steps", type=POSITIVE, default=20, help="DDIM steps per evaluation (default 20)")
    search.add_argument("--guidance", type=_guidance, default=1.5, help="classifier-free guidance scale (default 1.5)")
    search.add_argument("--candidates", default="32,64,128,192,288", help="group sizes, comma-separated")
    search.add_argument("--budget", type=float, help="BitOps per sample (default: the spec's configuration)")
    search.add_argument("--population", type=POSITIVE, default=50)
    search.add_argument("--iterations", type=POSITIVE, default=10)
    search.add_argument("--top-k", type=POSITIVE, default=10)
    search.add_argument("--crossover", type=NON_NEGATIVE, default=25)
    search.add_argument("--mutation", type=NON_NEGATIVE, default=25)
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
    viz.add_argument("--samples", type=NON_NEGATIVE, default=8,
                     help="images whose DDIM trajectories give the inputs for the errors and calibration; 0: no errors (default 8)")
    viz.add_argument("--steps", type=POSITIVE, default=10, help="DDIM steps per trajectory (default 10)")
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


# Errors a user can cause and fix: shown as one line (the message says what was wrong and what to do).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. A user error prints one line, `dqcompile: error: ...`, and exits with code 2
    (argparse's code for bad arguments); --debug shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"dqcompile: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dqcompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
