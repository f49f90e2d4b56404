"""Training a pixel x4 super-resolution teacher from scratch (the bundled ResShift and conditional-flow teachers
are made this way): a fresh UNet2DModel reading [x_t, u], random HR crops, and the trainer, as a stage's setup.
The method that trains it (ResShift's x0 MSE, OFTSR's stage-1 flow matching) comes from the method's recipe."""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import RunConfig, resolved_record
from .context import SUPER_RESOLUTION, ExportTarget, TeacherContext
from .denoiser import Denoiser
from .errors import UserError
from .sr_data import BUNDLED_PHOTOGRAPHS


def sr_unet(channels: int, resolution: int, block_out_channels: str, layers_per_block: int):
    """The SR teachers' UNet2DModel: [x_t, u] in (2 x channels), the prediction out."""
    from diffusers import UNet2DModel

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
    from .run_setup import check_lowest_level

    check_lowest_level(resolution, 2 ** (len(widths) - 1))
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


def prepare_sr_teacher(run, make_schedule, prediction_type: str):
    """A teacher stage's setup: (context around the fresh network, data, trainer, preview batch). The network
    and its schedule (`make_schedule()`), the crops (the bundled photographs unless a data flag is given), then
    the trainer (which seeds the run)."""
    from .run_setup import Setup, sr_training_data
    from .trainer import Trainer

    config: RunConfig = run.config
    resolution, scale, channels = config.teacher.resolution or 64, config.teacher.upscale_factor or 4, 3
    mc = config.method
    unet = sr_unet(channels, resolution, mc.block_out_channels, mc.layers_per_block)
    data = sr_training_data(config, resolution, channels, scale, bundled_images=True)
    dc = config.data
    training_data = dc.hr_dir or dc.train_data_dir or BUNDLED_PHOTOGRAPHS
    denoiser = Denoiser(unet, make_schedule(), prediction_type)
    context = TeacherContext(
        denoiser,
        (channels, resolution, resolution),
        source="trained from scratch",
        kind="sr",
        export=ExportTarget(
            SUPER_RESOLUTION, {}, upscale_factor=scale, resolution=resolution, training_data=training_data
        ),
    )
    preview = data.batch(-1, 0, 0, torch.device("cpu"))  # fixed crops for the sample grids
    record = resolved_record(config, run.preset, run.entry.name, run.entry.key)  # before the trainer writes
    trainer = Trainer(replace(config.trainer, run_config={"script": run.entry.name}, resolved_config=record))
    return Setup(config, run.preset, context, trainer, data), preview
