"""Runs of several stages (onestep/stages.py) on the bundled digits teacher: the regression warm start then DMD2
from one command, killed in its second stage and resumed to the same weights as an uninterrupted run, one stage
alone, and the checks that run before any stage starts."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import PY, ROOT, run

# --preset digits-warmstart at a tiny size: 16 teacher pairs of 2 DDIM steps, 6 iterations per stage.
TINY = ["--preset", "digits-warmstart", "--regression_pairs", "16", "--regression_teacher_steps", "2"]
TINY += ["--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps", "2", "--eval_steps", "0"]
TINY += ["--validation_steps", "1000"]


def _dmd2(out, *extra, timeout=600):
    return run([PY, "train/dmd2.py", "--output_dir", str(out), *TINY, *extra], timeout=timeout)


def _student(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "ref"
    r = _dmd2(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_one_command_runs_every_stage_and_exports_once(reference):
    record = json.loads((reference / "training_config.json").read_text())
    assert record["stages"] == ["regression", "distill"] and record["onestep_method"] == "dmd2"
    for stage in ("regression", "distill"):
        assert (reference / stage / "stage.json").is_file() and (reference / stage / "checkpoint-6").is_dir()
        assert not (reference / stage / "model_index.json").exists()  # only the run exports
    assert (reference / "model_index.json").is_file() and "---\nlibrary_name: diffusers" in (
        reference / "README.md"
    ).read_text()
    # The distill stage started from the regression stage's generator, its critic from the teacher.
    log = json.loads((reference / "distill" / "training_config.json").read_text())
    assert log["trainer"]["max_train_steps"] == 6 and log["method"]["gan"] is True
    regression = json.loads((reference / "regression" / "training_config.json").read_text())
    assert regression["method"]["gan"] is False


def test_a_run_killed_in_its_second_stage_resumes_to_the_uninterrupted_result(reference, tmp_path):
    cut = tmp_path / "cut"
    cmd = [PY, "train/dmd2.py", "--output_dir", str(cut), *TINY, "--max_train_steps", "6"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    mark = cut / "distill" / "checkpoint-2"
    deadline = time.time() + 500
    while not mark.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark.exists() and not (cut / "distill" / "stage.json").exists()
    first = cut / "regression" / "stage.json"
    stamp = first.stat().st_mtime_ns
    r = _dmd2(cut, "--resume_from_checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Stage regression: finished already" in r.stdout and first.stat().st_mtime_ns == stamp
    a, b = _student(reference), _student(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    again = _dmd2(cut, "--resume_from_checkpoint", "latest")
    assert again.returncode == 0 and "Stage distill: finished already" in again.stdout


def test_one_stage_alone_needs_its_earlier_stages(reference, tmp_path):
    r = _dmd2(tmp_path / "fresh", "--stage", "distill")
    assert r.returncode == 2 and "starts from stage regression's weights" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "fresh" / "distill" / "checkpoint-6").exists()
    r = _dmd2(tmp_path / "fresh", "--stage", "nope")
    assert r.returncode == 2 and "has no stage 'nope'; its stages: regression, distill" in r.stderr
    r = _dmd2(reference, "--stage", "distill")  # started already: resume it, or another folder
    assert r.returncode == 2 and "was started already" in r.stderr
    r = _dmd2(reference)
    assert r.returncode == 2 and "already holds this run" in r.stderr


def test_another_methods_run_folder_is_named_as_such(reference):
    r = run([PY, "train/boot.py", "--output_dir", str(reference), "--max_train_steps", "1"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not empty" in r.stderr or "dmd2" in r.stderr


def test_push_to_hub_uploads_only_the_export_and_refuses_offline(reference, tmp_path):
    from onestep.export import exported_files

    files = exported_files(str(reference))
    assert "model_index.json" in files and "README.md" in files and "one_step.py" in files
    assert any(f.startswith("unet/") for f in files) and any(f.startswith("scheduler/") for f in files)
    assert not any(f.split("/")[0] in ("regression", "distill", "logs", "samples") for f in files)
    assert not any(f.startswith("checkpoint-") or f == "training_config.json" for f in files)
    out = tmp_path / "hub"
    r = _dmd2(out, "--push_to_hub", "--hub_model_id", "someone/student", timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert (
        r.returncode == 2 and last.startswith("error: --push_to_hub needs the Hugging Face Hub") and not out.exists()
    )
