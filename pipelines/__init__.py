"""Diffusers pipeline classes for what diffusers lacks. Each file imports torch and diffusers only."""

from .msd import MultiStudentPipeline
from .one_step import OneStepPipeline

__all__ = ["MultiStudentPipeline", "OneStepPipeline"]
