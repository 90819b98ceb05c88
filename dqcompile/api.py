"""quantize, save and load: the public entry points."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from dqcompile.capture import ExampleInputs, capture
from dqcompile.example_inputs import default_example_inputs
from dqcompile.model import QuantizedModel
from dqcompile.passes.context import PassContext
from dqcompile.passes.pipeline import run_pipeline
from dqcompile.report import QuantReport
from dqcompile.spec import QuantSpec

FORMAT_VERSION = 1


def _calibration_samples(calibration: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    if calibration is None:
        return None
    samples = [dict(sample) for sample in calibration]
    if not samples:
        raise ValueError("calibration holds no samples")
    return samples


def _weight_bytes(gm: torch.fx.GraphModule, ctx: PassContext, float_bytes: dict[str, int]) -> dict[str, tuple[int, int]]:
    result = {}
    for plan in ctx.layers.values():
        owner = gm.get_submodule(plan.name)
        if plan.quantized:
            now = owner.qweight.numel() * owner.qweight.element_size() + owner.weight_scale.numel() * 4
        else:
            now = float_bytes[plan.name]
        result[plan.name] = (float_bytes[plan.name], now)
    return result


def quantize(
    model: nn.Module,
    spec: QuantSpec | str = "w8a8",
    calibration: Iterable[Mapping[str, Any]] | None = None,
    *,
    example_inputs: ExampleInputs | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> QuantizedModel:
    """Quantize `model` with `spec` (a QuantSpec or a preset name) and return a drop-in replacement.

    calibration: keyword inputs of model.forward, one dict per sample batch (see
        dqcompile.calibration_set); needed by static activation quantization and the calibrated methods.
    example_inputs: inputs to capture the graph with (batch of at least 2); by default the first
        calibration sample, else inputs built from the config of a known diffusers transformer.
    verbose: print the report (it is also on the result as `.report`).

    The user's model is never modified: capture copies its parameters into the graph, and the passes
    rewrite the copies (peak memory is about twice the float weights). On any error nothing is
    returned and `model` is as it was. Raises ValueError naming the field or layer for a spec the
    model cannot take, a model with no linear layer, or non-finite calibration data.
    """
    qmodel = _build(model, QuantSpec.resolve(spec), _calibration_samples(calibration), example_inputs, progress)
    if verbose:
        print(qmodel.report)
    return qmodel


def _build(
    model: nn.Module,
    spec: QuantSpec,
    samples: list[dict[str, Any]] | None,
    example_inputs: ExampleInputs | None,
    progress: bool,
    restoring: bool = False,
) -> QuantizedModel:
    if example_inputs is None:
        example_inputs = samples[0] if samples else default_example_inputs(model)
    captured = capture(model, example_inputs, copy_parameters=True)
    gm = captured.graph_module
    ctx = PassContext(spec=spec, calibration=samples, progress=progress, restoring=restoring)
    float_bytes = {
        name.removesuffix(".weight"): p.numel() * p.element_size() for name, p in gm.named_parameters()
    }
    run_pipeline(gm, captured.binding, ctx)
    if not ctx.layers:
        raise ValueError(f"{type(model).__name__} has no linear layer to quantize")
    report = QuantReport.from_plans(spec.name, list(ctx.layers.values()), _weight_bytes(gm, ctx, float_bytes))
    return QuantizedModel(
        gm,
        captured.binding,
        spec=spec,
        report=report,
        config=getattr(model, "config", None),
        dtype=next(model.parameters()).dtype,
        source_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )


def save(qmodel: QuantizedModel, path: str | Path) -> Path:
    """Write `path/` with model.safetensors (integer weights, scales, float parts) and plan.json.

    plan.json records the spec, the report and the source model's class and config, so that `load`
    can rebuild the graph; nothing is pickled.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in qmodel.graph_module.state_dict().items()}
    safetensors.torch.save_file(state, folder / "model.safetensors")
    config = qmodel.config
    plan = {
        "format_version": FORMAT_VERSION,
        "source_class": qmodel.source_class,
        "config": dict(config) if config is not None else None,
        "dtype": str(qmodel.dtype).removeprefix("torch."),
        "spec": qmodel.spec.to_dict(),
        "report": qmodel.report.to_dict(),
    }
    (folder / "plan.json").write_text(json.dumps(plan, indent=2, default=_json_default))
    return folder


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} into plan.json")


def _skeleton(plan: dict[str, Any]) -> nn.Module:
    """An instance of the source architecture (diffusers classes are rebuilt from their config)."""
    module_name, _, class_name = plan["source_class"].rpartition(".")
    if not module_name.startswith("diffusers") or plan["config"] is None:
        raise ValueError(
            f"load cannot rebuild {plan['source_class']} by itself: pass model=... (an instance of it; its "
            "weights are replaced by the saved ones)"
        )
    import diffusers

    cls = getattr(diffusers, class_name)
    return cls.from_config(plan["config"]).to(getattr(torch, plan["dtype"]))


def load(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    example_inputs: ExampleInputs | None = None,
    device: str | torch.device | None = None,
) -> QuantizedModel:
    """Load a model written by `save`. No pickle: safetensors and JSON only.

    model: an instance of the source architecture (any weights); needed unless it is a diffusers
    model that plan.json's config rebuilds. The graph is captured and lowered again with the saved
    spec, then every tensor is taken from model.safetensors.
    """
    folder = Path(path)
    plan = json.loads((folder / "plan.json").read_text())
    if plan.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / 'plan.json'}: format_version {plan.get('format_version')} is not {FORMAT_VERSION}")
    skeleton = model if model is not None else _skeleton(plan)
    spec = QuantSpec.from_dict(plan["spec"])
    qmodel = _build(skeleton, spec, None, example_inputs, progress=False, restoring=True)
    state = safetensors.torch.load_file(folder / "model.safetensors")
    qmodel.graph_module.load_state_dict(state, strict=True)
    return qmodel.to(device) if device is not None else qmodel
