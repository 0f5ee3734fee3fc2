"""Every third-party import of the package, the jobs and the tests is a declared dependency.

A fresh install gets exactly what ``pyproject.toml`` declares (and what those distributions
require in turn), so an import that is satisfied only because something was installed by hand
fails on a user's machine. This walks every module's AST — imports inside functions included —
maps each third-party top-level module to the distribution that provides it in this environment,
and requires that distribution to be reachable from the declared requirements. Extras are
followed only where they are asked for: ``diffusers[test]`` would bring ``transformers``, but a
plain ``diffusers`` requirement does not.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
#: Where each checked tree's imports must be declared: the package needs the install's own
#: dependencies; the jobs may also use the ``bench`` extra (a local S3 server for the benchmark),
#: the tests the ``test`` extra.
TREES = {"cdi_ray": (), "jobs": ("bench",), "tests": ("test",)}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Undeclared:
    module: str
    file: str
    why: str

    def __str__(self) -> str:
        return f"{self.module} (imported in {self.file}): {self.why}"


@functools.lru_cache(maxsize=None)
def requires_of(distribution: str) -> tuple[str, ...] | None:
    """The installed ``distribution``'s own requirements (``None``: not installed)."""
    try:
        return tuple(md.requires(distribution) or ())
    except md.PackageNotFoundError:
        return None


def reachable(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """Normalised names of the distributions that installing ``requirements`` pulls in, following
    each requirement's own extras (and markers) but no extra nobody asked for."""
    seen: dict[str, set[str]] = {}  # distribution → extras already followed
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, parent_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": parent_extra}):
            continue
        name = normalize(req.name)
        wanted = {""} | set(req.extras)
        done = seen.setdefault(name, set())
        if wanted <= done:
            continue
        new = wanted - done
        done |= new
        requires = requires_of(name)
        if requires is None:
            continue
        for extra in new:
            todo += [(Requirement(r), extra) for r in requires]
    return set(seen)


def declared(pyproject: dict, extras: tuple[str, ...]) -> set[str]:
    project = pyproject["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    return reachable(requirements) | {normalize(project["name"])}


@functools.lru_cache(maxsize=None)
def imported_modules(path: Path) -> frozenset[str]:
    """Top-level names of every absolute import in ``path``, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return frozenset(names)


def first_party(root: Path) -> set[str]:
    """The repository's own importable names: top-level packages/modules and every module in
    the checked trees (jobs and tests import their siblings by bare name)."""
    names = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    names |= {p.stem for p in root.glob("*.py")} | set(TREES)  # jobs/ is a namespace package
    for tree in TREES:
        names |= {p.stem for p in (root / tree).rglob("*.py")}
        names |= {p.name for p in (root / tree).rglob("*") if p.is_dir()}
    return names


@functools.lru_cache(maxsize=None)
def providers() -> dict[str, set[str]]:
    """Top-level module → the installed distributions that provide it."""
    return {module: {normalize(d) for d in dists} for module, dists in md.packages_distributions().items()}


def undeclared_imports(root: Path, pyproject: dict) -> list[Undeclared]:
    own = first_party(root)
    problems: dict[str, Undeclared] = {}
    for tree, extras in TREES.items():
        allowed = declared(pyproject, extras)
        for path in sorted((root / tree).rglob("*.py")):
            rel = str(path.relative_to(root))
            for module in sorted(imported_modules(path)):
                if module in sys.stdlib_module_names or module in own or module == "__future__" or module in problems:
                    continue
                dists = providers().get(module)
                if not dists:
                    problems[module] = Undeclared(module, rel, "no installed distribution provides it; declare the "
                                                               "distribution in pyproject.toml")
                elif not dists & allowed:
                    where = (f"[project.optional-dependencies] {' or '.join(extras)}" if extras
                             else "[project] dependencies")
                    problems[module] = Undeclared(module, rel, f"provided by {', '.join(sorted(dists))}, which "
                                                               f"pyproject.toml does not declare: add it to {where}")
    return list(problems.values())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_import_is_a_declared_dependency(pyproject):
    problems = undeclared_imports(REPO, pyproject)
    assert not problems, "undeclared imports:\n" + "\n".join(map(str, problems))


def direct_needs(pyproject: dict) -> list[str]:
    """Declared runtime requirements that nothing else declared pulls in: each is load-bearing."""
    requirements = pyproject["project"]["dependencies"]
    needs = []
    for i, r in enumerate(requirements):
        others = reachable(requirements[:i] + requirements[i + 1:])
        if normalize(Requirement(r).name) not in others:
            needs.append(r)
    return needs


@pytest.mark.parametrize("requirement", ["transformers", "ray", "scikit-learn", "boto3"])
def test_removing_a_load_bearing_dependency_is_caught(pyproject, requirement):
    """The check can fail: drop one requirement that the code imports and nothing else pulls in,
    and the module and the file that imports it are named."""
    reqs = pyproject["project"]["dependencies"]
    full = next(r for r in reqs if normalize(Requirement(r).name) == requirement)
    assert full in direct_needs(pyproject)
    broken = {**pyproject, "project": {**pyproject["project"], "dependencies": [r for r in reqs if r != full]}}
    problems = undeclared_imports(REPO, broken)
    names = {p.module for p in problems}
    module = {"transformers": "transformers", "ray": "ray", "scikit-learn": "sklearn", "boto3": "boto3"}[requirement]
    assert module in names
    hit = next(p for p in problems if p.module == module)
    assert hit.file.endswith(".py") and normalize(requirement) in hit.why


def test_extras_are_followed_only_when_asked():
    """diffusers' ``test`` extra lists transformers; a plain diffusers requirement must not count it."""
    assert "transformers" not in reachable(["diffusers"])
    assert "pyarrow" in reachable(["ray[data]"])
