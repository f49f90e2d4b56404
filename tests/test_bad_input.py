"""Bad input: one clear sentence on stderr, a non-zero exit, and nothing already written touched."""

import hashlib
import os

import pytest

from tests.helpers import PY, run, save_tiny_teacher


def dmd2(*args, out):
    return run([PY, "train/dmd2.py", "--output_dir", str(out), "--max_train_steps", "1", *args], timeout=300)


def one_sentence(stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.fixture
def existing_run(tmp_path):
    """An output folder holding a checkpoint that bad input must leave untouched."""
    out = tmp_path / "run"
    ckpt = out / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"precious")
    return out


def _images(folder, n=3, size=8, corrupt=False):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", (size, size), color=i * 40).save(folder / f"{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


CASES = {
    "missing teacher": (lambda tmp: ["--pretrained_model_name_or_path", str(tmp / "nope")], "neither an existing"),
    "non-diffusers folder": (
        lambda tmp: ["--pretrained_model_name_or_path", str((tmp / "plain").mkdir() or tmp / "plain")],
        "not a diffusers pipeline folder",
    ),
    "resolution": (lambda tmp: ["--resolution", "18"], "not divisible"),
    "unknown preset": (lambda tmp: ["--preset", "imagenet-9000"], "Unknown preset"),
    "empty data folder": (
        lambda tmp: ["--train_data_dir", str((tmp / "empty").mkdir() or tmp / "empty")],
        "holds no images",
    ),
    "corrupt image": (
        lambda tmp: [
            "--pretrained_model_name_or_path",
            save_tiny_teacher(str(tmp / "teacher"), num_classes=1, null_class=1),
            "--train_data_dir",
            str(_images(tmp / "data" / "a", corrupt=True).parent),
        ],
        "Cannot read image",
    ),
    "bad timesteps": (lambda tmp: ["--conditioning_timesteps", "249,999"], "descending"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_sentence_and_leaves_checkpoints_alone(case, tmp_path, existing_run):
    make_args, expected = CASES[case]
    before = digest(existing_run)
    # Resuming the run in the folder, so that the folder rule lets each case reach its own check.
    r = dmd2(*make_args(tmp_path), "--resume_from_checkpoint", "latest", out=existing_run)
    assert r.returncode != 0
    line = one_sentence(r.stderr)
    assert line.startswith("error: ") and expected in line
    assert digest(existing_run) == before


def test_invalid_flag_value_is_rejected_by_the_parser(tmp_path, existing_run):
    before = digest(existing_run)
    r = dmd2("--mixed_precision", "fp8", out=existing_run)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = dmd2("--train_batch_size", "0", out=existing_run)
    assert r.returncode == 2 and "positive integer" in r.stderr
    # Values that would train silently wrong (a negative clip flips gradients) or fail later.
    for flag, value in (("--max_grad_norm", "-1"), ("--learning_rate", "-1"), ("--learning_rate", "nan")):
        r = dmd2(flag, value, out=existing_run)
        assert r.returncode == 2 and f"argument {flag}: expected a" in r.stderr, (flag, value, r.stderr[-500:])
    assert digest(existing_run) == before


def test_unknown_model_type_is_rejected(tmp_path):
    teacher = tmp_path / "weird"
    (teacher / "unet").mkdir(parents=True)
    (teacher / "scheduler").mkdir()
    (teacher / "unet" / "config.json").write_text('{"_class_name": "UNet3DConditionModel"}')
    (teacher / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    out = tmp_path / "run"  # a new folder: a folder holding checkpoints is refused before the teacher is read
    r = dmd2("--pretrained_model_name_or_path", str(teacher), out=str(out))
    assert r.returncode == 2 and "UNet3DConditionModel" in one_sentence(r.stderr)
    assert not out.exists()  # nothing left behind


def test_a_run_never_writes_into_a_teacher_or_an_earlier_export(tmp_path):
    """The rule: a run writes only into its own output folder (new or empty), or resumes the run whose
    checkpoints are there; never into the teacher's or the data's folder."""
    teacher = save_tiny_teacher(str(tmp_path / "teacher"), num_classes=1, null_class=1)
    data = _images(tmp_path / "data" / "a").parent
    export = tmp_path / "earlier"  # an earlier run's export, its checkpoints deleted
    (export / "unet").mkdir(parents=True)
    (export / "model_index.json").write_text("{}")
    cases = [
        (["--pretrained_model_name_or_path", teacher, "--no-gan"], teacher, "inside the teacher's folder"),
        (
            ["--pretrained_model_name_or_path", teacher, "--train_data_dir", str(data)],
            str(data / "a"),
            "inside the training data's",
        ),
        ([], str(export), "is not empty"),
        (["--resume_from_checkpoint", "latest"], str(export), "no checkpoint to resume"),
    ]
    for extra, out, expected in cases:
        before = {p: digest(p) for p in (teacher, str(data), str(export))}
        r = dmd2(*extra, out=out)
        assert r.returncode == 2 and expected in one_sentence(r.stderr), (extra, r.stderr[-1500:])
        assert {p: digest(p) for p in before} == before


@pytest.mark.parametrize("script", ["train/teacher.py", "train/sr_teacher.py"])
def test_teacher_scripts_never_write_into_their_training_data(tmp_path, script):
    """Scripts that train a teacher from scratch load none, so the one input to protect is the data folder; the
    stage runner refuses before the network or the data is built."""
    import importlib

    from onestep.errors import UserError

    data = _images(tmp_path / "data" / "a").parent
    before = digest(str(data))
    module = importlib.import_module(script.replace("/", ".").removesuffix(".py"))
    with pytest.raises(UserError, match="inside the training data's"):
        module.main(["--train_data_dir", str(data), "--output_dir", str(data / "a" / "run")])
    assert digest(str(data)) == before and not (data / "a" / "run").exists()


def test_an_output_dir_that_cannot_be_written_is_refused_in_one_sentence(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = dmd2(out=blocker / "run")
    assert r.returncode == 2 and "Cannot write into --output_dir" in one_sentence(r.stderr)
    assert blocker.read_text() == "not a folder"
