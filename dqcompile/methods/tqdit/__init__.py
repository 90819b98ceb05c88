"""TQ-DiT: multi-region (MRQ), time-grouped (TGQ) and Hessian-guided (HO) quantization, with the
attention matmuls on integer codes (docs/methods.md, docs/tqdit.md).

analyze:   find_attention_sites, find_post_gelu_linears, observe_quantized_layers.
calibrate: assign_time_groups, collect_tqdit_statistics (attention statistics; HO's inputs and loss
           gradients), time_group_params (per-group activation parameters, two-region where MRQ
           applies), hessian_search (the Fisher-weighted scale search; rounds the weights it searched),
           write_plans (time-grouped activation plans, attention plans, time boundaries).
"""

from dataclasses import dataclass

from dqcompile.methods import Method, register_method, register_preset
from dqcompile.methods.tqdit.hessian_search import hessian_search
from dqcompile.methods.tqdit.sites import find_attention_sites, find_post_gelu_linears, observe_quantized_layers
from dqcompile.methods.tqdit.statistics import collect_tqdit_statistics
from dqcompile.methods.tqdit.time_groups import assign_time_groups, time_group_params, write_plans
from dqcompile.spec import ActivationSpec, QuantSpec, WeightSpec, check_field_types

# Noise schedules (diffusers beta_schedule names) the Hessian-guided search can rebuild.
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class TQDiTOptions:
    """mrq: two-region quantizers for post-softmax probabilities and post-GELU activations (fc2 inputs).
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
        check_field_types(self, "options.")
        for name in ("time_groups", "hessian_candidates", "hessian_rounds", "hessian_rows", "num_train_timesteps"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"options.{name}={value!r} is not allowed; allowed values: a positive integer")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"options.beta_schedule={self.beta_schedule!r} is not allowed; allowed values: "
                             f"{', '.join(map(repr, BETA_SCHEDULES))}")


def _check(spec: QuantSpec) -> None:
    if spec.activations.quantized and spec.activations.mode != "static_tensor":
        raise ValueError(
            f"method='tqdit' needs activations.mode='static_tensor' (its time groups and multi-region "
            f"quantizers are static parameters), got activations.mode={spec.activations.mode!r}"
        )
    if spec.weights.rounding == "gptq" and spec.options.hessian:
        raise ValueError("method='tqdit' with options.hessian=True rounds the weights by its own search: "
                         "weights.rounding='gptq' would round them twice; choose one")


register_method(Method(
    name="tqdit",
    options=TQDiTOptions,
    analyze=(find_attention_sites, find_post_gelu_linears, observe_quantized_layers),
    calibrate=(assign_time_groups, collect_tqdit_statistics, time_group_params, hessian_search, write_plans),
    check=_check,
    needs_calibration=lambda spec: True,  # time groups and scales come from calibration
    description="TQ-DiT: multi-region, time-grouped, Hessian-guided quantization",
))


def _preset(name: str, w_bits: int, a_bits: int) -> QuantSpec:
    """Per-channel weights, static per-tensor activations in time groups, MRQ, HO, and quantized
    attention matmuls (TQDiTOptions' defaults)."""
    return QuantSpec(weights=WeightSpec(bits=w_bits), activations=ActivationSpec(bits=a_bits, mode="static_tensor"),
                     method="tqdit", name=name)


for _name, _w_bits, _a_bits in (("tqdit-w8a8", 8, 8), ("tqdit-w6a6", 6, 6), ("tqdit-w4a8", 4, 8)):
    register_preset(_preset(_name, _w_bits, _a_bits))

__all__ = ["TQDiTOptions"]
