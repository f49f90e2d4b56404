"""One- and few-step generators: a Denoiser queried at fixed conditioning timesteps.

As in DMD2, G reads pure noise at t_c (scaled by the schedule's prior std: 1 for VP and flow,
sigma_max for EDM) and returns x0. Few-step generation re-noises each x0 to the next listed timestep
with fresh noise; training uses backward simulation to reach the inputs the sampler will produce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .denoiser import Cond, Denoiser
from .errors import UserError

GeneratorCall = Callable[[torch.Tensor, torch.Tensor, Cond | None], torch.Tensor]


class OneStepGenerator(nn.Module):
    """G(x_t, t, cond) -> x0, trained at the timesteps in `timesteps` (descending, first = pure noise)."""

    def __init__(self, denoiser: Denoiser, timesteps: list[int]):
        super().__init__()
        if not timesteps or list(timesteps) != sorted(set(timesteps), reverse=True):
            raise UserError(f"--conditioning_timesteps must be distinct and descending, got {list(timesteps)}.")
        if max(timesteps) >= denoiser.schedule.num_timesteps or min(timesteps) < 0:
            raise UserError(
                f"--conditioning_timesteps {list(timesteps)} fall outside the schedule's 0..{denoiser.schedule.num_timesteps - 1}."
            )
        self.denoiser = denoiser
        self.timesteps = [int(t) for t in timesteps]

    @property
    def schedule(self):
        return self.denoiser.schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        return self.denoiser(x_t, t, cond)

    def noise_input(self, z: torch.Tensor) -> torch.Tensor:
        """Pure noise z ~ N(0, I) as the input at the first timestep."""
        return z * self.schedule.prior_std(self.timesteps[0])

    def timestep_at(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """Timestep list entry `index` as a (B,) index tensor for a batch like `like`."""
        return torch.full((like.shape[0],), self.timesteps[index], dtype=torch.long, device=like.device)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        cond: Cond | None = None,
        num_steps: int | None = None,
        call: GeneratorCall | None = None,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the trained chain: G at t_0 -> x0 -> re-noise to t_1 with fresh noise -> ... -> x0."""
        call = call or self
        noise_fn = noise_fn or torch.randn_like
        steps = num_steps or len(self.timesteps)
        x = self.noise_input(z)
        for i in range(steps):
            x0 = call(x, self.timestep_at(i, x), cond)
            if i + 1 < steps:
                x = self.schedule.add_noise(x0, noise_fn(x0), self.timestep_at(i + 1, x0))
        return x0

    @torch.no_grad()
    def backward_simulate(
        self, z: torch.Tensor, cond: Cond | None, k: int, call: GeneratorCall | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DMD2's backward simulation for few-step students: the generator input at list entry k, made by the
        current G itself.

        k = 0: pure noise z. k > 0: from fresh pure noise run G through the first k entries (each x0
        re-noised to the next entry with fresh, independent noise), then noise the last x0 to t_k with
        this iteration's noise z. Dataset samples are never touched."""
        call = call or self
        if k == 0:
            return self.noise_input(z), self.timestep_at(0, z)
        x = self.noise_input(torch.randn_like(z))
        for i in range(k):
            x0 = call(x, self.timestep_at(i, x), cond)
            if i + 1 < k:
                x = self.schedule.add_noise(x0, torch.randn_like(x0), self.timestep_at(i + 1, x0))
        t_k = self.timestep_at(k, z)
        return self.schedule.add_noise(x0, z, t_k), t_k


CLEAN = -1  # index of the virtual clean time (alpha = 1, sigma = 0) of a time-conditioned student


class SignalGenerator(nn.Module):
    """BOOT's time-conditioned student g(eps, t, cond) (docs/methods/boot.md): the network reads the pure
    noise and is evaluated as the teacher would be at the fixed noise level `param_timestep` (its conversion
    coefficients and preconditioning), but is told time t through its timestep embedding. t is an index tensor;
    CLEAN (-1) is the clean end, embedded as time 0 (EDM: the smallest sigma's c_noise, as ln 0 has none).
    With the teacher's weights and param_timestep = T, g(eps, T) equals the teacher's x0 prediction exactly."""

    def __init__(self, denoiser: Denoiser, param_timestep: int):
        super().__init__()
        self.denoiser = denoiser
        self.param_timestep = int(param_timestep)

    @property
    def schedule(self):
        return self.denoiser.schedule

    def noise_input(self, eps: torch.Tensor) -> torch.Tensor:
        """The network's input x before preconditioning: unit noise times the prior std at param_timestep."""
        return eps * self.schedule.prior_std(self.param_timestep)

    def clean_label(self) -> float:
        if self.schedule.kind == "edm":
            return float(self.schedule.model_time(torch.zeros(1, dtype=torch.long))[0])
        return 0.0

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the network is told for each index (CLEAN -> clean_label())."""
        inner = self.schedule.model_time(t.clamp(min=0))
        return torch.where(t < 0, torch.full_like(inner, self.clean_label()), inner)

    def forward(self, eps: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        sched, kind = self.schedule, self.denoiser.prediction_type
        p = torch.full_like(t, self.param_timestep)
        x = self.noise_input(eps)
        out = self.denoiser.adapter(sched.model_input(x, p, kind), self.labels(t).to(x.device), cond)
        return sched.to_x0(out.float(), x.float(), p, kind)

    def conversion(self) -> dict:
        """The sampling contract as numbers: x = input_scale * eps; x0 = skip * x + output_scale * U(input_gain * x,
        embed_timestep). Every parametrisation's conversion is affine in (x, U), so these four numbers (float64)
        carry it into a pipeline that does not know the schedule."""
        sched, kind = self.schedule, self.denoiser.prediction_type
        p = torch.tensor([self.param_timestep])
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        alpha, sigma = sched.coefficients(p)
        return {
            "embed_timestep": self.clean_label(),
            "input_scale": float(sched.prior_std(self.param_timestep)),
            "input_gain": float(sched.model_input(one, p, kind)[0]),
            "skip": float(sched.to_x0(zero, one, p, kind)[0]),
            "output_scale": float(sched.to_x0(one, zero, p, kind)[0]),
            "prediction_type": kind,
            "param_timestep": self.param_timestep,
            "alpha": float(alpha[0]),
            "sigma": float(sigma[0]),
        }
