"""PTQ4DiT: channel-wise salience balancing (CSB), optionally guided by the Spearman correlation over
timesteps (SSC), folded into the weights before they are rounded (docs/methods.md, docs/ptq4dit.md).

analyze:   find_balance_pairs: the adaLN-modulated LayerNorm -> linear pairs and the V -> output
           projection pairs; the balanced layers' inputs are observed during calibration.
calibrate: salience_balance (one vector per pair, CSB or CSB + SSC), then fold_balancing, then
           (options.reconstruction.enabled) reconstruct_blocks: BRECQ-style block output matching with
           AdaRound-style learned rounding of the balanced weights (reconstruct.py).
"""

from dataclasses import dataclass, field

from dqcompile.methods import Method, register_method, register_preset
from dqcompile.methods.ptq4dit.adaln_pairs import AdaLNPair
from dqcompile.methods.ptq4dit.attention_pairs import AttentionPair
from dqcompile.methods.ptq4dit.balance import find_balance_pairs, salience_balance
from dqcompile.methods.ptq4dit.fold import fold_balancing
from dqcompile.methods.ptq4dit.pairs import BalancePair, balanced_layers, find_adaln_pairs, pairs_in_graph
from dqcompile.methods.ptq4dit.reconstruct import ReconstructionOptions, reconstruct_blocks
from dqcompile.spec import ActivationMode, ActivationSpec, QuantSpec, WeightSpec, check_field_types


@dataclass(frozen=True)
class PTQ4DiTOptions:
    """ssc: weight each timestep's activation salience by softmax(-rho_t) (CSB + SSC); False: CSB
    with saliences over all calibration data.
    balance_out_proj: also balance each attention output projection against its V projection
    (False: only the linears fed by an adaLN-modulated LayerNorm).
    balance: False skips the balancing altogether (reconstruction alone, for ablations and presets).
    reconstruction: block reconstruction of the (balanced) weights, off unless enabled
    (ReconstructionOptions: iterations, learning rate, batch, ...).
    """

    ssc: bool = True
    balance_out_proj: bool = True
    balance: bool = True
    reconstruction: ReconstructionOptions = field(default_factory=ReconstructionOptions)

    def __post_init__(self) -> None:
        check_field_types(self, "options.")


def _check(spec: QuantSpec) -> None:
    if spec.options.reconstruction.enabled and spec.weights.rounding == "gptq":
        raise ValueError("method='ptq4dit' with options.reconstruction.enabled=True rounds the weights by block "
                         "reconstruction: weights.rounding='gptq' would round them twice; choose one")


def balance_and_fold(gm, ctx) -> None:
    """salience_balance then fold_balancing; nothing with options.balance False (reconstruction alone)."""
    if ctx.spec.options.balance:
        salience_balance(gm, ctx)
        fold_balancing(gm, ctx)


register_method(Method(
    name="ptq4dit",
    options=PTQ4DiTOptions,
    analyze=(find_balance_pairs,),
    calibrate=(balance_and_fold, reconstruct_blocks),
    check=_check,
    needs_calibration=lambda spec: True,  # the saliences come from calibration statistics
    description="PTQ4DiT salience balancing (CSB/SSC), folded offline",
))


def _preset(name: str, w_bits: int, mode: ActivationMode) -> QuantSpec:
    """Per-channel round-to-nearest weights, 8-bit activations static per tensor (the paper's) or
    dynamic per token (the -dyn presets)."""
    return QuantSpec(weights=WeightSpec(bits=w_bits), activations=ActivationSpec(bits=8, mode=mode),
                     method="ptq4dit", name=name)


for _name, _bits, _mode in (("ptq4dit-w8a8", 8, "static_tensor"), ("ptq4dit-w4a8", 4, "static_tensor"),
                            ("ptq4dit-w8a8-dyn", 8, "dynamic_token"), ("ptq4dit-w4a8-dyn", 4, "dynamic_token")):
    register_preset(_preset(_name, _bits, _mode))

__all__ = ["AdaLNPair", "AttentionPair", "BalancePair", "PTQ4DiTOptions", "ReconstructionOptions", "balanced_layers",
           "find_adaln_pairs", "pairs_in_graph"]
