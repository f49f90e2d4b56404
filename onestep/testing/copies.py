"""Copies of shared pipeline code, checked as diffusers' utils/check_copies.py checks diffusers'.

The pipeline files (onestep/pipelines/*.py) must each load alone, so they cannot import their shared code: they copy
it from onestep/pipelines/common.py, and each copy carries the marker

    # Copied from onestep.pipelines.<module>.<Name>[.<method>] [with Old->New[, Old2->New2] [all-casing]]

on the line before it (before its decorators, which are part of the copy). ` with Old->New` renames in the original
(a regular expression, as in diffusers) before comparing; the result is put through `ruff format` when ruff is
installed. Asset folders (onestep/assets/*) that ship a pipeline file must ship it byte for byte.

    python -m onestep.testing.copies          lists what drifted and exits 1 if anything did
    python -m onestep.testing.copies --fix    rewrites the copies and the shipped files from their originals
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

MARKER = re.compile(r"^(\s*)# Copied from onestep\.pipelines\.(\S+)[ \t]*(.*?)\s*$")
RENAME = re.compile(r"^(\S+)->(\S+?)(?:\s+(all-casing))?$")
DEFINITION = re.compile(r"^\s*(async\s+def|def|class)\s")
CLOSING = re.compile(r"^\s*\)(\s*->.*)?:\s*$")


@dataclass
class Drift:
    """One copy (or shipped file) that differs from its original."""

    path: str
    line: int  # 1-based: the marker's line (1 for a shipped file)
    message: str
    fixable: bool = True

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def default_dirs() -> tuple[str, str]:
    """(the onestep.pipelines folder, onestep/assets) of the onestep this runs from, without importing torch."""
    pipelines = importlib.util.find_spec("onestep.pipelines").submodule_search_locations[0]
    assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
    return pipelines, assets


def block_end(lines: list[str], start: int) -> int:
    """The line after the definition that starts at `start` (its decorators, then def/class, then every line
    indented deeper, blank, or closing a multi-line signature), trailing blank lines left out."""
    indent = re.match(r"\s*", lines[start]).group()
    i = start
    while i < len(lines) and not DEFINITION.match(lines[i]):
        i += 1
    i += 1
    body = indent + "    "
    while i < len(lines) and (lines[i].startswith(body) or not lines[i].strip() or CLOSING.match(lines[i])):
        i += 1
    while i > start + 1 and not lines[i - 1].strip():
        i -= 1
    return i


class Copies:
    """The copies in the pipeline files, and the pipeline files shipped in asset folders, against their originals."""

    def __init__(self, pipelines_dir: str, assets_dir: str | None = None):
        self.pipelines_dir, self.assets_dir = pipelines_dir, assets_dir
        self.root = os.path.dirname(os.path.abspath(pipelines_dir))

    def _show(self, path: str) -> str:
        return os.path.relpath(path, self.root) if os.path.abspath(path).startswith(self.root + os.sep) else path

    # -- originals ----------------------------------------------------------------------------------------------
    def original(self, dotted: str) -> tuple[str, str] | None:
        """(indentation, text) of onestep.pipelines.<dotted> (module.Name[.method]), decorators included; None if
        there is no such definition."""
        module, *names = dotted.split(".")
        path = os.path.join(self.pipelines_dir, f"{module}.py")
        if not names or not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            text = f.read()
        node = ast.parse(text)
        kinds = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for name in names:
            node = next((n for n in getattr(node, "body", []) if isinstance(n, kinds) and n.name == name), None)
            if node is None:
                return None
        lines = text.splitlines(keepends=True)
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        block = lines[start : block_end(lines, start)]
        return re.match(r"\s*", block[0]).group(), "".join(block)

    def expected(self, dotted: str, renames: str, indent: str, path: str) -> str | None:
        """The text a copy at `indent` must have: the original re-indented, its own markers dropped, renamed."""
        found = self.original(dotted)
        if found is None:
            return None
        source_indent, text = found
        lines = [
            indent + line[len(source_indent) :] if line.strip() else line
            for line in text.splitlines(keepends=True)
            if not MARKER.match(line)
        ]
        code = "".join(lines)
        if renames:
            code = _format(_rename(code, renames), path, self.root)
        return code

    # -- checking ---------------------------------------------------------------------------------------------
    def check_text(self, text: str, path: str = "<text>") -> tuple[list[Drift], str]:
        """The drifted copies in a pipeline file's text, and the text with them rewritten from the originals."""
        lines = text.splitlines(keepends=True)
        drifts, i = [], 0
        while i < len(lines):
            found = MARKER.match(lines[i])
            if found is None:
                i += 1
                continue
            indent, dotted, renames = found.groups()
            name = f"onestep.pipelines.{dotted}"
            start = i + 1
            if start >= len(lines) or not (
                lines[start].startswith(indent) and (DEFINITION.match(lines[start]) or lines[start].strip()[:1] == "@")
            ):
                drifts.append(Drift(path, i + 1, f"the marker for {name} is not followed by a def or class", False))
                i += 1
                continue
            if renames and not renames.startswith("with "):
                drifts.append(Drift(path, i + 1, f"cannot read {renames!r}: write ' with Old->New'", False))
                i += 1
                continue
            try:
                want = self.expected(dotted, renames.removeprefix("with ").strip(), indent, path)
            except (ValueError, SyntaxError) as err:  # an unreadable renaming, an original that does not parse
                drifts.append(Drift(path, i + 1, f"{name}: {err}", False))
                i += 1
                continue
            if want is None:
                drifts.append(Drift(path, i + 1, f"{name} does not exist in {self.pipelines_dir}", False))
                i += 1
                continue
            end = block_end(lines, start)
            if "".join(lines[start:end]) != want:
                drifts.append(Drift(path, i + 1, f"the copy of {name} differs from the original"))
                lines[start:end] = want.splitlines(keepends=True)
                end = start + len(want.splitlines())
            i = end
        return drifts, "".join(lines)

    def check_file(self, path: str, fix: bool = False) -> list[Drift]:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        drifts, fixed = self.check_text(text, self._show(path))
        if fix and fixed != text:
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(fixed)
        return drifts

    def check_assets(self, fix: bool = False) -> list[Drift]:
        """Every .py file in an asset folder is a pipeline file, shipped byte for byte."""
        drifts = []
        if not self.assets_dir or not os.path.isdir(self.assets_dir):
            return drifts
        for folder, subfolders, files in os.walk(self.assets_dir):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                shipped, original = os.path.join(folder, name), os.path.join(self.pipelines_dir, name)
                if not os.path.isfile(original):
                    drifts.append(Drift(self._show(shipped), 1, f"no pipeline file {name} to compare it with", False))
                    continue
                with open(shipped, "rb") as a, open(original, "rb") as b:
                    if a.read() == b.read():
                        continue
                drifts.append(Drift(self._show(shipped), 1, f"differs from {self._show(original)}"))
                if fix:
                    shutil.copyfile(original, shipped)
        return drifts

    def check(self, fix: bool = False) -> list[Drift]:
        """Every pipeline file's copies (in file order), then the shipped files; with fix, rewritten."""
        drifts = []
        for name in sorted(os.listdir(self.pipelines_dir)):
            if name.endswith(".py"):
                drifts += self.check_file(os.path.join(self.pipelines_dir, name), fix)
        # Shipped files after the copies: a fixed pipeline file is shipped as fixed.
        return drifts + self.check_assets(fix)


def _rename(code: str, renames: str) -> str:
    """diffusers' `with Old->New` renaming: regular expressions, `all-casing` also renames old/OLD to new/NEW."""
    for rule in (r.strip() for r in renames.split(",")):
        found = RENAME.match(rule)
        if found is None:
            raise ValueError(f"cannot read the renaming {rule!r}: write Old->New")
        old, new, casing = found.groups()
        code = re.sub(old, new, code)
        if casing:
            code = re.sub(old.lower(), new.lower(), code)
            code = re.sub(old.upper(), new.upper(), code)
    return code


def _ruff() -> list[str] | None:
    if shutil.which("ruff"):
        return ["ruff"]
    return [sys.executable, "-m", "ruff"] if importlib.util.find_spec("ruff") else None


def _format(code: str, path: str, root: str) -> str:
    """A renamed copy formatted as ruff formats the file it sits in (names of another length can move line breaks),
    as diffusers' check_copies does: inside one `class _:` per indentation level. Left as it is without ruff."""
    ruff = _ruff()
    if ruff is None:
        return code
    levels = len(re.match(r"\s*", code).group()) // 4
    headers = "".join("    " * k + "class _:\n" for k in range(levels))
    stdin = path if path.endswith(".py") else "copy.py"
    run = subprocess.run(
        [*ruff, "format", "--stdin-filename", stdin, "-"],
        input=headers + code,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    if run.returncode != 0:
        return code
    return run.stdout.split("\n", levels)[levels].lstrip("\n") if levels else run.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onestep.testing.copies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies and shipped files")
    pipelines, assets = default_dirs()
    parser.add_argument("--pipelines", default=pipelines, help=f"the pipeline files (default {pipelines})")
    parser.add_argument("--assets", default=assets, help=f"the asset folders (default {assets})")
    args = parser.parse_args(argv)
    drifts = Copies(args.pipelines, args.assets).check(fix=args.fix)
    for drift in drifts:
        print(f"{drift}{' (fixed)' if args.fix and drift.fixable else ''}")
    left = [d for d in drifts if not (args.fix and d.fixable)]
    if left:
        hint = "; run python -m onestep.testing.copies --fix" if any(d.fixable for d in left) else ""
        print(f"{len(left)} cop{'y' if len(left) == 1 else 'ies'} drifted from the original{hint}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
