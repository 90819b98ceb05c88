"""The quality driver: image quality of float and quantized Fashion-MNIST DiTs under one protocol.

    python benchmarks/evaluate.py --rows rtn --samples 5000 --steps 50 --out results/quality_rtn.json
    python benchmarks/evaluate.py --rows steps --model benchmark --samples 2000 --dtype bfloat16 --out steps_b.json
    python benchmarks/evaluate.py --rows noise --seeds 0,1,2 --samples 5000 --out noise.json
    python benchmarks/evaluate.py --row "w4a8-static=w4a8:activations.mode=static_tensor" --row "fp-ddim100=fp@steps=100"
    python benchmarks/evaluate.py --list                       # the row sets and their rows

A row is a label, a spec and options. The spec is `fp` (the float model) or a preset with optional
`field=value` overrides of the spec's dict form (QuantSpec.to_dict), dotted for nested fields
(`w4a8:activations.mode=static_tensor`, `ptq4dit-w4a8:options.ssc=false`, `qdit-w4a8:weights.rounding=gptq`;
`options` holds the method's own options). Options: sampler overrides (after `@`
on the command line: `fp@scheduler=ddpm,steps=250,clip_sample=false`), calibration settings, a Q-DiT
group-size search or a searched plan file. `--rows` names row sets (below, or `--list`); `--row` adds
rows; both may repeat and are run in order.

Protocol (one set of flags for every row): the model (`embedded`: the shipped 4.6M-parameter DiT;
`benchmark`: benchmarks/models/fmnist_dit_b; or a checkpoint folder of either layout), the sampler
(`--scheduler ddim|ddpm`, `--steps`, `--clip-sample`, `--timestep-spacing`, `--guidance`; a row may
override any of them), `--samples` images per row and seed (classes 0..9 in turn), `--seeds`, dtype,
batch size, device, and `--compile` (float rows: torch.compile; quantized rows: torch.compile with the
"dqcompile" backend; without it, quantized rows on a GPU run eagerly on the backend's Triton kernels,
`QuantizedModel.with_kernels`, unless `--kernels reference`). The sampler settings are an explicit protocol choice, recorded in the JSON:
`--clip-sample` (clip the predicted x0 to [-1, 1] at every step, diffusers' DDIM/DDPM `clip_sample`)
and `--timestep-spacing` default to false and "leading": with diffusers' defaults (clipping on, trailing
spacing) the float FID rose with the step count on both Fashion-MNIST models; docs/quality.md gives the
measurements and the protocol.

Per row and seed: FID, KID, IS and precision/recall against the Fashion-MNIST test split in the shipped
classifier's feature space, the share of samples the classifier puts in the asked class (`accuracy`),
PSNR of the final images against the float model's from the same noise and sampler (quantized rows),
and sampling throughput (images/s; with --compile the first seed includes compilation). Quantized rows
are made once per row by `dqcompile.quantize` (calibrated specs get a calibration set recorded from the
float model's own sampling with the row's sampler, once per setting, with seed + 1).

Noise band: with several seeds, each metric is reported as mean, standard deviation and range (max - min)
over the seeds. Tie rule: two rows whose means differ by no more than the larger of their two ranges
are a tie on that metric; the table marks each row against the baseline (`--baseline`, default the
first row) as `tie`, `better` or `worse`.

Writes the JSON (--out: device, date, commit from DQCOMPILE_COMMIT first, protocol, rows) after every
row, so a run cut short keeps what it finished, and a markdown table beside it (.md). `--budget-seconds`
skips the rows that would start after that many seconds (recorded as skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dqcompile  # noqa: E402
from bench_common import run_metadata, timed, timed_with_peak  # noqa: E402
from dqcompile.spec import QuantSpec  # noqa: E402

SAMPLER_KEYS = ("scheduler", "steps", "clip_sample", "timestep_spacing", "guidance")
CALIBRATION_KEYS = ("timesteps", "per_timestep")
SEARCH_KEYS = ("fitness", "samples", "steps", "population", "iterations", "top_k", "crossover", "mutation")
METRICS = ("fid", "kid", "isc", "prc", "accuracy", "psnr")
# Lower is better for these; higher for the rest.
LOWER_IS_BETTER = {"fid", "kid_mean"}
TABLE_METRICS = ("fid", "kid_mean", "isc_mean", "precision", "recall", "accuracy", "psnr_db_vs_fp")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: `spec` is "fp" or `preset[:field=value,...]`; `sampler` overrides the protocol's sampler
    settings; `calibration` overrides the calibration set's settings; `search` runs a Q-DiT group-size
    search (its settings) and quantizes with the plan found; `plan` is a searched plan JSON to apply."""

    label: str
    spec: str = "fp"
    sampler: tuple[tuple[str, Any], ...] = ()
    calibration: tuple[tuple[str, Any], ...] = ()
    search: tuple[tuple[str, Any], ...] | None = None
    plan: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "spec": self.spec, "sampler": dict(self.sampler),
                "calibration": dict(self.calibration), "search": None if self.search is None else dict(self.search),
                "plan": self.plan}


def row(label: str, spec: str = "fp", *, sampler: dict[str, Any] | None = None,
        calibration: dict[str, Any] | None = None, search: dict[str, Any] | None = None,
        plan: str | None = None) -> Row:
    for keys, given, what in ((SAMPLER_KEYS, sampler, "sampler"), (CALIBRATION_KEYS, calibration, "calibration"),
                              (SEARCH_KEYS, search, "search")):
        unknown = set(given or {}) - set(keys)
        if unknown:
            raise ValueError(f"row {label!r}: unknown {what} setting(s) {sorted(unknown)}; allowed: {', '.join(keys)}")
    return Row(label, spec, tuple(sorted((sampler or {}).items())), tuple(sorted((calibration or {}).items())),
               None if search is None else tuple(sorted(search.items())), plan)


def _step_rows(clip_values: Sequence[bool], cells: Sequence[tuple[str, int]], spacing: str | None = None) -> list[Row]:
    rows = []
    for clip in clip_values:
        for scheduler, steps in cells:
            sampler: dict[str, Any] = {"scheduler": scheduler, "steps": steps, "clip_sample": clip}
            label = f"fp {scheduler.upper()} {steps} clip={'on' if clip else 'off'}"
            if spacing is not None:
                sampler["timestep_spacing"] = spacing
                label += f" spacing={spacing}"
            rows.append(row(label, "fp", sampler=sampler))
    return rows


STEP_CELLS = (("ddim", 20), ("ddim", 50), ("ddim", 100), ("ddpm", 250))


def _ptq4dit_rows() -> list[Row]:
    rows = [row("fp")]
    for bits in ("w8a8", "w4a8"):
        rows += [row(f"RTN {bits} static", f"{bits}:activations.mode=static_tensor"),
                 row(f"CSB {bits}", f"ptq4dit-{bits}:options.ssc=false"),
                 row(f"CSB+SSC {bits}", f"ptq4dit-{bits}")]
    return rows


# The Q-DiT ablation's static rows calibrate on 10 timesteps x 16 images (as its first H100 run did).
QDIT_CALIBRATION = {"timesteps": 10, "per_timestep": 16}


def _qdit_rows(extra: bool = False) -> list[Row]:
    rows = [row("fp")]
    for bits in (4, 6):
        preset = f"qdit-w{bits}a8"
        rows += [row(f"rtn w{bits}a8", f"w8a8:weights.bits={bits},activations.mode=static_tensor",
                     calibration=QDIT_CALIBRATION),
                 row(f"group128 w{bits}a8", f"{preset}:activations.mode=static_tensor", calibration=QDIT_CALIBRATION),
                 row(f"group128+dynamic w{bits}a8", preset)]
        if extra:
            rows += [row(f"group128+dynamic-sample w{bits}a8", f"{preset}:activations.mode=dynamic_sample_group"),
                     row(f"gptq w{bits}a8", f"{preset}:weights.rounding=gptq", calibration=QDIT_CALIBRATION)]
        else:
            rows.append(row(f"searched w{bits}a8", preset, search={
                "fitness": "fid", "samples": 256, "population": 8, "iterations": 2, "top_k": 3, "crossover": 3,
                "mutation": 3}))
    return rows


def _tqdit_rows() -> list[Row]:
    rows = [row("fp")]
    stages = {"rtn": "options.mrq=false,options.time_groups=1,options.hessian=false",
              "+mrq": "options.time_groups=1,options.hessian=false",
              "+tgq": "options.hessian=false",
              "+ho": "options.hessian_rows=2048"}
    for width in ("w8a8", "w6a6"):
        for stage, overrides in stages.items():
            # Calibration: every sampling step recorded (TQ-DiT groups timesteps), 32 images per step.
            rows.append(row(f"{stage} {width}", f"tqdit-{width}:{overrides}",
                            calibration={"timesteps": "all", "per_timestep": 32}))
    return rows


ROW_SETS: dict[str, tuple[str, list[Row]]] = {
    "float": ("the float model", [row("fp")]),
    "rtn": ("float and round-to-nearest presets (dynamic per-token activations; w4a8 also static per-tensor)",
            [row("fp"), row("w8a8", "w8a8"), row("w6a6", "w6a6"), row("w4a8", "w4a8"),
             row("w4a8 static", "w4a8:activations.mode=static_tensor")]),
    "ptq4dit": ("PTQ4DiT at w8a8 and w4a8: RTN with the same static activations, CSB, CSB + SSC", _ptq4dit_rows()),
    "qdit": ("Q-DiT at w4a8 and w6a8: RTN, groups of 128, + dynamic activations, + searched group sizes",
             _qdit_rows()),
    "qdit-extra": ("Q-DiT's other rows: per-sample activation groups and GPTQ rounding", _qdit_rows(extra=True)),
    "tqdit": ("TQ-DiT at w8a8 and w6a6: RTN, + MRQ, + TGQ, + HO (2048 rows per layer and group)", _tqdit_rows()),
    "noise": ("the noise band: float and w8a8 (run with --seeds 0,1,2)", [row("fp"), row("w8a8", "w8a8")]),
    "steps": ("float FID vs sampling steps: DDIM 20/50/100 and DDPM 250, clip_sample off, then on (trailing "
              "spacing), then off with leading spacing (no step at t = 999)",
              _step_rows((False, True), STEP_CELLS) + _step_rows((False,), STEP_CELLS, "leading")),
    "steps-spacing": ("float, clip_sample off: DDIM 20 and 50 with leading and linspace timestep spacing",
                      _step_rows((False,), (("ddim", 20), ("ddim", 50)), "leading")
                      + _step_rows((False,), (("ddim", 20), ("ddim", 50)), "linspace")),
    "steps-leading": ("float, clip_sample off, leading spacing (the protocol of docs/quality.md): DDIM 20/50/100 "
                      "and DDPM 250", _step_rows((False,), STEP_CELLS, "leading")),
    "steps-cpu": ("the step-count check small enough for a CPU: DDIM 20 and 50, clip_sample off and on",
                  _step_rows((False, True), (("ddim", 20), ("ddim", 50)))),
}
# Issue 16's method tables (fair baselines, torchao, the recommended-preset candidates): method_tables.py.
import method_tables  # noqa: E402

ROW_SETS.update(method_tables.row_sets(row))


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    head, *rest = path
    if head not in data:
        raise ValueError(f"the spec has no field {head!r} (fields: {', '.join(data)})")
    if rest:
        if not isinstance(data[head], dict):
            raise ValueError(f"spec field {head!r} has no sub-fields")
        _set_path(data[head], rest, value)
    else:
        data[head] = value


def parse_spec(text: str, schedule: dict[str, Any] | None = None) -> QuantSpec | None:
    """`fp` -> None; `preset[:field=value,...]` -> the spec (overrides through to_dict / from_dict).

    Method options that name the noise schedule (TQ-DiT's beta_schedule, num_train_timesteps, for its
    denoising loss) get the model's training schedule, unless the overrides set them."""
    if text in ("fp", method_tables.TORCHAO_SPEC):  # the float model, or torchao's (run_row makes it)
        return None
    preset, _, overrides = text.partition(":")
    spec = QuantSpec.resolve(preset)
    data = spec.to_dict()
    items = [item.partition("=") for item in filter(None, overrides.split(","))]
    options = data.get("options")
    if schedule is not None and isinstance(options, dict):  # TQ-DiT's HO needs the model's schedule
        for key in ("beta_schedule", "num_train_timesteps"):
            if key in options and key in schedule:
                options[key] = schedule[key]
    for field, _, value in items:
        _set_path(data, field.split("."), _parse_value(value))
    data["name"] = text
    return QuantSpec.from_dict(data)


def parse_row(text: str) -> Row:
    """`label=spec[@key=value,...]` (or just `spec`): a row from the command line."""
    label, _, rest = text.partition("=") if "=" in text.split(":")[0].split("@")[0] else ("", "", text)
    spec, _, sampler_text = rest.partition("@")
    sampler = {key: _parse_value(value) for key, _, value in
               (item.partition("=") for item in filter(None, sampler_text.split(",")))}
    return row(label or text, spec, sampler=sampler)


def select_rows(sets: Iterable[str], extra: Iterable[str]) -> list[Row]:
    rows: list[Row] = []
    for name in sets:
        for part in filter(None, name.split(",")):
            if part not in ROW_SETS:
                raise ValueError(f"unknown row set {part!r}; row sets: {', '.join(ROW_SETS)}")
            rows += ROW_SETS[part][1]
    rows += [parse_row(text) for text in extra]
    labels = [r.label for r in rows]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ValueError(f"row labels must be unique; repeated: {duplicated}")
    if not rows:
        raise ValueError("no rows: name row sets with --rows or rows with --row (see --list)")
    return rows


def load_model(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(model, its config {"model", "scheduler", "null_class_id"}, a description)."""
    from dqcompile.fmnist import load_embedded_config, load_embedded_model
    from dqcompile.fmnist.benchmark import benchmark_config, benchmark_model_dir, load_benchmark_model, load_model_folder

    if name == "embedded":
        return load_embedded_model(device=device, dtype=dtype), load_embedded_config(), "embedded Fashion-MNIST DiT"
    if name == "benchmark":
        return (load_benchmark_model(device=device, dtype=dtype), benchmark_config(),
                f"benchmark Fashion-MNIST DiT ({benchmark_model_dir().relative_to(Path(__file__).resolve().parents[1])})")
    model, config = load_model_folder(name, device=device, dtype=dtype)
    return model, config, f"Fashion-MNIST DiT from {name}"


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, and with several values their standard deviation and range (max - min): the noise band."""
    values = [float(v) for v in values]
    result: dict[str, Any] = {"mean": statistics.fmean(values), "values": values}
    if len(values) > 1:
        finite = all(math.isfinite(v) for v in values)
        result["std"] = statistics.stdev(values) if finite else math.nan
        result["range"] = max(values) - min(values) if finite else math.nan
    return result


def compare(row_stats: dict[str, Any], baseline: dict[str, Any], metric: str) -> str:
    """`tie`, `better`, `worse` (the tie rule: |mean difference| <= the larger range), or '' without a band."""
    a, b = row_stats.get(metric), baseline.get(metric)
    if not a or not b or "range" not in a or "range" not in b:
        return ""
    difference = a["mean"] - b["mean"]
    if abs(difference) <= max(a["range"], b["range"]):
        return "tie"
    better = difference < 0 if metric in LOWER_IS_BETTER else difference > 0
    return "better" if better else "worse"


class Evaluation:
    """Runs rows under one protocol; caches the float images (per sampler setting and seed), the
    calibration sets and the reference images."""

    def __init__(self, args: argparse.Namespace) -> None:
        from dqcompile.fmnist import NUM_CLASSES, load_fashion_mnist

        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.model, self.config, self.model_description = load_model(args.model, args.device, self.dtype)
        self.schedule = self.config["scheduler"]
        self.null_class_id = self.config.get("null_class_id", NUM_CLASSES)
        self.labels = torch.arange(args.samples) % NUM_CLASSES
        self.reference = load_fashion_mnist("test", root=args.data)[0][: args.reference_size]
        self.metrics = set(args.metrics.split(","))
        unknown = self.metrics - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; allowed: {', '.join(METRICS)}")
        self.fp_images: dict[tuple, torch.Tensor] = {}
        self.calibrations: dict[tuple, Any] = {}
        self.compiled_fp: torch.nn.Module | None = None
        self.classifier = None
        if "accuracy" in self.metrics:
            from dqcompile.fmnist import load_classifier

            self.classifier = load_classifier(device=args.device)

    def sampler(self, row: Row) -> dict[str, Any]:
        settings = {"scheduler": self.args.scheduler, "steps": self.args.steps, "clip_sample": self.args.clip_sample,
                    "timestep_spacing": self.args.timestep_spacing, "guidance": self.args.guidance}
        settings.update(dict(row.sampler))
        return settings

    def scheduler(self, settings: dict[str, Any]):
        from dqcompile.sampling import make_scheduler

        return make_scheduler(settings["scheduler"], self.schedule, clip_sample=settings["clip_sample"],
                              timestep_spacing=settings["timestep_spacing"])

    def sample(self, model: torch.nn.Module, settings: dict[str, Any], seed: int) -> torch.Tensor:
        from dqcompile.sampling import sample

        guidance = settings["guidance"] if settings["guidance"] and settings["guidance"] > 1 else None
        return sample(model, self.labels, scheduler=self.scheduler(settings), null_class_id=self.null_class_id,
                      steps=settings["steps"], guidance_scale=guidance, seed=seed,
                      batch_size=self.args.batch_size, device=self.args.device, progress=False)

    def runnable(self, qmodel: torch.nn.Module) -> torch.nn.Module:
        """How a quantized row runs: compiled with the dqcompile backend (--compile); else on a GPU eagerly
        with the backend's kernels (QuantizedModel.with_kernels: no compile per row); else as quantized."""
        if self.args.compile:
            return torch.compile(qmodel, backend="dqcompile")
        if self.args.kernels != "reference" and torch.device(self.args.device).type == "cuda":
            return qmodel.with_kernels(self.args.kernels)
        return qmodel

    def fp_model(self) -> torch.nn.Module:
        if not self.args.compile:
            return self.model
        if self.compiled_fp is None:
            self.compiled_fp = torch.compile(self.model)
        return self.compiled_fp

    def float_images(self, settings: dict[str, Any], seed: int) -> tuple[torch.Tensor, float]:
        """uint8 float-model images for (sampler settings, seed), cached; and the seconds they took (0 if cached)."""
        from dqcompile.fmnist import from_model_space

        key = (tuple(sorted(settings.items())), seed)
        if key in self.fp_images:
            return self.fp_images[key], 0.0
        images, seconds = timed(self.sample, self.fp_model(), settings, seed)
        self.fp_images[key] = from_model_space(images.float().cpu())
        return self.fp_images[key], seconds

    def calibration(self, row: Row, settings: dict[str, Any]) -> tuple[Any, float]:
        options = {"timesteps": self.args.calib_timesteps, "per_timestep": self.args.calib_per_timestep,
                   **dict(row.calibration)}
        key = (tuple(sorted(options.items())), tuple(sorted(settings.items())))
        if key in self.calibrations:
            return self.calibrations[key], 0.0
        steps = settings["steps"]
        timesteps = steps if options["timesteps"] == "all" else min(int(options["timesteps"]), steps)
        guidance = settings["guidance"] if settings["guidance"] and settings["guidance"] > 1 else None
        calibration, seconds = timed(
            dqcompile.calibration_set, self.model, num_timesteps=timesteps,
            samples_per_timestep=int(options["per_timestep"]), num_inference_steps=steps,
            scheduler=self.scheduler(settings), guidance_scale=guidance, null_class=self.null_class_id,
            seed=self.args.seeds[0] + 1, progress=False)
        self.calibrations[key] = calibration
        return calibration, seconds

    def search_plan(self, spec: QuantSpec, row: Row, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        try:
            from dqcompile.methods.qdit import search_group_sizes
        except ImportError:
            from dqcompile import search_group_sizes
        from dqcompile.fmnist.fitness import FITNESS_BUILDERS

        options = {"fitness": "fid", "samples": 256, "steps": settings["steps"], "population": 8, "iterations": 2,
                   "top_k": 3, "crossover": 3, "mutation": 3, **dict(row.search or ())}
        guidance = settings["guidance"] if settings["guidance"] and settings["guidance"] > 1 else 0.0
        batch_size = min(self.args.batch_size, options["samples"])
        fitness = FITNESS_BUILDERS[options["fitness"]](
            self.model, samples=options["samples"], steps=options["steps"], guidance_scale=guidance,
            seed=self.args.seeds[0], batch_size=batch_size, scheduler=self.scheduler(settings),
            null_class_id=self.null_class_id)
        common = dict(population=options["population"], iterations=options["iterations"], top_k=options["top_k"],
                      crossover=options["crossover"], mutation=options["mutation"], seed=self.args.seeds[0],
                      progress=False)
        if "fitness_name" in inspect.signature(search_group_sizes).parameters:  # fitness as an argument
            plan, seconds = timed(search_group_sizes, self.model, fitness, spec, fitness_name=options["fitness"],
                                  **common)
        else:  # the search before it moved into dqcompile.methods.qdit
            plan, seconds = timed(search_group_sizes, self.model, spec, fitness=fitness, samples=options["samples"],
                                  steps=options["steps"], guidance_scale=guidance, batch_size=batch_size, **common)
        summary = {"settings": options, "seconds": seconds, "group_sizes": dict(plan.group_sizes),
                   "fitness": plan.fitness, "evaluations": plan.search.get("evaluations")}
        return plan, summary

    def run_row(self, row: Row) -> dict[str, Any]:
        from dqcompile.fmnist import class_accuracy, fidelity_to_reference, from_model_space, generative_metrics

        settings = self.sampler(row)
        result: dict[str, Any] = {**row.to_dict(), "sampler_settings": settings, "seeds": []}
        spec = parse_spec(row.spec, self.schedule)
        model = None
        if row.spec == method_tables.TORCHAO_SPEC:
            model, result["note"] = method_tables.torchao_model(self.model)
            if model is None:
                return {**result, "skipped": result["note"]}
        if spec is not None:
            calibration = None
            if spec.needs_calibration:
                calibration, result["calibration_seconds"] = self.calibration(row, settings)
            if row.search is not None:
                plan, result["search"] = self.search_plan(spec, row, settings)
                spec = spec.with_group_plan(plan)
            if row.plan is not None:
                spec = spec.with_group_plan(row.plan)
            qmodel, result["quantize_seconds"], peak = timed_with_peak(
                dqcompile.quantize, self.model, spec, calibration=calibration, progress=False)
            if peak is not None:
                result["quantize_peak_gib"] = peak / 2**30
            report = getattr(qmodel, "report", None)
            if report is not None:
                result["linear_weight_mib"] = {"fp": report.float_weight_bytes / 2**20,
                                               "quantized": report.quantized_weight_bytes / 2**20}
            result["plan_summary"] = qmodel.plan.summary
            if self.args.attribution:
                inputs, _ = self.calibration(Row(row.label, row.spec, row.sampler), settings)
                result["attribution"] = method_tables.attribution(
                    self.model, qmodel, method_tables.attribution_inputs(inputs, self.args.attribution))
                print(f"{row.label}: {method_tables.attribution_line(result['attribution'])}", flush=True)
            model = self.runnable(qmodel)
        for seed in self.args.seeds:
            entry: dict[str, Any] = {"seed": seed}
            if model is None:
                images, entry["sample_seconds"] = self.float_images(settings, seed)
                if entry["sample_seconds"] == 0.0:  # cached from an earlier row: time it again for throughput
                    _, entry["sample_seconds"] = timed(self.sample, self.fp_model(), settings, seed)
            else:
                sampled, entry["sample_seconds"] = timed(self.sample, model, settings, seed)
                images = from_model_space(sampled.float().cpu())
                if "psnr" in self.metrics:
                    reference, _ = self.float_images(settings, seed)
                    fidelity = fidelity_to_reference(images, reference)
                    entry["psnr_db_vs_fp"], entry["rel_l2_vs_fp"] = fidelity["psnr_db"], fidelity["rel_l2"]
            entry["images_per_second"] = self.args.samples / entry["sample_seconds"]
            entry["ms_per_step"] = 1000 * entry["sample_seconds"] / settings["steps"]
            if self.metrics & {"fid", "kid", "isc", "prc"}:
                entry.update(generative_metrics(images, self.reference, prc="prc" in self.metrics,
                                                isc="isc" in self.metrics, device=self.args.device,
                                                batch_size=min(1000, max(self.args.batch_size, 100))))
            if "accuracy" in self.metrics:
                entry["accuracy"] = class_accuracy(images, self.labels, classifier=self.classifier)
            result["seeds"].append(entry)
        keys = [key for key in result["seeds"][0] if key not in ("seed",) and isinstance(result["seeds"][0][key], float)]
        result["stats"] = {key: summarize([entry[key] for entry in result["seeds"]]) for key in keys}
        result["images_per_second"] = max(entry["images_per_second"] for entry in result["seeds"])
        return result


def markdown(output: dict[str, Any]) -> str:
    protocol, rows = output["protocol"], [r for r in output["rows"] if "stats" in r]
    seeds = protocol["seeds"]
    lines = [
        f"{output['model']}, {protocol['samples']} samples per row and seed, seeds {seeds}, "
        f"{protocol['sampler']['scheduler'].upper()} {protocol['sampler']['steps']} steps, guidance "
        f"{protocol['sampler']['guidance']}, clip_sample {protocol['sampler']['clip_sample']}, timestep spacing "
        f"{protocol['sampler']['timestep_spacing']} (rows may override the sampler), {protocol['dtype']}"
        f"{', compiled' if protocol['compile'] else ''}; reference: the test split ({protocol['reference_size']}). "
        f"{output['device']}, torch {output['torch']}, {output['date']}, commit {output['commit'][:12]}.",
        "",
    ]
    if len(seeds) > 1:
        lines += [f"Mean +- standard deviation over {len(seeds)} seeds; [range]; vs `{output['baseline']}`: tie if "
                  "the means differ by no more than the larger range.", ""]
    present = [m for m in TABLE_METRICS if any(m in r["stats"] for r in rows)]
    header = ["row", "sampler"] + present + ["images/s", "quantize (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline = next((r for r in rows if r["label"] == output["baseline"]), None)
    for r in rows:
        s = r["sampler_settings"]
        sampler = (f"{s['scheduler'].upper()} {s['steps']}, clip {'on' if s['clip_sample'] else 'off'}, "
                   f"{s['timestep_spacing']}, w {s['guidance']}")
        cells = [r["label"], sampler]
        for metric in present:
            stat = r["stats"].get(metric)
            if stat is None:
                cells.append("")
                continue
            digits = 3 if metric in ("kid_mean", "precision", "recall", "accuracy") else 2
            cell = f"{stat['mean']:.{digits}f}"
            if "std" in stat:
                cell += f" +- {stat['std']:.{digits}f} [{stat['range']:.{digits}f}]"
                verdict = compare(r["stats"], baseline["stats"], metric) if baseline and r is not baseline else ""
                cell += f" {verdict}" if verdict else ""
            cells.append(cell)
        cells += [f"{r['images_per_second']:.3g}", f"{r['quantize_seconds']:.1f}" if "quantize_seconds" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [f"{r['label']} ({r['skipped']})" for r in output["rows"] if r.get("skipped")]
    if skipped:
        lines += ["", f"Skipped: {'; '.join(skipped)}"]
    failed = [f"{r['label']} ({r['error']})" for r in output["rows"] if r.get("error")]
    if failed:
        lines += ["", f"Failed: {'; '.join(failed)}"]
    return "\n".join(lines) + "\n"


def _bool_or_model(text: str) -> bool | None:
    lowered = text.lower()
    if lowered in ("true", "on", "1"):
        return True
    if lowered in ("false", "off", "0"):
        return False
    if lowered == "model":
        return None
    raise argparse.ArgumentTypeError(f"expected true, false or model, got {text!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Row sets: " + "; ".join(f"{k}: {v[0]}" for k, v in ROW_SETS.items()))
    parser.add_argument("--rows", action="append", default=[], help="row set name(s), comma-separated (see --list)")
    parser.add_argument("--row", action="append", default=[], help="extra row: LABEL=SPEC[@sampler=value,...]")
    parser.add_argument("--list", action="store_true", help="print the row sets and exit")
    parser.add_argument("--model", default="embedded", help="embedded, benchmark, or a checkpoint folder")
    parser.add_argument("--samples", type=int, default=5000, help="images per row and seed (default 5000)")
    parser.add_argument("--seeds", default="0", help="comma-separated noise seeds (default 0; noise band: 0,1,2)")
    parser.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--clip-sample", type=_bool_or_model, default=False,
                        help="clip the predicted x0 to [-1, 1] each step: true, false (default), or model (the "
                             "checkpoint's scheduler config)")
    parser.add_argument("--timestep-spacing", default="leading",
                        help="leading (default), trailing, linspace, or model (the checkpoint's config)")
    parser.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance; 0 or 1: none")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model call (default 1000 on CUDA, 200 on CPU)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (quantized: backend dqcompile)")
    parser.add_argument("--kernels", default="auto",
                        help="without --compile on a GPU, quantized rows run eagerly on these kernels "
                             "(QuantizedModel.with_kernels; default auto: Triton); 'reference': the reference ops")
    parser.add_argument("--calib-timesteps", default=25, help="calibration timesteps (an integer or 'all'; default 25)")
    parser.add_argument("--calib-per-timestep", type=int, default=32, help="calibration images per timestep")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    parser.add_argument("--reference-size", type=int, default=10000, help="test-split images to score against")
    parser.add_argument("--data", help="folder with the Fashion-MNIST files (default: dqcompile.fmnist.data's search)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baseline", help="the row others are compared with (default: the first)")
    parser.add_argument("--budget-seconds", type=float, help="start no row after this many seconds")
    parser.add_argument("--attribution", type=int, default=0, metavar="CALLS",
                        help="quantized rows: per-layer SQNR split into weight and activation error on this many "
                             "calibration calls, into the JSON (method_tables.attribution; default 0: off)")
    parser.add_argument("--out", type=Path, help="JSON results (a markdown table is written beside it)")
    args = parser.parse_args(argv)
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.timestep_spacing == "model":
        args.timestep_spacing = None
    if args.calib_timesteps != "all":
        args.calib_timesteps = int(args.calib_timesteps)
    if args.batch_size is None:
        args.batch_size = 1000 if torch.device(args.device).type == "cuda" else 200
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.list:
        for name, (description, rows) in ROW_SETS.items():
            print(f"{name}: {description}")
            for r in rows:
                extras = "".join(f" {k}={v}" for k, v in (("sampler", dict(r.sampler)), ("calibration", dict(r.calibration)),
                                                        ("search", r.search and dict(r.search)), ("plan", r.plan)) if v)
                print(f"    {r.label:34s} {r.spec}{extras}")
        return {}
    if args.out is None:
        raise SystemExit("--out is required (the JSON results file)")
    rows = select_rows(args.rows, args.row)
    for r in rows:  # refuse a bad spec before any work
        parse_spec(r.spec)
    started = time.perf_counter()
    evaluation = Evaluation(args)
    output: dict[str, Any] = {
        **run_metadata(),
        "model": evaluation.model_description,
        "model_config": evaluation.config,
        "protocol": {
            "samples": args.samples, "seeds": args.seeds, "dtype": args.dtype, "compile": args.compile,
            "kernels": args.kernels, "batch_size": args.batch_size, "metrics": sorted(evaluation.metrics), "reference_size": len(evaluation.reference),
            "sampler": evaluation.sampler(row("protocol")),
            "calibration": {"timesteps": args.calib_timesteps, "per_timestep": args.calib_per_timestep,
                            "sampler": "the row's sampler", "seed": args.seeds[0] + 1},
            "tie_rule": "tie when |mean difference| <= max(range of either row over the seeds)",
            "command": " ".join(["python", "benchmarks/evaluate.py", *(argv if argv is not None else sys.argv[1:])]),
        },
        "baseline": args.baseline or rows[0].label,
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        elapsed = time.perf_counter() - started
        if args.budget_seconds is not None and elapsed > args.budget_seconds:
            output["rows"].append({**r.to_dict(), "skipped": f"time budget: {elapsed:.0f} s > {args.budget_seconds:.0f} s"})
            print(f"skipped {r.label}: {elapsed:.0f} s used of {args.budget_seconds:.0f}", flush=True)
            continue
        try:
            result, seconds = timed(evaluation.run_row, r)
        except Exception as error:  # noqa: BLE001 (a failed row is recorded; the table's other rows still run)
            traceback.print_exc()
            output["rows"].append({**r.to_dict(), "error": f"{type(error).__name__}: {error}"})
            args.out.write_text(json.dumps(output, indent=2, default=str))
            print(f"failed {r.label}: {type(error).__name__}: {error}", flush=True)
            continue
        result["row_seconds"] = seconds
        output["rows"].append(result)
        output["total_seconds"] = time.perf_counter() - started
        args.out.write_text(json.dumps(output, indent=2, default=str))
        if result.get("skipped"):
            print(f"skipped {r.label}: {result['skipped']}", flush=True)
            continue
        summary = ", ".join(f"{key} {stat['mean']:.4g}" + (f" +- {stat['std']:.2g}" if "std" in stat else "")
                            for key, stat in result["stats"].items() if key in TABLE_METRICS)
        print(f"{r.label}: {summary}; {result['images_per_second']:.3g} img/s; row {seconds:.0f} s, "
              f"{time.perf_counter() - started:.0f} s so far", flush=True)
    output["total_seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(output, indent=2, default=str))
    table = markdown(output)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    failed = [r["label"] for r in output["rows"] if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} row(s) failed: {', '.join(failed)} (their errors are in {args.out})")
    return output


if __name__ == "__main__":
    main()
