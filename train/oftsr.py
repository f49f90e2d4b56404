"""OFTSR (Zhu et al. 2024): a one-step x4 super-resolution student whose time input t in [0, 1] is a fidelity-realism
knob, distilled from a noise-augmented conditional rectified flow teacher (stage 2), or that teacher itself
(`--stage teacher`, stage 1: what produced the bundled flow teacher).

With no arguments it distils the bundled flow teacher on the CPU into outputs/oftsr:

    accelerate launch train/oftsr.py
    accelerate launch train/oftsr.py --stage teacher          # stage 1, preset teacher-cpu (outputs/sr-flow-teacher)

Data: the bundled photographs, --train_data_dir (HR images; LR by bicubic x4 degradation), or paired
--hr_dir/--lr_dir; random crops of --resolution. Every option left out comes from --preset or --config.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import non_negative_float, positive_float, positive_int, run_main  # noqa: E402

OFTSR_FLAGS = (
    ("stage", str, "distill (stage 2) or teacher (stage 1: train the conditional flow teacher)."),
    ("dt", positive_float, "The trajectory step between the student's two times."),
    ("t_min", non_negative_float, "Lowest t drawn."),
    ("t_max", non_negative_float, "Highest t drawn."),
    ("clamp_s", bool, "s = min(t + dt, t_max) (--no-clamp_s: the paper's s = t + dt)."),
    ("solver", str, "The teacher step: euler, midpoint, heun or ralston."),
    ("align_weight", non_negative_float, "lambda_align."),
    ("bc_weight", non_negative_float, "lambda_BC."),
    ("align_target", str, "v_bar (the RK2 velocity) or instant (v_theta(x_t, t), the paper)."),
    ("bc_time", str, "Boundary at zero (the paper) or t_min (the released trainer)."),
    ("default_t", non_negative_float, "The exported pipeline's t when none is given (1 = realism)."),
    ("output_scale", positive_float, "x = x0 + scale * v (1; the released sampler uses 1 - 1e-3)."),
    ("sigma_p", positive_float, "Stage 1: the start state's noise sigma_p (stage 2 reads the teacher's)."),
    ("flow_loss", str, "Stage 1: l1 or l2."),
    ("flow_t_min", non_negative_float, "Stage 1: t ~ U[this, 1]."),
    ("block_out_channels", str, "Stage 1: the UNet's channel widths, comma-separated."),
    ("layers_per_block", positive_int, "Stage 1: ResNet layers per UNet level."),
    ("teacher_sample_steps", positive_int, "Euler steps of the flow teacher in grids and its pipeline's default."),
)


def build_parser():
    from onestep.presets.oftsr import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import run_parser
    from train.tadsr import add_flags

    p = run_parser(__doc__, PRESETS, DEFAULT_PRESET)
    add_flags(p, "OFTSR (shared/methods/oftsr.md)", OFTSR_FLAGS)
    return p


def main(argv=None):
    import torch

    from onestep.errors import UserError
    from onestep.methods.oftsr import OFTSR, OFTSRConfig
    from onestep.presets.oftsr import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import parse_run, prepare, train

    argv = sys.argv[1:] if argv is None else list(argv)
    # --stage teacher without --preset/--config starts from the stage-1 recipe (what made the bundled teacher).
    default = "teacher-cpu" if build_parser().parse_args(argv).stage == "teacher" else DEFAULT_PRESET
    config, preset = parse_run(build_parser(), argv, PRESETS, default, OFTSRConfig)
    if config.method.stage not in ("distill", "teacher"):
        raise UserError(f"--stage must be distill or teacher, got {config.method.stage!r}.")
    if config.method.stage == "teacher":
        from train.sr_teacher import teacher_run

        if any(a.split("=")[0] == "--pretrained_model_name_or_path" for a in argv):
            raise UserError(
                "--stage teacher trains the flow teacher from scratch (the paper's setting); starting it from "
                "pretrained weights is not implemented, so drop --pretrained_model_name_or_path."
            )

        return teacher_run(config, preset, "OFTSR stage 1 (conditional flow teacher)", flow_teacher)
    own_flow = (
        "OFTSR distils its own conditional flow teacher (train/oftsr.py --stage teacher), not a diffusers latent SR "
        "teacher; distil LDM-SR and SD x4 upscaler teachers with train/tadsr.py."
    )
    setup = prepare(config, preset, "OFTSR", needs_real_data=True, kinds=("sr",), refusals={"latent_sr": own_flow})
    method = OFTSR(
        setup.teacher.denoiser,
        config.method,
        setup.sample_shape,
        export_info=setup.export_info,
        preview=setup.data.batch(-1, 0, 0, torch.device("cpu")),
    )
    return train(
        setup, method, product="student pipeline  {out} (model_index.json, unet/, super_resolution.py, README.md)"
    )


def flow_teacher(config, unet, data, export_info, preview):
    """Stage 1's method: the conditional flow schedule of --sigma_p around a fresh UNet."""
    from onestep.denoiser import Denoiser
    from onestep.methods.oftsr import OFTSR
    from onestep.schedules import ConditionalFlowSchedule

    denoiser = Denoiser(unet, ConditionalFlowSchedule(config.method.sigma_p), "flow")
    return OFTSR(
        denoiser,
        config.method,
        (unet.config.out_channels,) + (unet.config.sample_size,) * 2,
        export_info,
        preview=preview,
    )


if __name__ == "__main__":
    run_main(main)
