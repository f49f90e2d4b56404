"""Exponential moving average of a model's weights, checkpointable through accelerate."""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        """`warmup`: the n-th update uses min(decay, (1 + n) / (10 + n)), so a high decay does not keep the
        initial weights for most of a run (OFTSR's recipe; 0.9999 over 20k updates would keep 13.5% of them)."""
        if not 0.0 < decay < 1.0:
            raise UserError(f"EMA decay must be in (0, 1), got {decay}.")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange live and EMA weights in place (call twice to restore)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                live = p.detach().clone()
                p.copy_(self.shadow[n].to(p.dtype))
                self.shadow[n].copy_(live.float())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.warmup, self.num_updates = state.get("warmup", False), state.get("num_updates", 0)
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
