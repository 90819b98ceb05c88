"""What the TQ-DiT passes share: the records they hand each other through ctx.annotations, the time
groups, and the graph nodes that pick a time group's parameters at run time.

The passes run in this order (dqcompile/methods/tqdit.py):
    analyze:    annotate_attention, find_post_gelu_linears, record_calibration_inputs
    calibrated: assign_time_groups, collect_tqdit_statistics, time_group_params, hessian_search
    lowered:    lower_mrq_linears, lower_time_groups, quantize_attention
The calibrated passes compute (and skip their work when ctx.restoring); the lowered passes write the
results into buffers, or placeholders of the same shapes when restoring a saved model.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dqcompile.calib.runner import TIMESTEP_ARGUMENTS
from dqcompile.passes.context import META_KEY, PassContext

# ctx.annotations keys of the TQ-DiT passes.
ATTENTION = "tqdit.attention"  # dict[str, AttentionSite], annotate_attention
POST_GELU = "tqdit.post_gelu"  # set[str] of layer names, find_post_gelu_linears
RECORDED = "tqdit.recorded"  # RecordedInputs, record_calibration_inputs
GROUPS = "tqdit.groups"  # TimeGroups, assign_time_groups
STATISTICS = "tqdit.statistics"  # TQDiTStatistics, collect_tqdit_statistics
LINEAR_TABLES = "tqdit.linear_tables"  # dict[str, UniformTables | TwoRegionTables], time_group_params
ATTENTION_TABLES = "tqdit.attention_tables"  # dict[str, AttentionTables], time_group_params
# gm.meta key of the calibration summary (samples, rows, seconds, peak memory, HO errors).
SUMMARY = "tqdit"

BOUNDARIES_BUFFER = "tqdit_time_boundaries"
ATTENTION_ROOT = "tqdit_attention"
_GROUP_INDEX_TAG = "tqdit_time_group_index"


@dataclass(frozen=True)
class AttentionSite:
    """One aten.scaled_dot_product_attention node.

    name: the attention's module path (plus "#i" when one module holds several).
    heads, head_dim: H and d of its [B, H, N, d] operands; scale: the softmax scale it applies.
    float_reason: why it stays in float (a mask, dropout, causal or grouped-query attention), or None.
    """

    name: str
    node_name: str
    heads: int
    head_dim: int
    scale: float
    float_reason: str | None = None


@dataclass
class RecordedInputs:
    """The graph's keyword inputs of every calibration call, with the call's timestep key."""

    calls: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    handle: Any = None  # the forward pre-hook's RemovableHandle


@dataclass(frozen=True)
class TimeGroups:
    """G consecutive groups of the calibration timesteps, and the rule that picks one at run time.

    members: the calibration timesteps of each group, ascending (G tuples). With fewer distinct
        timesteps than G, only the first `real` groups hold their own; the others repeat the last and
        are never selected.
    boundaries: float32 [G - 1]; timestep t falls in group #{boundaries < t} (torch.bucketize). Each
        boundary is the midpoint between the last timestep of a group and the first of the next, and
        +inf past the real groups, so a timestep between calibrated ones goes to the nearer group.
    """

    members: tuple[tuple[float, ...], ...]
    boundaries: Tensor
    real: int

    @classmethod
    def split(cls, timesteps: Iterable[float], groups: int) -> TimeGroups:
        """Split the distinct timesteps into `groups` consecutive groups of near-equal size (earlier
        groups take one more where they cannot all be equal)."""
        distinct = sorted(set(float(t) for t in timesteps))
        if not distinct:
            raise ValueError("time groups need at least one calibration timestep")
        real = min(groups, len(distinct))
        size, extra = divmod(len(distinct), real)
        members, start = [], 0
        for index in range(real):
            stop = start + size + (index < extra)
            members.append(tuple(distinct[start:stop]))
            start = stop
        bounds = [(members[i][-1] + members[i + 1][0]) / 2 for i in range(real - 1)]
        bounds += [float("inf")] * (groups - real)
        members += [members[-1]] * (groups - real)
        return cls(tuple(members), torch.tensor(bounds, dtype=torch.float32), real)

    @property
    def count(self) -> int:
        return len(self.members)

    def index(self, timestep: float) -> int:
        """The group of a timestep: the rule the graph applies at run time."""
        return int(torch.bucketize(torch.tensor([float(timestep)]), self.boundaries)[0])


@dataclass
class UniformTables:
    """Static uniform activation parameters of one linear per time group: scale float32 [G], zero int32 [G]."""

    scale: Tensor
    zero: Tensor


@dataclass
class TwoRegionTables:
    """Post-GELU MRQ steps of one linear per time group: float32 [G] each (negative, positive region)."""

    low_scale: Tensor
    high_scale: Tensor


@dataclass
class AttentionTables:
    """Per time group and head scales of one attention: q, k, v float32 [G, H]; the post-softmax
    MRQ fine step float32 [G], or None for uniform softmax codes."""

    q_scale: Tensor
    k_scale: Tensor
    v_scale: Tensor
    p_low_scale: Tensor | None


@dataclass
class LayerRows:
    """Rows of one linear's input and of the loss gradient at its output, per time group, for HO:
    inputs[g][i] float32 [r, K] and grads[g][i] float32 [r, N] of the same r rows (None where the
    loss's gradient did not reach the output)."""

    inputs: list[list[Tensor]]
    grads: list[list[Tensor | None]]


@dataclass
class AttentionSamples:
    """Per time group: per-head max |.| of Q, K, V (float32 [G, 3, H]) and a few batch rows of them."""

    absmax: Tensor
    q: list[list[Tensor]]
    k: list[list[Tensor]]
    v: list[list[Tensor]]


@dataclass
class TQDiTStatistics:
    """What collect_tqdit_statistics gathered (linears: only with HO)."""

    linears: dict[str, LayerRows] = field(default_factory=dict)
    attention: dict[str, AttentionSamples] = field(default_factory=dict)


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """The peak memory so far in MiB, and what it counts: on CUDA the tensors' peak since the last
    torch.cuda.reset_peak_memory_stats, on the CPU the process's peak resident memory (everything)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "process peak RSS"


def time_groups_active(ctx: PassContext) -> bool:
    """Whether the spec asks for TQ-DiT's static activations (quantized, static per time group)."""
    return ctx.spec.method == "tqdit" and ctx.spec.activations.quantized


def attention_active(ctx: PassContext) -> bool:
    return time_groups_active(ctx) and ctx.spec.tqdit.quantize_attention


def quantized_sites(ctx: PassContext) -> list[AttentionSite]:
    """The attention sites that quantize_attention lowers."""
    if not attention_active(ctx):
        return []
    return [site for site in ctx.annotations.get(ATTENTION, {}).values() if site.float_reason is None]


def graph_device(gm: GraphModule) -> torch.device:
    """Where the graph module's tensors live (its first parameter or buffer; the CPU when it has none)."""
    for tensor in (*gm.parameters(), *gm.buffers()):
        return tensor.device
    return torch.device("cpu")


def tag_new_nodes(nodes: list[Node], like: Node, layer: str | None = None) -> None:
    """Give nodes that replace `like` its module path (and the layer name they belong to)."""
    for node in nodes:
        node.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
        if layer is not None:
            node.meta[META_KEY] = {"layer": layer}


def _timestep_placeholder(gm: GraphModule) -> Node | None:
    """The graph input holding the timestep: the first named as in TIMESTEP_ARGUMENTS, as calibration
    keys its samples."""
    placeholders = {node.target: node for node in gm.graph.nodes if node.op == "placeholder"}
    return next((placeholders[name] for name in TIMESTEP_ARGUMENTS if name in placeholders), None)


def time_group_index(gm: GraphModule, ctx: PassContext) -> Node | None:
    """The node computing each row's time group, int64 [B] (created once, after the placeholders).

    bucketize(float(timestep), boundaries) is a tensor op: torch.compile traces it once for every
    timestep value, where a Python int would specialise the graph on each one. None when the graph
    has no timestep input (see _timestep_placeholder): every call then uses group 0. The boundaries
    are the gm buffer BOUNDARIES_BUFFER (float32 [G - 1], +inf placeholders when restoring).
    """
    for node in gm.graph.nodes:
        if node.meta.get(META_KEY, {}).get(_GROUP_INDEX_TAG):
            return node
    timestep = _timestep_placeholder(gm)
    if timestep is None:
        return None
    groups: TimeGroups | None = ctx.annotations.get(GROUPS)
    boundaries = groups.boundaries if groups is not None else torch.full((ctx.spec.tqdit.time_groups - 1,), torch.inf)
    gm.register_buffer(BOUNDARIES_BUFFER, boundaries.to(graph_device(gm)))
    last_placeholder = [node for node in gm.graph.nodes if node.op == "placeholder"][-1]
    graph = gm.graph
    with graph.inserting_after(last_placeholder):
        flat = graph.call_function(torch.ops.aten.reshape.default, (timestep, [-1]))
    with graph.inserting_after(flat):
        as_float = graph.call_function(torch.ops.aten._to_copy.default, (flat,), {"dtype": torch.float32})
    with graph.inserting_after(as_float):
        bounds = graph.get_attr(BOUNDARIES_BUFFER)
    with graph.inserting_after(bounds):
        index = graph.call_function(torch.ops.aten.bucketize.Tensor, (as_float, bounds))
    index.meta[META_KEY] = {_GROUP_INDEX_TAG: True}
    return index


def _index_timestep(index: Node) -> Node:
    """The timestep placeholder behind a time_group_index node (bucketize <- to float <- reshape)."""
    return index.args[0].args[0].args[0]


def _batch_matches(value: Node, timestep: Node) -> bool:
    """Whether dim 0 of `value` is provably the timestep's batch dim (both from export's shape env)."""
    a, t = value.meta.get("val"), timestep.meta.get("val")
    if a is None or t is None or a.dim() == 0 or t.dim() != 1:
        return False
    return bool(statically_known_true(a.shape[0] == t.shape[0]))


def select_group(gm: GraphModule, table: str, index: Node | None, like: Node, trailing: list[int]) -> Node:
    """Nodes reading buffer `table` ([G, *trailing] or [G]) at each row's time group, shaped
    [B, *trailing, 1, ...] to broadcast against `like` (the activation it scales).

    Per row when `like`'s dim 0 is the timestep's batch dim (rows of one batch may sit at different
    timesteps); otherwise the first row's group serves the whole call; group 0 without a timestep input.
    """
    graph = gm.graph
    ndim = like.meta["val"].dim()
    tail = [*trailing, *[1] * (ndim - 1 - len(trailing))]
    table_node = graph.get_attr(table)
    if index is None:
        picked = graph.call_function(torch.ops.aten.slice.Tensor, (table_node, 0, 0, 1))
        return graph.call_function(torch.ops.aten.view.default, (picked, [1, *tail]))
    if not _batch_matches(like, _index_timestep(index)):
        index = graph.call_function(torch.ops.aten.slice.Tensor, (index, 0, 0, 1))
    picked = graph.call_function(torch.ops.aten.index_select.default, (table_node, 0, index))
    return graph.call_function(torch.ops.aten.view.default, (picked, [-1, *tail]))
