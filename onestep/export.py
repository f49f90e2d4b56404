"""Writing students (and small teachers) as diffusers folders, with a model card.

Every folder goes through one writer, `write_folder`: the pipeline is saved into a temporary folder beside the
target, the model card (the Hub's YAML header, a table of what was trained, how to load it) is written once
there, and everything is then moved in, so a failed export never leaves a half-written pipeline over a good
one. Only what sampling needs is written (no critic, head, EMA shadow or teacher).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UserError

LORA_FOLDER = "lora"
STUDENT_INFO_FILE = "student.json"
EXPORT_MANIFEST = ".export.json"  # the names the last export wrote into its folder: what --push_to_hub uploads

# The Hub's pipeline_tag of what a folder does.
TEXT_TO_IMAGE, IMAGE_TO_IMAGE, UNCONDITIONAL = "text-to-image", "image-to-image", "unconditional-image-generation"


# -- the model card ------------------------------------------------------------------------------------------


@dataclass
class Card:
    """A model card: the Hub's YAML header (library, task, base model, tags), a title, a table of what was
    trained and measured, and the "how to load" text."""

    title: str
    rows: dict
    loading: str = ""
    pipeline_tag: str = UNCONDITIONAL
    method: str | None = None  # a tag: dmd2, disback, boot, msd, tad-sr, oftsr
    base_model: str | None = None  # the teacher's hub id, when it has one
    steps: int | None = None  # sampling steps: 1 -> "one-step", more -> "few-step"
    extra_tags: list[str] = field(default_factory=list)

    def front_matter(self) -> str:
        from huggingface_hub import ModelCardData

        tags = ["onestep", *([self.method] if self.method else [])]
        if self.steps is not None:
            tags.append("one-step" if self.steps == 1 else "few-step")
        data = ModelCardData(
            library_name="diffusers",
            pipeline_tag=self.pipeline_tag,
            base_model=self.base_model,
            tags=tags + self.extra_tags,
        )
        return f"---\n{data.to_yaml()}\n---\n"

    def text(self) -> str:
        table = "\n".join(f"| {k} | {v} |" for k, v in self.rows.items())
        body = f"# {self.title}\n\n| field | value |\n|---|---|\n{table}\n\n{self.loading}".rstrip() + "\n"
        return self.front_matter() + "\n" + body


def metrics_line(values: dict | None, measure: str = "onestep-eval fid") -> str:
    """The card's "metrics" row: the last in-training evaluation and how it was measured."""
    if not values:
        return f"not measured in training; measure with {measure}"
    return (
        ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        + " (in-training, EMA weights, fixed noise; see logs/eval.csv)"
    )


def hub_id(source: str | None) -> str | None:
    """The teacher's hub id (owner/name), or None for a local folder, a bundled teacher or a network in code."""
    if not source or os.path.exists(source) or source.startswith((".", "/", "~", "<")) or source.count("/") != 1:
        return None
    return source


def loading_text(pipeline_class: str, call: str, shipped_file: str | None = None, import_path: str = "") -> str:
    """The "## Loading" section: a stock diffusers class loads as it is; our own classes load through onestep
    where it is installed, or through the file copied into the folder with trust_remote_code."""
    if shipped_file is None:
        head = (
            f"`pipe = DiffusionPipeline.from_pretrained(folder)` gives a stock `{pipeline_class}` (no remote code).\n"
        )
    else:
        module = import_path or "onestep.pipelines"
        head = (
            f"Where onestep is installed: `from {module} import {pipeline_class}; "
            f"pipe = {pipeline_class}.from_pretrained(folder)`.\n"
            "With diffusers alone: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (this folder "
            f"ships\n`{shipped_file}`, the pipeline class; read it before trusting it).\n"
        )
    return f"## Loading\n\n{head}\n{call}\n"


# -- the one writer ------------------------------------------------------------------------------------------


def write_folder(output_dir: str, save: Callable[[str], None], card: Card | None) -> None:
    """`save(tmp)` writes the pipeline into a temporary folder inside output_dir; the card goes beside it; then
    everything moves in, replacing what was there under the same names."""
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        save(tmp)
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card.text())
        with open(os.path.join(tmp, EXPORT_MANIFEST), "w") as f:
            json.dump(sorted(os.listdir(tmp)), f)
        for name in os.listdir(tmp):
            dst = os.path.join(output_dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            elif os.path.exists(dst):
                os.remove(dst)
            os.replace(os.path.join(tmp, name), dst)


def exported_files(folder: str) -> list[str]:
    """The paths (relative to `folder`) of what its last export wrote: the student, without the run's checkpoints,
    logs, sample grids or stage folders beside it."""
    with open(os.path.join(folder, EXPORT_MANIFEST)) as f:
        names = [n for n in json.load(f) if n != EXPORT_MANIFEST]
    out = []
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            out += [os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(path) for f in files]
        elif os.path.isfile(path):
            out.append(name)
    return sorted(out)


def check_hub_upload(hub_model_id: str | None, output_dir: str) -> str:
    """The repository --push_to_hub would upload to, refused in one sentence before training when the Hub cannot
    be reached (offline) or no token is there to write with."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError(
            "--push_to_hub needs the Hugging Face Hub, but the Hub is switched off here (HF_HUB_OFFLINE=1); unset it "
            "on a machine with internet, or upload the exported folder later with `hf upload`."
        )
    if get_token() is None:
        raise UserError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN first.")
    return hub_model_id or os.path.basename(os.path.abspath(output_dir))


def push_to_hub(folder: str, repo_id: str) -> str:
    """Upload what the export wrote (exported_files) to a model repository, created if needed; its URL."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, exist_ok=True, repo_type="model")
    upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        allow_patterns=exported_files(folder),
        commit_message="onestep export",
    )
    return f"https://huggingface.co/{repo.repo_id}"


def pipeline_source(name: str) -> str:
    """Path of a pipeline file: beside the package in a checkout, or inside it when installed."""
    import onestep.pipelines as pkg

    return os.path.join(os.path.dirname(pkg.__file__), name)


def ship_pipeline_file(folder: str, filename: str, pipeline_class: str | None, scheduler_class: str | None = None):
    """Copy pipelines/<filename> into an export folder (beside model_index.json for a pipeline class, into
    scheduler/ for a scheduler class) and name the classes in model_index.json as [module, class], so that
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) imports them."""
    source, module = pipeline_source(filename), filename.removesuffix(".py")
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


def scheduler_from_config(config: dict):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), None)
    if cls is None:
        raise UserError(f"Unknown scheduler class {config.get('_class_name')!r} in the teacher's scheduler config.")
    return cls.from_config(config)


def trained_size(unet, sample_size: int | None) -> None:
    """The exported UNet's sample_size is what the student was trained at (pixels, or latents), which the
    pipelines sample at by default: a student trained at --resolution 64 from a 16x16 teacher samples 64x64."""
    if sample_size is not None and unet.config.sample_size != sample_size:
        unet.register_to_config(sample_size=sample_size)


# -- teachers ------------------------------------------------------------------------------------------------


def save_teacher(unet, scheduler_config: dict, output_dir: str, card: dict, class_info: dict | None = None) -> None:
    """A teacher folder: unet/ + scheduler/ (+ onestep.json with the class layout), as load_teacher reads it."""

    def save(tmp):
        unet.save_pretrained(os.path.join(tmp, "unet"))
        scheduler_from_config(scheduler_config).save_pretrained(os.path.join(tmp, "scheduler"))
        if class_info:
            with open(os.path.join(tmp, "onestep.json"), "w") as f:
                json.dump(class_info, f, indent=2)

    write_folder(output_dir, save, Card("Diffusion teacher", card, extra_tags=["teacher"]))


# -- pixel students ------------------------------------------------------------------------------------------


def export_one_step(
    unet,
    scheduler_config: dict,
    timesteps: list[int],
    output_dir: str,
    card: dict,
    num_classes: int | None = None,
    sample_size: int | None = None,
    card_info: dict | None = None,
) -> None:
    """A UNet2DModel student as a OneStepPipeline folder (our pipeline class, file copied in). An EDM scheduler
    config makes it an EDM-preconditioned student (the pipeline's EDM branch). `card_info`: the Card's header
    fields (method, base_model)."""
    from onestep.pipelines import OneStepPipeline

    trained_size(unet, sample_size)
    edm_rows, edm_text = {}, ""
    if is_edm_config(scheduler_config):
        scheduler_config, edm_rows, edm_text = _edm_contract(scheduler_config, timesteps)
    pipe = OneStepPipeline(
        unet=unet, scheduler=scheduler_from_config(scheduler_config), timesteps=timesteps, num_classes=num_classes
    )

    def save(tmp):
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "one_step.py", "OneStepPipeline")

    steps = len(timesteps)
    call = (
        f"`pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0))` gives {steps}-step samples at\n"
        f"timestep(s) {timesteps}; no guidance at inference (it was distilled in).\n"
    )
    rows = {**card, "sampling steps": steps, "conditioning timesteps": timesteps, **edm_rows}
    loading = loading_text("OneStepPipeline", call, "one_step.py") + edm_text
    write_folder(output_dir, save, Card("One-step student", rows, loading, steps=steps, **(card_info or {})))


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


def export_boot_pixel(unet, scheduler, output_dir: str, card: Card, num_classes: int | None, sample_size: int):
    """A BOOT UNet2DModel student as a BootPipeline folder (pipelines/boot.py copied in, its scheduler too)."""
    from onestep.pipelines.boot import BootPipeline

    trained_size(unet, sample_size)

    def save(tmp):
        BootPipeline(unet=unet, scheduler=scheduler, num_classes=num_classes).save_pretrained(tmp)
        ship_pipeline_file(tmp, "boot.py", "BootPipeline", "BootScheduler")

    call = (
        "`pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0))`"
        if num_classes
        else "`pipe(batch_size=2)`"
    )
    card.loading = loading_text("BootPipeline", call + BOOT_SAMPLING, "boot.py", "onestep.pipelines.boot")
    card.rows = {**card.rows, "pipeline": "BootPipeline"}
    write_folder(output_dir, save, card)


BOOT_SAMPLING = (
    " samples in one network evaluation: the UNet is told `embed_timestep` (the clean end) and its\n"
    "output is converted with the alpha and sigma of `param_timestep` (both in scheduler/scheduler_config.json).\n"
    "BOOT has no multi-step sampler and no guidance at inference (guidance was distilled in): with the stock\n"
    "Stable Diffusion pipelines **pass `guidance_scale=0`**, since their default (7.5, SDXL 5) would apply CFG\n"
    "to the student and give other images at twice the cost.\n"
)


# -- text-to-image students ----------------------------------------------------------------------------------


def export_student_unet(unet, output_dir: str, info: dict, sample_size: int | None = None) -> None:
    """One MSD student's stage result: its UNet (unet/) and student.json (written last: the stage is done)."""
    trained_size(unet, sample_size)
    write_folder(output_dir, lambda tmp: unet.save_pretrained(os.path.join(tmp, "unet")), None)
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
    card: Card,
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
        scheduler=scheduler_from_config(scheduler_config),
        **{f"unet_{k}": unet for k, unet in enumerate(unets)},
        **extra,
        router=router,
        timesteps=timesteps,
        num_classes=num_classes,
    )

    def save(tmp):
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "msd.py", "MultiStudentPipeline")

    call = "prompt=['a photo of a cat', 'a red car']" if teacher_path else "class_labels=[3, 7]"
    call = (
        f"`pipe({call}, generator=torch.Generator().manual_seed(0))` routes every item to its student\n"
        f"(router in model_index.json) and runs it once at timestep {timesteps[0]}: one network evaluation per image.\n"
        "Pass one generator per item (a list) to make each item's image independent of the rest of the batch.\n"
    )
    card.loading = loading_text("MultiStudentPipeline", call, "msd.py") + edm_text
    card.rows = {**card.rows, "students": len(unets), "router": router["kind"], "conditioning timestep": timesteps[0]}
    card.rows.update(edm_rows)
    card.steps = 1
    if teacher_path is not None:
        card.pipeline_tag = TEXT_TO_IMAGE
    write_folder(output_dir, save, card)


# -- super-resolution ----------------------------------------------------------------------------------------


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
    unet, output_dir: str, card: Card, pipeline_config: dict, call: str, teacher_info: dict | None = None
) -> None:
    """A SuperResolutionPipeline folder (our pipeline class, file copied in). With `teacher_info` (what
    onestep.json holds: the schedule load_teacher builds), the folder is also a teacher folder: scheduler/ (a
    placeholder diffusers config) and onestep.json are written beside the pipeline."""
    from onestep.pipelines import SuperResolutionPipeline

    pipe = SuperResolutionPipeline(unet=unet, **pipeline_config)

    def save(tmp):
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "super_resolution.py", "SuperResolutionPipeline")
        if teacher_info is not None:
            steps = len(pipe._tables()[0])
            scheduler_from_config({"_class_name": "DDPMScheduler", "num_train_timesteps": steps}).save_pretrained(
                os.path.join(tmp, "scheduler")
            )
            with open(os.path.join(tmp, "onestep.json"), "w") as f:
                json.dump(teacher_info, f, indent=2)

    card.loading = loading_text("SuperResolutionPipeline", call, "super_resolution.py")
    if teacher_info is not None:
        card.loading += "\nThe schedule is in onestep.json (scheduler/ is a placeholder diffusers has a class for).\n"
    card.pipeline_tag = IMAGE_TO_IMAGE
    write_folder(output_dir, save, card)


def export_latent_super_resolution(
    unet, output_dir: str, card: Card, pipeline_config: dict, target, call: str
) -> None:
    """A LatentSuperResolutionPipeline folder (our pipeline class, file copied in): the student UNet and the teacher's
    autoencoder (LDM-SR: vqvae/; the x4 upscaler: vae/, text_encoder/, tokenizer/, low_res_scheduler/), from the
    teacher context's ExportTarget `target`."""
    from onestep.pipelines import LatentSuperResolutionPipeline

    from .latent_sr import pipeline_components

    latent = target.latent_size
    trained_size(unet, latent)
    config = {k: v for k, v in pipeline_config.items() if k != "mode"}
    config.update(tile_size=latent, noise_level=target.noise_level or 0)
    if target.max_noise_level is not None:  # the upscaler's (model_index.json), for the noise_level check
        config["max_noise_level"] = target.max_noise_level
    parts = pipeline_components(target.teacher_path, target.latent_sr, target.variant)
    pipe = LatentSuperResolutionPipeline(unet=unet, **parts, **config)

    def save(tmp):
        pipe.save_pretrained(tmp)
        ship_pipeline_file(tmp, "latent_super_resolution.py", "LatentSuperResolutionPipeline")

    card.loading = loading_text("LatentSuperResolutionPipeline", call, "latent_super_resolution.py")
    if "low_res_scheduler" in parts:
        card.loading += (
            "\n`prompt=` (default empty) and `noise_level=` (default the trained one) as in the teacher's pipeline.\n"
        )
    card.rows = {**card.rows, "latent tile (training size)": latent}
    card.pipeline_tag = IMAGE_TO_IMAGE
    write_folder(output_dir, save, card)
