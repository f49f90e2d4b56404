"""Toy runs on the Gaussian-mixture test bed through the real Trainer (tests and benchmark recipes)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from ..context import TeacherContext
from ..data import Batch
from ..denoiser import Denoiser
from ..methods.dmd2 import DMD2, DMD2Config
from ..sampling import ddim_sample
from ..schedules import DiscreteVPSchedule
from ..trainer import Trainer, TrainerConfig
from ..utils import seed_for
from .gmm import AnalyticDenoiser, GaussianMixture, MLPDenoiserNet, energy_distance, mode_stats


def sd_schedule() -> DiscreteVPSchedule:
    """The SD1.5 scaled-linear 1000-step schedule (the production code path)."""
    return DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear", 1000)


class GMMBatches:
    """Real samples for the GAN, drawn per (step, micro, rank) like every batch source."""

    def __init__(self, gmm: GaussianMixture, batch_size: int, seed: int = 0):
        self.gmm, self.batch_size, self.seed = gmm, batch_size, seed

    def batch(self, step, micro, rank, device):
        g = torch.Generator().manual_seed(seed_for(self.seed, "gmm", rank, step, micro))
        return Batch(self.gmm.sample(self.batch_size, g).float().to(device))


def fit_teacher_net(
    gmm: GaussianMixture,
    schedule,
    steps: int = 3000,
    batch: int = 1024,
    lr: float = 1e-3,
    width: int = 128,
    seed: int = 0,
) -> Denoiser:
    """Regress an eps-predicting MLP onto the analytic eps over random (x0, t, eps)."""
    torch.manual_seed(seed)
    net = MLPDenoiserNet(dim=gmm.dim, width=width)
    den = Denoiser(net, schedule, "epsilon")
    exact = Denoiser(AnalyticDenoiser(gmm, schedule), schedule, "sample")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = gmm.sample(batch, g).float()
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            eps_exact = schedule.from_x0(exact(x_t, t), x_t, t, "epsilon")
        loss = (den.raw(x_t, t) - eps_exact).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return den.eval().requires_grad_(False)


@dataclass
class ToyResult:
    energy_distance: float
    modes: dict
    samples: torch.Tensor


def evaluate_generator(gen_sample, gmm: GaussianMixture, n: int = 5000, seed: int = 123) -> ToyResult:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, gmm.dim, generator=g)
    with torch.no_grad():
        x = gen_sample(z).double()
    ref = gmm.sample(n, torch.Generator().manual_seed(seed + 1))
    return ToyResult(energy_distance(x, ref), mode_stats(gmm, x), x)


class ToyDMD2(DMD2):
    """DMD2 whose 'validation grid' measures the generator on the mixture (metrics over training)."""

    gmm: GaussianMixture
    history: list

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        res = evaluate_generator(lambda z: models["generator"].sample(z), self.gmm, n=2000)
        self.history.append({"energy_distance": res.energy_distance, **res.modes})
        return torch.zeros(1, 1, 1, 1)


def run_dmd2_gmm(
    config: DMD2Config,
    steps: int,
    gmm: GaussianMixture | None = None,
    teacher_gmm: GaussianMixture | None = None,
    teacher_net: Denoiser | None = None,
    seed: int = 0,
    ema_decay: float | None = None,
    output_dir: str | None = None,
    eval_every: int | None = None,
    real_score: str = "analytic",
    mixed_precision: str = "no",
) -> tuple[ToyResult, DMD2]:
    """Train DMD2 on the mixture: analytic real score from `teacher_gmm` (default: the true mixture),
    G and F initialised from `teacher_net`, GAN real data from the true mixture."""
    gmm = gmm or GaussianMixture.circle()
    schedule = sd_schedule()
    net = teacher_net or fit_teacher_net(gmm, schedule)
    teacher = (
        Denoiser(AnalyticDenoiser(teacher_gmm or gmm, schedule), schedule, "sample")
        if real_score == "analytic"
        else net
    )
    if config.gan and config.gan_feature_module is None:
        config.gan_feature_module = "blocks.1"
    torch.manual_seed(seed)  # a new GAN head starts from the seed, whatever ran before
    method = ToyDMD2(TeacherContext(teacher, (gmm.dim,)), config, student_init=net)
    method.gmm, method.history = gmm, []
    fit_on_gmm(method, gmm, steps, config.train_batch_size, seed, ema_decay, output_dir, eval_every, mixed_precision)
    gen = method.generator
    return evaluate_generator(lambda z: gen.sample(z), gmm), method


def fit_on_gmm(
    method,
    gmm: GaussianMixture,
    steps: int,
    batch_size: int,
    seed: int = 0,
    ema_decay: float | None = None,
    output_dir: str | None = None,
    eval_every: int | None = None,
    mixed_precision: str = "no",
    export: bool = False,
) -> None:
    """Train `method` with the real Trainer, GAN data from the mixture; with `eval_every` its sample_grid runs
    every that many iterations (the toy methods measure the mixture there)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            TrainerConfig(
                output_dir=output_dir or tmp,
                max_train_steps=steps,
                seed=seed,
                ema_decay=ema_decay,
                num_validation_images=1 if eval_every else 0,
                validation_steps=eval_every,
                export=export,
                log_every=100,
                mixed_precision=mixed_precision,
            )
        )
        trainer.fit(method, GMMBatches(gmm, batch_size, seed))


def teacher_ddim_result(teacher: Denoiser, gmm: GaussianMixture, steps: int = 100) -> ToyResult:
    return evaluate_generator(lambda z: ddim_sample(teacher, z, num_steps=steps), gmm)
