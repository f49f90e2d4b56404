"""Named, typed OFTSR recipes (shared/methods/oftsr.md section 7): stage 1 (the conditional flow teacher) and stage 2
(distillation), the published settings and the CPU defaults on the bundled photographs. Batch sizes are per process."""

from __future__ import annotations

from dataclasses import replace

from ..config import Preset, RunConfig, TeacherConfig
from ..methods.oftsr import OFTSRConfig
from ..trainer import TrainerConfig

DEFAULT_PRESET = "sr-cpu"
OUTPUT_DIR = "outputs/oftsr"
TEACHER_OUTPUT_DIR = "outputs/sr-flow-teacher"


def _preset(name, description, method: OFTSRConfig, trainer: TrainerConfig, teacher: str, notes: str = ""):
    config = RunConfig(
        method=method, trainer=trainer, teacher=TeacherConfig(pretrained_model_name_or_path=teacher, resolution=None)
    )
    return Preset(name, description, config, notes)


_CPU = _preset(
    "sr-cpu",
    "Bundled default: distil the bundled x4 flow teacher (sigma_p 0.2, 64x64 HR crops of the bundled photographs).",
    OFTSRConfig(learning_rate=1e-4, train_batch_size=4),
    TrainerConfig(
        output_dir=OUTPUT_DIR,
        max_train_steps=400,
        mixed_precision="no",
        max_grad_norm=1.0,
        ema_decay=0.99,
        ema_warmup=True,
        validation_steps=100,
        checkpointing_steps=200,
        eval_steps=0,
    ),
    teacher="sr-flow",
    notes="EMA 0.99 instead of the published 0.9999 (a 400-iteration run).",
)

_DIV2K = _preset(
    "div2k-x4",
    "DIV2K x4 distillation: dt 0.05, midpoint, align 0.01, BC 0.1, lr 1e-4, 20k iterations at batch 8.",
    OFTSRConfig(learning_rate=1e-4, train_batch_size=8),
    TrainerConfig(
        output_dir=OUTPUT_DIR,
        max_train_steps=20_000,
        mixed_precision="no",
        lr_warmup_steps=1000,
        max_grad_norm=1.0,
        ema_decay=0.9999,
        ema_warmup=True,  # spec 2: min(decay, (1 + n) / (10 + n))
        validation_steps=1000,
        checkpointing_steps=1000,
        eval_steps=0,
    ),
    teacher="<your OFTSR stage-1 teacher (train/oftsr.py --stage teacher --preset teacher-div2k)>",
    notes="Paper lr 1e-4; configs and checkpoint names also show 1e-5 and 2e-5. ImageNet: 50k iterations.",
)

_TEACHER_CPU = _preset(
    "teacher-cpu",
    "Stage 1 on the CPU: the bundled x4 flow teacher (64x64 crops of the bundled photographs, l1, sigma_p 0.2).",
    OFTSRConfig(stage="teacher", learning_rate=2e-4, train_batch_size=16, sigma_p=0.2),
    TrainerConfig(
        output_dir=TEACHER_OUTPUT_DIR,
        max_train_steps=2000,
        mixed_precision="no",
        lr_warmup_steps=200,
        max_grad_norm=1.0,
        ema_decay=0.999,
        ema_warmup=True,
        validation_steps=500,
        checkpointing_steps=500,
        eval_steps=0,
    ),
    teacher="sr-flow",
    notes="What made onestep/assets/sr-flow-teacher (copy the output folder there). lr 2e-4 and EMA 0.999 (with "
    "warm-up) instead of spec 5's 1e-4 and 0.9999: a 2,000-iteration run.",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _CPU,
        _DIV2K,
        Preset(
            "imagenet-x4",
            "ImageNet 256 x4 distillation: as div2k-x4 with 50k iterations.",
            replace(_DIV2K.config, trainer=replace(_DIV2K.config.trainer, max_train_steps=50_000)),
        ),
        _TEACHER_CPU,
        Preset(
            "teacher-div2k",
            "Stage 1 as published: l1, lr 1e-4, 1k warm-up, EMA 0.9999, clipping 1.0, 100k iterations at batch 32.",
            replace(
                _TEACHER_CPU.config,
                method=replace(_TEACHER_CPU.config.method, learning_rate=1e-4, train_batch_size=32),
                trainer=replace(
                    _TEACHER_CPU.config.trainer,
                    max_train_steps=100_000,
                    lr_warmup_steps=1000,
                    ema_decay=0.9999,
                    output_dir="outputs/oftsr-teacher",
                ),
                teacher=replace(_TEACHER_CPU.config.teacher, resolution=256),
            ),
            "Published architecture: the DPS FFHQ ADM UNet (128 ch); --block_out_channels sizes this UNet2DModel.",
        ),
    ]
}
