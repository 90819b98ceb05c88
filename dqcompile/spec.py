"""The quantization spec: one validated, frozen dataclass tree, with named presets.

A spec says how weights and activations of each linear layer are quantized, which layers stay in
float, and which calibration method computes the parameters (with that method's options). Every
field is checked at construction, by type and by value: a bad value raises ValueError naming the
field and what is allowed, so a wrong spec never reaches the graph passes. Methods and their
presets are registered in dqcompile.methods; the spec reaches them through that registry.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dqcompile.plan import ACTIVATION_BITS, WEIGHT_BITS, ActivationPlan, WeightPlan

ACTIVATION_MODES = ("dynamic_token", "dynamic_group", "dynamic_sample_group", "static_tensor")
# Modes that quantize activations in groups of input channels, with the layer's (weights') group size.
GROUP_ACTIVATION_MODES = ("dynamic_group", "dynamic_sample_group")
WEIGHT_ROUNDINGS = ("rtn", "gptq")
# A fitted group size (QuantSpec.fit_group_sizes) is a multiple of this: the Triton kernels step
# through K in blocks of 16 or more, and a block never straddles two groups.
GROUP_SIZE_MULTIPLE = 16

ActivationMode = Literal["dynamic_token", "dynamic_group", "dynamic_sample_group", "static_tensor"]

# Linears that stay in float unless the spec says otherwise, with the reason shown in the report.
# They are matched against the linear's module path (fnmatch patterns). The adaLN and embedding
# linears see one row per sample (not per token), so they cost little and quantizing them perturbs
# every token's modulation at once; the final projection writes the predicted noise directly.
DEFAULT_KEEP_FLOAT: tuple[tuple[str, str], ...] = (
    ("*emb*", "embedding (timestep, class, text or caption): one row per sample"),
    ("*caption_projection*", "caption embedding: one row per sample"),
    ("*adaLN*", "adaLN modulation: one row per sample, drives every token"),
    ("*adaln*", "adaLN modulation: one row per sample, drives every token"),
    ("*norm*.linear", "adaLN modulation: one row per sample, drives every token"),
    ("proj_out*", "final projection: writes the prediction"),
    ("final_layer*", "final layer: writes the prediction"),
)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether `value` is of the annotated type; bool is not an int and an int is a float here."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, tuple)
    return isinstance(value, origin or annotation)


def check_field_types(obj: Any, prefix: str) -> None:
    """Refuse any field of a spec dataclass whose value is not of its annotated type, naming it.

    Strings where a tuple is expected are refused too (a string is not split into its characters),
    and a boolean option takes True or False only (not "no", 0 or "false").
    """
    hints = typing.get_type_hints(type(obj))
    for item in dataclasses.fields(obj):
        value, annotation = getattr(obj, item.name), hints[item.name]
        if not _matches(value, annotation):
            expected = " or ".join(_type_name(a) for a in typing.get_args(annotation)) or _type_name(annotation)
            if typing.get_origin(annotation) is Literal:
                expected = "one of " + ", ".join(map(repr, typing.get_args(annotation)))
            raise ValueError(f"{prefix}{item.name}={value!r} is not allowed: expected {expected}, got {type(value).__name__}")


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def _check_group_size(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: 0 (no groups) or a positive integer")


def fit_group_size(group_size: int, width: int) -> int:
    """The largest multiple of 32 that divides `width` and is at most `group_size`, else the largest
    multiple of GROUP_SIZE_MULTIPLE (16) that does.

    Multiples of 32 first because the Triton GEMM steps K by at least 32 (other group sizes run on the
    reference op). 0 when there is none (a width that is not a multiple of 16). Used where a spec's group
    size does not divide a layer's input width: group 128 on the 192-wide layers of the embedded model
    gives 96, group 64 on the benchmark model's 288-wide layers gives 32.
    """
    for step in (2 * GROUP_SIZE_MULTIPLE, GROUP_SIZE_MULTIPLE):
        for candidate in range(group_size - group_size % step, 0, -step):
            if width % candidate == 0:
                return candidate
    return 0


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ rounding (WeightSpec.rounding "gptq"): damping * mean(diag H) added to H's diagonal, column
    blocks of block_size, and columns in order of decreasing diag(H) when act_order."""

    damping: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        check_field_types(self, "weights.gptq.")
        if not 0 < self.damping < 1:
            raise ValueError(f"weights.gptq.damping={self.damping!r} must be in (0, 1)")
        if self.block_size <= 0:
            raise ValueError(f"weights.gptq.block_size={self.block_size!r} must be a positive integer")


@dataclass(frozen=True)
class WeightSpec:
    """Weight quantization: symmetric, per output channel (group_size 0) or per group of input channels.

    clip_search: choose each channel's (or group's) clipping range by minimising the squared
        reconstruction error instead of using max |w|.
    clip_unit_gain: with clip_search, rescale each candidate so the dequantized group has unit gain
        against the float one (plain MSE clipping shrinks every group slightly, and the shrinkage
        compounds over the blocks and the sampling steps; dqcompile.quant.weights._search_clip).
    rounding: "rtn" (round to nearest) or "gptq" (needs calibration: each layer's input Hessian).
    """

    bits: int = 8
    group_size: int = 0
    clip_search: bool = False
    clip_unit_gain: bool = False
    rounding: str = "rtn"
    gptq: GPTQOptions = field(default_factory=GPTQOptions)

    def __post_init__(self) -> None:
        check_field_types(self, "weights.")
        _check_choice("weights.bits", self.bits, WEIGHT_BITS)
        _check_group_size("weights.group_size", self.group_size)
        _check_choice("weights.rounding", self.rounding, WEIGHT_ROUNDINGS)
        if self.clip_unit_gain and not self.clip_search:
            raise ValueError("weights.clip_unit_gain=True rescales the clip search's candidates: set "
                             "weights.clip_search=True as well")


@dataclass(frozen=True)
class ActivationSpec:
    """Activation quantization of each quantized linear's input.

    bits 16 leaves activations in float (weight-only quantization).
    mode: dynamic_token computes (scale, zero) per token at run time; dynamic_group per token and
    group of group_size input channels (0: the layer's weight group size); dynamic_sample_group per
    sample and group, over all tokens of the sample (Q-DiT's paper); static_tensor uses one
    (scale, zero) per tensor from calibration data (methods may refine it: TQ-DiT's time groups).
    """

    bits: int = 8
    mode: ActivationMode = "dynamic_token"
    group_size: int = 0
    symmetric: bool = False

    def __post_init__(self) -> None:
        _check_choice("activations.bits", self.bits, ACTIVATION_BITS)
        _check_choice("activations.mode", self.mode, ACTIVATION_MODES)
        check_field_types(self, "activations.")
        _check_group_size("activations.group_size", self.group_size)

    @property
    def quantized(self) -> bool:
        return self.bits < 16


def _pairs(name: str, value: Any, second: type) -> tuple[tuple[str, Any], ...]:
    """A tuple of (pattern, value) pairs, refusing strings and other shapes with the field's name."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be a tuple of (pattern, {second.__name__}) pairs, got {value!r}")
    pairs = []
    for entry in value:
        if isinstance(entry, str) and second is str:
            entry = (entry, "kept in float by the spec")
        if (not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str)
                or not _matches(entry[1], second)):
            raise ValueError(f"{name} entries must be (pattern, {second.__name__}) pairs, got {entry!r}")
        pairs.append(tuple(entry))
    return tuple(pairs)


@dataclass(frozen=True)
class QuantSpec:
    """The whole spec. Build it directly, with `from_preset`, or from a preset with `replace`.

    keep_float: (pattern, reason) pairs (or bare patterns); a linear whose module path matches a
        pattern stays in float.
    group_sizes: (layer name pattern, group size) pairs, fnmatch patterns or exact layer names (a
        searched Q-DiT plan, see `with_group_plan`); the first match sets a layer's group size for
        weights and grouped activations alike; unmatched layers use weights.group_size.
    fit_group_sizes: where a layer's group size does not divide its input width, use the largest
        multiple of 16 that divides it (the report says so) instead of refusing.
    method: the calibration method (dqcompile.methods; "rtn": round to nearest, no method pass).
    options: the method's options (its registered options class); None: the method's defaults.
    """

    weights: WeightSpec = field(default_factory=WeightSpec)
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    keep_float: tuple[tuple[str, str], ...] = DEFAULT_KEEP_FLOAT
    group_sizes: tuple[tuple[str, int], ...] = ()
    fit_group_sizes: bool = False
    method: str = "rtn"
    options: Any = None
    name: str = "custom"

    def __post_init__(self) -> None:
        from dqcompile.methods import get_method

        for name, kind in (("weights", WeightSpec), ("activations", ActivationSpec)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "keep_float", _pairs("keep_float", self.keep_float, str))
        object.__setattr__(self, "group_sizes", _pairs("group_sizes", self.group_sizes, int))
        for pattern, size in self.group_sizes:
            if size <= 0:
                raise ValueError(f"group_sizes: group size of {pattern!r} must be a positive integer, got {size!r}")
        check_field_types(self, "")
        method = get_method(self.method)
        if method.options is None and self.options is not None:
            raise ValueError(f"method={self.method!r} takes no options, got {type(self.options).__name__}")
        if method.options is not None:
            if self.options is None:
                object.__setattr__(self, "options", method.options())
            elif not isinstance(self.options, method.options):
                raise ValueError(f"options of method={self.method!r} must be a {method.options.__name__}, got "
                                 f"{type(self.options).__name__}")
        act = self.activations
        grouped = act.mode in GROUP_ACTIVATION_MODES
        if grouped and act.group_size == 0 and self.weights.group_size == 0 and not self.group_sizes:
            raise ValueError(
                f"activations.mode={act.mode!r} needs a group size: set activations.group_size, "
                "weights.group_size or group_sizes"
            )
        if not grouped and act.group_size != 0:
            raise ValueError(
                f"activations.group_size={act.group_size} is only used with activations.mode in "
                f"{', '.join(map(repr, GROUP_ACTIVATION_MODES))}"
            )
        if act.quantized and grouped and act.group_size and self.group_sizes:
            raise ValueError(
                f"activations.group_size={act.group_size} must be 0 with group_sizes: each layer's "
                "activations use that layer's group size"
            )
        if act.quantized and self.weights.group_size and grouped and act.group_size not in (0, self.weights.group_size):
            raise ValueError(
                f"activations.group_size={act.group_size} must equal weights.group_size="
                f"{self.weights.group_size}: each group's partial product is one integer dot product"
            )
        method.check(self)

    @classmethod
    def from_preset(cls, name: str) -> QuantSpec:
        """The named preset; `presets()` lists them."""
        from dqcompile.methods import PRESETS

        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; allowed values: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def resolve(cls, spec: QuantSpec | str) -> QuantSpec:
        """A spec given as a preset name or a QuantSpec, as a QuantSpec."""
        if isinstance(spec, QuantSpec):
            return spec
        if isinstance(spec, str):
            return cls.from_preset(spec)
        raise ValueError(f"spec must be a QuantSpec or a preset name, got {type(spec).__name__}")

    def replace(self, **changes: object) -> QuantSpec:
        """A copy with some fields changed (validated like a new spec). Changing `method` without
        `options` gives the new method's default options."""
        if "method" in changes and "options" not in changes:
            changes["options"] = None
        return dataclasses.replace(self, **changes)

    @property
    def needs_calibration(self) -> bool:
        """Whether `quantize` needs calibration data for this spec: static activation parameters,
        GPTQ's Hessians, or what the method itself calibrates. Round to nearest with dynamic
        activations needs none."""
        from dqcompile.methods import get_method

        return (
            (self.activations.quantized and self.activations.mode == "static_tensor")
            or self.weights.rounding == "gptq"
            or get_method(self.method).needs_calibration(self)
        )

    def keep_float_reason(self, layer_name: str) -> str | None:
        """Why the linear at this module path stays in float, or None when it is quantized."""
        for pattern, reason in self.keep_float:
            if fnmatch.fnmatchcase(layer_name, pattern):
                return f"{reason} (matches {pattern!r})"
        return None

    def group_size(self, layer_name: str) -> int:
        """A layer's group size as the spec states it: the first group_sizes match, else weights.group_size."""
        for pattern, size in self.group_sizes:
            if fnmatch.fnmatchcase(layer_name, pattern):
                return size
        return self.weights.group_size

    def layer_plans(self, layer_name: str, in_features: int) -> tuple[WeightPlan, ActivationPlan]:
        """The weight and activation plans of one quantized linear, before any pass filled them in.

        With fit_group_sizes, a group size that does not divide `in_features` is fitted
        (`fit_group_size`). Weights and grouped activations share the group size.
        """
        act = self.activations
        group, fitted_from = self.group_size(layer_name), 0
        if group and in_features % group and self.fit_group_sizes:
            fitted = fit_group_size(group, in_features)
            if fitted:
                group, fitted_from = fitted, group
        weight = WeightPlan(bits=self.weights.bits, group_size=group, clip_search=self.weights.clip_search,
                            clip_unit_gain=self.weights.clip_unit_gain, fitted_from=fitted_from)
        if not act.quantized:
            return weight, ActivationPlan(kind="float")
        kind = {"dynamic_token": "dynamic_token", "dynamic_group": "dynamic_group",
                "dynamic_sample_group": "dynamic_sample_group", "static_tensor": "static"}[act.mode]
        act_group = (group or act.group_size) if act.mode in GROUP_ACTIVATION_MODES else 0
        return weight, ActivationPlan(kind=kind, bits=act.bits, group_size=act_group, symmetric=act.symmetric)

    def with_group_plan(self, plan: object) -> QuantSpec:
        """A copy whose group_sizes are a searched plan's (exact layer names), in place of any before.

        plan: a dqcompile.methods.qdit.GroupPlan, a mapping layer name -> group size, or the path of
        a plan JSON file (GroupPlan.save).
        """
        if isinstance(plan, (str, Path)):
            plan = json.loads(Path(plan).read_text())["group_sizes"]
        sizes = getattr(plan, "group_sizes", plan)
        if not isinstance(sizes, Mapping):
            raise ValueError(f"a group plan must be a GroupPlan, a mapping or a path, got {type(plan).__name__}")
        return self.replace(group_sizes=tuple(sorted(sizes.items())))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (inverse: `from_dict`)."""
        data = dataclasses.asdict(self)
        data["options"] = None if self.options is None else dataclasses.asdict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """The spec `to_dict` wrote; refuses anything else with the field's name."""
        from dqcompile.methods import get_method

        if not isinstance(data, Mapping):
            raise ValueError(f"a spec dict must be a mapping, got {type(data).__name__}")
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown spec field(s) {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(sorted(known))}")
        values = dict(data)
        method = get_method(values.get("method", "rtn"))
        if values.get("options") is not None and method.options is not None:
            values["options"] = _from_mapping(method.options, values["options"], "options.")
        return _from_mapping(cls, values, "")


def _from_mapping(kind: type, value: Any, prefix: str) -> Any:
    """A spec dataclass from its dict form (nested spec dataclasses too, lists as tuples), refusing
    unknown keys with their names."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'spec'} must be a mapping of {kind.__name__} fields, got {value!r}")
    hints = typing.get_type_hints(kind)
    fields = {item.name for item in dataclasses.fields(kind)}
    unknown = set(value) - fields
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(prefix + str(key) for key in sorted(map(str, unknown)))}; "
                         f"allowed: {', '.join(sorted(fields))}")
    values = {}
    for key, item in value.items():
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            item = _from_mapping(annotation, item, f"{prefix}{key}.")
        elif isinstance(item, list):
            item = tuple(tuple(entry) if isinstance(entry, list) else entry for entry in item)
        values[key] = item
    return kind(**values)


def presets() -> list[str]:
    """The names `QuantSpec.from_preset` accepts."""
    from dqcompile.methods import PRESETS

    return list(PRESETS)
