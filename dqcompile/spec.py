"""The quantization spec: one validated, frozen dataclass tree, with named presets.

A spec says how weights and activations of each linear layer are quantized, which layers stay in
float, and which calibration method computes the parameters. Every field is checked at construction:
a bad value raises ValueError naming the field and the allowed values, so a wrong spec never reaches
the graph passes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

WEIGHT_BITS = (4, 6, 8)
ACTIVATION_BITS = (6, 8, 16)
ACTIVATION_MODES = ("dynamic_token", "dynamic_group", "dynamic_sample_group", "static_tensor")
# Modes that quantize activations in groups of input channels, with the layer's (weights') group size.
GROUP_ACTIVATION_MODES = ("dynamic_group", "dynamic_sample_group")
METHODS = ("rtn", "ptq4dit", "qdit", "tqdit")
WEIGHT_ROUNDINGS = ("rtn", "gptq")
# Noise schedules (diffusers beta_schedule names) TQ-DiT's Hessian-guided search can rebuild.
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
# A fitted group size (QDiTOptions.fit_group_sizes) is a multiple of this: the Triton kernels step
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


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def _check_group_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: 0 (no groups) or a positive integer")


def fit_group_size(group_size: int, width: int) -> int:
    """The largest multiple of GROUP_SIZE_MULTIPLE that divides `width` and is at most `group_size`.

    0 when there is none (a width that is not a multiple of 16). Used where a spec's group size does
    not divide a layer's input width: group 128 on the 192-wide layers of the embedded model gives 96.
    """
    for candidate in range(group_size - group_size % GROUP_SIZE_MULTIPLE, 0, -GROUP_SIZE_MULTIPLE):
        if width % candidate == 0:
            return candidate
    return 0


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
    mode: dynamic_token computes (scale, zero) per token at run time; dynamic_group per token and
    group of group_size input channels (0: the layer's weight group size; Q-DiT's public code);
    dynamic_sample_group per sample and group, over all tokens of the sample (Q-DiT's paper);
    static_tensor uses one (scale, zero) per tensor from calibration data.
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
    balance_out_proj: also balance each attention output projection against its V projection
    (False: only the linears fed by an adaLN-modulated LayerNorm).
    """

    ssc: bool = True
    balance_out_proj: bool = True


@dataclass(frozen=True)
class QDiTOptions:
    """Q-DiT (METHODS.md, docs/qdit.md): per-layer group sizes and the weight rounding.

    group_sizes: (layer name pattern, group size) pairs, fnmatch patterns or exact layer names (a
        searched plan, see QuantSpec.with_group_plan); the first match sets a layer's group size for
        weights and activations alike; unmatched layers use weights.group_size. They apply whatever
        the spec's method.
    fit_group_sizes: where a layer's group size does not divide its input width, use the largest
        multiple of 16 that divides it and is smaller (the report says so) instead of refusing.
    rounding: "rtn" (round to nearest, weights.clip_search applies) or "gptq" (needs calibration;
        method "qdit" only): GPTQ with damping gptq_damping * mean(diag H), column blocks of
        gptq_block_size, and columns in order of decreasing diag(H) when gptq_act_order.
    """

    group_sizes: tuple[tuple[str, int], ...] = ()
    fit_group_sizes: bool = False
    rounding: str = "rtn"
    gptq_damping: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False

    def __post_init__(self) -> None:
        sizes = tuple(tuple(entry) for entry in self.group_sizes)
        for entry in sizes:
            if len(entry) != 2 or not isinstance(entry[0], str):
                raise ValueError(f"qdit.group_sizes entries must be (layer pattern, group size) pairs, got {entry!r}")
            if not isinstance(entry[1], int) or isinstance(entry[1], bool) or entry[1] <= 0:
                raise ValueError(f"qdit.group_sizes: group size of {entry[0]!r} must be a positive integer, got {entry[1]!r}")
        object.__setattr__(self, "group_sizes", sizes)
        _check_choice("qdit.rounding", self.rounding, WEIGHT_ROUNDINGS)
        if not 0 < self.gptq_damping < 1:
            raise ValueError(f"qdit.gptq_damping={self.gptq_damping!r} must be in (0, 1)")
        if not isinstance(self.gptq_block_size, int) or self.gptq_block_size <= 0:
            raise ValueError(f"qdit.gptq_block_size={self.gptq_block_size!r} must be a positive integer")


@dataclass(frozen=True)
class TQDiTOptions:
    """TQ-DiT (METHODS.md, docs/tqdit.md): multi-region, time-grouped, Hessian-guided quantization.

    mrq: two-region quantizers for post-softmax probabilities and post-GELU activations (fc2 inputs).
    time_groups: G; the calibration timesteps are split into G consecutive groups, each with its own
        activation parameters per layer, chosen at run time from the model's timestep input (TGQ).
    hessian: choose weight and activation scales by the output error weighted with a diagonal
        Fisher estimate of the denoising loss (HO).
    quantize_attention: Q K^T and softmax(.) V on integer codes, with per-head scales.
    hessian_candidates: scale multipliers tried per quantizer, evenly spaced over [0.01, 1.2] (the
        public code's range; it tries 100), plus 1.0, so the search never does worse than its start.
    hessian_rounds: alternating weight / activation search rounds.
    hessian_rows: rows (tokens) kept per layer and time group for the search.
    beta_schedule, num_train_timesteps: the model's noise schedule (diffusers' names), which the
        denoising loss of HO needs; "linear" is DiT's, the embedded model uses "squaredcos_cap_v2".
    """

    mrq: bool = True
    time_groups: int = 10
    hessian: bool = True
    quantize_attention: bool = True
    hessian_candidates: int = 50
    hessian_rounds: int = 3
    hessian_rows: int = 512
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        for name in ("time_groups", "hessian_candidates", "hessian_rounds", "hessian_rows", "num_train_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tqdit.{name}={value!r} is not allowed; allowed values: a positive integer")
        _check_choice("tqdit.beta_schedule", self.beta_schedule, BETA_SCHEDULES)


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
    # The spec's group size where it did not divide the layer's width and weight_group_size was fitted
    # to it (QDiTOptions.fit_group_sizes); 0 otherwise.
    fitted_from: int = 0

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
        if not isinstance(self.qdit, QDiTOptions):
            raise ValueError(f"qdit must be a QDiTOptions, got {type(self.qdit).__name__}")
        if self.qdit.rounding == "gptq" and self.method != "qdit":
            raise ValueError(f"qdit.rounding='gptq' needs method='qdit', got method={self.method!r}")
        _check_choice("method", self.method, METHODS)
        if self.method == "tqdit" and self.activations.quantized and self.activations.mode != "static_tensor":
            raise ValueError(
                f"method='tqdit' needs activations.mode='static_tensor' (its time groups and multi-region "
                f"quantizers are static parameters), got activations.mode={self.activations.mode!r}"
            )
        keep = tuple(
            (entry, "kept in float by the spec") if isinstance(entry, str) else tuple(entry)
            for entry in self.keep_float
        )
        if any(len(entry) != 2 or not all(isinstance(part, str) for part in entry) for entry in keep):
            raise ValueError("keep_float must hold patterns or (pattern, reason) pairs of strings")
        object.__setattr__(self, "keep_float", keep)
        act = self.activations
        grouped = act.mode in GROUP_ACTIVATION_MODES
        if grouped and act.group_size == 0 and self.weights.group_size == 0 and not self.qdit.group_sizes:
            raise ValueError(
                f"activations.mode={act.mode!r} needs a group size: set activations.group_size, "
                "weights.group_size or qdit.group_sizes"
            )
        if not grouped and act.group_size != 0:
            raise ValueError(
                f"activations.group_size={act.group_size} is only used with activations.mode in "
                f"{', '.join(map(repr, GROUP_ACTIVATION_MODES))}"
            )
        if act.quantized and grouped and act.group_size and self.qdit.group_sizes:
            raise ValueError(
                f"activations.group_size={act.group_size} must be 0 with qdit.group_sizes: each layer's "
                "activations use that layer's group size"
            )
        if act.quantized and self.weights.group_size and grouped:
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

    @property
    def needs_calibration(self) -> bool:
        """Whether `quantize` needs calibration data for this spec: static activation parameters,
        the calibrated methods (PTQ4DiT's saliences, TQ-DiT's time groups and scale search), or GPTQ's
        Hessians. Round to nearest with dynamic activations needs none."""
        return (
            self.activations.mode == "static_tensor"
            or self.method in ("ptq4dit", "tqdit")
            or self.qdit.rounding == "gptq"
        )

    def keep_float_reason(self, layer_name: str) -> str | None:
        """Why the linear at this module path stays in float, or None when it is quantized."""
        for pattern, reason in self.keep_float:
            if fnmatch.fnmatchcase(layer_name, pattern):
                return f"{reason} (matches {pattern!r})"
        return None

    def group_size(self, layer_name: str) -> int:
        """A layer's group size as the spec states it: the first qdit.group_sizes match, else weights.group_size."""
        for pattern, size in self.qdit.group_sizes:
            if fnmatch.fnmatchcase(layer_name, pattern):
                return size
        return self.weights.group_size

    def layer(self, layer_name: str, in_features: int | None = None) -> LayerSpec:
        """The settings for one quantized linear.

        in_features: the layer's input width; with qdit.fit_group_sizes, a group size that does not
        divide it is fitted (`fit_group_size`). Weights and grouped activations share the group size.
        """
        act = self.activations
        group, fitted_from = self.group_size(layer_name), 0
        if in_features and group and in_features % group and self.qdit.fit_group_sizes:
            fitted = fit_group_size(group, in_features)
            if fitted:
                group, fitted_from = fitted, group
        act_group = (group or act.group_size) if act.mode in GROUP_ACTIVATION_MODES else 0
        return LayerSpec(
            weight_bits=self.weights.bits,
            weight_group_size=group,
            clip_search=self.weights.clip_search,
            act_bits=act.bits,
            act_mode=act.mode,
            act_group_size=act_group,
            act_symmetric=act.symmetric,
            fitted_from=fitted_from,
        )

    def with_group_plan(self, plan: object) -> QuantSpec:
        """A copy whose qdit.group_sizes are a searched plan's (exact layer names), in place of any before.

        plan: a dqcompile.search.GroupPlan, a mapping layer name -> group size, or the path of a plan
        JSON file (GroupPlan.save).
        """
        if isinstance(plan, (str, Path)):
            plan = json.loads(Path(plan).read_text())["group_sizes"]
        sizes = getattr(plan, "group_sizes", plan)
        if not isinstance(sizes, Mapping):
            raise ValueError(f"a group plan must be a GroupPlan, a mapping or a path, got {type(plan).__name__}")
        qdit = dataclasses.replace(self.qdit, group_sizes=tuple(sorted(sizes.items())))
        return self.replace(qdit=qdit)

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


def _qdit_preset(name: str, w_bits: int) -> QuantSpec:
    """Q-DiT: weights in groups of 128 (RTN with clip search), 8-bit activations dynamic per token and
    group (the public code's granularity), group sizes fitted where 128 does not divide a layer's width.
    Apply a searched plan with `QuantSpec.with_group_plan`."""
    return QuantSpec(
        weights=WeightSpec(bits=w_bits, group_size=128, clip_search=True),
        activations=ActivationSpec(bits=8, mode="dynamic_group"),
        method="qdit",
        name=name,
        qdit=QDiTOptions(fit_group_sizes=True),
    )


def _ptq4dit_preset(name: str, w_bits: int, mode: ActivationMode) -> QuantSpec:
    """PTQ4DiT: CSB + SSC balancing folded into the weights, per-channel round-to-nearest weights,
    8-bit activations static per tensor (the paper's) or dynamic per token (the -dyn presets)."""
    return QuantSpec(
        weights=WeightSpec(bits=w_bits),
        activations=ActivationSpec(bits=8, mode=mode),
        method="ptq4dit",
        name=name,
    )


def _tqdit_preset(name: str, w_bits: int, a_bits: int) -> QuantSpec:
    """TQ-DiT: per-channel weights, static per-tensor activations in time groups, MRQ, HO, and
    quantized attention matmuls (TQDiTOptions' defaults)."""
    return QuantSpec(
        weights=WeightSpec(bits=w_bits),
        activations=ActivationSpec(bits=a_bits, mode="static_tensor"),
        method="tqdit",
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
        _qdit_preset("qdit-w4a8", 4),
        _qdit_preset("qdit-w6a8", 6),
        _ptq4dit_preset("ptq4dit-w8a8", 8, "static_tensor"),
        _ptq4dit_preset("ptq4dit-w4a8", 4, "static_tensor"),
        _ptq4dit_preset("ptq4dit-w8a8-dyn", 8, "dynamic_token"),
        _ptq4dit_preset("ptq4dit-w4a8-dyn", 4, "dynamic_token"),
        _tqdit_preset("tqdit-w8a8", 8, 8),
        _tqdit_preset("tqdit-w6a6", 6, 6),
        _tqdit_preset("tqdit-w4a8", 4, 8),
    )
}


def presets() -> list[str]:
    """The names `QuantSpec.from_preset` accepts."""
    return list(PRESETS)
