"""DMD2's recipes (the published settings, docs/methods/dmd2.md, and the CPU default) and how its stages are
built: `distill` (DMD2) and `regression` (the warm start on teacher ODE pairs).

Each preset is one `RunConfig` (the method's config, the trainer's, the teacher, memory options), and, for a
published recipe of several stages, the stages: SD1.5 is distribution matching then the GAN stage, SDXL one-step
the regression warm start then DMD2. Batch sizes are per process; the published global batch is per-process
batch x number of GPUs (x accumulation).
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..config import EvalConfig, MemoryConfig, Preset, RunConfig, Stage, TeacherConfig, TrainerConfig
from ..methods.dmd2 import DMD2, DMD2Config
from ..stages import Builder, MethodEntry, StageRun

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
_SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"
_FLUX = "black-forest-labs/FLUX.1-dev"


def _preset(
    name,
    description,
    method: DMD2Config,
    trainer: TrainerConfig,
    teacher: str,
    notes: str = "",
    memory: MemoryConfig | None = None,
    evaluation: EvalConfig | None = None,
    stages: tuple[Stage, ...] = (),
) -> Preset:
    config = RunConfig(
        method=method,
        trainer=trainer,
        teacher=TeacherConfig(pretrained_model_name_or_path=teacher),
        memory=memory or MemoryConfig(),
        evaluation=evaluation or EvalConfig(),
    )
    return Preset(name, description, config, notes, stages)


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

_SD15 = _preset(
    "sd15",
    "Stable Diffusion 1.5, one step at t=999, real-score CFG 1.75: distribution matching (40k), then the GAN (5k).",
    DMD2Config(
        learning_rate=1e-5,
        ttur_ratio=10,
        guidance_scale=1.75,
        conditioning_timesteps=[999],
        gan=True,
        gan_generator_weight=1e-3,
        gan_discriminator_weight=1e-2,
        train_batch_size=32,
    ),
    replace(_GPU_TRAINER, max_train_steps=40_000),
    teacher=_SD15,
    memory=MemoryConfig(gradient_checkpointing=True),
    notes="Published: 64 GPUs x 32 = 2048 global batch. The GAN stage continues the first stage's generator and "
    "critic (the head is new) at lr 5e-7; the released checkpoint trained it for 2k iterations, the paper says 5k.",
    stages=(
        Stage("dm", method={"gan": False}, trainer={"max_train_steps": 40_000}),
        Stage("gan", method={"gan": True, "learning_rate": 5e-7}, trainer={"max_train_steps": 5_000}, init_from="dm"),
    ),
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


# SD3 and Flux (flow-matching transformers; conditioning timesteps are indices into the flow schedule, 999 being
# sigma 1, pure noise). No DMD2 run on these teachers is published by its authors: SD3 takes the closest published
# DMD2 setting (SDXL, a model of similar size at the same 1024 resolution), Flux NVIDIA FastGen's DMD2 recipe for it.
_SD3_4STEP = _preset(
    "sd3-4step",
    "Stable Diffusion 3 medium, four steps [999, 749, 499, 249] with backward simulation, real-score CFG 7, GAN on "
    "the critic's transformer tokens.",
    DMD2Config(
        learning_rate=5e-7,
        ttur_ratio=5,
        guidance_scale=7.0,
        conditioning_timesteps=_FOUR_STEPS,
        gan=True,
        gan_generator_weight=5e-3,
        gan_discriminator_weight=1e-2,
        train_batch_size=2,
    ),
    replace(_GPU_TRAINER, max_train_steps=19_000),
    teacher=_SD3,
    memory=MemoryConfig(gradient_checkpointing=True),
    notes="From DMD2's SDXL 4-step recipe (lr 5e-7, R 5, GAN 5e-3 / 1e-2, batch 2 per GPU of 64, 19k critic "
    "iterations, bf16, 1024 px). Guesses: the real-score CFG 7 (StableDiffusion3Pipeline's default; DMD2 took 8 for "
    "SDXL, whose default is 5) and that the SDXL numbers carry over to a 2B flow transformer; the GAN head is a "
    "token MLP on a middle joint block's image tokens (DMD2's conv head needs a UNet's feature map). Not run at "
    "this size.",
)

_FLUX_4STEP = _preset(
    "flux-4step",
    "FLUX.1-dev, four steps [999, 749, 499, 249] with backward simulation, guidance input 3.5 (no real-score CFG: "
    "Flux has no unconditional input), GAN weight 3e-2 on the critic's last double-stream block.",
    DMD2Config(
        learning_rate=1e-5,
        ttur_ratio=5,
        guidance_scale=1.0,
        conditioning_timesteps=_FOUR_STEPS,
        gan=True,
        gan_generator_weight=3e-2,
        gan_discriminator_weight=1e-2,
        train_batch_size=2,
    ),
    replace(_GPU_TRAINER, max_train_steps=5_000),
    teacher=_FLUX,
    memory=MemoryConfig(gradient_checkpointing=True),
    notes="From NVIDIA FastGen's DMD2 config for Flux: lr 1e-5 for generator, critic and discriminator, guidance "
    "input 3.5, four student steps, GAN generator weight 0.03, 5 critic updates per generator update (FastGen's "
    "DMD2 default), batch 2 per GPU, 5k iterations, bf16; FastGen trains at 512 px (--resolution 512 follows it), "
    "this preset at FLUX.1-dev's 1024. Guesses: the step list (FastGen's config does not show its times), the "
    "discriminator weight 1e-2 and DM range 20..980 (DMD2's; FastGen trains its discriminator with its own "
    "optimiser) and the token-MLP head. Not run at this size.",
)


def _variant(
    base: Preset,
    name: str,
    description: str,
    notes: str = "",
    method: dict | None = None,
    trainer: dict | None = None,
    memory: dict | None = None,
    stages: tuple[Stage, ...] = (),
) -> Preset:
    c = base.config
    config = replace(
        c,
        method=replace(c.method, **(method or {})),
        trainer=replace(c.trainer, **(trainer or {})),
        memory=replace(c.memory, **(memory or {})),
    )
    return Preset(name, description, config, notes, stages)


# The regression warm start's settings on the digits teacher: 2,000 DDIM-25 pairs, MSE (LPIPS cannot load offline).
_DIGITS_REGRESSION = {"gan": False, "regression_pairs": 2000, "regression_teacher_steps": 25}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _DIGITS,
        _variant(
            _DIGITS,
            "digits-regression",
            "The regression warm start alone on the digits teacher (2,000 DDIM-25 pairs, MSE offline).",
            method=_DIGITS_REGRESSION,
            trainer={"max_train_steps": 600, "output_dir": "outputs/dmd2-digits-regression"},
            stages=(Stage("regression", build="regression"),),
        ),
        _variant(
            _DIGITS,
            "digits-warmstart",
            "The regression warm start (600 iterations), then DMD2 from it (the default's 1,200 iterations).",
            trainer={"output_dir": "outputs/dmd2-digits-warmstart"},
            stages=(
                Stage("regression", build="regression", method=_DIGITS_REGRESSION, trainer={"max_train_steps": 600}),
                Stage("distill", init_from="regression"),
            ),
        ),
        _IMAGENET,
        _SD15,
        _SDXL_4STEP,
        _variant(
            _SDXL_4STEP,
            "sdxl-1step",
            "SDXL base, one step with the network told t=399, CFG 8: the regression warm start on 10k teacher ODE "
            "pairs (3k), then DMD2 with the GAN (24k).",
            "The published run starts from a DMD1-style LPIPS regression warm start. Teacher pairs: DDIM trailing 50 "
            "steps (the same deterministic path as the published Euler trailing), CFG 8.",
            method={"conditioning_timesteps": [399]},
            trainer={"max_train_steps": 24_000},
            stages=(
                Stage(
                    "regression",
                    build="regression",
                    method={"gan": False, "learning_rate": 1e-5, "regression_pairs": 10_000},
                    trainer={"max_train_steps": 3_000},
                ),
                Stage("distill", init_from="regression"),
            ),
        ),
        _SD3_4STEP,
        _variant(
            _SD3_4STEP,
            "sd3-1step",
            "Stable Diffusion 3 medium, one step from pure noise (index 999, sigma 1), real-score CFG 7: the "
            "regression warm start on 10k teacher ODE pairs (3k), then DMD2 with the GAN (24k).",
            "DMD2's SDXL one-step recipe (regression warm start, then 24k critic iterations at lr 5e-7). SDXL's student "
            "reads t = 399 because an eps teacher's x0 = (x - sigma eps) / alpha blows its error up at t = 999; a "
            "flow teacher's x0 = x - sigma v does not, so this one starts at sigma 1 (a choice, not published). Teacher "
            "pairs: 50 Euler steps of the flow ODE (DDIM on the flow schedule), CFG 7. Other guesses as sd3-4step.",
            method={"conditioning_timesteps": [999]},
            trainer={"max_train_steps": 24_000},
            stages=(
                Stage(
                    "regression",
                    build="regression",
                    method={"gan": False, "learning_rate": 1e-5, "regression_pairs": 10_000},
                    trainer={"max_train_steps": 3_000},
                ),
                Stage("distill", init_from="regression"),
            ),
        ),
        _FLUX_4STEP,
        _variant(
            _SDXL_4STEP,
            "sdxl-lora",
            "SDXL base, four steps, LoRA on the generator (rank 64, alpha 8), lr 5e-5.",
            method={"learning_rate": 5e-5},
            memory={"lora_rank": 64},
        ),
    ]
}


def _distill(run: StageRun):
    setup = run.prepare(needs_real_data=run.config.method.gan)
    return DMD2(setup.context, run.config.method), setup


def _regression(run: StageRun):
    from ..methods.regression import build_regression

    setup = run.prepare(needs_real_data=False)
    return build_regression(setup, os.path.join(run.folder, "ode_pairs")), setup


DESCRIPTION = """DMD2 distillation (Yin et al. 2024): one-step or few-step students from a diffusers teacher.

With no arguments it distils the bundled digits teacher on the CPU:

    accelerate launch train/dmd2.py

A published recipe of several stages runs from one command (--preset sd15: distribution matching, then the GAN
stage; --preset sdxl-1step: the regression warm start, then DMD2); --stage NAME runs one of its stages. Options
follow the diffusers training examples; every option left out comes from --preset (listed at the end) or from
--config, a training_config.json an earlier run wrote. Documentation: docs/methods/dmd2.md."""

ENTRY = MethodEntry(
    name="DMD2",
    key="dmd2",
    config_class=DMD2Config,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    builders={
        "distill": Builder(_distill, needs_real_data=lambda config: config.method.gan),
        "regression": Builder(_regression),
    },
    description=DESCRIPTION,
    kinds=("pixel", "text", "sd3", "flux"),
)
