"""The compiler does not know the example: no core module imports dqcompile.fmnist.

Core modules: every module of the dqcompile package outside dqcompile/fmnist/ and dqcompile/cli.py (the
command line works on the embedded model, so it may import the example). Each core source file is
parsed with ast, and every import in it is checked, wherever it stands: at module level, inside a
function (lazy imports), under `if TYPE_CHECKING:`, relative (`from ..fmnist import x`) or absolute, and
string imports through importlib.import_module / __import__.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "dqcompile"
EXAMPLE = "dqcompile.fmnist"
NOT_CORE = ("dqcompile.fmnist", "dqcompile.cli")


def module_name(path: Path) -> str:
    """dqcompile/calib/runner.py -> dqcompile.calib.runner; a package's __init__.py -> the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_example(name: str) -> bool:
    return name == EXAMPLE or name.startswith(EXAMPLE + ".")


def core_modules() -> dict[str, Path]:
    modules = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}
    return {name: path for name, path in modules.items()
            if not any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_CORE)}


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything `source` imports, anywhere in the file.

    `from a.b import c` yields both a.b and a.b.c (c may be a submodule); relative imports are resolved
    against `module` (a package's __init__ counts as the package itself).
    """
    package = module if is_package else module.rpartition(".")[0]
    names: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append((node.lineno, base))
            names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if called in ("import_module", "__import__") and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    target = first.value
                    if target.startswith(".") and len(node.args) > 1:
                        anchor = node.args[1]
                        if isinstance(anchor, ast.Constant) and isinstance(anchor.value, str):
                            target = anchor.value + target
                    names.append((node.lineno, target))
    return names


def test_the_walker_sees_every_kind_of_import() -> None:
    source = '''
import dqcompile.fmnist.data
from dqcompile import fmnist
from .. import fmnist as example
from ..fmnist.dit import NULL_CLASS_ID

def lazy():
    from dqcompile.fmnist import sample
    import importlib
    importlib.import_module("dqcompile.fmnist.metrics")

if TYPE_CHECKING:
    from dqcompile.fmnist.classifier import FashionMNISTClassifier
'''
    found = [name for _, name in imported_names(source, "dqcompile.calib.trajectories", is_package=False)
             if is_example(name)]
    assert set(found) >= {"dqcompile.fmnist.data", "dqcompile.fmnist", "dqcompile.fmnist.dit",
                          "dqcompile.fmnist.sample", "dqcompile.fmnist.metrics", "dqcompile.fmnist.classifier"}
    # From a package's __init__, one dot is the package itself.
    assert "dqcompile.fmnist" in [name for _, name in imported_names("from .fmnist import x", "dqcompile", True)]
    assert not [name for _, name in imported_names("from .sampling import sample\nimport fmnistlike",
                                                   "dqcompile.viz.command", False) if is_example(name)]


def test_core_modules_never_import_the_example() -> None:
    modules = core_modules()
    assert {"dqcompile", "dqcompile.api", "dqcompile.sampling", "dqcompile.calib.trajectories",
            "dqcompile.viz.command"} <= set(modules)
    offences = []
    for name, path in modules.items():
        for line, imported in imported_names(path.read_text(), name, path.name == "__init__.py"):
            if is_example(imported):
                offences.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {imported}")
    assert not offences, "core modules import the Fashion-MNIST example:\n" + "\n".join(offences)


@pytest.mark.slow
def test_importing_dqcompile_loads_no_example_module() -> None:
    """The same at run time: `import dqcompile` (and the sampler) leaves dqcompile.fmnist unloaded."""
    code = ("import sys, dqcompile, dqcompile.sampling, dqcompile.calib.trajectories, dqcompile.viz.command; "
            "print(sorted(m for m in sys.modules if m.startswith('dqcompile.fmnist')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE_DIR.parent)
    assert result.stdout.strip() == "[]", result.stdout
