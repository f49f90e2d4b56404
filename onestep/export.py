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


def export_one_step(unet, scheduler_config: dict, timesteps: list[int], output_dir: str, card: dict,
                    num_classes: int | None = None) -> None:
    """A UNet2DModel student as a OneStepPipeline folder (our pipeline class, file copied in)."""
    from onestep.pipelines import OneStepPipeline

    os.makedirs(output_dir, exist_ok=True)
    pipe = OneStepPipeline(unet=unet, scheduler=_scheduler(scheduler_config), timesteps=timesteps, num_classes=num_classes)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        pipe.save_pretrained(tmp)
        shutil.copy(_pipelines_source("one_step.py"), os.path.join(tmp, "one_step.py"))
        index_path = os.path.join(tmp, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        # [file, class]: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) imports it.
        index["_class_name"] = ["one_step", "OneStepPipeline"]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
        steps = len(timesteps)
        usage = (
            "## Loading\n\n"
            "Where onestep is installed: `from onestep.pipelines import OneStepPipeline; pipe = OneStepPipeline.from_pretrained(folder)`.\n"
            "With diffusers alone: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (this folder ships\n"
            "`one_step.py`, the pipeline class; read it before trusting it).\n\n"
            f"`pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0))` gives {steps}-step samples at\n"
            f"timestep(s) {timesteps}; no guidance at inference (it was distilled in).\n"
        )
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card("One-step student", {**card, "sampling steps": steps, "conditioning timesteps": timesteps}, usage))
        _move_into(tmp, output_dir)
