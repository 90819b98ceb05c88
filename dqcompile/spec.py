"""The quantization spec: one validated, frozen dataclass tree, with named presets.

A spec says how weights and activations of each linear layer are quantized, which layers stay in
float, and which calibration method computes the parameters. Every field is checked at construction:
a bad value raises ValueError naming the field and the allowed values, so a wrong spec never reaches
the graph passes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Literal

WEIGHT_BITS = (4, 6, 8)
ACTIVATION_BITS = (6, 8, 16)
ACTIVATION_MODES = ("dynamic_token", "dynamic_group", "static_tensor")
METHODS = ("rtn", "ptq4dit", "qdit", "tqdit")

ActivationMode = Literal["dynamic_token", "dynamic_group", "static_tensor"]

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


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def _check_group_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: 0 (no groups) or a positive integer")


@dataclass(frozen=True)
class WeightSpec:
    """Weight quantization: symmetric, per output channel (group_size 0) or per group of input channels.

    clip_search: choose each channel's (or group's) clipping range by minimising the squared
    reconstruction error instead of using max |w|.
    """

    bits: int = 8
    group_size: int = 0
    clip_search: bool = False

    def __post_init__(self) -> None:
        _check_choice("weights.bits", self.bits, WEIGHT_BITS)
        _check_group_size("weights.group_size", self.group_size)


@dataclass(frozen=True)
class ActivationSpec:
    """Activation quantization of each quantized linear's input.

    bits 16 leaves activations in float (weight-only quantization).
    mode: dynamic_token computes (scale, zero) per token at run time; dynamic_group per group of
    group_size input channels (0: the weights' group size); static_tensor uses one (scale, zero)
    per tensor from calibration data.
    """

    bits: int = 8
    mode: ActivationMode = "dynamic_token"
    group_size: int = 0
    symmetric: bool = False

    def __post_init__(self) -> None:
        _check_choice("activations.bits", self.bits, ACTIVATION_BITS)
        _check_choice("activations.mode", self.mode, ACTIVATION_MODES)
        _check_group_size("activations.group_size", self.group_size)

    @property
    def quantized(self) -> bool:
        return self.bits < 16


@dataclass(frozen=True)
class PTQ4DiTOptions:
    """PTQ4DiT (METHODS.md): channel-wise salience balancing, optionally Spearman-guided over timesteps.

    ssc: weight each timestep's activation salience by softmax(-rho_t) (CSB + SSC); False: CSB
    with saliences over all calibration data.
    """

    ssc: bool = True


@dataclass(frozen=True)
class QDiTOptions:
    """Q-DiT (METHODS.md): per-layer group sizes, e.g. from the evolutionary search.

    group_sizes: (layer name pattern, group size) pairs; the first match sets a layer's group size
    for weights and activations alike; unmatched layers use the spec's weights.group_size.
    """

    group_sizes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class TQDiTOptions:
    """TQ-DiT (METHODS.md): multi-region, time-grouped, Hessian-guided quantization."""

    mrq: bool = True
    time_groups: int = 10
    hessian: bool = True
    quantize_attention: bool = True


@dataclass(frozen=True)
class LayerSpec:
    """The resolved settings of one linear layer (what the passes act on)."""

    weight_bits: int
    weight_group_size: int
    clip_search: bool
    act_bits: int
    act_mode: ActivationMode
    act_group_size: int
    act_symmetric: bool

    @property
    def act_quantized(self) -> bool:
        return self.act_bits < 16


@dataclass(frozen=True)
class QuantSpec:
    """The whole spec. Build it directly, with `from_preset`, or from a preset with `replace`.

    keep_float: (pattern, reason) pairs; a linear whose module path matches a pattern stays in float.
    method: the calibration method ("rtn": round to nearest, no calibration needed).
    """

    weights: WeightSpec = field(default_factory=WeightSpec)
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    keep_float: tuple[tuple[str, str], ...] = DEFAULT_KEEP_FLOAT
    method: str = "rtn"
    name: str = "custom"
    ptq4dit: PTQ4DiTOptions = field(default_factory=PTQ4DiTOptions)
    qdit: QDiTOptions = field(default_factory=QDiTOptions)
    tqdit: TQDiTOptions = field(default_factory=TQDiTOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.weights, WeightSpec):
            raise ValueError(f"weights must be a WeightSpec, got {type(self.weights).__name__}")
        if not isinstance(self.activations, ActivationSpec):
            raise ValueError(f"activations must be an ActivationSpec, got {type(self.activations).__name__}")
        _check_choice("method", self.method, METHODS)
        keep = tuple(
            (entry, "kept in float by the spec") if isinstance(entry, str) else tuple(entry)
            for entry in self.keep_float
        )
        if any(len(entry) != 2 or not all(isinstance(part, str) for part in entry) for entry in keep):
            raise ValueError("keep_float must hold patterns or (pattern, reason) pairs of strings")
        object.__setattr__(self, "keep_float", keep)
        act = self.activations
        if act.mode == "dynamic_group" and act.group_size == 0 and self.weights.group_size == 0:
            raise ValueError(
                "activations.mode='dynamic_group' needs a group size: set activations.group_size "
                "or weights.group_size to a positive integer"
            )
        if act.mode != "dynamic_group" and act.group_size != 0:
            raise ValueError(
                f"activations.group_size={act.group_size} is only used with activations.mode='dynamic_group'"
            )
        if act.quantized and self.weights.group_size and act.mode == "dynamic_group":
            if act.group_size not in (0, self.weights.group_size):
                raise ValueError(
                    f"activations.group_size={act.group_size} must equal weights.group_size="
                    f"{self.weights.group_size}: each group's partial product is one integer dot product"
                )

    @classmethod
    def from_preset(cls, name: str) -> QuantSpec:
        """The named preset; `presets()` lists them."""
        if name not in PRESETS:
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
        """A copy with some fields changed (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    def keep_float_reason(self, layer_name: str) -> str | None:
        """Why the linear at this module path stays in float, or None when it is quantized."""
        for pattern, reason in self.keep_float:
            if fnmatch.fnmatchcase(layer_name, pattern):
                return f"{reason} (matches {pattern!r})"
        return None

    def layer(self, layer_name: str) -> LayerSpec:
        """The settings for one quantized linear."""
        act = self.activations
        act_group = (act.group_size or self.weights.group_size) if act.mode == "dynamic_group" else 0
        return LayerSpec(
            weight_bits=self.weights.bits,
            weight_group_size=self.weights.group_size,
            clip_search=self.weights.clip_search,
            act_bits=act.bits,
            act_mode=act.mode,
            act_group_size=act_group,
            act_symmetric=act.symmetric,
        )

    def to_dict(self) -> dict:
        """A JSON-serialisable form (inverse: `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        data = dict(data)
        data["weights"] = WeightSpec(**data["weights"])
        data["activations"] = ActivationSpec(**data["activations"])
        data["keep_float"] = tuple(tuple(entry) for entry in data["keep_float"])
        data["ptq4dit"] = PTQ4DiTOptions(**data["ptq4dit"])
        data["qdit"] = QDiTOptions(**{**data["qdit"], "group_sizes": tuple(map(tuple, data["qdit"]["group_sizes"]))})
        data["tqdit"] = TQDiTOptions(**data["tqdit"])
        return cls(**data)


def _preset(name: str, w_bits: int, a_bits: int, **weight_kwargs: object) -> QuantSpec:
    return QuantSpec(
        weights=WeightSpec(bits=w_bits, **weight_kwargs),
        activations=ActivationSpec(bits=a_bits),
        name=name,
    )


PRESETS: dict[str, QuantSpec] = {
    spec.name: spec
    for spec in (
        _preset("w8a8", 8, 8),
        _preset("w6a6", 6, 6),
        _preset("w4a8", 4, 8),
        _preset("w8a16", 8, 16),
        _preset("w4a16", 4, 16),
    )
}


def presets() -> list[str]:
    """The names `QuantSpec.from_preset` accepts."""
    return list(PRESETS)
