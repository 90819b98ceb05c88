"""What the deciding passes of one quantize() run share: the spec, the plan they fill, calibration data
and what calibration recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dqcompile.calib.probes import ChannelStats, Probe
from dqcompile.capture import CallBinding
from dqcompile.plan import ModelPlan
from dqcompile.spec import QuantSpec

# node.meta key under which dqcompile annotates graph nodes (the layer a linear belongs to, the plan
# a lowered node was emitted from).
META_KEY = "dqcompile"


@dataclass
class PassContext:
    """State shared by the passes that decide a plan.

    plan: filled by plan_layers, then by the method passes and the generic finishing passes.
    calibration: the calibration samples (keyword inputs of the model), or None.
    observe: layers whose input statistics the calibration run records (analysis passes add to it).
    probes: further instruments for the calibration run (Hessian accumulators, ...).
    input_stats: layer name -> timestep -> statistics of the layer's input, after calibration.
    hessians: layer name -> H = 2 X^T X / n of its input, after calibration (GPTQ's layers).
    annotations: hand-offs between the passes of one method, keyed by the method's own names.
    """

    spec: QuantSpec
    binding: CallBinding
    plan: ModelPlan = field(default_factory=ModelPlan)
    calibration: list[dict[str, Any]] | None = None
    progress: bool = True
    observe: set[str] = field(default_factory=set)
    probes: list[Probe] = field(default_factory=list)
    input_stats: dict[str, dict[float, ChannelStats]] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)

    def require_calibration(self, what: str) -> list[dict[str, Any]]:
        """The calibration samples, or a ValueError saying that `what` needs them."""
        if not self.calibration:
            raise ValueError(
                f"spec {self.spec.name!r} needs calibration data ({what}): pass calibration=... "
                "(see dqcompile.calibration_set)"
            )
        return self.calibration
