"""DMD2 on Stable-Diffusion-shaped teachers built in code: train with the real script, export to the
stock pipeline, reload in a fresh process, and check the sampling contract numerically."""

import json
import shutil

import pytest
import torch

from onestep.errors import UserError
from tests.helpers import PY, run, save_hf_dataset, tiny_cond_unet

TINY = ["--train_batch_size", "2", "--mixed_precision", "no", "--validation_steps", "1000", "--no-gan"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from onestep.testing.tiny_sd import save_tiny_sd15, save_tiny_sdxl

    root = tmp_path_factory.mktemp("t2i")
    (root / "prompts.txt").write_text("a cat\na red car on a street\ntwo dogs on grass\n")
    return {
        "sd15": save_tiny_sd15(str(root / "sd15")),
        "sdxl": save_tiny_sdxl(str(root / "sdxl")),
        "prompts": str(root / "prompts.txt"),
        "root": root,
    }


def _train(teacher, prompts, out, *extra):
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teacher,
            "--prompt_file",
            prompts,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            *TINY,
            *extra,
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


FRESH = r"""
import sys, json, torch
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
steps = int(sys.argv[2])
img = pipe("a cat", num_inference_steps=steps, guidance_scale=0, generator=torch.Generator().manual_seed(0), output_type="np").images
assert 'onestep' not in sys.modules
print(json.dumps({"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "shape": list(img.shape),
                  "timesteps": [int(t) for t in pipe.scheduler.timesteps]}))
"""


def test_sd15_one_step_exports_a_stock_pipeline_whose_plain_call_is_the_student(teachers, tmp_path):
    out = _train(teachers["sd15"], teachers["prompts"], tmp_path / "sd15", "--preset", "sd15")
    r = run([PY, "-c", FRESH, str(out), "1"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info == {
        "class": "StableDiffusionPipeline",
        "scheduler": "DDIMScheduler",
        "shape": [1, 16, 16, 3],
        "timesteps": [999],
    }
    # The ordinary call's latent equals the student's x0 at t = 999 computed by hand from its UNet.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    lat = pipe("a cat", num_inference_steps=1, guidance_scale=0, latents=z, output_type="latent").images
    emb = pipe.encode_prompt("a cat", "cpu", 1, False)[0]
    with torch.no_grad():
        eps = pipe.unet(z, 999, encoder_hidden_states=emb).sample
    abar = pipe.scheduler.alphas_cumprod[999].double()
    x0 = ((z.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()).float()
    assert torch.allclose(lat, x0, atol=1e-5)
    assert "StableDiffusionPipeline" in (out / "README.md").read_text()


def test_sdxl_four_step_export_equals_the_explicit_timesteps_call(teachers, tmp_path):
    out = _train(
        teachers["sdxl"],
        teachers["prompts"],
        tmp_path / "sdxl",
        "--preset",
        "sdxl-4step",
        "--conditioning_timesteps",
        "999,749,499,249",
    )
    r = run([PY, "-c", FRESH, str(out), "4"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["class"] == "StableDiffusionXLPipeline" and info["scheduler"] == "LCMScheduler"
    assert info["timesteps"] == [999, 749, 499, 249] and info["shape"] == [1, 16, 16, 3]
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out))
    a = pipe(
        "a cat",
        num_inference_steps=4,
        guidance_scale=0,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    ).images
    b = pipe(
        "a cat",
        timesteps=[999, 749, 499, 249],
        guidance_scale=0,
        generator=torch.Generator().manual_seed(2),
        output_type="latent",
    ).images
    assert torch.equal(a, b)


def test_stock_scheduler_reproduces_trained_timesteps_or_refuses():
    from onestep.text_export import stock_scheduler
    from tests.helpers import sd_scheduler_config

    cfg = sd_scheduler_config()
    assert [int(t) for t in stock_scheduler(cfg, [999]).timesteps] == [999]
    assert [int(t) for t in stock_scheduler(cfg, [399]).timesteps] == [399]  # SDXL one-step (DMD2's t = 399)
    assert [int(t) for t in stock_scheduler(cfg, [999, 499]).timesteps] == [999, 499]
    with pytest.raises(UserError, match="No stock scheduler"):
        stock_scheduler(cfg, [999, 600, 100])
    with pytest.raises(UserError, match="resets steps_offset"):
        stock_scheduler(cfg, [399], offset_allowed=False)


def test_text_cfg_real_score_is_uncond_plus_w_times_the_difference():
    from onestep.denoiser import Cond, Denoiser
    from onestep.schedules import schedule_from_scheduler_config
    from tests.helpers import sd_scheduler_config

    spec = schedule_from_scheduler_config(sd_scheduler_config())
    den = Denoiser(tiny_cond_unet(), spec.schedule, spec.prediction_type).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    cond, uncond = (
        Cond(encoder_hidden_states=torch.randn(3, 77, 12)),
        Cond(encoder_hidden_states=torch.randn(3, 77, 12)),
    )
    with torch.no_grad():
        guided = den.guided(x, t, cond, uncond, 1.75)
        c, u = den(x, t, cond), den(x, t, uncond)
    assert torch.allclose(guided, u + 1.75 * (c - u), atol=1e-5)


@pytest.mark.parametrize("case", ["no tokenizer", "empty prompts", "bad resolution"])
def test_bad_text_to_image_input_gives_one_sentence(teachers, tmp_path, case):
    teacher, prompts, extra = teachers["sd15"], teachers["prompts"], []
    if case == "no tokenizer":
        teacher = str(tmp_path / "broken")
        shutil.copytree(teachers["sd15"], teacher)
        shutil.rmtree(f"{teacher}/tokenizer")
        message = "has no tokenizer/"
    elif case == "empty prompts":
        prompts = str(tmp_path / "empty.txt")
        open(prompts, "w").write("\n")
        message = "holds no prompts"
    else:
        extra, message = ["--resolution", "18"], "cannot be taken"
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teacher,
            "--prompt_file",
            prompts,
            "--output_dir",
            str(tmp_path / "out"),
            "--preset",
            "sd15",
            *TINY,
            *extra,
        ]
    )
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_lora_student_exports_an_adapter_the_teacher_pipeline_loads(teachers, tmp_path):
    out = _train(
        teachers["sd15"],
        teachers["prompts"],
        tmp_path / "lora",
        "--preset",
        "sd15",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "2",
    )
    from diffusers import DDIMScheduler, DiffusionPipeline

    student = DiffusionPipeline.from_pretrained(str(out))
    teacher = DiffusionPipeline.from_pretrained(teachers["sd15"], safety_checker=None, requires_safety_checker=False)
    teacher.scheduler = DDIMScheduler.from_pretrained(str(out), subfolder="scheduler")
    teacher.load_lora_weights(str(out / "lora"))
    scales = {v for m in teacher.unet.modules() if hasattr(m, "scaling") for v in m.scaling.values()}
    assert scales == {0.5}  # alpha / rank survives the export (diffusers would assume 1 without the metadata)
    # Every trained layer arrives, the attention projections included, with the trained values.
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = {
        k.removeprefix("unet."): v for k, v in load_file(out / "lora" / "pytorch_lora_weights.safetensors").items()
    }
    loaded = get_peft_model_state_dict(teacher.unet, adapter_name=next(iter(teacher.unet.peft_config)))
    assert any(".attn1.to_q." in k for k in saved) and set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=1, guidance_scale=0, latents=z, output_type="latent")
    a, b = student("a cat", **kw).images, teacher("a cat", **kw).images
    assert torch.allclose(a, b, atol=1e-5)
    plain = DiffusionPipeline.from_pretrained(teachers["sd15"], safety_checker=None, requires_safety_checker=False)
    plain.scheduler = teacher.scheduler
    assert not torch.allclose(
        plain("a cat", **kw).images, a, atol=1e-6
    )  # the adapter trained: G moved off the teacher


def test_lora_targets_that_match_nothing_are_refused(teachers, tmp_path):
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teachers["sd15"],
            "--prompt_file",
            teachers["prompts"],
            "--output_dir",
            str(tmp_path / "out"),
            "--preset",
            "sd15",
            *TINY,
            "--lora_rank",
            "4",
            "--lora_targets",
            "nothing_here",
        ]
    )
    assert r.returncode == 2 and "match no module" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def _captioned_folder(root, with_all_captions=True):
    import numpy as np
    from PIL import Image

    root.mkdir()
    rng = np.random.RandomState(0)
    rows = []
    for i in range(5):
        Image.fromarray(rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        if with_all_captions or i:
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows))
    return str(root)


def test_the_sd15_recipe_runs_both_stages_from_one_command_with_a_latent_cache(teachers, tmp_path):
    """--preset sd15: distribution matching (no GAN), then the GAN stage from its weights (the head is new), one
    export; the GAN reads real latents encoded once into the cache."""
    data = _captioned_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    args = [
        "--pretrained_model_name_or_path",
        teachers["sd15"],
        "--prompt_file",
        teachers["prompts"],
        "--preset",
        "sd15",
        "--train_batch_size",
        "2",
        "--mixed_precision",
        "no",
        "--validation_steps",
        "1000",
        "--max_train_steps",
        "2",
        "--train_data_dir",
        data,
        "--cache_latents",
        "--latent_cache_dir",
        str(cache),
    ]
    r = run([PY, "train/dmd2.py", "--output_dir", str(tmp_path / "a"), *args])
    assert r.returncode == 0, r.stderr[-3000:]
    shards = sorted(cache.glob("latents-*.safetensors"))
    assert len(shards) == 1
    from safetensors.torch import load_file

    assert load_file(shards[0])["latents"].shape == (5, 4, 8, 8)  # 16x16 centre crops through the VAE (factor 2)
    stamp = shards[0].stat().st_mtime_ns
    run_dir = tmp_path / "a"
    assert (run_dir / "model_index.json").is_file() and not (run_dir / "dm" / "model_index.json").exists()
    assert all((run_dir / stage / "stage.json").is_file() for stage in ("dm", "gan"))
    first = (run_dir / "dm" / "logs" / "losses.csv").read_text().splitlines()[0].split(",")
    losses = (run_dir / "gan" / "logs" / "losses.csv").read_text().splitlines()[0].split(",")
    assert "loss_d" not in first and "loss_d" in losses and "loss_g_gan" in losses  # the GAN ran in stage 2 only
    assert "Started the models from" in r.stdout + r.stderr and "critic.head" not in r.stderr
    # A later run over the same data reads the shards back instead of encoding again.
    import json as _json

    from onestep.data import CaptionedLatentBatches, ImageFolder

    def must_not_encode(images):
        raise AssertionError("the cache should have been reused")

    vae_cfg = _json.loads(open(f"{teachers['sd15']}/vae/config.json").read())
    again = CaptionedLatentBatches(
        ImageFolder(data, 16),
        2,
        0,
        must_not_encode,
        lambda texts: None,
        cache_dir=str(cache),
        cache_key=_json.dumps(vae_cfg, sort_keys=True),
    )
    assert torch.equal(again.latents, load_file(shards[0])["latents"]) and shards[0].stat().st_mtime_ns == stamp


def test_gan_data_without_captions_is_refused(teachers, tmp_path):
    data = _captioned_folder(tmp_path / "data", with_all_captions=False)
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teachers["sd15"],
            "--prompt_file",
            teachers["prompts"],
            "--output_dir",
            str(tmp_path / "out"),
            "--preset",
            "sd15",
            "--train_batch_size",
            "2",
            "--gan",
            "--train_data_dir",
            data,
        ]
    )
    assert r.returncode == 2 and "has no caption" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_gan_on_a_hugging_face_dataset_with_a_latent_cache(teachers, tmp_path):
    data = save_hf_dataset(tmp_path / "hfdata", [f"thing {i}" for i in range(6)], caption_column="caption")
    cache = tmp_path / "cache"
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teachers["sd15"],
            "--prompt_file",
            teachers["prompts"],
            "--preset",
            "sd15",
            "--output_dir",
            str(tmp_path / "a"),
            "--train_batch_size",
            "2",
            "--mixed_precision",
            "no",
            "--validation_steps",
            "1000",
            "--max_train_steps",
            "2",
            "--gan",
            "--dataset_name",
            data,
            "--caption_column",
            "caption",
            "--cache_latents",
            "--latent_cache_dir",
            str(cache),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    shards = sorted(cache.glob("latents-*.safetensors"))
    assert len(shards) == 1 and load_file(shards[0])["latents"].shape == (6, 4, 8, 8)
    assert "loss_d" in (tmp_path / "a" / "gan" / "logs" / "losses.csv").read_text().splitlines()[0]
    # The dataset's rows, cropped like folder images, are what the cache holds.
    import datasets

    from onestep.data import HFImageCaptions, center_crop_tensor

    ds = HFImageCaptions(data, 16, caption_column="caption")
    assert ds.captions == [f"thing {i}" for i in range(6)]
    row = datasets.load_dataset(data, split="train")[3]["image"]
    assert torch.equal(ds[3][0], center_crop_tensor(row.convert("RGB"), 16))


def test_gan_data_from_a_folder_and_a_dataset_at_once_is_refused(teachers, tmp_path):
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teachers["sd15"],
            "--prompt_file",
            teachers["prompts"],
            "--preset",
            "sd15",
            "--output_dir",
            str(tmp_path / "out"),
            "--gan",
            "--dataset_name",
            "some/data",
            "--train_data_dir",
            "somewhere",
        ]
    )
    assert r.returncode == 2 and "either --train_data_dir or --dataset_name" in r.stderr.strip().splitlines()[-1], (
        r.stderr[-2000:]
    )


def test_a_text_to_image_run_without_a_preset_starts_with_in_training_fid_off(teachers, tmp_path):
    """The default preset's in-training FID (made for the digits) must not stop an SD run that never asked for it."""
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teachers["sd15"],
            "--prompt_file",
            teachers["prompts"],
            "--output_dir",
            str(tmp_path / "out"),
            "--conditioning_timesteps",
            "999",
            "--max_train_steps",
            "2",
            *TINY,
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "In-training FID is off" in r.stdout + r.stderr and (tmp_path / "out" / "model_index.json").exists()
    r = run(
        [
            PY,
            "train/dmd2.py",
            "--pretrained_model_name_or_path",
            teachers["sd15"],
            "--prompt_file",
            teachers["prompts"],
            "--output_dir",
            str(tmp_path / "asked"),
            "--conditioning_timesteps",
            "999",
            "--eval_steps",
            "5",
            *TINY,
        ]
    )
    assert r.returncode == 2 and "not supported yet" in r.stderr and not (tmp_path / "asked").exists()
