"""quantize, save and load: the public entry points."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.utils import _pytree as pytree

from dqcompile.capture import ExampleInputs, capture
from dqcompile.example_inputs import default_example_inputs
from dqcompile.model import QuantizedModel
from dqcompile.passes.lower import DERIVED_META, lower
from dqcompile.passes.pipeline import decide
from dqcompile.plan import ModelPlan
from dqcompile.report import QuantReport
from dqcompile.spec import QuantSpec

FORMAT_VERSION = 2
TENSORS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"


_CALIBRATION_FORM = ("calibration must be a list of samples, each the inputs of one call of the model's forward: "
                     "a dict of keyword arguments or a tuple of positional ones (dqcompile.calibration_set makes one)")


def _calibration_samples(model: nn.Module, calibration: Any) -> list[dict[str, Any]] | None:
    """The calibration samples as keyword inputs of model.forward; positional samples (tuples, as
    torch.export takes them) are bound to the forward's parameters. Anything else is refused, naming
    what was given and which sample."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, Mapping, str, bytes)) or not isinstance(calibration, Iterable):
        raise ValueError(f"{_CALIBRATION_FORM}; got a single {type(calibration).__name__} (wrap one sample in a list)")
    signature = inspect.signature(model.forward)
    samples = []
    for index, sample in enumerate(calibration):
        if isinstance(sample, Mapping):
            samples.append(dict(sample))
        elif isinstance(sample, (tuple, list)):
            try:
                samples.append(dict(signature.bind(*sample).arguments))
            except TypeError as error:
                raise ValueError(f"calibration sample {index}: {len(sample)} positional inputs do not fit "
                                 f"{type(model).__name__}.forward{signature}: {error}") from None
        else:
            raise ValueError(f"{_CALIBRATION_FORM}; sample {index} is a {type(sample).__name__}")
    if not samples:
        raise ValueError("calibration holds no samples")
    return samples


def _weight_bytes(plan: ModelPlan, float_bytes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Layer name -> (bytes of its float weight, bytes now): codes plus float32 scales when quantized."""
    result = {}
    for layer in plan.layers.values():
        before = float_bytes[layer.weight_name]
        if layer.quantized:
            weight = layer.weight
            now = weight.qweight.numel() * weight.qweight.element_size() + weight.scale.numel() * 4
        else:
            now = before
        result[layer.name] = (before, now)
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

    calibration: a list of samples, each the inputs of one call of model.forward (a dict of keyword
        arguments, or a tuple of positional ones), one batch at one timestep (see
        dqcompile.calibration_set); needed by static activation quantization, GPTQ and the
        calibrated methods (`spec.needs_calibration`).
    example_inputs: inputs to capture the graph with (batch of at least 2); by default the first
        calibration sample, else inputs built from the config of a known diffusers transformer.
    verbose: print the report (it is also on the result as `.report`).

    The user's model is never modified: capture copies its parameters into the graph, and the passes
    rewrite the copies (peak memory is about twice the float weights). On any error nothing is
    returned and `model` is as it was. Raises ValueError naming the field or layer for a spec the
    model cannot take, a model with no linear layer, or non-finite calibration data.
    """
    if isinstance(model, QuantizedModel):
        raise ValueError(f"the model is already quantized ({model.spec.name}); quantize the float model it came from")
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize takes an nn.Module, got {type(model).__name__}")
    spec = QuantSpec.resolve(spec)
    samples = _calibration_samples(model, calibration)
    if example_inputs is None:
        example_inputs = samples[0] if samples else default_example_inputs(model)
    captured = capture(model, example_inputs, copy_parameters=True)
    gm = captured.graph_module
    float_bytes = {name: p.numel() * p.element_size() for name, p in gm.named_parameters()}
    plan = decide(gm, captured.binding, spec, samples, progress=progress)
    if not plan.layers:
        raise ValueError(f"{type(model).__name__} has no linear layer to quantize")
    plan.check()
    lower(gm, plan)
    report = QuantReport.from_plan(spec.name, plan, _weight_bytes(plan, float_bytes))
    qmodel = QuantizedModel(
        gm,
        captured.binding,
        spec=spec,
        plan=plan,
        report=report,
        config=getattr(model, "config", None),
        dtype=next(model.parameters()).dtype,
        source_class=f"{type(model).__module__}.{type(model).__qualname__}",
        example_inputs=_input_record(captured.example_kwargs),
    )
    if verbose:
        print(qmodel.report)
    return qmodel


# ------------------------------------------------------------------------------------------ example inputs

def _input_record(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """How to rebuild example inputs of the captured call at load: each argument's pytree structure,
    its tensors' shapes and dtypes, and its other values (when JSON can hold them; None otherwise)."""
    record = {}
    for name, value in values.items():
        leaves, spec = pytree.tree_flatten(value)
        described = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                described.append({"tensor": list(leaf.shape), "dtype": str(leaf.dtype).removeprefix("torch.")})
            else:
                try:
                    json.dumps(leaf)
                except TypeError:
                    return None
                described.append({"value": leaf})
        try:
            record[name] = {"spec": pytree.treespec_dumps(spec), "leaves": described}
        except Exception:  # a container pytree cannot serialise: load then needs example_inputs=
            return None
    return record


def _example_from_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Example inputs with the recorded structure: zero tensors of the recorded shapes and dtypes."""
    values = {}
    for name, entry in record.items():
        leaves = [
            torch.zeros(leaf["tensor"], dtype=getattr(torch, leaf["dtype"])) if "tensor" in leaf else leaf["value"]
            for leaf in entry["leaves"]
        ]
        values[name] = pytree.tree_unflatten(leaves, pytree.treespec_loads(entry["spec"]))
    return values


# ------------------------------------------------------------------------------------------ save

def _model_tensors(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    """Every tensor the lowered graph module holds (parameters, persistent and non-persistent buffers),
    less the ones the lowering derives from the plan."""
    gm = qmodel.graph_module
    derived = set(gm.meta.get(DERIVED_META, ()))
    tensors = {name: t for name, t in gm.named_parameters()}
    tensors.update({name: t for name, t in gm.named_buffers() if name not in derived})
    # A view of a larger storage (the stacked sibling weights) is saved as its own tensor.
    return {name: t.detach().contiguous() if t.untyped_storage().nbytes() == t.numel() * t.element_size()
            else t.detach().clone() for name, t in tensors.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _plan_digest(plan: Mapping[str, Any]) -> str:
    """sha256 of plan.json's content (without the digest itself), which holds the tensor file's sha256."""
    content = {key: value for key, value in plan.items() if key != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=_json_default).encode()).hexdigest()


def save(qmodel: QuantizedModel, path: str | Path) -> Path:
    """Write `path/` with model.safetensors (integer weights, scales, float parts) and plan.json.

    plan.json records the spec, every layer's plan, the report, the source model's class and config,
    how to rebuild example inputs, each tensor's dtype and shape, the tensor file's sha256 and a
    digest of its own content, so that `load` can rebuild the model without calibration and refuse a
    save that was changed. Nothing is pickled. The save is atomic: it is written into a new folder
    that then replaces `path`, so a save that fails midway leaves any earlier save at `path` whole.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"dqcompile.save takes a QuantizedModel (what dqcompile.quantize returns), got {type(qmodel).__name__}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = _model_tensors(qmodel)
    config = qmodel.config
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        safetensors.torch.save_file(tensors, staging / TENSORS_FILE)
        plan = {
            "format_version": FORMAT_VERSION,
            "source_class": qmodel.source_class,
            "config": dict(config) if config is not None else None,
            "dtype": str(qmodel.dtype).removeprefix("torch."),
            "spec": qmodel.spec.to_dict(),
            "plan": qmodel.plan.to_json(),
            "example_inputs": qmodel.example_inputs,
            "report": qmodel.report.to_dict(),
            "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                        for name, t in tensors.items()},
            "sha256": _sha256(staging / TENSORS_FILE),
        }
        plan["digest"] = _plan_digest(plan)
        (staging / PLAN_FILE).write_text(json.dumps(plan, indent=1, default=_json_default))
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _replace_folder(new: Path, target: Path) -> None:
    """Put `new` at `target`; an existing `target` is moved aside first and removed last."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} into plan.json")


# ------------------------------------------------------------------------------------------ load

def _read_plan(folder: Path) -> dict[str, Any]:
    """plan.json, checked: format version, digest, and the tensor file's sha256."""
    plan_path, tensors_path = folder / PLAN_FILE, folder / TENSORS_FILE
    for path in (plan_path, tensors_path):
        if not path.is_file():
            raise ValueError(f"{folder} is not a dqcompile save: {path.name} is missing")
    try:
        plan = json.loads(plan_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{plan_path}: not valid JSON ({error})") from None
    if not isinstance(plan, dict) or plan.get("format_version") != FORMAT_VERSION:
        version = plan.get("format_version") if isinstance(plan, dict) else None
        raise ValueError(f"{plan_path}: format_version {version!r} is not {FORMAT_VERSION} (save it again with this version)")
    if plan.get("digest") != _plan_digest(plan):
        raise ValueError(f"{plan_path} was changed after it was saved (its digest does not match its content)")
    if _sha256(tensors_path) != plan.get("sha256"):
        raise ValueError(f"{tensors_path} was changed after it was saved (its sha256 does not match plan.json)")
    return plan


def _check_tensor_file(folder: Path, plan: Mapping[str, Any]) -> None:
    """Every tensor's dtype and shape as plan.json lists them, and no tensor more or less."""
    with safetensors.safe_open(folder / TENSORS_FILE, framework="pt") as handle:
        names = set(handle.keys())
        listed = plan["tensors"]
        if names != set(listed):
            extra, missing = sorted(names - set(listed)), sorted(set(listed) - names)
            raise ValueError(f"{folder / TENSORS_FILE} does not hold the tensors plan.json lists "
                             f"(unlisted: {extra[:3]}, missing: {missing[:3]})")
        for name in names:
            piece = handle.get_slice(name)
            dtype, shape = piece.get_dtype(), list(piece.get_shape())
            expected = listed[name]
            if shape != expected["shape"] or not _same_dtype(dtype, expected["dtype"]):
                raise ValueError(f"tensor {name}: {dtype} {shape} in the file, plan.json says "
                                 f"{expected['dtype']} {expected['shape']}")


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
                       "U8": "uint8", "I32": "int32", "I64": "int64", "I16": "int16", "BOOL": "bool"}


def _same_dtype(safetensors_dtype: str, torch_name: str) -> bool:
    return _SAFETENSORS_DTYPES.get(safetensors_dtype) == torch_name


def _source_class(name: str) -> type[nn.Module]:
    """The diffusers transformer class a save names, by identity: only diffusers' own model classes
    under diffusers.models.transformers are rebuilt from a config."""
    import diffusers

    module_name, _, class_name = name.rpartition(".")
    cls = getattr(diffusers, class_name, None)
    if (not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin)
            or f"{cls.__module__}.{cls.__qualname__}" != name
            or not cls.__module__.startswith("diffusers.models.transformers.")):
        raise ValueError(
            f"load rebuilds only diffusers transformer models from their config, not {name!r}: pass model=... "
            "(an instance of the source architecture; its weights are replaced by the saved ones)"
        )
    return cls


def _skeleton(plan: Mapping[str, Any], folder: Path) -> nn.Module:
    """An instance of the source architecture with uninitialised weights, after checking on the meta
    device that its parameters and buffers are the saved ones (so that a config edited to ask for a
    huge model is refused before any memory is taken)."""
    cls = _source_class(plan["source_class"])
    if not isinstance(plan.get("config"), dict):
        raise ValueError(f"{folder / PLAN_FILE}: no model config to rebuild {plan['source_class']} from; pass model=...")
    dtype = getattr(torch, plan["dtype"])
    limit = 2 * sum(math.prod(entry["shape"]) for entry in plan["tensors"].values()) + 2**20
    with torch.device("meta"), _bounded_construction(limit, folder):
        skeleton = cls.from_config(plan["config"])
    if dtype != torch.float32:  # diffusers warns on every cast, so cast only when needed
        skeleton = skeleton.to(dtype)
    _check_skeleton(skeleton, plan, folder)
    return skeleton.to_empty(device="cpu")


@contextlib.contextmanager
def _bounded_construction(limit: int, folder: Path) -> Iterator[None]:
    """Stop building a model as soon as its parameters and buffers exceed `limit` elements: a config
    that asks for far more than the saved tensors hold (num_layers=10**6) is refused at once instead
    of spending minutes creating modules. Applies to modules built in this thread inside the block."""
    owner = threading.get_ident()
    counted = [0]
    original_parameter, original_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def count(tensor: Any) -> None:
        if threading.get_ident() == owner and isinstance(tensor, torch.Tensor):
            counted[0] += tensor.numel()
            if counted[0] > limit:
                raise ValueError(f"{folder / PLAN_FILE}: its model config builds more than {limit:,} parameter "
                                 "elements, far more than the saved tensors hold")

    def register_parameter(self: nn.Module, name: str, param: Any) -> None:
        count(param)
        original_parameter(self, name, param)

    def register_buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        count(tensor)
        original_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = original_parameter, original_buffer


def _check_skeleton(skeleton: nn.Module, plan: Mapping[str, Any], folder: Path) -> None:
    saved = plan["tensors"]
    dropped = {layer["weight_name"] for layer in plan["plan"]["layers"] if layer["weight"] is not None}
    for name, tensor in (*skeleton.named_parameters(), *skeleton.named_buffers()):
        if name in dropped:
            continue
        if name not in saved:
            raise ValueError(f"the model rebuilt from plan.json's config has {name}, which {folder} does not hold")
        if list(tensor.shape) != saved[name]["shape"]:
            raise ValueError(f"{name}: the model rebuilt from plan.json's config has shape {list(tensor.shape)}, "
                             f"{folder} holds {saved[name]['shape']}")


def load(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    example_inputs: ExampleInputs | None = None,
    device: str | torch.device | None = None,
) -> QuantizedModel:
    """Load a model written by `save`: safetensors and JSON only, no pickle, no calibration.

    What load still does: it rebuilds the source architecture (from plan.json's config for diffusers
    transformers, or `model`, an instance of it whose weights are replaced), captures it with
    torch.export (the graph is not saved: capture needs the model's code), and lowers the capture from
    the saved plans. What it verifies first: the format version, plan.json's digest of its own
    content, the tensor file's sha256, every tensor's dtype and shape against plan.json, the rebuilt
    model's parameters against the file, and the source class (diffusers' own transformer classes
    only). docs/CONTRACTS.md lists what it trusts.

    example_inputs: inputs to capture with; default: zeros shaped as the inputs quantize captured with.
    """
    folder = Path(path)
    plan_data = _read_plan(folder)
    _check_tensor_file(folder, plan_data)
    spec = QuantSpec.from_dict(plan_data["spec"])
    if model is not None:
        skeleton, copy = model, True
    else:
        skeleton, copy = _skeleton(plan_data, folder), False
    if example_inputs is None:
        if plan_data.get("example_inputs") is None:
            raise ValueError(f"{folder}: the inputs it was captured with could not be recorded; pass example_inputs=...")
        device_of = next(skeleton.parameters()).device
        example_inputs = pytree.tree_map(
            lambda v: v.to(device_of) if isinstance(v, torch.Tensor) else v, _example_from_record(plan_data["example_inputs"])
        )
    captured = capture(skeleton, example_inputs, copy_parameters=copy)
    gm = captured.graph_module
    tensors = safetensors.torch.load_file(folder / TENSORS_FILE)
    try:
        plan = ModelPlan.from_json(plan_data["plan"], tensors)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{folder / PLAN_FILE}: its plan does not match the saved tensors ({error!r})") from None
    plan.check()
    lower(gm, plan)
    _assign_tensors(gm, tensors, folder)
    qmodel = QuantizedModel(
        gm, captured.binding, spec=spec, plan=plan, report=QuantReport.from_dict(plan_data["report"]),
        config=getattr(skeleton, "config", None), dtype=getattr(torch, plan_data["dtype"]),
        source_class=plan_data["source_class"], example_inputs=plan_data.get("example_inputs"),
    )
    return qmodel.to(device) if device is not None else qmodel


def _assign_tensors(gm: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Every parameter and buffer of the lowered graph module (but the derived ones) from the file, by
    name; refuses a missing, extra or mis-typed tensor."""
    derived = set(gm.meta.get(DERIVED_META, ()))
    own = {name: t for name, t in (*gm.named_parameters(), *gm.named_buffers()) if name not in derived}
    if set(own) != set(tensors):
        extra, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        raise ValueError(f"{folder / TENSORS_FILE} does not match the rebuilt model (not in the model: {extra[:3]}, "
                         f"not in the file: {missing[:3]})")
    with torch.no_grad():
        for name, target in own.items():
            source = tensors[name]
            if source.dtype != target.dtype or source.shape != target.shape:
                raise ValueError(f"tensor {name}: the file holds {source.dtype} {tuple(source.shape)}, the model "
                                 f"needs {target.dtype} {tuple(target.shape)}")
            target.copy_(source)
