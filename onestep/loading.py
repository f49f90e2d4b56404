"""Loading teachers from a diffusers folder or hub id into a Denoiser, with one-sentence errors."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .errors import UserError
from .schedules import schedule_from_scheduler_config

SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")
BUNDLED_TEACHERS = {
    "digits": os.path.join(os.path.dirname(__file__), "assets", "digits-teacher"),
    # Pixel x4 super-resolution teachers (train/sr_teacher.py, train/oftsr.py --stage teacher):
    "sr-resshift": os.path.join(os.path.dirname(__file__), "assets", "sr-resshift-teacher"),
    "sr-flow": os.path.join(os.path.dirname(__file__), "assets", "sr-flow-teacher"),
}


@dataclass
class Teacher:
    denoiser: Denoiser
    unet_class: str
    unet_config: dict
    scheduler_config: dict
    source: str


def read_weights(path: str, what_to_do: str) -> dict:
    """A safetensors file's tensors, or one sentence naming the file and saying what to do (a truncated or
    damaged file otherwise ends in safetensors' own error, which names neither)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; {what_to_do}.")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is damaged or incomplete ({str(err).splitlines()[0][:80]}); {what_to_do}.") from None


def open_weights(path: str, what_to_do: str):
    """safetensors' lazy reader of one file, with read_weights' sentence on a damaged one."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is damaged or incomplete ({str(err).splitlines()[0][:80]}); {what_to_do}.") from None


def load_pretrained(cls, folder: str, what_to_do: str, **kwargs):
    """`cls.from_pretrained(folder, **kwargs)` for a model a run wrote (a snapshot, a student, a TSM network),
    with one sentence naming the folder when its weights are missing or damaged."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(
            f"Cannot load {cls.__name__} from {folder} ({str(err).splitlines()[0][:100]}); {what_to_do}."
        ) from None


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"Cannot read {path} ({err.__class__.__name__}); is this a diffusers model folder?") from None


def resolve_teacher_path(name_or_path: str) -> str:
    return BUNDLED_TEACHERS.get(name_or_path, name_or_path)


# Teacher folders that presets name and a converter (onestep/convert/) writes: how to make one that is missing.
CONVERTED_TEACHERS = {
    os.path.normpath("./teachers/edm-imagenet64"): "download NVlabs EDM's edm-imagenet-64x64-cond-adm.pkl and run "
    "`python -m onestep.convert.edm_adm edm-imagenet-64x64-cond-adm.pkl ./teachers/edm-imagenet64 --trust-pickle`",
}


def check_converted_teacher(name_or_path: str) -> None:
    """A preset's converted teacher folder that is not there yet: say how to make it."""
    how = CONVERTED_TEACHERS.get(os.path.normpath(name_or_path))
    if how is not None and not os.path.isdir(name_or_path):
        raise UserError(
            f"Teacher folder {name_or_path} does not exist: {how} (README, DMD2 on ImageNet 64x64), "
            "or pass --pretrained_model_name_or_path."
        )


def teacher_configs(name_or_path: str, revision: str | None = None) -> tuple[str, dict, dict]:
    """(local folder or hub id, UNet config, scheduler config) of a teacher, read without loading any weights."""
    check_converted_teacher(name_or_path)
    path = resolve_teacher_path(name_or_path)
    if os.path.isdir(path):
        unet_cfg_path = os.path.join(path, "unet", "config.json")
        sched_cfg_path = os.path.join(path, "scheduler", "scheduler_config.json")
        if not os.path.exists(unet_cfg_path):
            raise UserError(f"{path} is not a diffusers pipeline folder: it has no unet/config.json.")
        if not os.path.exists(sched_cfg_path):
            raise UserError(f"{path} has no scheduler/scheduler_config.json; the teacher's noise schedule is needed.")
        unet_cfg, sched_cfg = read_json(unet_cfg_path), read_json(sched_cfg_path)
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"Teacher {name_or_path} is neither an existing diffusers folder nor a hub id (owner/name).")
    else:
        unet_cfg, sched_cfg = _hub_configs(path, revision)
    cls_name = unet_cfg.get("_class_name")
    if cls_name not in SUPPORTED_UNETS:
        raise UserError(
            f"Teacher UNet type {cls_name!r} is not supported; expected one of {', '.join(SUPPORTED_UNETS)}."
        )
    return path, unet_cfg, sched_cfg


def load_teacher(name_or_path: str, revision: str | None = None, variant: str | None = None) -> Teacher:
    """A diffusers pipeline folder (unet/ + scheduler/) or hub id -> frozen teacher Denoiser."""
    path, unet_cfg, sched_cfg = teacher_configs(name_or_path, revision)
    cls_name = unet_cfg["_class_name"]
    import diffusers

    cls = getattr(diffusers, cls_name)
    try:
        unet = cls.from_pretrained(
            path, subfolder="unet", revision=revision, variant=variant, torch_dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load the teacher UNet from {path}: {str(err).splitlines()[0]}") from None
    try:
        sr_schedule = read_class_info(name_or_path, dict(unet.config), revision).get(SR_SCHEDULE_KEY)
        spec = sr_schedule_spec(sr_schedule) if sr_schedule else schedule_from_scheduler_config(sched_cfg)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from None
    denoiser = Denoiser(unet, spec.schedule, spec.prediction_type)
    denoiser.eval().requires_grad_(False)
    return Teacher(denoiser, cls_name, dict(unet.config), sched_cfg, name_or_path)


CLASS_INFO_FILE = "onestep.json"


def read_class_info(name_or_path: str, unet_config: dict, revision: str | None = None) -> dict:
    """Class layout of a class-conditional teacher: {"num_classes": C, "null_class": index or None}.

    Teachers made by train/teacher.py record it in onestep.json; other folders may not have it."""
    folder = resolve_teacher_path(name_or_path)
    path = os.path.join(folder, CLASS_INFO_FILE)
    if os.path.exists(path):
        return read_json(path)
    if os.path.isdir(folder) or folder.count("/") != 1:
        return {}
    return dict(_hub_class_info(folder, revision))


@functools.cache
def _hub_class_info(repo_id: str, revision: str | None) -> tuple:
    """A hub teacher's onestep.json (an SR teacher's schedule lives there), fetched once per run."""
    try:
        from huggingface_hub import hf_hub_download

        return tuple(read_json(hf_hub_download(repo_id, CLASS_INFO_FILE, revision=revision)).items())
    except Exception:  # no such file (most hub teachers), or offline: nothing recorded
        return ()


def _hub_configs(repo_id: str, revision: str | None):
    from huggingface_hub import hf_hub_download

    try:
        unet_cfg = read_json(hf_hub_download(repo_id, "unet/config.json", revision=revision))
        sched_cfg = read_json(hf_hub_download(repo_id, "scheduler/scheduler_config.json", revision=revision))
    except Exception as err:  # network, auth, missing repo: one sentence whatever the cause
        raise UserError(
            f"Cannot fetch teacher {repo_id} from the hub ({err.__class__.__name__}); check the id, your network, or pass a local folder."
        ) from None
    return unet_cfg, sched_cfg


# Super-resolution teachers whose schedule diffusers has no scheduler class for (ResShift, OFTSR's conditional
# flow) describe it in onestep.json; their scheduler/ folder is then a placeholder that load_teacher ignores.
SR_SCHEDULE_KEY = "sr_schedule"


def sr_schedule_spec(description: dict):
    """{"kind": "resshift" | "conditional_flow", "prediction_type": ..., <the schedule's arguments>} -> ScheduleSpec."""
    from .schedules import ConditionalFlowSchedule, ResShiftSchedule, ScheduleSpec

    kinds = {"resshift": ResShiftSchedule, "conditional_flow": ConditionalFlowSchedule}
    args = {k: v for k, v in description.items() if k not in ("kind", "prediction_type")}
    if description.get("kind") not in kinds:
        raise ValueError(f"Unknown {SR_SCHEDULE_KEY} kind {description.get('kind')!r} in onestep.json.")
    return ScheduleSpec(kinds[description["kind"]](**args), description["prediction_type"])
