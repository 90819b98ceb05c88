"""The method tables of issue 16 for benchmarks/evaluate.py: row sets with fair baselines, the torchao row,
and per-layer attribution.

Every method table carries three baselines beside the method's rows:
- RTN in the method's own activation mode: static per tensor for PTQ4DiT and TQ-DiT; for Q-DiT its
  preset's dynamic group activations (per token and group of 128, fitted to the layer) and, for the
  paper's per-sample mode, dynamic per sample and group, with round-to-nearest weights in the same
  groups (the method's own contribution is then the clip search, GPTQ or the searched group sizes);
- RTN with dynamic per-token activations (the project's default presets);
- torchao's Int8DynamicActivationInt8Weight on the same linears (w8a8 rows only; skipped with a note
  when torchao is not installed).

Row sets (registered in evaluate.ROW_SETS): ptq4dit-fair, qdit-fair, qdit-searched (Q-DiT's group-size search
end to end), tqdit-fair, auto (the recommended preset candidates, dqcompile/methods/auto), and their
"-w8a8" / "-w4a8" / "-w6a6" slices, and tiers in the
order time-limited GPU calls should run them (methods-1, -2, -3; `tiers`; benchmarks/gpu_methods.sh).

Attribution (`evaluate.py --attribution N`): each quantized row also gets the per-layer SQNR of its
quantized linears on N calibration calls of the row's sampler (isolated mode: each layer on the float
model's inputs), split into the weight part and the activation part (dqcompile.viz.errors), in the JSON
under "attribution": the per-layer entries and a summary (mean SQNRs, the worst layers).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from typing import Any

from torch import nn

TORCHAO_SPEC = "torchao-int8dyn"
TORCHAO_NOTE = ("torchao is not installed: the torchao Int8DynamicActivationInt8Weight row is skipped "
                "(pip install torchao on the machine that runs the table)")
# Calibration of the static rows: as the driver's defaults (25 timesteps x 32 images of the row's sampler).
TQDIT_CALIBRATION = {"timesteps": "all", "per_timestep": 32}


def quantized_layer_names(model: nn.Module) -> list[str]:
    """The nn.Linear modules that dqcompile's default spec quantizes (the same layers for torchao)."""
    from dqcompile.spec import QuantSpec

    spec = QuantSpec.from_preset("w8a8")
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and spec.keep_float_reason(name) is None]


def torchao_model(model: nn.Module) -> tuple[nn.Module | None, str]:
    """A copy of `model` with torchao's Int8DynamicActivationInt8Weight on the linears dqcompile
    quantizes, and a note; (None, why) when torchao is missing or refuses."""
    try:
        import torchao.quantization as tq
    except ImportError:
        return None, TORCHAO_NOTE
    layers = set(quantized_layer_names(model))
    config = (tq.Int8DynamicActivationInt8WeightConfig() if hasattr(tq, "Int8DynamicActivationInt8WeightConfig")
              else tq.int8_dynamic_activation_int8_weight())
    quantized = copy.deepcopy(model)
    try:
        tq.quantize_(quantized, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn in layers)
    except Exception as error:  # noqa: BLE001 (any torchao failure is a skipped row, not a failed table)
        return None, f"torchao failed: {type(error).__name__}: {error}"
    import torchao

    return quantized, f"torchao {torchao.__version__} Int8DynamicActivationInt8Weight on {len(layers)} linears"


# ------------------------------------------------------------------------------------------ attribution

def attribution(fp_model: nn.Module, qmodel: Any, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer SQNR (isolated), split into weight and activation parts, and a summary, as JSON."""
    from dqcompile.viz import layer_errors

    errors = layer_errors(fp_model, qmodel, inputs, mode="isolated", progress=False)
    measured = [e for e in errors if e.measured]

    def mean_db(values: list[float]) -> float | None:
        finite = [v for v in values if math.isfinite(v)]
        return statistics.fmean(finite) if finite else None

    def aggregate(noise: Callable[[Any], float | None]) -> float | None:
        total = sum(noise(e) or 0.0 for e in measured)
        signal = sum(e.signal for e in measured)
        return 10 * math.log10(signal / total) if total > 0 and signal > 0 else None

    worst = sorted(measured, key=lambda e: e.sqnr_db)[:5]
    summary = {
        "layers": len(errors), "measured": len(measured), "calls": len(inputs),
        "mean_sqnr_db": mean_db([e.sqnr_db for e in measured]),
        "mean_weight_sqnr_db": mean_db([e.weight_sqnr_db for e in measured]),
        "mean_activation_sqnr_db": mean_db([e.activation_sqnr_db for e in measured]),
        "total_sqnr_db": aggregate(lambda e: e.noise),
        "total_weight_sqnr_db": aggregate(lambda e: e.weight_noise),
        "total_activation_sqnr_db": aggregate(lambda e: e.activation_noise),
        "worst": [{"layer": e.name, "sqnr_db": e.sqnr_db, "weight_sqnr_db": e.weight_sqnr_db,
                   "activation_sqnr_db": e.activation_sqnr_db} for e in worst],
        "dominant": ("weights" if sum(e.weight_noise or 0 for e in measured) > sum(e.activation_noise or 0 for e in measured)
                     else "activations"),
    }
    return {"summary": summary, "layers": [e.to_dict() for e in errors]}


def attribution_line(result: dict[str, Any]) -> str:
    """One log line of a row's attribution summary."""
    s = result["summary"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
    worst = s["worst"][0]["layer"] if s["worst"] else "-"
    return (f"attribution: total SQNR {fmt(s['total_sqnr_db'])} dB (weights {fmt(s['total_weight_sqnr_db'])}, "
            f"activations {fmt(s['total_activation_sqnr_db'])}); {s['dominant']} dominate; worst layer {worst}")


# ------------------------------------------------------------------------------------------ row sets

def _recon(preset: str) -> str:
    return f"{preset}:options.reconstruction.enabled=true"


def _baselines(row: Callable[..., Any], width: str, *, static: bool) -> list[Any]:
    """The baselines every method table of `width` carries: RTN with static per-tensor activations (for
    static methods), RTN dynamic per token, and at w8a8 torchao's int8 dynamic quantization."""
    rows = [row(f"RTN {width} static", f"{width}:activations.mode=static_tensor")] if static else []
    rows.append(row(f"RTN {width} dynamic", width))
    if width == "w8a8":
        rows.append(row("torchao int8 dynamic", TORCHAO_SPEC))
    return rows


def ptq4dit_rows(row: Callable[..., Any], widths: tuple[str, ...] = ("w8a8", "w4a8"),
                 recon_widths: tuple[str, ...] = ("w8a8", "w4a8")) -> list[Any]:
    """PTQ4DiT against RTN in its activation mode (static per tensor), RTN dynamic per token and torchao;
    the block-reconstruction rows at the widths in `recon_widths`."""
    rows = [row("fp")]
    for width in widths:
        rows += _baselines(row, width, static=True)
        rows += [row(f"CSB+SSC {width}", f"ptq4dit-{width}"), row(f"CSB+SSC {width} dynamic", f"ptq4dit-{width}-dyn")]
        if width in recon_widths:
            rows += [row(f"CSB+SSC+recon {width}", _recon(f"ptq4dit-{width}")),
                     row(f"CSB+SSC+recon {width} dynamic", _recon(f"ptq4dit-{width}-dyn"))]
    return rows


def qdit_rows(row: Callable[..., Any], bits: tuple[int, ...] = (4, 6)) -> list[Any]:
    """Q-DiT against RTN in its activation modes (the preset's dynamic per token and group; the paper's
    dynamic per sample and group), RTN dynamic per token and, at 8 bits, torchao."""
    rows = [row("fp")]
    rtn_groups = "weights.clip_search=false"
    for b in bits:
        preset = f"qdit-w{b}a8"
        per_sample = "activations.mode=dynamic_sample_group"
        rows += [row(f"RTN w{b}a8 dynamic", "w4a8" if b == 4 else f"w8a8:weights.bits={b}"),
                 row(f"RTN w{b}a8 group dynamic", f"{preset}:{rtn_groups}"),
                 row(f"Q-DiT w{b}a8", preset),
                 row(f"Q-DiT w{b}a8 unit-gain clip", f"{preset}:weights.clip_unit_gain=true"),
                 row(f"Q-DiT w{b}a8 gptq", f"{preset}:weights.rounding=gptq"),
                 row(f"RTN w{b}a8 group per-sample", f"{preset}:{rtn_groups},{per_sample}"),
                 row(f"Q-DiT w{b}a8 per-sample", f"{preset}:{per_sample}")]
    return rows


# The group-size search of the Q-DiT rows: FID fitness on 256 samples, a population of 8 over 2
# generations (evaluate.py's defaults; at most 20 fitness evaluations, repeats not evaluated again).
QDIT_SEARCH = {"fitness": "fid", "samples": 256, "population": 8, "iterations": 2}


def qdit_searched_rows(row: Callable[..., Any], bits: tuple[int, ...] = (4, 6)) -> list[Any]:
    """Q-DiT with its searched per-layer group sizes (the search's plan applied to the preset) beside RTN in
    its activation mode and the preset's uniform groups of 128, per width."""
    rows = [row("fp")]
    for b in bits:
        same = [r for r in qdit_rows(row, (b,)) if r.label in (f"RTN w{b}a8 group dynamic", f"Q-DiT w{b}a8")]
        rows += same + [row(f"Q-DiT w{b}a8 searched", f"qdit-w{b}a8", search=QDIT_SEARCH)]
    return rows


def tqdit_rows(row: Callable[..., Any], widths: tuple[str, ...] = ("w8a8", "w6a6")) -> list[Any]:
    """TQ-DiT's full pipeline (MRQ + TGQ + HO) against RTN static, RTN dynamic per token and torchao."""
    rows = [row("fp")]
    for width in widths:
        rows += _baselines(row, width, static=True)
        rows.append(row(f"TQ-DiT {width}", f"tqdit-{width}:options.hessian_rows=2048", calibration=TQDIT_CALIBRATION))
    return rows


def auto_rows(row: Callable[..., Any], widths: tuple[str, ...] = ("w8a8", "w4a8", "w6a6")) -> list[Any]:
    """The recommended-preset candidates of each width against RTN dynamic per token and torchao."""
    from dqcompile.methods.auto import CANDIDATES, RECOMMENDED

    rows = [row("fp")]
    for width in widths:
        rows += _baselines(row, width, static=False)
        picked = RECOMMENDED[f"auto-{width}"]
        for name in CANDIDATES:
            if name.startswith(f"auto-{width}-"):
                rows.append(row(name + (" (auto)" if name == picked else ""), name))
    return rows


def _unique(rows: list[Any]) -> list[Any]:
    """Each label once (the first), refusing a label that names two specs."""
    seen: dict[str, Any] = {}
    for entry in rows:
        if entry.label in seen and seen[entry.label].spec != entry.spec:
            raise ValueError(f"row label {entry.label!r} names two specs: {seen[entry.label].spec!r}, {entry.spec!r}")
        seen.setdefault(entry.label, entry)
    return list(seen.values())


def tiers(row: Callable[..., Any]) -> dict[str, list[Any]]:
    """The tables in the order time-limited GPU calls should run them (each tier starts with the float
    row and has every label once):
    methods-1: the recommended-preset candidates (w4a8, where the methods have the most to win, then
        w6a6, then w8a8, whose RTN is already near float) against RTN dynamic per token and torchao;
    methods-2: PTQ4DiT at w4a8, TQ-DiT at w6a6, Q-DiT at w4a8, with their baselines;
    methods-3: PTQ4DiT and TQ-DiT at w8a8, Q-DiT at w6a8 (no reconstruction rows: PTQ4DiT reports its W8A8
        results without it, and each costs minutes);
    auto-final: the three recommended presets against the baselines, for the confirming run at 5,000+.
    """
    from dqcompile.methods.auto import RECOMMENDED

    first = _unique(auto_rows(row, ("w4a8",)) + auto_rows(row, ("w6a6",)) + auto_rows(row, ("w8a8",)))
    second = _unique(ptq4dit_rows(row, ("w4a8",)) + tqdit_rows(row, ("w6a6",)) + qdit_rows(row, (4,)))
    third = _unique(ptq4dit_rows(row, ("w8a8",), recon_widths=()) + tqdit_rows(row, ("w8a8",)) + qdit_rows(row, (6,)))
    final = [row("fp")]
    for name in RECOMMENDED:  # auto-w8a8, auto-w4a8, auto-w6a6
        final += _baselines(row, name.removeprefix("auto-"), static=False) + [row(name, name)]
    tables = {"methods-1": first, "methods-2": second, "methods-3": third, "auto-final": final}
    tables["methods"] = _unique(first + second + third)
    return tables


def smoke_rows(row: Callable[..., Any]) -> list[Any]:
    short = "options.reconstruction.iterations=5,options.reconstruction.batch_size=4"
    return [row("fp"), row("RTN w4a8 dynamic", "w4a8"), row("torchao int8 dynamic", TORCHAO_SPEC),
            row("auto-w4a8-recon (5 iterations)", f"auto-w4a8-recon:{short}"),
            row("CSB+SSC+recon w4a8 (5 iterations)", f"{_recon('ptq4dit-w4a8')},{short}"),
            row("auto-w6a6-csb-gptq", "auto-w6a6-csb-gptq"), row("Q-DiT w4a8", "qdit-w4a8"),
            row("TQ-DiT w6a6 (no HO)", "tqdit-w6a6:options.hessian=false")]


def row_sets(row: Callable[..., Any]) -> dict[str, tuple[str, list[Any]]]:
    """The row sets this module adds to evaluate.ROW_SETS."""
    ordered = tiers(row)
    sets = {
        "methods": ("every row of auto, ptq4dit-fair, tqdit-fair and qdit-fair once, in the order of methods-1, -2, -3",
                    ordered["methods"]),
        "methods-1": ("the recommended-preset candidates, w4a8 then w6a6 then w8a8, against RTN dynamic and torchao "
                      "(benchmarks/gpu_methods.sh's first tier)", ordered["methods-1"]),
        "methods-2": ("PTQ4DiT w4a8, TQ-DiT w6a6, Q-DiT w4a8 with their baselines", ordered["methods-2"]),
        "methods-3": ("PTQ4DiT and TQ-DiT w8a8, Q-DiT w6a8 with their baselines", ordered["methods-3"]),
        "auto-final": ("auto-w8a8, auto-w4a8, auto-w6a6 against RTN dynamic and torchao (the confirming run)",
                       ordered["auto-final"]),
        "methods-smoke": ("one row of each kind, reconstruction at 5 iterations and TQ-DiT without HO: a CPU dry "
                          "run of benchmarks/gpu_methods.sh", smoke_rows(row)),
        "ptq4dit-fair": ("PTQ4DiT (CSB+SSC, + block reconstruction; static and dynamic) against RTN static, RTN "
                         "dynamic per token and torchao", ptq4dit_rows(row)),
        "qdit-fair": ("Q-DiT (groups, clip search, GPTQ; per token and per sample) against RTN in the same "
                      "activation modes and RTN dynamic per token", qdit_rows(row)),
        "tqdit-fair": ("TQ-DiT (MRQ + TGQ + HO) against RTN static, RTN dynamic per token and torchao", tqdit_rows(row)),
        "auto": ("the recommended-preset candidates per width against RTN dynamic per token and torchao",
                 auto_rows(row)),
    }
    sets["ptq4dit-recon-w4a8"] = ("PTQ4DiT w4a8 with block reconstruction, static and dynamic (the slow rows alone)",
                                  [row("fp")] + [r for r in ptq4dit_rows(row, ("w4a8",)) if "recon" in r.label
                                                 or r.label == "CSB+SSC w4a8 dynamic"])
    sets["qdit-w4a8-rest"] = ("Q-DiT w4a8's unit-gain clip search and per-sample rows (RTN per-sample beside them)",
                              [row("fp")] + [r for r in qdit_rows(row, (4,)) if "unit-gain" in r.label
                                             or "per-sample" in r.label])
    sets["qdit-searched"] = ("Q-DiT end to end: the evolutionary group-size search (FID fitness) -> plan -> quantize, "
                             "at w4a8 and w6a8, against RTN in its own mode and the preset's uniform groups",
                             qdit_searched_rows(row))
    sets["auto-groups"] = ("the group candidates: auto-w4a8-g128-gptq (weights in groups of 128) and "
                           "auto-w6a6-ag64-gptq (weights and activations in groups of 64)",
                           [row("fp")] + [r for r in auto_rows(row) if r.spec in ("auto-w4a8-g128-gptq", "auto-w6a6-ag64-gptq")])
    sets["auto-ag64"] = ("auto-w6a6-ag64-gptq alone (weights and 6-bit activations in groups of 64)",
                         [row("fp")] + [r for r in auto_rows(row, ("w6a6",)) if r.spec == "auto-w6a6-ag64-gptq"])
    for width in ("w8a8", "w4a8", "w6a6"):
        sets[f"auto-{width}"] = (f"the {width} candidates", auto_rows(row, (width,)))
    for width in ("w8a8", "w4a8"):
        sets[f"ptq4dit-fair-{width}"] = (f"ptq4dit-fair at {width}", ptq4dit_rows(row, (width,)))
    for width in ("w8a8", "w6a6"):
        sets[f"tqdit-fair-{width}"] = (f"tqdit-fair at {width}", tqdit_rows(row, (width,)))
    for b in (4, 6):
        sets[f"qdit-fair-w{b}a8"] = (f"qdit-fair at w{b}a8", qdit_rows(row, (b,)))
        sets[f"qdit-searched-w{b}a8"] = (f"qdit-searched at w{b}a8", qdit_searched_rows(row, (b,)))
        sets[f"qdit-per-sample-w{b}a8"] = (f"Q-DiT w{b}a8 and RTN with dynamic per-sample groups (the paper's mode)",
                                            [row("fp")] + [r for r in qdit_rows(row, (b,)) if "per-sample" in r.label])
    return sets


def attribution_inputs(calibration: Any, calls: int) -> list[dict[str, Any]]:
    """`calls` calibration calls spread over the set (first and last included)."""
    batches = list(calibration)
    if calls >= len(batches):
        return batches
    picks = sorted({round(i * (len(batches) - 1) / max(calls - 1, 1)) for i in range(calls)})
    return [batches[i] for i in picks]
