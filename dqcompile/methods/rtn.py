"""The plain presets: round-to-nearest weights, dynamic per-token activations (or float ones).

Method "rtn" itself is registered in dqcompile/methods/__init__.py: it adds no pass.
"""

from dqcompile.methods import register_preset
from dqcompile.spec import ActivationSpec, QuantSpec, WeightSpec


def _preset(name: str, w_bits: int, a_bits: int) -> QuantSpec:
    return QuantSpec(weights=WeightSpec(bits=w_bits), activations=ActivationSpec(bits=a_bits), name=name)


for _name, _w_bits, _a_bits in (("w8a8", 8, 8), ("w6a6", 6, 6), ("w4a8", 4, 8), ("w8a16", 8, 16), ("w4a16", 4, 16)):
    register_preset(_preset(_name, _w_bits, _a_bits))
