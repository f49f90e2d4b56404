"""Train a small diffusion teacher (the bundled digits teacher is made with this script).

    accelerate launch train/teacher.py --output_dir outputs/digits-teacher
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import add_trainer_args, run_main, trainer_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_data_dir", default=None, help="Image folder (sub-folders = classes); default: scikit-learn digits.")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--channels", type=int, default=None, help="Image channels (default 1 for digits, 3 otherwise).")
    p.add_argument("--block_out_channels", default="32,64,64")
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--cond_dropout", type=float, default=0.1, help="Null-class probability, for classifier-free guidance.")
    p.add_argument("--beta_schedule", choices=["scaled_linear", "linear", "squaredcos_cap_v2"], default="scaled_linear")
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction", "sample"], default="epsilon")
    add_trainer_args(p, output_dir="outputs/digits-teacher")
    return p.parse_args(argv)


def main(argv=None):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from onestep.data import DatasetBatches, ImageFolder, TensorBatches, load_digits_images
    from onestep.denoiser import Denoiser
    from onestep.errors import UserError
    from onestep.methods.denoising import DenoisingConfig, DiffusionTraining
    from onestep.schedules import schedule_from_scheduler_config
    from onestep.trainer import Trainer

    args = parse_args(argv)
    defaults = {"max_train_steps": 3000, "ema_decay": 0.999, "lr_warmup_steps": 100, "max_grad_norm": 1.0,
                "mixed_precision": "no", "validation_steps": 1000}
    trainer = Trainer(trainer_config(args, defaults, {"script": "train/teacher.py", **vars(args)}))
    if args.train_data_dir:
        ds = ImageFolder(args.train_data_dir, args.resolution, channels=args.channels or 3, class_folders=True)
        num_classes = len(ds.class_names)
        channels = ds.channels
        data = DatasetBatches(ds, args.train_batch_size, seed=args.seed, num_workers=2)
    else:
        images, labels = load_digits_images(args.resolution)
        num_classes, channels = 10, 1
        data = TensorBatches(images, labels, args.train_batch_size, seed=args.seed)
    try:
        channels_list = tuple(int(c) for c in args.block_out_channels.split(","))
    except ValueError:
        raise UserError(f"--block_out_channels must be comma-separated integers, got {args.block_out_channels!r}.") from None
    unet = UNet2DModel(
        sample_size=args.resolution, in_channels=channels, out_channels=channels,
        block_out_channels=channels_list, layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(channels_list), up_block_types=("UpBlock2D",) * len(channels_list),
        num_class_embeds=num_classes + 1,  # the last embedding is the null class for CFG
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule=args.beta_schedule, prediction_type=args.prediction_type, clip_sample=False)
    spec = schedule_from_scheduler_config(dict(scheduler.config, _class_name="DDPMScheduler"))
    denoiser = Denoiser(unet, spec.schedule, spec.prediction_type)
    method = DiffusionTraining(
        denoiser, DenoisingConfig(learning_rate=args.learning_rate, cond_dropout=args.cond_dropout, null_class=num_classes),
        sample_shape=(channels, args.resolution, args.resolution),
        scheduler_config=dict(scheduler.config, _class_name="DDPMScheduler"), num_classes=num_classes,
    )
    from onestep.eval.intraining import build_evaluator_from_args
    # In-training FID scores the teacher's 50-step DDIM samples (sample_grid), against the digits by default.
    evaluator = build_evaluator_from_args(args, "digits" if not args.train_data_dir else args.output_dir, trainer.device) if trainer.is_main else None
    result = trainer.fit(method, data, evaluator)
    if not result["interrupted"]:
        trainer.log(f"Teacher written to {os.path.abspath(args.output_dir)} (unet/, scheduler/), samples in {args.output_dir}/samples")
    return result


if __name__ == "__main__":
    run_main(main)
