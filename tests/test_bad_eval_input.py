"""Bad input to onestep-eval, the image reader and the pipeline call: one sentence, and nothing on disk changed.

Each case is cheap: images written in the test, tiny models, and the command run in this process."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.errors import UserError
from onestep.images import open_image, to_8bit
from tests.helpers import save_tiny_teacher, sd_scheduler_config, tiny_unet


def _main(argv):
    from onestep.eval.cli import main

    return main([str(a) for a in argv])


def _one_sentence(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def _truncated_jpeg(path, size=64):
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _digits(folder, n=3):
    from onestep.eval.sources import digits_reference_images

    folder.mkdir(parents=True, exist_ok=True)
    images, _ = digits_reference_images()
    for i in range(n):
        Image.fromarray(images[i, :, :, 0]).save(folder / f"{i}.png")
    return folder


# --- 1. one image reader: 16-bit, alpha drawings, truncated files ----------------------------------------

RAMP = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)  # -> 0, 1, 128, 255


def test_16_bit_images_are_scaled_by_their_full_range(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "a.png")  # opens as I;16
    Image.frombytes("I;16B", (4, 1), RAMP.astype(">u2").tobytes()).save(tmp_path / "b.tif")
    Image.fromarray(RAMP.astype(np.int32)).save(tmp_path / "c.tif")  # opens as I
    for name, mode in (("a.png", "I;16"), ("b.tif", "I;16B"), ("c.tif", "I")):
        assert Image.open(tmp_path / name).mode == mode
        assert np.asarray(open_image(str(tmp_path / name), 1)).tolist() == [[0, 1, 128, 255]], name
        assert np.asarray(open_image(str(tmp_path / name), 3))[0, :, 1].tolist() == [0, 1, 128, 255], name
    # 32-bit values beyond 16 bits: the signed 32-bit range.
    wide = Image.fromarray(np.array([[-(2**31), 2**31 - 1]], dtype=np.int32))
    assert np.asarray(to_8bit(wide, 1)).tolist() == [[0, 255]]


def test_a_drawing_in_the_alpha_channel_shows_over_white(tmp_path):
    alpha = np.zeros((4, 4), np.uint8)
    alpha[1:3, 1:3] = 255  # the drawing: opaque black strokes, transparent elsewhere
    Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), alpha])).save(tmp_path / "la.png")
    expected = np.where(alpha == 255, 0, 255)
    for name in ("rgba.png", "la.png"):
        assert (np.asarray(open_image(str(tmp_path / name), 1)) == expected).all(), name
        assert (np.asarray(open_image(str(tmp_path / name), 3))[..., 2] == expected).all(), name


def test_training_data_and_eval_read_images_the_same_way(tmp_path):
    from onestep.data import ImageFolder
    from onestep.eval.sources import read_image

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.tile(RAMP, (4, 1))).save(data / "deep.png")
    ds = ImageFolder(str(data), resolution=4, channels=1)
    x = ds[0][0]
    assert len(torch.unique(x)) == 4 and x.min() == -1 and x.max() == 1  # not only -1/+1
    assert read_image(str(data / "deep.png"))[0, :, 0].tolist() == [0, 1, 128, 255]  # not 0/255


def test_a_truncated_jpeg_is_caught_by_the_up_front_check(tmp_path):
    from onestep.data import ImageFolder

    data = tmp_path / "data"
    _digits(data)
    bad = _truncated_jpeg(data / "cut.jpg")
    with Image.open(bad) as img:
        img.verify()  # what the check used to do: it passes
    with pytest.raises(UserError) as err:
        ImageFolder(str(data), resolution=8, channels=1)
    text = _one_sentence(err)
    assert text.startswith(f"Cannot read image {bad} (") and text.endswith("; remove or replace the file.")
    # onestep-eval reads with the same function, and writes nothing.
    folder = tmp_path / "eval"
    folder.mkdir()
    shutil.copy(bad, folder / "cut.jpg")
    Image.new("RGB", (64, 64)).save(folder / "fine.jpg")
    with pytest.raises(UserError, match=r"Cannot read image .*cut\.jpg"):
        _main(["fid", "--images", folder, "--ref", "digits", "--features", "digits", "--output", tmp_path / "f.json"])
    assert not (tmp_path / "f.json").exists()


# --- 2. sr --crop-border ----------------------------------------------------------------------------------


def test_sr_crop_border_must_leave_an_image_and_be_non_negative(tmp_path, capsys):
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(hr / "a.png")
    out = tmp_path / "sr.json"
    with pytest.raises(UserError) as err:
        _main(["sr", "--hr", hr, "--sr", hr, "--crop-border", "16", "--output", out])
    text = _one_sentence(err)
    assert "32x32" in text and "the largest border allowed is 10" in text
    with pytest.raises(SystemExit) as exit_:
        _main(["sr", "--hr", hr, "--sr", hr, "--crop-border", "-3", "--output", out])
    assert exit_.value.code == 2 and "--crop-border" in capsys.readouterr().err
    assert not out.exists()
    _main(["sr", "--hr", hr, "--sr", hr, "--crop-border", "10", "--output", out])  # the largest allowed works
    assert json.loads(out.read_text())["ssim_rgb"] == 1.0


# --- 3. fid / kid with few samples ------------------------------------------------------------------------


def test_fid_below_the_feature_dimension_warns_once_and_records_it(tmp_path, capsys):
    import warnings

    from scipy.linalg import LinAlgWarning

    images = _digits(tmp_path / "few", n=3)
    out = tmp_path / "fid.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinAlgWarning)  # scipy's "singular matrix" warning would fail here
        _main(["fid", "--images", images, "--ref", "digits", "--features", "digits", "--output", out])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "3 generated" in lines[0] and "N > 64" in lines[0]
    record = json.loads(out.read_text())
    assert "N > 64" in record["warning"] and isinstance(record["fid"], float)


def test_kid_with_one_sample_gives_its_own_message(tmp_path):
    with pytest.raises(UserError) as err:
        _main(
            ["kid", "--teacher", "digits", "--steps", "1", "--num-samples", "1", "--ref", "digits"]
            + ["--features", "digits", "--output", tmp_path / "kid.json"]
        )
    assert _one_sentence(err).startswith("KID needs at least 2 images") and "FID" not in str(err.value)
    assert not (tmp_path / "kid.json").exists()


# --- 4. --output that is a folder -------------------------------------------------------------------------

OUTPUT_IS_A_FOLDER = {
    "fid": ["fid", "--teacher", "digits", "--steps", "1", "--num-samples", "4", "--ref", "digits"],
    "kid": ["kid", "--teacher", "digits", "--steps", "1", "--num-samples", "4", "--ref", "digits"],
    "stats": ["stats", "--images", "digits", "--features", "digits"],
    "clip": ["clip", "--images", "{images}", "--prompts", "{prompts}"],
    "sr": ["sr", "--hr", "{images}", "--sr", "{images}"],
    "bench": ["bench", "--pipeline", "/nonexistent/student"],
}


@pytest.mark.parametrize("command", list(OUTPUT_IS_A_FOLDER))
def test_an_output_that_is_a_folder_is_refused_before_any_work(tmp_path, command):
    folder = tmp_path / "results"
    folder.mkdir()
    images = _digits(tmp_path / "images", n=2)
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    subs = {"{images}": images, "{prompts}": tmp_path / "prompts.txt"}
    with pytest.raises(UserError) as err:
        _main([subs.get(a, a) for a in OUTPUT_IS_A_FOLDER[command]] + ["--output", folder])
    assert _one_sentence(err).startswith(f"--output {folder} is a folder")
    assert sorted(os.listdir(tmp_path)) == ["images", "prompts.txt", "results"] and not os.listdir(folder)


# --- 5. CLIP features name the flag of the command being run ----------------------------------------------


def test_clip_errors_name_the_flags_of_the_command(tmp_path):
    from tests.test_eval_metrics import tiny_clip_config

    config = tiny_clip_config(tmp_path)
    images = _digits(tmp_path / "images", n=2)
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    missing = str(tmp_path / "missing.pt")
    features = ["--features", "clip", "--clip-model", config, "--clip-pretrained", missing]
    with pytest.raises(UserError) as err:
        _main(["fid", "--images", images, "--ref", "digits", *features, "--output", tmp_path / "f.json"])
    assert "--clip-pretrained" in _one_sentence(err) and " --pretrained" not in str(err.value)
    with pytest.raises(UserError) as err:
        _main(
            ["stats", "--images", images, "--features", "clip", "--clip-model", "nope", "--output", tmp_path / "s.npz"]
        )
    assert "--clip-model" in _one_sentence(err)
    with pytest.raises(UserError) as err:
        _main(
            ["clip", "--images", images, "--prompts", tmp_path / "prompts.txt", "--model", config]
            + ["--pretrained", missing, "--output", tmp_path / "c.json"]
        )
    assert " --pretrained" in _one_sentence(err) and "--clip-pretrained" not in str(err.value)


# --- 6. incomplete student folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from onestep.export import export_one_step

    path = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    export_one_step(tiny_unet(num_class_embeds=4), sd_scheduler_config(), [999], str(path), {"t": "x"}, num_classes=3)
    return path


@pytest.mark.parametrize("remove,named", [("scheduler", "scheduler/"), ("one_step.py", "one_step.py")])
def test_an_incomplete_student_folder_names_what_is_missing(tmp_path, student, remove, named):
    folder = tmp_path / "student"
    shutil.copytree(student, folder)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError) as err:
        _main(
            ["fid", "--pipeline", folder, "--num-samples", "4", "--ref", "digits", "--features", "digits"]
            + ["--output", tmp_path / "f.json"]
        )
    text = _one_sentence(err)
    assert f"The pipeline folder {folder} is incomplete: it has no {named}" in text
    assert not (tmp_path / "f.json").exists()


# --- 7. class-conditional teachers without onestep.json ----------------------------------------------------


def test_a_teacher_without_onestep_json_needs_num_classes(tmp_path):
    from onestep.eval.sources import TeacherSampler

    teacher = save_tiny_teacher(str(tmp_path / "teacher"), num_classes=3, null_class=3)
    os.remove(os.path.join(teacher, "onestep.json"))
    with pytest.raises(UserError) as err:
        TeacherSampler(teacher, 1, "cpu")
    assert "pass --num-classes" in _one_sentence(err) and "embeds 4 classes" in str(err.value)
    with pytest.raises(UserError, match="--null-class"):
        TeacherSampler(teacher, 1, "cpu", guidance_scale=2.0, num_classes=3)
    with pytest.raises(UserError, match="more than the 4 classes"):
        TeacherSampler(teacher, 1, "cpu", num_classes=5)
    guided = TeacherSampler(teacher, 1, "cpu", guidance_scale=2.0, num_classes=3, null_class=3)
    assert guided(range(2), 0, [0, 2]).shape == (2, 8, 8, 1)
    # Through the command line, before anything is written; then with the flags.
    out = tmp_path / "fid.json"
    common = ["fid", "--teacher", teacher, "--steps", "1", "--num-samples", "4", "--ref", "digits"]
    common += ["--features", "digits", "--output", out]
    with pytest.raises(UserError, match="pass --num-classes"):
        _main(common)
    assert not out.exists()
    _main(common + ["--num-classes", "3", "--null-class", "3", "--guidance-scale", "1.5"])
    source = json.loads(out.read_text())["generated"]["source"]
    assert source["num_classes"] == 3 and source["null_class"] == 3 and source["class_layout_from"].startswith("--")
    with pytest.raises(UserError, match="of a --teacher"):
        _main(
            ["fid", "--images", _digits(tmp_path / "im", 3), "--ref", "digits", "--num-classes", "3"]
            + ["--features", "digits", "--output", out]
        )


# --- 8. pipeline calls -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"class_labels": []}, "class_labels is empty"),
        ({"batch_size": 0}, "batch_size must be at least 1; got 0"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1"),
        ({"num_inference_steps": 2}, "num_inference_steps must be between 1 and 1"),
    ],
)
def test_pipeline_call_refuses_empty_or_out_of_range_arguments(student, kwargs, message):
    from onestep.pipelines import OneStepPipeline

    pipe = OneStepPipeline.from_pretrained(str(student))
    with pytest.raises(ValueError, match=message) as err:
        pipe(**kwargs, output_type="np")
    assert "\n" not in str(err.value)
