"""Probes: the one way dqcompile instruments a graph for calibration.

A probe watches one graph node. The calibration runner (dqcompile.calib.runner) executes the graph
node by node and, after each node a probe watches, calls the probe with the node's evaluated
arguments and its result. Nothing is inserted into the graph, so the graph that is calibrated is the
graph that is lowered. Every method records what it needs through probes: per-channel statistics of
a linear's input (InputStatistics), input Hessians (HessianAccumulator), and its own (TQ-DiT's
attention statistics and loss gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class CalibrationCall:
    """Which calibration call a probe sees: its index and its timestep key (see runner.timestep_key)."""

    index: int
    timestep: float


class Probe(Protocol):
    """Called after node `node_name` runs, with its evaluated positional arguments and its result."""

    node_name: str

    def __call__(self, call: CalibrationCall, args: tuple, result: Any) -> None: ...


@dataclass
class ChannelStats:
    """Per input channel statistics of one layer's input at one calibration timestep."""

    absmax: Tensor
    minimum: Tensor
    maximum: Tensor
    rows: int = 0

    def update(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.absmax = torch.maximum(self.absmax, flat.abs().amax(0))
        self.minimum = torch.minimum(self.minimum, flat.amin(0))
        self.maximum = torch.maximum(self.maximum, flat.amax(0))
        self.rows += flat.shape[0]

    @classmethod
    def empty(cls, channels: int, device: torch.device) -> ChannelStats:
        return cls(
            absmax=torch.zeros(channels, device=device),
            minimum=torch.full((channels,), torch.inf, device=device),
            maximum=torch.full((channels,), -torch.inf, device=device),
        )

    def scaled(self, divisor: Tensor) -> ChannelStats:
        """The statistics of x / divisor (a positive per-channel vector keeps min and max in place)."""
        return ChannelStats(absmax=self.absmax / divisor.to(self.absmax), minimum=self.minimum / divisor.to(self.minimum),
                            maximum=self.maximum / divisor.to(self.maximum), rows=self.rows)


@dataclass
class InputStatistics:
    """Per-timestep ChannelStats of the input of a linear node (shared by the nodes of one layer).

    Non-finite inputs are refused with the layer's name: a NaN would otherwise turn into a NaN scale
    far from its cause.
    """

    node_name: str
    layer: str
    stats: dict[float, ChannelStats] = field(default_factory=dict)

    def __call__(self, call: CalibrationCall, args: tuple, result: Any) -> None:
        x = args[0]
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite values (NaN or inf) in the input of layer {self.layer} during calibration")
        stats = self.stats.get(call.timestep)
        if stats is None:
            stats = self.stats[call.timestep] = ChannelStats.empty(x.shape[-1], x.device)
        stats.update(x)


@dataclass
class HessianAccumulator:
    """Sums X^T X over every row of a linear node's input (float64 sum of float32 batch products),
    for GPTQ: H = 2 X^T X / n. The nodes of one layer share one accumulator's sums."""

    node_name: str
    layer: str
    sums: dict[str, Any]  # {"xtx": Tensor or None, "rows": int}, shared by the layer's nodes

    def __call__(self, call: CalibrationCall, args: tuple, result: Any) -> None:
        flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        product = (flat.T @ flat).double()
        self.sums["xtx"] = product if self.sums["xtx"] is None else self.sums["xtx"] + product
        self.sums["rows"] += flat.shape[0]

    def hessian(self) -> Tensor:
        """H = 2 X^T X / n, float32 [K, K]; refuses a layer that saw no input."""
        if not self.sums["rows"]:
            raise ValueError(f"layer {self.layer}: no calibration input reached it, so it has no Hessian for GPTQ")
        return (2.0 * self.sums["xtx"] / self.sums["rows"]).float()
