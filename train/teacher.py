"""Train a small diffusion teacher (the bundled digits teacher is made with this script).

accelerate launch train/teacher.py --output_dir outputs/digits-teacher
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import positive_int, run_main  # noqa: E402


def presets():
    from onestep.config import Preset, RunConfig, TeacherConfig
    from onestep.methods.denoising import DenoisingConfig
    from onestep.trainer import TrainerConfig

    trainer = TrainerConfig(
        output_dir="outputs/digits-teacher",
        max_train_steps=3000,
        ema_decay=0.999,
        lr_warmup_steps=100,
        max_grad_norm=1.0,
        mixed_precision="no",
        validation_steps=1000,
    )
    config = RunConfig(method=DenoisingConfig(), trainer=trainer, teacher=TeacherConfig(resolution=16))
    return {
        "digits-teacher": Preset(
            "digits-teacher", "The bundled digits teacher: 16x16, 3,000 steps at batch 64.", config
        )
    }


def build_parser():
    from onestep.run_setup import run_parser

    p = run_parser(
        __doc__,
        presets(),
        "digits-teacher",
        groups=("data", "optimisation", "training loop", "in-training evaluation"),
    )
    g = p.add_argument_group("teacher network")
    g.add_argument("--resolution", type=positive_int, help="Image size.")
    g.add_argument("--channels", type=positive_int, help="Image channels (None: 1 for digits, 3 for an image folder).")
    g.add_argument("--block_out_channels", help="The UNet's channel widths, comma-separated.")
    g.add_argument("--cond_dropout", type=float, help="Null-class probability, for classifier-free guidance.")
    g.add_argument("--beta_schedule", choices=["scaled_linear", "linear", "squaredcos_cap_v2"], help="Noise schedule.")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction", "sample"], help="What the UNet predicts.")
    return p


def main(argv=None):
    from dataclasses import replace

    from diffusers import DDPMScheduler, UNet2DModel

    from onestep.config import TeacherConfig, resolved_record
    from onestep.data import ImageFolder
    from onestep.denoiser import Denoiser
    from onestep.errors import UserError
    from onestep.eval.intraining import InTrainingEvalOptions, build_evaluator
    from onestep.methods.denoising import DenoisingConfig, DiffusionTraining
    from onestep.run_setup import parse_run, real_pixel_data
    from onestep.schedules import schedule_from_scheduler_config
    from onestep.trainer import Trainer

    config, preset = parse_run(build_parser(), argv, presets(), "digits-teacher", DenoisingConfig)
    mc, data_dir, resolution = config.method, config.data.train_data_dir, config.teacher.resolution
    record = resolved_record(config, preset, "diffusion teacher")
    trainer = Trainer(replace(config.trainer, run_config={"script": "train/teacher.py"}, resolved_config=record))
    channels = mc.channels or (3 if data_dir else 1)
    num_classes = (
        len(ImageFolder(data_dir, resolution, verify=False, class_folders=True).class_names) if data_dir else 10
    )
    # Real images: --train_data_dir (sub-folders are the classes), else scikit-learn's digits.
    data = real_pixel_data(replace(config, teacher=TeacherConfig("digits")), resolution, channels, num_classes)
    try:
        widths = tuple(int(c) for c in mc.block_out_channels.split(","))
    except ValueError:
        raise UserError(
            f"--block_out_channels must be comma-separated integers, got {mc.block_out_channels!r}."
        ) from None
    unet = UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(widths),
        up_block_types=("UpBlock2D",) * len(widths),
        num_class_embeds=num_classes + 1,  # the last embedding is the null class for CFG
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=mc.beta_schedule,
        prediction_type=mc.prediction_type,
        clip_sample=False,
    )
    scheduler_config = dict(scheduler.config, _class_name="DDPMScheduler")
    spec = schedule_from_scheduler_config(scheduler_config)
    method = DiffusionTraining(
        Denoiser(unet, spec.schedule, spec.prediction_type),
        mc,
        (channels, resolution, resolution),
        scheduler_config,
        num_classes=num_classes,
        null_class=num_classes,
    )
    evaluator = None
    if config.trainer.eval_steps and trainer.is_main:  # scores the teacher's 50-step DDIM samples against the data
        ec = config.evaluation
        options = InTrainingEvalOptions(ec.eval_samples, ec.eval_features, ec.eval_reference, ec.inception_weights)
        evaluator = build_evaluator(
            options, "digits" if not data_dir else config.trainer.output_dir, config.trainer.seed, trainer.device
        )
    result = trainer.fit(method, data, evaluator)
    if not result["interrupted"]:
        out = config.trainer.output_dir
        trainer.log(f"Teacher written to {os.path.abspath(out)} (unet/, scheduler/), samples in {out}/samples")
    return result


if __name__ == "__main__":
    run_main(main)
