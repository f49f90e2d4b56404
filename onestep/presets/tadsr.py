"""Named, typed TAD-SR recipes: the published settings (shared/methods/tadsr.md section 7) and the CPU default on the
bundled pixel ResShift teacher. Batch sizes are per process.

The published teachers (ResShift's VQ-f4 latent Swin-UNet, SeeSR's SD-2 UNet + ControlNet) are not diffusers
UNet2DModel folders: their presets name the teacher in angle brackets and need --pretrained_model_name_or_path.
There is no SeeSR preset: SD + ControlNet teachers, the per-batch HSD timestep and training a module subset
(tadsr.md section 7) are not implemented.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import Preset, RunConfig, TeacherConfig
from ..methods.tadsr import TADSRConfig
from ..trainer import TrainerConfig

DEFAULT_PRESET = "sr-cpu"
OUTPUT_DIR = "outputs/tadsr"


def _preset(name, description, method: TADSRConfig, trainer: TrainerConfig, teacher: str, notes: str = ""):
    config = RunConfig(method=method, trainer=trainer, teacher=TeacherConfig(pretrained_model_name_or_path=teacher))
    return Preset(name, description, config, notes)


_CPU = _preset(
    "sr-cpu",
    "Bundled default: the pixel ResShift x4 teacher (64x64 HR crops of the bundled photographs), 2 CPU cores.",
    TADSRConfig(learning_rate=1e-4, train_batch_size=4),
    TrainerConfig(
        output_dir=OUTPUT_DIR,
        max_train_steps=300,
        mixed_precision="no",
        max_grad_norm=1.0,
        ema_decay=0.99,
        validation_steps=100,
        checkpointing_steps=150,
        eval_steps=0,
    ),
    teacher="sr-resshift",
    notes="EMA 0.99 instead of the published 0.999: at 300 iterations an EMA of 0.999 would still be 74% the "
    "teacher's copy. Clipping at 1.0 (the ResShift recipe has none) for a short CPU run.",
)

_RESSHIFT = _preset(
    "resshift-x4",
    "Real SR x4 on a ResShift teacher (15 steps, kappa 2): weights 1 / 1 / 0.02, HSD t {0,1,2}, D t {0..13}.",
    TADSRConfig(learning_rate=5e-5, train_batch_size=8, reg_weight=1.0, hsd_weight=1.0, gan_weight=0.02),
    TrainerConfig(
        output_dir=OUTPUT_DIR,
        max_train_steps=30_000,
        mixed_precision="no",
        lr_warmup_steps=5000,
        max_grad_norm=None,
        ema_decay=0.999,
        validation_steps=1000,
        checkpointing_steps=1000,
        eval_steps=0,
    ),
    teacher="<a ResShift x4 teacher as a diffusers UNet2DModel folder>",
    notes="Published: ImageNet 256 crops, Real-ESRGAN degradation (not implemented: the data here is bicubic x4).",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _CPU,
        _RESSHIFT,
        Preset(
            "resshift-faces",
            "ResShift face setting: weights 1 / 0.1 / 0.2 (D t {0..T-2}, unverified for faces).",
            replace(
                _RESSHIFT.config,
                method=replace(_RESSHIFT.config.method, hsd_weight=0.1, gan_weight=0.2, train_batch_size=7),
            ),
            "Published: 4-step ResShift face teacher, batch 7.",
        ),
    ]
}
