"""BOOT's recipes: the settings known from the paper (docs/methods/boot.md) and the CPU default. The paper's grid, loss weights, learning rate, batch, iterations and CFG scale were not recovered: the
published presets carry the project's defaults (N = 20, w_i = 1, lambda_BC = 1, B-paper, conversion at
T, Adam, clipping at 1.0, lr 1e-4 for pixel teachers and 1e-5 for SD-size UNets), each marked unverified.
Batch sizes are per process.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import EvalConfig, MemoryConfig, Preset, RunConfig, TeacherConfig, TrainerConfig
from ..methods.boot import BOOT, BOOTConfig
from ..stages import Builder, MethodEntry, StageRun

DEFAULT_PRESET = "digits-cpu"
OUTPUT_DIR = "outputs/boot-digits"

# The GPU runs: bf16 with fp32 master weights, clipping at 1.0 (1/delta^2 weighs the early, badly fitted intervals
# heavily), no EMA (BOOT has no EMA target network), checkpoints every 1,000.
_GPU_TRAINER = TrainerConfig(
    output_dir=OUTPUT_DIR,
    max_train_steps=100_000,
    mixed_precision="bf16",
    max_grad_norm=1.0,
    validation_steps=1000,
    checkpointing_steps=1000,
)
_UNVERIFIED = "Grid, weights, lr, batch, iterations and CFG not recovered from the paper: project defaults."


def _preset(name, description, method: BOOTConfig, trainer: TrainerConfig, teacher: str, notes: str = "", **groups):
    config = RunConfig(
        method=method,
        trainer=trainer,
        teacher=TeacherConfig(pretrained_model_name_or_path=teacher),
        memory=groups.get("memory") or MemoryConfig(),
        evaluation=groups.get("evaluation") or EvalConfig(),
    )
    return Preset(name, description, config, notes)


_DIGITS = _preset(
    "digits-cpu",
    "Bundled default: the class-conditional digits teacher (16x16), no data at all, 2 CPU cores.",
    BOOTConfig(learning_rate=2e-4, train_batch_size=32, grid_size=20, param_timestep=399),
    TrainerConfig(
        output_dir=OUTPUT_DIR,
        max_train_steps=1500,
        mixed_precision="no",
        max_grad_norm=1.0,
        validation_steps=250,
        checkpointing_steps=500,
        eval_steps=0,  # in-training FID reads the digits as its reference: off, so the run touches no data
    ),
    teacher="digits",
    notes="Conversion at timestep 399 (the --param_timestep option): at 999 the eps->x0 conversion multiplies the "
    "network's error by 1/alpha_999 = 14.6 (README). --eval_steps 250 turns in-training FID on (it reads the "
    "digits as the FID reference, nothing else).",
)


def _pixel(name: str, description: str, teacher: str) -> Preset:
    return _preset(
        name,
        description,
        BOOTConfig(learning_rate=1e-4, train_batch_size=64, grid_size=20),
        _GPU_TRAINER,
        teacher=teacher,
        notes="The paper's teachers predict x0 (signal); " + _UNVERIFIED,
    )


_SD15 = _preset(
    "sd15",
    "Stable Diffusion 1.5 (the paper's SD version unverified), prompts only (DiffusionDB), CFG 7.5 on the teacher.",
    BOOTConfig(learning_rate=1e-5, train_batch_size=8, grid_size=20, guidance_scale=7.5),
    _GPU_TRAINER,
    teacher="stable-diffusion-v1-5/stable-diffusion-v1-5",
    notes="CFG = the teacher pipeline's default. " + _UNVERIFIED,
    memory=MemoryConfig(gradient_checkpointing=True),
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _DIGITS,
        _pixel("ffhq64", "FFHQ 64x64, a self-trained x0-prediction teacher (paper FID ~9.0, unverified).",
               "<FFHQ-64 x0-prediction teacher in diffusers format>"),
        _pixel("lsun-bedroom256", "LSUN bedroom 256x256, a self-trained x0-prediction teacher (paper FID ~23.4).",
               "<LSUN bedroom-256 x0-prediction teacher in diffusers format>"),
        _pixel("imagenet64", "ImageNet 64x64 class-conditional, a self-trained x0-prediction teacher (paper FID 16.3).",
               "<class-conditional ImageNet-64 x0-prediction teacher in diffusers format>"),
        _pixel("cifar10", "CIFAR-10 32x32 (the paper's comparison; teacher unverified, FID ~4.4 recalled).",
               "<CIFAR-10 teacher in diffusers format>"),
        _SD15,
        Preset(
            "sdxl",
            "SDXL base (not in the paper: a project extension), prompts only, CFG 5 on the teacher.",
            replace(_SD15.config, method=replace(_SD15.config.method, guidance_scale=5.0, train_batch_size=2),
                    teacher=TeacherConfig(pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0")),
            "CFG = the SDXL pipeline's default. " + _UNVERIFIED,
        ),
        Preset(
            "sd3",
            "Stable Diffusion 3 medium (not in the paper: a project extension), prompts only, the flow ODE as the "
            "trajectory, CFG 7 on the teacher.",
            replace(_SD15.config, method=replace(_SD15.config.method, guidance_scale=7.0, train_batch_size=2),
                    teacher=TeacherConfig(pretrained_model_name_or_path="stabilityai/stable-diffusion-3-medium-diffusers")),
            "CFG = StableDiffusion3Pipeline's default; conversion at sigma 1 (x0 = noise - velocity). " + _UNVERIFIED,
        ),
        Preset(
            "flux",
            "FLUX.1-dev (not in the paper: a project extension), prompts only, the flow ODE as the trajectory, "
            "guidance input 3.5 (Flux has no unconditional input, so no teacher CFG).",
            replace(_SD15.config, method=replace(_SD15.config.method, guidance_scale=1.0, train_batch_size=1),
                    teacher=TeacherConfig(pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev")),
            "Guidance input = FluxPipeline's default (--guidance_embedding); conversion at sigma 1. " + _UNVERIFIED,
        ),
        Preset(
            "sd15-lora",
            "Stable Diffusion 1.5 with LoRA on the student (rank 64), lr 1e-4.",
            replace(_SD15.config, method=replace(_SD15.config.method, learning_rate=1e-4),
                    memory=replace(_SD15.config.memory, lora_rank=64)),
            "LoRA is a project option, not in the paper. " + _UNVERIFIED,
        ),
    ]
}  # fmt: skip


def _distill(run: StageRun):
    setup = run.prepare(needs_real_data=False)
    return BOOT(setup.context, run.config.method, max_train_steps=run.config.trainer.max_train_steps), setup


ENTRY = MethodEntry(
    name="BOOT",
    key="boot",
    config_class=BOOTConfig,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    builders={"distill": Builder(_distill)},
    kinds=("pixel", "text", "sd3", "flux"),
    description="""BOOT distillation (Gu et al. 2023): a one-step student from a diffusers teacher, without any data.

With no arguments it distils the bundled digits teacher on the CPU, reading no
digits at all:

    accelerate launch train/boot.py

Options follow the diffusers training examples; every option left out comes from --preset (listed at the end)
or from --config, a training_config.json an earlier run wrote. Documentation: docs/methods/boot.md.""",
)
