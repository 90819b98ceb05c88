"""LoRA on a quantized model, without re-quantizing: a float low-rank branch beside each integer GEMM.

For a layer y = W x + b with an adapter (A [r, K], B [N, r], scale s = weight * alpha / r):

    y' = y + s * B (A x)

is added to the lowered graph after the layer's output (its int_linear, weight-only or float linear),
reading the layer's float input x. The integer weights are not touched: adapters load, unload,
change scale and hot-swap by rewriting the few branch nodes (or, for a hot swap of same-shaped
adapters, by copying into the branch's tensors, which a compiled model then reads without
recompiling).

State-dict formats: PEFT / diffusers (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`, optional
`<layer>.alpha`), and kohya-style (`<layer>.lora_down.weight`, `<layer>.lora_up.weight`). A leading
`transformer.`, `unet.` or `base_model.model.` is stripped. `network_alphas` (diffusers' name ->
alpha) is also taken.

The branch tensors live in the lowered graph module under `dqcompile_lora.*` as non-persistent
buffers listed among the derived tensors: `dqcompile.save` writes the base model without adapters
(load them again after loading).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

ROOT = "dqcompile_lora"
_META = "dqcompile_lora"  # node.meta key of branch nodes (value: layer name)
_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.")
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
          (".lora.down.weight", ".lora.up.weight"))


@dataclass
class LoRAState:
    """adapters: name -> layer -> (A, B, alpha / rank); active: adapter names in use; weights: their
    user scales; enabled: False while disable_lora is in force."""

    adapters: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    enabled: bool = True


def _target(model: Any):
    """The QuantizedModel behind a pipeline, a diffusers model from the backend, or a QuantizedModel."""
    from dqcompile.integrations.diffusers import quantized_model_of

    if hasattr(model, "transformer") and not isinstance(model, nn.Module):
        model = model.transformer
    return quantized_model_of(model)


def _state(qmodel) -> LoRAState:
    state = qmodel.__dict__.get("_lora")
    if state is None:
        state = qmodel.__dict__["_lora"] = LoRAState()
    return state


# ------------------------------------------------------------------------------------------ state dicts

def _read(source: Any) -> dict[str, torch.Tensor]:
    if isinstance(source, (str, os.PathLike)):
        import safetensors.torch

        path = str(source)
        if os.path.isdir(path):
            candidates = [f for f in os.listdir(path) if f.endswith(".safetensors")]
            if len(candidates) != 1:
                raise ValueError(f"{path}: expected one .safetensors LoRA file, found {candidates}")
            path = os.path.join(path, candidates[0])
        return safetensors.torch.load_file(path)
    if isinstance(source, dict):
        return dict(source)
    raise TypeError(f"a LoRA is a state dict or a .safetensors path, got {type(source).__name__}")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def parse_lora(state_dict: dict[str, torch.Tensor], network_alphas: dict[str, float] | None = None
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """layer name -> (A [r, K], B [N, r], alpha / r) of a LoRA state dict (formats: module docstring)."""
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    used: set[str] = set()
    alphas = {_strip(k).removesuffix(".alpha"): float(v) for k, v in (network_alphas or {}).items()}
    for key, value in state_dict.items():
        for a_suffix, b_suffix in _PAIRS:
            if not key.endswith(a_suffix):
                continue
            base = key[: -len(a_suffix)]
            b_key = base + b_suffix
            if b_key not in state_dict:
                raise ValueError(f"LoRA key {key} has no {b_key}")
            a, b = value, state_dict[b_key]
            rank = a.shape[0]
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
                raise ValueError(f"LoRA {base}: A {tuple(a.shape)} and B {tuple(b.shape)} are not [r, K] and [N, r]")
            layer = _strip(base)
            alpha = state_dict.get(base + ".alpha")
            alpha = float(alpha) if alpha is not None else alphas.get(layer, float(rank))
            layers[layer] = (a, b, alpha / rank)
            used |= {key, b_key, base + ".alpha"}
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise ValueError(f"LoRA keys not understood: {unknown[:3]} (expected lora_A/lora_B or lora_down/lora_up)")
    if not layers:
        raise ValueError("the LoRA state dict holds no adapter")
    return layers


# ------------------------------------------------------------------------------------------ the graph

def _layer_io(gm: GraphModule) -> dict[str, tuple[Node, Node]]:
    """layer name -> (input x, output y) of every linear layer of a lowered graph: quantized layers by
    their emitted nodes' tags, float layers by their aten.linear on `<layer>.weight`."""
    from dqcompile.graph import is_linear, layer_name_of
    from dqcompile.passes.context import META_KEY

    tagged: dict[str, list[Node]] = {}
    io: dict[str, tuple[Node, Node]] = {}
    for node in gm.graph.nodes:
        if node.meta.get(_META):
            continue
        name = (node.meta.get(META_KEY) or {}).get("layer")
        if name is not None and node.op != "get_attr" and not is_linear(node):
            tagged.setdefault(name, []).append(node)
        elif is_linear(node):
            io.setdefault(layer_name_of(node), (node.args[0], node))
    for name, nodes in tagged.items():
        members = set(nodes)
        outputs = [n for n in nodes if any(user not in members for user in n.users)]
        inputs = [a for n in nodes for a in n.args if isinstance(a, Node) and a not in members and a.op != "get_attr"
                  and not (a.meta.get(META_KEY) or {}).get("time_groups")]
        if len(outputs) == 1 and inputs:
            io[name] = (inputs[0], outputs[0])
    return io


def _remove_branches(gm: GraphModule) -> None:
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        if node.meta.get(_META) == "sum":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(list(graph.nodes)):
        if node.meta.get(_META) and not node.users:
            graph.erase_node(node)
    if hasattr(gm, ROOT):
        delattr(gm, ROOT)


def _buffer_path(adapter: str, layer: str, which: str) -> str:
    return f"{ROOT}.{re.sub(r'[^0-9A-Za-z_]', '_', adapter)}.{layer.replace('.', '__')}.{which}"


def apply_to_graph(qmodel, gm: GraphModule) -> None:
    """Make `gm`'s branches those of qmodel's LoRA state (none when there are no active adapters)."""
    from dqcompile.passes.lower import DERIVED_META, _register

    state = qmodel.__dict__.get("_lora")
    _remove_branches(gm)
    derived = [name for name in gm.meta.get(DERIVED_META, []) if not name.startswith(ROOT + ".")]
    if state is not None and state.enabled and state.active:
        io = _layer_io(gm)
        device = next(iter(gm.buffers()), torch.empty(0)).device
        graph = gm.graph
        for adapter in state.active:
            scale_of_user = state.weights.get(adapter, 1.0)
            for layer, (a, b, alpha_scale) in state.adapters[adapter].items():
                x, y = io[layer]
                a_path, b_path = _buffer_path(adapter, layer, "A"), _buffer_path(adapter, layer, "B")
                dtype = y.meta["val"].dtype if "val" in y.meta else a.dtype
                _register(gm, a_path, a.to(device=device, dtype=dtype), persistent=False)
                _register(gm, b_path, b.to(device=device, dtype=dtype), persistent=False)
                derived += [a_path, b_path]
                users = [u for u in y.users]
                with graph.inserting_after(y):
                    a_node = graph.get_attr(a_path)
                with graph.inserting_after(a_node):
                    b_node = graph.get_attr(b_path)
                with graph.inserting_after(b_node):
                    down = graph.call_function(torch.ops.aten.linear.default, (x, a_node))
                with graph.inserting_after(down):
                    up = graph.call_function(torch.ops.aten.linear.default, (down, b_node))
                with graph.inserting_after(up):
                    scaled = graph.call_function(torch.ops.aten.mul.Tensor, (up, alpha_scale * scale_of_user))
                with graph.inserting_after(scaled):
                    total = graph.call_function(torch.ops.aten.add.Tensor, (y, scaled))
                for node in (a_node, b_node, down, up, scaled):
                    node.meta[_META] = layer
                total.meta[_META] = "sum"
                if "val" in y.meta:
                    total.meta["val"] = y.meta["val"]
                for user in users:
                    user.replace_input_with(y, total)
                io[layer] = (x, total)
    gm.meta[DERIVED_META] = derived
    gm.graph.lint()
    gm.recompile()


def _refresh(qmodel) -> None:
    apply_to_graph(qmodel, qmodel.graph_module)
    for gm in qmodel.__dict__.get("_graphs_by_batch", {}).values():
        apply_to_graph(qmodel, gm)


# ------------------------------------------------------------------------------------------ the API

def load_lora_weights(model: Any, lora: Any, adapter_name: str = "default", *, weight: float = 1.0,
                      network_alphas: dict[str, float] | None = None, hotswap: bool = False) -> None:
    """Add adapter `adapter_name` (a state dict or a .safetensors file) to a quantized model, active with
    scale `weight` beside the others. hotswap=True replaces an adapter of the same name and shapes in
    place (a compiled model does not recompile)."""
    qmodel = _target(model)
    layers = parse_lora(_read(lora), network_alphas)
    io = _layer_io(qmodel.graph_module)
    for layer, (a, b, _) in layers.items():
        if layer not in io:
            raise ValueError(f"LoRA layer {layer} is no linear layer of this model")
        plan = qmodel.plan.layers.get(layer)
        if plan is not None and (a.shape[1] != plan.in_features or b.shape[0] != plan.out_features):
            raise ValueError(f"LoRA layer {layer}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit its "
                             f"{plan.out_features}x{plan.in_features} weight")
    state = _state(qmodel)
    if hotswap:
        old = state.adapters.get(adapter_name)
        if old is None or set(old) != set(layers) or any(
                old[k][0].shape != layers[k][0].shape or old[k][1].shape != layers[k][1].shape
                or old[k][2] != layers[k][2] for k in layers):
            raise ValueError(f"hotswap needs a loaded adapter {adapter_name!r} with the same layers, ranks and alphas")
        state.adapters[adapter_name] = layers
        if state.enabled and adapter_name in state.active:
            with torch.no_grad():
                for gm in (qmodel.graph_module, *qmodel.__dict__.get("_graphs_by_batch", {}).values()):
                    for layer, (a, b, _) in layers.items():
                        gm.get_buffer(_buffer_path(adapter_name, layer, "A")).copy_(a)
                        gm.get_buffer(_buffer_path(adapter_name, layer, "B")).copy_(b)
        return
    if adapter_name in state.adapters:
        raise ValueError(f"adapter {adapter_name!r} is already loaded (delete_adapters it, or pass hotswap=True)")
    state.adapters[adapter_name] = layers
    state.active.append(adapter_name)
    state.weights[adapter_name] = float(weight)
    _refresh(qmodel)


def set_adapters(model: Any, adapter_names: str | list[str], weights: float | list[float] | None = None) -> None:
    """Use exactly these adapters, with these scales (default 1 each)."""
    qmodel = _target(model)
    state = _state(qmodel)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None:
        weights = [1.0] * len(names)
    elif not isinstance(weights, (list, tuple)):
        weights = [weights] * len(names)
    missing = [n for n in names if n not in state.adapters]
    if missing or len(weights) != len(names):
        raise ValueError(f"set_adapters: unknown adapters {missing}" if missing else "one weight per adapter")
    state.active = names
    state.weights.update({n: float(w) for n, w in zip(names, weights)})
    _refresh(qmodel)


def disable_lora(model: Any) -> None:
    qmodel = _target(model)
    _state(qmodel).enabled = False
    _refresh(qmodel)


def enable_lora(model: Any) -> None:
    qmodel = _target(model)
    _state(qmodel).enabled = True
    _refresh(qmodel)


def delete_adapters(model: Any, adapter_names: str | list[str]) -> None:
    qmodel = _target(model)
    state = _state(qmodel)
    for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
        state.adapters.pop(name, None)
        state.weights.pop(name, None)
        if name in state.active:
            state.active.remove(name)
    _refresh(qmodel)


def unload_lora_weights(model: Any) -> None:
    """Remove every adapter: the model is the quantized model it was, bit for bit."""
    qmodel = _target(model)
    qmodel.__dict__.pop("_lora", None)
    _refresh(qmodel)


def get_active_adapters(model: Any) -> list[str]:
    state = _state(_target(model))
    return list(state.active) if state.enabled else []
