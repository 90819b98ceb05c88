"""Passes: accumulate each layer's input Hessian H = 2 X^T X / n during calibration, and take the
accumulators out again (for GPTQ).

Kept apart from the generic observers (dqcompile/passes/observers.py), which hold per-channel
statistics for every method: a Hessian is K x K per layer, and only GPTQ needs it. An accumulator is
a graph node (a call to a `HessianAccumulator` submodule) on the edge into a linear; it passes its
input through unchanged, so the graph stays runnable during calibration.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from dqcompile.passes.context import META_KEY, PassContext

HESSIAN_ROOT = "dqcompile_hessians"


class HessianAccumulator(nn.Module):
    """Sums X^T X over every row of the inputs it sees (float64 sum of float32 batch products).

    Non-finite inputs are refused by the InputObserver that calibration puts on the same edge (the
    layer is in ctx.observe), so this module does not check again.
    """

    def __init__(self, layer_name: str, in_features: int) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if self.xtx.device != flat.device:
            self.xtx = self.xtx.to(flat.device)
        self.xtx += (flat.T @ flat).double()
        self.rows += flat.shape[0]
        return x

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, float32 [K, K]; refuses a layer that saw no input."""
        if self.rows == 0:
            raise ValueError(f"layer {self.layer_name}: no calibration input reached it, so it has no Hessian for GPTQ")
        return (2.0 * self.xtx / self.rows).float()


def _accumulator_path(layer_name: str) -> str:
    return f"{HESSIAN_ROOT}.{layer_name.replace('.', '__')}"


def insert_hessian_accumulators(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: annotate_linears. Acts only when spec.qdit.rounding is "gptq" and not ctx.restoring.

    Guarantees: the input of every linear node of every quantized layer flows through that layer's
    HessianAccumulator (one per layer, shared by its nodes), and the layers are in ctx.observe, so
    the pipeline runs calibration through them; the graph computes what it computed before.
    """
    if ctx.spec.qdit.rounding != "gptq" or ctx.restoring:
        return
    plans = {plan.name: plan for plan in ctx.quantized_layers()}
    for node in list(gm.graph.nodes):
        layer = node.meta.get(META_KEY, {}).get("layer")
        if layer not in plans or node.op != "call_function":
            continue
        path = _accumulator_path(layer)
        try:
            gm.get_submodule(path)
        except AttributeError:
            gm.add_submodule(path, HessianAccumulator(layer, plans[layer].in_features))
        with gm.graph.inserting_before(node):
            accumulated = gm.graph.call_module(path, (node.args[0],))
        accumulated.meta[META_KEY] = {"hessian_of": layer}
        node.replace_input_with(node.args[0], accumulated)
    ctx.observe |= set(plans)
    gm.recompile()


def remove_hessian_accumulators(gm: GraphModule) -> dict[str, torch.Tensor]:
    """Take every HessianAccumulator out of the graph; returns layer name -> H (float32 [K, K]).

    Guarantees: no accumulator node or submodule remains (an empty dict when there were none).
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith(HESSIAN_ROOT + "."):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    hessians = {
        module.layer_name: module.hessian() for module in gm.modules() if isinstance(module, HessianAccumulator)
    }
    if hasattr(gm, HESSIAN_ROOT):
        delattr(gm, HESSIAN_ROOT)
    gm.recompile()
    return hessians
