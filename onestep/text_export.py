"""Exporting text-to-image students as diffusers' stock pipelines: StableDiffusion(XL)Pipeline with a stock
scheduler that reproduces the trained timesteps (SD3 / Flux: onestep/flow_export.py), LoRA students as an adapter
the teacher's pipeline loads plus a folder with it fused in."""

from __future__ import annotations

import os

from .errors import UserError
from .export import LORA_FOLDER, TEXT_TO_IMAGE, Card, loading_text, ship_pipeline_file, trained_size, write_folder
from .flow_teachers import FLOW_PIPELINES


def stock_scheduler(teacher_scheduler_config: dict, timesteps: list[int], offset_allowed: bool = True):
    """A stock diffusers scheduler whose ordinary `num_inference_steps=len(timesteps)` call reproduces the
    training contract exactly:
    - one step at t = T-1: DDIM with trailing spacing gives [T-1];
    - one step at another t_c: DDIM with leading spacing and steps_offset = t_c gives [t_c]; but
      StableDiffusionPipeline resets any steps_offset to 1 when it loads, so only SDXL pipelines keep it
      (offset_allowed=False refuses it);
    - several steps: LCM with original_inference_steps = k gives 999, 749, 499, 249 for k = 4 and re-noises
      each x0 prediction with fresh noise, which is DMD2's multi-step sampler (its consistency boundary
      terms vanish: timestep_scaling is set so that c_skip ~ 1e-16).
    DDIM's set_alpha_to_one makes the last update return the x0 prediction itself."""
    from diffusers import DDIMScheduler, LCMScheduler

    base = {k: v for k, v in teacher_scheduler_config.items() if not k.startswith("_")}
    last = int(base.get("num_train_timesteps", 1000)) - 1
    common = {"clip_sample": False, "thresholding": False}
    if len(timesteps) == 1 and int(timesteps[0]) == last:
        sched = DDIMScheduler.from_config(
            {**base, **common, "timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": True}
        )
    elif len(timesteps) == 1:
        if not offset_allowed:
            raise UserError(
                f"StableDiffusionPipeline resets steps_offset to 1 on loading, so its stock scheduler can start a "
                f"one-step student only at t = {last}; use --conditioning_timesteps {last} (SDXL pipelines take any t)."
            )
        sched = DDIMScheduler.from_config(
            {
                **base,
                **common,
                "timestep_spacing": "leading",
                "steps_offset": int(timesteps[0]),
                "set_alpha_to_one": True,
            }
        )
    else:
        sched = LCMScheduler.from_config(
            {**base, **common, "original_inference_steps": len(timesteps), "steps_offset": 1, "timestep_scaling": 1e7}
        )
    sched.set_timesteps(len(timesteps))
    got = [int(t) for t in sched.timesteps]
    if got != [int(t) for t in timesteps]:
        raise UserError(
            f"No stock scheduler reproduces the trained timesteps {list(timesteps)} (closest: {got}); "
            f"train with evenly spaced ones ending at T/k - 1, e.g. 999,749,499,249."
        )
    return sched


def check_exportable_timesteps(target, timesteps: list[int]) -> None:
    """Refuse, before training, a step list the student's stock text-to-image pipeline cannot reproduce
    (`target`: the teacher context's ExportTarget, or None)."""
    from .context import SDXL, STOCK_FLOW_PIPELINES, STOCK_TEXT_PIPELINES

    if target is not None and target.pipeline in STOCK_TEXT_PIPELINES:
        stock_scheduler(target.scheduler_config, timesteps, offset_allowed=target.pipeline == SDXL)
    elif target is not None and target.pipeline in STOCK_FLOW_PIPELINES:
        from .flow_export import check_flow_export

        check_flow_export(target.teacher_path, target.pipeline, timesteps, target.resolution)


def export_text_to_image(
    unet,
    target,
    scheduler,
    output_dir: str,
    card: Card,
    lora: dict | None = None,
    sample_size: int | None = None,
    ship: tuple[str, str] | None = None,
) -> None:
    """A Stable Diffusion student as the stock StableDiffusion(XL)Pipeline (SD3 / Flux: StableDiffusion3Pipeline /
    FluxPipeline, written by flow_export.save_flow_pipeline) (`target`: the teacher context's ExportTarget): the
    teacher's VAE, text encoders and tokenizers, the distilled UNet, and `scheduler`, which
    carries the sampling contract. A LoRA student (lora = its adapter config) also gets
    lora/pytorch_lora_weights.safetensors, which `teacher_pipe.load_lora_weights(folder + "/lora")` takes; the
    folder's own UNet has it fused in, made through that same diffusers path. `ship`: (pipeline file,
    scheduler class) when the scheduler is one of ours (BOOT's), copied into scheduler/."""
    import diffusers

    from .context import SDXL, STOCK_FLOW_PIPELINES

    if target.pipeline in STOCK_FLOW_PIPELINES:  # SD3 / Flux: the stock StableDiffusion3Pipeline / FluxPipeline
        from .flow_export import save_flow_pipeline

        card.rows = {**card.rows, "pipeline": FLOW_PIPELINES[target.pipeline]}
        card.pipeline_tag = TEXT_TO_IMAGE
        if lora is not None:
            card.loading += LORA_NOTE
        return save_flow_pipeline(
            unet, target.teacher_path, target.pipeline, scheduler, output_dir, card, lora, target.resolution, ship=ship
        )
    sdxl = target.pipeline == SDXL
    trained_size(unet, sample_size)
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def save(tmp):
        if lora is not None:
            from .lora import lora_state_dict

            adapter = os.path.join(tmp, LORA_FOLDER)
            cls.save_lora_weights(adapter, unet_lora_layers=lora_state_dict(unet), unet_lora_adapter_metadata=lora)
            pipe = cls.from_pretrained(target.teacher_path, scheduler=scheduler, **extra)
            pipe.load_lora_weights(adapter)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        else:
            pipe = cls.from_pretrained(target.teacher_path, unet=unet, scheduler=scheduler, **extra)
        pipe.save_pretrained(tmp)
        if ship is not None:
            ship_pipeline_file(tmp, ship[0], None, ship[1])

    card.rows = {**card.rows, "pipeline": cls.__name__}
    card.pipeline_tag = TEXT_TO_IMAGE
    if lora is not None:
        card.loading += LORA_NOTE
    write_folder(output_dir, save, card)


LORA_NOTE = (
    '\nThe LoRA adapter alone: `teacher_pipe.load_lora_weights(folder + "/lora")`, then the same call with '
    'the scheduler from this folder (`scheduler = <its class>.from_pretrained(folder, subfolder="scheduler")`).\n'
)


def export_dmd2_text_to_image(unet, target, timesteps, output_dir, card: Card, lora=None, sample_size=None):
    """DMD2's SD1.5/SDXL student: the stock pipeline with a stock scheduler that reproduces the trained steps (SD3 /
    Flux: flow_export.export_flow_pipeline, the same for StableDiffusion3Pipeline / FluxPipeline)."""
    from .context import SDXL, STOCK_FLOW_PIPELINES

    if target.pipeline in STOCK_FLOW_PIPELINES:
        from .flow_export import export_flow_pipeline

        return export_flow_pipeline(
            unet,
            target.teacher_path,
            target.pipeline,
            timesteps,
            output_dir,
            card,
            lora=lora,
            resolution=target.resolution,
            guidance_scale=target.guidance,
        )
    scheduler = stock_scheduler(target.scheduler_config, timesteps, offset_allowed=target.pipeline == SDXL)
    steps = len(timesteps)
    pipeline = "StableDiffusionXLPipeline" if target.pipeline == SDXL else "StableDiffusionPipeline"
    call = (
        f"`pipe(prompt, num_inference_steps={steps}, guidance_scale=0)` samples at timestep(s) {list(timesteps)}\n"
        "(guidance was distilled in; the saved scheduler config reproduces the training timesteps).\n"
    )
    card.loading = loading_text(pipeline, call)
    card.rows = {**card.rows, "sampling steps": steps, "conditioning timesteps": timesteps}
    card.steps = steps
    export_text_to_image(unet, target, scheduler, output_dir, card, lora=lora, sample_size=sample_size)


# -- MSD -----------------------------------------------------------------------------------------------------
