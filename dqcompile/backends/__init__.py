"""Kernel backends of the dqcompile ops.

``ops.py`` holds the op table (`OP_TABLE`): every op declared once, with its schema, fake and reference
implementation (``reference.py``), and a column of kernels per backend. Importing this package registers
``torch.ops.dqcompile.*``. A backend is a module that fills its column with `register_kernel`; the
modules in `BACKEND_MODULES` do so when imported, which `load_backend` does on first use:

    "triton": dqcompile.backends.triton   (GPU kernels; CPU only under TRITON_INTERPRET=1)
    "aten":   dqcompile.backends.aten     (decompositions into ATen ops that Inductor compiles and fuses)
"""

import importlib

from dqcompile.backends import reference
from dqcompile.backends.ops import (
    OP_TABLE,
    Kernel,
    OpDef,
    backends,
    bind_arguments,
    kernel,
    op_def,
    op_def_of,
    positional_arguments,
    register_kernel,
)

# Backends that fill their column when their module is imported.
BACKEND_MODULES = {"triton": "dqcompile.backends.triton", "aten": "dqcompile.backends.aten"}


def load_backend(name: str) -> str:
    """Make sure backend ``name``'s kernels are registered (importing its module); returns ``name``.

    "reference" needs nothing. Raises ValueError for a name that is neither registered nor known.
    """
    if name == "reference" or name in backends():
        return name
    if name not in BACKEND_MODULES:
        known = sorted({"reference", *BACKEND_MODULES, *backends()})
        raise ValueError(f"kernel backend {name!r} is not available; known backends: {', '.join(known)}")
    importlib.import_module(BACKEND_MODULES[name])
    return name


__all__ = ["BACKEND_MODULES", "OP_TABLE", "Kernel", "OpDef", "backends", "bind_arguments", "kernel", "load_backend",
           "op_def", "op_def_of", "positional_arguments", "reference", "register_kernel"]
