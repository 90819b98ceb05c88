"""PTQ4DiT: channel-wise salience balancing (CSB), optionally guided by the Spearman correlation over
timesteps (SSC), folded into the weights before they are rounded (docs/methods.md, docs/ptq4dit.md).

analyze:   find_balance_pairs: the adaLN-modulated LayerNorm -> linear pairs and the V -> output
           projection pairs; the balanced layers' inputs are observed during calibration.
calibrate: salience_balance (one vector per pair, CSB or CSB + SSC), then fold_balancing.
"""

from dataclasses import dataclass

from dqcompile.methods import Method, register_method, register_preset
from dqcompile.methods.ptq4dit.adaln_pairs import AdaLNPair
from dqcompile.methods.ptq4dit.attention_pairs import AttentionPair
from dqcompile.methods.ptq4dit.balance import find_balance_pairs, salience_balance
from dqcompile.methods.ptq4dit.fold import fold_balancing
from dqcompile.methods.ptq4dit.pairs import BalancePair, balanced_layers, find_adaln_pairs, pairs_in_graph
from dqcompile.spec import ActivationMode, ActivationSpec, QuantSpec, WeightSpec, check_field_types


@dataclass(frozen=True)
class PTQ4DiTOptions:
    """ssc: weight each timestep's activation salience by softmax(-rho_t) (CSB + SSC); False: CSB
    with saliences over all calibration data.
    balance_out_proj: also balance each attention output projection against its V projection
    (False: only the linears fed by an adaLN-modulated LayerNorm).
    """

    ssc: bool = True
    balance_out_proj: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "options.")


register_method(Method(
    name="ptq4dit",
    options=PTQ4DiTOptions,
    analyze=(find_balance_pairs,),
    calibrate=(salience_balance, fold_balancing),
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

__all__ = ["AdaLNPair", "AttentionPair", "BalancePair", "PTQ4DiTOptions", "balanced_layers", "find_adaln_pairs",
           "pairs_in_graph"]
