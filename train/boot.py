"""BOOT distillation (Gu et al. 2023): a one-step student from a diffusers teacher, without any data.

With no arguments it distils the bundled digits teacher on the CPU (a few minutes on 2 cores), reading no
digits at all:

    accelerate launch train/boot.py

Options follow the diffusers training examples; every option left out comes from --preset (listed at
the end) or from --config, a training_config.json an earlier run wrote.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import non_negative_float, positive_float, positive_int, run_main  # noqa: E402

# BOOT's own flags (shared/methods/boot.md): name, type (bool: --x / --no-x), help. Defaults come from --preset.
BOOT_FLAGS = (
    ("grid_size", int, "N: intervals of the time grid between the noise end and the clean end (1..T)."),
    ("boundary", str, "paper: boundary loss g(eps, T) = f(eps, T); exact: the trajectory starts at x_T = noise."),
    ("boundary_weight", non_negative_float, "lambda_BC, the boundary loss's weight (B-paper)."),
    ("boundary_every", positive_int, "Compute the boundary loss every k-th iteration."),
    ("boundary_batch_size", positive_int, "Compute the boundary loss on the first m noise maps (None: all)."),
    ("interval_weight", str, "w_i: uniform (1) or delta2 (delta^2, a plain MSE on the signal)."),
    ("param_timestep", int, "Fixed timestep of the student's output conversion (None: T, the noise end)."),
    ("guidance_scale", float, "Teacher CFG scale inside the targets (1 = off; needs a null class or empty prompt)."),
    ("curriculum", bool, "Train the noisiest intervals first, all of them after --curriculum_fraction of the run."),
    (
        "curriculum_fraction",
        positive_float,
        "Fraction of --max_train_steps the curriculum takes to open every interval (a resume with another "
        "--max_train_steps moves it).",
    ),
)


def build_parser():
    from onestep.presets.boot import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import run_parser

    p = run_parser(__doc__, PRESETS, DEFAULT_PRESET)
    g = p.add_argument_group("BOOT (shared/methods/boot.md)")
    for name, kind, text in BOOT_FLAGS:
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        g.add_argument(f"--{name}", help=text, **how)
    return p


def main(argv=None):
    from onestep.lora import DMD2_LORA_TARGETS
    from onestep.methods.boot import BOOT, BOOTConfig
    from onestep.presets.boot import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import add_lora_to, parse_run, prepare, train

    config, preset = parse_run(build_parser(), argv, PRESETS, DEFAULT_PRESET, BOOTConfig)
    setup = prepare(config, preset, "BOOT", needs_real_data=False)
    method = BOOT(
        setup.teacher.denoiser,
        config.method,
        sample_shape=setup.sample_shape,
        cond_sampler=setup.cond_sampler,
        uncond=setup.uncond,
        decode=setup.decode,
        export_info=setup.export_info,
        max_train_steps=config.trainer.max_train_steps,
    )
    lora = add_lora_to(method.student.denoiser.net, setup, DMD2_LORA_TARGETS)
    if lora:
        method.export_info["lora"] = lora
    return train(setup, method)


if __name__ == "__main__":
    run_main(main)
