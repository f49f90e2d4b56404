"""Run setup shared by every train/<method>.py: the argument groups, declared once, and what a method needs
built from the resolved configuration: the teacher (pixel, class-conditional, text-to-image latent, or
image-conditioned super-resolution), the real data, the conditioning sampler, decoding for sample grids,
memory options, LoRA, the trainer and its in-training evaluator.

A script parses its own method's flags next to these groups, then calls `parse_run` and `prepare`,
builds its method from the returned `Setup`, and hands it to `train`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cli import help_formatter, non_negative_float, non_negative_int, positive_float, positive_int
from .config import Preset, RunConfig, presets_help, resolve, resolved_record
from .data import DatasetBatches, ImageFolder, TensorBatches, load_digits_images
from .denoiser import Cond
from .errors import UserError
from .loading import Teacher, load_teacher, read_class_info, resolve_teacher_path
from .trainer import Trainer

BOOL = argparse.BooleanOptionalAction


GROUPS = ("teacher", "data", "optimisation", "training loop", "memory", "in-training evaluation")


def run_parser(
    description: str, presets: dict[str, Preset], default_preset: str, groups: tuple[str, ...] = GROUPS
) -> argparse.ArgumentParser:
    """The shared flags of `groups`. Every one defaults to None, meaning 'the preset's value' (or --config's)."""
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=help_formatter(presets[default_preset].config),
        epilog=presets_help(presets, default_preset),
    )
    p.add_argument("--preset", default=None, help=f"Named recipe: {', '.join(presets)} (default: {default_preset}).")
    p.add_argument(
        "--config", default=None, help="Rerun from a training_config.json an earlier run wrote (flags still override)."
    )
    for name in groups:
        _ADD_GROUP[name](p.add_argument_group(name))
    return p


def _teacher_args(g) -> None:
    g.add_argument(
        "--pretrained_model_name_or_path",
        help="A diffusers folder (unet/ + scheduler/), a hub id, or 'digits' (bundled).",
    )
    g.add_argument("--revision", help="Hub teachers: the git revision (branch, tag or commit) to load.")
    g.add_argument(
        "--variant", help="Teacher weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)."
    )
    g.add_argument(
        "--resolution", type=positive_int, help="Image size (None: the teacher's sample_size, times the VAE factor)."
    )
    g.add_argument("--num_classes", type=positive_int, help="Real classes of a class-conditional teacher.")
    g.add_argument(
        "--null_class", type=int, help="Class index the teacher was trained with as 'no class' (enables CFG)."
    )
    g.add_argument(
        "--prompt_file", help="Text-to-image teachers: prompts for the student (.txt, one per line, or .jsonl)."
    )
    g.add_argument(
        "--upscale_factor",
        type=positive_int,
        help="Super-resolution teachers: high-resolution size / low-resolution size.",
    )


def _data_args(g) -> None:
    g.add_argument(
        "--train_data_dir",
        help="An image folder (sub-folders = classes for class-conditional teachers; "
        "metadata.jsonl captions for text-to-image). The digits teacher defaults to scikit-learn's digits.",
    )
    g.add_argument(
        "--dataset_name",
        help="Text-to-image: a Hugging Face dataset instead, a hub id or a local dataset folder "
        "(needs pip install 'onestep[datasets]').",
    )
    g.add_argument("--dataset_config_name", help="--dataset_name: the dataset's configuration, if it has several.")
    g.add_argument("--dataset_split", help="--dataset_name: the split to read.")
    g.add_argument("--image_column", help="--dataset_name: the column holding images.")
    g.add_argument("--caption_column", help="--dataset_name: the column holding captions.")
    g.add_argument(
        "--dataloader_num_workers", type=non_negative_int, help="Worker processes reading --train_data_dir images."
    )
    g.add_argument(
        "--cache_latents", action=BOOL, help="Text-to-image: encode every real image with the VAE once, up front."
    )
    g.add_argument(
        "--latent_cache_dir", help="Where --cache_latents writes its shards (None: <output_dir>/latent_cache)."
    )
    g.add_argument(
        "--hr_dir",
        help="Super-resolution: high-resolution images paired with --lr_dir (else --train_data_dir, LR by degradation).",
    )
    g.add_argument("--lr_dir", help="Super-resolution: the low-resolution inputs of --hr_dir, paired by file name.")


def _optimisation_args(g) -> None:
    g.add_argument("--learning_rate", type=non_negative_float, help="Adam(W) learning rate of every trained network.")
    g.add_argument("--adam_weight_decay", type=float, help="AdamW weight decay.")
    g.add_argument("--train_batch_size", type=positive_int, help="Student samples per process per iteration.")


def _training_loop_args(g) -> None:
    g.add_argument("--output_dir", help="Where the exported pipeline, checkpoints, sample grids and logs go.")
    g.add_argument("--max_train_steps", type=positive_int, help="Optimisation iterations.")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, help="Micro-batches summed into each update.")
    g.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], help="Autocast dtype (bf16 recommended on CUDA)."
    )
    g.add_argument("--max_grad_norm", type=positive_float, help="Clip each model's gradient norm to this value.")
    g.add_argument(
        "--lr_scheduler", choices=["constant", "linear", "cosine"], help="Learning-rate decay after the warm-up."
    )
    g.add_argument("--lr_warmup_steps", type=non_negative_int, help="Iterations of linear learning-rate warm-up.")
    g.add_argument("--ema_decay", type=float, help="Weight EMA of the student, exported (0 = off).")
    g.add_argument(
        "--ema_warmup", action=BOOL, help="EMA decay min(--ema_decay, (1 + n) / (10 + n)) at update n (OFTSR)."
    )
    g.add_argument("--checkpointing_steps", type=positive_int, help="Iterations between resumable checkpoints.")
    g.add_argument("--checkpoints_total_limit", type=positive_int, help="Keep only this many newest checkpoints.")
    g.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-<step> folder.")
    g.add_argument(
        "--init_from_checkpoint",
        help="Start from an earlier run's weights only (a checkpoint-<step> folder), e.g. DMD2 stage 2 after stage 1.",
    )
    g.add_argument(
        "--report_to",
        choices=["none", "tensorboard", "wandb", "all"],
        help="Experiment tracker (logs/losses.csv and loss_curves.png are written in any case).",
    )
    g.add_argument("--validation_steps", type=positive_int, help="Iterations between PNG sample grids.")
    g.add_argument("--seed", type=int, help="Every random draw of the run follows from it (exact resume).")


def _memory_args(g) -> None:
    g.add_argument("--gradient_checkpointing", action=BOOL, help="Trade compute for memory in the UNets.")
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action=BOOL,
        help="xformers attention (CUDA and pip install 'onestep[xformers]'; PyTorch SDPA otherwise).",
    )
    g.add_argument("--lora_rank", type=non_negative_int, help="LoRA on the student only (0 = full fine-tuning).")
    g.add_argument(
        "--lora_alpha", type=positive_float, help="LoRA scale numerator (the update is scaled by alpha / rank)."
    )
    g.add_argument("--lora_targets", help="Comma-separated module names for LoRA (None: the method's list).")


def _in_training_evaluation_args(g) -> None:
    g.add_argument(
        "--eval_steps",
        type=non_negative_int,
        help="Iterations between in-training FID evaluations (EMA weights, fixed noise; 0 = off); logs/eval.csv.",
    )
    g.add_argument("--eval_samples", type=positive_int, help="Samples per in-training evaluation.")
    g.add_argument(
        "--eval_features",
        choices=["digits", "inception", "clip"],
        help="Feature extractor (None: digits for the digits teacher, else inception).",
    )
    g.add_argument("--eval_reference", help="Reference: an image folder, a statistics .npz, or 'digits'.")
    g.add_argument("--inception_weights", help="Local copy of clean-fid's Inception weights (offline machines).")


_ADD_GROUP = {
    "teacher": _teacher_args,
    "data": _data_args,
    "optimisation": _optimisation_args,
    "training loop": _training_loop_args,
    "memory": _memory_args,
    "in-training evaluation": _in_training_evaluation_args,
}


def parse_run(
    parser, argv, presets: dict[str, Preset], default_preset: str, method_class: type
) -> tuple[RunConfig, str]:
    """Flags -> the resolved RunConfig and the name of the preset it started from."""
    return resolve(vars(parser.parse_args(argv)), presets, default_preset, method_class)


@dataclass
class Setup:
    """What the run setup built for a method (everything a method's constructor and export need)."""

    config: RunConfig
    preset: str
    teacher: Teacher
    kind: str  # "pixel", "text" or "sr"
    sample_shape: tuple[int, ...]  # what the student generates (pixels or latents)
    cond_sampler: Callable[[int, torch.device], Cond | None] | None  # None for SR: the condition comes with the data
    uncond: Callable[[Cond], Cond] | None  # the teacher's unconditional input, for CFG
    trainer: Trainer
    data: object = None  # a batch source, when the method needs real images
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    export_info: dict = field(default_factory=dict)
    # Text-to-image teachers: the training prompts and their encoder (MSD draws each student's own prompts).
    prompts: list[str] | None = None
    prompt_encoder: object = None


def teacher_kind(unet_class: str, unet_config: dict) -> str:
    if unet_class == "UNet2DConditionModel":
        return "text"
    out = unet_config["out_channels"]
    learned_sigma = out == 2 * unet_config["in_channels"]
    return "sr" if unet_config["in_channels"] > out and not learned_sigma else "pixel"


KIND_NAMES = {
    "pixel": "unconditional or class-conditional pixel",
    "text": "text-to-image (SD1.5/SDXL)",
    "sr": "super-resolution (the low-resolution image on extra input channels)",
    "latent_sr": "latent super-resolution (LDMSuperResolutionPipeline / StableDiffusionUpscalePipeline)",
}


def prepare(
    config: RunConfig,
    preset: str,
    method_name: str,
    needs_real_data: bool,
    kinds: tuple[str, ...] = ("pixel", "text"),
    refusals: dict[str, str] | None = None,
) -> Setup:
    """Load the teacher and build the rest for its kind (one of `kinds`, those the method distils).
    `refusals`: the method's own sentence for a kind it does not distil. Refuses bad input before anything is
    written."""
    tc = config.teacher
    if config.memory.enable_xformers_memory_efficient_attention and torch.cuda.is_available():
        _require_xformers()  # before anything is loaded or written
    if tc.pretrained_model_name_or_path.startswith("<"):
        raise UserError(
            f"Preset {preset} needs --pretrained_model_name_or_path (its teacher: {tc.pretrained_model_name_or_path})."
        )
    _check_output_is_not_an_input(config)
    teacher = load_teacher(tc.pretrained_model_name_or_path, revision=tc.revision, variant=tc.variant)
    from .latent_sr import latent_sr_flavour, prepare_latent_sr

    latent_sr = latent_sr_flavour(tc.pretrained_model_name_or_path, teacher, tc.revision)
    kind = "latent_sr" if latent_sr else teacher_kind(teacher.unet_class, teacher.unet_config)
    if kind not in kinds:
        raise UserError(
            (refusals or {}).get(kind)
            or f"{tc.pretrained_model_name_or_path} is a {KIND_NAMES[kind]} teacher; {method_name} distils "
            f"{' and '.join(KIND_NAMES[k] for k in kinds)} teachers."
        )
    build = {"pixel": _prepare_pixel, "text": _prepare_text, "sr": _prepare_sr, "latent_sr": prepare_latent_sr}[kind]
    return build(config, preset, method_name, teacher, needs_real_data)


def _check_output_is_not_an_input(config: RunConfig) -> None:
    """A run writes only into its own output folder, never into (or below) the teacher's or the data's."""
    out = os.path.realpath(config.trainer.output_dir)
    inputs = {
        "the teacher's": resolve_teacher_path(config.teacher.pretrained_model_name_or_path),
        "the training data's": config.data.train_data_dir,
        "the dataset's": config.data.dataset_name,
        "the high-resolution images'": config.data.hr_dir,
        "the low-resolution images'": config.data.lr_dir,
    }
    for what, path in inputs.items():
        if path and os.path.isdir(path):
            folder = os.path.realpath(path)
            if out == folder or out.startswith(folder + os.sep):
                raise UserError(
                    f"--output_dir {config.trainer.output_dir} is inside {what} folder {path}; a run writes only into "
                    f"its own output folder, so choose another --output_dir."
                )


def _trainer(config: RunConfig, preset: str, method_name: str, extra_card: dict | None = None) -> Trainer:
    from dataclasses import replace

    card = {"preset": preset, "teacher": config.teacher.pretrained_model_name_or_path, **(extra_card or {})}
    return Trainer(
        replace(config.trainer, run_config=card, resolved_config=resolved_record(config, preset, method_name))
    )


def _prepare_pixel(config: RunConfig, preset: str, method_name: str, teacher: Teacher, needs_real_data: bool) -> Setup:
    tc, dc = config.teacher, config.data
    teacher_id = tc.pretrained_model_name_or_path
    if dc.dataset_name:
        raise UserError(
            "--dataset_name (image-caption data) is for text-to-image teachers; pixel teachers read --train_data_dir."
        )
    unet_cfg = teacher.unet_config
    depth = len(unet_cfg["block_out_channels"]) - 1
    resolution = tc.resolution or unet_cfg["sample_size"]
    if resolution % (2**depth):
        raise UserError(
            f"Resolution {resolution} is not divisible by {2**depth}, the teacher UNet's downsampling factor."
        )
    channels = unet_cfg["in_channels"]
    info = read_class_info(teacher_id, unet_cfg, tc.revision)
    num_classes = tc.num_classes or info.get("num_classes")
    null_class = tc.null_class if tc.null_class is not None else info.get("null_class")
    embeds = unet_cfg.get("num_class_embeds")
    if embeds and not num_classes:
        raise UserError("The teacher is class-conditional; pass --num_classes (and --null_class if it supports CFG).")
    if num_classes and (not embeds or num_classes > embeds):
        raise UserError(f"--num_classes {num_classes} does not fit the teacher, which embeds {embeds or 0} classes.")
    if null_class is not None and not (embeds and 0 <= null_class < embeds):
        raise UserError(f"--null_class {null_class} is not one of the teacher's {embeds or 0} class embeddings.")

    trainer = _trainer(config, preset, method_name)
    data = real_pixel_data(config, resolution, channels, num_classes) if needs_real_data else None

    def cond_sampler(n, device):
        return Cond(class_labels=torch.randint(0, num_classes, (n,), device=device)) if num_classes else None

    uncond = (
        (lambda c: Cond(class_labels=torch.full_like(c.class_labels, null_class))) if null_class is not None else None
    )
    return Setup(
        config,
        preset,
        teacher,
        "pixel",
        (channels, resolution, resolution),
        cond_sampler,
        uncond,
        trainer,
        data,
        export_info={"scheduler_config": teacher.scheduler_config, "num_classes": num_classes, "teacher": teacher_id},
    )


def in_training_evaluator(setup: Setup):
    """The FID evaluator of --eval_steps (main process only; None when off). Built after the method: building
    its feature network draws from the global RNG, which the method's fresh layers (a GAN head) must not see moved."""
    config, trainer = setup.config, setup.trainer
    if not config.trainer.eval_steps or not trainer.is_main:
        return None
    from .eval.intraining import InTrainingEvalOptions, build_evaluator

    ec = config.evaluation
    if setup.kind == "text":  # a preset's in-training FID (asking for it was refused in _prepare_text)
        trainer.log("In-training FID is off: it is not supported for text-to-image teachers yet (use onestep-eval).")
        return None
    asked = {"eval_steps", "eval_reference", "eval_features"} & config.explicit or ec.eval_reference is not None
    if config.teacher.pretrained_model_name_or_path != "digits" and not asked:
        # The preset's in-training FID was made for the bundled digits (their reference and features ship):
        # for another teacher, start without it rather than stop, and say how to turn it on.
        trainer.log(
            "In-training FID is off for this teacher: pass --eval_steps N with --eval_reference (an image folder or "
            "a .npz from onestep-eval stats) and --eval_features to turn it on."
        )
        return None
    options = InTrainingEvalOptions(
        samples=ec.eval_samples,
        features=ec.eval_features,
        reference=ec.eval_reference,
        inception_weights=ec.inception_weights,
    )
    return build_evaluator(options, config.teacher.pretrained_model_name_or_path, config.trainer.seed, trainer.device)


def _prepare_sr(config: RunConfig, preset: str, method_name: str, teacher: Teacher, needs_real_data: bool) -> Setup:
    """Pixel super-resolution teachers (SR3-like: a UNet2DModel reading [x_t, u] on its channels). Every
    batch carries its condition: the HR images and u = upsample(degrade(HR)) (no condition sampler)."""
    tc, unet_cfg = config.teacher, teacher.unet_config
    channels, scale = unet_cfg["out_channels"], sr_upscale_factor(tc)
    if dc_name := config.data.dataset_name:
        raise UserError(f"--dataset_name {dc_name} is for text-to-image teachers; SR teachers read --train_data_dir.")
    if unet_cfg["in_channels"] != 2 * channels:
        raise UserError(
            f"The teacher UNet reads {unet_cfg['in_channels']} channels and writes {channels}: a pixel SR teacher "
            f"reads x_t and the upsampled low-resolution image, {2 * channels} channels (a latent LDM-SR teacher "
            f"needs its vqvae/ folder beside unet/)."
        )
    resolution = tc.resolution or unet_cfg["sample_size"]
    depth = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    if resolution % depth or resolution % scale:
        raise UserError(
            f"Resolution {resolution} must be divisible by the UNet's downsampling factor {depth} and by the "
            f"upscale factor {scale}."
        )
    data = sr_training_data(config, resolution, channels, scale)
    trainer = _trainer(config, preset, method_name, {"upscale_factor": scale})
    return Setup(
        config,
        preset,
        teacher,
        "sr",
        (channels, resolution, resolution),
        cond_sampler=None,
        uncond=None,
        trainer=trainer,
        data=data,
        export_info={
            "scheduler_config": teacher.scheduler_config,
            "upscale_factor": scale,
            "teacher": tc.pretrained_model_name_or_path,
            "resolution": resolution,
        },
    )


def sr_upscale_factor(tc) -> int:
    """--upscale_factor, else the one the teacher folder records (onestep.json), else 4; refuses a mismatch."""
    recorded = read_class_info(tc.pretrained_model_name_or_path, {}, tc.revision).get("upscale_factor")
    if tc.upscale_factor and recorded and tc.upscale_factor != recorded:
        raise UserError(f"--upscale_factor {tc.upscale_factor} does not match the teacher's x{recorded}.")
    return tc.upscale_factor or recorded or 4


# The bundled pixel x4 SR teachers (onestep/assets): with them, no data flag means the bundled photographs.
BUNDLED_SR_TEACHERS = ("sr-resshift", "sr-flow")


def sr_training_data(config: RunConfig, resolution: int, channels: int, scale: int, bundled_images: bool = False):
    """Random HR crops and their LR inputs: paired --hr_dir/--lr_dir, --train_data_dir (LR by the degradation),
    or, for the bundled SR teachers (and the scripts that train them: `bundled_images`), the training split of
    the bundled photographs (onestep/sr_data.py)."""
    from .sr_data import SRCrops, natural_images

    dc = config.data
    kw = dict(
        resolution=resolution,
        scale=scale,
        batch_size=config.method.train_batch_size,
        seed=config.trainer.seed,
        channels=channels,
    )
    if dc.lr_dir and not dc.hr_dir:
        raise UserError("--lr_dir needs --hr_dir, the high-resolution images it pairs with.")
    if dc.hr_dir and dc.train_data_dir:
        raise UserError("Pass either --train_data_dir or --hr_dir (with --lr_dir), not both.")
    if dc.hr_dir or dc.train_data_dir:
        return SRCrops.from_folders(dc.hr_dir or dc.train_data_dir, dc.lr_dir, **kw)
    if bundled_images or config.teacher.pretrained_model_name_or_path in BUNDLED_SR_TEACHERS:
        images = natural_images("train")
        return SRCrops(list(images.values()), names=list(images), **kw)
    raise UserError(
        "Super-resolution teachers learn from real high-resolution images: pass --train_data_dir "
        "(or --hr_dir with --lr_dir)."
    )


def real_pixel_data(config: RunConfig, resolution: int, channels: int, num_classes: int | None):
    """Real images as a batch source: --train_data_dir, or the digits for the bundled digits teacher."""
    dc, seed = config.data, config.trainer.seed
    batch = config.method.train_batch_size
    if dc.train_data_dir:
        ds = ImageFolder(dc.train_data_dir, resolution, channels=channels, class_folders=bool(num_classes))
        if num_classes and len(ds.class_names) != num_classes:
            raise UserError(
                f"{dc.train_data_dir} has {len(ds.class_names)} class folders but the teacher has {num_classes} classes."
            )
        return DatasetBatches(
            ds,
            batch,
            seed=seed,
            num_workers=dc.dataloader_num_workers,
            micro_steps=config.trainer.gradient_accumulation_steps,
        )
    if config.teacher.pretrained_model_name_or_path == "digits":
        images, labels = load_digits_images(resolution)
        return TensorBatches(images, labels, batch, seed=seed)
    raise UserError("The GAN needs real images: pass --train_data_dir, or --no-gan for distribution matching only.")


def _prepare_text(config: RunConfig, preset: str, method_name: str, teacher: Teacher, needs_real_data: bool) -> Setup:
    """Stable Diffusion 1.5 / SDXL teachers: prompts from --prompt_file, latents, VAE decode for grids."""
    from .data import CaptionedLatentBatches, HFImageCaptions, read_prompts
    from .text import PromptEncoder

    tc, dc = config.teacher, config.data
    teacher_id = tc.pretrained_model_name_or_path
    path = resolve_teacher_path(teacher_id)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(teacher_id, revision=tc.revision)
    if not tc.prompt_file:
        raise UserError("Text-to-image teachers need --prompt_file (prompts for the generator, one per line).")
    prompts = read_prompts(tc.prompt_file)
    unet_cfg = teacher.unet_config
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    vae_cfg_path = os.path.join(path, "vae", "config.json")
    if not os.path.isfile(vae_cfg_path):
        raise UserError(f"The teacher folder {path} has no vae/; a latent text-to-image teacher needs its VAE.")
    with open(vae_cfg_path) as f:
        vae_cfg = json.load(f)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    resolution = tc.resolution or unet_cfg["sample_size"] * vae_factor
    if resolution % (vae_factor * unet_factor):
        raise UserError(
            f"Resolution {resolution} cannot be taken: the VAE downsamples by {vae_factor} and the UNet by "
            f"{unet_factor}, so it must be a multiple of {vae_factor * unet_factor}."
        )
    if dc.train_data_dir and dc.dataset_name:
        raise UserError("Pass either --train_data_dir or --dataset_name for the GAN's real images, not both.")
    if needs_real_data and not (dc.train_data_dir or dc.dataset_name):
        raise UserError(
            "The GAN needs real images with captions: pass --train_data_dir (images + metadata.jsonl with "
            "file_name and text) or --dataset_name (a Hugging Face dataset), or --no-gan (the sd15 preset's "
            "stage 1 is DM-only)."
        )
    if config.trainer.eval_steps and {"eval_steps", "eval_reference", "eval_features"} & config.explicit:
        raise UserError(
            "In-training FID for text-to-image teachers is not supported yet; measure the export with onestep-eval."
        )
    extra = {"prompt_file": os.path.abspath(tc.prompt_file), "resolution": resolution}
    trainer = _trainer(config, preset, method_name, extra)
    encoder = PromptEncoder.from_pretrained(path, sdxl, resolution, revision=tc.revision).to(trainer.device)

    def cond_sampler(n, device):
        # The trainer seeds the global generator per (seed, rank, step), so prompt draws replay on resume.
        idx = torch.randint(len(prompts), (n,))
        return encoder.encode([prompts[int(i)] for i in idx]).to(device)

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(trainer.device).eval().requires_grad_(False)
    scale = vae.config.scaling_factor

    def decode(latents):
        with torch.no_grad():
            return vae.decode((latents / scale).to(vae.dtype)).sample.float()

    data = None
    if needs_real_data:

        def encode_images(images):  # [-1, 1] pixels -> scaled latents (posterior mean: deterministic)
            with torch.no_grad():
                return vae.encode(images.to(trainer.device, vae.dtype)).latent_dist.mode().float() * scale

        cache = (
            (dc.latent_cache_dir or os.path.join(config.trainer.output_dir, "latent_cache"))
            if dc.cache_latents
            else None
        )
        acc = trainer.accelerator
        with acc.main_process_first():  # rank 0 downloads and prepares a hub dataset once, the others then read it
            real = (
                ImageFolder(dc.train_data_dir, resolution)
                if dc.train_data_dir
                else HFImageCaptions(
                    dc.dataset_name,
                    resolution,
                    dc.dataset_split,
                    dc.dataset_config_name,
                    dc.image_column,
                    dc.caption_column,
                )
            )
        data = CaptionedLatentBatches(
            real,
            config.method.train_batch_size,
            config.trainer.seed,
            encode_images,
            encoder.encode,
            cache_dir=cache,
            cache_key=json.dumps(vae_cfg, sort_keys=True),
            rank=acc.process_index,
            world_size=acc.num_processes,
            barrier=acc.wait_for_everyone,
        )
    latent = resolution // vae_factor
    return Setup(
        config,
        preset,
        teacher,
        "text",
        (unet_cfg["in_channels"], latent, latent),
        cond_sampler,
        encoder.uncond,
        trainer,
        data,
        decode=decode,
        export_info={
            "scheduler_config": teacher.scheduler_config,
            "pipeline": "sdxl" if sdxl else "sd15",
            "teacher_path": path,
            "teacher": teacher_id,
        },
        prompts=prompts,
        prompt_encoder=encoder,
    )


def add_lora_to(net, setup: Setup, default_targets: tuple[str, ...]) -> dict | None:
    """LoRA on the student network when --lora_rank > 0; returns the adapter's export metadata."""
    mc = setup.config.memory
    if not mc.lora_rank:
        return None
    if setup.kind != "text":
        raise UserError("--lora_rank is for text-to-image (SD1.5/SDXL) teachers.")
    from .lora import add_lora

    targets = tuple(t.strip() for t in mc.lora_targets.split(",")) if mc.lora_targets else default_targets
    return add_lora(net, mc.lora_rank, mc.lora_alpha, targets)


def apply_memory_options(unets, memory, device) -> None:
    """Gradient checkpointing and the attention backend for every diffusers UNet in `unets`."""
    import warnings

    for unet in unets:
        if memory.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
    if memory.enable_xformers_memory_efficient_attention:
        if device.type != "cuda":
            warnings.warn("xformers needs CUDA; using PyTorch SDPA attention instead.", stacklevel=2)
            return
        _require_xformers()
        for unet in unets:
            unet.enable_xformers_memory_efficient_attention()


def _announce_preset(setup: Setup) -> None:
    """Say which recipe applied (it is also in the model card and training_config.json), and when its
    settings were made for another teacher than the one given."""
    teacher = setup.config.teacher.pretrained_model_name_or_path
    line = f"Preset {setup.preset}; teacher {teacher}."
    if "pretrained_model_name_or_path" in setup.config.explicit:
        line += (
            " The preset's settings were made for its own teacher; every flag you did not pass comes from it "
            "(see training_config.json and --help)."
        )
    setup.trainer.log(line)


def _require_xformers() -> None:
    try:
        import xformers  # noqa: F401  (the optional extra onestep[xformers])
    except ImportError:
        raise UserError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install 'onestep[xformers]' "
            "(or leave the flag out: PyTorch SDPA attention is used)."
        ) from None


def train(setup: Setup, method, product: str | None = None) -> dict:
    """Memory options on the method's networks and the teacher's, then the trainer's fit, then where things are
    (`product`: the first line of that list, '{out}' for the folder, when the run makes no student pipeline)."""
    trainer = setup.trainer
    _announce_preset(setup)
    nets = [*method.memory_networks(), setup.teacher.denoiser.net]
    if setup.config.memory.gradient_checkpointing:
        skipped = method.checkpointing_exclusions()
        if skipped and trainer.is_main:
            trainer.log(f"Note: gradient checkpointing is not applied to {skipped}.")
    apply_memory_options(nets, setup.config.memory, trainer.device)
    result = trainer.fit(method, setup.data, in_training_evaluator(setup))
    if trainer.is_main and not result["interrupted"] and not result.get("already_finished"):
        out = os.path.abspath(setup.config.trainer.output_dir)
        pipeline = "student pipeline  {out} (model_index.json, unet/, scheduler/, README.md)"
        product = (product or pipeline).format(out=out)
        evaluated = os.path.exists(os.path.join(out, "logs", "eval.csv"))  # only runs that evaluated have one
        trainer.log(
            f"\nDone. Everything is under {out}:\n"
            f"  {product}\n"
            f"  configuration     {out}/training_config.json (rerun with --config)\n"
            f"  checkpoints       {out}/checkpoint-<step>\n"
            f"  sample grids      {out}/samples/\n"
            f"  loss curves       {out}/loss_curves.png, {out}/logs/losses.csv\n"
            + (f"  in-training FID   {out}/logs/eval.csv, {out}/logs/eval.png\n" if evaluated else "")
            + f"  timing            {out}/timing.json\n"
            f"Load it: {method.usage(setup.config.trainer.output_dir)}"
        )
    return result
