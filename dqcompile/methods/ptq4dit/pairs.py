"""The salience-balancing pairs of a graph (PTQ4DiT): adaLN pairs and attention pairs, and the public finder."""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from dqcompile.capture import Captured, ExampleInputs, capture
from dqcompile.methods.ptq4dit.adaln_pairs import AdaLNPair, adaln_pairs
from dqcompile.methods.ptq4dit.attention_pairs import AttentionPair, attention_pairs

BalancePair = AdaLNPair | AttentionPair


def pairs_in_graph(gm: GraphModule) -> list[BalancePair]:
    """Every AdaLNPair of the graph (graph order), then every AttentionPair (graph order)."""
    return [*adaln_pairs(gm), *attention_pairs(gm)]


def find_adaln_pairs(
    model_or_captured: nn.Module | Captured | GraphModule, example_inputs: ExampleInputs | None = None
) -> list[BalancePair]:
    """The salience-balancing pairs of a model: AdaLNPair entries, then AttentionPair entries.

    model_or_captured: a model (captured here with `example_inputs`, by default those that
        dqcompile.example_inputs builds for diffusers DiT / PixArt / SD3), a `Captured`, or a
        captured graph module. The model is not modified.
    """
    if isinstance(model_or_captured, GraphModule):
        gm = model_or_captured
    elif isinstance(model_or_captured, Captured):
        gm = model_or_captured.graph_module
    else:
        if example_inputs is None:
            from dqcompile.example_inputs import default_example_inputs

            example_inputs = default_example_inputs(model_or_captured)
        gm = capture(model_or_captured, example_inputs).graph_module
    return pairs_in_graph(gm)


def balanced_layers(pair: BalancePair) -> tuple[str, ...]:
    """The layers whose inputs a pair's balancing vector divides (and whose columns it multiplies)."""
    return pair.consumers if isinstance(pair, AdaLNPair) else pair.outputs
