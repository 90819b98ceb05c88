"""What the TQ-DiT passes share: the records they hand each other through ctx.annotations and the
time groups.

The passes run in this order (dqcompile/methods/tqdit/__init__.py):
    analyze:   find_attention_sites, find_post_gelu_linears, observe_quantized_layers
    calibrate: assign_time_groups, collect_tqdit_statistics, time_group_params, hessian_search,
               write_plans
They only decide; the lowering (dqcompile/passes/lower.py) reads what write_plans puts in the plan.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dqcompile.passes.context import PassContext

# ctx.annotations keys of the TQ-DiT passes.
ATTENTION = "tqdit.attention"  # dict[str, AttentionSite], find_attention_sites
POST_GELU = "tqdit.post_gelu"  # set[str] of layer names, find_post_gelu_linears
GROUPS = "tqdit.groups"  # TimeGroups, assign_time_groups
STATISTICS = "tqdit.statistics"  # TQDiTStatistics, collect_tqdit_statistics
LINEAR_TABLES = "tqdit.linear_tables"  # dict[str, UniformTables | TwoRegionTables], time_group_params
ATTENTION_TABLES = "tqdit.attention_tables"  # dict[str, AttentionTables], time_group_params
# ModelPlan.summary key of the calibration summary (samples, rows, seconds, peak memory, HO errors).
SUMMARY = "tqdit"


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
    """Whether the spec quantizes activations (then statically, per time group: TQ-DiT's check)."""
    return ctx.spec.activations.quantized


def attention_active(ctx: PassContext) -> bool:
    return time_groups_active(ctx) and ctx.spec.options.quantize_attention


def statistics_needed(ctx: PassContext) -> bool:
    """Whether collect_tqdit_statistics runs the graph again (attention scales or HO's rows)."""
    return ctx.spec.options.hessian or attention_active(ctx)


def quantized_sites(ctx: PassContext) -> list[AttentionSite]:
    """The attention sites that run on integer codes."""
    if not attention_active(ctx):
        return []
    return [site for site in ctx.annotations.get(ATTENTION, {}).values() if site.float_reason is None]
