"""Passes: put input observers on the linears to calibrate, and take them out again.

An observer is a graph node (a call to an `InputObserver` submodule) on the edge into a linear. It
passes its input through unchanged and records per-timestep, per-channel statistics, so the graph
stays runnable during calibration and nothing of it remains after `remove_observers`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from dqcompile.passes.context import META_KEY, ChannelStats, PassContext

OBSERVER_ROOT = "dqcompile_observers"


class InputObserver(nn.Module):
    """Records max |x|, min and max per input channel, keyed by the calibration timestep.

    The calibration runner sets `timestep` before each sample. Non-finite values are refused with
    the layer's name: a NaN would otherwise turn into a NaN scale far from its cause.
    """

    def __init__(self, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.timestep = 0.0
        self.stats: dict[float, ChannelStats] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise ValueError(
                f"non-finite values (NaN or inf) in the input of layer {self.layer_name} during calibration"
            )
        stats = self.stats.get(self.timestep)
        if stats is None:
            stats = self.stats[self.timestep] = ChannelStats.empty(x.shape[-1], x.device)
        stats.update(x)
        return x


def observers(gm: GraphModule) -> list[InputObserver]:
    """The observers currently in the graph module."""
    return [module for module in gm.modules() if isinstance(module, InputObserver)]


def _observer_path(layer_name: str) -> str:
    return f"{OBSERVER_ROOT}.{layer_name.replace('.', '__')}"


def insert_observers(gm: GraphModule, ctx: PassContext, layer_names: set[str]) -> None:
    """Needs: annotate_linears has run. Guarantees: the input of every linear node of the named
    layers flows through that layer's InputObserver (one per layer, shared by its nodes); the
    graph computes what it computed before.
    """
    if not layer_names:
        return
    for node in list(gm.graph.nodes):
        layer = node.meta.get(META_KEY, {}).get("layer")
        if layer not in layer_names or node.op != "call_function":
            continue
        path = _observer_path(layer)
        try:
            gm.get_submodule(path)
        except AttributeError:
            gm.add_submodule(path, InputObserver(layer))
        with gm.graph.inserting_before(node):
            observed = gm.graph.call_module(path, (node.args[0],))
        observed.meta[META_KEY] = {"observer_of": layer}
        node.replace_input_with(node.args[0], observed)
    gm.recompile()


def remove_observers(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: insert_observers (and a calibration run). Guarantees: the statistics are in
    ctx.input_stats (layer -> timestep -> ChannelStats), and no observer node or submodule remains.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith(OBSERVER_ROOT + "."):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for observer in observers(gm):
        ctx.input_stats[observer.layer_name] = observer.stats
    if hasattr(gm, OBSERVER_ROOT):
        delattr(gm, OBSERVER_ROOT)
    gm.recompile()
