"""Losses: small pure functions on tensors (no models inside), so each can be unit-tested alone, and the
denoising objective (DenoisingLoss), which draws its own t and noise and calls the network it is given."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .utils import per_sample


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's distribution-matching gradient g_i = (x0_fake - x0_real) / mean_{C,H,W}|x - x0_real|, NaN/inf -> 0."""
    dims = tuple(range(1, x.ndim))
    normaliser = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    grad = (x0_fake - x0_real) / normaliser
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """DMD2's surrogate loss 0.5 * mean((x - SG[x - g])^2), whose gradient w.r.t. x is g / numel."""
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target.float(), reduction="mean")


def weighted_squared_error(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Unreduced (per-element) squared error of a denoiser's native output, optionally weighted per sample."""
    err = (pred.float() - target.float()) ** 2
    if weight is not None:
        err = err * weight.reshape(-1, *([1] * (err.ndim - 1))).float()
    return err


@dataclass
class Noised:
    """One draw of the denoising objective: the noised input and what the network should output for it."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None


class DenoisingLoss:
    """Denoising score matching in the style of EDM's training/loss.py (Karras et al. 2022, Eq. 2 with each
    parametrisation's own target): draws t ~ U{t_min..t_max} and fresh noise, calls the network, and
    returns the unreduced loss (per element; `.mean()` is the usual mean-reduced loss). Used to train
    teachers and by DMD2's critic (t over the full range, no CFG). `noise` and `error` are the
    two halves, for a caller that batches the network call with something else (DMD2's GAN pass)."""

    def __init__(self, t_min: int = 0, t_max: int | None = None):
        self.t_min, self.t_max = t_min, t_max

    def noise(self, denoiser, x0: torch.Tensor, cond=None) -> Noised:
        schedule = denoiser.schedule
        t_max = schedule.num_timesteps - 1 if self.t_max is None else self.t_max
        u = denoiser._shift_image(cond)
        x_t, t, eps = schedule.sample_noised(x0, self.t_min, t_max, u)
        target, weight = denoiser.denoising_target(x0, eps, t, cond)
        return Noised(x_t, t, eps, target, weight)

    @staticmethod
    def error(raw: torch.Tensor, noised: Noised) -> torch.Tensor:
        return weighted_squared_error(raw, noised.target, noised.weight)

    def __call__(self, denoiser, x0: torch.Tensor, cond=None, call=None) -> torch.Tensor:
        """`call(x_t, t, cond)` gives the native output (default: `denoiser.raw`; a DDP-wrapped copy's)."""
        noised = self.noise(denoiser, x0, cond)
        raw = (call or denoiser.raw)(noised.x_t, noised.t, cond)
        return self.error(raw, noised)


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating D loss: mean softplus(D(fake)) + mean softplus(-D(real)) (DMD2's diffusion GAN)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: mean softplus(-D(fake))."""
    return F.softplus(-logits_fake.float()).mean()


# -- BOOT (docs/methods/boot.md): pure functions of the Signal-ODE --------------------------


def signal_step(alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor):
    """BOOT's step coefficient delta(t, s) = 1 - (sigma_s alpha_t) / (alpha_s sigma_t), in float64, for s less noisy
    than t; the clean end (alpha_s = 1, sigma_s = 0) and a noise end with alpha_t = 0 both give delta = 1."""
    return 1 - (sigma_s.double() * alpha_t.double()) / (alpha_s.double() * sigma_t.double())


def bootstrap_target(y_t: torch.Tensor, x0_t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """BOOT's bootstrapping target y_s = y_t + delta (f(x_t, t) - y_t), one teacher DDIM step in signal space
    (float64)."""
    y = y_t.double()
    return y + per_sample(delta.double(), y) * (x0_t.double() - y)


def bootstrap_loss(
    g_s: torch.Tensor, target: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BOOT's bootstrapping loss: mean over the batch of (w_i / delta^2) mean_{C,H,W} (g(eps, s) - SG[target])^2; the
    1/delta^2 makes it a derivative match ((g(s) - g(t)) / delta - (f - g(t)))^2."""
    dims = tuple(range(1, g_s.ndim))
    err = (g_s.float() - target.detach().float()).square().mean(dim=dims)
    scale = 1 / delta.double() ** 2 if weight is None else weight.double() / delta.double() ** 2
    return (scale.float() * err).mean()


def boundary_loss(g_T: torch.Tensor, x0_T: torch.Tensor) -> torch.Tensor:
    """BOOT's boundary loss (B-paper): mean((g(eps, T) - SG[f(eps, T)])^2) over every element."""
    return F.mse_loss(g_T.float(), x0_T.detach().float())


# -- TAD-SR (docs/methods/tadsr.md) --------------------------------------------------------


def score_difference(eps_student: torch.Tensor, eps_reference: torch.Tensor) -> torch.Tensor:
    """TAD-SR's score difference g = eps_hat(x_s) - eps_hat(x_r) (HSD; vanilla SDS passes the drawn noise as
    the reference), NaN/inf -> 0, without gradient."""
    g = (eps_student.double() - eps_reference.double()).detach()
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).float()


def score_distillation_loss(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """TAD-SR's HSD loss mean_elems(SG[g] * z), whose gradient w.r.t. z is g / numel."""
    return (g.detach().float() * z.float()).mean()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """TAD-SR's hinge D loss: mean_b[mean_L relu(1 - D(real)) + mean_L relu(1 + D(fake))] on (B, L) logits."""
    real = F.relu(1 - logits_real.float()).flatten(1).mean(1)
    fake = F.relu(1 + logits_fake.float()).flatten(1).mean(1)
    return (real + fake).mean()


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """TAD-SR's hinge G loss: -mean_b mean_L D(fake)."""
    return -logits_fake.float().mean()


# -- OFTSR (docs/methods/oftsr.md), in OFTSR's notation: time 0 = start, 1 = data ---------


def rk2_velocity(k1: torch.Tensor, k2: torch.Tensor, ratio: float) -> torch.Tensor:
    """The RK2 velocity over a step whose second evaluation sits at ratio r of it: k1 + (k2 - k1) / (2r)
    (midpoint r = 1/2 gives k2, Heun r = 1, Ralston r = 2/3)."""
    return k1 + (k2 - k1) / (2 * ratio)


def trajectory_target(v_t: torch.Tensor, v_bar: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """OFTSR's distillation target SG[v_t + (h / s)(v_bar - v_t)], the average velocity to time s that puts
    x0 + s v(s) on the teacher's step x_t + h v_bar from x_t = x0 + t v(t)."""
    v_t, v_bar = v_t.detach().float(), v_bar.detach().float()
    return (v_t + per_sample((h / s).float(), v_t) * (v_bar - v_t)).detach()


def time_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b[w_b mean_elems (pred - target)^2] (w = 1 when None): L_distill, L_BC, and with w = (1 - t)^2
    OFTSR's L_align (the target is not detached here: L_align's gradient goes only into pred by design)."""
    err = (pred.float() - target.float()).square().flatten(1).mean(1)
    return (err if weight is None else weight.float() * err).mean()
