"""Q-DiT's search space: the searched layers, their group-size choices, and the BitOps cost model.

A configuration (a "genome": one group size g per searched layer, in layer order) costs
B = sum over layers of B_l(g_l) BitOps (`layer_bitops`) and must stay within a budget, by default the
cost of the spec's own group sizes ("uniform 128" for the qdit presets).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch.fx import GraphModule

from dqcompile.capture import Captured
from dqcompile.passes.context import PassContext
from dqcompile.passes.plan_layers import plan_layers
from dqcompile.spec import QuantSpec

# Q-DiT's search space (DiT-XL/2, width 1152); per layer only the sizes that divide its width remain.
DEFAULT_CANDIDATES: tuple[int, ...] = (32, 64, 128, 192, 288)
# BitOps of the epilogue of one group for one output: the zero-point correction acc - x_zero * wsum
# (an int32 multiply-add), the scale product x_scale * w_scale (a float32 multiply) and its
# accumulation into the output (a float32 multiply-add): three 32 x 32-bit operations.
EPILOGUE_BITOPS = 3 * 32 * 32

Genome = tuple[int, ...]


def layer_bitops(in_features: int, out_features: int, rows: int, group_size: int, w_bits: int, a_bits: int) -> int:
    """B_l(g): BitOps of one quantized linear for `rows` input rows (its tokens per sample).

        B_l(g) = rows * N * (K * w_bits * a_bits + (K / g) * EPILOGUE_BITOPS)

    The first term is the integer multiply-accumulates (one w_bits x a_bits product per MAC, the
    BitOps convention); the second is the float epilogue, once per group and output: smaller groups
    cost more. The activations' own quantization (one min/max pass per row) is the same for every g
    and left out.
    """
    return rows * out_features * (in_features * w_bits * a_bits + (in_features // group_size) * EPILOGUE_BITOPS)


@dataclass(frozen=True)
class SearchLayer:
    """One searched layer: its shape, its input rows per sample, its bits and its group-size choices.

    default: the spec's group size for the layer (fitted to its width as the spec says); it is
    always a choice, and the first population starts from the configuration of all defaults.
    """

    name: str
    in_features: int
    out_features: int
    rows: int
    w_bits: int
    a_bits: int
    choices: tuple[int, ...]
    default: int

    def bitops(self, group_size: int) -> int:
        return layer_bitops(self.in_features, self.out_features, self.rows, group_size, self.w_bits, self.a_bits)


@dataclass(frozen=True)
class SearchSpace:
    """The searched layers (in graph order) and the BitOps budget; refuses a budget below the
    cheapest configuration (nothing could fit)."""

    layers: tuple[SearchLayer, ...]
    budget: float

    def __post_init__(self) -> None:
        if self.cheapest() > self.budget:
            raise ValueError(
                f"budget {self.budget:.4g} BitOps is below the cheapest configuration ({self.cheapest():.4g} BitOps)"
            )

    def cost(self, genome: Genome) -> int:
        return sum(layer.bitops(g) for layer, g in zip(self.layers, genome))

    def within_budget(self, genome: Genome) -> bool:
        return self.cost(genome) <= self.budget

    @property
    def seed(self) -> Genome:
        return tuple(layer.default for layer in self.layers)

    def cheapest(self) -> int:
        return sum(min(layer.bitops(g) for g in layer.choices) for layer in self.layers)

    def group_sizes(self, genome: Genome) -> dict[str, int]:
        return {layer.name: g for layer, g in zip(self.layers, genome)}


def _rows_per_sample(gm: GraphModule, node_name: str) -> int:
    """Input rows per sample of a linear node: the product of its output's dims between batch and features."""
    node = next(node for node in gm.graph.nodes if node.name == node_name)
    return math.prod(int(size) for size in node.meta["val"].shape[1:-1])


def search_layers(captured: Captured, spec: QuantSpec, candidates: Sequence[int]) -> list[SearchLayer]:
    gm = copy.deepcopy(captured.graph_module)
    ctx = PassContext(spec=spec, binding=captured.binding, progress=False)
    plan_layers(gm, ctx)
    layers = []
    for plan in ctx.plan.quantized_layers():
        default = plan.weight.group_size
        if default == 0:
            raise ValueError(
                f"layer {plan.name}: the spec {spec.name!r} gives it no group size, so the search has no starting "
                "configuration; search from a grouped spec such as qdit-w4a8"
            )
        choices = sorted({g for g in candidates if plan.in_features % g == 0} | {default})
        layers.append(SearchLayer(
            name=plan.name, in_features=plan.in_features, out_features=plan.out_features,
            rows=_rows_per_sample(gm, plan.node_names[0]), w_bits=plan.weight.bits,
            a_bits=plan.activations.bits, choices=tuple(choices), default=default,
        ))
    if not layers:
        raise ValueError(f"spec {spec.name!r} quantizes no layer of the model: nothing to search")
    return layers


def build_space(captured: Captured, spec: QuantSpec, candidates: Sequence[int], budget: float | None) -> SearchSpace:
    if not candidates or any(not isinstance(g, int) or g <= 0 for g in candidates):
        raise ValueError(f"candidates must be positive integers, got {tuple(candidates)!r}")
    layers = tuple(search_layers(captured, spec, candidates))
    if budget is None:
        budget = sum(layer.bitops(layer.default) for layer in layers)
    return SearchSpace(layers=layers, budget=float(budget))
