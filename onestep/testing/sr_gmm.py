"""The conditional (super-resolution) Gaussian-mixture test bed of docs/verification.md, with the exact
posterior, for the TAD-SR and OFTSR recipes and tests.

x ~ sum_k pi_k N(mu_k, S_k) in R^8 ("HR pixels"), y = A x + sigma_y n with A the 2-tap average pooling (4 x 8),
u = U y with U the nearest upsampling (8 x 4). The posterior p(x | y) is the mixture (pi'_k, m_k, C_k):
    R_k = A S_k A^T + sigma_y^2 I,  pi'_k ∝ pi_k N(y; A mu_k, R_k),
    m_k = mu_k + S_k A^T R_k^{-1} (y - A mu_k),  C_k = S_k - S_k A^T R_k^{-1} A S_k,
and for x_t = a x + b u + c eps (any member of the affine family; OFTSR's path has a = t):
    E[x | x_t, y] = sum_k w_k (m_k + a C_k (a^2 C_k + c^2 I)^{-1} (x_t - a m_k - b u)),
    w_k ∝ pi'_k N(x_t; a m_k + b u, a^2 C_k + c^2 I).
Components differ in the part A removes (+-c (1,-1,1,-1,...)) and in smooth ramps, plus a shared random offset
(S_k = 0.1^2 I + 0.5^2 1 1^T), so posteriors are multimodal: the posterior mean is blurry, samples are sharp.
Everything is float64 with Cholesky solves. The network convention of u: the conditioning image `cond.image`.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..denoiser import Cond
from ..utils import sinusoidal_embedding
from .gmm import energy_distance

DIM, LOW = 8, 4
PEAK_TO_PEAK = 2.0  # the PSNR range R of the README ("2 for [-1, 1]"), fixed so PSNRs compare across runs


def pooling_matrix() -> torch.Tensor:
    A = torch.zeros(LOW, DIM, dtype=torch.float64)
    for i in range(LOW):
        A[i, 2 * i] = A[i, 2 * i + 1] = 0.5
    return A


def upsample(y: torch.Tensor) -> torch.Tensor:
    """u = U y: nearest upsampling (each low-resolution value twice)."""
    return y.repeat_interleave(2, dim=-1)


def low_resolution(u: torch.Tensor) -> torch.Tensor:
    """y from u = U y (the inverse of `upsample` on its range)."""
    return u[..., 0::2]


class ConditionalGMM:
    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor, sigma_y: float = 0.05):
        self.means, self.covs = means.double(), covs.double()
        self.weights = weights.double() / weights.sum()
        self.sigma_y, self.A = sigma_y, pooling_matrix()
        A, S = self.A, self.covs
        self.R = A @ S @ A.T + sigma_y**2 * torch.eye(LOW, dtype=torch.float64)  # (K, 4, 4)
        self.gain = S @ A.T @ torch.linalg.inv(self.R)  # S A^T R^{-1}, (K, 8, 4)
        self.post_covs = S - self.gain @ A @ S  # C_k
        self.post_covs = 0.5 * (self.post_covs + self.post_covs.transpose(1, 2))

    @classmethod
    def default(cls, contrast: float = 0.6, ramp: float = 0.5, sigma_y: float = 0.05) -> ConditionalGMM:
        alternating = torch.tensor([1.0, -1.0] * (DIM // 2), dtype=torch.float64)
        smooth = torch.linspace(-1, 1, DIM, dtype=torch.float64)
        means = torch.stack([contrast * alternating, -contrast * alternating, ramp * smooth, -ramp * smooth])
        ones = torch.ones(DIM, DIM, dtype=torch.float64)
        cov = 0.1**2 * torch.eye(DIM, dtype=torch.float64) + 0.5**2 * ones
        return cls(means, cov.expand(4, DIM, DIM).clone(), torch.ones(4), sigma_y)

    # -- data -------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, u): HR samples and their upsampled noisy measurements."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, DIM, dtype=torch.float64, generator=generator)
        x = self.means[comp] + (torch.linalg.cholesky(self.covs)[comp] @ z.unsqueeze(-1)).squeeze(-1)
        return x, self.measure(x, generator)

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x.shape[0], LOW, dtype=torch.float64, generator=generator)
        return upsample(x.double() @ self.A.T + self.sigma_y * noise)

    # -- the exact posterior ------------------------------------------------------------------------
    def posterior(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pi' (B, K), m (B, K, 8)) for measurements u; the covariances C_k are `post_covs`."""
        y = low_resolution(u.double())
        diff = y.unsqueeze(1) - self.means @ self.A.T  # (B, K, 4)
        L = torch.linalg.cholesky(self.R)
        sol = torch.cholesky_solve(diff.unsqueeze(-1), L.unsqueeze(0)).squeeze(-1)
        maha = (diff * sol).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        weights = torch.softmax(torch.log(self.weights) - 0.5 * (maha + logdet), dim=1)
        means = self.means + (self.gain @ diff.unsqueeze(-1)).squeeze(-1)
        return weights, means

    def posterior_mean(self, u: torch.Tensor) -> torch.Tensor:
        """E[x | y], the MMSE estimate (the fidelity ceiling)."""
        w, m = self.posterior(u)
        return (w.unsqueeze(-1) * m).sum(1)

    def posterior_samples(self, u: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n, 8) exact posterior samples for each of the B measurements."""
        w, m = self.posterior(u)
        comp = torch.multinomial(w, n, replacement=True, generator=generator)  # (B, n)
        z = torch.randn(*comp.shape, DIM, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.post_covs)[comp]
        return torch.gather(m, 1, comp.unsqueeze(-1).expand(-1, -1, DIM)) + (chol @ z.unsqueeze(-1)).squeeze(-1)

    def denoise(self, x_t: torch.Tensor, u: torch.Tensor, a, b, c) -> torch.Tensor:
        """E[x | x_t, y] for x_t = a x + b u + c eps, per-sample coefficients a, b, c of shape (B,)."""
        x, u = x_t.double(), u.double()
        a, b, c = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1) for v in (a, b, c))
        w, m = self.posterior(u)
        C = self.post_covs.unsqueeze(0)  # (1, K, 8, 8)
        eye = torch.eye(DIM, dtype=torch.float64)
        L = torch.linalg.cholesky(a.unsqueeze(-1) ** 2 * C + c.unsqueeze(-1) ** 2 * eye)
        diff = x.unsqueeze(1) - a * m - b * u.unsqueeze(1)  # (B, K, 8)
        sol = torch.cholesky_solve(diff.unsqueeze(-1), L)
        maha = (diff.unsqueeze(-1) * sol).sum((-2, -1))
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        post = torch.softmax(torch.log(w) - 0.5 * (maha + logdet), dim=1)
        comp = m + a * (C @ sol).squeeze(-1)
        return (post.unsqueeze(-1) * comp).sum(1)


# -- network-shaped exact teachers ---------------------------------------------------------------------


class AnalyticSRDenoiser(nn.Module):
    """(x_t, time, cond) -> E[x | x_t, y] for a schedule indexed by the network's time (ResShift, VP):
    a "sample"-prediction teacher."""

    def __init__(self, cgmm: ConditionalGMM, schedule):
        super().__init__()
        self.cgmm, self.schedule = cgmm, schedule
        self.register_buffer("_device_anchor", torch.zeros(()))

    def forward(self, x, time, cond: Cond):
        t = time.round().long()
        a, c = self.schedule.coefficients(t, x.device)
        b = self.schedule.shifts[t] if self.schedule.shifted else torch.zeros_like(a)
        return self.cgmm.denoise(x, cond.image, a, b, c).to(x.dtype)


def flow_coefficients(tau: torch.Tensor, sigma_p: float):
    """OFTSR's path at time tau (0 = start, 1 = data): a = tau, b = (1 - tau) sqrt(1 - sigma_p^2), c = (1 - tau) sigma_p."""
    tau = tau.double()
    return tau, (1 - tau) * math.sqrt(1 - sigma_p**2), (1 - tau) * sigma_p


def exact_velocity(cgmm: ConditionalGMM, x_t: torch.Tensor, u: torch.Tensor, tau, sigma_p: float) -> torch.Tensor:
    """OFTSR's exact teacher velocity v*(x_t, tau) = (E[x1 | x_t, y] - x_t) / (1 - tau) (tau < 1)."""
    tau = torch.as_tensor(tau, dtype=torch.float64).expand(x_t.shape[0])
    a, b, c = flow_coefficients(tau, sigma_p)
    return (cgmm.denoise(x_t, u, a, b, c) - x_t.double()) / (1 - tau).unsqueeze(-1)


class AnalyticFlowNet(nn.Module):
    """The exact teacher as a network in this project's flow convention (what a trained one outputs): the
    output is -v* at OFTSR time tau = time / 999 (schedules.ConditionalFlowSchedule: our velocity = start - data)."""

    def __init__(self, cgmm: ConditionalGMM, sigma_p: float):
        super().__init__()
        self.cgmm, self.sigma_p = cgmm, sigma_p
        self.register_buffer("_device_anchor", torch.zeros(()))

    def forward(self, x, time, cond: Cond):
        tau = (time.double() / 999).clamp(max=1 - 1e-6)
        return -exact_velocity(self.cgmm, x, cond.image, tau, self.sigma_p).to(x.dtype)


def exact_flow_state(
    cgmm: ConditionalGMM, x0: torch.Tensor, u: torch.Tensor, sigma_p: float, t_end, steps: int = 200
) -> torch.Tensor:
    """The exact teacher ODE from x0 (tau = 0) to t_end (a float, or one time per sample, each < 1): `steps`
    classical RK4 steps in float64."""
    x, u = x0.double(), u.double()
    stop = torch.as_tensor(t_end, dtype=torch.float64).expand(x.shape[0])
    h = (stop / steps).unsqueeze(-1)
    v = lambda x, t: exact_velocity(cgmm, x, u, t, sigma_p)  # noqa: E731
    for i in range(steps):
        t = i * h.squeeze(-1)
        k1 = v(x, t)
        k2 = v(x + 0.5 * h * k1, t + 0.5 * h.squeeze(-1))
        k3 = v(x + 0.5 * h * k2, t + 0.5 * h.squeeze(-1))
        k4 = v(x + h * k3, t + h.squeeze(-1))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def exact_flow_endpoint(cgmm: ConditionalGMM, x0: torch.Tensor, u: torch.Tensor, sigma_p: float, steps: int = 200):
    """The exact ODE's endpoint, a posterior sample: RK4 to 1 - 1/steps, then the one-step estimate
    x_t + (1 - t) v* (v* is singular at 1)."""
    stop = 1 - 1 / steps
    x = exact_flow_state(cgmm, x0, u, sigma_p, stop, steps - 1)
    return x + (1 - stop) * exact_velocity(cgmm, x, u, stop, sigma_p)


def exact_average_velocity(cgmm: ConditionalGMM, x0, u, sigma_p: float, t: torch.Tensor, steps: int = 200):
    """The exact average-velocity map OFTSR's student learns: (X(t) - x0) / t, and v*(x0, 0) at t = 0."""
    tt = t.double().clamp(min=1e-12).unsqueeze(-1)
    average = (exact_flow_state(cgmm, x0, u, sigma_p, tt.squeeze(-1), steps) - x0.double()) / tt
    at_zero = exact_velocity(cgmm, x0, u, 0.0, sigma_p)
    return torch.where(t.unsqueeze(-1) > 0, average, at_zero)


# -- networks -------------------------------------------------------------------------------------------


class ConditionalMLP(nn.Module):
    """Teacher-net / student of the SR toy recipes: MLP (depth x width, SiLU) on [x, u, sinusoidal time]. Its
    hidden layers are "blocks.0", "blocks.1", ... (TAD-SR's encoder features)."""

    def __init__(self, dim: int = DIM, width: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        layers, d_in = [], 2 * dim + time_dim
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(d_in, width), nn.SiLU()))
            d_in = width
        self.blocks = nn.ModuleList(layers)
        self.out = nn.Linear(width, dim)

    def forward(self, x, time, cond: Cond):
        h = torch.cat([x, cond.image.to(x.dtype), sinusoidal_embedding(time, self.time_dim).to(x.dtype)], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


# -- metrics --------------------------------------------------------------------------------------------


def psnr(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """10 log10(R^2 / MSE) with R = PEAK_TO_PEAK; the MSE is over every (sample, coordinate) pair, and a
    (B, S, 8) estimate is compared with each of the B targets S times."""
    est, tgt = estimate.double(), target.double()
    if est.ndim == tgt.ndim + 1:
        tgt = tgt.unsqueeze(1)
    mse = float((est - tgt).square().mean())
    return 10 * math.log10(PEAK_TO_PEAK**2 / mse)


def posterior_distance(samples: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over the B measurements of ED^2 between S samples (B, S, 8) and S exact posterior samples."""
    return sum(energy_distance(samples[i], exact[i]) for i in range(samples.shape[0])) / samples.shape[0]


def posterior_spread(cgmm: ConditionalGMM, u: torch.Tensor, samples: torch.Tensor, min_weight: float = 0.1) -> dict:
    """How much of each exact posterior p(x | y) the samples (B, S, 8) spread over, per test input:
    `spread`: the samples' total variance as a share of the exact posterior's (mean over y; a mode-seeking
    sampler is below 1); `modes_covered`: over the inputs whose posterior has at least two modes of weight
    >= min_weight, the share of those modes that hold at least a fifth of their expected samples (each sample goes
    to its most probable posterior component); `multimodal_inputs`: how many inputs that is."""
    w, m = cgmm.posterior(u)  # (B, K), (B, K, 8)
    C = cgmm.post_covs
    mean = (w.unsqueeze(-1) * m).sum(1, keepdim=True)
    exact_var = (w * (torch.diagonal(C, dim1=-2, dim2=-1).sum(-1) + (m - mean).square().sum(-1))).sum(1)
    x, S = samples.double(), samples.shape[1]
    sample_var = (x - x.mean(1, keepdim=True)).square().sum((1, 2)) / (S - 1)
    L = torch.linalg.cholesky(C)  # (K, 8, 8)
    diff = (x.unsqueeze(2) - m.unsqueeze(1)).unsqueeze(-1)  # (B, S, K, 8, 1)
    z = torch.linalg.solve_triangular(L.expand(*diff.shape[:3], DIM, DIM), diff, upper=False).squeeze(-1)
    logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    component = (torch.log(w).unsqueeze(1) - 0.5 * z.square().sum(-1) - logdet).argmax(-1)  # (B, S)
    counts = torch.nn.functional.one_hot(component, w.shape[1]).sum(1).double()
    significant = w >= min_weight
    covered = (counts >= 0.2 * S * w) & significant
    multimodal = significant.sum(1) >= 2
    share = covered.sum(1).double() / significant.sum(1).clamp(min=1)
    return {
        "spread": float((sample_var / exact_var).mean()),
        "modes_covered": float(share[multimodal].mean()) if multimodal.any() else float("nan"),
        "multimodal_inputs": int(multimodal.sum()),
    }


class SRGMMBatches:
    """HR samples and their measurements, drawn per (step, micro, rank) like every batch source."""

    def __init__(self, cgmm: ConditionalGMM, batch_size: int, seed: int = 0):
        self.cgmm, self.batch_size, self.seed = cgmm, batch_size, seed

    def batch(self, step, micro, rank, device):
        from ..data import Batch
        from ..utils import seed_for

        g = torch.Generator().manual_seed(seed_for(self.seed, "sr-gmm", rank, step, micro))
        x, u = self.cgmm.sample(self.batch_size, g)
        return Batch(x.float().to(device), Cond(image=u.float().to(device)))


def test_set(cgmm: ConditionalGMM, n: int = 200, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation pairs (x, u) of the recipes."""
    return cgmm.sample(n, torch.Generator().manual_seed(seed))


# -- teacher-nets and runs through the real Trainer ---------------------------------------------------


def fit_denoiser_net(
    cgmm: ConditionalGMM,
    schedule,
    steps: int = 3000,
    batch: int = 512,
    lr: float = 2e-3,
    width: int = 128,
    seed: int = 0,
):
    """A ConditionalMLP x0-predictor regressed onto the exact E[x | x_t, y] over random (x, y, t, eps): the
    teacher-net TAD-SR's student starts from and whose hidden layers its discriminator reads."""
    from ..denoiser import Denoiser

    torch.manual_seed(seed)
    den = Denoiser(ConditionalMLP(width=width), schedule, "sample")
    exact = Denoiser(AnalyticSRDenoiser(cgmm, schedule), schedule, "sample")
    opt = torch.optim.Adam(den.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, u = (v.float() for v in cgmm.sample(batch, g))
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
        x_t = schedule.add_noise(x, torch.randn(x.shape, generator=g), t, u)
        cond = Cond(image=u)
        with torch.no_grad():
            target = exact(x_t, t, cond)
        loss = (den(x_t, t, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return den.eval().requires_grad_(False)


def fit_on_sr_gmm(
    method,
    cgmm: ConditionalGMM,
    steps: int,
    batch_size: int,
    seed: int = 0,
    ema_decay: float | None = None,
    output_dir: str | None = None,
    export: bool = False,
    checkpointing_steps: int | None = None,
    resume: bool = False,
    learning_rate_warmup: int = 0,
    lr_scheduler: str = "constant",
) -> dict:
    """Train `method` with the real Trainer on (x, u) pairs of the mixture."""
    import tempfile

    from ..trainer import Trainer, TrainerConfig

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            TrainerConfig(
                output_dir=output_dir or tmp,
                max_train_steps=steps,
                seed=seed,
                ema_decay=ema_decay,
                num_validation_images=0,
                export=export,
                log_every=100,
                checkpointing_steps=checkpointing_steps,
                resume_from_checkpoint="latest" if resume else None,
                lr_warmup_steps=learning_rate_warmup,
                lr_scheduler=lr_scheduler,
                max_grad_norm=1.0,
            )
        )
        result = trainer.fit(method, SRGMMBatches(cgmm, batch_size, seed))
        result["final_logs"] = _tail_means(os.path.join(output_dir or tmp, "logs", "losses.csv"))
        return result


def _tail_means(path: str) -> dict[str, float]:
    """Mean of each logged value over the last tenth of the rows (e.g. whether D left chance: loss_d < 2)."""
    import csv

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    tail, out = rows[-max(1, len(rows) // 10) :], {}
    for key in rows[0] if rows else []:
        values = [float(r[key]) for r in tail if r.get(key) not in (None, "")]
        if values and key != "step":
            out[key] = sum(values) / len(values)
    return out
