"""Training a small diffusion teacher from scratch (train/teacher.py): the bundled digits teacher's recipe."""

from __future__ import annotations

from dataclasses import replace

from ..config import Preset, RunConfig, TeacherConfig, TrainerConfig
from ..flags import DATA, EVALUATION, LOOP, OPTIMISATION
from ..methods.denoising import DenoisingConfig, DiffusionTraining
from ..stages import Builder, MethodEntry, StageRun

DEFAULT_PRESET = "digits-teacher"

PRESETS = {
    DEFAULT_PRESET: Preset(
        DEFAULT_PRESET,
        "The bundled digits teacher: 16x16, 3,000 steps at batch 64.",
        RunConfig(
            method=DenoisingConfig(),
            trainer=TrainerConfig(
                output_dir="outputs/digits-teacher",
                max_train_steps=3000,
                ema_decay=0.999,
                lr_warmup_steps=100,
                max_grad_norm=1.0,
                mixed_precision="no",
                validation_steps=1000,
            ),
            teacher=TeacherConfig(resolution=16),
        ),
    )
}


def _teacher(run: StageRun):
    """A class-conditional UNet2DModel (the last class embedding is the null class, for CFG) on --train_data_dir
    (sub-folders are the classes) or scikit-learn's digits, with DDPM's scaled-linear schedule."""
    from diffusers import DDPMScheduler, UNet2DModel

    from ..config import resolved_record
    from ..context import ONE_STEP, ExportTarget, TeacherContext
    from ..data import ImageFolder
    from ..denoiser import Denoiser
    from ..errors import UserError
    from ..run_setup import Setup, real_pixel_data
    from ..schedules import schedule_from_scheduler_config
    from ..trainer import Trainer

    config = run.config
    mc, data_dir, resolution = config.method, config.data.train_data_dir, config.teacher.resolution
    record = resolved_record(config, run.preset, run.entry.name, run.entry.key)
    trainer = Trainer(replace(config.trainer, run_config={"script": "train/teacher.py"}, resolved_config=record))
    channels = mc.channels or (3 if data_dir else 1)
    num_classes = (
        len(ImageFolder(data_dir, resolution, verify=False, class_folders=True).class_names) if data_dir else 10
    )
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
    denoiser = Denoiser(unet, spec.schedule, spec.prediction_type)
    shape = (channels, resolution, resolution)
    method = DiffusionTraining(denoiser, mc, shape, scheduler_config, num_classes=num_classes, null_class=num_classes)
    context = TeacherContext(
        denoiser,
        shape,
        source=data_dir or "digits",  # what it learns from: the in-training FID's reference
        kind="pixel",
        num_classes=num_classes,
        export=ExportTarget(ONE_STEP, scheduler_config, num_classes=num_classes),
    )
    return method, Setup(config, run.preset, context, trainer, data)


ENTRY = MethodEntry(
    name="diffusion teacher",
    key="teacher",
    config_class=DenoisingConfig,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    builders={"distill": Builder(_teacher, loads_teacher=False)},
    run_groups=(DATA, OPTIMISATION, LOOP, EVALUATION),
    run_flags=("resolution",),
    description="""Train a small diffusion teacher from scratch (the bundled digits teacher was made so):

    accelerate launch train/teacher.py --output_dir outputs/digits-teacher

docs/bundled-teachers.md says how the bundled teacher was made.""",
)
