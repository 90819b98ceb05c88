"""Calibration methods: a registry of what each method adds to the one pipeline.

A method is a package `dqcompile/methods/<name>/` that owns its options, its passes and its presets,
and registers them here with one call:

    register_method(Method(name="mine", options=MyOptions, analyze=(...,), calibrate=(...,)))
    register_preset(QuantSpec(..., method="mine", name="mine-w8a8"))

Its passes only decide: they fill the plan (dqcompile.plan) in. They never lower: the one lowering
pass (dqcompile.passes.lower) emits every layer's ops from its plan. The pipeline
(dqcompile.passes.pipeline) runs, in order:
    plan_layers -> method.analyze -> calibration run (probes) -> method.calibrate
    -> generic finishing (GPTQ, static activation parameters, round to nearest) -> lower

The spec reaches a method through this registry: QuantSpec validates `method` and `options` with it,
`needs_calibration` asks it, and `QuantSpec.from_dict` rebuilds its options class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.fx import GraphModule

if TYPE_CHECKING:
    from dqcompile.passes.context import PassContext
    from dqcompile.spec import QuantSpec

Pass = Callable[[GraphModule, "PassContext"], None]


def _no_check(spec: QuantSpec) -> None:
    return None


def _never(spec: QuantSpec) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """What a method adds to the pipeline.

    options: the frozen dataclass of its options (QuantSpec.options holds an instance; its fields
        are type-checked like the rest of the spec), or None for a method without options.
    analyze: passes run after plan_layers, before calibration: they find structure and ask the
        calibration run for what they need (ctx.observe, ctx.probes).
    calibrate: passes run after the calibration run: they fill plans in (balance and fold, round
        weights, compute activation parameters, search scales).
    check: refuses a spec the method cannot take (ValueError naming the field).
    needs_calibration: whether a spec with this method needs calibration data.
    """

    name: str
    options: type | None = None
    analyze: tuple[Pass, ...] = ()
    calibrate: tuple[Pass, ...] = ()
    check: Callable[[QuantSpec], None] = _no_check
    needs_calibration: Callable[[QuantSpec], bool] = _never
    description: str = ""


METHODS: dict[str, Method] = {}
PRESETS: dict[str, QuantSpec] = {}


def register_method(method: Method) -> Method:
    """Make `method` available as QuantSpec(method=method.name); a name is registered once."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def register_preset(spec: QuantSpec) -> QuantSpec:
    """Make `spec` available as QuantSpec.from_preset(spec.name) (and as a preset name string)."""
    if spec.name in PRESETS and PRESETS[spec.name] != spec:
        raise ValueError(f"a preset named {spec.name!r} is already registered")
    PRESETS[spec.name] = spec
    return spec


def get_method(name: Any) -> Method:
    """The registered method called `name`; ValueError listing the registered ones otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method={name!r} is not allowed; allowed values: {', '.join(map(repr, METHODS))}")
    return METHODS[name]


# Round to nearest: no pass of its own; the generic passes round weights and set activation
# parameters. Registered here, with the plain presets, because every other method builds on it.
register_method(Method(name="rtn", description="round to nearest"))

# The built-in methods register themselves (and their presets) on import.
from dqcompile.methods import rtn, qdit, ptq4dit, tqdit  # noqa: E402,F401
from dqcompile.methods import auto  # noqa: E402,F401  (recommended presets: candidates, built on the others)
