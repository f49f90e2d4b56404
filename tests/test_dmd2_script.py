"""End-to-end runs of the real train/dmd2.py: accelerate launch, export, reload, resume, signals, DDP."""

import json
import os
import signal
import subprocess
import time

import torch
from safetensors.torch import load_file

from tests.helpers import PY, ROOT, check_model_card, run

SMALL = ["--train_batch_size", "4", "--validation_steps", "1000"]


def launch(args, out, num_processes=1, timeout=600):
    cmd = [
        "accelerate",
        "launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        "no",
    ]
    env = {"ACCELERATE_USE_CPU": "true"}
    if num_processes > 1:
        cmd.append("--multi_gpu")
    return run(cmd + ["train/dmd2.py", "--output_dir", str(out), *SMALL, *args], env=env, timeout=timeout)


LOAD_IN_FRESH_PROCESS = r"""
import sys, hashlib, torch, numpy as np
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
out = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0), output_type="np").images
assert 'onestep' not in sys.modules, 'the export must load without importing onestep'
print(type(pipe).__name__, out.shape, hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest())
"""


def test_default_run_exports_a_pipeline_that_loads_without_onestep(tmp_path):
    out = tmp_path / "run"
    r = launch(["--max_train_steps", "3"], out)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in (
        "model_index.json",
        "one_step.py",
        "README.md",
        "unet",
        "scheduler",
        "checkpoint-3",
        "samples",
        "timing.json",
        "loss_curves.png",
    ):
        assert (out / name).exists(), name
    assert "Load it" in r.stdout + r.stderr
    assert "gradient checkpointing" not in r.stdout + r.stderr  # off by default: no note about it
    # The resolved configuration, every field with the defaults and the flags given, as --config reads it.
    resolved = json.loads((out / "training_config.json").read_text())
    assert resolved["preset"] == "digits-cpu" and resolved["trainer"]["max_train_steps"] == 3
    assert (
        resolved["method"]["ttur_ratio"] == 5
        and resolved["method"]["train_batch_size"] == 4
        and resolved["versions"]["diffusers"]
    )
    header, card = check_model_card(
        out, "dmd2", rows=("teacher", "conditioning timesteps", "training_steps", "metrics")
    )
    assert "base_model" not in header  # the bundled teacher has no hub id
    assert "DMD2" in card
    # The preset's in-training FID (digits features) ran at the start and at the end, with EMA weights.
    rows = (out / "logs" / "eval.csv").read_text().splitlines()
    assert rows[0].split(",")[0] == "step" and [r.split(",")[0] for r in rows[1:]] == ["0", "3"]
    assert "fid_digits_500" in rows[0] and "fid_digits_500" in card and (out / "logs" / "eval.png").exists()
    # Fresh processes (cwd elsewhere, onestep not imported): same seed -> same images, twice.
    first = run([PY, "-c", LOAD_IN_FRESH_PROCESS, str(out)], cwd=str(tmp_path))
    second = run([PY, "-c", LOAD_IN_FRESH_PROCESS, str(out)], cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    name, *_, digest = first.stdout.split()
    assert name == "OneStepPipeline" and "(2, 16, 16, 1)" in first.stdout
    assert first.stdout == second.stdout
    # The frozen teacher is not in the checkpoint: exactly the generator and the critic (+ head) are.
    ckpt = out / "checkpoint-3"
    models = sorted(p.name for p in ckpt.glob("model*.safetensors"))
    assert models == ["model.safetensors", "model_1.safetensors"]
    gen_keys, critic_keys = load_file(ckpt / models[0]).keys(), load_file(ckpt / models[1]).keys()
    assert all(k.startswith("denoiser.") for k in gen_keys)
    assert any(k.startswith("head.") for k in critic_keys) and not any(
        "teacher" in k for k in list(gen_keys) + list(critic_keys)
    )


def test_two_process_gloo_run_keeps_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    r = launch(["--max_train_steps", "4"], out, num_processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / "logs" / f"weights-rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1] and set(ranks[0]) == {"generator", "critic"}


def _weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_resume_after_sigkill_is_exact(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    plain = lambda out, *extra: run([PY, "train/dmd2.py", "--output_dir", str(out), *SMALL, *extra])  # noqa: E731 (launch is tested above)
    r = plain(ref, "--max_train_steps", "6", "--checkpointing_steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    # A long run killed with SIGKILL right after its first checkpoint lands.
    cmd = [
        PY,
        "train/dmd2.py",
        "--output_dir",
        str(cut),
        *SMALL,
        "--max_train_steps",
        "1000",
        "--checkpointing_steps",
        "3",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (cut / "checkpoint-3").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoint-3").exists()
    r = plain(cut, "--max_train_steps", "6", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(ref), _weights(cut)
    assert a.keys() == b.keys()
    # The in-training FID log survives the kill (written at each evaluation) and ends as the uninterrupted one's
    # (its wall-clock column aside).
    import csv

    def metrics(folder):
        with open(folder / "logs" / "eval.csv") as f:
            return [{k: v for k, v in row.items() if k != "train_seconds"} for row in csv.DictReader(f)]

    assert metrics(cut) == metrics(ref) and "train_seconds" in (ref / "logs" / "eval.csv").read_text()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    for i in (0, 1):  # generator and critic checkpoints agree too
        ca, cb = (
            load_file(ref / "checkpoint-6" / f"model{'_1' if i else ''}.safetensors"),
            load_file(cut / "checkpoint-6" / f"model{'_1' if i else ''}.safetensors"),
        )
        assert max(float((ca[k] - cb[k]).abs().max()) for k in ca) <= 1e-6


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "term"
    cmd = [PY, "train/dmd2.py", "--output_dir", str(out), *SMALL, "--max_train_steps", "100000"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "samples" / "step-000000.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    ckpts = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp")
    assert "resume with --resume_from_checkpoint latest" in output
    assert not (out / "model_index.json").exists()  # an interrupted run does not export


def test_stage_two_starts_from_stage_one_weights_with_a_new_gan_head(tmp_path):
    """DMD2 SD1.5 recipe: stage 1 without the GAN, stage 2 from its weights with the GAN head added."""

    def train(out, *extra):
        return run([PY, "train/dmd2.py", "--output_dir", str(out), *SMALL, "--eval_steps", "0", *extra])

    stage1 = tmp_path / "stage1"
    r = train(stage1, "--max_train_steps", "2", "--no-gan")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = stage1 / "checkpoint-2"
    stage2 = tmp_path / "stage2"
    r = train(stage2, "--max_train_steps", "1", "--gan", "--learning_rate", "0", "--init_from_checkpoint", str(ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    # lr 0: the exported student is exactly stage 1's generator, so the weights were taken over.
    generator = {k.split("denoiser.adapter.net.", 1)[1]: v for k, v in load_file(ckpt / "model.safetensors").items()}
    exported = load_file(stage2 / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == generator.keys() and all(torch.equal(exported[k], generator[k]) for k in exported)
    assert "loss_d" in (stage2 / "logs" / "losses.csv").read_text().splitlines()[0]
    # A checkpoint of another model is refused in one sentence before training.
    r = train(
        tmp_path / "bad", "--max_train_steps", "1", "--no-gan", "--init_from_checkpoint", str(tmp_path / "nowhere")
    )
    assert r.returncode == 2 and "is not a folder" in r.stderr.strip().splitlines()[-1]


def test_help_shows_every_default_and_each_presets_values():
    r = run([PY, "train/dmd2.py", "--help"])
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    from onestep.presets.dmd2 import DEFAULT_PRESET, PRESETS

    lr = PRESETS[DEFAULT_PRESET].config.method.learning_rate
    assert f"(default: {lr})" in text and "(default: 0.01)" in text and "(default: 0)" in text  # the default preset's
    assert (
        "digits-cpu: Bundled default" in text and "learning_rate=1e-05" in text and "lora_rank=64" in text
    )  # the others'
    assert "--dm_t_min DM_T_MIN Lowest timestep" in text
    assert "a few minutes" not in text


def test_a_users_own_teacher_starts_without_the_digits_evaluation_and_names_the_preset(tmp_path):
    """A class-conditional teacher trained elsewhere, with its own class folders: the digits preset's in-training
    FID (digits features and reference) is turned off with one line saying how to turn it on."""
    from PIL import Image

    from tests.helpers import save_tiny_teacher

    teacher = save_tiny_teacher(str(tmp_path / "teacher"), num_classes=3, null_class=3)
    for c in range(3):
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=40 * (c + i)).save(tmp_path / "data" / str(c) / f"{i}.png")
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teacher,
            "--train_data_dir",
            str(tmp_path / "data"),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "2",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "In-training FID is off for this teacher" in out and "--eval_reference" in out
    assert f"Preset digits-cpu; teacher {teacher}." in out
    assert (tmp_path / "out" / "model_index.json").exists() and not (tmp_path / "out" / "logs" / "eval.csv").exists()


def _training_processes(out):
    """Live processes training into `out` (the launcher's child), by their command line."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"train/dmd2.py" in cmd and str(out).encode() in cmd and b"launch" not in cmd:
            pids.append(int(pid))
    return pids


def test_sigterm_to_the_accelerate_launcher_reaches_the_training_process(tmp_path):
    """`kill <the command the user started>`: accelerate's launcher forwards SIGTERM and kills the training process
    5 seconds later (older releases died without forwarding; the process then follows it through PR_SET_PDEATHSIG).
    Either way it cuts the step-0 evaluation short, finishes an iteration and writes a checkpoint in time."""
    out = tmp_path / "term"
    cmd = [
        "accelerate",
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        "no",
        "train/dmd2.py",
        "--output_dir",
        str(out),
        *SMALL,
        "--max_train_steps",
        "100000",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "samples" / "step-000000.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert _training_processes(out), "the training process should be running"
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)
    deadline = time.time() + 120
    while _training_processes(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not _training_processes(out), "the training process outlived its launcher"
    ckpts = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(ckpts) == 1 and not ckpts[0].endswith(".tmp") and not (out / "model_index.json").exists()
