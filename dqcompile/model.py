"""The drop-in quantized model that quantize() returns."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.fx import GraphModule

from dqcompile.capture import CallBinding
from dqcompile.passes.retarget_device import retarget_device
from dqcompile.plan import ModelPlan
from dqcompile.report import QuantReport
from dqcompile.spec import QuantSpec


class QuantizedModel(nn.Module):
    """A quantized model with the call signature and output type of the model it came from.

    It runs the lowered graph (`graph_module`), whose quantized linears are dqcompile integer ops.
    `.plan` holds every decision (per layer and attention), `.report` the per-layer summary.
    `.config` is the source model's config (diffusers pipelines read it); `.dtype` is the float
    dtype it computes in, fixed at quantization; `.to(device)` moves it, `.to(dtype)` is refused.
    """

    def __init__(
        self,
        graph_module: GraphModule,
        binding: CallBinding,
        *,
        spec: QuantSpec,
        plan: ModelPlan,
        report: QuantReport,
        config: Any = None,
        dtype: torch.dtype = torch.float32,
        source_class: str = "",
        example_inputs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.binding = binding
        self.spec = spec
        self.plan = plan
        self.report = report
        self.example_inputs = example_inputs
        self.config = config
        self.source_class = source_class
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        for tensor in self.graph_module.buffers():
            return tensor.device
        return torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs, return_dict = self.binding.graph_kwargs(args, kwargs)
        return self.binding.wrap_output(self.graph_module(**inputs), return_dict)

    def train(self, mode: bool = True) -> QuantizedModel:
        """Sets the flag only: the graph was captured in eval mode (no dropout, no label drop), and an
        exported graph module cannot switch modes."""
        self.training = mode
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedModel:
        probe = fn(torch.empty(0, dtype=self._dtype))
        if probe.dtype != self._dtype:
            raise TypeError(
                f"a quantized model keeps the dtype it was quantized in ({self._dtype}); quantize the model "
                f"after model.to({probe.dtype}) instead"
            )
        super()._apply(fn, recurse)
        retarget_device(self.graph_module, self.device)
        return self

    def extra_repr(self) -> str:
        return f"source={self.source_class}, spec={self.spec.name}, dtype={self._dtype}"
