"""The quantization plan: what was decided for each linear layer and attention, and the tensors it needs.

The compiler runs one way. Passes decide: `plan_layers` turns the spec into a `LayerPlan` per linear
layer, and the methods' passes fill the plans in (rounded weights, calibrated activation parameters,
balancing notes). Then `dqcompile.passes.lower.lower` emits each layer's ops once, from its plan alone.
`save` writes the plans (their metadata as JSON, their tensors as safetensors); `load` lowers from
them without running any calibration or method pass.

A plan's tensors are kept beside its metadata, so that one object says everything about a layer:
- WeightPlan: the integer codes and scales of the weight (the rounding result, whoever made it);
- ActivationPlan: the activation quantizer's kind, bit width and granularity, and its calibrated
  tensors where it has any (static scales, per-time-group tables, two-region steps);
- AttentionPlan: the per-head, per-time-group scales of an attention computed on integer codes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

WEIGHT_BITS = (4, 6, 8)
ACTIVATION_BITS = (6, 8, 16)

# How a quantized linear's input is quantized. The lowering has one rule per kind (passes/lower.py).
ActivationKind = Literal["float", "dynamic_token", "dynamic_group", "dynamic_sample_group", "static", "two_region"]
ACTIVATION_KINDS: tuple[str, ...] = (
    "float", "dynamic_token", "dynamic_group", "dynamic_sample_group", "static", "two_region",
)
DYNAMIC_KINDS = ("dynamic_token", "dynamic_group", "dynamic_sample_group")

# The tensors each calibrated kind holds: one value per tensor, or one per time group ([G]).
ACTIVATION_TENSORS: dict[str, tuple[str, ...]] = {
    "static": ("scale", "zero"),
    "two_region": ("low_scale", "high_scale"),
}


# The fields of the plan dataclasses that hold tensors (saved as safetensors, not JSON).
_TENSOR_FIELDS = ("qweight", "scale", "tensors", "tensor")


@dataclass
class WeightPlan:
    """The weight of one quantized linear: symmetric integer codes, per output channel or per group.

    group_size: input channels per group (0: one group per output channel).
    fitted_from: the spec's group size when it did not divide the layer's width and was fitted to it.
    rounding: who rounded the weight ("rtn", "rtn+clip", "gptq", "hessian search", ...), for the report.
    qweight: int8 [N, K], or packed uint8 [N, K/2] for 4 bits; scale: float32 [N, G]. None until rounded.
    """

    bits: int
    group_size: int = 0
    clip_search: bool = False
    clip_unit_gain: bool = False
    fitted_from: int = 0
    rounding: str = ""
    qweight: Tensor | None = None
    scale: Tensor | None = None

    @property
    def rounded(self) -> bool:
        return self.qweight is not None and self.scale is not None

    def set_rounded(self, qweight: Tensor, scale: Tensor, rounding: str) -> None:
        """Record the rounding result (one writer per layer: a second call is a pass-ordering bug)."""
        if self.rounded:
            raise RuntimeError(f"the weight was already rounded by {self.rounding!r}; {rounding!r} would overwrite it")
        self.qweight, self.scale, self.rounding = qweight, scale.float().contiguous(), rounding


@dataclass
class ActivationPlan:
    """How a quantized linear's input is quantized (see ActivationKind).

    bits 16 / kind "float": weight-only. group_size: channels per group of the dynamic group kinds.
    time_grouped: the calibrated tensors hold one value per time group ([G]), picked at run time by
        each row's timestep (ModelPlan.time_boundaries); otherwise one value ([1]).
    tensors: the calibrated tensors, by the names ACTIVATION_TENSORS gives for the kind.
    """

    kind: ActivationKind
    bits: int = 16
    group_size: int = 0
    symmetric: bool = False
    time_grouped: bool = False
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def calibrated(self) -> bool:
        """Whether the quantizer needs tensors from calibration (static or two-region)."""
        return self.kind in ACTIVATION_TENSORS

    def set_tensors(self, **tensors: Tensor) -> None:
        expected = ACTIVATION_TENSORS[self.kind]
        if set(tensors) != set(expected):
            raise ValueError(f"a {self.kind} activation quantizer holds {', '.join(expected)}, got {', '.join(tensors)}")
        self.tensors = {name: value.detach().clone() for name, value in tensors.items()}


@dataclass
class LayerPlan:
    """One linear layer of the graph, named by its module path.

    weight / activations are None when the layer stays in float; float_reason then says why.
    node_names: the graph's linear nodes that use this layer's weight (one, unless a weight is used
        twice, as diffusers DiT's shared timestep embedder).
    notes: what the passes did to the layer (balancing, GPTQ, searches), shown in the report.
    rescaled_for: when a fold divided this layer's output channels (PTQ4DiT's V rows), the layers
        that read them and carry the inverse: its outputs are not comparable with the float model's
        layer by layer (the per-layer errors say so).
    """

    name: str
    weight_name: str
    bias_name: str | None
    in_features: int
    out_features: int
    weight: WeightPlan | None = None
    activations: ActivationPlan | None = None
    float_reason: str | None = None
    node_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rescaled_for: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.weight is not None

    def tensor_path(self, leaf: str) -> str:
        """Where the lowering keeps one of the layer's tensors: beside the weight, in the layer's module
        (`<module>.qweight`) for an nn.Linear, or as `<parameter>_qweight` for a bare weight parameter
        (F.linear(x, self.w)), whose owner is not the layer's own module."""
        if self.weight_name == f"{self.name}.weight":
            return f"{self.name}.{leaf}"
        return f"{self.weight_name}_{leaf}"


@dataclass
class AttentionPlan:
    """One scaled_dot_product_attention node computed on integer codes (TQ-DiT).

    tensors: per time group and head steps q_scale, k_scale, v_scale float32 [G, H], and with
    two-region softmax codes p_low_scale float32 [G] (absent: uniform softmax codes).
    """

    name: str
    node_name: str
    heads: int
    head_dim: int
    softmax_scale: float
    bits: int
    two_region_softmax: bool
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class GraphEdit:
    """A change a fold made to the float graph that the lowering must repeat on a fresh capture.

    kind "embedding_scale": the add of a per-block table and a shared embedding (node `node_name`)
    becomes addcmul(table, embedding, u), with u = `tensor` registered as the buffer `buffer`
    (PixArt's balancing fold).
    """

    kind: Literal["embedding_scale"]
    node_name: str
    buffer: str
    table: str
    tensor: Tensor


@dataclass
class ModelPlan:
    """Every decision of one quantize() run.

    layers: layer name -> plan, in graph order. attention: attention name -> plan.
    time_boundaries: float32 [G - 1] when some quantizer is time-grouped: timestep t belongs to
        group #{boundaries < t}.
    edits: float-graph changes of folds (GraphEdit), repeated before lowering on load.
    summary: free-form results of method passes for the report (times, errors, memory).
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    attention: dict[str, AttentionPlan] = field(default_factory=dict)
    time_boundaries: Tensor | None = None
    edits: list[GraphEdit] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def quantized_layers(self) -> list[LayerPlan]:
        return [plan for plan in self.layers.values() if plan.quantized]

    def check(self) -> None:
        """Refuse a plan the lowering cannot run as it claims, naming the layer: codes of the wrong
        dtype or shape for the stated bits, scales that are not finite and positive float32, activation
        tensors missing or malformed, attention tables that do not fit. `load` runs it on every saved
        plan; `quantize` on every plan it made."""
        for layer in self.quantized_layers():
            _check_layer(layer)
        for attention in self.attention.values():
            names = ("q_scale", "k_scale", "v_scale") + (("p_low_scale",) if attention.two_region_softmax else ())
            if set(attention.tensors) != set(names):
                raise ValueError(f"attention {attention.name}: holds {sorted(attention.tensors)}, expected {sorted(names)}")
            for name in names:
                _check_scale(f"attention {attention.name}: {name}", attention.tensors[name])
        if self.time_boundaries is not None:
            bounds = self.time_boundaries
            if bounds.dtype != torch.float32 or bounds.dim() != 1 or bool((bounds.diff() < 0).any()):
                raise ValueError("time_boundaries must be ascending float32 [G - 1]")

    # ---- saving: metadata to JSON, tensors to a flat name -> tensor dict

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor of the plan by the buffer path the lowering registers it under."""
        found: dict[str, Tensor] = {}
        for plan in self.layers.values():
            if plan.weight is not None:
                if not plan.weight.rounded:
                    raise RuntimeError(f"layer {plan.name}: its weight was never rounded")
                found[plan.tensor_path("qweight")] = plan.weight.qweight
                found[plan.tensor_path("weight_scale")] = plan.weight.scale
            if plan.activations is not None:
                for name, value in plan.activations.tensors.items():
                    found[plan.tensor_path(f"input_{name}")] = value
        for attention in self.attention.values():
            for name, value in attention.tensors.items():
                found[f"{attention_path(attention.name)}.{name}"] = value
        for edit in self.edits:
            found[edit.buffer] = edit.tensor
        if self.time_boundaries is not None:
            found["time_boundaries"] = self.time_boundaries
        return found

    def to_json(self) -> dict[str, Any]:
        """The plan's metadata (no tensors): the inverse of `from_json` given `tensors()`."""

        def without_tensors(obj: Any) -> dict[str, Any]:
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in _TENSOR_FIELDS}

        layers = []
        for plan in self.layers.values():
            entry = without_tensors(plan)
            entry["weight"] = without_tensors(plan.weight) if plan.weight else None
            entry["activations"] = without_tensors(plan.activations) if plan.activations else None
            layers.append(entry)
        return {
            "layers": layers,
            "attention": [without_tensors(a) for a in self.attention.values()],
            "time_groups": None if self.time_boundaries is None else int(self.time_boundaries.numel()) + 1,
            "edits": [without_tensors(edit) for edit in self.edits],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], tensors: dict[str, Tensor]) -> ModelPlan:
        """Rebuild a saved plan from its metadata and its tensors (validated by dqcompile.api.load)."""
        plan = cls()
        for entry in data["layers"]:
            entry = dict(entry)
            weight, activations = entry.pop("weight"), entry.pop("activations")
            layer = LayerPlan(**entry)
            if weight is not None:
                layer.weight = WeightPlan(**weight, qweight=tensors[layer.tensor_path("qweight")],
                                          scale=tensors[layer.tensor_path("weight_scale")])
            if activations is not None:
                names = ACTIVATION_TENSORS.get(activations["kind"], ())
                layer.activations = ActivationPlan(
                    **activations, tensors={name: tensors[layer.tensor_path(f"input_{name}")] for name in names}
                )
            plan.layers[layer.name] = layer
        for entry in data["attention"]:
            names = ("q_scale", "k_scale", "v_scale") + (("p_low_scale",) if entry["two_region_softmax"] else ())
            path = attention_path(entry["name"])
            attention = AttentionPlan(**entry, tensors={n: tensors[f"{path}.{n}"] for n in names})
            plan.attention[attention.name] = attention
        if data.get("time_groups") is not None:
            plan.time_boundaries = tensors["time_boundaries"]
        plan.edits = [GraphEdit(**edit, tensor=tensors[edit["buffer"]]) for edit in data["edits"]]
        return plan


# Submodule of the lowered graph module holding the attention plans' tensors.
ATTENTION_ROOT = "dqcompile_attention"


def attention_path(name: str) -> str:
    """The submodule holding an attention plan's tensors: a module path is not a valid attribute name."""
    return f"{ATTENTION_ROOT}.{name.replace('.', '__').replace('#', '_')}"


def plan_meta(plan: LayerPlan | AttentionPlan) -> dict[str, Any]:
    """What a lowered node carries in node.meta["dqcompile"]: the plan it was emitted from."""
    key = "layer" if isinstance(plan, LayerPlan) else "attention"
    return {key: plan.name, "plan": plan}


def _check_scale(what: str, scale: Tensor) -> None:
    if scale.dtype != torch.float32 or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"{what} must be finite, positive float32 scales")


def _check_layer(layer: LayerPlan) -> None:
    weight, activations = layer.weight, layer.activations
    name = f"layer {layer.name}"
    if weight.bits not in WEIGHT_BITS or weight.group_size < 0:
        raise ValueError(f"{name}: weight bits {weight.bits} / group size {weight.group_size} are not allowed")
    if not weight.rounded:
        raise ValueError(f"{name}: its weight was never rounded")
    packed = weight.bits == 4
    codes_dtype, width = (torch.uint8, layer.in_features // 2) if packed else (torch.int8, layer.in_features)
    if weight.qweight.dtype != codes_dtype or tuple(weight.qweight.shape) != (layer.out_features, width):
        raise ValueError(f"{name}: {weight.bits}-bit codes must be {codes_dtype} {(layer.out_features, width)}, got "
                         f"{weight.qweight.dtype} {tuple(weight.qweight.shape)}")
    groups = layer.in_features // weight.group_size if weight.group_size else 1
    if tuple(weight.scale.shape) != (layer.out_features, groups):
        raise ValueError(f"{name}: weight scales must be [{layer.out_features}, {groups}], got {tuple(weight.scale.shape)}")
    _check_scale(f"{name}: weight_scale", weight.scale)
    if activations.kind not in ACTIVATION_KINDS or (activations.quantized and activations.bits not in ACTIVATION_BITS):
        raise ValueError(f"{name}: activation quantizer {activations.kind!r} with {activations.bits} bits is not allowed")
    expected = ACTIVATION_TENSORS.get(activations.kind, ())
    if set(activations.tensors) != set(expected):
        raise ValueError(f"{name}: a {activations.kind} activation quantizer holds {', '.join(expected) or 'no tensor'}, "
                         f"got {', '.join(sorted(activations.tensors)) or 'none'}")
    for key, value in activations.tensors.items():
        if key == "zero":
            if value.dtype != torch.int32:
                raise ValueError(f"{name}: input_zero must be int32, got {value.dtype}")
        else:
            _check_scale(f"{name}: input_{key}", value)
