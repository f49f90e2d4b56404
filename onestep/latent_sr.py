"""Latent super-resolution teachers users already have as diffusers folders (docs/methods/tadsr.md):

- LDM-SR, `LDMSuperResolutionPipeline`-shaped: unet/ (UNet2DModel reading [x_t, LR], in = latent C + 3, out = C),
  vqvae/ (VQModel; latents unscaled), scheduler/. The LR image in [-1, 1] is concatenated as it is.
- The SD x4 upscaler, `StableDiffusionUpscalePipeline`-shaped: unet/ (UNet2DConditionModel, in = 4 + 3, the noise
  level as class labels), vae/ (AutoencoderKL; latents times its scaling_factor), text_encoder/, tokenizer/,
  scheduler/, low_res_scheduler/ (the LR pixels are noised with it at --noise_level before the concatenation).

Either way the student and the teacher work on latents: z_gt = the encoded HR crop; u = the bicubic-upsampled LR
image, encoded (Cond.shift, the affine family's u: with VP teachers it only enters the start state
x_T = a_T u + c_T eps); the network reads concat(x_t, LR_cond) with LR_cond = the LR pixels on the latent grid
(Cond.image). Crops come from sr_training_data (onestep/sr_data.py SRCrops) and are encoded on the fly.
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F

from .context import LATENT_SUPER_RESOLUTION, ExportTarget, TeacherContext
from .data import Batch
from .denoiser import Cond, Denoiser, UNet2DConditionAdapter
from .errors import UserError
from .loading import Teacher, resolve_teacher_path
from .utils import seed_for

LDM, UPSCALER = "ldm", "upscaler"
DEFAULT_TEACHER_STEPS = 50  # the teacher's DDIM steps per iteration when --teacher_steps is not given
NAMES = {
    LDM: "LDM super-resolution (LDMSuperResolutionPipeline: UNet2DModel on a VQModel latent)",
    UPSCALER: "Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline)",
}


def _folder_components(name_or_path: str, revision: str | None) -> set[str]:
    """Sub-folder names of a local teacher folder, or the components its hub model_index.json names."""
    path = resolve_teacher_path(name_or_path)
    if os.path.isdir(path):
        return {d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))}
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(path, "model_index.json", revision=revision)) as f:
            return {k for k, v in json.load(f).items() if isinstance(v, list) and v[0]}
    except Exception:  # offline, no such file: the folder then is not recognised as a latent SR teacher
        return set()


def latent_sr_flavour(name_or_path: str, teacher: Teacher, revision: str | None = None) -> str | None:
    """LDM, UPSCALER, or None for every other teacher. LDM-SR: a UNet2DModel beside a vqvae/ folder. Upscaler: a
    UNet2DConditionModel that reads more channels than it writes and embeds class labels (the noise level)."""
    cfg = teacher.unet_config
    if teacher.unet_class == "UNet2DConditionModel":
        wider = cfg["in_channels"] > cfg["out_channels"]
        return UPSCALER if wider and cfg.get("num_class_embeds") else None
    if teacher.unet_class == "UNet2DModel" and "vqvae" in _folder_components(name_or_path, revision):
        return LDM
    return None


class UpscalerAdapter(UNet2DConditionAdapter):
    """The x4 upscaler's UNet2DConditionModel: [x_t, noised LR] on the channels, text, and the noise level as its
    class labels (StableDiffusionUpscalePipeline's call)."""

    def forward(self, x, time, cond):
        x = torch.cat([x, cond.image.to(x.dtype)], dim=1)
        hidden = cond.encoder_hidden_states.to(x.dtype)
        return self.net(x, time, encoder_hidden_states=hidden, class_labels=cond.class_labels).sample


def load_autoencoder(path: str, flavour: str, variant: str | None = None):
    """vqvae/ (VQModel) for LDM-SR, vae/ (AutoencoderKL) for the upscaler, in fp32 (the `variant`'s weights where
    the folder has them, as hub downloads pick them)."""
    from diffusers import AutoencoderKL, VQModel

    sub, cls = ("vqvae", VQModel) if flavour == LDM else ("vae", AutoencoderKL)
    folder = os.path.join(path, sub)
    has_variant = variant and os.path.isdir(folder) and any(f".{variant}." in n for n in os.listdir(folder))
    kw = {"variant": variant} if has_variant else {}
    return cls.from_pretrained(path, subfolder=sub, torch_dtype=torch.float32, **kw).eval().requires_grad_(False)


WEIGHTS = re.compile(r"([^.]+)(?:\.([^.]+?))?(?:-\d+-of-\d+)?\.(safetensors|bin)")  # name[.variant][-shard].ext
SUBFOLDERS = {
    LDM: ("unet", "scheduler", "vqvae"),
    UPSCALER: ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "low_res_scheduler"),
}


def hub_files(files: list[str], flavour: str, variant: str | None = None) -> list[str]:
    """The files of a hub teacher's repository training and export read: model_index.json, and in each needed
    sub-folder its configs and tokenizer files plus one set of weights (the `variant`'s safetensors, its .bin,
    then the plain safetensors, the plain .bin; text_encoder/ always the plain ones, as it is loaded). Not the
    repository's other checkpoints (the x4 upscaler's repo holds ~3.5 GB of .ckpt files)."""
    keep = [f for f in files if f == "model_index.json"]
    for sub in SUBFOLDERS[flavour]:
        inside = [f for f in files if f.startswith(sub + "/") and f.count("/") == 1]
        keep += [f for f in inside if f.endswith((".json", ".txt"))]
        weights = {f: WEIGHTS.fullmatch(os.path.basename(f)) for f in inside}
        weights = {f: (m[2], m[3]) for f, m in weights.items() if m}  # (variant or None, extension)
        want = variant if sub != "text_encoder" else None
        for choice in dict.fromkeys([(want, "safetensors"), (want, "bin"), (None, "safetensors"), (None, "bin")]):
            chosen = [f for f, kind in weights.items() if kind == choice]
            if chosen:
                keep += chosen
                break
    return keep


def download_teacher(repo: str, flavour: str, revision: str | None, variant: str | None) -> str:
    """snapshot_download of only the files hub_files picks."""
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo, revision=revision)
    return snapshot_download(repo, revision=revision, allow_patterns=hub_files(files, flavour, variant))


def latent_scale(autoencoder) -> float:
    """LDM-SR uses VQ latents unscaled; KL latents are multiplied by the VAE's scaling_factor."""
    from diffusers import VQModel

    return 1.0 if isinstance(autoencoder, VQModel) else float(autoencoder.config.scaling_factor)


def encoder_fn(autoencoder):
    """[-1, 1] pixels -> latents (a KL posterior's mode: deterministic), on the autoencoder's device."""
    from diffusers import VQModel

    scale, vq = latent_scale(autoencoder), isinstance(autoencoder, VQModel)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        x = images.to(autoencoder.device, autoencoder.dtype)
        with torch.autocast(autoencoder.device.type, enabled=False):  # fp32 inside the trainer's mixed precision
            if vq:
                return autoencoder.encode(x).latents.float()
            return autoencoder.encode(x).latent_dist.mode().float() * scale

    return encode


def decoder_fn(autoencoder):
    """Latents -> [-1, 1] pixels (VQ latents are quantised first, as LDMSuperResolutionPipeline decodes)."""
    scale = latent_scale(autoencoder)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = (latents.float() / scale).to(autoencoder.device, autoencoder.dtype)
        with torch.autocast(autoencoder.device.type, enabled=False):
            return autoencoder.decode(z).sample.float().to(latents.device)

    return decode


class LatentSRBatches:
    """SRCrops batches moved to the latent space: images = z_gt (the encoded HR crop), cond = Cond(image=LR on the
    latent grid (noised at `noise_level` for the upscaler), shift=encoded u, and for the upscaler the prompt's
    embeddings and the noise level as class labels). The LR is SRCrops' own (degrade(HR), or the paired --lr_dir
    crop). Every draw (the low-resolution noise, the prompts) is a pure function of (seed, rank, step, micro)."""

    def __init__(
        self, crops, encode, scale: int, latent: int, seed: int, low_res=None, noise_level: int = 0, text=None
    ):
        self.crops, self.encode, self.scale, self.latent, self.seed = crops, encode, scale, latent, seed
        self.low_res, self.noise_level, self.text = low_res, noise_level, text  # text: (n, generator) -> Cond

    def __len__(self):
        return len(self.crops)

    def batch(self, step: int, micro: int, rank: int, device) -> Batch:
        b = self.crops.batch(step, micro, rank, device)
        hr, u_pixels, lr = b.images, b.cond.image, b.low_res
        if lr.shape[-1] != self.latent:
            lr = F.interpolate(lr, size=(self.latent, self.latent), mode="bicubic", align_corners=False)
        g = torch.Generator().manual_seed(seed_for(self.seed, "latent-sr", rank, step, micro))
        extra = {}
        if self.low_res is not None:  # StableDiffusionUpscalePipeline: low_res_scheduler.add_noise(LR, noise, level)
            levels = torch.full((hr.shape[0],), self.noise_level, dtype=torch.long, device=device)
            noise = torch.randn(lr.shape, generator=g).to(device, lr.dtype)
            lr = self.low_res.add_noise(lr, noise, levels)
            extra = {"encoder_hidden_states": self.text(hr.shape[0], g).encoder_hidden_states.to(device)}
            extra["class_labels"] = levels
        z_gt, u = self.encode(hr).to(device), self.encode(u_pixels).to(device)
        return Batch(z_gt, Cond(image=lr, shift=u, **extra))


def prepare_latent_sr(config, teacher: Teacher, sr_training_data, make_trainer):
    """The run setup of a latent SR teacher (run_setup.prepare's 'latent_sr' kind): (context, data, trainer).
    `sr_training_data(config, resolution, channels, scale)` gives the crops, `make_trainer(card)` the trainer."""
    tc, dc = config.teacher, config.data
    teacher_id = tc.pretrained_model_name_or_path
    path = resolve_teacher_path(teacher_id)
    flavour = latent_sr_flavour(teacher_id, teacher, tc.revision)
    if not os.path.isdir(path):  # a hub id: only the sub-folders used (not the repository's .ckpt files)
        path = download_teacher(teacher_id, flavour, tc.revision, tc.variant)
    unet_cfg = teacher.unet_config
    if flavour == UPSCALER:
        missing = [d for d in ("vae", "low_res_scheduler") if not os.path.isdir(os.path.join(path, d))]
        if missing:
            raise UserError(
                f"The upscaler teacher folder {path} has no {' or '.join(m + '/' for m in missing)}; a "
                f"StableDiffusionUpscalePipeline-shaped teacher needs its VAE and its low_res_scheduler."
            )
    noise_level = getattr(config.method, "noise_level", 20)
    if flavour == LDM and "noise_level" in config.explicit:
        raise UserError("--noise_level is for x4 upscaler teachers; an LDM-SR teacher reads the LR image as it is.")
    if flavour == LDM and tc.prompt_file:
        raise UserError("--prompt_file is for x4 upscaler teachers; an LDM-SR teacher takes no prompt.")
    if dc.dataset_name:
        raise UserError(
            "Latent SR teachers read --train_data_dir (the LR made by the degradation) or --hr_dir/--lr_dir pairs, "
            "not --dataset_name."
        )
    if config.trainer.eval_steps and {"eval_steps", "eval_reference", "eval_features"} & config.explicit:
        raise UserError(
            "In-training FID for latent SR teachers is not supported yet; measure the export with onestep-eval."
        )
    if teacher.denoiser.schedule.kind != "vp":
        raise UserError(
            f"Latent SR teachers with a {teacher.denoiser.schedule.kind} schedule are not supported (VP only)."
        )
    ae = load_autoencoder(path, flavour, tc.variant)
    C = ae.config.latent_channels
    if unet_cfg["out_channels"] != C or unet_cfg["in_channels"] != C + 3:
        raise UserError(
            f"The teacher UNet reads {unet_cfg['in_channels']} channels and writes {unet_cfg['out_channels']}; on its "
            f"{C}-channel latent a latent SR teacher writes {C} and reads {C + 3} (x_t and the RGB low-resolution image)."
        )
    f = 2 ** (len(ae.config.block_out_channels) - 1)
    down = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    scale = tc.upscale_factor or f  # diffusers' pipelines: the LR image is the latent grid (x4 with f4 autoencoders)
    resolution = tc.resolution or unet_cfg["sample_size"] * f
    if resolution % (f * down) or resolution % scale:
        raise UserError(
            f"Resolution {resolution} cannot be taken: it must be a multiple of {f * down} (the autoencoder downsamples "
            f"by {f} and the UNet by {down}) and of the upscale factor {scale}."
        )
    low_res, encoder, prompts, text, limit = None, None, None, None, None
    if flavour == UPSCALER:
        from diffusers import DDPMScheduler

        from .data import read_prompts
        from .text import PromptEncoder

        low_res = DDPMScheduler.from_pretrained(path, subfolder="low_res_scheduler")
        limit = min(_max_noise_level(path), unet_cfg["num_class_embeds"] - 1)
        if not 0 <= noise_level <= limit:
            raise UserError(f"--noise_level {noise_level} must lie in 0..{limit} for this upscaler.")
        prompts = read_prompts(tc.prompt_file) if tc.prompt_file else [""]
        encoder = PromptEncoder.from_pretrained(path, False, resolution, revision=tc.revision)
        den = teacher.denoiser  # the noise level reaches the UNet as its class labels
        teacher.denoiser = Denoiser(UpscalerAdapter(den.net), den.schedule, den.prediction_type)
        teacher.denoiser.eval().requires_grad_(False)
    latent = resolution // f
    crops = sr_training_data(config, resolution, 3, scale)
    T = teacher.denoiser.schedule.num_timesteps
    default_steps = getattr(config.method, "teacher_steps", 1) is None  # --teacher_steps not given
    if default_steps:  # not the sampler over all T steps every iteration
        config.method.teacher_steps = min(DEFAULT_TEACHER_STEPS, T)
    extra = {"upscale_factor": scale, "resolution": resolution, "teacher kind": NAMES[flavour]}
    trainer = make_trainer(extra)
    ae.to(trainer.device)
    if encoder is not None:
        if prompts == [""]:  # one embedding for every sample: computed once, the text encoder then freed
            empty = _text_fp32(encoder, [""]).encoder_hidden_states.to(trainer.device)
            encoder = None

            def text(n, g):
                return Cond(encoder_hidden_states=empty.expand(n, -1, -1))

        else:
            encoder.to(trainer.device)

            def text(n, g):
                idx = torch.randint(len(prompts), (n,), generator=g)
                return _text_fp32(encoder, [prompts[int(i)] for i in idx])

    if default_steps:
        trainer.log(
            f"The teacher's DDIM runs {config.method.teacher_steps} of its {T} steps per iteration (the default for "
            "latent SR teachers; --teacher_steps sets it)."
        )
    data = LatentSRBatches(crops, encoder_fn(ae), scale, latent, config.trainer.seed, low_res, noise_level, text)
    export = ExportTarget(
        LATENT_SUPER_RESOLUTION,
        teacher.scheduler_config,
        teacher_path=path,
        upscale_factor=scale,
        resolution=resolution,
        latent_sr=flavour,
        latent_size=latent,
        noise_level=noise_level if flavour == UPSCALER else None,
        max_noise_level=limit,
        variant=tc.variant,
    )
    context = TeacherContext(
        teacher.denoiser,
        (C, latent, latent),
        decode=decoder_fn(ae),
        source=teacher_id,
        kind="latent_sr",
        export=export,
        prompts=tuple(prompts) if prompts else None,
        prompt_encoder=encoder,
    )
    return context, data, trainer


def _text_fp32(encoder, prompts: list[str]) -> Cond:
    """The prompts' embeddings in fp32, also inside the trainer's mixed-precision autocast."""
    with torch.autocast(encoder.encoders[0].device.type, enabled=False):
        return encoder.encode(prompts)


def _max_noise_level(path: str) -> int:
    """StableDiffusionUpscalePipeline's max_noise_level (model_index.json; its default 350)."""
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return int(json.load(f).get("max_noise_level", 350))
    return 350


def pipeline_components(path: str, flavour: str, variant: str | None = None) -> dict:
    """The teacher's parts an exported student needs besides its UNet: the autoencoder, and for the upscaler the
    text encoder, tokenizer and low_res_scheduler."""
    ae = load_autoencoder(path, flavour, variant)
    if flavour == LDM:
        return {"vqvae": ae}
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "vae": ae,
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "low_res_scheduler": DDPMScheduler.from_pretrained(path, subfolder="low_res_scheduler"),
    }
