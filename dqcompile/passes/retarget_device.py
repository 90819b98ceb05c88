"""Pass: point the device arguments that capture baked into graph nodes at another device."""

from __future__ import annotations

import torch
from torch.fx import GraphModule


def retarget_device(gm: GraphModule, device: torch.device) -> None:
    """Needs: any graph. Guarantees: every node's `device=` keyword names `device`.

    torch.export records the device of tensors the forward creates (torch.arange for timestep
    embeddings, torch.ones for masks); moving the parameters alone would leave those on the old one.
    """
    changed = False
    for node in gm.graph.nodes:
        current = node.kwargs.get("device")
        if current is not None and torch.device(current) != device:
            node.update_kwarg("device", device)
            changed = True
    if changed:
        gm.recompile()
