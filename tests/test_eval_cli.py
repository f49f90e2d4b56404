"""onestep-eval end to end: reproducible records, 1 vs 2 processes, every source kind, bad input."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.eval import metrics
from tests.helpers import PY, run, save_tiny_teacher, sd_scheduler_config, tiny_unet

EVAL = [PY, "-m", "onestep.eval.cli"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A random 16x16 class-conditional student exported like train/dmd2.py does (10 classes + null)."""
    from onestep.export import export_one_step

    path = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    export_one_step(
        tiny_unet(num_class_embeds=11, sample_size=16),
        sd_scheduler_config(),
        [399],
        str(path),
        {"teacher": "tiny", "method": "test"},
        num_classes=10,
    )
    return str(path)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from onestep.eval.sources import digits_reference_images

    path = tmp_path_factory.mktemp("digits")
    images, labels = digits_reference_images()
    for i in range(60):
        Image.fromarray(images[i, :, :, 0]).save(path / f"{i:03d}.png")
    return str(path)


def _main(argv):
    """onestep-eval in this process: the same code path as the console script minus interpreter start-up
    (the process boundary, exit codes and multi-process runs are tested separately below)."""
    from onestep.eval.cli import main

    return main([str(a) for a in argv])


def _ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _fid(tmp_path, name, extra, launcher=None, subprocess=False):
    out = tmp_path / f"{name}.json"
    if not (launcher or subprocess):
        _main(["fid", *extra, "--output", out])
        return json.loads(out.read_text())
    cmd = (launcher or EVAL) + ["fid", *extra, "--output", str(out)]
    # One thread everywhere: accelerate pins each launched process to one, and the thread count changes the
    # float summation order inside convolutions (~1e-10 relative), which is not what this test is about.
    _ok(run(cmd, env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}))
    return json.loads(out.read_text())


def test_fid_of_a_pipeline_is_the_same_twice_and_with_two_processes(tmp_path, student):
    args = [
        "--pipeline",
        student,
        "--ref",
        "digits",
        "--features",
        "digits",
        "--num-samples",
        "40",
        "--batch-size",
        "8",
        "--seed",
        "3",
    ]
    a = _fid(
        tmp_path,
        "a",
        args + ["--save-stats", str(tmp_path / "gen.npz"), "--plot", str(tmp_path / "grid.png")],
        subprocess=True,
    )
    b = _fid(tmp_path, "b", args, subprocess=True)
    launcher = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        "no",
        "-m",
        "onestep.eval.cli",
    ]
    c = _fid(tmp_path, "c", args, launcher)
    assert a["fid"] == b["fid"] == c["fid"] and a["fid"] > 0  # bit for bit, 1 or 2 processes
    assert c["num_processes"] == 2 and a["num_processes"] == 1
    # The record says how to reproduce the number.
    gen = a["generated"]
    assert gen["source"]["kind"] == "pipeline" and len(gen["source"]["weights_sha256"]) == 64
    assert (
        gen["sampling"]["seed"] == 3
        and gen["sampling"]["class_sampling"] == "uniform"
        and "sha256" in gen["sampling"]["seed_scheme"]
    )
    assert a["features"]["name"] == "digits-classifier" and len(a["features"]["weights_sha256"]) == 64
    assert a["reference"]["num_images"] == 1797 and a["versions"]["clean-fid"] and 0 <= a["class_accuracy"] <= 1
    assert (tmp_path / "grid.png").exists()
    # Another seed gives another number; KID from the saved features equals KID recomputed from the pipeline.
    d = _fid(tmp_path, "d", args[:-1] + ["4"])
    assert d["fid"] != a["fid"]
    k1, k2 = tmp_path / "k1.json", tmp_path / "k2.json"
    _main(
        [
            "kid",
            "--stats",
            str(tmp_path / "gen.npz"),
            "--ref",
            "digits",
            "--features",
            "digits",
            "--seed",
            "3",
            "--output",
            str(k1),
        ]
    )
    _main(["kid", *args, "--output", str(k2)])
    # (this process runs 2 threads, the saved features came from a 1-thread one: equal to float noise)
    assert json.loads(k1.read_text())["kid"] == pytest.approx(json.loads(k2.read_text())["kid"], rel=1e-6)


def test_teacher_source_against_a_folder_and_a_statistics_file(tmp_path, digits_folder):
    teacher = save_tiny_teacher(str(tmp_path / "teacher"))
    ref_npz = tmp_path / "ref.npz"
    _main(["stats", "--images", digits_folder, "--features", "digits", "--output", str(ref_npz)])
    common = ["--teacher", teacher, "--steps", "2", "--features", "digits", "--num-samples", "12", "--batch-size", "6"]
    from_folder = _fid(tmp_path, "f", common + ["--ref", digits_folder])
    from_stats = _fid(tmp_path, "s", common + ["--ref", str(ref_npz)])
    # Same features up to float noise: the folder and stats runs batch the images differently (6 vs 64).
    assert from_folder["fid"] == pytest.approx(from_stats["fid"], rel=1e-6)
    assert (
        from_folder["generated"]["source"]["kind"] == "teacher"
        and from_folder["generated"]["source"]["num_inference_steps"] == 2
    )
    assert from_stats["reference"]["kind"] == "statistics file" and len(from_stats["reference"]["sha256"]) == 64
    # The folder evaluated as images: its FID against its own statistics is ~0.
    self_fid = _fid(tmp_path, "self", ["--images", digits_folder, "--features", "digits", "--ref", str(ref_npz)])
    assert abs(self_fid["fid"]) < 1e-6


def test_bench_reports_speed_of_student_and_teacher(tmp_path, student):
    teacher = save_tiny_teacher(str(tmp_path / "teacher"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "timing.json").write_text(json.dumps({"phases": {"critic": 1.0}}))
    out = tmp_path / "bench.json"
    _main(
        [
            "bench",
            "--pipeline",
            student,
            "--teacher",
            teacher,
            "--teacher-steps",
            "1",
            "32",
            "--batch-size",
            "4",
            "--repeats",
            "2",
            "--run",
            str(run_dir),
            "--plot",
            str(tmp_path / "speed.png"),
            "--output",
            str(out),
        ]
    )
    rec = json.loads(out.read_text())
    rows = rec["results"]
    assert [r["sampler"] for r in rows][1:] == ["teacher DDIM 1 step", "teacher DDIM 32 steps"]
    assert all(r["images_per_s"] > 0 and len(r["latency_s_all"]) == 2 for r in rows)
    assert rows[2]["student_speedup"] > rows[1]["student_speedup"]  # 32 teacher steps cost more than 1
    assert rec["training_step_breakdown"] == {"phases": {"critic": 1.0}} and (tmp_path / "speed.png").exists()


def test_sr_metrics_of_folders_match_the_library(tmp_path):
    from skimage import data

    hr_dir, sr_dir = tmp_path / "hr", tmp_path / "sr"
    hr_dir.mkdir(), sr_dir.mkdir()
    rng = np.random.RandomState(0)
    pairs = []
    for i, img in enumerate((data.astronaut(), data.coffee())):
        hr = img[:64, :64]
        sr = np.clip(hr.astype(float) + rng.randn(*hr.shape) * 10, 0, 255).astype(np.uint8)
        Image.fromarray(hr).save(hr_dir / f"{i}.png")
        Image.fromarray(sr).save(sr_dir / f"{i}.png")
        pairs.append((sr[4:-4, 4:-4], hr[4:-4, 4:-4]))
    out = tmp_path / "sr.json"
    _main(["sr", "--sr", str(sr_dir), "--hr", str(hr_dir), "--crop-border", "4", "--output", str(out)])
    rec = json.loads(out.read_text())
    assert rec["psnr_rgb"] == pytest.approx(np.mean([metrics.psnr(a, b) for a, b in pairs]), rel=1e-9)
    assert rec["ssim_y"] == pytest.approx(
        np.mean([metrics.ssim(metrics.rgb_to_y(a), metrics.rgb_to_y(b)) for a, b in pairs]), rel=1e-9
    )
    assert rec["num_images"] == 2 and rec["protocol"]["crop_border"] == 4 and rec["lpips"] is None
    # LPIPS is an optional extra: without its package the error names the extra to install.
    import sys

    from onestep.errors import UserError

    saved = sys.modules.get("lpips")
    sys.modules["lpips"] = None  # makes `import lpips` raise ImportError
    try:
        with pytest.raises(UserError, match=r"onestep\[lpips\]"):
            _main(["sr", "--sr", str(sr_dir), "--hr", str(hr_dir), "--lpips", "--output", str(tmp_path / "lp.json")])
    finally:
        sys.modules.pop("lpips")
        if saved is not None:
            sys.modules["lpips"] = saved
    assert not (tmp_path / "lp.json").exists()


def test_clip_score_of_a_captioned_folder_with_a_local_checkpoint(tmp_path):
    import open_clip

    from onestep.eval.clip import clip_scores, load_open_clip
    from tests.test_eval_metrics import tiny_clip_config

    config = tiny_clip_config(tmp_path)
    torch.manual_seed(0)
    clip = load_open_clip(config, "none")
    ckpt = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), ckpt)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(1)
    rows = []
    for i, cap in enumerate(["a cat", "a dog on grass", "a red car"]):
        Image.fromarray(rng.randint(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": cap})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "clip.json"
    _main(
        [
            "clip",
            "--images",
            str(folder),
            "--model",
            config,
            "--pretrained",
            str(ckpt),
            "--crop-size",
            "32",
            "--output",
            str(out),
        ]
    )
    rec = json.loads(out.read_text())
    images = [np.asarray(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(3)]
    loaded = load_open_clip(config, str(ckpt))
    expected = clip_scores(loaded, images, [r["text"] for r in rows], crop_size=32).mean()
    assert rec["clip_score"] == pytest.approx(expected, rel=1e-5)
    assert rec["prompt_prefix"] == "A photo depicts " and rec["scale"].startswith("raw cosine")
    assert rec["clip_model"]["weights_sha256"] == loaded.weights_sha256 and rec["num_images"] == 3
    assert open_clip  # the tokenizer and model come from open_clip itself


def _fake_inception(path):
    """A TorchScript stand-in with clean-fid's interface (layers + return_features); real weights cannot be downloaded here."""

    class Layers(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    torch.jit.save(torch.jit.script(Net()), str(path))


def test_inception_weights_are_checked_cached_and_used(tmp_path, monkeypatch):
    from onestep.errors import UserError
    from onestep.eval import features

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="--inception-weights"):
        features.InceptionFeatures("clean")  # nothing cached, downloads off
    fake = tmp_path / "inception.pt"
    _fake_inception(fake)
    with pytest.raises(UserError, match="SHA-256"):
        features.InceptionFeatures("clean", weights=str(fake))
    monkeypatch.setattr(features, "INCEPTION_SHA256", features.file_sha256(str(fake)))
    ext = features.InceptionFeatures("clean", weights=str(fake))
    cached = tmp_path / "cache" / "inception" / features.INCEPTION_FILE
    assert cached.exists() and ext.weights_sha256 == features.file_sha256(str(fake))
    images = np.random.RandomState(0).randint(0, 256, (3, 20, 24, 1), dtype=np.uint8)
    feats = ext(images)
    # clean mode: grey -> RGB, PIL bicubic to 299, then (x - 128) / 128 inside the wrapper.
    from cleanfid.resize import build_resizer

    r = build_resizer("clean")(np.repeat(images[0], 3, axis=-1))
    assert feats.shape == (3, 2048) and feats[0, 0] == pytest.approx(((r[..., 0] - 128) / 128).mean(), rel=1e-5)
    assert (
        features.InceptionFeatures("clean").weights_sha256 == ext.weights_sha256
    )  # found in the cache the second time


BAD = [
    (
        ["fid", "--pipeline", "/nonexistent/student", "--ref", "digits", "--features", "digits", "--num-samples", "4"],
        "No pipeline folder",
    ),
    (["fid", "--images", "{empty}", "--ref", "digits", "--features", "digits"], "holds no images"),
    (["fid", "--images", "{mixed}", "--ref", "digits", "--features", "digits"], "mixed sizes"),
    (["fid", "--images", "{corrupt}", "--ref", "digits", "--features", "digits"], "Cannot read image"),
    (["fid", "--stats", "{wrongdim}", "--ref", "digits", "--features", "digits"], "different dimensions"),
    (["fid", "--images", "{mixed}", "--ref", "digits", "--features", "inception"], "Inception weights"),
    (
        [
            "fid",
            "--images",
            "{mixed}",
            "--ref",
            "digits",
            "--features",
            "inception",
            "--inception-weights",
            "/nonexistent.pt",
        ],
        "does not exist",
    ),
    (
        ["clip", "--images", "{mixed}", "--prompts", "{empty_prompts}", "--model", "ViT-B-32", "--pretrained", "none"],
        "holds no prompts",
    ),
    (
        ["clip", "--images", "{mixed}", "--prompts", "{two_prompts}", "--num-samples", "5", "--model", "ViT-B-32"],
        "more than the 2 images",
    ),
    (["fid", "--images", "{mixed}", "--ref-name", "cifar10", "--features", "inception"], "needs --ref-res"),
    (
        [
            "fid",
            "--stats",
            "{digits_stats}",
            "--ref",
            "digits",
            "--features",
            "inception",
            "--inception-weights",
            "{fake_weights}",
        ],
        "Inception weights",
    ),
]


def _bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (16, 16)).save(mixed / "a.png")
    Image.new("RGB", (20, 16)).save(mixed / "b.png")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "x.png").write_bytes(b"not a png")
    metrics.FeatureStats.from_features(np.random.randn(10, 8)).save(str(tmp_path / "wrongdim.npz"))
    (tmp_path / "prompts.txt").write_text("\n\n")
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "fake.pt").write_bytes(b"not inception")
    return {
        "{empty}": str(tmp_path / "empty"),
        "{mixed}": str(mixed),
        "{corrupt}": str(corrupt),
        "{wrongdim}": str(tmp_path / "wrongdim.npz"),
        "{empty_prompts}": str(tmp_path / "prompts.txt"),
        "{two_prompts}": str(tmp_path / "two.txt"),
        "{fake_weights}": str(tmp_path / "fake.pt"),
        "{digits_stats}": str(tmp_path / "wrongdim.npz"),
    }


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_with_one_sentence(tmp_path, monkeypatch, argv, message):
    from onestep.errors import UserError

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    subs = _bad_inputs(tmp_path)
    with pytest.raises(UserError) as err:
        _main([subs.get(a, a) for a in argv] + ["--output", tmp_path / "out.json"])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("case", [0, 2])
def test_bad_input_exits_2_with_a_single_error_line(tmp_path, case):
    argv, message = BAD[case]
    subs = _bad_inputs(tmp_path)
    r = run(
        EVAL + [subs.get(a, a) for a in argv] + ["--output", str(tmp_path / "out.json")],
        env={"ONESTEP_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out.json").exists()


NEAREST_UPSCALE = '''
import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


class NearestUpscalePipeline(DiffusionPipeline):
    """A stand-in SR pipeline: x2 nearest-neighbour upscaling (no weights)."""

    def __init__(self):
        super().__init__()

    def __call__(self, image, generator=None, num_inference_steps=1, output_type="np"):
        x = np.asarray(image.convert("RGB")).astype(np.float32) / 255
        return ImagePipelineOutput(images=x.repeat(2, axis=0).repeat(2, axis=1)[None])
'''


def test_sr_pipeline_mode_needs_trust_and_matches_the_folder_mode(tmp_path):
    from skimage import data

    pipe_dir, lr_dir, hr_dir, sr_dir = (tmp_path / n for n in ("pipe", "lr", "hr", "sr"))
    for d in (pipe_dir, lr_dir, hr_dir, sr_dir):
        d.mkdir()
    (pipe_dir / "upscale.py").write_text(NEAREST_UPSCALE)
    (pipe_dir / "model_index.json").write_text(
        json.dumps({"_class_name": ["upscale", "NearestUpscalePipeline"], "_diffusers_version": "0.30.0"})
    )
    hr = data.chelsea()[:64, :64]
    lr = hr[::2, ::2]
    Image.fromarray(hr).save(hr_dir / "cat.png")
    Image.fromarray(lr).save(lr_dir / "cat.png")
    Image.fromarray(lr.repeat(2, axis=0).repeat(2, axis=1)).save(sr_dir / "cat.png")
    refused = run(
        EVAL
        + [
            "sr",
            "--pipeline",
            str(pipe_dir),
            "--lr",
            str(lr_dir),
            "--hr",
            str(hr_dir),
            "--output",
            str(tmp_path / "x.json"),
        ]
    )
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _main(
        [
            "sr",
            "--pipeline",
            str(pipe_dir),
            "--lr",
            str(lr_dir),
            "--hr",
            str(hr_dir),
            "--trust-remote-code",
            "--output",
            str(a),
        ]
    )
    _main(["sr", "--sr", str(sr_dir), "--hr", str(hr_dir), "--output", str(b)])
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["psnr_rgb"] == rb["psnr_rgb"] and ra["ssim_y"] == rb["ssim_y"] and ra["source"]["kind"] == "pipeline"


def test_clip_score_of_a_text_to_image_pipeline_is_reproducible(tmp_path):
    """A tiny SD1.5-layout pipeline saved with save_pretrained, scored over a prompt file."""
    from onestep.eval.clip import load_open_clip
    from onestep.testing.tiny_sd import save_tiny_sd15
    from tests.test_eval_metrics import tiny_clip_config

    sd = save_tiny_sd15(str(tmp_path / "sd15"))
    config = tiny_clip_config(tmp_path)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(load_open_clip(config, "none").model.state_dict(), ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "a cat"}\n{"caption": "a red car"}\n{"prompt": "two dogs"}\n')
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        _main(
            [
                "clip",
                "--pipeline",
                sd,
                "--prompts",
                str(prompts),
                "--num-samples",
                "4",
                "--batch-size",
                "2",
                "--steps",
                "2",
                "--model",
                config,
                "--pretrained",
                str(ckpt),
                "--scale",
                "100",
                "--output",
                str(out),
            ]
        )
        outs.append(json.loads(out.read_text()))
    a, b = outs
    assert a["clip_score"] == b["clip_score"] and 0 <= a["clip_score"] <= 100 and a["num_images"] == 4
    assert a["source"]["class"] == "StableDiffusionPipeline" and a["source"]["num_inference_steps"] == 2
    assert a["scale"].startswith("100 * max") and a["prompts_file"] == str(prompts)


def test_crop_size_centre_crops_both_sides_and_takes_mixed_sizes(tmp_path, digits_folder):
    """DMD2's COCO protocol: generated and real images centre-cropped to a square, LANCZOS-resized (to 256
    there); a folder of mixed sizes is then accepted, and the result equals cropping the files by hand."""
    from onestep.eval.sources import center_crop_resize

    rng = np.random.RandomState(0)
    names = sorted(os.listdir(digits_folder))
    mixed, by_hand = tmp_path / "mixed", tmp_path / "by_hand"
    mixed.mkdir(), by_hand.mkdir()
    for i, name in enumerate(names):
        img = np.asarray(Image.open(os.path.join(digits_folder, name)).convert("RGB").resize((16, 16)))
        pad = rng.randint(
            0, 256, (16 + 4 * (i % 3), 16 + 6 * (i % 2), 3), dtype=np.uint8
        )  # odd shapes around the digit
        pad[:16, :16] = img
        Image.fromarray(pad).save(mixed / name)
        center_crop_resize(pad, 12).save(by_hand / name)
    half = len(names) // 2
    for folder in (mixed, by_hand):  # first half evaluated, second half as reference
        (tmp_path / f"{folder.name}_ref").mkdir()
        for name in names[half:]:
            os.replace(folder / name, tmp_path / f"{folder.name}_ref" / name)
    cropped = _fid(
        tmp_path,
        "c",
        ["--images", mixed, "--ref", tmp_path / "mixed_ref", "--features", "digits", "--crop-size", "12"],
    )
    plain = _fid(tmp_path, "p", ["--images", by_hand, "--ref", tmp_path / "by_hand_ref", "--features", "digits"])
    assert cropped["fid"] == pytest.approx(plain["fid"], rel=1e-9) and cropped["fid"] > 0
    assert cropped["generated"]["source"]["num_images"] == half
    assert "centre crop to square, LANCZOS to 12" in cropped["generated"]["features"]["resize"]
    from onestep.errors import UserError

    with pytest.raises(UserError, match="mixed sizes"):  # without the crop, mixed sizes are refused
        _main(
            [
                "fid",
                "--images",
                mixed,
                "--ref",
                tmp_path / "mixed_ref",
                "--features",
                "digits",
                "--output",
                tmp_path / "x.json",
            ]
        )


def test_coco_prompts_recipe_takes_one_caption_per_image_reproducibly(tmp_path):
    from onestep.data import read_prompts
    from onestep.eval.recipes.coco_prompts import main as coco_main

    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(1, 9)]
    anns = [{"id": 100 + k, "image_id": 1 + (k % 8), "caption": f"caption {k} "} for k in range(16)][::-1]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    coco_main(["--annotations", str(path), "--num", "5", "--output", str(tmp_path / "a.jsonl")])
    coco_main(["--annotations", str(path), "--num", "5", "--output", str(tmp_path / "b.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text() and len(rows) == 5
    for r in rows:  # the first caption by annotation id, stripped, with its image's file name
        assert (
            r["text"] == f"caption {r['image_id'] - 1}" and r["file_name"] == f"COCO_val2014_{r['image_id']:012d}.jpg"
        )
    assert read_prompts(str(tmp_path / "a.jsonl")) == [r["text"] for r in rows]
    from onestep.errors import UserError

    with pytest.raises(UserError, match="more than the 8 captioned images"):
        coco_main(["--annotations", str(path), "--num", "9", "--output", str(tmp_path / "c.jsonl")])
