"""Multi-step teacher samplers (baselines and sample grids)."""

from __future__ import annotations

import torch

from .denoiser import Cond, Denoiser


def trailing_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' "trailing" spacing: one step starts at the noisiest index (T-1)."""
    step = num_timesteps / num_steps
    return [int(round(num_timesteps - i * step)) - 1 for i in range(num_steps)]


def ddim_from(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    cond: Cond | None,
    timesteps: list[int],
    guidance_scale: float = 1.0,
    uncond: Cond | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from the state x_T over `timesteps` (noisiest first):
    x_s = a_s x0 + b_s u + (c_s / c_t)(x_t - a_t x0 - b_t u), u the condition's (SR teachers; else none).
    Returns the final x0_hat. No no_grad here: TAD-SR's teacher target runs it inside a training step."""
    sched, u = denoiser.schedule, cond.u if cond is not None else None
    x = x_T
    for i, t in enumerate(timesteps):
        tt = torch.full((x_T.shape[0],), t, dtype=torch.long, device=x_T.device)
        x0 = denoiser.guided(x, tt, cond, uncond, guidance_scale) if uncond is not None else denoiser(x, tt, cond)
        if i + 1 < len(timesteps):
            x = sched.ddim_step(x, x0, tt, torch.full_like(tt, timesteps[i + 1]), u)
    return x0


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    z: torch.Tensor,
    cond: Cond | None = None,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    uncond: Cond | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from pure noise with trailing spacing; returns the final x0_hat."""
    ts = trailing_timesteps(denoiser.schedule.num_timesteps, num_steps)
    return ddim_from(denoiser, z * denoiser.schedule.prior_std(ts[0]), cond, ts, guidance_scale, uncond)
