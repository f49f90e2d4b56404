"""Exponential moving average of a model's weights, checkpointable through accelerate."""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise UserError(f"EMA decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange live and EMA weights in place (call twice to restore)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                live = p.detach().clone()
                p.copy_(self.shadow[n].to(p.dtype))
                self.shadow[n].copy_(live.float())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
