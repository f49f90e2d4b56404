"""Multi-step teacher samplers (baselines and sample grids)."""

from __future__ import annotations

import torch

from .denoiser import Cond, Denoiser


def trailing_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' "trailing" spacing: one step starts at the noisiest index (T-1)."""
    step = num_timesteps / num_steps
    return [int(round(num_timesteps - i * step)) - 1 for i in range(num_steps)]


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
    sched = denoiser.schedule
    ts = trailing_timesteps(sched.num_timesteps, num_steps)
    x = z * sched.prior_std(ts[0])
    for i, t in enumerate(ts):
        tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        x0 = denoiser.guided(x, tt, cond, uncond, guidance_scale) if uncond is not None else denoiser(x, tt, cond)
        if i + 1 < len(ts):
            x = sched.ddim_step(x, x0, tt, torch.full_like(tt, ts[i + 1]))
    return x0
