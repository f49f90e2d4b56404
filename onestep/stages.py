"""The one runner: a run is a list of named stages (onestep.config.Stage); one command runs a whole published
recipe, `--stage NAME` runs one stage alone, and `--resume_from_checkpoint latest` skips the finished stages and
continues the unfinished one from its newest checkpoint.

A method registers itself with a `MethodEntry` (onestep/presets/<method>.py): its config class, presets, the
builders that make its stages' methods, and how its stages follow from a resolved configuration. The train
scripts only call `main(entry)`.

Folders: a run of one stage trains in --output_dir itself. A run of several writes its configuration
(training_config.json) into --output_dir, trains each stage in <output_dir>/<stage>/ (a run folder of its own:
checkpoints, samples, logs, timing, and stage.json once finished), and the last stage exports into
--output_dir; an intermediate stage whose product a later one reads (a teacher, a degradation path, an MSD
student) exports into its own folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .checkpoints import check_output_dir, list_checkpoints
from .cli import help_formatter
from .config import (
    CONFIG_FILE,
    DataConfig,
    EvalConfig,
    FromStage,
    MemoryConfig,
    Preset,
    RunConfig,
    Stage,
    TeacherConfig,
    TrainerConfig,
    presets_help,
    read_config_file,
    resolve,
    resolved_record,
)
from .errors import UserError
from .flags import RUN_GROUPS, add_flags, check_consistency, flag_fields

STAGE_FILE = "stage.json"  # written into a stage's folder when it has finished


@dataclass
class StageRun:
    """What a stage's builder gets: the stage, its resolved configuration, its folder, and the run around it."""

    entry: MethodEntry
    stage: Stage
    config: RunConfig
    preset: str
    folder: str
    run_dir: str
    stages: tuple[Stage, ...]
    cache: dict  # shared by the stages of one run in this process (e.g. MSD's text embedder)
    run_seed: int = 0  # the run's --seed (a stage's own seed may differ)
    args: argparse.Namespace | None = None

    def folder_of(self, name: str) -> str:
        return stage_folder(self.run_dir, self.stages, name)

    def prepare(self, needs_real_data: bool, **kw):
        """The run setup of this stage (teacher context, data, trainer): onestep.run_setup.prepare."""
        from .run_setup import prepare

        kw.setdefault("kinds", self.entry.kinds)
        kw.setdefault("refusals", self.entry.refusals)
        return prepare(self.config, self.preset, self.entry.name, needs_real_data, method_key=self.entry.key, **kw)


@dataclass(frozen=True)
class Builder:
    """How a stage's method is made: `build(run) -> (method, setup)`; an action stage (MSD's router, its
    assembly) does its work in `build` and returns a result dict or None. `needs_real_data(config)` is checked
    before the first stage."""

    build: Callable[[StageRun], tuple | dict | None]
    needs_real_data: Callable[[RunConfig], bool] = lambda config: False
    loads_teacher: bool = True  # False: a stage that trains its network from scratch (an SR teacher)
    action: bool = False  # a stage that trains nothing: it runs every time (no stage.json) and returns a result


def default_stages(config: RunConfig, preset: Preset) -> tuple[Stage, ...]:
    """The preset's stages (one 'distill' stage if it names none); a flag given on the command line wins over
    the preset's per-stage values."""
    stages = preset.stages or (Stage("distill"),)
    return tuple(without_explicit(s, config.explicit) for s in stages)


def without_explicit(stage: Stage, explicit: frozenset) -> Stage:
    keep = lambda d: {k: v for k, v in d.items() if k not in explicit}  # noqa: E731
    return replace(
        stage,
        method=keep(stage.method),
        trainer=keep(stage.trainer),
        teacher=keep(stage.teacher),
        data=keep(stage.data),
    )


@dataclass(frozen=True)
class MethodEntry:
    """A method as the runner sees it (one per onestep/presets/<method>.py)."""

    name: str  # as logs and model cards write it: "DMD2"
    key: str  # as configs and checkpoints record it: "dmd2"
    config_class: type
    presets: dict[str, Preset]
    default_preset: str
    builders: dict[str, Builder]
    description: str = ""  # the script's --help text
    kinds: tuple[str, ...] = ("pixel", "text")  # the teacher kinds the method distils (run_setup.KIND_NAMES)
    refusals: dict[str, str] = field(default_factory=dict)  # its own sentence for a kind it does not take
    stages: Callable[[RunConfig, Preset], tuple[Stage, ...]] = default_stages
    # Derived defaults, from the configuration, the preset and the parsed command line.
    resolve: Callable[[RunConfig, Preset, argparse.Namespace | None], RunConfig] = lambda config, preset, args: config
    run_groups: tuple[str, ...] = RUN_GROUPS  # which shared flag groups the script offers
    run_flags: tuple[str, ...] = ()  # single shared flags offered outside those groups
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # the method's non-config flags
    select: Callable[[argparse.Namespace, tuple[Stage, ...]], tuple[Stage, ...] | None] | None = None


# -- the command line ----------------------------------------------------------------------------------------

RUN_CLASSES = (TeacherConfig, DataConfig, TrainerConfig, MemoryConfig, EvalConfig)


class _Parser(argparse.ArgumentParser):
    """A bad flag ends in one sentence and exit status 2, as every other bad input does (not the whole usage)."""

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists every option).\n")


def build_parser(entry: MethodEntry) -> argparse.ArgumentParser:
    """The script's parser, generated from the config dataclasses: the shared groups, then the method's own.
    Every flag defaults to None ("the preset's value"); --help shows the default preset's value of each."""
    defaults = entry.presets[entry.default_preset].config
    p = _Parser(
        description=entry.description,
        formatter_class=help_formatter(defaults),
        epilog=presets_help(entry.presets, entry.default_preset),
    )
    p.add_argument(
        "--preset", default=None, help=f"Named recipe: {', '.join(entry.presets)} (default: {entry.default_preset})."
    )
    p.add_argument(
        "--config", default=None, help="Rerun from a training_config.json an earlier run wrote (flags still override)."
    )
    p.add_argument(
        "--stage",
        default=None,
        help="Run only this stage of the recipe (its earlier stages must have finished in --output_dir); the "
        "stages are listed with each preset below.",
    )
    groups = {g: p.add_argument_group(g) for g in RUN_GROUPS if g in entry.run_groups}
    # The shared flags the script offers (its groups, and single ones it names), then the method config's own,
    # whose fields may sit in a shared group too (learning_rate in 'optimisation').
    for cls in RUN_CLASSES:
        left_out = tuple(
            f.name
            for f, spec, owner, _ in flag_fields(cls)
            if (spec.group or owner.flag_group) not in entry.run_groups and f.name not in entry.run_flags
        )
        add_flags(p, [_without(cls, left_out)], groups)
    add_flags(p, [entry.config_class], groups)
    if entry.add_arguments is not None:
        entry.add_arguments(p)
    return p


def _without(cls, excluded: tuple[str, ...]):
    """The config class with some of its flags left out (a subclass whose not_flags lists them)."""
    return type(cls.__name__, (cls,), {"not_flags": tuple(getattr(cls, "not_flags", ())) + excluded})


# -- running -------------------------------------------------------------------------------------------------


def parse(entry: MethodEntry, argv: list[str] | None = None):
    """(resolved RunConfig, preset name, Preset, parsed arguments) of a command line."""
    args = build_parser(entry).parse_args(argv)
    flags = vars(args)
    if flags.get("config"):  # another method's file is named as such, not as "fields this version does not know"
        _check_method(read_config_file(flags["config"]), entry, flags["config"])
    config, preset_name = resolve(flags, entry.presets, entry.default_preset, entry.config_class)
    preset = entry.presets.get(preset_name) or _preset_of_config_file(flags, entry)
    return entry.resolve(config, preset, args), preset_name, preset, args


def main(entry: MethodEntry, argv: list[str] | None = None, build_evaluator: Callable | None = None) -> dict:
    """Parse, resolve, run: what every train/<method>.py does. `build_evaluator`: onestep.eval's in-training
    evaluator factory (the scripts pass it, so that the core never imports the evaluation package)."""
    config, preset_name, preset, args = parse(entry, argv)
    stages = entry.stages(config, preset)
    chosen = entry.select(args, stages) if entry.select is not None else None
    if chosen is None:
        chosen = _select(stages, args.stage, preset_name)
    return run(entry, config, preset_name, stages, chosen, build_evaluator, args)


def _preset_of_config_file(flags: dict, entry: MethodEntry) -> Preset:
    """A --config file names its preset; its stages come from that preset (the file holds the run's values)."""
    data = read_config_file(flags["config"])
    _check_method(data, entry, flags["config"])
    name = data.get("preset")
    if name in entry.presets:
        return entry.presets[name]
    return Preset("(config file)", "", entry.presets[entry.default_preset].config)


def _check_method(data: dict, entry: MethodEntry, path: str) -> None:
    written_by = data.get("onestep_method")
    if written_by and written_by != entry.key:
        raise UserError(
            f"{path} was written by a {written_by} run, not {entry.key}; rerun it with train/{written_by}.py."
        )


def _select(stages: tuple[Stage, ...], name: str | None, preset: str) -> tuple[Stage, ...]:
    if name is None:
        return stages
    names = [s.name for s in stages]
    picked = tuple(s for s in stages if s.name == name or s.name.startswith(name + "/"))
    if not picked:
        raise UserError(f"Preset {preset} has no stage {name!r}; its stages: {', '.join(names)}.")
    return picked


def stage_folder(run_dir: str, stages: tuple[Stage, ...], name: str) -> str:
    if len(stages) == 1:
        return run_dir
    stage = next((s for s in stages if s.name == name), None)
    if stage is None:
        raise UserError(f"This recipe has no stage {name!r}.")
    return os.path.join(run_dir, stage.folder or stage.name)


def stage_done(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STAGE_FILE))


def run(
    entry: MethodEntry,
    config: RunConfig,
    preset: str,
    stages: tuple[Stage, ...],
    chosen: tuple[Stage, ...],
    build_evaluator: Callable | None = None,
    args: argparse.Namespace | None = None,
) -> dict:
    """Run the chosen stages of a recipe in order; a finished stage (stage.json) is skipped."""
    run_dir = config.trainer.output_dir
    several = len(stages) > 1
    resume = config.trainer.resume_from_checkpoint
    from .run_setup import check_output_is_not_an_input

    check_output_is_not_an_input(config)  # first: "inside the teacher's folder" says more than "not empty"
    if several:
        _check_run_folder(entry, config, stages, chosen, run_dir, resume)
    else:  # before the teacher is loaded
        check_output_dir(run_dir, resume)
    check_consistency(config.method, config.explicit)
    _check_requirements(entry, config, preset, chosen)
    hub_repo = None
    if config.trainer.push_to_hub and any(s.name == stages[-1].name for s in chosen):
        from .export import check_hub_upload

        hub_repo = check_hub_upload(config.trainer.hub_model_id, run_dir)
    existed = os.path.exists(run_dir)
    try:
        result = _run_stages(entry, config, preset, stages, chosen, build_evaluator, args)
    except UserError:
        _remove_if_untouched(run_dir, existed)
        raise
    if hub_repo is not None and _is_main() and not result.get("interrupted"):
        from .export import push_to_hub

        _say(f"Uploaded the student to {push_to_hub(run_dir, hub_repo)}")
    return result


def _run_stages(entry, config, preset, stages, chosen, build_evaluator, args) -> dict:
    run_dir, several, last = config.trainer.output_dir, len(stages) > 1, stages[-1].name
    cache: dict = {}
    result: dict = {"interrupted": False}
    for stage in chosen:
        folder = stage_folder(run_dir, stages, stage.name)
        if several and stage_done(folder):
            _say(f"Stage {stage.name}: finished already ({folder}).")
            result = {"interrupted": False, "already_finished": True}
            continue
        stage_config = _stage_config(config, stage, stages, run_dir, folder, several, last)
        srun = StageRun(entry, stage, stage_config, preset, folder, run_dir, stages, cache, config.trainer.seed, args)
        builder = entry.builders[stage.build]
        # The run's configuration is written once the first stage has passed its own checks (nothing before).
        record = (lambda: _write_run_config(entry, config, preset, stages, run_dir)) if several else None
        if builder.action:
            result = builder.build(srun) or {"interrupted": False}
            if record:
                record()
            continue
        if several:
            _say(f"Stage {stage.name} ({stages.index(stage) + 1} of {len(stages)}): {folder}")
            _clear_unstarted(folder, run_dir, stage_config)
        result = _run_stage(srun, builder, build_evaluator, final=stage.name == last, before_training=record)
        if result.get("interrupted"):
            return result
        if several and _is_main():
            _write_stage_done(folder, stage, entry)
    return result


def _remove_if_untouched(run_dir: str, existed: bool) -> None:
    """A run refused in one sentence leaves no folder behind: one it created, with no checkpoint in it yet."""
    import shutil

    if existed or not os.path.isdir(run_dir) or not _is_main():
        return
    if not any(n.startswith("checkpoint-") for _, dirs, _ in os.walk(run_dir) for n in dirs):
        shutil.rmtree(run_dir, ignore_errors=True)


def _clear_unstarted(folder: str, run_dir: str, config: RunConfig) -> None:
    """A stage of this run killed before its first checkpoint left logs and grids but nothing to resume from:
    resuming starts it again (only inside the run's own folder)."""
    import shutil

    inside = os.path.realpath(folder).startswith(os.path.realpath(run_dir) + os.sep)
    leftover = config.trainer.resume_from_checkpoint is None and os.path.isdir(folder) and os.listdir(folder)
    if inside and leftover and not list_checkpoints(folder) and _is_main():
        shutil.rmtree(folder)
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _say(message: str) -> None:
    if _is_main():
        print(message, flush=True)


def _stage_config(
    config: RunConfig, stage: Stage, stages, run_dir: str, folder: str, several: bool, last: str
) -> RunConfig:
    """The run's configuration with this stage's settings: its values, folder, seed, start and export."""
    teacher = {
        k: (stage_folder(run_dir, stages, v.stage) if isinstance(v, FromStage) else v)
        for k, v in stage.teacher.items()
    }
    trainer = dict(stage.trainer)
    if several:
        has_checkpoints = bool(list_checkpoints(folder))
        resume = config.trainer.resume_from_checkpoint
        trainer.update(
            output_dir=folder,
            resume_from_checkpoint=("latest" if has_checkpoints else None) if resume == "latest" else resume,
            export=stage.name == last or stage.keeps_product,
            export_dir=run_dir if stage.name == last else None,
        )
        if stage.init_from and not trainer.get("resume_from_checkpoint"):
            trainer["init_from_checkpoint"] = _final_checkpoint(stage_folder(run_dir, stages, stage.init_from), stage)
    if stage.seed is not None:
        trainer["seed"] = stage.seed
    return _with_stage_values(config, stage, teacher, trainer)


def _with_stage_values(config: RunConfig, stage: Stage, teacher: dict, trainer: dict) -> RunConfig:
    """The run's configuration with the stage's method and data values, and the given teacher and trainer
    values (its own, resolved: a FromStage teacher becomes a folder, the trainer gains the stage's folder)."""
    return replace(
        config,
        method=replace(config.method, **stage.method),
        trainer=replace(config.trainer, **trainer),
        teacher=replace(config.teacher, **teacher),
        data=replace(config.data, **stage.data),
    )


def _final_checkpoint(folder: str, stage: Stage) -> str:
    found = list_checkpoints(folder)
    if not stage_done(folder) or not found:
        raise UserError(
            f"Stage {stage.name} starts from stage {stage.init_from}'s weights, which has not finished in {folder}; "
            f"run it first (the whole recipe, or --stage {stage.init_from})."
        )
    return found[-1]


def _run_stage(srun: StageRun, builder: Builder, build_evaluator, final: bool, before_training=None) -> dict:
    from .run_setup import announce_preset, apply_memory_options, evaluator_for

    method, setup = builder.build(srun)
    if before_training is not None:
        before_training()
    trainer = setup.trainer
    announce_preset(setup, builder.loads_teacher)
    nets = [*method.memory_networks(), setup.context.denoiser.net]
    if srun.config.memory.gradient_checkpointing:
        skipped = method.checkpointing_exclusions()
        if skipped and trainer.is_main:
            trainer.log(f"Note: gradient checkpointing is not applied to {skipped}.")
    apply_memory_options(nets, srun.config.memory, trainer.device)
    result = trainer.fit(method, setup.data, evaluator_for(setup, build_evaluator))
    if trainer.is_main and not result["interrupted"] and not result.get("already_finished"):
        if final:
            _report(srun, method, trainer)
        else:
            trainer.log(f"Stage {srun.stage.name} finished: {method.product(os.path.abspath(srun.folder))}")
    return result


def _report(srun: StageRun, method, trainer) -> None:
    """Where everything is, once a stage that exports has finished."""
    cfg = srun.config.trainer
    if not cfg.export:
        return
    out, folder = os.path.abspath(trainer.export_dir), os.path.abspath(cfg.output_dir)
    evaluated = os.path.exists(os.path.join(folder, "logs", "eval.csv"))
    trainer.log(
        f"\nDone ({time.strftime('%H:%M:%S')}). Everything is under {out}:\n"
        f"  {method.product(out)}\n"
        f"  configuration     {out}/{CONFIG_FILE} (rerun with --config)\n"
        f"  checkpoints       {folder}/checkpoint-<step>\n"
        f"  sample grids      {folder}/samples/\n"
        f"  loss curves       {folder}/loss_curves.png, {folder}/logs/losses.csv\n"
        + (f"  in-training FID   {folder}/logs/eval.csv, {folder}/logs/eval.png\n" if evaluated else "")
        + f"  timing            {folder}/timing.json\n"
        f"Load it: {method.usage(trainer.export_dir)}"
    )


# -- checks before anything runs -------------------------------------------------------------------------------


def _check_run_folder(entry: MethodEntry, config: RunConfig, stages, chosen, run_dir: str, resume) -> None:
    """A run of several stages writes into a new or empty --output_dir, or into its own run folder to resume it or
    to run another of its stages (--stage)."""
    if resume not in (None, "latest") and len(chosen) > 1:
        raise UserError(
            "A recipe of several stages resumes with --resume_from_checkpoint latest; to resume from one "
            "checkpoint, run its stage alone (--stage NAME)."
        )
    if config.trainer.init_from_checkpoint and len(chosen) > 1:
        raise UserError(
            "--init_from_checkpoint starts one stage: run the stage it starts with --stage NAME (a recipe's later "
            "stages start from its earlier ones)."
        )
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return check_output_dir(run_dir, None)
    record = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(record):
        check_output_dir(run_dir, None)  # names what is there and refuses
        return
    try:
        with open(record) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    written_by = data.get("onestep_method")
    if written_by != entry.key or data.get("stages") is None:
        what = f"a {written_by} run" if written_by else "another run"
        raise UserError(
            f"{run_dir} holds {what}, not a {entry.key} run of several stages; choose another --output_dir."
        )
    if resume is None and len(chosen) == len(stages):
        raise UserError(
            f"{run_dir} already holds this run; pass --resume_from_checkpoint latest to continue it (finished "
            f"stages are skipped), or choose another --output_dir."
        )
    if resume is None:
        for stage in chosen:
            folder = stage_folder(run_dir, stages, stage.name)
            if os.path.isdir(folder) and os.listdir(folder):
                raise UserError(
                    f"Stage {stage.name} of {run_dir} was started already; pass --resume_from_checkpoint latest to "
                    f"continue it."
                )


def _check_requirements(entry: MethodEntry, config: RunConfig, preset: str, chosen) -> None:
    """What every chosen stage needs, checked before the first one starts (a later stage's missing data must
    not be found after the earlier ones have trained)."""
    from .run_setup import check_inputs, check_teacher_and_data

    for stage in chosen:
        builder = entry.builders[stage.build]
        if not builder.loads_teacher or any(isinstance(v, FromStage) for v in stage.teacher.values()):
            continue  # its teacher is made by the run (checked when that stage has run)
        stage_config = _with_stage_values(config, stage, teacher=stage.teacher, trainer={})
        check_inputs(stage_config, preset)
        needs = builder.needs_real_data(stage_config)
        check_teacher_and_data(stage_config, entry.name, needs, entry.kinds, entry.refusals)


def _write_run_config(entry: MethodEntry, config: RunConfig, preset: str, stages, run_dir: str) -> None:
    if not _is_main():
        return
    os.makedirs(run_dir, exist_ok=True)
    record = {**resolved_record(config, preset, entry.name, entry.key), "stages": [s.name for s in stages]}
    path = os.path.join(run_dir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _write_stage_done(folder: str, stage: Stage, entry: MethodEntry) -> None:
    path = os.path.join(folder, STAGE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(
            {"stage": stage.name, "onestep_method": entry.key, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, f
        )
    os.replace(path + ".tmp", path)


__all__ = ["Builder", "MethodEntry", "Stage", "StageRun", "main", "run"]
