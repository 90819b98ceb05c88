"""Pass: split the calibration timesteps into TQ-DiT's time groups."""

from __future__ import annotations

from torch.fx import GraphModule

from dqcompile.passes.context import PassContext
from dqcompile.passes.tqdit_common import GROUPS, RECORDED, TimeGroups


def assign_time_groups(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: a calibration run (ctx.input_stats, and the recorded inputs when there are any).
    Acts for method "tqdit", unless restoring.

    Guarantees: ctx.annotations["tqdit.groups"] is TimeGroups.split of every calibration timestep
    into spec.tqdit.time_groups consecutive groups (fewer real ones when fewer timesteps were seen).
    The graph is not changed.
    """
    if ctx.restoring or ctx.spec.method != "tqdit":
        return
    timesteps = {key for stats in ctx.input_stats.values() for key in stats}
    recorded = ctx.annotations.get(RECORDED)
    if recorded is not None:
        timesteps |= {key for key, _ in recorded.calls}
    ctx.annotations[GROUPS] = TimeGroups.split(timesteps, ctx.spec.tqdit.time_groups)
