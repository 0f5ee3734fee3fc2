"""The method layer knows nothing of Ray (ARCHITECTURE.md: Ray only in the pipeline and the jobs).

Modules are found by walking the package, not from a list kept by hand, so a new module is
checked the day it is added:

* every module of the method layer — ``models``, ``features``, ``stats``, ``controls``,
  ``images``, ``seeding`` — may not import ``ray`` or ``cdi_ray.pipeline`` anywhere in its source,
  lazy imports inside functions included;
* every module outside the Ray adapters (the pipeline, the CLI and what runs it) imports in a
  Python where ``import ray`` fails.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cdi_ray"
#: The method layer: plain PyTorch / NumPy / SciPy / scikit-learn.
METHOD_LAYER = ("models", "features", "stats", "controls", "images", "seeding")
#: Where Ray may be imported at module level: the pipeline adapts the method to Ray; the CLI,
#: ``python -m cdi_ray`` and the demo run it.
RAY_ADAPTERS = ("pipeline", "cli", "__main__", "demo")
FORBIDDEN = ("ray", "cdi_ray.pipeline")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def in_layer(path: Path, layer: tuple[str, ...]) -> bool:
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py") in layer


def imports_of(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` (or in ``source``, read as if it were that file),
    relative imports resolved against the package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def forbidden_imports(path: Path, source: str | None = None) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for line, name in imports_of(path, source)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]


METHOD_MODULES = [p for p in all_modules() if in_layer(p, METHOD_LAYER)]


def test_the_method_layer_is_found():
    names = {module_name(p) for p in METHOD_MODULES}
    assert {"cdi_ray.stats.permutation", "cdi_ray.features.registry", "cdi_ray.models.loader", "cdi_ray.images",
            "cdi_ray.seeding", "cdi_ray.controls.model_free"} <= names


@pytest.mark.parametrize("path", METHOD_MODULES, ids=module_name)
def test_method_modules_never_import_ray_or_the_pipeline(path):
    assert not forbidden_imports(path), forbidden_imports(path)


def test_the_check_sees_lazy_and_relative_imports():
    probe = PACKAGE / "stats" / "probe.py"  # not a file: its would-be source is given
    source = "import numpy\n\ndef f():\n    import ray.data\n\ndef g():\n    from ..pipeline import run\n"
    assert [p.split(" imports ")[1] for p in forbidden_imports(probe, source)] == [
        "ray.data", "cdi_ray.pipeline", "cdi_ray.pipeline.run"]


def test_everything_outside_the_adapters_imports_without_ray():
    names = [module_name(p) for p in all_modules() if not in_layer(p, RAY_ADAPTERS)]
    # `sys.modules["ray"] = None` makes any `import ray` raise ImportError.
    code = "import importlib, sys; sys.modules['ray'] = None\nfor m in sys.argv[1:]: importlib.import_module(m)"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
