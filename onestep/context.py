"""What a method knows about its teacher: one typed, frozen context that the run setup builds (or a test builds
around an analytic teacher) and hands to the method's constructor. Nothing changes it afterwards.

    TeacherContext(denoiser, sample_shape=(1, 16, 16), cond_sampler=labels, export=ExportTarget(...))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoiser import Cond, Denoiser

CondSampler = Callable[[int, torch.device], Cond | None]

# How a student is exported (ExportTarget.pipeline):
ONE_STEP = "one_step"  # a UNet2DModel student in our OneStepPipeline (BOOT: BootPipeline)
SD15, SDXL = "sd15", "sdxl"  # a UNet2DConditionModel student in the stock StableDiffusion(XL)Pipeline
SD3, FLUX = "sd3", "flux"  # a flow-matching transformer student in the stock StableDiffusion3Pipeline / FluxPipeline
SUPER_RESOLUTION = "super_resolution"  # a pixel SR student in our SuperResolutionPipeline
LATENT_SUPER_RESOLUTION = "latent_super_resolution"  # diffusers' latent SR teachers' students
STOCK_TEXT_PIPELINES = (SD15, SDXL)
STOCK_FLOW_PIPELINES = (SD3, FLUX)


@dataclass(frozen=True)
class ExportTarget:
    """How a student of this teacher becomes a pipeline folder, and what the folder copies from the teacher."""

    pipeline: str
    scheduler_config: dict
    teacher_path: str | None = None  # the teacher's local folder (stock pipelines take its VAE and text encoders)
    num_classes: int | None = None  # class-conditional students: the real classes
    upscale_factor: int | None = None  # super-resolution: HR size / LR size
    resolution: int | None = None  # super-resolution: the training crop, the pipeline's tile; SD3 / Flux: the
    # training resolution (pixels), at which Flux's resolution-dependent shift was fixed
    latent_sr: str | None = None  # diffusers' latent SR teachers: "ldm" or "upscaler"
    latent_size: int | None = None
    noise_level: int | None = None
    max_noise_level: int | None = None
    variant: str | None = None
    training_data: str | None = None  # a teacher trained here: what it learnt from (recorded in its onestep.json)
    guidance: float | None = None  # Flux: the guidance scale the student reads as an input (None: no such input)


@dataclass(frozen=True)
class LoraRequest:
    """LoRA on the student's network (text-to-image teachers); `targets` None: the method's own list."""

    rank: int
    alpha: float
    targets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TeacherContext:
    """The frozen teacher, what its samples look like, how to condition and decode them, and how its student is
    exported. Methods read it; they never change it."""

    denoiser: Denoiser
    sample_shape: tuple[int, ...]  # what the student generates (pixels or latents), one sample
    cond_sampler: CondSampler | None = None  # None: unconditional (or, for SR, the condition comes with the data)
    uncond: Callable[[Cond], Cond] | None = None  # the teacher's unconditional input, for CFG
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [-1, 1] (sample grids)
    source: str = "a network given in code"  # the teacher as the user named it (hub id, folder, 'digits')
    kind: str = "plain"  # pixel | text | sd3 | flux | sr | latent_sr | plain (an analytic or in-code teacher)
    num_classes: int | None = None  # class-conditional teachers: the real classes (sample grids cycle them)
    export: ExportTarget | None = None
    lora: LoraRequest | None = None
    prompts: tuple[str, ...] | None = None  # text-to-image teachers: the training prompts
    prompt_encoder: object = None  # ... and their encoder (MSD draws each student's own prompts)

    def conditions(self, n: int, device) -> Cond | None:
        """n training conditions (the run's sampler), or None for an unconditional teacher."""
        return self.cond_sampler(n, device) if self.cond_sampler is not None else None

    def grid_conditions(self, n: int, device) -> Cond | None:
        """Sample-grid conditions: the classes in turn for a class-conditional teacher, else the sampler's."""
        if self.num_classes:
            return Cond(class_labels=(torch.arange(n) % self.num_classes).to(device))
        return self.conditions(n, device)
