"""TAD-SR on diffusers' latent SR teachers built in code: a tiny LDMSuperResolutionPipeline (UNet2DModel on a VQModel
latent) and a tiny StableDiffusionUpscalePipeline (UNet2DConditionModel, noise level as class labels, CLIP text),
saved with save_pretrained and loaded back by train/tadsr.py; 2 iterations each, exports that
DiffusionPipeline.from_pretrained loads and that upscale x4 in one student evaluation; bad input in one sentence."""

import ast
import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.errors import UserError

LOOP = ["--validation_steps", "1000", "--checkpointing_steps", "1000", "--dataloader_num_workers", "0"]
TINY = ["--train_batch_size", "2", "--max_train_steps", "2", "--resolution", "32", "--teacher_steps", "2"]
TINY += ["--disc_embed_dim", "16", "--disc_logit_channels", "8", "--mixed_precision", "no"]


def _vq():
    from diffusers import VQModel

    return VQModel(
        block_out_channels=(8, 16, 16),  # factor 4, as the LDM-SR and upscaler autoencoders
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=3,
        num_vq_embeddings=16,
        norm_num_groups=4,
        sample_size=32,
    )


def _kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.08333,  # the x4 upscaler's
    )


def save_tiny_ldm_sr(path):
    """LDMSuperResolutionPipeline layout: vqvae/, unet/ (in 3 + 3, out 3), scheduler/ (DDIM, linear betas)."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline

    from tests.helpers import tiny_unet

    torch.manual_seed(0)
    sched = DDIMScheduler(beta_schedule="linear", beta_start=0.0015, beta_end=0.0155, clip_sample=False)
    unet = tiny_unet(sample_size=8, channels=3, in_channels=6)
    LDMSuperResolutionPipeline(vqvae=_vq(), unet=unet, scheduler=sched).save_pretrained(path)
    return str(path)


def save_tiny_upscaler(path):
    """StableDiffusionUpscalePipeline layout: vae/, text_encoder/, tokenizer/, unet/ (in 4 + 3, out 4, noise level
    as class labels), scheduler/ (DDIM, v-prediction), low_res_scheduler/ (DDPM)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    from onestep.testing.tiny_sd import clip_tokenizer, tiny_text_encoder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=7,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
        num_class_embeds=1000,
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=_kl(),
        text_encoder=tiny_text_encoder(12),
        tokenizer=clip_tokenizer(os.path.join(path, ".tok")),
        unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="linear"),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False
        ),
        max_noise_level=350,
    )
    pipe.save_pretrained(path)
    return str(path)


def _tadsr(teacher, out, data, *extra):
    module = importlib.import_module("train.tadsr")
    return module.main(
        ["--pretrained_model_name_or_path", teacher, "--output_dir", str(out), "--train_data_dir", data]
        + TINY
        + LOOP
        + list(extra)
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The trainer keeps the thread count pytest runs with (it would take every core otherwise)."""
    keep = os.environ.get("ONESTEP_KEEP_THREADS")
    os.environ["ONESTEP_KEEP_THREADS"] = "1"
    yield
    if keep is None:
        os.environ.pop("ONESTEP_KEEP_THREADS", None)
    else:
        os.environ["ONESTEP_KEEP_THREADS"] = keep


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _one_thread):
    root = tmp_path_factory.mktemp("latent_sr")
    data = root / "hr"
    data.mkdir()
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rng.randint(0, 256, (36, 40, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (root / "prompts.txt").write_text("a photo\na cat on grass\n")
    out = {"data": str(data), "root": root}
    out["ldm_teacher"] = save_tiny_ldm_sr(root / "ldm")
    out["upscaler_teacher"] = save_tiny_upscaler(root / "upscaler")
    for name, extra in (
        ("ldm", ()),
        ("upscaler", ("--noise_level", "30", "--prompt_file", str(root / "prompts.txt"))),
    ):
        out[name] = str(root / f"{name}-student")
        result = _tadsr(out[f"{name}_teacher"], out[name], out["data"], *extra)
        assert not result["interrupted"]
    return out


def _lr(size=(8, 6)):
    rng = np.random.RandomState(1)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_teacher_folders_are_the_diffusers_pipelines(runs):
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(runs["ldm_teacher"])).__name__ == "LDMSuperResolutionPipeline"
    up = DiffusionPipeline.from_pretrained(runs["upscaler_teacher"])
    assert type(up).__name__ == "StableDiffusionUpscalePipeline"


@pytest.mark.parametrize("name", ["ldm", "upscaler"])
def test_two_iterations_export_a_pipeline_that_upscales_x4(runs, name):
    from diffusers import DiffusionPipeline

    from onestep.pipelines import LatentSuperResolutionPipeline

    folder = runs[name]
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == ["latent_super_resolution", "LatentSuperResolutionPipeline"]
    assert ("vqvae" if name == "ldm" else "vae") in index and os.path.isfile(os.path.join(folder, "README.md"))
    assert os.listdir(os.path.join(folder, "samples"))  # the step-0 grid, decoded
    lr = _lr()
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)  # the folder's own pipeline file
    assert type(remote).__name__ == "LatentSuperResolutionPipeline"
    got = remote(image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert got.shape == (1, 24, 32, 3) and np.isfinite(got).all()
    mine = LatentSuperResolutionPipeline.from_pretrained(folder)  # the installed class
    again = mine(image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(again, got, atol=1e-6)
    pil = mine(image=lr, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (32, 24)
    if name == "upscaler":
        assert mine.config.noise_level == 30
        other = mine(image=lr, prompt="a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
        assert not np.allclose(other, got)  # the prompt reaches the student


def test_pipeline_file_is_self_contained():
    """The shipped file imports the standard library, torch, diffusers, numpy and PIL only (it loads where onestep
    is not installed)."""
    import sys

    from onestep.export import pipeline_source

    tree = ast.parse(open(pipeline_source("latent_super_resolution.py")).read())
    modules = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert modules - set(sys.stdlib_module_names) == {"numpy", "torch", "diffusers", "PIL"}


def _setup(teacher, out, data, *extra, tiny=TINY):
    """train/tadsr.py's set-up (flags -> config -> prepare), without training."""
    from onestep.presets.tadsr import ENTRY
    from onestep.run_setup import prepare
    from onestep.stages import parse

    argv = ["--pretrained_model_name_or_path", teacher, "--output_dir", str(out), "--train_data_dir", data]
    config, preset, _, _ = parse(ENTRY, argv + tiny + LOOP + list(extra))
    return prepare(config, preset, "TAD-SR", needs_real_data=True, kinds=("sr", "latent_sr"))


def _encode(teacher, images):
    if getattr(teacher, "vqvae", None) is not None:
        return teacher.vqvae.encode(images).latents
    return teacher.vae.encode(images).latent_dist.mode() * teacher.vae.config.scaling_factor


@pytest.mark.parametrize("name", ["ldm", "upscaler"])
def test_batches_follow_the_latent_conventions_and_grids_are_decoded(runs, name, tmp_path):
    """z_gt = encoded HR, Cond.shift = encoded bicubic u, Cond.image = the LR pixels on the latent grid (the
    upscaler's noised by its low_res_scheduler at --noise_level, with the prompt's embeddings and the noise level as
    class labels); the sample grid is decoded pixels."""
    from diffusers import DiffusionPipeline

    from onestep.data import degrade
    from onestep.methods.tadsr import TADSR

    extra = ("--noise_level", "30", "--prompt_file", str(runs["root"] / "prompts.txt")) if name == "upscaler" else ()
    setup = _setup(runs[f"{name}_teacher"], tmp_path / "out", runs["data"], *extra)
    assert setup.context.kind == "latent_sr"
    assert setup.context.sample_shape == ((3, 8, 8) if name == "ldm" else (4, 8, 8))
    assert setup.config.method.teacher_steps == 2  # the user's --teacher_steps wins over the latent default
    cpu = torch.device("cpu")
    b, crops = setup.data.batch(0, 0, 0, cpu), setup.data.crops.batch(0, 0, 0, cpu)
    # The trainer builds batches inside its mixed-precision autocast: encoding, prompts and decoding stay fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b16 = setup.data.batch(0, 0, 0, cpu)
        decoded16 = setup.context.decode(b.images)
    torch.testing.assert_close(b16.images, b.images, atol=0, rtol=0)
    for field in ("image", "shift", "encoder_hidden_states"):
        if getattr(b.cond, field) is not None:
            torch.testing.assert_close(getattr(b16.cond, field), getattr(b.cond, field), atol=0, rtol=0)
    torch.testing.assert_close(decoded16, setup.context.decode(b.images), atol=0, rtol=0)
    teacher = DiffusionPipeline.from_pretrained(runs[f"{name}_teacher"])
    with torch.no_grad():
        torch.testing.assert_close(b.images, _encode(teacher, crops.images))
        torch.testing.assert_close(b.cond.shift, _encode(teacher, crops.cond.image))
    lr = degrade(crops.images, 4)
    if name == "ldm":
        torch.testing.assert_close(b.cond.image, lr)
        assert b.cond.encoder_hidden_states is None and b.cond.class_labels is None
    else:
        abar = teacher.low_res_scheduler.alphas_cumprod[30].double()
        noise = (b.cond.image.double() - abar.sqrt() * lr.double()) / (1 - abar).sqrt()
        assert 0.8 < float(noise.std()) < 1.2 and abs(float(noise.mean())) < 0.2
        assert b.cond.class_labels.tolist() == [30, 30]
        tok = teacher.tokenizer
        with torch.no_grad():
            ids = tok(["a photo", "a cat on grass"], padding="max_length", max_length=77, return_tensors="pt")
            prompts = teacher.text_encoder(ids.input_ids)[0]
        for row in b.cond.encoder_hidden_states:
            assert min(float((row - p).abs().max()) for p in prompts) < 1e-5
    method = TADSR(setup.context, setup.config.method, preview=b)
    grid = method.sample_grid({"generator": method.generator}, 8, 0, cpu)
    assert grid.shape == (8, 3, 32, 32) and grid.abs().max() <= 1


@pytest.mark.parametrize("name", ["ldm", "upscaler"])
def test_the_export_is_the_training_one_step_path(runs, name):
    """The exported call equals the student Denoiser of training on the same eps, condition and prompt, decoded:
    x_T = a_999 u + c_999 eps, x0 = the student's prediction converted at t = 999."""
    from diffusers import DiffusionPipeline

    from onestep.denoiser import Cond, Denoiser
    from onestep.latent_sr import UpscalerAdapter
    from onestep.loading import load_teacher
    from onestep.pipelines import LatentSuperResolutionPipeline

    pipe = LatentSuperResolutionPipeline.from_pretrained(runs[name])
    teacher = DiffusionPipeline.from_pretrained(runs[f"{name}_teacher"])
    spec = load_teacher(runs[f"{name}_teacher"]).denoiser
    net = UpscalerAdapter(pipe.unet) if name == "upscaler" else pipe.unet
    student = Denoiser(net, spec.schedule, spec.prediction_type)
    lr = torch.rand(1, 3, 8, 8)
    kw = {"prompt": "a cat"} if name == "upscaler" else {}
    got = pipe(image=lr, generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
    lr_pm, g = lr * 2 - 1, torch.Generator().manual_seed(5)
    with torch.no_grad():
        u = _encode(teacher, torch.nn.functional.interpolate(lr_pm, scale_factor=4, mode="bicubic"))
        eps = torch.randn(u.shape, generator=g)
        cond = Cond(image=lr_pm, shift=u)
        if name == "upscaler":
            levels = torch.tensor([30])
            cond.image = teacher.low_res_scheduler.add_noise(lr_pm, torch.randn(lr.shape, generator=g), levels)
            ids = teacher.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            cond.encoder_hidden_states, cond.class_labels = teacher.text_encoder(ids)[0], levels
        t = torch.tensor([999])
        z = student(spec.schedule.add_noise(u, eps, t, u), t, cond)
        if name == "ldm":
            want = teacher.vqvae.decode(z).sample
        else:
            want = teacher.vae.decode(z / teacher.vae.config.scaling_factor).sample
    torch.testing.assert_close(got, (want.clamp(-1, 1) + 1) / 2, atol=1e-5, rtol=0)


def test_larger_inputs_run_in_latent_tiles(runs):
    from onestep.pipelines import LatentSuperResolutionPipeline

    pipe = LatentSuperResolutionPipeline.from_pretrained(runs["ldm"])
    assert pipe.config.tile_size == 8  # the training latent (32-pixel crops, factor 4)
    big = pipe(image=_lr((20, 12)), generator=torch.Generator().manual_seed(0), output_type="np").images
    assert big.shape == (1, 48, 80, 3) and np.isfinite(big).all()


def test_tiles_blend_to_the_untiled_result():
    """The tiling helper applied to a pointwise function equals the function on the whole canvas: the windows
    land where they were cut and the blending weights sum to 1 (several tile/overlap settings, uneven sides)."""
    from types import SimpleNamespace

    from onestep.pipelines import LatentSuperResolutionPipeline

    g = torch.Generator().manual_seed(0)
    x, lr = torch.randn(2, 4, 19, 37, generator=g), torch.randn(2, 3, 19, 37, generator=g)

    def fn(a, b):
        return torch.tanh(a) * 3 + b[:, :1] ** 2 - b[:, 2:]

    whole = fn(x, lr)
    for tile, overlap in ((8, 2), (8, 0), (5, 4), (16, 4), (7, 3)):
        fake = SimpleNamespace(config=SimpleNamespace(tile_size=tile, tile_overlap=overlap))
        tiled = LatentSuperResolutionPipeline._tiled(fake, fn, x, lr)
        torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=1e-6)


def test_upscaler_noise_level_outside_its_range_is_refused(runs):
    from onestep.pipelines import LatentSuperResolutionPipeline

    pipe = LatentSuperResolutionPipeline.from_pretrained(runs["upscaler"])
    assert pipe.config.max_noise_level == 350  # the teacher's model_index.json (its UNet embeds 1000 levels)
    for level in (351, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"0\.\.350") as err:
            pipe(image=_lr(), noise_level=level, generator=torch.Generator().manual_seed(0))
        assert str(err.value).count(". ") == 0


def test_an_fp16_upscaler_vae_runs_upcast_to_fp32(runs):
    """As diffusers' StableDiffusionUpscalePipeline: an fp16 VAE with force_upcast encodes and decodes in fp32,
    and is fp16 again after the call; the result is that of its (fp16-rounded) weights in fp32."""
    from onestep.pipelines import LatentSuperResolutionPipeline

    pipe = LatentSuperResolutionPipeline.from_pretrained(runs["upscaler"])
    assert pipe.vae.config.force_upcast
    pipe.vae.to(torch.float16)
    seen = []
    for part in (pipe.vae.encoder, pipe.vae.decoder):
        part.register_forward_pre_hook(lambda m, args: seen.append((next(m.parameters()).dtype, args[0].dtype)))
    lr = _lr()
    got = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert len(seen) == 2 and set(seen) == {(torch.float32, torch.float32)}
    assert pipe.vae.dtype == torch.float16
    pipe.vae.to(torch.float32)  # exact: fp16 -> fp32
    want = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(got, want)


def test_hub_teachers_download_only_the_parts_used(monkeypatch):
    """snapshot_download gets model_index.json and the needed sub-folders' configs, tokenizer files and one set of
    weights (--variant's where there are some; the text encoder's plain ones, as PromptEncoder loads them): never
    the repository's .ckpt files or a second copy of the weights."""
    import huggingface_hub

    from onestep import latent_sr

    x4 = ["model_index.json", "README.md", "x4-upscaler-ema.ckpt", "low_res_scheduler/scheduler_config.json"]
    x4 += ["scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors"]
    x4 += ["text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/merges.txt"]
    x4 += ["tokenizer/vocab.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]
    for sub in ("unet", "vae"):
        x4 += [
            f"{sub}/config.json",
            f"{sub}/diffusion_pytorch_model.bin",
            f"{sub}/diffusion_pytorch_model.safetensors",
        ]
        x4 += [f"{sub}/diffusion_pytorch_model.fp16.safetensors", f"{sub}/diffusion_pytorch_model.fp16.bin"]
    x4 += ["unet/diffusion_flax_model.msgpack", "vae/diffusion_pytorch_model.non_ema.safetensors"]
    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: x4)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(kw) or "/snapshot")
    assert latent_sr.download_teacher("sd/x4", latent_sr.UPSCALER, "main", None) == "/snapshot"
    assert calls[0]["revision"] == "main"
    plain = calls[0]["allow_patterns"]
    assert sorted(f for f in plain if f.endswith((".safetensors", ".bin", ".ckpt", ".msgpack"))) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    configs = [f for f in x4 if f.endswith((".json", ".txt"))]
    assert set(configs) <= set(plain) and "README.md" not in plain
    latent_sr.download_teacher("sd/x4", latent_sr.UPSCALER, None, "fp16")
    fp16 = [f for f in calls[1]["allow_patterns"] if f.endswith((".safetensors", ".bin"))]
    assert sorted(fp16) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    # LDM-SR: .bin weights only (then those), a sharded unet (every shard), no text encoder or VAE.
    ldm = ["model_index.json", "scheduler/scheduler_config.json", "vqvae/config.json"]
    ldm += [
        "vqvae/diffusion_pytorch_model.bin",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]
    ldm += [f"unet/diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    ldm += ["vae/config.json", "vae/diffusion_pytorch_model.bin", "text_encoder/config.json"]
    assert sorted(latent_sr.hub_files(ldm, latent_sr.LDM)) == sorted(
        [f for f in ldm if not f.startswith(("vae/", "text_encoder/"))]
    )


def test_latent_teachers_default_to_50_teacher_steps_and_drop_an_empty_prompt_encoder(
    runs, tmp_path, monkeypatch, capsys
):
    """No --teacher_steps: the teacher's DDIM runs 50 steps (said in the log), not all 1000. The empty prompt (no
    --prompt_file) is encoded once; its text encoder is then released (not kept on the device)."""
    import gc
    import weakref

    from diffusers import DiffusionPipeline

    from onestep.text import PromptEncoder

    loaded, original = [], PromptEncoder.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        encoder = original(cls, *args, **kwargs)
        loaded.append(weakref.ref(encoder.encoders[0]))
        return encoder

    monkeypatch.setattr(PromptEncoder, "from_pretrained", classmethod(spy))
    tiny = [a for i, a in enumerate(TINY) if "--teacher_steps" not in TINY[max(i - 1, 0) : i + 1]]
    assert "--teacher_steps" not in tiny and len(tiny) == len(TINY) - 2
    setup = _setup(runs["upscaler_teacher"], tmp_path / "out", runs["data"], tiny=tiny)
    assert setup.config.method.teacher_steps == 50
    assert "runs 50 of its 1000 steps" in capsys.readouterr().out
    assert setup.context.prompt_encoder is None and len(loaded) == 1
    gc.collect()
    assert loaded[0]() is None  # nothing holds the text encoder any more
    teacher = DiffusionPipeline.from_pretrained(runs["upscaler_teacher"])
    ids = teacher.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = teacher.text_encoder(ids)[0]
    b = setup.data.batch(0, 0, 0, torch.device("cpu"))
    torch.testing.assert_close(b.cond.encoder_hidden_states, empty.expand(2, -1, -1))


def test_onestep_eval_sr_loads_the_export_without_trust_remote_code(runs, tmp_path):
    from onestep.eval.cli import main
    from onestep.eval.sources import load_pipeline
    from onestep.pipelines import LatentSuperResolutionPipeline

    assert type(load_pipeline(runs["ldm"], "cpu")) is LatentSuperResolutionPipeline  # the installed class
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir(), hr_dir.mkdir()
    _lr().save(lr_dir / "a.png")
    Image.fromarray(np.random.RandomState(2).randint(0, 256, (24, 32, 3), dtype=np.uint8)).save(hr_dir / "a.png")
    out = tmp_path / "sr.json"
    main(["sr", "--pipeline", runs["ldm"], "--lr", str(lr_dir), "--hr", str(hr_dir), "--output", str(out)])
    record = json.loads(out.read_text())
    assert record["source"]["kind"] == "pipeline" and np.isfinite(record["psnr_rgb"])


def _trailing_ddim(pipe):
    """The teacher's scheduler as DDIM with trailing spacing and set_alpha_to_one: its last step (to t = -1)
    returns x0_hat, as onestep's sampler does."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)


@pytest.mark.parametrize("name", ["ldm", "upscaler"])
def test_the_teacher_sampler_is_diffusers_own_pipeline(runs, name):
    """TAD-SR's teacher path, ddim_from(teacher, x_T, cond, trailing_timesteps(1000, 4)), equals diffusers'
    LDMSuperResolutionPipeline / StableDiffusionUpscalePipeline (guidance_scale=1, the prompt, noise_level 30)
    with a DDIM scheduler (eta = 0) from the same x_T and low-resolution noise (the generator draws replayed)."""
    from diffusers import DiffusionPipeline

    from onestep.denoiser import Cond, Denoiser
    from onestep.latent_sr import UpscalerAdapter
    from onestep.loading import load_teacher
    from onestep.sampling import ddim_from, trailing_timesteps

    folder, k = runs[f"{name}_teacher"], 4
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = _trailing_ddim(pipe)
    pipe.set_progress_bar_config(disable=True)
    spec = load_teacher(folder).denoiser
    timesteps = trailing_timesteps(spec.schedule.num_timesteps, k)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(3)
    if name == "ldm":
        latents = []
        decode = pipe.vqvae.decode
        pipe.vqvae.decode = lambda z, *a, **kw: latents.append(z) or decode(z, *a, **kw)
        got = pipe(image=lr * 2 - 1, num_inference_steps=k, eta=0.0, generator=g, output_type="pt").images
        x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))  # the pipeline's one draw
        z = ddim_from(spec, x_T, Cond(image=lr * 2 - 1), timesteps)
        torch.testing.assert_close(z, latents[0], atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            want = (decode(z).sample.clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        return
    replay = torch.Generator().manual_seed(3)
    noise = torch.randn(lr.shape, generator=replay)  # the pipeline's one draw: the low-resolution noise
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(prompt="a cat", num_inference_steps=k, guidance_scale=1.0, noise_level=30, eta=0.0)
    got = pipe(image=lr, latents=x_T.clone(), generator=g, output_type="latent", **kw).images
    levels = torch.tensor([30])
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = Cond(
            image=pipe.low_res_scheduler.add_noise(lr * 2 - 1, noise, levels),
            encoder_hidden_states=pipe.text_encoder(ids)[0],
            class_labels=levels,
        )
    teacher = Denoiser(UpscalerAdapter(spec.net), spec.schedule, spec.prediction_type)
    z = ddim_from(teacher, x_T, cond, timesteps)
    torch.testing.assert_close(z, got, atol=1e-5, rtol=1e-5)


def _bad(tmp_path, teacher, *extra, data=None):
    with pytest.raises(UserError) as err:
        _tadsr(teacher, tmp_path / "out", data or str(tmp_path), *extra)
    message = str(err.value)
    assert message.count(". ") == 0 and message.endswith("."), message  # one sentence
    assert not (tmp_path / "out").exists()  # refused before anything is written
    return message


def test_bad_latent_sr_input_gives_one_sentence(runs, tmp_path):
    data = runs["data"]
    # A UNet2DModel reading 7 channels and writing 3, with no vqvae/: neither pixel nor latent SR.
    no_vq = tmp_path / "no_vq"
    shutil.copytree(runs["ldm_teacher"], no_vq)
    shutil.rmtree(no_vq / "vqvae")
    cfg = json.load(open(no_vq / "unet" / "config.json"))
    from tests.helpers import tiny_unet

    tiny_unet(sample_size=8, channels=3, in_channels=7).save_pretrained(no_vq / "unet")
    assert cfg["in_channels"] == 6
    assert "vqvae/" in _bad(tmp_path, str(no_vq), data=data)
    # Upscaler folders without vae/ or without low_res_scheduler/.
    for missing in ("vae", "low_res_scheduler"):
        folder = tmp_path / f"no_{missing}"
        shutil.copytree(runs["upscaler_teacher"], folder)
        shutil.rmtree(folder / missing)
        assert f"{missing}/" in _bad(tmp_path, str(folder), data=data)
    # A noise level the upscaler does not embed; --noise_level on an LDM-SR teacher.
    assert "0..350" in _bad(tmp_path, runs["upscaler_teacher"], "--noise_level", "400", data=data)
    assert "--noise_level" in _bad(tmp_path, runs["ldm_teacher"], "--noise_level", "5", data=data)
    # OFTSR refuses latent SR teachers: its teacher is its own flow.
    oftsr = importlib.import_module("train.oftsr")
    with pytest.raises(UserError, match="its own conditional flow teacher"):
        oftsr.main(
            ["--pretrained_model_name_or_path", runs["ldm_teacher"], "--output_dir", str(tmp_path / "o")]
            + ["--train_data_dir", data]
        )


def test_paired_low_resolution_images_reach_the_teacher_as_given(runs, tmp_path):
    """--hr_dir/--lr_dir: the LDM-SR teacher reads the given LR crop, not a degradation of the HR one."""
    from onestep.presets.tadsr import ENTRY
    from onestep.run_setup import prepare
    from onestep.stages import parse

    (tmp_path / "hr").mkdir(), (tmp_path / "lr").mkdir()
    # Constant 4x4 blocks, so that the given LR (one pixel per block) stays the HR crop's [::4, ::4] under every
    # flip and rotation the augmentation draws; the bicubic degradation would blend neighbouring blocks.
    blocks = np.random.RandomState(5).randint(0, 256, (8, 10, 3), dtype=np.uint8)
    hr = np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))
    Image.fromarray(hr).save(tmp_path / "hr" / "x.png")
    Image.fromarray(blocks).save(tmp_path / "lr" / "x.png")  # not what the bicubic degradation gives
    argv = ["--pretrained_model_name_or_path", runs["ldm_teacher"], "--output_dir", str(tmp_path / "out")]
    argv += ["--hr_dir", str(tmp_path / "hr"), "--lr_dir", str(tmp_path / "lr")]
    config, preset, _, _ = parse(ENTRY, argv + TINY + LOOP)
    setup = prepare(config, preset, "TAD-SR", needs_real_data=True, kinds=("sr", "latent_sr"))
    b, crops = setup.data.batch(0, 0, 0, torch.device("cpu")), setup.data.crops.batch(0, 0, 0, torch.device("cpu"))
    torch.testing.assert_close(b.cond.image, crops.images[..., ::4, ::4])
