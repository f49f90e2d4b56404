"""DMD2 distillation (Yin et al. 2024): one-step or few-step students from a diffusers teacher.

With no arguments it distils the bundled digits teacher on the CPU (about 8 minutes on 2 cores):

    accelerate launch train/dmd2.py

Options follow the diffusers training examples; every option left out comes from --preset.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import add_trainer_args, positive_int, run_main, trainer_config


def parse_args(argv=None):
    from onestep.presets import PRESETS

    from onestep.cli import help_formatter
    from onestep.presets import DMD2Preset, presets_help

    p = argparse.ArgumentParser(description=__doc__, formatter_class=help_formatter(DMD2Preset), epilog=presets_help(PRESETS))
    p.add_argument("--preset", default="digits-cpu", help=f"Named recipe: {', '.join(PRESETS)}.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Teacher: a diffusers folder (unet/ + scheduler/), a hub id, or 'digits' (bundled) (default: the preset's teacher).")
    p.add_argument("--revision", default=None, help="Hub teachers: the git revision (branch, tag or commit) to load.")
    p.add_argument("--variant", default=None, help="Teacher weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors).")
    p.add_argument("--train_data_dir", default=None,
                   help="Real images for the GAN (sub-folders = classes for class-conditional teachers); "
                        "default for the digits teacher: the scikit-learn digits.")
    p.add_argument("--dataset_name", default=None,
                   help="Text-to-image GAN data from a Hugging Face dataset instead: a hub id or a local dataset folder "
                        "(datasets.load_dataset; needs pip install 'onestep[datasets]').")
    p.add_argument("--dataset_config_name", default=None, help="--dataset_name: the dataset's configuration, if it has several.")
    p.add_argument("--dataset_split", default="train", help="--dataset_name: the split to read.")
    p.add_argument("--image_column", default="image", help="--dataset_name: the column holding images.")
    p.add_argument("--caption_column", default="text", help="--dataset_name: the column holding captions.")
    p.add_argument("--resolution", type=positive_int, default=None, help="Image size (default: the teacher's sample_size).")
    p.add_argument("--train_batch_size", type=positive_int, default=None, help="Generator samples per process per iteration.")
    p.add_argument("--dataloader_num_workers", type=int, default=2, help="Worker processes reading --train_data_dir images.")
    p.add_argument("--learning_rate", type=float, default=None, help="Same for generator and critic.")
    p.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay (generator and critic).")
    p.add_argument("--ttur_ratio", type=positive_int, default=None, help="Critic updates per generator update (R).")
    p.add_argument("--guidance_scale", type=float, default=None, help="Real-score CFG scale (1 = off).")
    p.add_argument("--conditioning_timesteps", default=None, help="Comma-separated, e.g. 999 or 999,749,499,249.")
    p.add_argument("--gan", action=argparse.BooleanOptionalAction, default=None, help="GAN head on the critic (--no-gan: DM only).")
    p.add_argument("--gan_generator_weight", type=float, default=None, help="Weight of the generator's GAN loss next to the DM loss.")
    p.add_argument("--gan_discriminator_weight", type=float, default=None,
                   help="Weight of the discriminator (GAN head) loss next to the critic's denoising loss.")
    p.add_argument("--dm_t_min", type=int, default=20, help="Lowest timestep of the distribution-matching loss's noise draw.")
    p.add_argument("--dm_t_max", type=int, default=980, help="Highest timestep of the distribution-matching loss's noise draw.")
    p.add_argument("--num_classes", type=int, default=None, help="Real classes of a class-conditional teacher.")
    p.add_argument("--null_class", type=int, default=None, help="Class index the teacher was trained with as 'no class' (enables CFG).")
    p.add_argument("--prompt_file", default=None, help="Text-to-image teachers: prompts for the generator (.txt, one per line, or .jsonl).")
    p.add_argument("--cache_latents", action="store_true", help="Text-to-image GAN data: encode every real image with the VAE once, up front.")
    p.add_argument("--latent_cache_dir", default=None, help="Where --cache_latents writes its shards (default: <output_dir>/latent_cache).")
    p.add_argument("--lora_rank", type=int, default=None, help="Text-to-image teachers: LoRA on the generator only (0 = full fine-tuning).")
    p.add_argument("--lora_alpha", type=float, default=8.0, help="LoRA scale numerator (the update is scaled by alpha / rank).")
    p.add_argument("--lora_targets", default=None, help="Comma-separated module names for LoRA (default: the DMD2 spec's list).")
    add_trainer_args(p, output_dir="outputs/dmd2-digits")
    return p.parse_args(argv)


def parse_timesteps(text: str, num_timesteps: int) -> list[int]:
    from onestep.errors import UserError
    try:
        steps = [int(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--conditioning_timesteps must be comma-separated integers, got {text!r}.") from None
    if steps != sorted(set(steps), reverse=True) or steps[0] >= num_timesteps or steps[-1] < 0:
        raise UserError(f"--conditioning_timesteps must be distinct, descending and within 0..{num_timesteps - 1}, got {text!r}.")
    return steps


def main(argv=None):
    import torch

    from onestep.data import DatasetBatches, ImageFolder, TensorBatches, load_digits_images
    from onestep.denoiser import Cond
    from onestep.errors import UserError
    from onestep.loading import load_teacher, read_class_info
    from onestep.methods.dmd2 import DMD2
    from onestep.presets import get_preset
    from onestep.trainer import Trainer

    args = parse_args(argv)
    preset = get_preset(args.preset)
    teacher_id = args.pretrained_model_name_or_path or preset.teacher
    if teacher_id.startswith("<"):
        raise UserError(f"Preset {preset.name} needs --pretrained_model_name_or_path (its teacher: {teacher_id}).")
    teacher = load_teacher(teacher_id, revision=args.revision, variant=args.variant)
    if teacher.unet_class == "UNet2DConditionModel":
        return text_to_image_main(args, preset, teacher, teacher_id)
    if args.dataset_name:
        raise UserError("--dataset_name (image-caption data) is for text-to-image teachers; pixel teachers read --train_data_dir.")
    unet_cfg = teacher.unet_config
    depth = len(unet_cfg["block_out_channels"]) - 1
    resolution = args.resolution or unet_cfg["sample_size"]
    if resolution % (2 ** depth):
        raise UserError(f"Resolution {resolution} is not divisible by {2 ** depth}, the teacher UNet's downsampling factor.")
    channels = unet_cfg["in_channels"]

    info = read_class_info(teacher_id, unet_cfg)
    num_classes = args.num_classes or info.get("num_classes")
    null_class = args.null_class if args.null_class is not None else info.get("null_class")
    embeds = unet_cfg.get("num_class_embeds")
    if embeds and not num_classes:
        raise UserError("The teacher is class-conditional; pass --num_classes (and --null_class if it supports CFG).")
    if num_classes and (not embeds or num_classes > embeds):
        raise UserError(f"--num_classes {num_classes} does not fit the teacher, which embeds {embeds or 0} classes.")
    if null_class is not None and not (embeds and 0 <= null_class < embeds):
        raise UserError(f"--null_class {null_class} is not one of the teacher's {embeds or 0} class embeddings.")

    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else getattr(preset, name)  # noqa: E731
    timesteps = parse_timesteps(args.conditioning_timesteps, teacher.denoiser.schedule.num_timesteps) \
        if args.conditioning_timesteps else list(preset.conditioning_timesteps)
    guidance = pick("guidance_scale")
    if guidance != 1.0 and null_class is None:
        raise UserError("--guidance_scale needs a teacher trained with a null class; pass --null_class or use --guidance_scale 1.")
    config = dmd2_config(args, preset, timesteps, guidance)
    run_config = {"preset": preset.name, "teacher": teacher_id, "train_batch_size": config.train_batch_size,
                  "learning_rate": config.learning_rate, "ttur_ratio": config.ttur_ratio,
                  "guidance_scale": config.guidance_scale, "conditioning_timesteps": timesteps, "gan": config.gan}
    defaults = {k: getattr(preset, k) for k in ("max_train_steps", "mixed_precision", "lr_warmup_steps", "max_grad_norm",
                                                "ema_decay", "validation_steps", "checkpointing_steps", "eval_steps")}
    trainer = Trainer(trainer_config(args, defaults, run_config))

    data = None
    if config.gan:
        if args.train_data_dir:
            ds = ImageFolder(args.train_data_dir, resolution, channels=channels, class_folders=bool(num_classes))
            if num_classes and len(ds.class_names) != num_classes:
                raise UserError(f"{args.train_data_dir} has {len(ds.class_names)} class folders but the teacher has {num_classes} classes.")
            data = DatasetBatches(ds, config.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers,
                                  micro_steps=args.gradient_accumulation_steps)
        elif teacher_id == "digits":
            images, labels = load_digits_images(resolution)
            data = TensorBatches(images, labels, config.train_batch_size, seed=args.seed)
        else:
            raise UserError("The GAN needs real images: pass --train_data_dir, or --no-gan for distribution matching only.")

    def cond_sampler(n, device):
        if not num_classes:
            return None
        return Cond(class_labels=torch.randint(0, num_classes, (n,), device=device))

    uncond = (lambda c: Cond(class_labels=torch.full_like(c.class_labels, null_class))) if null_class is not None else None
    method = DMD2(teacher.denoiser, config, sample_shape=(channels, resolution, resolution), cond_sampler=cond_sampler,
                  uncond=uncond, export_info={"scheduler_config": teacher.scheduler_config, "num_classes": num_classes,
                                              "teacher": teacher_id})
    from onestep.cli import apply_memory_options
    args.gradient_checkpointing = args.gradient_checkpointing or preset.gradient_checkpointing
    apply_memory_options(memory_nets(method, teacher, config.gan, trainer, args.gradient_checkpointing), args, trainer.device)
    from onestep.eval.intraining import build_evaluator_from_args
    if args.eval_steps is None:  # --eval_steps 0 turns the preset's evaluation off
        args.eval_steps = preset.eval_steps
    evaluator = build_evaluator_from_args(args, teacher_id, trainer.device) if trainer.is_main else None
    result = trainer.fit(method, data, evaluator)
    if trainer.is_main and not result["interrupted"]:
        out = os.path.abspath(args.output_dir)
        trainer.log(
            f"\nDone. Everything is under {out}:\n"
            f"  student pipeline  {out} (model_index.json, unet/, scheduler/, one_step.py, README.md)\n"
            f"  checkpoints       {out}/checkpoint-<step>\n"
            f"  sample grids      {out}/samples/\n"
            f"  loss curves       {out}/loss_curves.png, {out}/logs/losses.csv\n"
            f"  in-training FID   {out}/logs/eval.csv, {out}/logs/eval.png\n"
            f"  timing            {out}/timing.json\n"
            f"Load it: DiffusionPipeline.from_pretrained({args.output_dir!r}, trust_remote_code=True)"
            f"(class_labels=[3, 7]).images"
        )
    return result


def memory_nets(method, teacher, gan: bool, trainer, gradient_checkpointing: bool) -> list:
    """The UNets --gradient_checkpointing applies to. With the GAN on, the critic is left out: its
    head reads the bottleneck through a hook that stops the forward early, and checkpoint recomputation
    of a forward cut short does not match (torch raises CheckpointError)."""
    nets = [method.generator.denoiser.net, teacher.denoiser.net]
    if gan:
        if gradient_checkpointing and getattr(trainer, "is_main", True):
            trainer.log("Note: gradient checkpointing is not applied to the critic while the GAN head is on.")
    else:
        nets.insert(1, method.critic.denoiser.net)
    return nets


def dmd2_config(args, preset, timesteps, guidance):
    from onestep.methods.dmd2 import DMD2Config
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else getattr(preset, name)  # noqa: E731
    return DMD2Config(
        learning_rate=pick("learning_rate"), adam_weight_decay=args.adam_weight_decay,
        train_batch_size=pick("train_batch_size"), ttur_ratio=pick("ttur_ratio"), guidance_scale=guidance,
        conditioning_timesteps=timesteps, dm_t_min=args.dm_t_min, dm_t_max=args.dm_t_max, gan=pick("gan"),
        gan_generator_weight=pick("gan_generator_weight"), gan_discriminator_weight=pick("gan_discriminator_weight"),
    )


def text_to_image_main(args, preset, teacher, teacher_id):
    """Stable Diffusion 1.5 / SDXL teachers: prompts from --prompt_file, latents, stock-pipeline export."""
    import json

    import torch

    from onestep.cli import apply_memory_options
    from onestep.data import read_prompts
    from onestep.errors import UserError
    from onestep.loading import resolve_teacher_path
    from onestep.methods.dmd2 import DMD2
    from onestep.text import PromptEncoder
    from onestep.trainer import Trainer

    path = resolve_teacher_path(teacher_id)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        path = snapshot_download(teacher_id, revision=args.revision)
    if not args.prompt_file:
        raise UserError("Text-to-image teachers need --prompt_file (prompts for the generator, one per line).")
    prompts = read_prompts(args.prompt_file)
    unet_cfg = teacher.unet_config
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    vae_cfg_path = os.path.join(path, "vae", "config.json")
    if not os.path.isfile(vae_cfg_path):
        raise UserError(f"The teacher folder {path} has no vae/; a latent text-to-image teacher needs its VAE.")
    with open(vae_cfg_path) as f:
        vae_cfg = json.load(f)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    unet_factor = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    resolution = args.resolution or unet_cfg["sample_size"] * vae_factor
    if resolution % (vae_factor * unet_factor):
        raise UserError(f"Resolution {resolution} cannot be taken: the VAE downsamples by {vae_factor} and the UNet by "
                        f"{unet_factor}, so it must be a multiple of {vae_factor * unet_factor}.")
    timesteps = parse_timesteps(args.conditioning_timesteps, teacher.denoiser.schedule.num_timesteps) \
        if args.conditioning_timesteps else list(preset.conditioning_timesteps)
    guidance = args.guidance_scale if args.guidance_scale is not None else preset.guidance_scale
    config = dmd2_config(args, preset, timesteps, guidance)
    from onestep.export import stock_scheduler
    stock_scheduler(teacher.scheduler_config, timesteps, offset_allowed=sdxl)  # refuse before training, not at export
    if args.train_data_dir and args.dataset_name:
        raise UserError("Pass either --train_data_dir or --dataset_name for the GAN's real images, not both.")
    if config.gan and not (args.train_data_dir or args.dataset_name):
        raise UserError("The GAN needs real images with captions: pass --train_data_dir (images + metadata.jsonl with "
                        "file_name and text) or --dataset_name (a Hugging Face dataset), or --no-gan (the sd15 preset's "
                        "stage 1 is DM-only).")
    if args.eval_steps:
        raise UserError("In-training FID for text-to-image teachers is not supported yet; measure the export with onestep-eval.")
    args.eval_steps = 0
    run_config = {"preset": preset.name, "teacher": teacher_id, "train_batch_size": config.train_batch_size,
                  "learning_rate": config.learning_rate, "ttur_ratio": config.ttur_ratio, "guidance_scale": guidance,
                  "conditioning_timesteps": timesteps, "gan": config.gan, "prompt_file": os.path.abspath(args.prompt_file),
                  "resolution": resolution}
    defaults = {k: getattr(preset, k) for k in ("max_train_steps", "mixed_precision", "lr_warmup_steps", "max_grad_norm",
                                                "ema_decay", "validation_steps", "checkpointing_steps")}
    trainer = Trainer(trainer_config(args, defaults, run_config))
    encoder = PromptEncoder.from_pretrained(path, sdxl, resolution, revision=args.revision).to(trainer.device)

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
    if config.gan:
        from onestep.data import CaptionedLatentBatches, HFImageCaptions, ImageFolder

        def encode_images(images):  # [-1, 1] pixels -> scaled latents (posterior mean: deterministic)
            with torch.no_grad():
                return vae.encode(images.to(trainer.device, vae.dtype)).latent_dist.mode().float() * scale

        cache = (args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache")) if args.cache_latents else None
        acc = trainer.accelerator
        with acc.main_process_first():  # rank 0 downloads and prepares a hub dataset once, the others then read it
            real = ImageFolder(args.train_data_dir, resolution) if args.train_data_dir else HFImageCaptions(
                args.dataset_name, resolution, args.dataset_split, args.dataset_config_name, args.image_column, args.caption_column)
        data = CaptionedLatentBatches(real, config.train_batch_size, args.seed, encode_images, lambda texts: encoder.encode(texts),
                                      cache_dir=cache, cache_key=json.dumps(vae_cfg, sort_keys=True),
                                      rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone)
    latent = resolution // vae_factor
    method = DMD2(teacher.denoiser, config, sample_shape=(unet_cfg["in_channels"], latent, latent), cond_sampler=cond_sampler,
                  uncond=encoder.uncond, decode=decode,
                  export_info={"scheduler_config": teacher.scheduler_config, "pipeline": "sdxl" if sdxl else "sd15",
                               "teacher_path": path, "teacher": teacher_id})
    rank = args.lora_rank if args.lora_rank is not None else preset.lora_rank
    if rank:
        from onestep.lora import DMD2_LORA_TARGETS, add_lora
        targets = tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else DMD2_LORA_TARGETS
        method.export_info["lora"] = add_lora(method.generator.denoiser.net, rank, args.lora_alpha, targets)
        run_config.update(lora_rank=rank, lora_alpha=args.lora_alpha)
    args.gradient_checkpointing = args.gradient_checkpointing or preset.gradient_checkpointing
    apply_memory_options(memory_nets(method, teacher, config.gan, trainer, args.gradient_checkpointing), args, trainer.device)
    result = trainer.fit(method, data)
    if trainer.is_main and not result["interrupted"]:
        trainer.log(f"\nDone. Load it: DiffusionPipeline.from_pretrained({args.output_dir!r})"
                    f"(prompt, num_inference_steps={len(timesteps)}, guidance_scale=0).images")
    return result


if __name__ == "__main__":
    run_main(main)
