"""Writing students (and small teachers) as diffusers folders, with a model card.

Only what sampling needs is written (no critic, head, EMA shadow or teacher). Files are first written
to a temporary folder beside the target and then moved in, so a failed export never leaves a
half-written pipeline over a good one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from .errors import UserError


def _pipelines_source(name: str) -> str:
    """Path of a pipeline file: beside the package in a checkout, or inside it when installed."""
    import onestep.pipelines as pkg

    return os.path.join(os.path.dirname(pkg.__file__), name)


def ship_pipeline_file(folder: str, filename: str, pipeline_class: str | None, scheduler_class: str | None = None):
    """Copy pipelines/<filename> into an export folder (beside model_index.json for a pipeline class, into
    scheduler/ for a scheduler class) and name the classes in model_index.json as [module, class], so that
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) imports them."""
    source, module = _pipelines_source(filename), filename.removesuffix(".py")
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    if pipeline_class:
        shutil.copy(source, os.path.join(folder, filename))
        index["_class_name"] = [module, pipeline_class]
    if scheduler_class:
        shutil.copy(source, os.path.join(folder, "scheduler", filename))
        index["scheduler"] = [module, scheduler_class]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


def _move_into(tmp: str, output_dir: str) -> None:
    for name in os.listdir(tmp):
        dst = os.path.join(output_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        elif os.path.exists(dst):
            os.remove(dst)
        os.replace(os.path.join(tmp, name), dst)


def _scheduler(config: dict):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), None)
    if cls is None:
        raise UserError(f"Unknown scheduler class {config.get('_class_name')!r} in the teacher's scheduler config.")
    return cls.from_config(config)


def model_card(title: str, rows: dict, body: str = "") -> str:
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return f"# {title}\n\n| field | value |\n|---|---|\n{table}\n\n{body}".rstrip() + "\n"


def save_teacher(unet, scheduler_config: dict, output_dir: str, card: dict, class_info: dict | None = None) -> None:
    """A teacher folder: unet/ + scheduler/ (+ onestep.json with the class layout), as load_teacher reads it."""
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        unet.save_pretrained(os.path.join(tmp, "unet"))
        _scheduler(scheduler_config).save_pretrained(os.path.join(tmp, "scheduler"))
        if class_info:
            with open(os.path.join(tmp, "onestep.json"), "w") as f:
                json.dump(class_info, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card("Diffusion teacher", card))
        _move_into(tmp, output_dir)


def _trained_size(unet, sample_size: int | None) -> None:
    """The exported UNet's sample_size is what the student was trained at (pixels, or latents), which the
    pipelines sample at by default: a student trained at --resolution 64 from a 16x16 teacher samples 64x64."""
    if sample_size is not None and unet.config.sample_size != sample_size:
        unet.register_to_config(sample_size=sample_size)


def export_one_step(
    unet,
    scheduler_config: dict,
    timesteps: list[int],
    output_dir: str,
    card: dict,
    num_classes: int | None = None,
    sample_size: int | None = None,
) -> None:
    """A UNet2DModel student as a OneStepPipeline folder (our pipeline class, file copied in). An EDM scheduler
    config makes it an EDM-preconditioned student (the pipeline's EDM branch)."""
    from onestep.pipelines import OneStepPipeline

    _trained_size(unet, sample_size)
    edm_rows, edm_text = {}, ""
    if is_edm_config(scheduler_config):
        scheduler_config, edm_rows, edm_text = _edm_contract(scheduler_config, timesteps)

    os.makedirs(output_dir, exist_ok=True)
    pipe = OneStepPipeline(
        unet=unet, scheduler=_scheduler(scheduler_config), timesteps=timesteps, num_classes=num_classes
    )
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "one_step.py", "OneStepPipeline")
        steps = len(timesteps)
        usage = (
            "## Loading\n\n"
            "Where onestep is installed: `from onestep.pipelines import OneStepPipeline; pipe = OneStepPipeline.from_pretrained(folder)`.\n"
            "With diffusers alone: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (this folder ships\n"
            "`one_step.py`, the pipeline class; read it before trusting it).\n\n"
            f"`pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0))` gives {steps}-step samples at\n"
            f"timestep(s) {timesteps}; no guidance at inference (it was distilled in).\n"
        ) + edm_text
        rows = {**card, "sampling steps": steps, "conditioning timesteps": timesteps, **edm_rows}
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card("One-step student", rows, usage))
        _move_into(tmp, output_dir)


def is_edm_config(scheduler_config: dict) -> bool:
    """diffusers' EDM scheduler classes mark an EDM-preconditioned network (as onestep.schedules reads them)."""
    return str(scheduler_config.get("_class_name", "")).startswith("EDM")


def _edm_contract(scheduler_config: dict, timesteps: list[int]) -> tuple[dict, dict, str]:
    """An EDM student's scheduler config, model-card rows and card text. The pipeline rebuilds the sigma grid from
    the config, so num_train_timesteps is written as the length of the grid the student was trained on."""
    from .schedules import schedule_from_scheduler_config

    schedule = schedule_from_scheduler_config(scheduler_config).schedule
    config = {**scheduler_config, "num_train_timesteps": schedule.num_timesteps}
    sigmas = [round(float(schedule.sigmas[t]), 6) for t in timesteps]
    rows = {"preconditioning": f"EDM (Karras et al. 2022), sigma_data {schedule.sigma_data}", "noise levels": sigmas}
    text = (
        f"\nEDM-preconditioned: timestep {timesteps[0]} is sigma {sigmas[0]}, and a sample is x0 = D(sigma z; sigma, "
        "class) = c_skip x + c_out F(c_in x, ln(sigma) / 4) (Karras et al. 2022, Table 1; x = sigma z).\n"
        "diffusers' stock ConsistencyModelPipeline cannot carry it exactly: its scheduler feeds the UNet 250 ln(sigma) "
        "where this network reads ln(sigma) / 4, and its boundary-condition c_skip / c_out use sigma - sigma_min.\n"
    )
    return config, rows, text


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


LORA_FOLDER = "lora"


def export_text_to_image(
    unet,
    teacher_path: str,
    sdxl: bool,
    timesteps: list[int],
    output_dir: str,
    card: dict,
    lora: dict | None = None,
    sample_size: int | None = None,
) -> None:
    """A Stable Diffusion student as the stock StableDiffusion(XL)Pipeline: the teacher's VAE, text
    encoders and tokenizers, the distilled UNet, and a scheduler that reproduces the training timesteps.
    A LoRA student (lora = its adapter config) also gets lora/pytorch_lora_weights.safetensors, which
    `teacher_pipe.load_lora_weights(folder + "/lora")` takes; the folder's own UNet has it fused in,
    made through that same diffusers path."""
    import diffusers

    _trained_size(unet, sample_size)
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    with open(os.path.join(teacher_path, "scheduler", "scheduler_config.json")) as f:
        scheduler = stock_scheduler(json.load(f), timesteps, offset_allowed=sdxl)
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        if lora is not None:
            from .lora import lora_state_dict

            adapter = os.path.join(tmp, LORA_FOLDER)
            cls.save_lora_weights(adapter, unet_lora_layers=lora_state_dict(unet), unet_lora_adapter_metadata=lora)
            pipe = cls.from_pretrained(teacher_path, scheduler=scheduler, **extra)
            pipe.load_lora_weights(adapter)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        else:
            pipe = cls.from_pretrained(teacher_path, unet=unet, scheduler=scheduler, **extra)
        pipe.save_pretrained(tmp)
        steps = len(timesteps)
        usage = (
            "## Loading\n\n"
            f"`pipe = DiffusionPipeline.from_pretrained(folder)` gives a stock `{cls.__name__}`;\n"
            f"`pipe(prompt, num_inference_steps={steps}, guidance_scale=0)` samples at timestep(s) {list(timesteps)}\n"
            "(guidance was distilled in; the saved scheduler config reproduces the training timesteps).\n"
        )
        if lora is not None:
            usage += (
                '\nThe LoRA adapter alone: `teacher_pipe.load_lora_weights(folder + "/lora")`, then the same call '
                'with the scheduler from this folder (`scheduler = LCMScheduler/DDIMScheduler.from_pretrained(folder, subfolder="scheduler")`).\n'
            )
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(
                model_card(
                    "Text-to-image student",
                    {**card, "sampling steps": steps, "conditioning timesteps": timesteps, "pipeline": cls.__name__},
                    usage,
                )
            )
        _move_into(tmp, output_dir)


STUDENT_INFO_FILE = "student.json"


def export_student_unet(unet, output_dir: str, info: dict, sample_size: int | None = None) -> None:
    """One MSD student's stage result: its UNet (unet/) and student.json (written last: the stage is done)."""
    _trained_size(unet, sample_size)
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        unet.save_pretrained(os.path.join(tmp, "unet"))
        _move_into(tmp, output_dir)
    path = os.path.join(output_dir, STUDENT_INFO_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def export_multi_student(
    unets: list,
    router: dict,
    scheduler_config: dict,
    timesteps: list[int],
    output_dir: str,
    card: dict,
    num_classes: int | None = None,
    teacher_path: str | None = None,
    sdxl: bool = False,
) -> None:
    """MSD's K students and their router as one MultiStudentPipeline folder (our pipeline class, file copied in).
    Text students also get the teacher's VAE, tokenizer(s) and text encoder(s), shared by all students. An EDM
    scheduler config makes them EDM-preconditioned students (the pipeline's EDM branch, as export_one_step)."""
    from onestep.pipelines import MultiStudentPipeline

    edm_rows, edm_text = {}, ""
    if is_edm_config(scheduler_config):
        scheduler_config, edm_rows, edm_text = _edm_contract(scheduler_config, timesteps)
    extra = {}
    if teacher_path is not None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        extra = {
            "vae": AutoencoderKL.from_pretrained(teacher_path, subfolder="vae"),
            "tokenizer": CLIPTokenizer.from_pretrained(teacher_path, subfolder="tokenizer"),
            "text_encoder": CLIPTextModel.from_pretrained(teacher_path, subfolder="text_encoder"),
        }
        if sdxl:
            extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(teacher_path, subfolder="tokenizer_2")
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                teacher_path, subfolder="text_encoder_2"
            )
    pipe = MultiStudentPipeline(
        scheduler=_scheduler(scheduler_config),
        **{f"unet_{k}": unet for k, unet in enumerate(unets)},
        **extra,
        router=router,
        timesteps=timesteps,
        num_classes=num_classes,
    )
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "msd.py", "MultiStudentPipeline")
        call = "prompt=['a photo of a cat', 'a red car']" if teacher_path else "class_labels=[3, 7]"
        usage = (
            "## Loading\n\n"
            "Where onestep is installed: `from onestep.pipelines import MultiStudentPipeline; "
            "pipe = MultiStudentPipeline.from_pretrained(folder)`.\n"
            "With diffusers alone: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (this folder ships\n"
            "`msd.py`, the pipeline class; read it before trusting it).\n\n"
            f"`pipe({call}, generator=torch.Generator().manual_seed(0))` routes every item to its student\n"
            f"(router in model_index.json) and runs it once at timestep {timesteps[0]}: one network evaluation per image.\n"
            "Pass one generator per item (a list) to make each item's image independent of the rest of the batch.\n"
        ) + edm_text
        rows = {**card, "students": len(unets), "router": router["kind"], "conditioning timestep": timesteps[0]}
        rows.update(edm_rows)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card("Multi-student one-step generator (MSD)", rows, usage))
        _move_into(tmp, output_dir)


def sr_schedule_description(schedule) -> dict:
    """How SuperResolutionPipeline's config describes a teacher's schedule (pipelines/super_resolution.py)."""
    if schedule.kind == "resshift":
        return {
            "kind": "resshift",
            "etas": schedule.etas.tolist(),
            "kappa": schedule.kappa,
            "scale_input": schedule.scale_input,
        }
    if schedule.kind == "conditional_flow":
        return {"kind": "conditional_flow", "sigma_p": schedule.sigma_p, "num_timesteps": schedule.num_timesteps}
    if schedule.kind == "vp":
        return {"kind": "vp", "alphas_cumprod": schedule.alphas_cumprod.tolist()}
    raise UserError(
        f"A super-resolution pipeline takes ResShift, conditional-flow or VP schedules; this teacher's is {schedule.kind}."
    )


def export_super_resolution(
    unet, output_dir: str, card: dict, pipeline_config: dict, teacher_info: dict | None = None, usage: str = ""
) -> None:
    """A SuperResolutionPipeline folder (our pipeline class, file copied in). With `teacher_info` (what
    onestep.json holds: the schedule load_teacher builds), the folder is also a teacher folder: scheduler/ (a
    placeholder diffusers config) and onestep.json are written beside the pipeline."""
    from onestep.pipelines import SuperResolutionPipeline

    os.makedirs(output_dir, exist_ok=True)
    pipe = SuperResolutionPipeline(unet=unet, **pipeline_config)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "super_resolution.py", "SuperResolutionPipeline")
        if teacher_info is not None:
            steps = len(pipe._tables()[0])
            _scheduler({"_class_name": "DDPMScheduler", "num_train_timesteps": steps}).save_pretrained(
                os.path.join(tmp, "scheduler")
            )
            with open(os.path.join(tmp, "onestep.json"), "w") as f:
                json.dump(teacher_info, f, indent=2)
        text = (
            "## Loading\n\n"
            "Where onestep is installed: `from onestep.pipelines import SuperResolutionPipeline; "
            "pipe = SuperResolutionPipeline.from_pretrained(folder)`.\n"
            "With diffusers alone: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (this folder ships\n"
            "`super_resolution.py`, the pipeline class; read it before trusting it).\n\n"
            f"{usage}\n"
        )
        if teacher_info is not None:
            text += "\nThe schedule is in onestep.json (scheduler/ is a placeholder diffusers has a class for).\n"
        with open(os.path.join(tmp, "README.md"), "w") as f:
            rows = dict(card)
            f.write(model_card(rows.pop("title", "Super-resolution model"), rows, text))
        _move_into(tmp, output_dir)


def export_latent_super_resolution(
    unet, output_dir: str, card: dict, pipeline_config: dict, export_info: dict, usage: str = ""
) -> None:
    """A LatentSuperResolutionPipeline folder (our pipeline class, file copied in): the student UNet and the teacher's
    autoencoder (LDM-SR: vqvae/; the x4 upscaler: vae/, text_encoder/, tokenizer/, low_res_scheduler/)."""
    from onestep.pipelines import LatentSuperResolutionPipeline

    from .latent_sr import pipeline_components

    latent = export_info["latent_size"]
    _trained_size(unet, latent)
    config = {k: v for k, v in pipeline_config.items() if k != "mode"}
    config.update(tile_size=latent, noise_level=export_info.get("noise_level") or 0)
    if export_info.get("max_noise_level") is not None:  # the upscaler's (model_index.json), for the noise_level check
        config["max_noise_level"] = export_info["max_noise_level"]
    parts = pipeline_components(export_info["teacher_path"], export_info["latent_sr"], export_info.get("variant"))
    pipe = LatentSuperResolutionPipeline(unet=unet, **parts, **config)
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "latent_super_resolution.py", "LatentSuperResolutionPipeline")
        text = (
            "## Loading\n\n"
            "Where onestep is installed: `from onestep.pipelines import LatentSuperResolutionPipeline; "
            "pipe = LatentSuperResolutionPipeline.from_pretrained(folder)`.\n"
            "With diffusers alone: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (this folder "
            "ships\n`latent_super_resolution.py`, the pipeline class; read it before trusting it).\n\n"
            f"{usage}\n"
        )
        if "low_res_scheduler" in parts:
            text += "\n`prompt=` (default empty) and `noise_level=` (default the trained one) as in the teacher's pipeline.\n"
        rows = {**card, "latent tile (training size)": latent}
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(rows.pop("title", "Latent super-resolution model"), rows, text))
        _move_into(tmp, output_dir)
