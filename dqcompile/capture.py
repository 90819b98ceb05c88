"""Capture: a model and example inputs -> an FX graph of ATen ops, plus how to call it like the model.

torch.export (non-strict) traces the model's forward with a dynamic batch dimension. Plain
torch.fx.symbolic_trace fails on diffusers models (shape-dependent control flow); export handles
them and keeps each parameter under its original name and each node's module path
(`node.meta["nn_module_stack"]`), which the passes use to name layers.

The graph takes only what varies from call to call (tensors); every other argument (None, flags,
sizes) is fixed at capture. `CallBinding` maps a call of the original forward onto the graph and the
graph's output back onto the original output type, so the quantized model is a drop-in replacement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

ExampleInputs = Mapping[str, Any] | tuple


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
    """

    signature: inspect.Signature
    static: dict[str, Any]
    tensor_args: dict[str, int]
    output_class: type | None
    return_dict_default: bool

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
            if name in self.static:
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
    that cannot be captured, naming the argument.
    """
    signature, values = _normalise_example(model, example_inputs)
    batch = _batch_size(values)
    if dynamic_batch and batch < 2:
        raise ValueError(f"example inputs need a batch size of at least 2 for a dynamic batch, got {batch}")

    has_return_dict = "return_dict" in signature.parameters
    return_dict_default = bool(values.get("return_dict", True)) if has_return_dict else False
    static = {
        name: value for name, value in values.items() if name != "return_dict" and not _is_graph_input(value)
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
        output_class = None
        if has_return_dict:
            eager_output = model(**{**values, "return_dict": True})
            if dataclasses.is_dataclass(eager_output):
                output_class = type(eager_output)
        program = torch.export.export(
            model, (), {**graph_values, **static},
            dynamic_shapes={**dynamic_shapes, **{k: pytree.tree_map(lambda _: None, v) for k, v in static.items()}},
            strict=False,
        )
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
    )
    return Captured(program=program, graph_module=graph_module, binding=binding, example_kwargs=values)


def _own_parameters(graph_module: torch.fx.GraphModule) -> None:
    """Replace every parameter and buffer with a copy, so rewriting them leaves the source model as it was."""
    for module in graph_module.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                module._parameters[name] = nn.Parameter(parameter.detach().clone(), requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.detach().clone()
