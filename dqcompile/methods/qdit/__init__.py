"""Q-DiT: group quantization with per-layer group sizes found by an evolutionary search, dynamic
activations per token and group (or per sample and group), and RTN-with-clipping or GPTQ weight
rounding (docs/methods.md, docs/qdit.md).

Most of Q-DiT is the spec and the generic passes: per-layer group sizes (QuantSpec.group_sizes, a
searched plan through `QuantSpec.with_group_plan`), the per-group integer linear, dynamic group
activations computed at every call (no per-timestep table exists), and GPTQ (WeightSpec.rounding,
a generic weight rounding). What the method adds is the search over group sizes
(`search_group_sizes`), which takes its fitness function as an argument.
"""

from dqcompile.methods import Method, register_method, register_preset
from dqcompile.methods.qdit.cost import DEFAULT_CANDIDATES, SearchLayer, SearchSpace, layer_bitops
from dqcompile.methods.qdit.search import GroupPlan, search_group_sizes, search_space
from dqcompile.spec import ActivationSpec, QuantSpec, WeightSpec

register_method(Method(name="qdit", description="Q-DiT: searched per-layer group sizes, dynamic group activations"))


def _preset(name: str, w_bits: int) -> QuantSpec:
    """Weights in groups of 128 (RTN with clip search), 8-bit activations dynamic per token and group
    (the public code's granularity), group sizes fitted where 128 does not divide a layer's width.
    Apply a searched plan with `QuantSpec.with_group_plan`."""
    return QuantSpec(
        weights=WeightSpec(bits=w_bits, group_size=128, clip_search=True),
        activations=ActivationSpec(bits=8, mode="dynamic_group"),
        fit_group_sizes=True,
        method="qdit",
        name=name,
    )


register_preset(_preset("qdit-w4a8", 4))
register_preset(_preset("qdit-w6a8", 6))

__all__ = ["DEFAULT_CANDIDATES", "GroupPlan", "SearchLayer", "SearchSpace", "layer_bitops", "search_group_sizes",
           "search_space"]
