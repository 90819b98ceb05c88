"""The drop-in quantized model that quantize() returns."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx._pytree import tree_flatten_spec
from torch.utils._pytree import tree_unflatten

from dqcompile.capture import CallBinding
from dqcompile.backends.merge import pack_sibling_weights
from dqcompile.passes.retarget_device import retarget_device
from dqcompile.plan import ModelPlan
from dqcompile.report import QuantReport
from dqcompile.spec import QuantSpec


class QuantizedModel(nn.Module):
    """A quantized model with the call signature and output type of the model it came from.

    It runs the lowered graph (`graph_module`), whose quantized linears are dqcompile integer ops.
    `.plan` holds every decision (per layer and attention), `.report` the per-layer summary.
    `.config` is the source model's config (diffusers pipelines read it); `.dtype` is the float
    dtype it computes in, fixed at quantization; `.to(device)` moves it, `.to(dtype)` is refused.
    """

    def __init__(
        self,
        graph_module: GraphModule,
        binding: CallBinding,
        *,
        spec: QuantSpec,
        plan: ModelPlan,
        report: QuantReport,
        config: Any = None,
        dtype: torch.dtype = torch.float32,
        source_class: str = "",
        example_inputs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.binding = binding
        self.spec = spec
        self.plan = plan
        self.report = report
        self.example_inputs = example_inputs
        self.config = config
        self.source_class = source_class
        self._dtype = dtype
        # (kernels, fuse) of a with_kernels model, whose graphs get the compile backend's rewrite.
        self._eager_kernels: tuple[str, bool] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        for tensor in self.graph_module.buffers():
            return tensor.device
        return torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs, return_dict = self.binding.graph_kwargs(args, kwargs)
        graph = self.graph_for(inputs)
        return self.binding.wrap_output(graph(**_conformed(graph, inputs)), return_dict)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a QuantizedModel cannot be pickled (torch.save, pickle): its graph is code, which dqcompile never "
            "pickles; save it with dqcompile.save(qmodel, folder) and read it back with dqcompile.load(folder)"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedModel:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def graph_for(self, inputs: dict[str, Any]) -> GraphModule:
        """The lowered graph that runs a call's graph inputs: `graph_module`, unless the model's code fixed
        the batch at capture (binding.static_batch) and this call has another: then the architecture is
        captured again at this batch, lowered from the same plan, and given the very tensors of
        `graph_module` (shared, not copied); kept for later calls of that batch size."""
        static_batch = self.binding.static_batch
        if static_batch is None:
            return self.graph_module
        batch = self.binding.batch_of(inputs)
        if batch == static_batch:
            return self.graph_module
        graphs = self.__dict__.setdefault("_graphs_by_batch", {})
        if batch not in graphs:
            graphs[batch] = _relowered(self, inputs)
            self._rewrite_for_kernels(graphs[batch])
        return graphs[batch]

    def _rewrite_for_kernels(self, gm: GraphModule) -> None:
        """On a with_kernels model, the compile backend's rewrite of one of its graphs, in place."""
        if self._eager_kernels is not None:
            from dqcompile.backends.compile import rewrite_graph

            kernels, fuse = self._eager_kernels
            rewrite_graph(gm, kernels=kernels, fuse=fuse)

    def with_kernels(self, kernels: str = "auto", *, fuse: bool = True) -> QuantizedModel:
        """This model with its integer ops on `kernels`, in eager mode: no torch.compile, no compile time.

        The compile backend's own graph rewrite (`dqcompile.backends.compile.rewrite_graph`: the fusions
        of LayerNorm + modulate and GELU into the activation quantizer, then each op on its kernel) is
        applied to a copy of the graph, so on a GPU the GEMMs and quantizers run as Triton kernels while
        everything else runs as eager torch ops. For many short-lived models (evaluating method
        variants) this is the fast path without a compile per model; for deployment, torch.compile with
        backend="dqcompile" also fuses and launches the rest. Kernel choices as the backend's: "auto"
        (Triton on CUDA, ATen decompositions on CPU), "reference", or a backend name. Outputs match this
        model's within the output dtype's rounding (docs/CONTRACTS.md).

        The copy shares this model's tensors (no extra memory; its merged q/k/v GEMMs read views spanning
        their stacked weights). Apply it last: LoRA branches added
        afterwards go into the copy's graph as usual, but later `.to(device)` calls move the shared tensors
        of both models.
        """
        model = QuantizedModel(_graph_copy(self.graph_module), self.binding, spec=self.spec, plan=self.plan,
                               report=self.report, config=self.config, dtype=self._dtype,
                               source_class=self.source_class, example_inputs=self.example_inputs)
        model._eager_kernels = (kernels, fuse)
        model._rewrite_for_kernels(model.graph_module)
        return model

    def train(self, mode: bool = True) -> QuantizedModel:
        """Sets the flag only: the graph was captured in eval mode (no dropout, no label drop), and an
        exported graph module cannot switch modes."""
        self.training = mode
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedModel:
        probe = fn(torch.empty(0, dtype=self._dtype))
        if probe.dtype != self._dtype:
            raise TypeError(
                f"a quantized model keeps the dtype it was quantized in ({self._dtype}); quantize the model "
                f"after model.to({probe.dtype}) instead"
            )
        super()._apply(fn, recurse)
        retarget_device(self.graph_module, self.device)
        # Each buffer moved on its own: the sibling weights' shared block is rebuilt on the new device.
        pack_sibling_weights(self.graph_module)
        self.__dict__.pop("_graphs_by_batch", None)  # they share the old tensors: lowered again on use
        return self

    # ---- diffusers-style conveniences (dqcompile.integrations)

    def save_pretrained(self, save_directory: Any, **_: Any) -> Any:
        """A folder both dqcompile.load and the source class's from_pretrained read (integrations.diffusers)."""
        from dqcompile.integrations.diffusers import save_pretrained

        return save_pretrained(self, save_directory)

    def load_lora_weights(self, lora: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        """A LoRA as a float branch beside the integer GEMMs (integrations.lora.load_lora_weights)."""
        from dqcompile.integrations.lora import load_lora_weights

        load_lora_weights(self, lora, adapter_name, **kwargs)

    def set_adapters(self, adapter_names: Any, weights: Any = None) -> None:
        from dqcompile.integrations.lora import set_adapters

        set_adapters(self, adapter_names, weights)

    def unload_lora_weights(self) -> None:
        from dqcompile.integrations.lora import unload_lora_weights

        unload_lora_weights(self)

    def extra_repr(self) -> str:
        return f"source={self.source_class}, spec={self.spec.name}, dtype={self._dtype}"


def _graph_copy(gm: GraphModule) -> GraphModule:
    """A GraphModule with a copy of `gm`'s graph (nodes and their meta, the pytree codegen) and `gm`'s own
    submodules, parameters and buffers (shared, not copied): a rewrite of the copy leaves `gm` as it was."""
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    copied = GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def _conformed(graph: GraphModule, inputs: dict[str, Any]) -> dict[str, Any]:
    """The call's graph inputs as the captured graph takes them: a tensor of another dtype than captured
    is cast where the float model computes the same (integer timesteps or labels of another width,
    integral float timesteps into an integer graph, integers into a float one, another float precision);
    a shape that differs from the captured one outside the batch dimension, or fractional values where
    integers were captured, are refused in one sentence that says how to capture what is asked.
    Skipped under torch.compile: dynamo guards the inputs' dtypes and shapes itself."""
    if torch.compiler.is_compiling():
        return inputs
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    flat = tree_flatten_spec(((), inputs), graph._in_spec)
    changed = False
    for index, (node, value) in enumerate(zip(placeholders, flat)):
        expected = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(expected, torch.Tensor):
            continue
        name = str(node.target)
        static = [size if isinstance(size, int) else None for size in expected.shape]
        if value.dim() != len(static) or any(e is not None and e != v for e, v in zip(static, value.shape)):
            captured = "(" + ", ".join("B" if e is None else str(e) for e in static) + ")"
            raise ValueError(
                f"input {name} has shape {tuple(value.shape)}; the model was captured at {captured} (B: any "
                "batch): quantize with example_inputs of this shape to run it (one capture serves one shape)"
            )
        if value.dtype != expected.dtype:
            flat[index] = _cast(name, value, expected.dtype)
            changed = True
    if not changed:
        return inputs
    _, kwargs = tree_unflatten(flat, graph._in_spec)
    return kwargs


def _cast(name: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool or value.dtype == torch.bool:
        raise ValueError(f"input {name} is {value.dtype}; the model was captured with {dtype}")
    if not dtype.is_floating_point and value.dtype.is_floating_point and not torch.equal(value, value.round()):
        raise ValueError(
            f"input {name} holds fractional values ({value.dtype}) but the model was captured with {dtype} "
            f"{name}: quantize with example inputs whose {name} is {value.dtype} to run it with fractional values"
        )
    return value.to(dtype)


def _relowered(owner: QuantizedModel, inputs: dict[str, Any]) -> GraphModule:
    """The architecture captured again for `inputs` (binding.recapture), lowered from `plan`, holding
    `lowered`'s parameters and buffers by name."""
    from dqcompile.passes.lower import DERIVED_META, lower

    lowered, binding, plan = owner.graph_module, owner.binding, owner.plan
    if binding.recapture is None:
        raise ValueError(f"this model was captured with a static batch of {binding.static_batch} and cannot be "
                         f"captured again here; call it with {binding.static_batch} samples")
    from dqcompile.integrations.lora import ROOT as LORA_ROOT, apply_to_graph

    source = {name: t for name, t in (*lowered.named_parameters(), *lowered.named_buffers())
              if not name.startswith(LORA_ROOT + ".")}
    gm = binding.recapture(inputs, source).graph_module
    lower(gm, plan)
    target = [name for name, _ in (*gm.named_parameters(), *gm.named_buffers())]
    if set(target) != set(source):
        missing = sorted(set(target) - set(source))[:3]
        raise RuntimeError(f"the graph captured again for another batch holds tensors the model does not: {missing}")
    for name in target:
        module_path, _, leaf = name.rpartition(".")
        module = gm.get_submodule(module_path) if module_path else gm
        if leaf in module._parameters:
            module._parameters[leaf] = source[name]
        else:
            module._buffers[leaf] = source[name]
    gm.meta[DERIVED_META] = [n for n in lowered.meta.get(DERIVED_META, []) if not n.startswith(LORA_ROOT + ".")]
    device = next(iter(source.values())).device if source else torch.device("cpu")
    retarget_device(gm, device)
    apply_to_graph(owner, gm)  # the model's LoRA branches, if any
    return gm
