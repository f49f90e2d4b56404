"""DisBack's recipes: DMD2's (the base loop, onestep.presets.dmd2) plus the path and its walk, and how its two stages
are built: `path` (record the degradation path from the teacher to the initial generator) and `distill` (DMD2 with
the target walking back along it). Defaults that the method leaves open (docs/methods/disback.md, unverified):
N = 10 snapshots, the path stage = 5% of the distill stage's iterations, M = distill iterations / (4 N).
`--max_train_steps` counts the distill stage's iterations (critic updates, as in DMD2); the path stage adds
`path_steps` updates of the degradation copy.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace

from ..config import Preset, RunConfig, Stage
from ..errors import UserError
from ..methods.disback import (
    DegradationPath,
    DisBack,
    DisBackConfig,
    load_initial_generator,
    read_path,
    resolve_for_run,
)
from ..stages import Builder, MethodEntry, StageRun
from .dmd2 import PRESETS as DMD2_PRESETS

DEFAULT_PRESET = "digits-cpu"
OUTPUT_DIR = "outputs/disback-digits"


def _from_dmd2(
    dmd2_name: str,
    name: str,
    description: str,
    notes: str = "",
    method: dict | None = None,
    trainer: dict | None = None,
) -> Preset:
    """DMD2's preset `dmd2_name` as the base loop, with DisBack's own settings on top."""
    base = DMD2_PRESETS[dmd2_name].config
    fields = {**asdict(base.method), **(method or {})}
    output_dir = OUTPUT_DIR if name == DEFAULT_PRESET else f"outputs/disback-{name}"
    config = replace(
        base,
        method=DisBackConfig(**fields),
        trainer=replace(base.trainer, output_dir=output_dir, **(trainer or {})),
    )
    return Preset(name, description, config, notes)


_DIGITS_LR = DMD2_PRESETS["digits-cpu"].config.method.learning_rate  # stage 1 and 2 (DMD2's digits rate)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _from_dmd2(
            "digits-cpu",
            "digits-cpu",
            "Bundled default: both stages on the digits teacher (16x16), one step at t=399, GAN on, 2 CPU cores.",
            f"Path stage: 100 updates at DMD2's digits learning rate {_DIGITS_LR:g}, as the distill stage (10 "
            "snapshots, one every 10; at DMD2's earlier 2e-4 the copy's samples turned to noise rather than to G0's); "
            "distill stage: DMD2's digits settings for 1,100 iterations, the target stepping back every 27 "
            "(M = 1100 / 40), so the teacher is the target from iteration 243 on. The 100 critic-only updates of "
            "the path and the 1,100 distillation iterations stand in for DMD2's 1,200 iterations.",
            method={"path_steps": 100},
            trainer={"max_train_steps": 1100},
        ),
        _from_dmd2(
            "imagenet64-edm",
            "imagenet64-edm",
            "ImageNet 64x64, EDM teacher, one step (paper: FID 1.38; its N, interval and budgets are not published).",
        ),
        _from_dmd2(
            "sd15",
            "sd15",
            "Stable Diffusion 1.5, one step at t=999, DMD2's distribution-matching settings (no GAN), CFG 1.75.",
            method={"gan": False},
        ),
        _from_dmd2("sdxl-4step", "sdxl-4step", "SDXL base, four steps with backward simulation, CFG 8, GAN."),
        _from_dmd2(
            "sdxl-1step",
            "sdxl-1step",
            "The released SDXL run: one step at t=399, CFG 8, GAN, lr 5e-7, batch 1; the path 1,000 updates with a "
            "snapshot every 100; distillation 100k iterations, a switch every 1,000.",
            "The released run started from a DMD2 SDXL one-step checkpoint (24k iterations): pass it with "
            "--initial_generator <dmd2 run>/checkpoint-24000.",
            method={"train_batch_size": 1, "path_steps": 1000, "switch_every": 1000},
            trainer={"max_train_steps": 100_000},
        ),
        _from_dmd2("sdxl-lora", "sdxl-lora", "SDXL base, four steps, LoRA on the generator (rank 64), lr 5e-5."),
    ]
}


def _resolve(config: RunConfig, preset: Preset, args) -> RunConfig:
    """The path's folder (--path_dir, else the run's path stage), N from the path when the distill stage reads an
    existing one, and the derived defaults (path_steps, M, the phase bounds)."""
    c, run_dir = config.method, config.trainer.output_dir
    if config.trainer.init_from_checkpoint:
        raise UserError(
            "--init_from_checkpoint would overwrite DisBack's starting points (the teacher in the path stage, G0 and "
            "the critic's S'_N in the distill stage): pass the checkpoint as --initial_generator (with --critic_init "
            "dmd2_critic to take its critic too)."
        )
    path_dir = os.path.abspath(c.path_dir or os.path.join(run_dir, "path"))
    if c.path_dir:
        a, b = os.path.realpath(run_dir), os.path.realpath(path_dir)
        if a == b or a.startswith(b + os.sep):
            raise UserError(
                f"--output_dir {run_dir} is inside --path_dir {c.path_dir}: the path's folder holds only the path; "
                f"choose another --output_dir."
            )
    distill_only = args is not None and args.stage == "distill"
    return replace(config, method=resolve_for_run(c, config.trainer.max_train_steps, path_dir, distill_only))


def _stages(config: RunConfig, preset: Preset) -> tuple[Stage, ...]:
    c = config.method
    trainer = {"max_train_steps": c.path_steps, "eval_steps": 0}  # G0 does not change: nothing to evaluate
    if "path_dir" in config.explicit:
        trainer["folder_flag"] = "--path_dir"
    path = Stage("path", build="path", trainer=trainer, keeps_product=True, folder=c.path_dir)
    return path, Stage("distill")


def _path(run: StageRun):
    from ..sharding import is_sharded

    c = run.config.method
    setup = run.prepare(needs_real_data=c.path_gan)
    if is_sharded(setup.trainer.accelerator):
        raise UserError(
            "DisBack's path stage saves whole snapshots while it trains, which FSDP shards do not give: record the "
            "path with DDP (the distill stage runs under FSDP)."
        )
    method = DegradationPath(setup.context, c, c.path_dir)
    if c.initial_generator:
        load_initial_generator(method, c.initial_generator)
    return method, setup


def _distill(run: StageRun):
    c = run.config.method
    read_path(c.path_dir, c.conditioning_timesteps)  # before anything is written
    setup = run.prepare(needs_real_data=c.gan)
    method = DisBack(setup.context, c, c.path_dir)
    if c.initial_generator:
        load_initial_generator(method, c.initial_generator, with_critic=c.critic_init == "dmd2_critic")
    return method, setup


ENTRY = MethodEntry(
    name="DisBack",
    key="disback",
    config_class=DisBackConfig,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    builders={
        "path": Builder(_path, needs_real_data=lambda config: config.method.path_gan),
        "distill": Builder(_distill, needs_real_data=lambda config: config.method.gan),
    },
    stages=_stages,
    resolve=_resolve,
    description="""DisBack distillation (Zhang et al. 2025): DMD2 whose target score walks back a degradation path.

With no arguments it runs both stages on the bundled digits teacher on the CPU:

    accelerate launch train/disback.py

The path stage fine-tunes a copy of the teacher on the initial generator's samples and saves N snapshots into
<output_dir>/path (or --path_dir); the distill stage distils from them into --output_dir. --stage path or
--stage distill runs one of them (--stage distill --path_dir reads a path recorded elsewhere). Every other option
is DMD2's; options left out come from --preset (listed at the end) or from --config. Documentation:
docs/methods/disback.md.""",
)
