"""Capture: a model and example inputs -> an FX graph of ATen ops, plus how to call it like the model.

torch.export (non-strict) traces the model's forward with a dynamic batch dimension. Plain
torch.fx.symbolic_trace fails on diffusers models (shape-dependent control flow); export handles
them and keeps each parameter under its original name and each node's module path
(`node.meta["nn_module_stack"]`), which the passes use to name layers.

The graph takes only what varies from call to call (tensors); every other argument (None, flags,
sizes) is fixed at capture. `CallBinding` maps a call of the original forward onto the graph and the
graph's output back onto the original output type, so the quantized model is a drop-in replacement.
A fixed list with one equal entry per sample (Qwen-Image's `img_shapes`) is a per-sample argument:
a call may pass it for any batch size, as long as every entry is the captured one.

Fallback: where the model's code fixes the batch (per-sample Python loops, numpy on sizes, sets of
symbolic sizes), the dynamic capture fails; capture then traces with a static batch and the binding
can re-capture the architecture (a copy on the meta device, no weights) at any other batch size
(`CallBinding.recapture`). Where even a static capture fails, `CaptureError` names, in one sentence,
the line of the model's code that blocks it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import linecache
import os
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

ExampleInputs = Mapping[str, Any] | tuple


class CaptureError(ValueError):
    """The model's code cannot be captured by torch.export, not even with a static batch; the message
    names the line of the model's code that blocks it."""


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Trace in eval mode (no dropout baked into the graph), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batch_size(values: Mapping[str, Any]) -> int:
    for value in pytree.tree_leaves(dict(values)):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("capture needs at least one tensor input with a batch dimension")


@dataclass
class CallBinding:
    """How a call of the original forward maps onto the captured graph, and back.

    static: the arguments fixed at capture (non-tensors); a call must pass the same values.
    tensor_args: name -> number of dims of each tensor argument at capture; a 1-d batch tensor
        (a timestep) may also be given as a number or a 0-d tensor, as diffusers pipelines do.
    output_class: the model's output dataclass (diffusers' Transformer2DModelOutput, ...) when the
        forward has `return_dict`; the graph itself returns a tuple.
    per_sample: name -> entry of the fixed lists that hold one equal entry per sample (Qwen-Image's
        `img_shapes`): a call passes one such entry per sample, at any batch size.
    static_batch: the batch size the graph was captured with when the model's code does not allow a
        dynamic one (None: any batch); `fallback` then says which line fixed it, and `recapture(kwargs)`
        captures the architecture again for the batch of `kwargs`.
    """

    signature: inspect.Signature
    static: dict[str, Any]
    tensor_args: dict[str, int]
    output_class: type | None
    return_dict_default: bool
    per_sample: dict[str, Any] = field(default_factory=dict)
    static_batch: int | None = None
    fallback: str | None = None
    recapture: Callable[..., Captured] | None = field(default=None, repr=False, compare=False)

    def graph_kwargs(self, args: tuple, kwargs: dict, *, sample_index: int | None = None) -> tuple[dict[str, Any], bool]:
        """The graph module's keyword inputs for a call, and whether the caller wants the output dataclass.

        sample_index: the call is calibration sample `sample_index` (errors then name it)."""
        where = "quantized model called" if sample_index is None else f"calibration sample {sample_index}"
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{where} with arguments its forward does not take: {error}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        return_dict = bool(values.pop("return_dict", self.return_dict_default))
        batch = _batch_size({k: v for k, v in values.items() if k in self.tensor_args})
        graph_inputs: dict[str, Any] = {}
        for name, value in values.items():
            if name in self.per_sample:
                graph_inputs[name] = self._per_sample(name, value, batch, where)
            elif name in self.static:
                if not _same_static(value, self.static[name]):
                    raise ValueError(
                        f"{where}: argument {name}={_short(value)} differs from the value fixed when the model "
                        f"was captured ({_short(self.static[name])}); quantize with example inputs that pass it"
                    )
                graph_inputs[name] = self.static[name]
            else:
                graph_inputs[name] = self._as_tensor(name, value, batch)
        if "return_dict" in self.signature.parameters:
            graph_inputs["return_dict"] = False
        return graph_inputs, return_dict

    def batch_of(self, graph_inputs: Mapping[str, Any]) -> int:
        """The batch size of a call's graph inputs (what graph_kwargs returned)."""
        return _batch_size({k: v for k, v in graph_inputs.items() if k in self.tensor_args})

    def _per_sample(self, name: str, value: Any, batch: int, where: str) -> Any:
        entry = self.per_sample[name]
        captured = self.static[name]
        if not isinstance(value, (list, tuple)) or len(value) != batch or any(not _same_static(v, entry) for v in value):
            raise ValueError(
                f"{where}: argument {name}={_short(value)} must hold one entry per sample ({batch}), each equal to "
                f"the one it was captured with ({_short(entry)}); quantize with example inputs that pass it"
            )
        if self.static_batch is None:  # a dynamic graph was traced with the captured list
            return captured
        return type(captured)([entry] * batch)

    def _as_tensor(self, name: str, value: Any, batch: int) -> Any:
        ndim = self.tensor_args.get(name)
        if ndim == 1 and (isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0)):
            return torch.as_tensor(value).reshape(1).expand(batch)
        return value

    def wrap_output(self, output: Any, return_dict: bool) -> Any:
        if self.output_class is None or not return_dict:
            return output
        # Positional construction: dataclasses.fields() would be a graph break under torch.compile.
        return self.output_class(*output)


def _same_static(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # objects without a usable == compare by identity
        return a is b


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Captured:
    """A captured model: the exported program, its runnable graph module, and the call binding.

    graph_module holds the model's parameters and buffers under their original names (its own
    copies when `capture(..., copy_parameters=True)`).
    """

    program: torch.export.ExportedProgram
    graph_module: torch.fx.GraphModule
    binding: CallBinding
    example_kwargs: dict[str, Any]


def _normalise_example(model: nn.Module, example_inputs: ExampleInputs) -> tuple[inspect.Signature, dict[str, Any]]:
    signature = inspect.signature(model.forward)
    for parameter in signature.parameters.values():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ValueError(
                f"capture needs a forward with named parameters only; {type(model).__name__}.forward "
                f"takes *{parameter.name}"
            )
    if isinstance(example_inputs, Mapping):
        bound = signature.bind(**example_inputs)
    elif isinstance(example_inputs, tuple):
        bound = signature.bind(*example_inputs)
    else:
        raise ValueError("example_inputs must be a dict of keyword arguments or a tuple of positional arguments")
    bound.apply_defaults()
    return signature, dict(bound.arguments)


def _is_graph_input(value: Any) -> bool:
    """Tensors, and containers holding tensors, are graph inputs; everything else is fixed at capture."""
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def capture(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    dynamic_batch: bool = True,
    copy_parameters: bool = False,
) -> Captured:
    """Trace `model` on `example_inputs` into an FX graph of ATen ops with a dynamic batch dimension.

    example_inputs: keyword arguments (a dict) or positional arguments (a tuple) of model.forward,
        with a batch size of at least 2 (torch.export specialises sizes 0 and 1).
    dynamic_batch: mark dim 0 of every tensor input whose size equals the batch size as dynamic.
    copy_parameters: give the graph module its own copies of the parameters and buffers, so that
        passes can rewrite them without touching `model`.

    The model is traced in eval mode; its mode is restored afterwards. Raises ValueError for inputs
    that cannot be captured, naming the argument. Where the model's code does not allow a dynamic
    batch, the graph is captured with the example's batch (binding.static_batch, binding.fallback,
    a warning) and binding.recapture traces other batch sizes; where no capture works, CaptureError
    names the line of the model's code that blocks it.
    """
    signature, values = _normalise_example(model, example_inputs)
    batch = _batch_size(values)
    if dynamic_batch and batch < 2:
        raise ValueError(f"example inputs need a batch size of at least 2 for a dynamic batch, got {batch}")
    if not dynamic_batch:
        return _capture(model, signature, values, batch, dynamic_batch=False, copy_parameters=copy_parameters)
    try:
        return _capture(model, signature, values, batch, dynamic_batch=True, copy_parameters=copy_parameters)
    except Exception as dynamic_error:  # noqa: BLE001 (classified below; any export failure can fall back)
        if isinstance(dynamic_error, ValueError) and not _from_export(dynamic_error):
            raise
        blocker = _blocking_line(dynamic_error)
    try:
        captured = _capture(model, signature, values, batch, dynamic_batch=False, copy_parameters=copy_parameters)
    except Exception as static_error:  # noqa: BLE001
        if isinstance(static_error, ValueError) and not _from_export(static_error):
            raise
        raise CaptureError(
            f"{type(model).__name__} cannot be captured by torch.export, not even with a static batch: "
            f"{_blocking_line(static_error)}"
        ) from static_error
    binding = captured.binding
    binding.static_batch = batch
    binding.fallback = (f"captured with a static batch of {batch} because {blocker}; other batch sizes are "
                        "captured again on first use (and kept)")
    binding.recapture = _recapturer(model, signature, binding.output_class)
    warnings.warn(f"{type(model).__name__}: {binding.fallback}", stacklevel=2)
    return captured


def _capture(
    model: nn.Module, signature: inspect.Signature, values: dict[str, Any], batch: int, *, dynamic_batch: bool,
    copy_parameters: bool, output_class: type | None = None, run_eager: bool = True,
) -> Captured:
    has_return_dict = "return_dict" in signature.parameters
    return_dict_default = bool(values.get("return_dict", True)) if has_return_dict else False
    static = {
        name: value for name, value in values.items() if name != "return_dict" and not _is_graph_input(value)
    }
    per_sample = {
        name: value[0] for name, value in static.items()
        if isinstance(value, (list, tuple)) and batch > 1 and len(value) == batch
        and all(_same_static(entry, value[0]) for entry in value)
    }
    graph_values = {name: value for name, value in values.items() if name not in static}
    if has_return_dict:
        graph_values["return_dict"] = False

    batch_dim = torch.export.Dim("batch", min=1) if dynamic_batch else None

    def dynamic_spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and batch_dim is not None and value.dim() > 0 and value.shape[0] == batch:
            return {0: batch_dim}
        return None

    dynamic_shapes = {name: pytree.tree_map(dynamic_spec, value) for name, value in graph_values.items()}
    if has_return_dict:
        dynamic_shapes["return_dict"] = None

    with _eval_mode(model), torch.no_grad():
        if has_return_dict and run_eager:
            eager_output = model(**{**values, "return_dict": True})
            if dataclasses.is_dataclass(eager_output):
                output_class = type(eager_output)
        try:
            program = torch.export.export(
                model, (), {**graph_values, **static},
                dynamic_shapes={**dynamic_shapes, **{k: pytree.tree_map(lambda _: None, v) for k, v in static.items()}},
                strict=False,
            )
        except Exception as error:
            error.__dict__["_dqcompile_export"] = True
            raise
    graph_module = program.module()
    if copy_parameters:
        _own_parameters(graph_module)
    binding = CallBinding(
        signature=signature,
        static=static,
        tensor_args={
            name: value.dim() for name, value in graph_values.items() if isinstance(value, torch.Tensor)
        },
        output_class=output_class,
        return_dict_default=return_dict_default,
        per_sample=per_sample,
    )
    return Captured(program=program, graph_module=graph_module, binding=binding, example_kwargs=values)


def _from_export(error: BaseException) -> bool:
    return bool(getattr(error, "__dict__", {}).get("_dqcompile_export"))


# ------------------------------------------------------------------------------------------ fallback

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_DIR = os.path.dirname(os.__file__)

# What an export error means, by a piece of its text (the first that matches).
_REASONS = (
    ("GuardOnDataDependent", "branches on the values of a tensor (data-dependent control flow)"),
    ("data-dependent", "branches on the values of a tensor (data-dependent control flow)"),
    (".numpy()", "converts a traced tensor to numpy"),
    ("SymFloat", "calls numpy on a symbolic size"),
    ("SymInt", "uses a symbolic size as a Python value"),
    ("specialized it to be a constant", "fixes the batch size (a Python loop or list per sample)"),
    ("Constraints violated", "fixes the batch size (a Python loop or list per sample)"),
)


def _blocking_line(error: BaseException) -> str:
    """'path:line `code` <what it does>': the innermost line of the model's own code in `error`'s
    traceback (not torch's, not dqcompile's), for a one-sentence refusal."""
    frames = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__) + frames
        current = current.__cause__ or current.__context__
    user = [f for f in frames if not f.filename.startswith((_TORCH_DIR, _OWN_DIR, _STDLIB_DIR)) and "<" not in f.filename]
    text = f"{type(error).__name__}: {error}"
    reason = next((why for key, why in _REASONS if key in text), None)
    if reason is None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = f"fails under tracing ({type(error).__name__}: {first[:160]})"
    if not user:
        return f"the model's code {reason}"
    frame = user[-1]
    code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    path = frame.filename.split("site-packages" + os.sep)[-1]
    return f"{path}:{frame.lineno} `{code}` {reason}"


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def _materialise(skeleton: nn.Module, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Give the skeleton `tensors` by name (shared), and a zero-memory stand-in (a broadcast zero of the
    right shape and dtype) for each one `tensors` lacks (the float weights a lowering removed)."""
    for module_path, module in skeleton.named_modules():
        prefix = f"{module_path}." if module_path else ""
        for store in (module._parameters, module._buffers):
            for leaf, value in list(store.items()):
                if value is None:
                    continue
                tensor = tensors.get(prefix + leaf)
                if tensor is None:
                    tensor = torch.zeros((), dtype=value.dtype, device=device).expand(value.shape)
                store[leaf] = nn.Parameter(tensor, requires_grad=False) if store is module._parameters else tensor


def _recapturer(model: nn.Module, signature: inspect.Signature, output_class: type | None
                ) -> Callable[..., Captured]:
    """recapture(kwargs, tensors): the architecture of `model` captured with a static batch for the
    call `kwargs` (graph inputs as graph_kwargs returns them), its parameters and buffers taken from
    `tensors` by name (zero-memory stand-ins for the missing ones): the caller replaces them."""
    skeleton = _meta_copy(model)

    def recapture(kwargs: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Captured:
        device = next((v.device for v in pytree.tree_leaves(kwargs) if isinstance(v, torch.Tensor)), torch.device("cpu"))
        _materialise(skeleton, tensors, device)
        values = dict(signature.bind(**kwargs).arguments)
        try:
            return _capture(skeleton, signature, values, _batch_size(values), dynamic_batch=False,
                            copy_parameters=False, output_class=output_class, run_eager=False)
        finally:
            _materialise(skeleton, {}, torch.device("meta"))

    return recapture


def _own_parameters(graph_module: torch.fx.GraphModule) -> None:
    """Replace every parameter and buffer with a copy, so rewriting them leaves the source model as it was."""
    for module in graph_module.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                module._parameters[name] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.detach().clone()
