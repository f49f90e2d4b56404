"""Diffusers pipeline classes for what diffusers lacks. Each file imports torch and diffusers only."""

from .one_step import OneStepPipeline

__all__ = ["OneStepPipeline"]
