"""TAD-SR distillation (He et al. 2024): a one-step x4 super-resolution student from an SR diffusion teacher that
reads the upsampled low-resolution image on its input channels.

With no arguments it distils the bundled pixel ResShift teacher on the CPU into outputs/tadsr:

    accelerate launch train/tadsr.py

Data: the bundled photographs (bundled teacher), --train_data_dir (HR images; LR by bicubic x4 degradation), or
paired --hr_dir/--lr_dir; random crops of --resolution. Every option left out comes from --preset (listed at the
end) or from --config, a training_config.json an earlier run wrote.

diffusers' latent SR teachers work too (onestep/latent_sr.py): an LDMSuperResolutionPipeline folder or a
StableDiffusionUpscalePipeline folder (--noise_level, --prompt_file), with --train_data_dir (their teacher's DDIM
runs 50 steps per iteration unless --teacher_steps says otherwise):

    accelerate launch train/tadsr.py --pretrained_model_name_or_path ./ldm-super-resolution-4x-openimages \
        --train_data_dir ./hr_images --resolution 256 --teacher_steps 50
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import int_list, non_negative_float, non_negative_int, positive_float, positive_int, run_main  # noqa: E402

# TAD-SR's own flags (shared/methods/tadsr.md): name, type (bool: --x / --no-x), help. Defaults come from --preset.
TADSR_FLAGS = (
    ("reg_weight", non_negative_float, "lambda_reg: regression onto the teacher's multi-step output."),
    ("hsd_weight", non_negative_float, "lambda_HSD: high-frequency score distillation."),
    ("gan_weight", non_negative_float, "lambda_GAN: the time-aware GAN's generator term."),
    ("reg_target", str, "teacher (its multi-step output from the same x_T) or gt (the HR image)."),
    ("score_loss", str, "hsd, sds (vanilla score distillation, the ablation) or none."),
    ("hsd_reference", str, "z_ref of HSD: teacher (default) or gt (the ablation 'SDS+HR')."),
    ("hsd_timesteps", int_list, "HSD's small-noise set, comma-separated (None: 0,1,2 for ResShift, else lowest 20%)."),
    ("hsd_uniform", bool, "HSD over all steps but the last instead."),
    ("gan", bool, "The time-aware discriminator (--no-gan: regression and HSD only)."),
    ("disc_timesteps", int_list, "D's noise levels, comma-separated (None: 0..T-2)."),
    ("time_aware", bool, "FiLM(t) in the discriminator heads (--no-time_aware: time-agnostic heads)."),
    ("disc_embed_dim", positive_int, "Width E of the heads' time embedding (ResShift 160, SeeSR 320)."),
    ("disc_logit_channels", positive_int, "Logits per token of each head (c_dim)."),
    ("disc_residual_scale", positive_float, "The heads' residual (x + f(x)) * this (1/sqrt 2, unverified)."),
    ("disc_feature_modules", str, "Teacher submodules D reads, comma-separated (None: each level's last map + mid)."),
    ("start", str, "x_T: lr ((a_T + b_T) u + c_T eps) or noise (c_T eps)."),
    ("student_timestep", int, "T*, the student's time input (None: the teacher's last step)."),
    ("teacher_steps", positive_int, "Steps of the teacher's DDIM sampler (None: all of them; 50 for latent SR)."),
    ("noise_level", non_negative_int, "x4 upscaler teachers: the low-resolution image's noise level (class label)."),
)


def add_flags(parser, title, flags):
    g = parser.add_argument_group(title)
    for name, kind, text in flags:
        how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        g.add_argument(f"--{name}", help=text, **how)


def build_parser():
    from onestep.presets.tadsr import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import run_parser

    p = run_parser(__doc__, PRESETS, DEFAULT_PRESET)
    add_flags(p, "TAD-SR (shared/methods/tadsr.md)", TADSR_FLAGS)
    return p


def main(argv=None):
    import torch

    from onestep.methods.tadsr import TADSR, TADSRConfig
    from onestep.presets.tadsr import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import parse_run, prepare, train

    config, preset = parse_run(build_parser(), argv, PRESETS, DEFAULT_PRESET, TADSRConfig)
    setup = prepare(config, preset, "TAD-SR", needs_real_data=True, kinds=("sr", "latent_sr"))
    method = TADSR(
        setup.teacher.denoiser,
        config.method,
        setup.sample_shape,
        export_info=setup.export_info,
        preview=setup.data.batch(-1, 0, 0, torch.device("cpu")),  # fixed crops for the sample grids
        decode=setup.decode,  # latent SR teachers: latents -> pixels for the grids
    )
    pipeline_file = "latent_super_resolution.py" if setup.kind == "latent_sr" else "super_resolution.py"
    return train(
        setup, method, product=f"student pipeline  {{out}} (model_index.json, unet/, {pipeline_file}, README.md)"
    )


if __name__ == "__main__":
    run_main(main)
