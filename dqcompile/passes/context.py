"""What passes share: the spec, the plan of every linear layer, and calibration statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dqcompile.spec import LayerSpec, QuantSpec

META_KEY = "dqcompile"


@dataclass
class LayerPlan:
    """One linear layer of the graph, named by its module path.

    spec is None when the layer stays in float; float_reason then says why.
    node_names: the graph's linear nodes that use this layer's weight (one, unless weights are
    shared, as diffusers DiT shares block 0's timestep embedder with its final layer).
    """

    name: str
    weight_name: str
    bias_name: str | None
    in_features: int
    out_features: int
    spec: LayerSpec | None
    float_reason: str | None = None
    node_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.spec is not None


@dataclass
class ChannelStats:
    """Per input channel statistics of one layer's input at one calibration timestep."""

    absmax: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor
    rows: int = 0

    def update(self, x: torch.Tensor) -> None:
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


@dataclass
class PassContext:
    """State shared by the passes of one quantize() run.

    layers: layer name -> plan, filled by annotate_linears.
    calibration: the calibration samples (keyword inputs of the model), or None.
    input_stats: layer name -> timestep -> statistics of the layer's input, filled by calibration.
    """

    spec: QuantSpec
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    calibration: list[dict[str, Any]] | None = None
    input_stats: dict[str, dict[float, ChannelStats]] = field(default_factory=dict)
    # Layers whose inputs calibration must observe; analysis passes add to it.
    observe: set[str] = field(default_factory=set)
    # Free-form results of method passes (pairs found, balancing vectors, ...), keyed by pass.
    annotations: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    # Rebuilding a saved model: the passes build the graph's structure, and the saved tensors then
    # replace every value, so calibration is skipped and statistics are placeholders.
    restoring: bool = False

    def quantized_layers(self) -> list[LayerPlan]:
        return [plan for plan in self.layers.values() if plan.quantized]
