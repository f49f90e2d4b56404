"""Train the ResShift-style pixel x4 super-resolution teacher TAD-SR distils (tadsr.md section 3: T = 15, kappa = 2,
the sqrt(eta) schedule with p = 0.3): an x0-predicting UNet reading [x_t, u], trained with the x0 MSE on random
64x64 HR crops of the bundled photographs (or --train_data_dir, --hr_dir/--lr_dir).

    accelerate launch train/sr_teacher.py                      # outputs/sr-resshift-teacher
    cp -r outputs/sr-resshift-teacher onestep/assets/sr-resshift-teacher   # then train/tadsr.py finds it

The output folder is a teacher folder (unet/, onestep.json with the schedule) and a SuperResolutionPipeline.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import positive_float, positive_int, run_main  # noqa: E402

RESSHIFT_FLAGS = (
    ("resolution", positive_int, "HR crop size (the teacher's training size and the pipelines' tile)."),
    ("upscale_factor", positive_int, "HR size / LR size."),
    ("block_out_channels", str, "The UNet's channel widths, comma-separated."),
    ("layers_per_block", positive_int, "ResNet layers per UNet level."),
    ("num_timesteps", positive_int, "T, the schedule's steps."),
    ("kappa", positive_float, "kappa: the noise scale, c_t = kappa sqrt(eta_t)."),
    ("min_noise", positive_float, "m of sqrt(eta_1) = min(m / kappa, m, sqrt(0.001))."),
    ("eta_end", positive_float, "sqrt(eta_T)."),
    ("power", positive_float, "p, the schedule's shape."),
    ("scale_input", bool, "Feed x_t / sqrt(kappa^2 eta_t + 1) (ResShift's latent scaling)."),
)


def presets():
    from onestep.config import Preset, RunConfig, TeacherConfig
    from onestep.methods.tadsr import ResShiftTeacherConfig
    from onestep.trainer import TrainerConfig

    trainer = TrainerConfig(
        output_dir="outputs/sr-resshift-teacher",
        max_train_steps=2000,
        ema_decay=0.999,
        ema_warmup=True,  # without it, 0.999 over 2,000 steps keeps 13.5% of the random initial weights
        lr_warmup_steps=200,
        max_grad_norm=1.0,
        mixed_precision="no",
        validation_steps=500,
        checkpointing_steps=500,
    )
    config = RunConfig(method=ResShiftTeacherConfig(), trainer=trainer, teacher=TeacherConfig(resolution=64))
    return {
        "sr-resshift-teacher": Preset(
            "sr-resshift-teacher", "The bundled ResShift x4 teacher: 64x64 crops, batch 16, 2,000 steps.", config
        )
    }


def build_parser():
    from onestep.run_setup import run_parser
    from train.tadsr import add_flags

    p = run_parser(__doc__, presets(), "sr-resshift-teacher", groups=("data", "optimisation", "training loop"))
    add_flags(p, "teacher network and schedule", RESSHIFT_FLAGS)
    return p


def sr_unet(channels: int, resolution: int, block_out_channels: str, layers_per_block: int):
    """The SR teachers' UNet2DModel: [x_t, u] in (2 x channels), the prediction out."""
    from diffusers import UNet2DModel

    from onestep.errors import UserError

    try:
        widths = tuple(int(c) for c in block_out_channels.split(","))
    except ValueError:
        raise UserError(
            f"--block_out_channels must be comma-separated integers, got {block_out_channels!r}."
        ) from None
    if resolution % 2 ** (len(widths) - 1):
        raise UserError(
            f"--resolution {resolution} is not divisible by {2 ** (len(widths) - 1)}, the UNet's downsampling."
        )
    return UNet2DModel(
        sample_size=resolution,
        in_channels=2 * channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        norm_num_groups=8,
    )


def teacher_run(config, preset: str, method_name: str, build_method):
    """What both SR teacher scripts share: data, a fresh UNet, the trainer; `build_method(config, unet, data,
    export_info, preview)` makes the method."""
    from dataclasses import replace

    import torch

    from onestep.config import resolved_record
    from onestep.run_setup import sr_training_data
    from onestep.trainer import Trainer

    resolution, scale, channels = config.teacher.resolution or 64, config.teacher.upscale_factor or 4, 3
    mc = config.method
    unet = sr_unet(channels, resolution, mc.block_out_channels, mc.layers_per_block)
    data = sr_training_data(config, resolution, channels, scale, bundled_images=True)
    info = {"upscale_factor": scale, "resolution": resolution}
    method = build_method(config, unet, data, info, data.batch(-1, 0, 0, torch.device("cpu")))  # refuses bad flags
    record = resolved_record(config, preset, method_name)  # before the trainer writes anything
    trainer = Trainer(replace(config.trainer, run_config={"script": method_name}, resolved_config=record))
    result = trainer.fit(method, data)
    if not result["interrupted"]:
        out = os.path.abspath(config.trainer.output_dir)
        trainer.log(
            f"Teacher written to {out} (unet/, onestep.json; also a SuperResolutionPipeline), samples in {out}/samples"
        )
    return result


def resshift_teacher(config, unet, data, export_info, preview):
    from onestep.denoiser import Denoiser
    from onestep.methods.tadsr import ResShiftTeacherTraining
    from onestep.schedules import ResShiftSchedule

    mc = config.method
    schedule = ResShiftSchedule(mc.num_timesteps, mc.kappa, mc.min_noise, mc.eta_end, mc.power, mc.scale_input)
    shape = (unet.config.out_channels,) + (unet.config.sample_size,) * 2
    return ResShiftTeacherTraining(Denoiser(unet, schedule, "sample"), mc, shape, export_info, preview=preview)


def main(argv=None):
    from onestep.methods.tadsr import ResShiftTeacherConfig
    from onestep.run_setup import parse_run

    config, preset = parse_run(build_parser(), argv, presets(), "sr-resshift-teacher", ResShiftTeacherConfig)
    return teacher_run(config, preset, "ResShift SR teacher", resshift_teacher)


if __name__ == "__main__":
    run_main(main)
