"""OFTSR's recipes (docs/methods/oftsr.md): the teacher stage (the conditional flow teacher, trained from scratch) and
the student stage (distillation), the published settings and the CPU defaults on the bundled photographs. A published
recipe runs both stages from one command; the student stage reads the teacher stage's export as its teacher. Batch
sizes are per process."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import DataConfig, FromStage, Preset, RunConfig, Stage, TeacherConfig, TrainerConfig
from ..methods.oftsr import OFTSR, OFTSRConfig
from ..stages import Builder, MethodEntry, StageRun

DEFAULT_PRESET = "sr-cpu"
OUTPUT_DIR = "outputs/oftsr"
TEACHER_OUTPUT_DIR = "outputs/sr-flow-teacher"


def _preset(name, description, method: OFTSRConfig, trainer: TrainerConfig, teacher: str, notes: str = "", data=None):
    config = RunConfig(
        method=method,
        trainer=trainer,
        teacher=TeacherConfig(pretrained_model_name_or_path=teacher, resolution=None),
        data=data or DataConfig(),
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
    data=DataConfig(augmentation="full"),
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
        ema_warmup=True,  # OFTSR's EMA warm-up: min(decay, (1 + n) / (10 + n))
        validation_steps=1000,
        checkpointing_steps=1000,
        eval_steps=0,
    ),
    teacher="<a conditional flow teacher folder (the recipe's teacher stage trains one)>",
    notes="Paper lr 1e-4; configs and checkpoint names also show 1e-5 and 2e-5. ImageNet: 50k iterations.",
)

# The teacher stage: a fresh UNet trained by flow matching (l1, sigma_p 0.2) on 64x64 crops of the bundled photographs.
_TEACHER_CPU = {
    "method": {"learning_rate": 2e-4, "train_batch_size": 16},
    "data": {"augmentation": "flips"},  # rotations and rescaling were measured worse (docs/bundled-teachers.md)
    "trainer": {
        "output_dir": TEACHER_OUTPUT_DIR,
        "max_train_steps": 2000,
        "lr_warmup_steps": 200,
        "lr_scheduler": "cosine",
        "ema_decay": 0.999,
        "validation_steps": 500,
        "checkpointing_steps": 500,
    },
}
# As published: l1, lr 1e-4, 1k warm-up, EMA 0.9999, clipping 1.0, 100k iterations at batch 32, 256x256 crops.
_TEACHER_DIV2K = {
    "method": {"learning_rate": 1e-4, "train_batch_size": 32},
    "trainer": {"max_train_steps": 100_000, "lr_warmup_steps": 1000, "ema_decay": 0.9999},
    "teacher": {"resolution": 256},
}


def _teacher_stage(settings: dict) -> Stage:
    trainer = {k: v for k, v in settings["trainer"].items() if k != "output_dir"}
    return Stage(
        "teacher",
        build="teacher",
        method=settings["method"],
        trainer=trainer,
        teacher=settings.get("teacher", {}),
        data=settings.get("data", {}),
        keeps_product=True,
    )


def _student_stage(settings: dict | None = None) -> Stage:
    return Stage("distill", teacher={"pretrained_model_name_or_path": FromStage("teacher"), **(settings or {})})


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _CPU,
        Preset(
            "teacher-cpu",
            "The teacher stage alone on the CPU: an x4 flow teacher on 64x64 crops of every bundled training "
            "photograph with flips (l1, sigma_p 0.2, 2,000 iterations at batch 16).",
            replace(
                _CPU.config,
                method=replace(_CPU.config.method, **_TEACHER_CPU["method"]),
                trainer=replace(_CPU.config.trainer, **_TEACHER_CPU["trainer"]),
                data=replace(_CPU.config.data, **_TEACHER_CPU["data"]),
            ),
            "The recipe for onestep/assets/sr-flow-teacher (copy the output folder there; the shipped weights were "
            "trained on seven photographs, before motorcycle_right was added: docs/bundled-teachers.md). lr 2e-4 "
            "with cosine decay and EMA 0.999 (with warm-up) instead of the published 1e-4 and 0.9999: a "
            "2,000-iteration run.",
            stages=(Stage("teacher", build="teacher"),),
        ),
        Preset(
            "full-cpu",
            "The whole recipe on the CPU: the teacher stage (as teacher-cpu), then the student stage (as sr-cpu) "
            "distilling it.",
            replace(_CPU.config, trainer=replace(_CPU.config.trainer, output_dir="outputs/oftsr-full")),
            stages=(_teacher_stage(_TEACHER_CPU), _student_stage()),
        ),
        Preset(
            "div2k-x4",
            _DIV2K.description + " After the teacher stage as published (100k iterations at batch 32, 256x256).",
            _DIV2K.config,
            _DIV2K.notes + " Published teacher architecture: the DPS FFHQ ADM UNet (128 ch); --block_out_channels "
            "sizes this UNet2DModel.",
            stages=(_teacher_stage(_TEACHER_DIV2K), _student_stage({"resolution": 256})),
        ),
        Preset(
            "imagenet-x4",
            "ImageNet 256 x4: as div2k-x4 with 50k distillation iterations.",
            replace(_DIV2K.config, trainer=replace(_DIV2K.config.trainer, max_train_steps=50_000)),
            stages=(_teacher_stage(_TEACHER_DIV2K), _student_stage({"resolution": 256})),
        ),
    ]
}


def _teacher(run: StageRun):
    from ..errors import UserError
    from ..schedules import ConditionalFlowSchedule
    from ..sr_teacher import prepare_sr_teacher

    if "pretrained_model_name_or_path" in run.config.explicit:
        raise UserError(
            "The teacher stage trains the flow teacher from scratch (the paper's setting); starting it from "
            "pretrained weights is not implemented, so drop --pretrained_model_name_or_path (or run --stage distill)."
        )
    mc = run.config.method
    setup, preview = prepare_sr_teacher(run, lambda: ConditionalFlowSchedule(mc.sigma_p), "flow")
    return OFTSR(setup.context, mc, preview=preview, train_teacher=True), setup


def _distill(run: StageRun):
    setup = run.prepare(needs_real_data=True)
    preview = setup.data.batch(-1, 0, 0, torch.device("cpu"))  # fixed crops for the sample grids
    return OFTSR(setup.context, run.config.method, preview=preview), setup


ENTRY = MethodEntry(
    name="OFTSR",
    key="oftsr",
    config_class=OFTSRConfig,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    builders={
        "distill": Builder(_distill, needs_real_data=lambda config: True),
        "teacher": Builder(_teacher, loads_teacher=False),
    },
    kinds=("sr",),
    refusals={
        "latent_sr": "OFTSR distils its own conditional flow teacher (train/oftsr.py --preset teacher-cpu), not a "
        "diffusers latent SR teacher; distil LDM-SR and SD x4 upscaler teachers with train/tadsr.py."
    },
    description="""OFTSR (Zhu et al. 2024): a one-step x4 super-resolution student whose time input t in [0, 1] is a
fidelity-realism knob, distilled from a noise-augmented conditional rectified-flow teacher that the recipe's teacher
stage trains from scratch.

    accelerate launch train/oftsr.py                          # distil the bundled flow teacher (sr-cpu)
    accelerate launch train/oftsr.py --preset teacher-cpu     # the teacher stage alone: how the bundled one was made
    accelerate launch train/oftsr.py --preset full-cpu        # both stages

Data: the bundled photographs, --train_data_dir (HR images; LR by bicubic x4 degradation), or paired
--hr_dir/--lr_dir; random crops of --resolution. Every option left out comes from --preset or --config.
Documentation: docs/methods/oftsr.md.""",
)
