"""Named, typed DMD2 recipes: the published settings (shared/methods/dmd2.md section 7) and the CPU default.

Each preset is one `RunConfig` (the method's config, the trainer's, the teacher, memory options); the
published variants are built from a base with `dataclasses.replace`. Batch sizes are per process; the
published global batch is per-process batch x number of GPUs (x accumulation).
"""

from __future__ import annotations

from dataclasses import replace

from ..config import EvalConfig, MemoryConfig, Preset, RunConfig, TeacherConfig
from ..methods.dmd2 import DMD2Config
from ..trainer import TrainerConfig

DEFAULT_PRESET = "digits-cpu"
OUTPUT_DIR = "outputs/dmd2-digits"

# The published GPU runs: bf16, 500 warm-up iterations, clipping at 10, no EMA, checkpoints every 1,000.
_GPU_TRAINER = TrainerConfig(
    output_dir=OUTPUT_DIR,
    max_train_steps=200_000,
    mixed_precision="bf16",
    lr_warmup_steps=500,
    max_grad_norm=10.0,
    validation_steps=1000,
    checkpointing_steps=1000,
)
_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# Written by `python -m onestep.convert.edm_adm edm-imagenet-64x64-cond-adm.pkl ./teachers/edm-imagenet64
# --trust-pickle` (README); "./" keeps a missing folder from being read as a hub id.
_EDM_IMAGENET64 = "./teachers/edm-imagenet64"
_FOUR_STEPS = [999, 749, 499, 249]


def _preset(
    name,
    description,
    method: DMD2Config,
    trainer: TrainerConfig,
    teacher: str,
    notes: str = "",
    memory: MemoryConfig | None = None,
    evaluation: EvalConfig | None = None,
) -> Preset:
    config = RunConfig(
        method=method,
        trainer=trainer,
        teacher=TeacherConfig(pretrained_model_name_or_path=teacher),
        memory=memory or MemoryConfig(),
        evaluation=evaluation or EvalConfig(),
    )
    return Preset(name, description, config, notes)


_DIGITS = _preset(
    "digits-cpu",
    "Bundled default: the class-conditional digits teacher (16x16), one step, GAN on, 2 CPU cores.",
    DMD2Config(
        learning_rate=5e-5,  # 2e-4 plateaued at FID 0.28; 5e-5 reached 0.16 in the same 1,200 iterations (README)
        ttur_ratio=5,
        guidance_scale=1.0,
        conditioning_timesteps=[399],
        gan=True,
        gan_generator_weight=3e-3,
        gan_discriminator_weight=1e-2,
        train_batch_size=16,
    ),
    TrainerConfig(
        output_dir=OUTPUT_DIR,
        max_train_steps=1200,
        mixed_precision="no",
        lr_warmup_steps=0,
        max_grad_norm=10.0,
        ema_decay=0.99,
        validation_steps=300,
        checkpointing_steps=600,
        eval_steps=300,
    ),
    teacher="digits",
    notes="Conditioning timestep 399 (as SDXL one-step): at 999 the eps->x0 conversion multiplies the "
    "network's error by 1/alpha_999 = 14.6 and a CPU budget does not train it away (README).",
)

_IMAGENET = _preset(
    "imagenet64-edm",
    "ImageNet 64x64, EDM class-conditional teacher, sigma 80 one step (paper FID 1.51 from scratch with GAN).",
    DMD2Config(
        learning_rate=2e-6,
        ttur_ratio=5,
        conditioning_timesteps=[999],
        gan=True,
        gan_generator_weight=3e-3,
        gan_discriminator_weight=1e-2,
        gan_feature_module="down_blocks.3",  # the encoder's output, which the official head reads (8x8x768)
        train_batch_size=40,
    ),
    _GPU_TRAINER,
    teacher=_EDM_IMAGENET64,
    notes="Published: 7 GPUs x 40 = 280 global batch; final resume at lr 5e-7 reached FID 1.28. The teacher folder "
    "is converted from EDM's edm-imagenet-64x64-cond-adm.pkl by onestep.convert.edm_adm (README).",
)

_SD15_STAGE1 = _preset(
    "sd15",
    "Stable Diffusion 1.5, one step at t=999, stage 1 (no GAN), real-score CFG 1.75.",
    DMD2Config(
        learning_rate=1e-5,
        ttur_ratio=10,
        guidance_scale=1.75,
        conditioning_timesteps=[999],
        gan=False,
        gan_generator_weight=1e-3,
        gan_discriminator_weight=1e-2,
        train_batch_size=32,
    ),
    replace(_GPU_TRAINER, max_train_steps=40_000),
    teacher=_SD15,
    memory=MemoryConfig(gradient_checkpointing=True),
    notes="Published: 64 GPUs x 32 = 2048 global batch; stage 2 is preset sd15-stage2.",
)

_SDXL_4STEP = _preset(
    "sdxl-4step",
    "SDXL base, four steps [999, 749, 499, 249] with backward simulation, CFG 8, GAN.",
    DMD2Config(
        learning_rate=5e-7,
        ttur_ratio=5,
        guidance_scale=8.0,
        conditioning_timesteps=_FOUR_STEPS,
        gan=True,
        gan_generator_weight=5e-3,
        gan_discriminator_weight=1e-2,
        train_batch_size=2,
    ),
    replace(_GPU_TRAINER, max_train_steps=19_000),
    teacher=_SDXL,
    memory=MemoryConfig(gradient_checkpointing=True),
    notes="Published: 64 GPUs x 2 = 128 global batch, FSDP.",
)


def _variant(
    base: Preset,
    name: str,
    description: str,
    notes: str = "",
    method: dict | None = None,
    trainer: dict | None = None,
    memory: dict | None = None,
) -> Preset:
    c = base.config
    config = replace(
        c,
        method=replace(c.method, **(method or {})),
        trainer=replace(c.trainer, **(trainer or {})),
        memory=replace(c.memory, **(memory or {})),
    )
    return Preset(name, description, config, notes)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _DIGITS,
        _variant(
            _DIGITS,
            "digits-regression",
            "The regression warm start on the digits teacher (2,000 DDIM-25 pairs, MSE offline).",
            "Continue with --init_from_checkpoint <this run>/checkpoint-600 (the critic starts from the teacher).",
            method={"stage": "regression", "gan": False, "regression_pairs": 2000, "regression_teacher_steps": 25},
            trainer={"max_train_steps": 600, "output_dir": "outputs/dmd2-digits-regression"},
        ),
        _IMAGENET,
        _SD15_STAGE1,
        _variant(
            _SD15_STAGE1,
            "sd15-stage2",
            "Stable Diffusion 1.5 stage 2: resume stage 1 and add the GAN at a lower learning rate.",
            "Released checkpoint: +2k iterations; the paper says +5k (COCO FID 8.35).",
            method={"learning_rate": 5e-7, "gan": True},
            trainer={"max_train_steps": 5_000},
        ),
        _SDXL_4STEP,
        _variant(
            _SDXL_4STEP,
            "sdxl-1step",
            "SDXL base, one step with the network told t=399, CFG 8, GAN (after a regression warm start).",
            "The published run starts from a DMD1-style LPIPS regression warm start.",
            method={"conditioning_timesteps": [399]},
            trainer={"max_train_steps": 24_000},
        ),
        _variant(
            _SDXL_4STEP,
            "sdxl-1step-regression",
            "SDXL one step at t=399: the regression warm start on 10k teacher ODE pairs (then sdxl-1step).",
            "Continue with --preset sdxl-1step --init_from_checkpoint <this run>/checkpoint-<last>. Teacher pairs: "
            "DDIM trailing 50 steps (the same deterministic path as the published Euler trailing), CFG 8.",
            method={
                "conditioning_timesteps": [399],
                "stage": "regression",
                "gan": False,
                "learning_rate": 1e-5,
                "regression_pairs": 10_000,
            },
            trainer={"max_train_steps": 3_000, "output_dir": "outputs/dmd2-sdxl-regression"},
        ),
        _variant(
            _SDXL_4STEP,
            "sdxl-lora",
            "SDXL base, four steps, LoRA on the generator (rank 64, alpha 8), lr 5e-5.",
            method={"learning_rate": 5e-5},
            memory={"lora_rank": 64},
        ),
    ]
}
