"""DMD2 distillation (Yin et al. 2024): one-step or few-step students from a diffusers teacher.

With no arguments it distils the bundled digits teacher on the CPU (4 to 8 minutes on 2 cores):

    accelerate launch train/dmd2.py

Options follow the diffusers training examples; every option left out comes from --preset (listed at
the end) or from --config, a training_config.json an earlier run wrote.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import int_list, non_negative_float, positive_int, run_main  # noqa: E402

# DMD2's own flags (shared/methods/dmd2.md): name, type (bool: --x / --no-x), help. Defaults come from --preset.
DMD2_FLAGS = (
    ("ttur_ratio", positive_int, "Critic updates per generator update (R)."),
    ("guidance_scale", float, "Real-score CFG scale (1 = off; needs a null class or empty prompt)."),
    ("conditioning_timesteps", int_list, "Comma-separated, descending: 999 or 999,749,499,249."),
    ("gan", bool, "GAN head on the critic (--no-gan: DM only)."),
    ("gan_generator_weight", float, "Weight of the generator's GAN loss next to the DM loss."),
    ("gan_discriminator_weight", float, "Weight of the discriminator loss next to the critic's denoising loss."),
    ("gan_feature_module", str, "Critic submodule the GAN head reads (None: the UNet's mid_block)."),
    ("gan_max_timestep", int, "D's inputs are noised at t in 0..this (None: T-1; 0: clean images)."),
    ("gan_alone", bool, "Generator trained on the GAN term only, without the DM loss."),
    ("generator_learning_rate", non_negative_float, "The generator's own learning rate (None: --learning_rate)."),
    ("critic_learning_rate", non_negative_float, "The critic's and its head's (None: --learning_rate)."),
    ("dm_t_min", int, "Lowest timestep of the distribution-matching loss's noise draw."),
    ("dm_t_max", int, "Highest timestep of the distribution-matching loss's noise draw."),
    ("stage", str, "distill (DMD2) or regression (warm start on teacher ODE pairs; then --init_from_checkpoint)."),
    ("regression_pairs", positive_int, "Regression stage: number of fixed noise/teacher-output pairs."),
    ("regression_teacher_steps", positive_int, "Regression stage: the teacher's DDIM steps per pair."),
    ("regression_loss", str, "Regression stage: lpips, mse, or auto (LPIPS where its weights load, else MSE)."),
    ("regression_pairs_dir", str, "Regression stage: where pairs are cached (None: <output_dir>/ode_pairs)."),
)


def build_parser():
    from onestep.presets.dmd2 import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import run_parser

    p = run_parser(__doc__, PRESETS, DEFAULT_PRESET)
    g = p.add_argument_group("DMD2 (shared/methods/dmd2.md)")
    for name, kind, text in DMD2_FLAGS:
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        g.add_argument(f"--{name}", help=text, **how)
    return p


def main(argv=None):
    from onestep.errors import UserError
    from onestep.lora import DMD2_LORA_TARGETS
    from onestep.methods.dmd2 import DMD2, DMD2Config
    from onestep.methods.regression import from_setup as regression_from_setup
    from onestep.presets.dmd2 import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import add_lora_to, parse_run, prepare, train

    config, preset = parse_run(build_parser(), argv, PRESETS, DEFAULT_PRESET, DMD2Config)
    if config.method.stage not in ("distill", "regression"):
        raise UserError(f"--stage must be distill or regression, got {config.method.stage!r}.")
    if config.method.stage == "regression":
        setup = prepare(config, preset, "DMD2 regression warm start", needs_real_data=False)
        return train(setup, regression_from_setup(setup))
    setup = prepare(config, preset, "DMD2", needs_real_data=config.method.gan)
    method = DMD2(
        setup.teacher.denoiser,
        config.method,
        sample_shape=setup.sample_shape,
        cond_sampler=setup.cond_sampler,
        uncond=setup.uncond,
        decode=setup.decode,
        export_info=setup.export_info,
    )
    lora = add_lora_to(method.generator.denoiser.net, setup, DMD2_LORA_TARGETS)
    if lora:
        method.export_info["lora"] = lora
    return train(setup, method)


if __name__ == "__main__":
    run_main(main)
