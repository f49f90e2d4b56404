"""Losses as small pure functions on tensors (no models inside), so each can be unit-tested alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2 spec 4.1 steps 4-5: g_i = (x0_fake - x0_real) / mean_{C,H,W}|x - x0_real|, NaN/inf -> 0."""
    dims = tuple(range(1, x.ndim))
    normaliser = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    grad = (x0_fake - x0_real) / normaliser
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """DMD2 spec 4.1 step 6: 0.5 * mean((x - SG[x - g])^2), whose gradient w.r.t. x is g / numel."""
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target.float(), reduction="mean")


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean-reduced (optionally per-sample weighted) squared error of a denoiser's native output."""
    err = (pred.float() - target.float()) ** 2
    if weight is not None:
        err = err * weight.reshape(-1, *([1] * (err.ndim - 1))).float()
    return err.mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating D loss: mean softplus(D(fake)) + mean softplus(-D(real)) (DMD2 spec 4.3)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: mean softplus(-D(fake))."""
    return F.softplus(-logits_fake.float()).mean()
