"""What a method tells the trainer: its models, their optimisers, which updates run when, and one step."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Update:
    """One optimiser step of `model` on the loss named `name`, due when step % every == 0."""

    name: str
    model: str
    every: int = 1


@dataclass
class StepInfo:
    step: int  # optimisation iterations completed so far
    due: tuple[str, ...]  # update names that run this iteration
    shared_generator: torch.Generator  # same stream on every rank (e.g. DMD2's k for backward simulation)
    device: torch.device


class _NullTimer:
    def phase(self, name):
        return nullcontext()


class Collective:
    """What a method may ask of the other processes, through the trainer (which owns the process group): this
    one process alone until the trainer attaches its own."""

    is_main = True

    def mean(self, values: list[float]) -> list[float]:
        """The mean over the processes of each value."""
        return list(values)

    def barrier(self) -> None:
        pass


class Method:
    """Base class. Subclasses set `updates`, implement `models`, `optimizers`, `start_iteration`, `loss`,
    `sample_grid` and `export`; a method with state of its own (a target index, a router) also
    implements `state_dict`/`load_state_dict`, and one that acts between iterations `end_iteration`."""

    updates: list[Update] = []
    ema_models: tuple[str, ...] = ()  # models whose weight EMA the trainer may keep (and exports)
    exported_models: tuple[str, ...] = ()  # models export() reads (default: all); gathered under FSDP
    needs_data: bool = True
    no_lr_warmup: tuple[str, ...] = ()  # optimizers that skip --lr_warmup_steps (TAD-SR's discriminator)
    # Parameter-name prefixes, per model, that a new stage may add (missing from an earlier run's
    # checkpoint given to --init_from_checkpoint), e.g. DMD2's GAN head on the critic.
    new_in_stage: dict[str, tuple[str, ...]] = {}
    # Models that keep their initialisation when an earlier stage's checkpoint does not hold them at all.
    fresh_in_stage: tuple[str, ...] = ()

    def __init__(self):
        self.timer = _NullTimer()
        self.prepared: dict[str, nn.Module] = {}
        self.unwrap = lambda m: m
        self.collective = Collective()  # the trainer's, once training starts

    # -- set-up --------------------------------------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def attach(self, prepared: dict[str, nn.Module], unwrap) -> None:
        """The trainer hands back the prepared (possibly DDP-wrapped or FSDP-sharded) models, by name."""
        self.prepared = prepared
        self.unwrap = unwrap

    def memory_networks(self) -> list[nn.Module]:
        """The trained networks --gradient_checkpointing and xformers apply to: by default every Denoiser's
        network inside the method's models."""
        from ..denoiser import Denoiser

        return [m.net for model in self.models().values() for m in model.modules() if isinstance(m, Denoiser)]

    def checkpointing_exclusions(self) -> str:
        """Which networks memory_networks() leaves out of gradient checkpointing, and why ('' = none)."""
        return ""

    def to(self, device) -> Method:
        """Move frozen, non-trained parts (the teacher) to the device."""
        return self

    # -- one iteration -------------------------------------------------------------------------
    def start_iteration(self, batch: Any, info: StepInfo) -> Any:
        raise NotImplementedError

    def loss(self, name: str, state: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def end_iteration(self, info: StepInfo) -> None:
        """After every iteration's updates, on every rank (e.g. DisBack moves to its next target here)."""

    # -- the method's own state (checkpointed by the trainer) ------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state of its own, but the checkpoint holds {sorted(state)}."
            )

    # -- outputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, models: dict[str, nn.Module], num: int, seed: int, device) -> torch.Tensor:
        """Images in [-1, 1] for the validation grid (same seed -> same images)."""
        raise NotImplementedError

    def export(self, models: dict[str, nn.Module], output_dir: str, extra_card: dict) -> None:
        raise NotImplementedError

    def product(self, folder: str) -> str:
        """What `export` wrote, as the end-of-run summary lists it."""
        return f"student pipeline  {folder} (model_index.json, unet/, scheduler/, README.md)"

    def usage(self, folder: str) -> str:
        """How a user loads and calls what `export` wrote (printed when training ends)."""
        return f"DiffusionPipeline.from_pretrained({folder!r}, trust_remote_code=True)"
