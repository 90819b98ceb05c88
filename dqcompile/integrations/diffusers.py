"""dqcompile as a diffusers quantization backend: `quantization_config`, `from_pretrained`, `save_pretrained`.

diffusers has no public registry of quantization backends: `register()` (called by `import dqcompile`)
adds "dqcompile" to the two mappings of diffusers.quantizers.auto, as other third-party backends do.
Then:

    qmodel = dqcompile.quantize(model, "ptq4dit-w8a8", calibration=dqcompile.calibration_set(model))
    dqcompile.integrations.save_pretrained(qmodel, "dit-w8a8/")     # or qmodel.save_pretrained(...)
    transformer = DiTTransformer2DModel.from_pretrained("dit-w8a8/")  # no config passed
    pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256", transformer=transformer)

The folder is dqcompile's save (plan.json, model.safetensors) plus what diffusers' layout readers
look for: `config.json` (the model's config with `quantization_config` = {"quant_method":
"dqcompile", "spec": ..., "format_version": ...}) and `diffusion_pytorch_model.safetensors` (a hard
link to model.safetensors where the file system allows, a copy elsewhere).

Round-to-nearest presets also quantize on the fly at load:
`DiTTransformer2DModel.from_pretrained(float_folder, quantization_config=DQCompileConfig("w8a8"))`.
Calibrated specs refuse that, saying how to make the checkpoint.

What `from_pretrained` returns is an instance of the model's class (pipelines check the type) whose
forward runs the quantized graph (`model.dqcompile_model`, a QuantizedModel); its float submodules
are gone, so `.to(...)` moves the integer tensors and nothing else.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

QUANT_METHOD = "dqcompile"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
# Attribute of a diffusers model loaded through the backend holding its QuantizedModel.
ATTRIBUTE = "dqcompile_model"


class DQCompileQuantizationMethod(str, enum.Enum):
    DQCOMPILE = QUANT_METHOD


def _make_config_class():
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    @dataclass
    class DQCompileConfig(QuantizationConfigMixin):
        """diffusers quantization config of the dqcompile backend.

        spec: a preset name or a QuantSpec (stored as its dict); on-the-fly quantization at load takes
            round-to-nearest specs only (no calibration).
        example_inputs: keyword inputs to capture with when quantizing on the fly (default: built from
            the config of DiT, PixArt and SD3 transformers).
        pre-quantized checkpoints also carry format_version and the source class; the plan itself is
        in plan.json beside config.json.
        """

        def __init__(self, spec: Any = "w8a8", example_inputs: dict | None = None, format_version: int | None = None,
                     source_class: str | None = None, **kwargs: Any) -> None:
            from dqcompile.spec import QuantSpec

            self.quant_method = DQCompileQuantizationMethod.DQCOMPILE
            if isinstance(spec, QuantSpec):
                spec = spec.name if spec.name in _preset_names() and _presets()[spec.name] == spec else spec.to_dict()
            QuantSpec.resolve(spec) if isinstance(spec, str) else QuantSpec.from_dict(spec)  # validates
            self.spec = spec
            self.example_inputs = example_inputs
            self.format_version = format_version
            self.source_class = source_class
            unused = {k: v for k, v in kwargs.items() if k != "quant_method"}
            if unused:
                raise ValueError(f"DQCompileConfig takes no {', '.join(unused)}")

        def to_dict(self) -> dict[str, Any]:
            out = {"quant_method": QUANT_METHOD, "spec": self.spec, "format_version": self.format_version,
                   "source_class": self.source_class}
            return {k: v for k, v in out.items() if v is not None}

        def quant_spec(self):
            from dqcompile.spec import QuantSpec

            return QuantSpec.resolve(self.spec) if isinstance(self.spec, str) else QuantSpec.from_dict(self.spec)

    return DQCompileConfig


def _presets():
    from dqcompile.methods import PRESETS

    return PRESETS


def _preset_names() -> tuple[str, ...]:
    return tuple(_presets())


def _make_quantizer_class():
    from diffusers.quantizers.base import DiffusersQuantizer

    class DQCompileQuantizer(DiffusersQuantizer):
        """Loads a dqcompile checkpoint (pre-quantized) or quantizes a float model at load (RTN specs)."""

        requires_calibration = False
        use_keep_in_fp32_modules = False

        def __init__(self, quantization_config, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.folder: Path | None = None
            spec = quantization_config.quant_spec()
            if not self.pre_quantized and spec.needs_calibration:
                raise ValueError(
                    f"dqcompile spec {spec.name!r} needs calibration and cannot quantize at load: make the "
                    "checkpoint offline with qmodel = dqcompile.quantize(model, spec, calibration="
                    "dqcompile.calibration_set(model)); dqcompile.integrations.save_pretrained(qmodel, folder) "
                    "(or `dqcompile quantize --spec ... --out folder`), then load the folder with from_pretrained"
                )

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
                raise ValueError("dqcompile models load whole on one device: pass no device_map, then .to(device)")

        def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
            if checkpoint_files:
                self.folder = Path(checkpoint_files[0]).parent
            # dqcompile's loader reads the file whole afterwards: diffusers has no key to match or warn about.
            return [] if self.pre_quantized else loaded_keys

        def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs: Any) -> bool:
            # A pre-quantized checkpoint is read whole by dqcompile's loader after diffusers' pass: nothing
            # of it is put into the float skeleton.
            return self.pre_quantized

        def create_quantized_param(self, *args: Any, **kwargs: Any) -> None:
            return None

        def check_quantized_param_shape(self, *args: Any, **kwargs: Any) -> bool:
            return True

        def update_missing_keys(self, model, missing_keys: list[str], prefix: str) -> list[str]:
            return [] if self.pre_quantized else missing_keys

        def _process_model_before_weight_loading(self, model, **kwargs: Any):
            return model

        def _process_model_after_weight_loading(self, model, **kwargs: Any):
            if self.pre_quantized:
                if self.folder is None:
                    raise ValueError("dqcompile: diffusers gave no checkpoint file to read the quantized model from")
                qmodel = load_quantized(self.folder, model)
            else:
                import dqcompile

                config = self.quantization_config
                qmodel = dqcompile.quantize(model, config.quant_spec(), example_inputs=config.example_inputs,
                                            progress=False)
            attach(model, qmodel)
            return model

        @property
        def is_serializable(self) -> bool:
            return False  # model.save_pretrained goes through dqcompile.integrations.save_pretrained

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True  # torch.compile(model, backend="dqcompile") gives the fused path

    return DQCompileQuantizer


_REGISTERED: dict[str, type] = {}


def register() -> None:
    """Add the dqcompile backend to diffusers' quantizer mappings (idempotent)."""
    if _REGISTERED:
        return
    from diffusers.quantizers import auto

    config_class, quantizer_class = _make_config_class(), _make_quantizer_class()
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config_class
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer_class
    _REGISTERED.update(config=config_class, quantizer=quantizer_class)


def config_class() -> type:
    register()
    return _REGISTERED["config"]


def DQCompileConfig(*args: Any, **kwargs: Any):  # noqa: N802 (the class, built once diffusers is imported)
    """The dqcompile quantization config for diffusers' `from_pretrained(..., quantization_config=...)`."""
    return config_class()(*args, **kwargs)


# ------------------------------------------------------------------------------------------ the model object

def attach(model: nn.Module, qmodel: nn.Module) -> nn.Module:
    """Make the diffusers model `model` run `qmodel`: its float submodules, parameters and buffers go,
    `qmodel` becomes its submodule `dqcompile_model`, and its forward is qmodel's."""
    for name in list(model._modules):
        del model._modules[name]
    model._parameters.clear()
    model._buffers.clear()
    model.add_module(ATTRIBUTE, qmodel)
    model.forward = qmodel.forward
    return model


def quantized_model_of(model: nn.Module):
    """The QuantizedModel a model runs: `model` itself, or the one attached by the diffusers backend."""
    from dqcompile.model import QuantizedModel

    if isinstance(model, QuantizedModel):
        return model
    inner = getattr(model, ATTRIBUTE, None)
    if isinstance(inner, QuantizedModel):
        return inner
    raise TypeError(f"{type(model).__name__} is not a dqcompile quantized model")


# ------------------------------------------------------------------------------------------ save and load

def save_pretrained(qmodel: nn.Module, folder: str | os.PathLike) -> Path:
    """Write a folder that both `dqcompile.load` and the model class's `from_pretrained` read."""
    import diffusers

    import dqcompile

    qmodel = quantized_model_of(qmodel)
    if qmodel.config is None:
        raise ValueError("save_pretrained needs the source model's diffusers config (qmodel.config is None)")
    folder = dqcompile.save(qmodel, folder)
    from dqcompile.api import FORMAT_VERSION, TENSORS_FILE

    link = folder / DIFFUSERS_WEIGHTS
    if link.exists():
        link.unlink()
    try:
        os.link(folder / TENSORS_FILE, link)
    except OSError:
        shutil.copyfile(folder / TENSORS_FILE, link)
    config = {key: value for key, value in dict(qmodel.config).items() if not key.startswith("_")}
    config["_class_name"] = qmodel.source_class.rpartition(".")[2]
    config["_diffusers_version"] = diffusers.__version__
    spec = qmodel.spec
    presets = _presets()
    spec_entry = spec.name if spec.name in presets and presets[spec.name] == spec else spec.to_dict()
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "spec": spec_entry,
                                     "format_version": FORMAT_VERSION, "source_class": qmodel.source_class}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True, default=_json_default))
    return folder


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"cannot write {type(value).__name__} into config.json")


def load_quantized(folder: str | os.PathLike, skeleton: nn.Module):
    """A QuantizedModel from a dqcompile save, built on `skeleton` (an instance of the source architecture,
    on the meta device or not: its tensors are not used). The checks are dqcompile.load's; no float
    weight is materialised: the saved tensors are shared into the graph, and the weights the lowering
    removes are zero-memory stand-ins while capturing."""
    from torch.utils import _pytree as pytree

    from dqcompile import api
    from dqcompile.capture import _materialise, capture
    from dqcompile.model import QuantizedModel
    from dqcompile.passes.lower import lower
    from dqcompile.plan import ModelPlan
    from dqcompile.report import QuantReport
    from dqcompile.spec import QuantSpec

    folder = Path(folder)
    plan_data = api._read_plan(folder)
    api._check_tensor_file(folder, plan_data)
    expected = plan_data["source_class"]
    actual = f"{type(skeleton).__module__}.{type(skeleton).__qualname__}"
    if expected != actual:
        raise ValueError(f"{folder} holds a quantized {expected}, not a {actual}")
    tensors = safetensors.torch.load_file(folder / api.TENSORS_FILE)
    spec = QuantSpec.from_dict(plan_data["spec"])
    dtype = getattr(torch, plan_data["dtype"])
    device = torch.device("cpu")
    _materialise(skeleton, tensors, device)
    if plan_data.get("example_inputs") is None:
        raise ValueError(f"{folder}: the inputs it was captured with could not be recorded; use dqcompile.load "
                         "with example_inputs=...")
    example = api._example_from_record(plan_data["example_inputs"])
    example = pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, example)
    captured = capture(skeleton, example, copy_parameters=False)
    gm = captured.graph_module
    plan = ModelPlan.from_json(plan_data["plan"], tensors)
    lower(gm, plan)
    api._assign_tensors(gm, tensors, folder)
    return QuantizedModel(
        gm, captured.binding, spec=spec, plan=plan, report=QuantReport.from_dict(plan_data["report"]),
        config=getattr(skeleton, "config", None), dtype=dtype, source_class=expected,
        example_inputs=plan_data.get("example_inputs"),
    )
