"""Noise schedules: a training index t -> (alpha_t, sigma_t), noising, and prediction conversions.

Every schedule is indexed by an integer t in [0, num_timesteps) (DMD2 spec section 3: "t" is an index
into the schedule's grid), with `x_t = alpha_t * x0 + sigma_t * eps`. Coefficients are kept in float64:
near t = 999 of an SD schedule alpha is ~0.068, and the eps -> x0 conversion divides by it.

Conversions (shared/methods/README.md "Converting a network output to an x0 prediction"):
    epsilon:       x0 = (x_t - sigma * eps_hat) / alpha
    v_prediction:  x0 = alpha * x_t - sigma * v_hat              (VP only: alpha^2 + sigma^2 = 1)
    flow:          x0 = (x_t - sigma * v_hat) / (alpha + sigma)  (v = eps - x0; = x_t - t v on the flow path)
    sample:        x0 = output
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient (B,) so that it broadcasts over a (B, ...) tensor."""
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Base class. Subclasses fill `alphas` and `sigmas` (float64, one entry per index)."""

    alphas: torch.Tensor
    sigmas: torch.Tensor
    kind: str = "base"

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas.shape[0])

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """alphas and sigmas on `device`, copied once (no host round trip per call)."""
        cache = self.__dict__.setdefault("_device_tables", {})
        key = str(device)
        if key not in cache:
            cache[key] = (self.alphas.to(device), self.sigmas.to(device))
        return cache[key]

    def coefficients(self, t: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) in float64 for integer indices t of shape (B,)."""
        device = device if device is not None else t.device
        alphas, sigmas = self._tables(device)
        idx = t.long().to(device)
        return alphas[idx], sigmas[idx]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0.device)
        out = _expand(a, x0) * x0.double() + _expand(s, x0) * eps.double()
        return out.to(x0.dtype)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the network was trained to receive for index t (float)."""
        return t.float()

    def prior_std(self, t: int) -> float:
        """Standard deviation of the pure-noise input a generator reads at index t (VP/flow: 1)."""
        return 1.0

    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Convert a network output of `prediction_type` at (x_t, t) into an x0 prediction."""
        if prediction_type == "sample":
            return output
        a, s = self.coefficients(t, x_t.device)
        a, s = _expand(a, x_t), _expand(s, x_t)
        out, xt = output.double(), x_t.double()
        if prediction_type == "epsilon":
            x0 = (xt - s * out) / a
        elif prediction_type == "v_prediction":
            x0 = a * xt - s * out
        elif prediction_type == "flow":
            # v = eps - x0, so x_t = (a + s) x0 + s v; a + s = 1 on the rectified-flow path.
            x0 = (xt - s * out) / (a + s)
        else:
            raise ValueError(f"Unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")
        return x0.to(output.dtype)

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Inverse of `to_x0`: the network output that would give x0 at (x_t, t)."""
        if prediction_type == "sample":
            return x0
        a, s = self.coefficients(t, x_t.device)
        a, s = _expand(a, x_t), _expand(s, x_t)
        x0d, xt = x0.double(), x_t.double()
        eps = (xt - a * x0d) / s
        if prediction_type == "epsilon":
            out = eps
        elif prediction_type == "v_prediction":
            out = a * eps - s * x0d
        elif prediction_type == "flow":
            out = eps - x0d
        else:
            raise ValueError(f"Unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")
        return out.to(x0.dtype)

    def ddim_step(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """Deterministic step t -> s: x_s = a_s x0 + (sigma_s / sigma_t)(x_t - a_t x0); s=None means clean."""
        if s is None:
            return x0
        a_t, s_t = self.coefficients(t, x_t.device)
        a_s, s_s = self.coefficients(s, x_t.device)
        x0d = x0.double()
        out = _expand(a_s, x0) * x0d + _expand(s_s / s_t, x0) * (x_t.double() - _expand(a_t, x0) * x0d)
        return out.to(x_t.dtype)


class DiscreteVPSchedule(NoiseSchedule):
    """DDPM / DDIM / Stable Diffusion: alpha = sqrt(abar), sigma = sqrt(1 - abar), t in 0..T-1."""

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = alphas_cumprod.double()
        self.alphas_cumprod = abar
        self.alphas = abar.sqrt()
        self.sigmas = (1 - abar).sqrt()

    @classmethod
    def from_betas(cls, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000):
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "squaredcos_cap_v2":
            steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
            abar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"Unsupported beta_schedule {beta_schedule!r}.")
        return cls(torch.cumprod(1 - betas, dim=0))


class KarrasSchedule(NoiseSchedule):
    """EDM / VE: alpha = 1 and the Karras sigma grid, reversed so index 0 is the smallest sigma."""

    kind = "edm"

    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0, num_timesteps=1000, sigma_data=0.5):
        i = torch.arange(num_timesteps, dtype=torch.float64) / (num_timesteps - 1)
        descending = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        self.sigmas = descending.flip(0)
        self.alphas = torch.ones_like(self.sigmas)
        self.sigma_data = sigma_data

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        # EDM's c_noise = ln(sigma) / 4, which diffusers' EDM schedulers also feed the UNet.
        return (self._tables(t.device)[1][t.long()].log() / 4).float()

    def prior_std(self, t: int) -> float:
        return float(self.sigmas[t])


class RectifiedFlowSchedule(NoiseSchedule):
    """Flow matching with noise at time 1: x_t = (1 - s) x0 + s eps, s = (t + 1) / T."""

    kind = "flow"

    def __init__(self, num_timesteps=1000):
        self.sigmas = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        self.alphas = 1 - self.sigmas

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        # diffusers' flow-matching schedulers feed the network sigma * num_train_timesteps.
        return (self._tables(t.device)[1][t.long()] * self.num_timesteps).float()


@dataclass
class ScheduleSpec:
    """A schedule plus the parametrisation of the network that uses it."""

    schedule: NoiseSchedule
    prediction_type: str


def schedule_from_scheduler_config(config: dict) -> ScheduleSpec:
    """Build the schedule described by a diffusers scheduler config (DDPM, DDIM, LCM, Euler, EDM, flow)."""
    name = config.get("_class_name", "")
    prediction_type = config.get("prediction_type", "epsilon")
    if "FlowMatch" in name:
        return ScheduleSpec(RectifiedFlowSchedule(config.get("num_train_timesteps", 1000)), "flow")
    if name.startswith("EDM"):
        sched = KarrasSchedule(
            sigma_min=config.get("sigma_min", 0.002), sigma_max=config.get("sigma_max", 80.0),
            rho=config.get("rho", 7.0), sigma_data=config.get("sigma_data", 0.5),
        )
        return ScheduleSpec(sched, "edm")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        sched = DiscreteVPSchedule(torch.cumprod(1 - betas, 0))
    else:
        sched = DiscreteVPSchedule.from_betas(
            config.get("beta_start", 0.0001), config.get("beta_end", 0.02),
            config.get("beta_schedule", "linear"), config.get("num_train_timesteps", 1000),
        )
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Scheduler prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}.")
    return ScheduleSpec(sched, prediction_type)
