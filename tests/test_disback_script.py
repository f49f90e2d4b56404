"""End-to-end runs of the real train/disback.py on the bundled digits teacher: both stages under accelerate launch,
the export loading in a fresh process, the distill stage alone from the path folder in another process (the same
student as the run doing both), and a path folder with a snapshot missing or --init_from_checkpoint (one sentence, exit status 2)."""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from tests.helpers import PY, check_model_card, run
from tests.test_dmd2_script import LOAD_IN_FRESH_PROCESS

SMALL = [
    "--train_batch_size",
    "4",
    "--validation_steps",
    "1000",
    "--eval_steps",
    "0",
    "--max_train_steps",
    "3",
    "--num_snapshots",
    "2",
    "--path_steps",
    "2",
    "--switch_every",
    "1",
]


def _script(*args):
    return run([PY, "train/disback.py", *SMALL, *args])


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """`accelerate launch train/disback.py` (both stages, the default) with a tiny budget."""
    out = tmp_path_factory.mktemp("disback") / "run"
    launcher = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    r = run(
        [*launcher, "--mixed_precision", "no", "train/disback.py", *SMALL, "--output_dir", str(out)],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout + r.stderr


def _unet(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_both_stages_export_a_pipeline_that_loads_in_a_fresh_process(both, tmp_path):
    out, log = both
    path = out / "path"
    info = json.loads(open(os.path.join(path, "path.json")).read())
    assert info["complete"] and info["snapshots"] == ["snapshot-001", "snapshot-002"]
    assert os.path.isfile(os.path.join(path, "snapshot-002", "unet", "config.json"))  # a diffusers UNet folder
    assert "target -> S'_0" not in log and "target -> the teacher" in log
    header = (out / "distill" / "logs" / "losses.csv").read_text().splitlines()[0]
    assert "target_index" in header and "loss_d" in header  # the walk is logged; DMD2's GAN head is on
    assert json.loads((out / "training_config.json").read_text())["stages"] == ["path", "distill"]
    assert "DisBack" in check_model_card(out, "disback", rows=("teacher", "degradation path", "metrics"))[1]
    assert "disback" in check_model_card(path, rows=("teacher", "snapshots"))[0]["tags"]
    r = run([PY, "-c", LOAD_IN_FRESH_PROCESS, str(out)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == "OneStepPipeline" and "(2, 16, 16, 1)" in r.stdout


def test_stage_two_from_a_path_folder_in_another_process_equals_one_run(both, tmp_path):
    out, _ = both
    r = _script("--stage", "distill", "--path_dir", str(out / "path"), "--output_dir", str(tmp_path / "student"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _unet(out), _unet(tmp_path / "student")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_path_folder_with_a_missing_snapshot_is_one_sentence_and_exit_2(both, tmp_path):
    out, _ = both
    broken = tmp_path / "path"
    shutil.copytree(out / "path", broken)
    os.remove(broken / "snapshot-001" / "unet" / "diffusion_pytorch_model.safetensors")
    student = tmp_path / "student"
    r = _script("--stage", "distill", "--path_dir", str(broken), "--output_dir", str(student))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "lacks snapshot-001" in last and last.count(". ") == 0
    assert not student.exists()  # nothing written


def test_init_from_checkpoint_is_refused_in_one_sentence_pointing_to_initial_generator(tmp_path):
    """It would overwrite G0 and the critic's S'_N start (and skip the G0 check): refused before anything runs."""
    student = tmp_path / "student"
    r = _script("--stage", "distill", "--init_from_checkpoint", str(tmp_path), "--output_dir", str(student))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --init_from_checkpoint") and "--initial_generator" in last
    assert last.count(". ") == 0 and not student.exists()


def test_path_learning_rate_must_be_positive():
    from onestep.presets.disback import ENTRY
    from onestep.stages import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser(ENTRY).parse_args(["--path_learning_rate", "0"])
    assert exit_info.value.code == 2
    assert build_parser(ENTRY).parse_args(["--path_learning_rate", "1e-5"]).path_learning_rate == 1e-5
