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

from onestep.cli import int_list, positive_int, run_main  # noqa: E402


def build_parser():
    from onestep.presets import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import run_parser

    p = run_parser(__doc__, PRESETS, DEFAULT_PRESET)
    g = p.add_argument_group("DMD2 (shared/methods/dmd2.md)")
    g.add_argument("--ttur_ratio", type=positive_int, help="Critic updates per generator update (R).")
    g.add_argument(
        "--guidance_scale", type=float, help="Real-score CFG scale (1 = off; needs a null class or empty prompt)."
    )
    g.add_argument(
        "--conditioning_timesteps", type=int_list, help="Comma-separated, descending: 999 or 999,749,499,249."
    )
    g.add_argument("--gan", action=argparse.BooleanOptionalAction, help="GAN head on the critic (--no-gan: DM only).")
    g.add_argument(
        "--gan_generator_weight", type=float, help="Weight of the generator's GAN loss next to the DM loss."
    )
    g.add_argument(
        "--gan_discriminator_weight",
        type=float,
        help="Weight of the discriminator (GAN head) loss next to the critic's denoising loss.",
    )
    g.add_argument("--dm_t_min", type=int, help="Lowest timestep of the distribution-matching loss's noise draw.")
    g.add_argument("--dm_t_max", type=int, help="Highest timestep of the distribution-matching loss's noise draw.")
    return p


def main(argv=None):
    from onestep.lora import DMD2_LORA_TARGETS
    from onestep.methods.dmd2 import DMD2, DMD2Config
    from onestep.presets import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import add_lora_to, parse_run, prepare, train

    config, preset = parse_run(build_parser(), argv, PRESETS, DEFAULT_PRESET, DMD2Config)
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
