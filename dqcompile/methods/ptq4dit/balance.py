"""PTQ4DiT's balancing vectors, by channel-wise salience balancing (CSB) and, optionally,
Spearman-guided salience calibration over timesteps (SSC); docs/methods.md gives the derivation:

    s(X_j) = max over tokens |X[:, j]|            (activation salience of input channel j)
    s(W_j) = max over output rows |W[:, j]|       (weight salience)
    b_j    = sqrt(s(X_j) / s(W_j))                (X' = X / b and W' = W b both get salience sqrt(s(X_j) s(W_j)))
    SSC:   rho_t = Spearman(s(X^(t)), s(W)) per calibration timestep t, eta = softmax(-rho),
           s(X_j) := sum_t eta_t s(X_j^(t))

Where several linears read the same tensor (q, k, v of one LayerNorm output; SD3's two output
projections), they share one vector, computed from their weights side by side: s(W_j) is the max
over all their rows, and s(X^(t)) the elementwise max of the statistics of their inputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from scipy.stats import ConstantInputWarning, spearmanr
from torch.fx import GraphModule

from dqcompile.calib.probes import ChannelStats
from dqcompile.methods.ptq4dit.pairs import AdaLNPair, AttentionPair, BalancePair, balanced_layers, pairs_in_graph
from dqcompile.passes.context import PassContext

# ctx.annotations keys of the PTQ4DiT passes.
PAIRS = "ptq4dit.pairs"  # list[BalancePair], find_balance_pairs
BALANCES = "ptq4dit.balances"  # dict[str, Balance] by pair_key, salience_balance


@dataclass
class Balance:
    """The balancing of one pair: divide the shared input by `vector`, multiply the weight columns by it.

    vector: float32 [channels], positive.
    rho, eta: per calibration timestep, the Spearman correlation and the SSC weight (empty for CSB only).
    """

    vector: torch.Tensor
    rho: dict[float, float]
    eta: dict[float, float]


def pair_key(pair: BalancePair) -> str:
    """The graph node that names a pair (its modulated output, or its attention)."""
    return pair.output if isinstance(pair, AdaLNPair) else pair.attention


def weight_salience(weights: list[torch.Tensor]) -> torch.Tensor:
    """s(W_j) of linears that share their input: max |W[:, j]| over the rows of all of them."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def activation_salience(stats: list[dict[float, ChannelStats]]) -> dict[float, torch.Tensor]:
    """s(X^(t)) per timestep of a shared input, from the statistics its readers recorded."""
    timesteps = sorted(set().union(*(per_layer.keys() for per_layer in stats)))
    return {
        t: torch.stack([per_layer[t].absmax for per_layer in stats if t in per_layer]).amax(dim=0)
        for t in timesteps
    }


def spearman_weights(
    salience_per_t: dict[float, torch.Tensor], w_salience: torch.Tensor
) -> tuple[dict[float, float], dict[float, float]]:
    """rho_t = Spearman(s(X^(t)), s(W)) (scipy.stats.spearmanr) and eta = softmax(-rho) over timesteps.

    A timestep whose salience is constant over channels has no ranking: its rho counts as 0.
    """
    rho = {}
    for t, salience in salience_per_t.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)  # handled: rho 0
            value = spearmanr(salience.cpu().double().numpy(), w_salience.cpu().double().numpy()).statistic
        rho[t] = 0.0 if math.isnan(value) else float(value)
    logits = torch.tensor([-r for r in rho.values()], dtype=torch.float64)
    eta = dict(zip(rho, torch.softmax(logits, dim=0).tolist()))
    return rho, eta


def balancing_vector(x_salience: torch.Tensor, w_salience: torch.Tensor) -> torch.Tensor:
    """b = sqrt(s(X) / s(W)); channels with no activation or weight (a zero salience) keep b = 1."""
    x, w = x_salience.double(), w_salience.double().to(x_salience.device)
    vector = torch.where((x > 0) & (w > 0), (x / w).sqrt(), torch.ones_like(x))
    return vector.float()


def find_balance_pairs(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: plan_layers. Guarantees: ctx.annotations[PAIRS] lists the pairs to balance: every
    AdaLNPair with a quantized consumer, and (options.balance_out_proj) every AttentionPair with a
    quantized output projection; their balanced layers are in ctx.observe, so that calibration
    records their inputs per timestep. With options.balance False, no pair (nothing is balanced).
    The graph is not changed.
    """
    chosen: list[BalancePair] = []
    layers = ctx.plan.layers
    for pair in pairs_in_graph(gm) if ctx.spec.options.balance else ():
        if isinstance(pair, AttentionPair) and not ctx.spec.options.balance_out_proj:
            continue
        balanced = balanced_layers(pair)
        if any(name in layers and layers[name].quantized for name in balanced):
            chosen.append(pair)
            ctx.observe |= set(balanced)
    ctx.annotations[PAIRS] = chosen


def salience_balance(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: find_balance_pairs and a calibration run (ctx.input_stats, per timestep, of every
    balanced layer).

    Guarantees: ctx.annotations[BALANCES][pair_key(pair)] is each pair's Balance, computed with
    CSB + SSC (options.ssc) or CSB alone (saliences over all calibration data). Neither the graph
    nor any parameter is changed.
    """
    results: dict[str, Balance] = {}
    for pair in ctx.annotations[PAIRS]:
        layers = balanced_layers(pair)
        w_salience = weight_salience([gm.get_parameter(ctx.plan.layers[name].weight_name) for name in layers])
        missing = [name for name in layers if not ctx.input_stats.get(name)]
        if missing:
            raise ValueError(f"PTQ4DiT balancing of {', '.join(layers)} needs calibration statistics of {missing[0]}")
        per_t = activation_salience([ctx.input_stats[name] for name in layers])
        if ctx.spec.options.ssc:
            rho, eta = spearman_weights(per_t, w_salience)
            x_salience = sum(eta[t] * salience for t, salience in per_t.items())
        else:
            rho, eta = {}, {}
            x_salience = torch.stack(list(per_t.values())).amax(dim=0)
        results[pair_key(pair)] = Balance(balancing_vector(x_salience, w_salience), rho, eta)
    ctx.annotations[BALANCES] = results
