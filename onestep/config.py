"""The typed configuration of a training run, its presets, and the resolved copy every run writes.

A run's configuration is one `RunConfig`: a group per concern (teacher, data, memory, in-training
evaluation, the trainer's loop) plus the method's own config dataclass. A preset is a named
`RunConfig`; variants are built from a base with `dataclasses.replace`. Command-line flags are the
field names: every flag left unset keeps the preset's value (or that of `--config FILE`, a
`training_config.json` written by an earlier run), so each default lives in exactly one place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import UserError
from .trainer import TrainerConfig

CONFIG_FILE = "training_config.json"


@dataclass
class TeacherConfig:
    pretrained_model_name_or_path: str = "digits"  # a diffusers folder, a hub id, or 'digits' (bundled)
    revision: str | None = None
    variant: str | None = None
    resolution: int | None = None  # None: the teacher's sample_size (x the VAE factor)
    num_classes: int | None = None  # None: from the teacher folder's onestep.json
    null_class: int | None = None
    prompt_file: str | None = None  # text-to-image teachers
    upscale_factor: int | None = None  # super-resolution teachers: HR size / LR size (None: the teacher's, else 4)


@dataclass
class DataConfig:
    train_data_dir: str | None = None  # None with the digits teacher: scikit-learn's digits
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    dataloader_num_workers: int = 2
    cache_latents: bool = False
    latent_cache_dir: str | None = None
    hr_dir: str | None = None  # super-resolution: paired high-resolution images (with lr_dir)
    lr_dir: str | None = None  # super-resolution: their low-resolution inputs, paired by file name


@dataclass
class MemoryConfig:
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    lora_rank: int = 0  # LoRA on the student only; 0 = full fine-tuning
    lora_alpha: float = 8.0
    lora_targets: str | None = None  # comma-separated module names; None: the method's list


@dataclass
class EvalConfig:
    """In-training FID (how often: TrainerConfig.eval_steps)."""

    eval_samples: int = 500
    eval_features: str | None = None  # None: digits for the digits teacher, else inception
    eval_reference: str | None = None  # None: 'digits' for the digits teacher
    inception_weights: str | None = None


GROUPS = ("teacher", "data", "memory", "evaluation", "trainer", "method")
NOT_FLAGS = {"run_config", "resolved_config"}  # TrainerConfig fields the run setup fills, not the user


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
class Preset:
    name: str
    description: str
    config: RunConfig
    notes: str = ""


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


def resolved_record(config: RunConfig, preset: str, method_name: str) -> dict:
    """What training_config.json holds: every field, defaults included, plus the software that ran it."""
    return {
        "method_name": method_name,
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
    """The --help epilog: each preset, and the fields where it differs from the default preset."""
    import textwrap

    base = presets[default].config
    groups = base.field_groups()
    lines = [f"presets (--preset NAME; a flag on the command line overrides the preset's value; default {default}):"]
    for p in presets.values():
        changed = [f"{n}={p.config.get(n)}" for n in groups if n != "output_dir" and p.config.get(n) != base.get(n)]
        values = ", ".join(changed) if p.name != default else "the values shown with each flag above"
        lines += [
            f"  {p.name}: {p.description}",
            textwrap.fill(values, 110, initial_indent=" " * 6, subsequent_indent=" " * 6),
        ]
    return "\n".join(lines)
