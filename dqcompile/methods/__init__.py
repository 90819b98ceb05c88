"""Calibration methods: each adds its passes to the pipeline at three stages (see MethodPasses).

A method lives in its own module, `dqcompile.methods.<name>`, which defines `PASSES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import GraphModule

from dqcompile.passes.context import PassContext

Pass = Callable[[GraphModule, PassContext], None]


@dataclass(frozen=True)
class MethodPasses:
    """analyze: after annotate_linears, before calibration; may add layers to ctx.observe.
    calibrated: after calibration (ctx.input_stats filled), before weights are quantized: balancing,
        folds, scale searches.
    lowered: after lower_linears: rewrites of the lowered graph (attention matmuls, ...).
    """

    analyze: tuple[Pass, ...] = ()
    calibrated: tuple[Pass, ...] = ()
    lowered: tuple[Pass, ...] = ()


RTN = MethodPasses()


def method_passes(method: str) -> MethodPasses:
    """The passes of a spec's method ("rtn" adds none)."""
    if method == "rtn":
        return RTN
    return importlib.import_module(f"dqcompile.methods.{method}").PASSES
