"""The pipeline files' copies of shared code (`# Copied from onestep.pipelines...`) match their originals, the asset
folders ship the pipeline files byte for byte, and `python -m onestep.testing.copies` finds and fixes a drift."""

import os
import shutil

import pytest

from onestep.testing.copies import Copies, default_dirs, main
from tests.helpers import PY, run


def test_the_repository_copies_match_their_originals():
    pipelines, assets = default_dirs()
    assert Copies(pipelines, assets).check() == []
    # Every pipeline file copies something, and every asset pipeline file is checked.
    for name in ("one_step", "boot", "msd", "super_resolution", "latent_super_resolution"):
        assert "# Copied from onestep.pipelines.common." in open(os.path.join(pipelines, f"{name}.py")).read()
    shipped = [f for _, _, files in os.walk(assets) for f in files if f.endswith(".py")]
    assert shipped.count("super_resolution.py") == 2
    r = run([PY, "-m", "onestep.testing.copies"])
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


@pytest.fixture
def tree(tmp_path):
    """A copy of the pipeline files and of the asset folders' pipeline files."""
    pipelines, assets = default_dirs()
    shutil.copytree(pipelines, tmp_path / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("sr-flow-teacher", "sr-resshift-teacher"):
        (tmp_path / "assets" / folder).mkdir(parents=True)
        shutil.copy(os.path.join(assets, folder, "super_resolution.py"), tmp_path / "assets" / folder)
    return tmp_path


def _edit(path, old, new):
    text = path.read_text()
    assert text.count(old) >= 1, old
    path.write_text(text.replace(old, new, 1))


def test_a_drifted_copy_and_a_drifted_shipped_file_are_reported_and_fixed(tree, capsys):
    msd, shipped = tree / "pipelines" / "msd.py", tree / "assets" / "sr-flow-teacher" / "super_resolution.py"
    original_msd, original_shipped = msd.read_text(), shipped.read_bytes()
    _edit(msd, 'raise ValueError(f"batch_size must be at least 1; got {batch_size}.")', "return 1")
    _edit(shipped, "MODES = (", "MODES = tuple(")
    argv = ["--pipelines", str(tree / "pipelines"), "--assets", str(tree / "assets")]
    assert main(argv) == 1
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 2, out.out
    assert lines[0].startswith("pipelines/msd.py:") and "onestep.pipelines.common._check_batch_size" in lines[0]
    assert lines[1].startswith("assets/sr-flow-teacher/super_resolution.py:1: differs from pipelines/")
    assert "--fix" in out.err
    assert main([*argv, "--fix"]) == 0
    assert msd.read_text() == original_msd and shipped.read_bytes() == original_shipped
    assert main(argv) == 0


def test_the_original_is_the_source_of_truth(tree):
    """Editing the original makes every copy drift; --fix carries the edit into each of them."""
    common = tree / "pipelines" / "common.py"
    _edit(common, "def _check_output_type(output_type, allowed", "def _check_output_type(output_type,  allowed")
    checker = Copies(str(tree / "pipelines"), str(tree / "assets"))
    drifted = {d.path for d in checker.check()}
    assert {f"pipelines/{n}.py" for n in ("one_step", "boot", "msd", "super_resolution")} <= drifted
    assert "assets/sr-flow-teacher/super_resolution.py" not in drifted  # compared with the fixed file, after it
    checker.check(fix=True)
    assert checker.check() == []
    assert (
        "def _check_output_type(output_type,  allowed"
        in (tree / "assets/sr-resshift-teacher/super_resolution.py").read_text()
    )


def test_markers_on_text_with_decorators_renames_and_unknown_originals(tree):
    checker = Copies(str(tree / "pipelines"))
    original = checker.original("common.SharedPipelineMethods._edm")[1]
    assert original.startswith("    @property\n    def _edm(self)")  # decorators belong to the copy
    copy = (
        "class A:\n    # Copied from onestep.pipelines.common.SharedPipelineMethods._edm\n"
        + original
        + "\n    x = 1\n"
    )
    assert checker.check_text(copy) == ([], copy)
    without_decorator = copy.replace("    @property\n", "")
    drifts, fixed = checker.check_text(without_decorator)
    assert len(drifts) == 1 and drifts[0].line == 2 and fixed == copy
    # ` with Old->New`: the original renamed before comparing (diffusers' syntax, all-casing included).
    renamed = original.replace("EDM", "VP").replace("edm", "vp")
    marker = "    # Copied from onestep.pipelines.common.SharedPipelineMethods._edm with EDM->VP all-casing\n"
    text = "class A:\n" + marker + renamed
    assert checker.check_text(text)[0] == []
    assert len(checker.check_text(text.replace("VP", "XX"))[0]) == 1
    unknown = "# Copied from onestep.pipelines.common._no_such_function\ndef f():\n    pass\n"
    drifts, fixed = checker.check_text(unknown)
    assert len(drifts) == 1 and not drifts[0].fixable and "does not exist" in drifts[0].message and fixed == unknown
