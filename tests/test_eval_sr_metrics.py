"""onestep-eval on super-resolution pipelines: the wrong pipeline kind refused by every command, grey against
colour refused, sharpness, the distance to a teacher's samples, LPIPS from local files, seeds and crops in the
record, bench timing an SR student, and the held-out table recipe on tiny inputs."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.eval import metrics
from tests.helpers import PY, run, tiny_unet

EVAL = [PY, "-m", "onestep.eval.cli"]


def save_sr_pipeline(path, seed, channels=3, **config):
    """A random tiny SuperResolutionPipeline folder (x4) laid out as the exports are; its 64-pixel tile holds the
    test images whole (one network call per image and step)."""
    import onestep.pipelines.super_resolution as module
    from onestep.pipelines import SuperResolutionPipeline

    torch.manual_seed(seed)
    unet = tiny_unet(sample_size=16, channels=channels, in_channels=2 * channels)
    SuperResolutionPipeline(unet=unet, tile_size=64, **config).save_pretrained(str(path))
    index = json.loads((path / "model_index.json").read_text())
    index["_class_name"] = ["super_resolution", "SuperResolutionPipeline"]
    (path / "model_index.json").write_text(json.dumps(index))
    shutil.copy(module.__file__, path / "super_resolution.py")
    return str(path)


@pytest.fixture(scope="module")
def sr(tmp_path_factory):
    """Tiny SR students and a teacher, a generation student, and HR/LR folders of two photographs."""
    from skimage import data

    from onestep.export import export_one_step
    from tests.helpers import sd_scheduler_config

    root = tmp_path_factory.mktemp("sr")
    out = {
        "student": save_sr_pipeline(root / "student", 0, mode="one_step", timestep=999),
        "teacher": save_sr_pipeline(
            root / "teacher", 1, mode="sampler", num_inference_steps=3, prediction_type="flow"
        ),
        "grey": save_sr_pipeline(root / "grey", 2, channels=1, mode="one_step", timestep=999),
    }
    torch.manual_seed(0)
    out["generation"] = str(root / "generation")
    export_one_step(tiny_unet(), sd_scheduler_config(), [999], out["generation"], {"t": "x"})
    for sub in ("hr", "lr", "hr_grey", "lr_grey"):
        (root / sub).mkdir()
    for name, image in (("a", data.astronaut()[100:148, 180:228]), ("b", data.coffee()[40:88, 200:248])):
        low = np.asarray(Image.fromarray(image).resize((12, 12), Image.BICUBIC))
        Image.fromarray(image).save(root / "hr" / f"{name}.png")
        Image.fromarray(low).save(root / "lr" / f"{name}.png")
        Image.fromarray(image).convert("L").save(root / "hr_grey" / f"{name}.png")
        Image.fromarray(low).convert("L").save(root / "lr_grey" / f"{name}.png")
    out.update({k: str(root / k) for k in ("hr", "lr", "hr_grey", "lr_grey")})
    return out


def _main(argv):
    from onestep.eval.cli import main

    return main([str(a) for a in argv])


def _sr(sr, tmp_path, *extra, name="sr.json"):
    out = tmp_path / name
    _main(["sr", "--hr", sr["hr"], "--lr", sr["lr"], *extra, "--output", out])
    return json.loads(out.read_text())


def _refused(argv, capsys, tmp_path) -> str:
    """The console script's path in this process: exit status 2, one `error:` line, no traceback, no record."""
    from onestep.cli import run_main

    out = tmp_path / "refused.json"
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: _main([*argv, "--output", out]))
    err = capsys.readouterr().err
    # (diffusers' own "Loading pipeline components" progress bar may come first when a custom class loads)
    lines = [ln for ln in err.splitlines() if ln.strip() and "Loading pipeline components" not in ln]
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not out.exists()
    return lines[0]


# --- 1. the wrong pipeline kind, refused by every command ---------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["fid", "--pipeline", "{student}", "--ref", "digits", "--features", "digits", "--num-samples", "4"],
        ["kid", "--pipeline", "{student}", "--ref", "digits", "--features", "digits", "--num-samples", "4"],
        ["clip", "--pipeline", "{student}", "--prompts", "{prompts}"],
        ["stats", "--pipeline", "{student}", "--features", "digits", "--num-samples", "4"],
    ],
    ids=["fid", "kid", "clip", "stats"],
)
def test_generation_commands_refuse_a_super_resolution_pipeline(sr, tmp_path, capsys, argv):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    subs = {"{student}": sr["student"], "{prompts}": tmp_path / "prompts.txt"}
    line = _refused([subs.get(a, a) for a in argv], capsys, tmp_path)
    assert f"is a super-resolution pipeline (SuperResolutionPipeline), which {argv[0]} cannot" in line
    assert "onestep-eval sr" in line


def test_a_custom_super_resolution_class_is_refused_once_loaded(tmp_path, capsys):
    """A pipeline class of the folder's own code says its kind only once loaded: by its call signature."""
    from tests.test_eval_cli import NEAREST_UPSCALE

    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "upscale.py").write_text(NEAREST_UPSCALE)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": ["upscale", "NearestUpscalePipeline"], "_diffusers_version": "0.30.0"})
    )
    argv = ["fid", "--pipeline", folder, "--ref", "digits", "--features", "digits", "--num-samples", "4"]
    line = _refused([*argv, "--trust-remote-code"], capsys, tmp_path)
    assert "is a super-resolution pipeline (NearestUpscalePipeline)" in line


def test_generation_teachers_refuse_a_super_resolution_teacher(tmp_path, capsys):
    argv = ["fid", "--teacher", "sr-flow", "--steps", "2", "--ref", "digits", "--features", "digits"]
    line = _refused([*argv, "--num-samples", "4"], capsys, tmp_path)
    assert "--teacher sr-flow is a super-resolution teacher" in line


def test_sr_refuses_a_generation_pipeline_as_student_or_teacher(sr, tmp_path, capsys):
    base = ["sr", "--hr", sr["hr"], "--lr", sr["lr"]]
    line = _refused([*base, "--pipeline", sr["generation"]], capsys, tmp_path)
    assert f"--pipeline {sr['generation']} is a generation pipeline (OneStepPipeline)" in line
    line = _refused([*base, "--pipeline", sr["student"], "--teacher", sr["generation"]], capsys, tmp_path)
    assert f"--teacher {sr['generation']} is a generation pipeline" in line


def test_bench_refuses_teachers_and_flags_of_the_other_kind(sr, tmp_path, capsys):
    line = _refused(["bench", "--pipeline", sr["student"], "--teacher", "digits"], capsys, tmp_path)
    assert "--teacher digits is not a super-resolution pipeline" in line
    line = _refused(["bench", "--pipeline", sr["student"], "--guidance-scale", "2"], capsys, tmp_path)
    assert "is a super-resolution pipeline" in line
    image = tmp_path / "low.png"
    Image.new("RGB", (8, 8)).save(image)
    line = _refused(["bench", "--pipeline", sr["generation"], "--image", image], capsys, tmp_path)
    assert "--image is the low-resolution input of a super-resolution student" in line
    line = _refused(["bench", "--pipeline", sr["generation"], "--teacher", "sr-flow"], capsys, tmp_path)
    assert "is a super-resolution teacher" in line


def test_a_refusal_exits_2_with_one_line_across_the_process_boundary(sr, tmp_path):
    out = tmp_path / "out.json"
    argv = ["kid", "--pipeline", sr["student"], "--ref", "digits", "--features", "digits", "--num-samples", "4"]
    r = run(EVAL + [*argv, "--output", str(out)])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "super-resolution pipeline" in lines[0] and "Traceback" not in r.stderr and not out.exists()


# --- 2. grey against colour ---------------------------------------------------------------------------------


def test_grey_against_colour_is_refused_in_one_sentence(sr, tmp_path, capsys):
    line = _refused(["sr", "--hr", sr["hr"], "--lr", sr["lr"], "--pipeline", sr["grey"]], capsys, tmp_path)
    assert "makes grey (1 channel) images but the HR image" in line and "is colour (3 channels)" in line
    line = _refused(["sr", "--hr", sr["hr"], "--sr", sr["hr_grey"]], capsys, tmp_path)
    assert "The SR image" in line and "is grey (1 channel) but its HR image" in line
    line = _refused(["sr", "--hr", sr["hr_grey"], "--sr", sr["hr"]], capsys, tmp_path)
    assert "is colour (3 channels) but its HR image" in line
    line = _refused(["sr", "--hr", sr["hr"], "--lr", sr["lr_grey"], "--pipeline", sr["student"]], capsys, tmp_path)
    assert "The LR image" in line and "is grey" in line


def test_a_grey_model_on_grey_images_is_measured(sr, tmp_path):
    out = tmp_path / "grey.json"
    _main(["sr", "--hr", sr["hr_grey"], "--lr", sr["lr_grey"], "--pipeline", sr["grey"], "--output", out])
    rec = json.loads(out.read_text())
    assert rec["num_images"] == 2 and np.isfinite(rec["psnr_y"]) and rec["sharpness"] > 0


# --- 3. sharpness -------------------------------------------------------------------------------------------


def _photo():
    from skimage import data

    return data.astronaut()[60:124, 140:204]


def test_laplacian_energy_matches_scikit_image_and_sharpness_orders_blur_and_noise():
    from scipy.ndimage import gaussian_filter
    from skimage.filters import laplace

    y = metrics.rgb_to_y(_photo())
    # skimage's 3x3 Laplacian over the interior pixels (where no padding enters).
    assert metrics.laplacian_energy(y) == pytest.approx(np.mean(laplace(y[..., 0], ksize=3)[1:-1, 1:-1] ** 2))
    assert metrics.sharpness(y, y) == 1.0
    blurred = gaussian_filter(y, sigma=(1.0, 1.0, 0))
    noisy = y + np.random.RandomState(0).randn(*y.shape) * 8
    assert metrics.sharpness(blurred, y) < 0.5 < 1 < metrics.sharpness(noisy, y)
    # Affine maps of the levels (as Y is of RGB) leave it alone; a flat reference has no energy to compare with.
    assert metrics.sharpness(2 * blurred + 5, 2 * y + 5) == pytest.approx(metrics.sharpness(blurred, y), rel=1e-12)
    assert np.isnan(metrics.sharpness(y, np.full_like(y, 7.0)))


def test_sr_records_sharpness_of_a_blurred_folder_below_one_and_of_the_reference_at_one(tmp_path):
    from scipy.ndimage import gaussian_filter

    hr_dir, blur_dir = tmp_path / "hr", tmp_path / "blur"
    hr_dir.mkdir(), blur_dir.mkdir()
    hr = _photo()
    Image.fromarray(hr).save(hr_dir / "a.png")
    blurred = np.clip(gaussian_filter(hr.astype(float), sigma=(1.2, 1.2, 0)), 0, 255).round().astype(np.uint8)
    Image.fromarray(blurred).save(blur_dir / "a.png")
    same, blur = tmp_path / "same.json", tmp_path / "blur.json"
    _main(["sr", "--hr", hr_dir, "--sr", hr_dir, "--crop-border", "4", "--output", same])
    _main(["sr", "--hr", hr_dir, "--sr", blur_dir, "--crop-border", "4", "--output", blur])
    assert json.loads(same.read_text())["sharpness"] == 1.0
    rec = json.loads(blur.read_text())
    expected = metrics.sharpness(metrics.rgb_to_y(blurred[4:-4, 4:-4]), metrics.rgb_to_y(hr[4:-4, 4:-4]))
    assert rec["sharpness"] == pytest.approx(expected, rel=1e-12) and rec["sharpness"] < 0.6
    assert "Laplacian" in rec["protocol"]["sharpness"]


# --- 3. the distance to a teacher's samples ---------------------------------------------------------------


def _by_hand(folder, low, seed, index, steps=None):
    from onestep.eval.sources import generators, load_pipeline
    from onestep.utils import to_uint8

    pipe = load_pipeline(folder, "cpu")
    kwargs = {"num_inference_steps": steps} if steps else {}
    images = pipe(image=Image.fromarray(low), generator=generators(seed, [index])[0], output_type="np", **kwargs)
    return to_uint8(images.images, (0, 1), "auto")[0]


def test_teacher_distance_is_psnr_y_and_mad_of_the_two_outputs_for_the_same_input_and_seed(sr, tmp_path):
    from skimage.metrics import peak_signal_noise_ratio

    rec = _sr(sr, tmp_path, "--pipeline", sr["student"], "--teacher", sr["teacher"], "--teacher-steps", "2")
    flags = ["--pipeline", sr["student"], "--teacher", sr["teacher"], "--teacher-steps", "2", "--seed", "5"]
    rec_seed = _sr(sr, tmp_path, *flags, name="5.json")
    assert rec["teacher"]["num_inference_steps"] == 2 and rec["teacher_psnr_y"] != rec_seed["teacher_psnr_y"]
    rows = []
    for i, name in enumerate(("a", "b")):
        low = np.asarray(Image.open(f"{sr['lr']}/{name}.png"))
        student, teacher = _by_hand(sr["student"], low, 0, i), _by_hand(sr["teacher"], low, 0, i, steps=2)
        ys, yt = metrics.rgb_to_y(student), metrics.rgb_to_y(teacher)
        rows.append((peak_signal_noise_ratio(yt, ys, data_range=255), np.abs(student.astype(float) - teacher).mean()))
    assert rec["teacher_psnr_y"] == pytest.approx(np.mean([r[0] for r in rows]), rel=1e-9)
    assert rec["teacher_mad"] == pytest.approx(np.mean([r[1] for r in rows]), rel=1e-9)
    assert [r["teacher_psnr_y"] for r in rec["per_image"]] == pytest.approx([r[0] for r in rows], rel=1e-9)
    # Against itself (same seed, same noise): identical outputs.
    self_rec = _sr(sr, tmp_path, "--pipeline", sr["student"], "--teacher", sr["student"], name="self.json")
    assert self_rec["teacher_psnr_y"] == "inf" and self_rec["teacher_mad"] == 0.0


def test_teacher_needs_low_resolution_inputs_and_teacher_steps_a_teacher(sr, tmp_path, capsys):
    line = _refused(["sr", "--hr", sr["hr"], "--sr", sr["hr"], "--teacher", sr["teacher"]], capsys, tmp_path)
    assert "pass --lr with --sr" in line
    base = ["sr", "--hr", sr["hr"], "--lr", sr["lr"], "--pipeline", sr["student"]]
    assert "give --teacher FOLDER" in _refused([*base, "--teacher-steps", "2"], capsys, tmp_path)


# --- 3. seeds and crops -------------------------------------------------------------------------------------


def test_seeds_and_crops_are_recorded_per_image_and_summarised_over_seeds(sr, tmp_path):
    from onestep.eval.sources import crop_boxes

    flags = ["--pipeline", sr["student"], "--seeds", "0,1,2", "--crops-per-image", "2", "--crop-size", "32"]
    flags += ["--teacher", sr["teacher"], "--teacher-steps", "1", "--crop-border", "2"]
    rec, again = _sr(sr, tmp_path, *flags), _sr(sr, tmp_path, *flags, name="again.json")
    rows = rec["per_image"]
    assert rec["seeds"] == [0, 1, 2] and rec["num_images"] == 2 and rec["measurements_per_seed"] == 4
    assert len(rows) == 12 and {(r["seed"], r["image"]) for r in rows} == {(s, n) for s in (0, 1, 2) for n in "ab"}
    assert rows == again["per_image"]  # crops and noise are fixed by the seed
    crops = {s: [(r["crop"]["top"], r["crop"]["left"]) for r in rows if r["seed"] == s] for s in (0, 1, 2)}
    assert crops[0] != crops[1] and all(t % 4 == 0 and left % 4 == 0 for c in crops.values() for t, left in c)
    assert crops[0][:2] == crop_boxes("a", (48, 48), 32, 2, 0, 4)
    for key in ("psnr_y", "ssim_rgb", "sharpness", "teacher_psnr_y", "teacher_mad"):
        per_seed = [np.mean([r[key] for r in rows if r["seed"] == s]) for s in (0, 1, 2)]
        summary = rec["over_seeds"][key]
        assert summary["per_seed"] == {str(s): pytest.approx(v) for s, v in zip((0, 1, 2), per_seed)}
        assert summary["mean"] == pytest.approx(np.mean(per_seed)) and rec[key] == summary["mean"]
        assert summary["std"] == pytest.approx(np.std(per_seed, ddof=1))
    # One row by hand: the HR crop against the pipeline's output for the LR crop, noise index i * K + k.
    row = rows[1]  # seed 0, image a, crop 1
    top, left = row["crop"]["top"], row["crop"]["left"]
    low = np.asarray(Image.open(f"{sr['lr']}/a.png"))[top // 4 : (top + 32) // 4, left // 4 : (left + 32) // 4]
    out = _by_hand(sr["student"], low, 0, 1)[2:-2, 2:-2]
    hr = np.asarray(Image.open(f"{sr['hr']}/a.png"))[top : top + 32, left : left + 32][2:-2, 2:-2]
    assert row["psnr_rgb"] == pytest.approx(metrics.psnr(out, hr), rel=1e-12)


def test_one_seed_keeps_the_whole_image_record_and_bad_crop_flags_are_refused(sr, tmp_path, capsys):
    rec = _sr(sr, tmp_path, "--pipeline", sr["student"])
    assert rec["seeds"] == [0] and rec["crops"] is None and rec["over_seeds"]["psnr_y"]["std"] is None
    assert "crop" not in rec["per_image"][0] and rec["lpips"] is None and "--lpips-weights" in rec["lpips_note"]
    base = ["sr", "--hr", sr["hr"], "--lr", sr["lr"], "--pipeline", sr["student"]]
    assert "needs --crop-size" in _refused([*base, "--crops-per-image", "2"], capsys, tmp_path)
    line = _refused([*base, "--crops-per-image", "2", "--crop-size", "30"], capsys, tmp_path)
    assert "not a multiple of the scale 4" in line
    assert "larger than the 48x48 HR image" in _refused(
        [*base, "--crops-per-image", "1", "--crop-size", "64"], capsys, tmp_path
    )
    assert "distinct seeds" in _refused([*base, "--seeds", "1,1"], capsys, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _main([*base, "--seed", "1", "--seeds", "0,1", "--output", tmp_path / "x.json"])
    assert exit_.value.code == 2 and "--seed or --seeds" in capsys.readouterr().err


# --- 3. LPIPS from local files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random AlexNet trunk (torchvision's layout, features only) and random non-negative linear layers."""
    import torchvision

    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, root / "alex.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lin, root / "lin.pth")
    return str(root / "lin.pth"), str(root / "alex.pth")


def test_lpips_from_local_files_equals_the_lpips_package(lpips_files, tmp_path):
    lpips = pytest.importorskip("lpips")
    weights, backbone = lpips_files
    ref = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
    trunk = torch.load(backbone, weights_only=True)
    for name, param in ref.net.named_parameters():  # slice1.0.weight <- features.0.weight
        param.data.copy_(trunk["features." + name.split(".", 1)[1]])
    ref.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    rng = np.random.RandomState(0)
    a, b = (rng.randint(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(2))
    to = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        expected = float(ref(to(a), to(b)))
    assert metrics.LocalLPIPS(weights, backbone)(a, b) == pytest.approx(expected, rel=1e-5)


def test_sr_records_lpips_from_local_files_offline(lpips_files, tmp_path, capsys):
    weights, backbone = lpips_files
    hr_dir, noisy_dir = tmp_path / "hr", tmp_path / "noisy"
    hr_dir.mkdir(), noisy_dir.mkdir()
    hr = _photo()
    Image.fromarray(hr).save(hr_dir / "a.png")
    noisy = np.clip(hr + np.random.RandomState(0).randn(*hr.shape) * 20, 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(noisy_dir / "a.png")
    flags = ["--lpips-weights", weights, "--lpips-backbone", backbone]
    same, out = tmp_path / "same.json", tmp_path / "noisy.json"
    _main(["sr", "--hr", hr_dir, "--sr", hr_dir, *flags, "--output", same])
    _main(["sr", "--hr", hr_dir, "--sr", noisy_dir, *flags, "--output", out])
    rec = json.loads(out.read_text())
    assert json.loads(same.read_text())["lpips"] == 0.0
    assert rec["lpips"] == pytest.approx(metrics.LocalLPIPS(weights, backbone)(noisy, hr), rel=1e-6)
    assert (
        rec["lpips"] > 0 and rec["lpips_model"]["backbone"]["path"] == backbone and "LPIPS" in capsys.readouterr().out
    )


def test_missing_or_unreadable_lpips_files_are_named(lpips_files, tmp_path, capsys):
    weights, backbone = lpips_files
    base = ["sr", "--hr", "{hr}", "--sr", "{hr}"]
    (tmp_path / "hr").mkdir()
    Image.fromarray(_photo()).save(tmp_path / "hr" / "a.png")
    (tmp_path / "broken.pth").write_bytes(b"not a weights file")
    base = [str(tmp_path / "hr") if a == "{hr}" else a for a in base]
    missing = str(tmp_path / "missing.pth")
    cases = [
        (["--lpips-weights", missing, "--lpips-backbone", backbone], f"--lpips-weights {missing} does not exist"),
        (
            ["--lpips-weights", weights, "--lpips-backbone", str(tmp_path / "broken.pth")],
            "broken.pth is not a readable",
        ),
        (["--lpips-weights", backbone, "--lpips-backbone", backbone], "has no linear layer lin0"),
        (["--lpips-weights", weights, "--lpips-backbone", weights], "is neither torchvision's AlexNet"),
        (["--lpips-weights", weights], "needs both"),
    ]
    for flags, message in cases:
        assert message in _refused([*base, *flags], capsys, tmp_path)


# --- 1. bench on a super-resolution student -------------------------------------------------------------------


def test_bench_times_a_super_resolution_student_and_its_teacher(sr, tmp_path):
    out = tmp_path / "bench.json"
    _main(
        ["bench", "--pipeline", sr["student"], "--teacher", sr["teacher"], "--teacher-steps", "1", "3"]
        + ["--repeats", "2", "--output", out]
    )
    rec = json.loads(out.read_text())
    rows = rec["results"]
    assert rec["kind"] == "super-resolution" and rec["batch_size"] == 1
    assert rec["input"]["kind"] == "bundled held-out photograph" and rec["input"]["size"] == "16x16"  # 64-px tile / 4
    assert [r["sampler"] for r in rows] == ["student (1 step)", "teacher, 1 step", "teacher, 3 steps"]
    assert all(r["images_per_s"] > 0 and r["ms_per_image"] == pytest.approx(1000 / r["images_per_s"]) for r in rows)
    image = tmp_path / "low.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 12, 3), dtype=np.uint8)).save(image)
    _main(
        ["bench", "--pipeline", sr["student"], "--image", image, "--batch-size", "2", "--repeats", "1"]
        + ["--output", out]
    )
    rec = json.loads(out.read_text())
    assert rec["input"]["size"] == "12x8" and rec["batch_size"] == 2 and len(rec["results"]) == 1


# --- 4. the held-out table recipe on tiny inputs ----------------------------------------------------------------


def test_sr_natural_recipe_adds_sharpness_and_teacher_distance_over_seeds_and_crops(sr, tmp_path):
    from onestep.eval.recipes.sr_natural import main as recipe

    data = tmp_path / "data"
    shutil.copytree(sr["hr"], data / "hr")
    shutil.copytree(sr["lr"], data / "lr")
    (data / "bicubic").mkdir()
    for name in ("a", "b"):
        Image.open(data / "lr" / f"{name}.png").resize((48, 48), Image.BICUBIC).save(data / "bicubic" / f"{name}.png")
    argv = ["--data", data, "--resshift", sr["teacher"], "--tadsr", sr["student"], "--seeds", "0,1"]
    table = recipe(
        [str(a) for a in argv + ["--crops_per_image", "2", "--crop_size", "24", "--output", tmp_path / "o"]]
    )
    rows = {r["row"]: r for r in table}
    assert list(rows) == [
        "bicubic",
        "ResShift teacher, 15 steps",
        "ResShift teacher, 1 step",
        "TAD-SR student, 1 step",
    ]
    for r in table:
        assert r["teacher"] == "ResShift teacher, 15 steps" and r["seeds"] == [0, 1] and r["crop_size"] == 24
        assert {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "sharpness", "teacher_psnr_y", "teacher_mad"} <= set(r)
        assert r["psnr_y_std"] is not None and r["sharpness"] > 0
    full = rows["ResShift teacher, 15 steps"]
    assert full["teacher_psnr_y"] == float("inf") and full["teacher_mad"] == 0.0  # the teacher against itself
    assert full["images_per_second"] > 0  # its outputs came from the bicubic row's teacher run: timed there
    written = json.loads((tmp_path / "o" / "table.json").read_text())
    assert written[1]["teacher_psnr_y"] == "inf" and (tmp_path / "o" / "side_by_side.png").exists()
    record = json.loads((tmp_path / "o" / "row3.json").read_text())
    assert len(record["per_image"]) == 2 * 2 * 2 and record["crops"]["per_image"] == 2
