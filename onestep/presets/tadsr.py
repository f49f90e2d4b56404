"""TAD-SR's recipes (the published settings, docs/methods/tadsr.md, and the CPU default on the bundled pixel ResShift
teacher), and the recipe of that teacher itself (train/sr_teacher.py). Batch sizes are per process.

The published teachers (ResShift's VQ-f4 latent Swin-UNet, SeeSR's SD-2 UNet + ControlNet) are not diffusers
UNet2DModel folders: their presets name the teacher in angle brackets and need --pretrained_model_name_or_path.
There is no SeeSR preset: SD + ControlNet teachers, the per-batch HSD timestep and training a module subset
are not implemented.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import DataConfig, Preset, RunConfig, TeacherConfig, TrainerConfig
from ..flags import DATA, LOOP, OPTIMISATION
from ..methods.tadsr import TADSR, ResShiftTeacherConfig, ResShiftTeacherTraining, TADSRConfig
from ..stages import Builder, MethodEntry, StageRun

DEFAULT_PRESET = "sr-cpu"
OUTPUT_DIR = "outputs/tadsr"


def _preset(name, description, method: TADSRConfig, trainer: TrainerConfig, teacher: str, notes: str = "", data=None):
    config = RunConfig(
        method=method,
        trainer=trainer,
        teacher=TeacherConfig(pretrained_model_name_or_path=teacher),
        data=data or DataConfig(),
    )
    return Preset(name, description, config, notes)


_CPU = _preset(
    "sr-cpu",
    "Bundled default: the pixel ResShift x4 teacher (64x64 HR crops of the bundled photographs), 2 CPU cores.",
    TADSRConfig(learning_rate=1e-4, train_batch_size=4, disc_timesteps=[0, 1, 2], disc_learning_rate=1e-3),
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
    "teacher's copy. Clipping at 1.0 (the ResShift recipe has none) for a short CPU run. D sees only the three "
    "smallest noise levels (as HSD does) and learns at 1e-3, tuned for the bundled 15-step pixel teacher: there "
    "the perturbation at t_d >= 3 (std 0.47 to 1.82) buries the difference between a sharp and a blurry crop, and "
    "with all levels at G's 1e-4 D stayed at chance through a whole run. With another teacher pass "
    "--disc_timesteps (or use a published preset).",
    data=DataConfig(augmentation="full"),
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


def _distill(run: StageRun):
    setup = run.prepare(needs_real_data=True)
    preview = setup.data.batch(-1, 0, 0, torch.device("cpu"))  # fixed crops for the sample grids
    return TADSR(setup.context, run.config.method, preview=preview), setup


ENTRY = MethodEntry(
    name="TAD-SR",
    key="tadsr",
    config_class=TADSRConfig,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    builders={"distill": Builder(_distill, needs_real_data=lambda config: True)},
    kinds=("sr", "latent_sr"),
    description="""TAD-SR distillation (He et al. 2024): a one-step x4 super-resolution student from an SR diffusion
teacher that reads the upsampled low-resolution image on its input channels.

With no arguments it distils the bundled pixel ResShift teacher on the CPU into outputs/tadsr:

    accelerate launch train/tadsr.py

Data: the bundled photographs (bundled teacher), --train_data_dir (HR images; LR by bicubic x4 degradation), or
paired --hr_dir/--lr_dir; random crops of --resolution. diffusers' latent SR teachers work too: an
LDMSuperResolutionPipeline or StableDiffusionUpscalePipeline folder (--noise_level, --prompt_file) with
--train_data_dir. Every option left out comes from --preset (listed at the end) or from --config.
Documentation: docs/methods/tadsr.md.""",
)


# -- the bundled ResShift x4 teacher (train/sr_teacher.py) ------------------------------------------------------

_TEACHER_TRAINER = TrainerConfig(
    output_dir="outputs/sr-resshift-teacher",
    max_train_steps=2000,
    ema_decay=0.999,
    ema_warmup=True,  # without it, 0.999 over 2,000 steps keeps 14% of the random initial weights
    lr_warmup_steps=200,
    lr_scheduler="cosine",
    max_grad_norm=1.0,
    mixed_precision="no",
    validation_steps=500,
    checkpointing_steps=500,
)
TEACHER_PRESETS = {
    "sr-resshift-teacher": Preset(
        "sr-resshift-teacher",
        "The recipe for the bundled ResShift x4 teacher: 64x64 crops of every training photograph with flips, "
        "kappa 2, batch 16, 2,000 steps (the shipped weights: the same on seven photographs, before motorcycle_right "
        "was added; see docs/bundled-teachers.md).",
        RunConfig(
            method=ResShiftTeacherConfig(),
            trainer=_TEACHER_TRAINER,
            teacher=TeacherConfig(resolution=64),
            data=DataConfig(augmentation="flips"),
        ),
        "kappa 2 as the latent ResShift, and flips only: kappa 0.5 with rotations and rescaling (--kappa 0.5 "
        "--augmentation full) was measured worse on the held-out photographs (docs/bundled-teachers.md).",
    )
}


def _resshift_teacher(run: StageRun):
    from ..schedules import ResShiftSchedule
    from ..sr_teacher import prepare_sr_teacher

    mc = run.config.method
    make = lambda: ResShiftSchedule(mc.num_timesteps, mc.kappa, mc.min_noise, mc.eta_end, mc.power, mc.scale_input)  # noqa: E731
    setup, preview = prepare_sr_teacher(run, make, "sample")
    target = setup.context.export
    method = ResShiftTeacherTraining(
        setup.context.denoiser,
        mc,
        setup.context.sample_shape,
        target.upscale_factor,
        target.resolution,
        preview,
        training_data=target.training_data,
    )
    return method, setup


TEACHER_ENTRY = MethodEntry(
    name="ResShift SR teacher",
    key="sr_teacher",
    config_class=ResShiftTeacherConfig,
    presets=TEACHER_PRESETS,
    default_preset="sr-resshift-teacher",
    builders={"distill": Builder(_resshift_teacher, loads_teacher=False)},
    run_groups=(DATA, OPTIMISATION, LOOP),
    run_flags=("resolution", "upscale_factor"),
    description="""Train the ResShift-style pixel x4 super-resolution teacher TAD-SR distils (T = 15, kappa = 2, the
sqrt(eta) schedule with p = 0.3): an x0-predicting UNet reading [x_t, u], trained with the x0 MSE on random 64x64 HR
crops of the bundled photographs with flips (or --train_data_dir, --hr_dir/--lr_dir).

    accelerate launch train/sr_teacher.py                      # outputs/sr-resshift-teacher

The output folder is a teacher folder (unet/, onestep.json with the schedule) and a SuperResolutionPipeline;
docs/bundled-teachers.md says how the bundled one was made.""",
)
