"""Every entry point answers --help (each train script, onestep-eval and each of its subcommands), and the package's
layering holds: no import cycle inside onestep, the core never imports the evaluation package, and methods ask the
trainer for collectives instead of calling torch.distributed."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from tests.helpers import PY, ROOT, run

SCRIPTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "train", "*.py")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_train_script_answers_help(script):
    r = run([PY, script, "--help"], timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout and "presets" in r.stdout, r.stderr[-2000:]


def _eval_subcommands():
    r = subprocess.run([sys.executable, "-m", "onestep.eval.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
    start = r.stdout.index("{") + 1
    return r.stdout[start : r.stdout.index("}", start)].split(",")


def test_onestep_eval_and_each_subcommand_answer_help(capsys):
    """The top-level --help runs as a process (in _eval_subcommands); each subcommand's runs in this one, through
    the same main(), to spare a torch import per subcommand."""
    from onestep.eval.cli import main

    subcommands = _eval_subcommands()
    assert {"fid", "kid", "clip", "sr", "bench", "stats"} <= set(subcommands)
    for command in subcommands:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0 and "usage:" in capsys.readouterr().out, command


# -- layering ----------------------------------------------------------------------------------------------------

PACKAGE = os.path.join(ROOT, "onestep")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _imported(path: str) -> set[str]:
    """onestep modules a file imports (relative imports resolved), at module level and inside functions."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.startswith("onestep")}
    return out


def _graph() -> dict[str, set[str]]:
    files = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {t for t in _imported(path) if t in modules and t != name}
    return graph


def test_the_package_has_no_import_cycle():
    """No strongly connected group of modules (Tarjan): every module can be read after the ones it imports."""
    graph, index, low, stack, on_stack, groups = _graph(), {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not groups, "import cycles among: " + "; ".join(", ".join(g) for g in groups)


def test_the_core_does_not_import_the_evaluation_package_and_methods_use_the_trainers_collectives():
    offenders = []
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        if any(t.startswith("onestep.eval") for t in _imported(path)):
            offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, f"onestep/ imports onestep.eval in {offenders}; the train scripts hand the evaluator down"
    for path in glob.glob(os.path.join(PACKAGE, "methods", "*.py")):
        text = open(path, encoding="utf-8").read()
        assert "torch.distributed" not in text, f"{path} calls torch.distributed; use Method.collective"


RECIPES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "eval", "recipes", "*.py"))
    if not p.endswith("__init__.py")
)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_answers_help(recipe, capsys):
    import importlib

    module = importlib.import_module(f"onestep.eval.recipes.{recipe}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
