"""Every third-party import in the project comes from a distribution pyproject.toml declares: module-level imports
outside tests/ from `dependencies`; imports inside a function (an optional feature) from any extra; tests/ also
from the `test` extra. Imports that arrive only through another dependency must be declared too, since a later
release of that dependency could drop them."""

import ast
import importlib.metadata as md
import os
import re
import sys

import pytest

from tests.helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "outputs", "site", "__pycache__"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(specs) -> set[str]:
    return {_norm(re.split(r"[ <>=!~;\[]", s.strip())[0]) for s in specs}


def _imports(path: str):
    """(top-level module, line, inside a function or class body) of every absolute import in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    nested = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(node)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], node.lineno, id(node) in nested


def _python_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_every_import_is_declared_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    core = _requirements(project["dependencies"]) | {"onestep"}
    extras = {name: _requirements(specs) for name, specs in project.get("optional-dependencies", {}).items()}
    any_extra = set().union(*extras.values())
    distributions = md.packages_distributions()
    local = {"onestep", "tests", "helpers", "conftest", "train", "pipelines", "eval"}
    problems = []
    for path in _python_files():
        rel = os.path.relpath(path, ROOT)
        in_tests = rel.startswith("tests" + os.sep)
        for module, line, nested in _imports(path):
            if module in sys.stdlib_module_names or module in local or module.startswith("_"):
                continue
            names = {_norm(d) for d in distributions.get(module, [])}
            if not names:
                if nested and _norm(module) in any_extra:
                    continue  # an optional feature whose extra is declared but not installed here
                problems.append(f"{rel}:{line}: {module} (no installed distribution provides it)")
                continue
            allowed = core | (extras.get("test", set()) if in_tests else set()) | (any_extra if nested else set())
            if not names & allowed:
                problems.append(f"{rel}:{line}: {module} (from {', '.join(sorted(names))}, not declared)")
    assert not problems, "undeclared imports:\n" + "\n".join(problems)
