"""Noise schedules of the affine family `x_t = a_t x0 + b_t u + c_t eps` and every conversion of a
network's output, in one place.

Every schedule is indexed by an integer t in [0, num_timesteps) (EDM teachers too: "t" is an index
into the schedule's grid, not a noise level). `u` is the conditioning image of super-resolution (the upsampled
low-resolution image: ResShift, conditional flows); plain diffusion has b_t = 0 and writes
alpha_t = a_t, sigma_t = c_t. Coefficients are kept in float64: near t = 999 of an SD schedule alpha is
~0.068, and the eps -> x0 conversion divides by it.

Conversions (docs/verification.md "Converting a network output to an x0 prediction"):
    epsilon:       x0 = (x_t - b u - c eps_hat) / a
    v_prediction:  x0 = a x_t - c v_hat                        (VP only: a^2 + c^2 = 1, b = 0)
    flow:          x0 = x_t - (1 - a) v_hat                    (v = start - x0, the start being noise, or
                                                                u + noise for a conditional flow; = x_t - t v)
    sample:        x0 = output
    edm:           x0 = c_skip x_t + c_out F(c_in x_t)         (Karras et al. 2022, Table 1; alpha = 1)
and their inverses (`from_x0`); `model_input` applies EDM's c_in (and ResShift's latent scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError
from .utils import per_sample

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "edm")


def _unknown(prediction_type: str) -> ValueError:
    return ValueError(f"Unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


class NoiseSchedule:
    """Base class. Subclasses fill `alphas` (a) and `sigmas` (c), float64, one entry per index, and
    `shifts` (b) when the conditioning image enters the marginal (super-resolution)."""

    alphas: torch.Tensor
    sigmas: torch.Tensor
    shifts: torch.Tensor | None = None
    kind: str = "base"
    sigma_data: float = 0.5  # EDM preconditioning

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas.shape[0])

    @property
    def shifted(self) -> bool:
        """Whether x_t depends on the conditioning image u (b_t != 0)."""
        return self.shifts is not None

    def _tables(self, device) -> tuple[torch.Tensor, ...]:
        """alphas, sigmas (and shifts) on `device`, copied once (no host round trip per call)."""
        cache = self.__dict__.setdefault("_device_tables", {})
        key = str(device)
        if key not in cache:
            tables = (self.alphas, self.sigmas) + ((self.shifts,) if self.shifted else ())
            cache[key] = tuple(x.to(device) for x in tables)
        return cache[key]

    def coefficients(self, t: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, c_t) in float64 for integer indices t of shape (B,)."""
        device = device if device is not None else t.device
        alphas, sigmas = self._tables(device)[:2]
        idx = t.long().to(device)
        return alphas[idx], sigmas[idx]

    def shift(self, t: torch.Tensor, u: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """b_t u in float64 (None when the schedule has no b_t)."""
        if not self.shifted:
            return None
        if u is None:
            raise ValueError(f"The {self.kind} schedule mixes the conditioning image into x_t; pass u.")
        b = self._tables(like.device)[2][t.long().to(like.device)]
        return per_sample(b, like) * u.double()

    def add_noise(
        self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, u: torch.Tensor | None = None
    ) -> torch.Tensor:
        a, s = self.coefficients(t, x0.device)
        out = per_sample(a, x0) * x0.double() + per_sample(s, x0) * eps.double()
        bu = self.shift(t, u, x0)
        if bu is not None:
            out = out + bu
        return out.to(x0.dtype)

    def sample_noised(self, x0: torch.Tensor, t_low: int, t_high: int, u: torch.Tensor | None = None):
        """(x_t, t, eps) with t ~ U{t_low..t_high} per sample and fresh eps (t drawn first, then eps)."""
        t = torch.randint(t_low, t_high + 1, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        return self.add_noise(x0, eps, t, u), t, eps

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time value the network was trained to receive for index t (float)."""
        return t.float()

    def prior_std(self, t: int) -> float:
        """Standard deviation of the pure-noise input a generator reads at index t (VP/flow: 1)."""
        return 1.0

    # -- preconditioning ------------------------------------------------------------------------
    def _edm_scalings(self, t: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, sigma = self.coefficients(t, device)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """What the network reads for x_t: x_t itself, or EDM's c_in x_t."""
        if prediction_type != "edm":
            return x_t
        c_in = self._edm_scalings(t, x_t.device)[2]
        return (per_sample(c_in, x_t) * x_t.double()).to(x_t.dtype)

    # -- conversions -----------------------------------------------------------------------------
    def to_x0(
        self,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prediction_type: str,
        u: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Convert a network output of `prediction_type` at (x_t, t) into an x0 prediction."""
        if prediction_type == "sample":
            return output
        out, xt = output.double(), x_t.double()
        if prediction_type == "edm":
            c_skip, c_out, _ = self._edm_scalings(t, x_t.device)
            return (per_sample(c_skip, x_t) * xt + per_sample(c_out, x_t) * out).float()
        a, s = self.coefficients(t, x_t.device)
        a, s = per_sample(a, x_t), per_sample(s, x_t)
        bu = self.shift(t, u, x_t)
        if bu is not None:
            xt = xt - bu
        if prediction_type == "epsilon":
            x0 = (xt - s * out) / a
        elif prediction_type == "v_prediction":
            x0 = a * xt - s * out
        elif prediction_type == "flow":
            # x_t = a x0 + (1 - a) start and v = start - x0, so x0 = x_t - (1 - a) v. With no b_t this is
            # written as (x_t - c v) / (a + c) (a + c = 1 on the rectified-flow path).
            x0 = (xt - s * out) / (a + s) if bu is None else (x_t.double() - (1 - a) * out)
        else:
            raise _unknown(prediction_type)
        return x0.to(output.dtype)

    def eps_from_x0(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, u: torch.Tensor | None = None
    ) -> torch.Tensor:
        """eps_hat = (x_t - a x0 - b u) / c, in float64."""
        a, s = self.coefficients(t, x_t.device)
        xt = x_t.double()
        bu = self.shift(t, u, x_t)
        if bu is not None:
            xt = xt - bu
        return (xt - per_sample(a, x_t) * x0.double()) / per_sample(s, x_t)

    def from_x0(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str, u: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Inverse of `to_x0`: the network output that would give x0 at (x_t, t)."""
        if prediction_type == "sample":
            return x0
        x0d = x0.double()
        if prediction_type == "edm":
            c_skip, c_out, _ = self._edm_scalings(t, x_t.device)
            return ((x0d - per_sample(c_skip, x_t) * x_t.double()) / per_sample(c_out, x_t)).to(x0.dtype)
        a, s = self.coefficients(t, x_t.device)
        a, s = per_sample(a, x_t), per_sample(s, x_t)
        eps = self.eps_from_x0(x0, x_t, t, u)
        if prediction_type == "epsilon":
            out = eps
        elif prediction_type == "v_prediction":
            out = a * eps - s * x0d
        elif prediction_type == "flow":
            out = eps - x0d if not self.shifted else (x_t.double() - x0d) / (1 - a)
        else:
            raise _unknown(prediction_type)
        return out.to(x0.dtype)

    def denoising_target(
        self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str, u: torch.Tensor | None = None
    ):
        """(target for the network's native output, per-sample weight or None): each parametrisation's own
        denoising objective (as DMD2's critic trains: eps-MSE unweighted for eps networks; EDM: x0-MSE weighted by
        1/sigma^2 + 1/sigma_data^2, the output being D = c_skip x + c_out F)."""
        if prediction_type == "epsilon":
            return eps, None
        if prediction_type == "sample":
            return x0, None
        a, s = self.coefficients(t, x0.device)
        if prediction_type == "edm":
            return x0, (1 / s**2 + 1 / self.sigma_data**2).float()
        if prediction_type == "v_prediction":
            a, s = per_sample(a, x0).float(), per_sample(s, x0).float()
            return a * eps - s * x0, None
        if prediction_type == "flow":
            if self.shifted:  # v = start - x0 with start = (b u + c eps) / (1 - a)
                x_t = self.add_noise(x0, eps, t, u)
                return self.from_x0(x0, x_t, t, "flow", u), None
            return eps - x0, None
        raise _unknown(prediction_type)

    def ddim_step(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor | None,
        u: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Deterministic step t -> s: x_s = a_s x0 + b_s u + (c_s / c_t)(x_t - a_t x0 - b_t u); s=None: clean."""
        if s is None:
            return x0
        a_t, s_t = self.coefficients(t, x_t.device)
        a_s, s_s = self.coefficients(s, x_t.device)
        x0d = x0.double()
        residual = x_t.double() - per_sample(a_t, x0) * x0d
        bu_t, bu_s = self.shift(t, u, x_t), self.shift(s, u, x_t)
        if bu_t is not None:
            residual = residual - bu_t
        out = per_sample(a_s, x0) * x0d + per_sample(s_s / s_t, x0) * residual
        if bu_s is not None:
            out = out + bu_s
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


class ResShiftSchedule(NoiseSchedule):
    """ResShift (Yue et al. 2023), TAD-SR's teacher: a = 1 - eta, b = eta, c = kappa sqrt(eta), T steps.

    sqrt(eta_i) = s_1 r^(((i-1)/(T-1))^p (T-1)), s_1 = min(m / kappa, m, sqrt(0.001)), r = (e_end / s_1)^(1/(T-1)),
    so that sqrt(eta) runs from s_1 to e_end. With `scale_input` the network reads
    x_t / sqrt(kappa^2 eta_t + 1) (ResShift's latent input scaling)."""

    kind = "resshift"

    def __init__(
        self,
        num_timesteps: int = 15,
        kappa: float = 2.0,
        min_noise: float = 0.04,
        eta_end: float = 0.99,
        power: float = 0.3,
        scale_input: bool = False,
    ):
        T = num_timesteps
        if T < 2 or not 0 < eta_end < 1 or min(kappa, min_noise, power) <= 0:
            raise UserError(
                f"A ResShift schedule needs num_timesteps >= 2, 0 < eta_end < 1 and positive kappa, min_noise and "
                f"power; got {T}, {eta_end}, {kappa}, {min_noise}, {power}."
            )
        s1 = min(min_noise / kappa, min_noise, math.sqrt(0.001))
        i = torch.arange(1, T + 1, dtype=torch.float64)
        r = (eta_end / s1) ** (1 / (T - 1))
        sqrt_eta = s1 * r ** (((i - 1) / (T - 1)) ** power * (T - 1))
        self.etas = sqrt_eta**2
        self.kappa, self.scale_input = kappa, scale_input
        self.alphas, self.shifts, self.sigmas = 1 - self.etas, self.etas.clone(), kappa * sqrt_eta

    def model_input(self, x_t, t, prediction_type):
        if not self.scale_input:
            return super().model_input(x_t, t, prediction_type)
        eta = self.etas.to(x_t.device)[t.long()]
        return (x_t.double() / per_sample((self.kappa**2 * eta + 1).sqrt(), x_t)).to(x_t.dtype)


class ConditionalFlowSchedule(NoiseSchedule):
    """Noise-augmented conditional rectified flow (OFTSR stage 1): the path runs from the start state
    sqrt(1 - sigma_p^2) u + sigma_p eps (index T-1: time 0 in OFTSR's notation) to the data x0 (OFTSR's
    x1, time 1). With r = (t + 1) / T: a = 1 - r, b = r sqrt(1 - sigma_p^2), c = r sigma_p.
    The network reads OFTSR's time (1 - r) * 999."""

    kind = "conditional_flow"

    def __init__(self, sigma_p: float = 0.2, num_timesteps: int = 1000):
        if not 0 < sigma_p <= 1:
            raise UserError(f"sigma_p must lie in (0, 1], got {sigma_p}.")
        r = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        self.sigma_p = sigma_p
        self.alphas, self.shifts, self.sigmas = 1 - r, r * math.sqrt(1 - sigma_p**2), r * sigma_p

    def model_time(self, t):
        return ((1 - (t.double() + 1) / self.num_timesteps) * 999).float()


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
            sigma_min=config.get("sigma_min", 0.002),
            sigma_max=config.get("sigma_max", 80.0),
            rho=config.get("rho", 7.0),
            sigma_data=config.get("sigma_data", 0.5),
        )
        return ScheduleSpec(sched, "edm")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        sched = DiscreteVPSchedule(torch.cumprod(1 - betas, 0))
    else:
        sched = DiscreteVPSchedule.from_betas(
            config.get("beta_start", 0.0001),
            config.get("beta_end", 0.02),
            config.get("beta_schedule", "linear"),
            config.get("num_train_timesteps", 1000),
        )
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Scheduler prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}."
        )
    return ScheduleSpec(sched, prediction_type)
