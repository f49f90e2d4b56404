"""Diffusers pipeline classes for what diffusers lacks. Each file imports torch, diffusers, numpy and PIL only, and
copies the code it shares with the others from common.py (checked by `python -m onestep.testing.copies`)."""

from .latent_super_resolution import LatentSuperResolutionPipeline
from .msd import MultiStudentPipeline
from .one_step import OneStepPipeline
from .super_resolution import SuperResolutionPipeline

__all__ = ["LatentSuperResolutionPipeline", "MultiStudentPipeline", "OneStepPipeline", "SuperResolutionPipeline"]
