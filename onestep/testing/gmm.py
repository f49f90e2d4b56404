"""The shared small-scale test bed (docs/verification.md): Gaussian mixtures with an exact denoiser.

For x_t = a x0 + c eps with x0 ~ sum_k pi_k N(mu_k, S_k), the posterior mean is exact:
    S'_k = a^2 S_k + c^2 I,  w_k ∝ pi_k N(x_t; a mu_k, S'_k),
    E[x0 | x_t] = sum_k w_k (mu_k + a S_k S'_k^{-1} (x_t - a mu_k)).
Everything here is float64 with Cholesky solves. Metrics: energy distance, MMD, mode coverage.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..schedules import NoiseSchedule
from ..utils import sinusoidal_embedding


class GaussianMixture:
    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor):
        self.means = means.double()  # (K, d)
        self.covs = covs.double()  # (K, d, d)
        self.weights = weights.double() / weights.sum()  # (K,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def circle(
        cls,
        k: int = 8,
        radius: float = 1.0,
        std: float = 0.05,
        weights: torch.Tensor | None = None,
        shift: float = 0.0,
    ) -> GaussianMixture:
        """DMD2's test bed: k isotropic components on a circle, weights ∝ k+1 unless given."""
        angles = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
        means = radius * torch.stack([angles.cos(), angles.sin()], 1) + shift
        covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(k, 2, 2).clone()
        w = weights if weights is not None else torch.arange(1, k + 1, dtype=torch.float64)
        return cls(means, covs, w)

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[comp]
        x = self.means[comp] + (chol @ z.unsqueeze(-1)).squeeze(-1)
        return (x, comp) if return_labels else x

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for per-sample coefficients a, c of shape (B,)."""
        x = x_t.double()
        a, c = a.double().reshape(-1, 1, 1, 1), c.double().reshape(-1, 1, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        S = self.covs.to(x.device).unsqueeze(0)  # (1, K, d, d)
        Sp = a**2 * S + c**2 * eye  # (B, K, d, d)
        L = torch.linalg.cholesky(Sp)
        mu = self.means.to(x.device).unsqueeze(0)  # (1, K, d)
        diff = x.unsqueeze(1) - a[..., 0] * mu  # (B, K, d)
        sol = torch.cholesky_solve(diff.unsqueeze(-1), L)  # S'^{-1} diff
        maha = (diff.unsqueeze(-1) * sol).sum((-2, -1))  # (B, K)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        logw = torch.log(self.weights.to(x.device)) - 0.5 * (maha + logdet)
        w = torch.softmax(logw, dim=1)
        comp_mean = mu + a[..., 0] * (S @ sol).squeeze(-1)  # (B, K, d)
        return (w.unsqueeze(-1) * comp_mean).sum(1)


class AnalyticDenoiser(nn.Module):
    """A network-shaped exact teacher: (x_t, t, cond) -> E[x0 | x_t] (prediction type "sample")."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.gmm, self.schedule = gmm, schedule
        self.register_buffer("_device_anchor", torch.zeros(()))

    def forward(self, x, time, cond=None):
        a, c = self.schedule.coefficients(time.round().long(), x.device)
        return self.gmm.posterior_mean(x, a, c).to(x.dtype)


class MLPDenoiserNet(nn.Module):
    """Teacher-net of the toy recipes: MLP (depth x width, SiLU) on [x, sinusoidal t embedding, class]."""

    def __init__(
        self, dim: int = 2, width: int = 128, depth: int = 3, time_dim: int = 32, num_classes: int | None = None
    ):
        super().__init__()
        self.time_dim = time_dim
        self.class_emb = nn.Embedding(num_classes, time_dim) if num_classes else None
        layers, d_in = [], dim + time_dim
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(d_in, width), nn.SiLU()))
            d_in = width
        self.blocks = nn.ModuleList(layers)  # "blocks.1" is the second hidden layer (the D-head's input)
        self.out = nn.Linear(width, dim)

    def forward(self, x, time, cond=None):
        emb = sinusoidal_embedding(time, self.time_dim)
        if self.class_emb is not None and cond is not None and cond.class_labels is not None:
            emb = emb + self.class_emb(cond.class_labels)
        h = torch.cat([x, emb.to(x.dtype)], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


# -- metrics --------------------------------------------------------------------------------------


def _mean_pdist(x: torch.Tensor, y: torch.Tensor, same: bool) -> torch.Tensor:
    d = torch.cdist(x.double(), y.double())
    if same:
        n = x.shape[0]
        return d.sum() / (n * (n - 1))
    return d.mean()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """ED^2 = 2 E|X-Y| - E|X-X'| - E|Y-Y'| (U-statistic within each set)."""
    return float(2 * _mean_pdist(x, y, False) - _mean_pdist(x, x, True) - _mean_pdist(y, y, True))


def energy_distance_floor(gmm: GaussianMixture, n: int = 5000, repeats: int = 20, seed: int = 0) -> float:
    """95th percentile of ED^2 between two independent true-sample sets of size n."""
    g = torch.Generator().manual_seed(seed)
    vals = sorted(energy_distance(gmm.sample(n, g), gmm.sample(n, g)) for _ in range(repeats))
    return vals[min(int(math.ceil(0.95 * repeats)) - 1, repeats - 1)]


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, scale: float = 1.0, bandwidths=(0.05, 0.1, 0.2, 0.5, 1.0)) -> float:
    x, y = x.double(), y.double()
    total = 0.0
    for h in bandwidths:
        k = lambda a, b, h=h: torch.exp(-(torch.cdist(a, b) ** 2) / (2 * (h * scale) ** 2))
        kxx, kyy = k(x, x), k(y, y)
        n, m = x.shape[0], y.shape[0]
        total += float(
            (kxx.sum() - kxx.diag().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
            - 2 * k(x, y).mean()
        )
    return total / len(bandwidths)


def mode_stats(gmm: GaussianMixture, x: torch.Tensor) -> dict:
    """Assign samples to the nearest component (Mahalanobis): coverage, precision, weight TV."""
    x = x.double()
    inv = torch.linalg.inv(gmm.covs)
    diff = x.unsqueeze(1) - gmm.means.unsqueeze(0)
    maha = torch.einsum("nkd,kde,nke->nk", diff, inv, diff).sqrt()
    dist, comp = maha.min(1)
    n, k = x.shape[0], gmm.means.shape[0]
    counts = torch.bincount(comp, minlength=k).double()
    covered = counts >= 0.2 * n * gmm.weights
    return {
        "modes_covered": int(covered.sum()),
        "num_modes": k,
        "precision": float((dist < 3).double().mean()),
        "weight_tv": float(0.5 * (counts / n - gmm.weights).abs().sum()),
    }
