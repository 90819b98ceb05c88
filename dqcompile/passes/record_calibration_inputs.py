"""Pass: keep the graph's inputs of every calibration call, for the TQ-DiT passes that run the graph again."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.fx import GraphModule

from dqcompile.calib.runner import timestep_key
from dqcompile.passes.context import PassContext
from dqcompile.passes.tqdit_common import RECORDED, RecordedInputs, attention_active


def record_calibration_inputs(gm: GraphModule, ctx: PassContext) -> None:
    """Needs: annotate_linears. Acts for method "tqdit" with attention quantization or HO, unless restoring.

    Guarantees: a forward pre-hook on gm appends (timestep key, keyword inputs) of every call to
    ctx.annotations["tqdit.recorded"] (RecordedInputs, whose `handle` removes the hook:
    collect_tqdit_statistics does). The inputs are the calibration runner's, already bound to the
    graph's arguments, so a later pass can call gm(**inputs) without knowing the model's signature;
    they are references, not copies. The quantized layers are in ctx.observe, so calibration runs.
    The graph is not changed.
    """
    options = ctx.spec.tqdit
    if ctx.restoring or ctx.spec.method != "tqdit" or not (options.hessian or attention_active(ctx)):
        return
    recorded = RecordedInputs()

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if args:
            raise ValueError("TQ-DiT calibration records keyword inputs; the graph was called with positional ones")
        recorded.calls.append((timestep_key(kwargs), dict(kwargs)))

    recorded.handle = gm.register_forward_pre_hook(record, with_kwargs=True)
    ctx.annotations[RECORDED] = recorded
    ctx.observe |= {plan.name for plan in ctx.quantized_layers()}
