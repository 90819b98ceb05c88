"""The candidate library of Q-DiT's search: every (layer, group size) decided once, models assembled
from those decisions per configuration."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from dqcompile.capture import Captured
from dqcompile.methods.qdit.cost import Genome, SearchSpace
from dqcompile.model import QuantizedModel
from dqcompile.passes import pipeline
from dqcompile.passes.lower import lower
from dqcompile.plan import ModelPlan
from dqcompile.report import QuantReport
from dqcompile.spec import QuantSpec


class CandidateModels:
    """Every (layer, group size) decided once, and a model assembled from them per genome.

    The plan is decided once per distinct group size g over copies of one captured graph, with every
    layer at g where g is one of its choices and at its default otherwise (calibration, GPTQ and
    all). `assemble(genome)` takes each layer's plan from the decision of its group size and lowers a
    fresh copy of the float graph from that mixed plan: nothing is quantized again between
    candidates, and the assembled model equals `quantize(model, spec.with_group_plan(plan))`.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: QuantSpec,
        space: SearchSpace,
        captured: Captured,
        calibration: list[dict[str, Any]] | None,
        progress: bool,
    ) -> None:
        self.layers = space.layers
        self.captured = captured
        self.spec = spec
        values = sorted({g for layer in space.layers for g in layer.choices})
        self.plans: dict[int, ModelPlan] = {}
        for g in tqdm(values, desc="quantize each group size", disable=not progress, leave=False):
            sizes = {layer.name: g if g in layer.choices else layer.default for layer in space.layers}
            gm = copy.deepcopy(captured.graph_module)
            self.plans[g] = pipeline.decide(gm, captured.binding, spec.with_group_plan(sizes), calibration, progress=False)
            if self.plans[g].edits:
                raise ValueError(f"the group-size search needs a method that leaves the float graph as it is; "
                                 f"{spec.method!r} rewrites it")
        self.first = values[0]
        self.model_info = dict(config=getattr(model, "config", None), dtype=next(model.parameters()).dtype,
                               source_class=f"{type(model).__module__}.{type(model).__qualname__}")

    def assemble(self, genome: Genome) -> QuantizedModel:
        """A model with each layer at its group size in `genome`."""
        chosen = dict(zip((layer.name for layer in self.layers), genome))
        base = self.plans[self.first]
        plan = ModelPlan(layers={name: self.plans[chosen[name]].layers[name] if name in chosen else layer
                                 for name, layer in base.layers.items()})
        gm = copy.deepcopy(self.captured.graph_module)
        lower(gm, plan)
        return QuantizedModel(gm, self.captured.binding, spec=self.spec, plan=plan,
                              report=QuantReport(spec_name=f"{self.spec.name} (search candidate)"), **self.model_info)
