"""The shared run setup: which teacher kind a UNet is, and the super-resolution data it builds."""

import pytest
import torch

from onestep.config import DataConfig, RunConfig, TeacherConfig
from onestep.errors import UserError
from onestep.methods.dmd2 import DMD2Config
from onestep.run_setup import prepare, teacher_kind
from onestep.trainer import TrainerConfig


def test_teacher_kinds():
    assert teacher_kind("UNet2DConditionModel", {"in_channels": 4, "out_channels": 4}) == "text"
    assert teacher_kind("UNet2DModel", {"in_channels": 3, "out_channels": 3}) == "pixel"
    assert teacher_kind("UNet2DModel", {"in_channels": 3, "out_channels": 6}) == "pixel"  # ADM's learned sigma
    assert teacher_kind("UNet2DModel", {"in_channels": 6, "out_channels": 3}) == "sr"  # [x_t, upsampled LR]


@pytest.fixture
def sr_teacher(tmp_path):
    from onestep.export import save_teacher
    from tests.helpers import sd_scheduler_config, tiny_unet

    unet = tiny_unet(channels=1, in_channels=2)  # reads [x_t, u]
    return save_teacher(unet, sd_scheduler_config(), str(tmp_path / "sr-teacher"), {"note": "test"}) or str(
        tmp_path / "sr-teacher"
    )


def _config(tmp_path, teacher, data_dir=None):
    return RunConfig(
        method=DMD2Config(train_batch_size=3),
        trainer=TrainerConfig(output_dir=str(tmp_path / "out")),
        teacher=TeacherConfig(pretrained_model_name_or_path=teacher, upscale_factor=4),
        data=DataConfig(train_data_dir=data_dir, dataloader_num_workers=0),
    )


def test_super_resolution_teacher_gets_hr_images_with_their_upsampled_lr(tmp_path, sr_teacher):
    from PIL import Image

    from onestep.data import degrade, upsample

    folder = tmp_path / "hr"
    folder.mkdir()
    for i in range(4):
        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(folder / f"{i}.png")
    setup = prepare(
        _config(tmp_path, sr_teacher, str(folder)), "test", "an SR method", needs_real_data=True, kinds=("sr",)
    )
    context = setup.context
    assert context.kind == "sr" and context.sample_shape == (1, 8, 8) and context.cond_sampler is None
    batch = setup.data.batch(0, 0, 0, torch.device("cpu"))
    assert batch.images.shape == (3, 1, 8, 8) and batch.cond.image.shape == (3, 1, 8, 8)
    assert torch.equal(batch.cond.image, upsample(degrade(batch.images, 4), 4))
    assert degrade(batch.images, 4).shape == (3, 1, 2, 2)
    # The teacher reads [x_t, u]: one forward through the Denoiser with the batch's condition.
    out = context.denoiser(batch.images, torch.tensor([10, 500, 900]), batch.cond)
    assert out.shape == (3, 1, 8, 8)


def test_a_method_refuses_a_teacher_kind_it_does_not_distil(tmp_path, sr_teacher):
    with pytest.raises(UserError, match="super-resolution.*DMD2 distils"):
        prepare(_config(tmp_path, sr_teacher), "test", "DMD2", needs_real_data=False)
    with pytest.raises(UserError, match="--train_data_dir"):
        prepare(_config(tmp_path, sr_teacher), "test", "an SR method", needs_real_data=True, kinds=("sr",))
    assert not (tmp_path / "out").exists()  # refused before anything was written
