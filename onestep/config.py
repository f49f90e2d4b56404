"""The typed configuration of a training run, its presets, and the resolved copy every run writes.

A run's configuration is one `RunConfig`: a group per concern (teacher, data, memory, in-training
evaluation, the trainer's loop) plus the method's own config dataclass. A preset is a named
`RunConfig`; variants are built from a base with `dataclasses.replace`. Command-line flags are the
field names: every flag left unset keeps the preset's value (or that of `--config FILE`, a
`training_config.json` written by an earlier run), so each default lives in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import UserError
from .flags import (
    DATA,
    EVALUATION,
    LOOP,
    MEMORY,
    TEACHER,
    finite_float,
    non_negative_int,
    option,
    positive_float,
    positive_int,
)

CONFIG_FILE = "training_config.json"


@dataclass
class TeacherConfig:
    flag_group = TEACHER

    pretrained_model_name_or_path: str = option(
        "digits", "A diffusers folder (unet/ + scheduler/), a hub id, or 'digits' (bundled)."
    )
    revision: str | None = option(None, "Hub teachers: the git revision (branch, tag or commit) to load.")
    variant: str | None = option(
        None, "Teacher weight variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)."
    )
    resolution: int | None = option(
        None, "Image size (None: the teacher's sample_size, times the VAE factor).", parse=positive_int
    )
    num_classes: int | None = option(None, "Real classes of a class-conditional teacher.", parse=positive_int)
    null_class: int | None = option(
        None, "Class index the teacher was trained with as 'no class' (enables CFG).", parse=non_negative_int
    )
    prompt_file: str | None = option(
        None, "Text-to-image teachers: prompts for the student (.txt, one per line, or .jsonl)."
    )
    upscale_factor: int | None = option(
        None, "Super-resolution teachers: high-resolution size / low-resolution size.", parse=positive_int
    )
    guidance_embedding: float | None = option(
        None,
        "Flux teachers: the guidance scale the guidance-distilled transformer reads as an input (None: "
        "FluxPipeline's 3.5); the student is trained, and is to be called, with it.",
        parse=positive_float,
    )


@dataclass
class DataConfig:
    flag_group = DATA

    train_data_dir: str | None = option(
        None,
        "An image folder (sub-folders = classes for class-conditional teachers; metadata.jsonl captions for "
        "text-to-image). The digits teacher defaults to scikit-learn's digits.",
    )
    dataset_name: str | None = option(
        None,
        "Text-to-image: a Hugging Face dataset instead, a hub id or a local dataset folder "
        "(needs pip install 'onestep[datasets]').",
    )
    dataset_config_name: str | None = option(None, "--dataset_name: the dataset's configuration, if it has several.")
    dataset_split: str = option("train", "--dataset_name: the split to read.")
    image_column: str = option("image", "--dataset_name: the column holding images.")
    caption_column: str = option("text", "--dataset_name: the column holding captions.")
    dataloader_num_workers: int = option(
        2, "Worker processes reading --train_data_dir images.", parse=non_negative_int
    )
    cache_latents: bool = option(False, "Text-to-image: encode every real image with the VAE once, up front.")
    latent_cache_dir: str | None = option(
        None, "Where --cache_latents writes its shards (None: <output_dir>/latent_cache)."
    )
    hr_dir: str | None = option(
        None,
        "Super-resolution: high-resolution images paired with --lr_dir (else --train_data_dir, LR by degradation).",
    )
    lr_dir: str | None = option(None, "Super-resolution: the low-resolution inputs of --hr_dir, paired by file name.")
    augmentation: str = option(
        "flips",
        "Super-resolution crops: flips (horizontal, rare vertical), or full (all 8 flips and rotations, and each "
        "image also at 0.75 and 0.5 of its size).",
        choices=("flips", "full"),
    )


@dataclass
class MemoryConfig:
    flag_group = MEMORY

    gradient_checkpointing: bool = option(False, "Trade compute for memory in the trained networks.")
    enable_xformers_memory_efficient_attention: bool = option(
        False, "xformers attention (CUDA and pip install 'onestep[xformers]'; PyTorch SDPA otherwise)."
    )
    lora_rank: int = option(0, "LoRA on the student only (0 = full fine-tuning).", parse=non_negative_int)
    lora_alpha: float = option(
        8.0, "LoRA scale numerator (the update is scaled by alpha / rank).", parse=positive_float
    )
    lora_targets: str | None = option(None, "Comma-separated module names for LoRA (None: the method's list).")


@dataclass
class EvalConfig:
    """In-training FID (how often: TrainerConfig.eval_steps)."""

    flag_group = EVALUATION

    eval_samples: int = option(500, "Samples per in-training evaluation.", parse=positive_int)
    eval_features: str | None = option(
        None,
        "Feature extractor (None: digits for the digits teacher, else inception).",
        choices=("digits", "inception", "clip"),
    )
    eval_reference: str | None = option(None, "Reference: an image folder, a statistics .npz, or 'digits'.")
    inception_weights: str | None = option(None, "Local copy of clean-fid's Inception weights (offline machines).")


@dataclass
class TrainerConfig:
    """The training loop's settings (onestep/trainer.py). Fields made with `option` are flags."""

    flag_group = LOOP

    output_dir: str = option("outputs/run", "Where the exported pipeline, checkpoints, sample grids and logs go.")
    max_train_steps: int = option(1000, "Optimisation iterations.", parse=positive_int)
    gradient_accumulation_steps: int = option(1, "Micro-batches summed into each update.", parse=positive_int)
    mixed_precision: str = option("no", "Autocast dtype (bf16 recommended on CUDA).", choices=("no", "fp16", "bf16"))
    max_grad_norm: float | None = option(10.0, "Clip each model's gradient norm to this value.", parse=positive_float)
    lr_scheduler: str = option(
        "constant", "Learning-rate decay after the warm-up.", choices=("constant", "linear", "cosine")
    )
    lr_warmup_steps: int = option(0, "Iterations of linear learning-rate warm-up.", parse=non_negative_int)
    ema_decay: float | None = option(
        None, "Weight EMA of the student, exported (0 = off).", parse=lambda v: _ema_decay(v)
    )
    ema_warmup: bool = option(False, "EMA decay min(--ema_decay, (1 + n) / (10 + n)) at update n.")
    checkpointing_steps: int | None = option(
        None, "Iterations between resumable checkpoints (None: only at the end).", parse=positive_int
    )
    checkpoints_total_limit: int | None = option(None, "Keep only this many newest checkpoints.", parse=positive_int)
    resume_from_checkpoint: str | None = option(
        None,
        "'latest' (a run of several stages skips the finished ones and continues the unfinished one) or a "
        "checkpoint-<step> folder.",
    )
    init_from_checkpoint: str | None = option(
        None, "Start from an earlier run's weights only (a checkpoint-<step> folder)."
    )
    push_to_hub: bool = option(
        False, "Upload the exported student (not the checkpoints or logs) to the Hugging Face Hub when training ends."
    )
    hub_model_id: str | None = option(
        None, "--push_to_hub: the repository, owner/name (None: the --output_dir folder's name under your account)."
    )
    report_to: str = option(
        "none",
        "Experiment tracker (logs/losses.csv and loss_curves.png are written in any case).",
        choices=("none", "tensorboard", "wandb", "all"),
    )
    tracker_project_name: str = "onestep"
    validation_steps: int | None = option(
        None, "Iterations between PNG sample grids (None: start and end only).", parse=positive_int
    )
    num_validation_images: int = 16
    eval_steps: int | None = option(
        None,
        "Iterations between in-training FID evaluations (EMA weights, fixed noise; 0 = off); logs/eval.csv.",
        parse=non_negative_int,
        group=EVALUATION,
    )
    log_every: int = option(10, "Iterations between rows of logs/losses.csv and the tracker.", parse=positive_int)
    seed: int = option(0, "Every random draw of the run follows from it (exact resume).")
    nan_patience: int = 20  # consecutive non-finite losses before the run stops
    export: bool = True
    export_dir: str | None = None  # where the export goes (None: output_dir; a run of several stages: its folder)
    folder_flag: str = "--output_dir"  # the option that named output_dir (DisBack's path stage: --path_dir)
    distributed_timeout_s: int = 7200  # collectives' timeout: rank 0 may download or encode data while others wait
    final_checkpoint: bool = True  # benchmarks turn it off (an SD-size state is tens of GB)
    run_config: dict = field(default_factory=dict)  # recorded in the model card and trackers
    resolved_config: dict = field(default_factory=dict)  # the whole run's configuration: training_config.json

    def __post_init__(self):
        if not self.ema_decay:  # presets and flags write 0 for off
            self.ema_decay = None


def _ema_decay(value: str) -> float:
    v = finite_float(value)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1) (0 = off), got {value!r}")
    return v


GROUPS = ("teacher", "data", "memory", "evaluation", "trainer", "method")
NOT_FLAGS = {
    "run_config",
    "resolved_config",
    "export_dir",
    "folder_flag",
}  # TrainerConfig fields the runner fills, not the user


@dataclass
class RunConfig:
    method: Any  # the method's config dataclass (DMD2Config, ...)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    # The fields set by `override` (the command line's flags), as opposed to those a preset or file gave.
    explicit: frozenset = field(default=frozenset(), compare=False)

    def field_groups(self) -> dict[str, str]:
        """Flag (= field) name -> the group holding it. Names are unique across groups."""
        out = {}
        for group in GROUPS:
            for f in fields(getattr(self, group)):
                if f.name in NOT_FLAGS:
                    continue
                if f.name in out:
                    raise TypeError(
                        f"Field {f.name!r} is in both {out[f.name]} and {group}: flags must be unambiguous."
                    )
                out[f.name] = group
        return out

    def get(self, name: str):
        return getattr(getattr(self, self.field_groups()[name]), name)

    def override(self, values: dict) -> RunConfig:
        """A copy with the given fields replaced (None values are skipped: an unset flag)."""
        groups = self.field_groups()
        changes: dict[str, dict] = {}
        for name, value in values.items():
            if value is not None and name in groups:
                changes.setdefault(groups[name], {})[name] = value
        given = {name for kw in changes.values() for name in kw}
        groups_changed = {g: replace(getattr(self, g), **kw) for g, kw in changes.items()}
        return replace(self, **groups_changed, explicit=self.explicit | given)

    def to_dict(self) -> dict:
        return {
            g: {k: v for k, v in dataclasses.asdict(getattr(self, g)).items() if k not in NOT_FLAGS} for g in GROUPS
        }

    @classmethod
    def from_dict(cls, data: dict, method_class: type) -> RunConfig:
        classes = {
            "method": method_class,
            "trainer": TrainerConfig,
            "teacher": TeacherConfig,
            "data": DataConfig,
            "memory": MemoryConfig,
            "evaluation": EvalConfig,
        }
        built = {}
        for group, klass in classes.items():
            known = {f.name: f for f in fields(klass)}
            values = data.get(group, {})
            unknown = sorted(set(values) - set(known))
            if unknown:
                raise UserError(
                    f"The config file's {group} section has fields this version does not know: {', '.join(unknown)}."
                )
            defaults = klass() if group != "method" else method_class()
            built[group] = replace(defaults, **{k: _like(getattr(defaults, k), v) for k, v in values.items()})
        # A rerun starts afresh: the file records which checkpoint its run resumed, which is that run's business.
        built["trainer"] = replace(built["trainer"], resume_from_checkpoint=None)
        return cls(**built)


def _like(default, value):
    """JSON has no tuples: give a list back the tuple type its default has."""
    return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value


@dataclass(frozen=True)
class FromStage:
    """A stage setting that names an earlier stage's folder (e.g. the teacher a teacher stage trained)."""

    stage: str


@dataclass(frozen=True)
class Stage:
    """One named stage of a run (a published recipe is a list of them): which of the method's builders makes its
    method, the settings it changes (method, trainer, teacher and data fields; a flag given on the command line still
    wins over a preset's stage table), and what it takes from the stages before it.

    With several stages, each trains in <output_dir>/<name>/ and the last one exports into <output_dir>; a run of
    one stage trains in <output_dir> itself."""

    name: str
    build: str = "distill"  # the key of the method's builder
    method: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)  # values may be FromStage(...): that stage's folder
    data: dict = field(default_factory=dict)
    init_from: str | None = None  # start from this earlier stage's final weights (its last checkpoint)
    seed: int | None = None  # None: the run's --seed
    keeps_product: bool = False  # an intermediate stage whose export (a teacher, a path, a student) later stages read
    folder: str | None = None  # None: the name


@dataclass(frozen=True)
class Preset:
    """A named recipe: the run's configuration and, for a recipe of several stages, the stages."""

    name: str
    description: str
    config: RunConfig
    notes: str = ""
    stages: tuple[Stage, ...] = ()


def resolve(flags: dict, presets: dict[str, Preset], default_preset: str, method_class: type) -> tuple[RunConfig, str]:
    """The run's configuration: the preset (or --config FILE), then every flag that was set.

    `flags` maps flag names to parsed values (None = not given); 'preset' and 'config' pick the base."""
    name, config_file = flags.get("preset"), flags.get("config")
    if config_file:
        if name:
            raise UserError("Pass either --preset or --config, not both (a config file already names its preset).")
        data = read_config_file(config_file)
        name = data.get("preset", "(config file)")
        base = RunConfig.from_dict(data, method_class)
    else:
        name = name or default_preset
        if name not in presets:
            raise UserError(f"Unknown preset {name!r}; choose one of: {', '.join(presets)}.")
        base = presets[name].config
    return base.override(flags), name


def read_config_file(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"Cannot read the config file {path} ({err.__class__.__name__}); pass a training_config.json "
            f"written by an earlier run."
        ) from None
    if not isinstance(data, dict) or "method" not in data:
        raise UserError(f"{path} is not a training_config.json (it has no 'method' section).")
    return data


def resolved_record(config: RunConfig, preset: str, method_name: str, method_key: str | None = None) -> dict:
    """What training_config.json holds: every field, defaults included, plus the software that ran it and the
    method that wrote it (so another method's run is recognised as such)."""
    return {
        "method_name": method_name,
        "onestep_method": method_key,
        "preset": preset,
        **config.to_dict(),
        "versions": library_versions(),
        "git_commit": git_commit(),
    }


def differences(old: dict, new: dict, ignore: tuple[str, ...] = ("trainer.resume_from_checkpoint",)) -> list[str]:
    """'group.field: old -> new' for every field that differs between two resolved records."""
    out = []
    for group in sorted(set(old) | set(new)):
        a, b = old.get(group), new.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                name = f"{group}.{key}"
                if name not in ignore and a.get(key) != b.get(key):
                    out.append(f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
        elif a != b and group not in ignore:
            out.append(f"{group}: {a!r} -> {b!r}")
    return out


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("onestep", "torch", "diffusers", "accelerate", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The checkout's commit (with '+dirty' when it has uncommitted changes), or None outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def presets_help(presets: dict[str, Preset], default: str) -> str:
    """The --help epilog: each preset, its stages, and the fields where it differs from the default preset."""
    import textwrap

    base = presets[default].config
    groups = base.field_groups()
    lines = [f"presets (--preset NAME; a flag on the command line overrides the preset's value; default {default}):"]
    for p in presets.values():
        changed = [f"{n}={p.config.get(n)}" for n in groups if n != "output_dir" and p.config.get(n) != base.get(n)]
        values = ", ".join(changed) if p.name != default else "the values shown with each flag above"
        lines.append(f"  {p.name}: {p.description}")
        if values:
            lines.append(textwrap.fill(values, 110, initial_indent=" " * 6, subsequent_indent=" " * 6))
        if p.stages:
            described = "; ".join(_describe_stage(s) for s in p.stages)
            lines.append(textwrap.fill(f"stages: {described}", 110, initial_indent=" " * 6, subsequent_indent=" " * 8))
    return "\n".join(lines)


def _describe_stage(stage: Stage) -> str:
    settings = {**stage.method, **stage.trainer, **stage.teacher}
    shown = ", ".join(f"{k}={v.stage if isinstance(v, FromStage) else v}" for k, v in settings.items())
    start = f", from {stage.init_from}" if stage.init_from else ""
    return f"{stage.name} ({stage.build}{start}{': ' + shown if shown else ''})"
