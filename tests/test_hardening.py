"""Bad input across the methods, refused in one sentence before anything is written: time-like options outside
their schedule, options that contradict each other, damaged weight files named, another method's checkpoint or
config named as such, requirements checked before the first stage, and the user's thread setting respected.
In-process (the scripts' main), so a case costs a teacher load, not a Python start."""

import json
import os
import shutil

import pytest

from onestep.errors import UserError
from tests.helpers import PY, run

QUICK = ["--max_train_steps", "1", "--train_batch_size", "2", "--validation_steps", "1000", "--eval_steps", "0"]


def _quick(method):
    """QUICK, without the in-training evaluation flag MSD does not offer (its pipeline is measured after)."""
    return QUICK[:-2] if method == "msd" else QUICK


def _entry(method):
    import importlib

    return importlib.import_module(f"onestep.presets.{method}").ENTRY


def _refused(method, argv, message, out):
    from onestep.stages import main

    with pytest.raises(UserError, match=message) as err:
        main(_entry(method), [*argv, "--output_dir", str(out)])
    assert "\n" not in str(err.value) and not out.exists(), str(err.value)  # one sentence, nothing left behind


@pytest.mark.parametrize(
    "method, argv, message",
    [
        ("dmd2", ["--conditioning_timesteps", "1000"], r"fall outside the schedule's 0\.\.999"),
        ("dmd2", ["--dm_t_max", "1000"], r"must lie within 0\.\.999"),
        ("dmd2", ["--gan_max_timestep", "1000"], r"--gan_max_timestep 1000 must lie within 0\.\.999"),
        ("boot", ["--param_timestep", "1000"], r"--param_timestep 1000 must lie within 0\.\.999"),
        ("boot", ["--grid_size", "1001"], r"--grid_size 1001 must lie within 1\.\.1000"),
        ("oftsr", ["--dt", "2", "--no-clamp_s"], "larger than the time range"),
        ("oftsr", ["--t_max", "0.99", "--dt", "0.05", "--no-clamp_s"], "flow times above 1"),
        ("tadsr", ["--hsd_timesteps", "20"], r"--hsd_timesteps must be timesteps within 0\.\.14"),
        ("tadsr", ["--disc_timesteps", "0,99"], r"--disc_timesteps must be timesteps within 0\.\.14"),
        ("tadsr", ["--student_timestep", "15"], "must lie within the teacher's 15 steps"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_time_like_options_outside_their_schedule_are_refused(method, argv, message, tmp_path):
    _refused(method, [*QUICK, *argv], message, tmp_path / "out")


@pytest.mark.parametrize(
    "method, argv, message",
    [
        ("boot", ["--boundary_batch_size", "64", "--train_batch_size", "32"], "larger than --train_batch_size"),
        ("boot", ["--boundary", "exact", "--boundary_weight", "0.5"], "--boundary_weight has no effect"),
        ("disback", ["--switch_rule", "converged", "--switch_rho", "1"], r"--switch_rho 1\.0 must lie in \(0, 1\)"),
        ("disback", ["--switch_rho", "0.3"], "--switch_rho has no effect without --switch_rule converged"),
        ("msd", ["--max_train_steps", "20"], "leaves none of the 20 iterations"),
        ("tadsr", ["--no-gan", "--gan_weight", "1"], "--gan_weight has no effect without --gan"),
        ("tadsr", ["--score_loss", "none", "--hsd_weight", "2"], "--hsd_weight has no effect"),
        ("dmd2", ["--no-gan", "--gan_generator_weight", "0.1"], "--gan_generator_weight has no effect"),
        ("oftsr", ["--dt", "0.99"], "larger than the time range"),
        ("tadsr", ["--resolution", "8"], r"leaves the UNet a 2x2 map at its lowest level"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_options_that_contradict_each_other_are_refused(method, argv, message, tmp_path):
    _refused(method, [*_quick(method), *argv], message, tmp_path / "out")  # argparse keeps a flag's last value


def test_a_truncated_snapshot_is_named_with_what_to_do(tmp_path):
    """DisBack's distill stage reads the path's snapshots: a truncated one names the file, not safetensors' error."""
    from onestep.stages import main

    out = tmp_path / "run"
    tiny = [*QUICK, "--num_snapshots", "2", "--path_steps", "2", "--switch_every", "1"]
    main(_entry("disback"), [*tiny, "--output_dir", str(out), "--stage", "path"])
    weights = out / "path" / "snapshot-002" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    student = tmp_path / "student"
    with pytest.raises(UserError, match=r"snapshot-002.*damaged or incomplete.*record the path again"):
        main(
            _entry("disback"),
            [*tiny, "--output_dir", str(student), "--stage", "distill", "--path_dir", str(out / "path")],
        )
    assert not student.exists()


def test_another_methods_checkpoint_and_config_are_named_as_such(tmp_path):
    from onestep.stages import main

    boot = tmp_path / "boot"
    main(_entry("boot"), [*QUICK, "--output_dir", str(boot)])
    assert json.loads((boot / "checkpoint-1" / "onestep.json").read_text())["method"] == "boot"
    with pytest.raises(UserError, match="was written by a boot run, not dmd2"):
        main(_entry("dmd2"), [*QUICK, "--output_dir", str(boot), "--resume_from_checkpoint", "latest"])
    with pytest.raises(UserError, match="was written by a boot run, not dmd2"):
        main(
            _entry("dmd2"),
            [*QUICK, "--output_dir", str(tmp_path / "a"), "--init_from_checkpoint", str(boot / "checkpoint-1")],
        )
    with pytest.raises(UserError, match="was written by a boot run, not dmd2; rerun it with train/boot.py"):
        main(_entry("dmd2"), ["--config", str(boot / "training_config.json"), "--output_dir", str(tmp_path / "b")])


def test_what_every_stage_needs_is_checked_before_the_first_one_starts(tmp_path):
    """DisBack on an unconditional teacher without data: the distill stage's GAN needs real images, which is said
    before the path stage spends its time; and a folder holding checkpoints is refused before the teacher loads."""
    from onestep.export import save_teacher
    from onestep.stages import main
    from tests.helpers import sd_scheduler_config, tiny_unet

    teacher = str(tmp_path / "teacher")
    save_teacher(tiny_unet(), sd_scheduler_config(), teacher, {"note": "test"})
    out = tmp_path / "out"
    _refused("disback", ["--pretrained_model_name_or_path", teacher, *QUICK], "GAN needs real images", out)
    os.makedirs(out / "checkpoint-3")
    with pytest.raises(UserError, match="--output_dir .* already holds checkpoints"):  # not "no such teacher"
        main(_entry("dmd2"), ["--pretrained_model_name_or_path", str(tmp_path / "nowhere"), "--output_dir", str(out)])
    shutil.rmtree(out)


def test_the_path_folder_is_named_by_its_own_flag(tmp_path):
    from onestep.stages import main

    path = tmp_path / "path"
    os.makedirs(path / "checkpoint-2")
    with pytest.raises(UserError, match="--path_dir .* already holds checkpoints.*another --path_dir"):
        main(_entry("disback"), [*QUICK, "--path_dir", str(path), "--output_dir", str(tmp_path / "run")])


@pytest.mark.parametrize("threads", ["1", None])
def test_the_trainer_respects_the_users_thread_setting(threads, tmp_path):
    """OMP_NUM_THREADS set by the user stays; unset, accelerate's default of 1 gives way to a share of the cores."""
    env = {"OMP_NUM_THREADS": threads} if threads else {}
    launcher = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd = [*launcher, "--mixed_precision", "no", "train/boot.py", *QUICK, "--output_dir", str(tmp_path / "o")]
    r = run(cmd, env=env) if threads else _run_without_threads(cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    used = json.loads((tmp_path / "o" / "timing.json").read_text())["cpu_threads"]
    assert used == (1 if threads else max(1, os.cpu_count()))


def _run_without_threads(cmd):
    import subprocess

    from tests.helpers import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ONESTEP_KEEP_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_bad_flags_end_in_one_line_and_exit_2():
    r = run([PY, "train/tadsr.py", "--hsd_timesteps", "a,b"])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "expected comma-separated integers" in r.stderr
