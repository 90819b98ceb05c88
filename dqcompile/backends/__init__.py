"""Kernel backends of the dqcompile ops, and the op registration.

Importing this package registers ``torch.ops.dqcompile.*`` (``ops.py``), whose implementation is the
reference backend. Alternative implementations of the same ops live in a ``KernelSet`` registered under a
name: ``"reference"`` is always available; ``"triton"`` registers itself (``register_kernels``) when
``dqcompile.backends.triton`` is imported, which ``get_backend("triton")`` does on first use.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from dqcompile.backends import ops as _ops  # noqa: F401  (import registers torch.ops.dqcompile.*)
from dqcompile.backends import reference


@dataclass(frozen=True)
class KernelSet:
    """One implementation of every dqcompile op, each with the op's signature (see ``reference.py``)."""

    quantize_act: Callable[..., tuple[Tensor, Tensor, Tensor]]
    ln_modulate_quantize: Callable[..., tuple[Tensor, Tensor, Tensor]]
    quantize_act_static: Callable[..., Tensor]
    int_linear: Callable[..., Tensor]
    weight_only_linear: Callable[..., Tensor]
    int_matmul: Callable[..., Tensor]


KERNELS: dict[str, KernelSet] = {
    "reference": KernelSet(
        quantize_act=reference.quantize_act,
        ln_modulate_quantize=reference.ln_modulate_quantize,
        quantize_act_static=reference.quantize_act_static,
        int_linear=reference.int_linear,
        weight_only_linear=reference.weight_only_linear,
        int_matmul=reference.int_matmul,
    )
}

# Backends that register themselves when their module is imported.
_BACKEND_MODULES = {"triton": "dqcompile.backends.triton"}


def register_kernels(name: str, kernels: KernelSet) -> None:
    """Make ``kernels`` available as ``get_backend(name)``; "reference" cannot be replaced."""
    if name == "reference":
        raise ValueError("the 'reference' backend is the specification and cannot be replaced")
    KERNELS[name] = kernels


def get_backend(name: str) -> KernelSet:
    """The kernels registered under ``name`` ("reference", or "triton" once importable)."""
    if name not in KERNELS and name in _BACKEND_MODULES:
        importlib.import_module(_BACKEND_MODULES[name])
    if name not in KERNELS:
        known = sorted(set(KERNELS) | set(_BACKEND_MODULES))
        raise ValueError(f"kernel backend {name!r} is not available; known backends: {', '.join(known)} "
                         f"(registered now: {', '.join(sorted(KERNELS))})")
    return KERNELS[name]


__all__ = ["KERNELS", "KernelSet", "get_backend", "register_kernels"]
