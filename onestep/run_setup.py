"""Run setup: what a stage of a run needs built from its resolved configuration. `prepare` loads the teacher
(pixel, class-conditional, text-to-image latent, or image-conditioned super-resolution), and builds its typed
`TeacherContext` (conditioning, decode, export target, LoRA), the real data and the trainer; `evaluator_for`
decides whether in-training evaluation runs (the evaluator itself comes from onestep.eval, given by the caller).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .config import RunConfig, resolved_record
from .context import ONE_STEP, SD15, SDXL, SUPER_RESOLUTION, ExportTarget, LoraRequest, TeacherContext
from .data import DatasetBatches, ImageFolder, TensorBatches, load_digits_images
from .denoiser import Cond
from .errors import UserError
from .loading import Teacher, load_teacher, read_class_info, resolve_teacher_path
from .trainer import Trainer


@dataclass
class Setup:
    """What the run setup built for one stage: the teacher's context, the real data, the trainer."""

    config: RunConfig
    preset: str
    context: TeacherContext
    trainer: Trainer
    data: object = None  # a batch source, when the method needs real images (SR: always; it carries the condition)


def teacher_kind(unet_class: str, unet_config: dict) -> str:
    if unet_class == "UNet2DConditionModel":
        return "text"
    out = unet_config["out_channels"]
    learned_sigma = out == 2 * unet_config["in_channels"]
    return "sr" if unet_config["in_channels"] > out and not learned_sigma else "pixel"


KIND_NAMES = {
    "pixel": "unconditional or class-conditional pixel",
    "text": "text-to-image (SD1.5/SDXL)",
    "sd3": "Stable Diffusion 3 (flow-matching transformer)",
    "flux": "Flux (flow-matching transformer)",
    "sr": "super-resolution (the low-resolution image on extra input channels)",
    "latent_sr": "latent super-resolution (LDMSuperResolutionPipeline / StableDiffusionUpscalePipeline)",
}
TEXT_KINDS = ("text", "sd3", "flux")  # prompts, latents, a VAE and a stock text-to-image pipeline
FLOW_KINDS = ("sd3", "flux")  # flow-matching transformers (onestep/flow_teachers.py)
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, the guidance input a Flux student reads by default


def check_inputs(config: RunConfig, preset: str) -> None:
    """What can be refused before anything is loaded or written: a preset's placeholder teacher, xformers, an
    output folder inside an input folder."""
    tc = config.teacher
    if config.memory.enable_xformers_memory_efficient_attention and torch.cuda.is_available():
        _require_xformers()
    if tc.pretrained_model_name_or_path.startswith("<"):
        raise UserError(
            f"Preset {preset} needs --pretrained_model_name_or_path (its teacher: {tc.pretrained_model_name_or_path})."
        )
    check_output_is_not_an_input(config)


def prepare(
    config: RunConfig,
    preset: str,
    method_name: str,
    needs_real_data: bool,
    kinds: tuple[str, ...] = ("pixel", "text"),
    refusals: dict[str, str] | None = None,
    method_key: str | None = None,
) -> Setup:
    """Load the teacher and build the rest for its kind (one of `kinds`, those the method distils).
    `refusals`: the method's own sentence for a kind it does not distil; `method_key`: recorded in
    training_config.json. Refuses bad input before anything is written."""
    tc = config.teacher
    check_inputs(config, preset)
    make_trainer = lambda card=None: _trainer(config, preset, method_name, card, method_key)  # noqa: E731
    flow_kind = _flow_kind(tc)
    if flow_kind is not None:
        _check_kind(flow_kind, kinds, refusals, tc.pretrained_model_name_or_path, method_name)
        _check_flow_options(config, flow_kind)
        lora = _lora_request(config, flow_kind)
        setup = _prepare_text(config, _load_flow(config, flow_kind), needs_real_data, make_trainer)
        return _finish(setup, preset, lora)
    _check_flow_options(config, None)
    teacher = load_teacher(tc.pretrained_model_name_or_path, revision=tc.revision, variant=tc.variant)
    from .latent_sr import latent_sr_flavour, prepare_latent_sr

    latent_sr = latent_sr_flavour(tc.pretrained_model_name_or_path, teacher, tc.revision)
    kind = "latent_sr" if latent_sr else teacher_kind(teacher.unet_class, teacher.unet_config)
    _check_kind(kind, kinds, refusals, tc.pretrained_model_name_or_path, method_name)
    lora = _lora_request(config, kind)
    if kind == "latent_sr":
        context, data, trainer = prepare_latent_sr(config, teacher, sr_training_data, make_trainer)
        return Setup(config, preset, context, trainer, data)
    build = {"pixel": _prepare_pixel, "text": _prepare_text, "sr": _prepare_sr}[kind]
    return _finish(build(config, teacher, needs_real_data, make_trainer), preset, lora)


def _finish(setup: Setup, preset: str, lora: LoraRequest | None) -> Setup:
    setup.preset = preset
    if lora is not None:
        setup.context = replace(setup.context, lora=lora)
    return setup


def _check_kind(kind: str, kinds: tuple[str, ...], refusals: dict[str, str] | None, teacher: str, method: str):
    if kind not in kinds:
        raise UserError(
            (refusals or {}).get(kind)
            or f"{teacher} is a {KIND_NAMES[kind]} teacher; {method} distils "
            f"{' and '.join(KIND_NAMES[k] for k in kinds)} teachers."
        )


def _flow_kind(tc) -> str | None:
    """The kind of a Stable Diffusion 3 ("sd3") or Flux ("flux") pipeline, read from its config files; else None."""
    from .flow_teachers import flow_teacher_kind

    if tc.pretrained_model_name_or_path.startswith("<"):
        return None
    return flow_teacher_kind(resolve_teacher_path(tc.pretrained_model_name_or_path), tc.revision)


def _check_flow_options(config: RunConfig, kind: str | None) -> None:
    """Flux reads its guidance as an input and has no unconditional one: real-score CFG cannot run on it, and
    --guidance_embedding means nothing to another teacher."""
    tc = config.teacher
    if kind == "flux" and (getattr(config.method, "guidance_scale", None) or 1.0) > 1:
        raise UserError(
            f"Flux is guidance-distilled and has no unconditional input, so the teacher's classifier-free guidance "
            f"(--guidance_scale {config.method.guidance_scale}) cannot run on it: leave --guidance_scale at 1 and set "
            f"the guidance the transformer reads with --guidance_embedding (default {FLUX_GUIDANCE})."
        )
    if tc.guidance_embedding is not None and kind != "flux":
        raise UserError(
            "--guidance_embedding is for Flux teachers, whose transformer reads the guidance scale as an input; "
            "leave it out for this teacher."
        )
    if tc.guidance_embedding is not None:
        from .flow_teachers import config_json

        path = resolve_teacher_path(tc.pretrained_model_name_or_path)
        if not config_json(path, "transformer/config.json", tc.revision).get("guidance_embeds", False):
            raise UserError(
                "--guidance_embedding needs a guidance-distilled Flux transformer (FLUX.1-dev); this one has no "
                "guidance input (guidance_embeds is false), so leave the flag out."
            )


def flow_resolution(path: str, kind: str, resolution: int | None, revision: str | None = None) -> int:
    """The training resolution of an SD3 / Flux teacher: --resolution, else the transformer's sample_size times the
    VAE factor (SD3), else 1024 (Flux's config records none). It must split into whole 2x2 latent patches, and
    SD3's positional embeddings must cover it."""
    from .flow_teachers import config_json

    cfg = config_json(path, "transformer/config.json", revision)
    vae_cfg = config_json(path, "vae/config.json", revision)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    patch = 2 if kind == "flux" else cfg.get("patch_size", 2)
    default = cfg["sample_size"] * vae_factor if kind == "sd3" and cfg.get("sample_size") else 1024
    resolution = resolution or default
    if resolution % (vae_factor * patch):
        raise UserError(
            f"Resolution {resolution} cannot be taken: the VAE downsamples by {vae_factor} and the transformer reads "
            f"{patch}x{patch} latent patches, so it must be a multiple of {vae_factor * patch}."
        )
    tokens, most = resolution // (vae_factor * patch), cfg.get("pos_embed_max_size")
    if kind == "sd3" and most and tokens > most:
        raise UserError(
            f"Resolution {resolution} is {tokens} patches a side, more than the transformer's positional embeddings "
            f"cover ({most}); use at most {most * vae_factor * patch}."
        )
    return resolution


def _load_flow(config: RunConfig, kind: str):
    """The SD3 / Flux teacher on the schedule of the training resolution (Flux's shift depends on it)."""
    from .flow_teachers import load_flow_teacher

    tc = config.teacher
    path = _teacher_folder(tc)
    resolution = flow_resolution(path, kind, tc.resolution)
    return load_flow_teacher(path, revision=tc.revision, variant=tc.variant, resolution=resolution)


def check_teacher_and_data(
    config: RunConfig,
    method_name: str,
    needs_real_data: bool,
    kinds: tuple[str, ...] = ("pixel", "text"),
    refusals: dict[str, str] | None = None,
) -> None:
    """Before any stage starts: the teacher is a kind the method distils, and the real images a stage that needs
    them will read are there to be read (the same sentences `prepare` would say later, from the teacher's config
    files alone)."""
    from .latent_sr import latent_sr_flavour
    from .loading import teacher_configs
    from .sr_data import BUNDLED_PHOTOGRAPHS, BUNDLED_SR_TEACHERS

    tc, dc = config.teacher, config.data
    if tc.pretrained_model_name_or_path.startswith("<"):
        return  # check_inputs names the missing teacher
    kind = _flow_kind(tc)
    if kind is None:
        _, unet_cfg, sched_cfg = teacher_configs(tc.pretrained_model_name_or_path, tc.revision)
        configs = Teacher(None, unet_cfg["_class_name"], unet_cfg, sched_cfg, tc.pretrained_model_name_or_path)
        latent = latent_sr_flavour(tc.pretrained_model_name_or_path, configs, tc.revision)
        kind = "latent_sr" if latent else teacher_kind(configs.unet_class, unet_cfg)
    _check_kind(kind, kinds, refusals, tc.pretrained_model_name_or_path, method_name)
    _check_flow_options(config, kind if kind in FLOW_KINDS else None)
    if kind in FLOW_KINDS:
        flow_resolution(resolve_teacher_path(tc.pretrained_model_name_or_path), kind, tc.resolution, tc.revision)
    if not needs_real_data:
        return
    if kind == "pixel" and not (dc.train_data_dir or tc.pretrained_model_name_or_path == "digits"):
        raise UserError(
            f"{method_name}'s GAN needs real images: pass --train_data_dir, or --no-gan for distribution matching only."
        )
    if kind in TEXT_KINDS and not (dc.train_data_dir or dc.dataset_name):
        raise UserError(
            f"{method_name}'s GAN needs real images with captions: pass --train_data_dir (images + metadata.jsonl with "
            "file_name and text) or --dataset_name (a Hugging Face dataset), or --no-gan."
        )
    trained_on = read_class_info(tc.pretrained_model_name_or_path, {}, tc.revision).get("training_data")
    bundled = tc.pretrained_model_name_or_path in BUNDLED_SR_TEACHERS or trained_on == BUNDLED_PHOTOGRAPHS
    if kind in ("sr", "latent_sr") and not (dc.train_data_dir or dc.hr_dir or bundled):
        raise UserError(
            "Super-resolution teachers learn from real high-resolution images: pass --train_data_dir "
            "(or --hr_dir with --lr_dir)."
        )


MIN_LOWEST_LEVEL = 4  # the smallest feature map (per side) the UNet may see at its lowest level


def check_lowest_level(size: int, downsampling: int) -> None:
    """A training size so small that the UNet's lowest level sees fewer than 4x4 features trains a network that
    has never seen its own structure at work (and an SR export would then tile every input in such tiles)."""
    if size // downsampling < MIN_LOWEST_LEVEL:
        raise UserError(
            f"--resolution {size} leaves the UNet a {size // downsampling}x{size // downsampling} map at its lowest "
            f"level (it downsamples by {downsampling}); use at least {MIN_LOWEST_LEVEL * downsampling}."
        )


def _lora_request(config: RunConfig, kind: str) -> LoraRequest | None:
    mc = config.memory
    if not mc.lora_rank:
        return None
    if kind not in TEXT_KINDS:
        raise UserError("--lora_rank is for text-to-image (SD1.5/SDXL, SD3, Flux) teachers.")
    targets = tuple(t.strip() for t in mc.lora_targets.split(",")) if mc.lora_targets else None
    return LoraRequest(mc.lora_rank, mc.lora_alpha, targets)


def check_output_is_not_an_input(config: RunConfig) -> None:
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


def _trainer(
    config: RunConfig, preset: str, method_name: str, extra_card: dict | None = None, method_key: str | None = None
) -> Trainer:
    card = {"preset": preset, "teacher": config.teacher.pretrained_model_name_or_path, **(extra_card or {})}
    record = resolved_record(config, preset, method_name, method_key)
    return Trainer(replace(config.trainer, run_config=card, resolved_config=record))


def _prepare_pixel(config: RunConfig, teacher: Teacher, needs_real_data: bool, make_trainer) -> Setup:
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
    check_lowest_level(resolution, 2**depth)
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

    trainer = make_trainer()
    data = real_pixel_data(config, resolution, channels, num_classes) if needs_real_data else None

    def cond_sampler(n, device):
        return Cond(class_labels=torch.randint(0, num_classes, (n,), device=device)) if num_classes else None

    uncond = (
        (lambda c: Cond(class_labels=torch.full_like(c.class_labels, null_class))) if null_class is not None else None
    )
    context = TeacherContext(
        teacher.denoiser,
        (channels, resolution, resolution),
        cond_sampler,
        uncond,
        source=teacher_id,
        kind="pixel",
        num_classes=num_classes,
        export=ExportTarget(ONE_STEP, teacher.scheduler_config, num_classes=num_classes),
    )
    return Setup(config, "", context, trainer, data)


def evaluator_for(setup: Setup, build_evaluator: Callable | None):
    """The evaluator of --eval_steps (main process only; None when off): `build_evaluator(evaluation config,
    teacher id, seed, device)` is onestep.eval's, handed down by the caller so the core never imports the
    evaluation package. Built after the method: building its feature network draws from the global RNG, which
    the method's fresh layers (a GAN head) must not see moved."""
    config, trainer = setup.config, setup.trainer
    if not config.trainer.eval_steps or not trainer.is_main or build_evaluator is None:
        return None
    ec = config.evaluation
    if setup.context.kind in TEXT_KINDS:  # a preset's in-training FID (asking for it was refused in _prepare_text)
        trainer.log("In-training FID is off: it is not supported for text-to-image teachers yet (use onestep-eval).")
        return None
    asked = {"eval_steps", "eval_reference", "eval_features"} & config.explicit or ec.eval_reference is not None
    if setup.context.source != "digits" and not asked:
        # The preset's in-training FID was made for the bundled digits (their reference and features ship):
        # for another teacher, start without it rather than stop, and say how to turn it on.
        trainer.log(
            "In-training FID is off for this teacher: pass --eval_steps N with --eval_reference (an image folder or "
            "a .npz from onestep-eval stats) and --eval_features to turn it on."
        )
        return None
    return build_evaluator(ec, setup.context.source, config.trainer.seed, trainer.device)


def _prepare_sr(config: RunConfig, teacher: Teacher, needs_real_data: bool, make_trainer) -> Setup:
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
    check_lowest_level(resolution, depth)
    data = sr_training_data(config, resolution, channels, scale)
    trainer = make_trainer({"upscale_factor": scale})
    context = TeacherContext(
        teacher.denoiser,
        (channels, resolution, resolution),
        source=tc.pretrained_model_name_or_path,
        kind="sr",
        export=ExportTarget(SUPER_RESOLUTION, teacher.scheduler_config, upscale_factor=scale, resolution=resolution),
    )
    return Setup(config, "", context, trainer, data)


def sr_upscale_factor(tc) -> int:
    """--upscale_factor, else the one the teacher folder records (onestep.json), else 4; refuses a mismatch."""
    recorded = read_class_info(tc.pretrained_model_name_or_path, {}, tc.revision).get("upscale_factor")
    if tc.upscale_factor and recorded and tc.upscale_factor != recorded:
        raise UserError(f"--upscale_factor {tc.upscale_factor} does not match the teacher's x{recorded}.")
    return tc.upscale_factor or recorded or 4


def sr_training_data(config: RunConfig, resolution: int, channels: int, scale: int, bundled_images: bool = False):
    """Random HR crops and their LR inputs: paired --hr_dir/--lr_dir, --train_data_dir (LR by the degradation),
    or, for the bundled SR teachers (and the scripts that train them: `bundled_images`), the training split of
    the bundled photographs (onestep/sr_data.py)."""
    from .sr_data import BUNDLED_PHOTOGRAPHS, BUNDLED_SR_TEACHERS, SRCrops, natural_images

    dc, teacher = config.data, config.teacher.pretrained_model_name_or_path
    kw = dict(
        resolution=resolution,
        scale=scale,
        batch_size=config.method.train_batch_size,
        seed=config.trainer.seed,
        channels=channels,
        augmentation=dc.augmentation,
    )
    if dc.lr_dir and not dc.hr_dir:
        raise UserError("--lr_dir needs --hr_dir, the high-resolution images it pairs with.")
    if dc.hr_dir and dc.train_data_dir:
        raise UserError("Pass either --train_data_dir or --hr_dir (with --lr_dir), not both.")
    if dc.hr_dir or dc.train_data_dir:
        return SRCrops.from_folders(dc.hr_dir or dc.train_data_dir, dc.lr_dir, **kw)
    trained_on = read_class_info(teacher, {}, config.teacher.revision).get("training_data") if teacher else None
    if bundled_images or teacher in BUNDLED_SR_TEACHERS or trained_on == BUNDLED_PHOTOGRAPHS:
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


def _teacher_folder(tc) -> str:
    """The teacher's local folder: a hub id is downloaded once (the stock pipelines copy its VAE and encoders)."""
    path = resolve_teacher_path(tc.pretrained_model_name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(tc.pretrained_model_name_or_path, revision=tc.revision)
    return path


def _prepare_text(config: RunConfig, teacher: Teacher, needs_real_data: bool, make_trainer) -> Setup:
    """Text-to-image latent teachers, Stable Diffusion 1.5 / SDXL (a UNet) and SD3 / Flux (a flow-matching
    transformer, `teacher` a FlowTeacher loaded at the training resolution): prompts from --prompt_file, latents,
    the VAE for grids and for the GAN's real images, the stock pipeline as the export target."""
    from .data import read_prompts
    from .flow_teachers import FlowTeacher

    tc, dc = config.teacher, config.data
    teacher_id = tc.pretrained_model_name_or_path
    path = _teacher_folder(tc)
    if not tc.prompt_file:
        raise UserError("Text-to-image teachers need --prompt_file (prompts for the generator, one per line).")
    prompts = read_prompts(tc.prompt_file)
    vae_cfg_path = os.path.join(path, "vae", "config.json")
    if not os.path.isfile(vae_cfg_path):
        raise UserError(f"The teacher folder {path} has no vae/; a latent text-to-image teacher needs its VAE.")
    with open(vae_cfg_path) as f:
        vae_cfg = json.load(f)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    flow = isinstance(teacher, FlowTeacher)
    resolution = teacher.resolution if flow else _unet_resolution(tc, teacher.unet_config, vae_factor)
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
    trainer = make_trainer(extra)
    encoder = _prompt_encoder(teacher, path, resolution, tc).to(trainer.device)

    def cond_sampler(n, device):
        # The trainer seeds the global generator per (seed, rank, step), so prompt draws replay on resume.
        idx = torch.randint(len(prompts), (n,))
        return encoder.encode([prompts[int(i)] for i in idx]).to(device)

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(trainer.device).eval().requires_grad_(False)
    # SD3 / Flux latents are shifted, then scaled (SD's VAEs have no shift): latent = (mean - shift) * scale.
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0

    def decode(latents):
        with torch.no_grad():
            return vae.decode((latents / scale + shift).to(vae.dtype)).sample.float()

    def encode_images(images):  # [-1, 1] pixels -> latents (posterior mean: deterministic)
        with torch.no_grad():
            return (vae.encode(images.to(trainer.device, vae.dtype)).latent_dist.mode().float() - shift) * scale

    data = (
        _captioned_latents(config, resolution, encode_images, encoder.encode, vae_cfg, trainer)
        if needs_real_data
        else None
    )
    latent = resolution // vae_factor
    if flow:
        channels = vae_cfg["latent_channels"]
        guidance = getattr(encoder, "guidance_scale", None)
        export = ExportTarget(
            teacher.kind, teacher.scheduler_config, teacher_path=path, resolution=resolution, guidance=guidance
        )
        uncond, kind = (encoder.uncond if encoder.classifier_free_guidance else None), teacher.kind
    else:
        sdxl = teacher.unet_config.get("addition_embed_type") == "text_time"
        channels = teacher.unet_config["in_channels"]
        export = ExportTarget(SDXL if sdxl else SD15, teacher.scheduler_config, teacher_path=path)
        uncond, kind = encoder.uncond, "text"
    context = TeacherContext(
        teacher.denoiser,
        (channels, latent, latent),
        cond_sampler,
        uncond,
        decode=decode,
        source=teacher_id,
        kind=kind,
        export=export,
        prompts=tuple(prompts),
        prompt_encoder=encoder,
    )
    return Setup(config, "", context, trainer, data)


def _unet_resolution(tc, unet_cfg: dict, vae_factor: int) -> int:
    """--resolution, else the UNet's sample_size times the VAE factor; a multiple of both downsamplings."""
    unet_factor = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    resolution = tc.resolution or unet_cfg["sample_size"] * vae_factor
    if resolution % (vae_factor * unet_factor):
        raise UserError(
            f"Resolution {resolution} cannot be taken: the VAE downsamples by {vae_factor} and the UNet by "
            f"{unet_factor}, so it must be a multiple of {vae_factor * unet_factor}."
        )
    check_lowest_level(resolution, vae_factor * unet_factor)
    return resolution


def _prompt_encoder(teacher: Teacher, path: str, resolution: int, tc):
    """The teacher's prompt encoder: SD1.5 / SDXL (PromptEncoder), SD3 (with the empty prompt as its
    unconditional input) or Flux (its guidance input from --guidance_embedding)."""
    from .flow_teachers import FlowTeacher, FluxPromptEncoder, SD3PromptEncoder
    from .text import PromptEncoder

    if not isinstance(teacher, FlowTeacher):
        sdxl = teacher.unet_config.get("addition_embed_type") == "text_time"
        return PromptEncoder.from_pretrained(path, sdxl, resolution, revision=tc.revision)
    if teacher.kind == "sd3":
        return SD3PromptEncoder.from_pretrained(path, revision=tc.revision)
    guidance = tc.guidance_embedding if tc.guidance_embedding is not None else FLUX_GUIDANCE
    return FluxPromptEncoder.from_pretrained(path, revision=tc.revision, guidance_scale=guidance)


def _captioned_latents(config: RunConfig, resolution: int, encode_images, encode_text, vae_cfg: dict, trainer):
    """The GAN's real images with their captions, as latents (`encode_images`) and conditions (`encode_text`):
    --train_data_dir or --dataset_name, optionally encoded once into a latent cache."""
    from .data import CaptionedLatentBatches, HFImageCaptions

    dc = config.data
    cache = (
        (dc.latent_cache_dir or os.path.join(config.trainer.output_dir, "latent_cache")) if dc.cache_latents else None
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
    return CaptionedLatentBatches(
        real,
        config.method.train_batch_size,
        config.trainer.seed,
        encode_images,
        encode_text,
        cache_dir=cache,
        cache_key=json.dumps(vae_cfg, sort_keys=True),
        rank=acc.process_index,
        world_size=acc.num_processes,
        barrier=acc.wait_for_everyone,
    )


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


def announce_preset(setup: Setup, loads_teacher: bool = True) -> None:
    """Say which recipe applied (it is also in the model card and training_config.json), and when its
    settings were made for another teacher than the one given."""
    teacher = setup.config.teacher.pretrained_model_name_or_path
    if not loads_teacher:  # a stage that trains a network from scratch
        setup.trainer.log(f"Preset {setup.preset}; a new network trained from scratch.")
        return
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
