"""Diffusers pipeline classes for what diffusers lacks. Each file imports torch and diffusers only."""

from .latent_super_resolution import LatentSuperResolutionPipeline
from .msd import MultiStudentPipeline
from .one_step import OneStepPipeline
from .super_resolution import SuperResolutionPipeline

__all__ = ["LatentSuperResolutionPipeline", "MultiStudentPipeline", "OneStepPipeline", "SuperResolutionPipeline"]
