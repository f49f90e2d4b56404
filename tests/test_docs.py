"""The user documentation (README.md and docs/): every link to a repository file resolves, no file in the repository
names the private briefing folder, and the MkDocs site builds in strict mode.

Links that start with "/" are repository-root links (GitHub resolves them against the root of the repository); the
pages use them for files outside docs/, which MkDocs leaves unchecked (mkdocs.yml), so this test checks them."""

import glob
import os
import re
import subprocess
import sys
import tempfile
from urllib.parse import unquote

import pytest

from tests.helpers import ROOT

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
# Built from parts so that this file does not name the folder it looks for.
PRIVATE_FOLDER = "shared" + "/"


def markdown_files() -> list[str]:
    pages = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    return [os.path.join(ROOT, "README.md"), *sorted(pages)]


def link_targets(text: str) -> list[str]:
    """Link and image targets of a Markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def resolve(source: str, target: str) -> str | None:
    """The repository path a link points to, or None for external links and pure anchors."""
    if EXTERNAL.match(target) or target.startswith("#"):
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    base = ROOT if path.startswith("/") else os.path.dirname(source)
    return os.path.normpath(os.path.join(base, path.lstrip("/")))


def test_markdown_helpers_find_and_resolve_links():
    text = "[a](x.md#s) ![b](/eval/f.png) [`c`](../y.py) [d](https://e.org) [e](#top)\n`[f](no.md)`\n```\n[g](no.md)\n```\n"
    assert link_targets(text) == ["x.md#s", "/eval/f.png", "../y.py", "https://e.org", "#top"]
    page = os.path.join(ROOT, "docs", "methods", "p.md")
    assert resolve(page, "x.md#s") == os.path.join(ROOT, "docs", "methods", "x.md")
    assert resolve(page, "/eval/f.png") == os.path.join(ROOT, "eval", "f.png")
    assert resolve(page, "https://e.org") is None and resolve(page, "#top") is None


def test_every_relative_link_resolves_to_a_file():
    broken = []
    for source in markdown_files():
        with open(source, encoding="utf-8") as f:
            targets = link_targets(f.read())
        for target in targets:
            path = resolve(source, target)
            inside = path is None or os.path.commonpath([ROOT, path]) == ROOT
            if path is not None and not (inside and os.path.exists(path)):
                broken.append(f"{os.path.relpath(source, ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def repository_files() -> list[str]:
    """Tracked files, and new files not yet tracked that git does not ignore (they are about to be committed)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (or git is missing): nothing to list")
    return sorted({name for name in out.decode().split("\0") if name})


def test_no_repository_file_names_the_private_folder():
    mentions = []
    for name in repository_files():
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):  # deleted in the working tree, not yet in the index
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data[:8192]:  # binary (weights, images)
            continue
        text = data.decode("utf-8", errors="replace")
        mentions += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if PRIVATE_FOLDER in line]
    assert not mentions, f"{len(mentions)} lines name {PRIVATE_FOLDER!r}:\n" + "\n".join(mentions)


def test_mkdocs_builds_in_strict_mode():
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    with tempfile.TemporaryDirectory() as site:
        r = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml", "--site-dir", site],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert os.path.isfile(os.path.join(site, "index.html"))
