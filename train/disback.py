"""DisBack distillation (Zhang et al. 2025): DMD2 whose target score walks back a degradation path.

With no arguments it runs both stages on the bundled digits teacher on the CPU (5 to 8 minutes on 2 cores):

    accelerate launch train/disback.py

Stage 1 (--stage path) fine-tunes a copy of the teacher on the initial generator's samples and saves N
snapshots into --path_dir (default: <output_dir>-path); stage 2 (--stage distill) distils from them into
--output_dir; --stage both (the default) runs one after the other. Every other option is DMD2's; options left
out come from --preset (listed at the end) or from --config, a training_config.json an earlier run wrote.
"""

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import positive_float, positive_int, run_main  # noqa: E402
from train.dmd2 import DMD2_FLAGS  # noqa: E402

# DisBack's own flags (shared/methods/disback.md): name, type (bool: --x / --no-x; a tuple: choices), help.
DISBACK_FLAGS = (
    ("stage", ("path", "distill", "both"), "path: stage 1 only; distill: stage 2 from --path_dir; both: in turn."),
    ("path_dir", str, "The degradation path's folder (None: <output_dir>-path)."),
    ("num_snapshots", positive_int, "N: snapshots S'_1..S'_N of the path (S'_0: the teacher; stage 2: the path's)."),
    ("path_steps", positive_int, "Stage-1 updates, a multiple of N (None: 5%% of --max_train_steps)."),
    ("path_learning_rate", positive_float, "Stage-1 learning rate (None: --learning_rate)."),
    ("path_uncond_prob", float, "Null-condition dropout on the copy in stage 1 when the real score uses CFG."),
    ("path_gan", bool, "Also train the GAN head in stage 1 (the released code; the paper: denoising only)."),
    ("initial_generator", str, "G0 from an earlier run's checkpoint-<step> (None: the teacher copy)."),
    ("critic_init", ("path", "teacher", "dmd2_critic"), "Stage-2 critic start: S'_N, the teacher, or G0's critic."),
    ("switch_rule", ("fixed", "converged"), "Target switch: every M iterations, or when the DM gradient fell."),
    ("switch_every", positive_int, "M: iterations per target (None: --max_train_steps / (4 N))."),
    ("switch_rho", positive_float, "converged: switch when the DM gradient is below rho x its phase-start value."),
    ("switch_min_steps", positive_int, "converged: shortest phase (None: M / 2)."),
    ("switch_max_steps", positive_int, "converged: longest phase (None: 2 M)."),
    ("switch_window", positive_int, "converged: generator updates averaged per value."),
    ("target_guidance", ("cfg_all", "cfg_teacher_only", "cfg_all_raw"), "CFG on the path's targets (None: auto)."),
    ("dm_weighting", ("dmd2", "vsd"), "omega of the generator gradient: DMD2's normaliser or VSD's alpha sigma."),
)
NOT_DISBACK = ("stage",)  # DMD2 flags that DisBack redefines (or, regression_*, does not use)


def build_parser():
    from onestep.presets.disback import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import run_parser

    p = run_parser(__doc__, PRESETS, DEFAULT_PRESET)
    groups = (
        ("DMD2, the base loop (shared/methods/dmd2.md)", DMD2_FLAGS),
        ("DisBack (shared/methods/disback.md)", DISBACK_FLAGS),
    )
    for title, flags in groups:
        g = p.add_argument_group(title)
        for name, kind, text in flags:
            if flags is DMD2_FLAGS and (name in NOT_DISBACK or name.startswith("regression")):
                continue
            how = (
                {"action": argparse.BooleanOptionalAction}
                if kind is bool
                else {"choices": kind}
                if isinstance(kind, tuple)
                else {"type": kind}
            )
            g.add_argument(f"--{name}", help=text, **how)
    return p


def main(argv=None):
    from onestep.errors import UserError
    from onestep.methods.disback import DisBackConfig, resolve_for_run
    from onestep.presets.disback import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import parse_run

    config, preset = parse_run(build_parser(), argv, PRESETS, DEFAULT_PRESET, DisBackConfig)
    if config.trainer.init_from_checkpoint:
        raise UserError(
            "--init_from_checkpoint would overwrite DisBack's starting points (S' = the teacher in stage 1, G0 and "
            "the critic's S'_N in stage 2): pass the checkpoint as --initial_generator (with --critic_init "
            "dmd2_critic to take its critic too)."
        )
    out = config.trainer.output_dir
    method = resolve_for_run(config.method, config.trainer.max_train_steps, out)
    config = replace(config, method=method)
    if method.stage == "path":
        return run_path(config, preset)
    _check_folders(out, method.path_dir)
    if method.stage == "distill":
        return run_distill(config, preset)
    return run_both(config, preset)


def _check_folders(out: str, path_dir: str) -> None:
    from onestep.errors import UserError

    a, b = os.path.realpath(out), os.path.realpath(path_dir)
    if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise UserError(
            f"--path_dir {path_dir} and --output_dir {out} must be separate folders, neither inside the other "
            f"(each is a run of its own)."
        )


def run_both(config, preset):
    """Stage 1 into --path_dir, then stage 2 into --output_dir; resuming picks up whichever was running."""
    from onestep.checkpoints import check_output_dir
    from onestep.errors import UserError
    from onestep.methods.disback import PATH_FILE, read_path

    resume, path_dir = config.trainer.resume_from_checkpoint, config.method.path_dir
    if resume not in (None, "latest"):
        raise UserError(
            "--stage both resumes with --resume_from_checkpoint latest; to resume from one checkpoint, run its "
            "stage alone (--stage path or --stage distill)."
        )
    check_output_dir(config.trainer.output_dir, resume)  # stage 2's folder, before stage 1 spends its time
    finished = os.path.isfile(os.path.join(path_dir, PATH_FILE)) and _complete(path_dir)
    if finished and not resume:
        raise UserError(
            f"{path_dir} already holds a finished degradation path: use it with --stage distill --path_dir "
            f"{path_dir}, or choose another --output_dir (or --path_dir)."
        )
    if finished:
        read_path(path_dir, config.method.conditioning_timesteps)
    else:
        result = run_path(config, preset)
        if result.get("interrupted"):
            return result
    return run_distill(config, preset)


def _complete(path_dir: str) -> bool:
    import json

    from onestep.methods.disback import PATH_FILE

    with open(os.path.join(path_dir, PATH_FILE)) as f:
        return bool(json.load(f).get("complete"))


def run_path(config, preset):
    """Stage 1: its own run in --path_dir, path_steps updates, no in-training FID (G0 does not change)."""
    from onestep.methods.disback import DegradationPath, load_initial_generator
    from onestep.run_setup import prepare, train

    c = config.method
    config = replace(
        config,
        method=replace(c, stage="path"),
        trainer=replace(config.trainer, output_dir=c.path_dir, max_train_steps=c.path_steps, eval_steps=0),
    )
    setup = prepare(config, preset, "DisBack stage 1 (degradation path)", needs_real_data=c.path_gan)
    _refuse_fsdp(setup)
    method = DegradationPath(setup.teacher.denoiser, config.method, setup.sample_shape, c.path_dir, **_kwargs(setup))
    if c.initial_generator:
        _lora(method, setup)  # so that a LoRA student's checkpoint fits G0
        load_initial_generator(method, c.initial_generator)
    return train(setup, method, product="degradation path  {out} (path.json, snapshot-<i>/unet/, README.md)")


def run_distill(config, preset):
    """Stage 2: DMD2 from G0 with the critic at S'_N and the target walking back the path."""
    from onestep.methods.disback import DisBack, load_initial_generator, read_path
    from onestep.run_setup import prepare, train

    c = config.method
    read_path(c.path_dir, c.conditioning_timesteps)  # before anything is written
    setup = prepare(config, preset, "DisBack", needs_real_data=c.gan)
    method = DisBack(setup.teacher.denoiser, c, setup.sample_shape, c.path_dir, **_kwargs(setup))
    _lora(method, setup)
    if c.initial_generator:
        load_initial_generator(method, c.initial_generator, with_critic=c.critic_init == "dmd2_critic")
    return train(setup, method)


def _kwargs(setup) -> dict:
    return dict(
        cond_sampler=setup.cond_sampler, uncond=setup.uncond, decode=setup.decode, export_info=setup.export_info
    )


def _lora(method, setup) -> None:
    from onestep.lora import DMD2_LORA_TARGETS
    from onestep.run_setup import add_lora_to

    lora = add_lora_to(method.generator.denoiser.net, setup, DMD2_LORA_TARGETS)
    if lora:
        method.export_info["lora"] = lora


def _refuse_fsdp(setup) -> None:
    from onestep.errors import UserError
    from onestep.sharding import is_sharded

    if is_sharded(setup.trainer.accelerator):
        raise UserError(
            "DisBack's stage 1 saves whole snapshots while it trains, which FSDP shards do not give: record the path "
            "with DDP (stage 2 runs under FSDP)."
        )


if __name__ == "__main__":
    run_main(main)
