"""MSD's small-scale test bed (docs/methods/msd.md): a class-conditional Gaussian mixture with an exact
per-class denoiser, a small teacher-net, and students trained on contiguous class ranges through the real Trainer.

Class c of C has 4 isotropic components (std 0.02) at polar coordinates (r, 2 pi c / C + d), r in {0.6, 1.0},
d in {-0.08, +0.08}, weights (0.4, 0.3, 0.2, 0.1): neighbouring classes are neighbours in space. The real score is
exact: for x_t = a x0 + s eps, with S = std^2 I, E[x0 | x_t, c] = sum_k w_k (mu_ck + a std^2 / (a^2 std^2 + s^2)
(x_t - a mu_ck)), w_k ∝ pi_k N(x_t; a mu_ck, (a^2 std^2 + s^2) I). The teacher-net only initialises G and F.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from ..context import TeacherContext
from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..generator import OneStepGenerator
from ..methods.msd import MSDConfig, StudentDMD2, TeacherScoreMatching
from ..router import class_parts, fit_class_range
from ..trainer import Trainer, TrainerConfig
from ..utils import seed_for
from .gmm import MLPDenoiserNet, energy_distance
from .toy import sd_schedule

RADII, OFFSETS, WEIGHTS, STD = (0.6, 1.0), (-0.08, 0.08), (0.4, 0.3, 0.2, 0.1), 0.02


@contextlib.contextmanager
def single_thread():
    """Tiny MLPs run 5-7x faster on one thread on a shared 2-core machine (measured: 3.5 vs 17-26 ms per DMD2
    iteration); the trainer keeps the setting while ONESTEP_KEEP_THREADS=1. Both are restored afterwards."""
    threads, keep = torch.get_num_threads(), os.environ.get("ONESTEP_KEEP_THREADS")
    torch.set_num_threads(1)
    os.environ["ONESTEP_KEEP_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if keep is None:
            os.environ.pop("ONESTEP_KEEP_THREADS", None)
        else:
            os.environ["ONESTEP_KEEP_THREADS"] = keep


class ClassMixture:
    def __init__(self, num_classes: int = 16):
        angles = [2 * math.pi * c / num_classes + d for c in range(num_classes) for r in RADII for d in OFFSETS]
        radii = [r for _ in range(num_classes) for r in RADII for _ in OFFSETS]
        ang, rad = torch.tensor(angles, dtype=torch.float64), torch.tensor(radii, dtype=torch.float64)
        self.means = torch.stack([rad * ang.cos(), rad * ang.sin()], 1).reshape(num_classes, 4, 2)
        self.weights = torch.tensor(WEIGHTS, dtype=torch.float64)
        self.num_classes = num_classes

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, len(labels), replacement=True, generator=generator)
        noise = torch.randn(len(labels), 2, dtype=torch.float64, generator=generator)
        return self.means[labels.cpu(), comp] + STD * noise

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor, labels: torch.Tensor):
        x, a, s = x_t.double(), a.double().reshape(-1, 1, 1), s.double().reshape(-1, 1, 1)
        mu = self.means.to(x.device)[labels]  # (B, 4, 2)
        var = a**2 * STD**2 + s**2  # (B, 1, 1)
        diff = x.unsqueeze(1) - a * mu
        logw = torch.log(self.weights.to(x.device)) - 0.5 * (diff**2).sum(-1) / var[..., 0]
        w = torch.softmax(logw, dim=1).unsqueeze(-1)
        return (w * (mu + a * STD**2 / var * diff)).sum(1)


class ClassAnalyticDenoiser(nn.Module):
    """The exact class-conditional teacher, network-shaped (prediction type "sample")."""

    def __init__(self, mixture: ClassMixture, schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.register_buffer("_device_anchor", torch.zeros(()))

    def forward(self, x, time, cond=None):
        a, s = self.schedule.coefficients(time.round().long(), x.device)
        return self.mixture.posterior_mean(x, a, s, cond.class_labels).to(x.dtype)


def mlp(mixture: ClassMixture, width: int) -> MLPDenoiserNet:
    return MLPDenoiserNet(dim=2, width=width, depth=3, num_classes=mixture.num_classes)


def fit_teacher_net(mixture: ClassMixture, width: int = 48, steps: int = 2000, batch: int = 512, seed: int = 0):
    """An eps-predicting MLP with a class embedding, regressed onto the exact eps over random (x0, c, t, eps)."""
    schedule = sd_schedule()
    torch.manual_seed(seed)
    den = Denoiser(mlp(mixture, width), schedule, "epsilon")
    exact = Denoiser(ClassAnalyticDenoiser(mixture, schedule), schedule, "sample")
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        labels = torch.randint(mixture.num_classes, (batch,), generator=g)
        x0 = mixture.sample(labels, g).float()
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        cond = Cond(class_labels=labels)
        with torch.no_grad():
            eps = schedule.from_x0(exact(x_t, t, cond), x_t, t, "epsilon")
        loss = (den.raw(x_t, t, cond) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
    return den.eval().requires_grad_(False)


class MixtureBatches:
    """Real mixture samples of all classes (TSM's data), per (step, micro, rank) like every batch source."""

    def __init__(self, mixture: ClassMixture, batch_size: int, seed: int = 0):
        self.mixture, self.batch_size, self.seed = mixture, batch_size, seed

    def batch(self, step, micro, rank, device):
        g = torch.Generator().manual_seed(seed_for(self.seed, "class-gmm", rank, step, micro))
        labels = torch.randint(self.mixture.num_classes, (self.batch_size,), generator=g)
        return Batch(self.mixture.sample(labels, g).float().to(device), Cond(class_labels=labels.to(device)))


# -- metrics ----------------------------------------------------------------------------------------------


def histogram_l1(x: torch.Tensor, y: torch.Tensor, bins: int = 64, extent: float = 1.2) -> float:
    """L1 distance between the normalised 64x64-bin histograms of two 2-D sample sets on [-1.2, 1.2]^2."""

    def hist(v):
        idx = ((v.double() + extent) / (2 * extent) * bins).floor().long().clamp(0, bins - 1)
        h = torch.bincount(idx[:, 0] * bins + idx[:, 1], minlength=bins * bins).double()
        return h / h.sum()

    return float((hist(x) - hist(y)).abs().sum())


def class_metrics(sample, mixture: ClassMixture, n: int = 2000, seed: int = 123) -> dict:
    """Per-class metrics averaged over the classes; `sample(z, labels)` gives the generator's samples. As on the
    unconditional test bed (docs/verification.md), each sample goes to its class's nearest component and a component
    is covered when it holds at least 0.2 n pi_k samples; precision is the share within 3 std of that component;
    "components held precisely" counts only those samples; plus energy distance and histogram L1 to true samples."""
    eds, modes, precise, precision, l1s = [], [], [], [], []
    for c in range(mixture.num_classes):
        g = torch.Generator().manual_seed(seed_for(seed, "class-metrics", c))
        labels = torch.full((n,), c, dtype=torch.long)
        with torch.no_grad():
            x = sample(torch.randn(n, 2, generator=g), labels).double()
        ref = mixture.sample(labels, g)
        eds.append(energy_distance(x, ref))
        l1s.append(histogram_l1(x, ref))
        near, comp = torch.cdist(x, mixture.means[c]).min(dim=1)
        enough = 0.2 * n * mixture.weights
        modes.append(int((torch.bincount(comp, minlength=4).double() >= enough).sum()))
        within = near < 3 * STD
        precise.append(int((torch.bincount(comp[within], minlength=4).double() >= enough).sum()))
        precision.append(float(within.double().mean()))
    k = mixture.num_classes
    return {
        "energy_distance": sum(eds) / k,
        "modes_covered": sum(modes) / k,
        "modes_held_precisely": sum(precise) / k,
        "precision": sum(precision) / k,
        "histogram_l1": sum(l1s) / k,
    }


def reference_metrics(mixture: ClassMixture, n: int = 2000) -> dict:
    """The same metrics for true samples: the floor sampling noise sets."""
    return class_metrics(lambda z, labels: mixture.sample(labels, torch.Generator().manual_seed(7)), mixture, n)


# -- students --------------------------------------------------------------------------------------------


@dataclass
class Students:
    """K trained generators and the router that picks one per class."""

    generators: list[OneStepGenerator]
    router: dict

    def sample(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from ..pipelines.msd import route_classes

        routes = route_classes(labels, self.router)
        out = torch.empty(len(z), 2)
        for k, gen in enumerate(self.generators):
            idx = (routes == k).nonzero().flatten()
            if len(idx):
                out[idx] = gen.sample(z[idx], Cond(class_labels=labels[idx])).float()
        return out


def train_student(
    mixture: ClassMixture,
    teacher_net: Denoiser,
    classes: list[int],
    config: MSDConfig,
    steps: int,
    seed: int = 0,
    generator_net: nn.Module | None = None,
    critic_net: nn.Module | None = None,
) -> OneStepGenerator:
    """One MSD student: DMD2 with conditions drawn from `classes`, the exact real score, G and F from the
    teacher-net (G from `generator_net`, F from `critic_net` instead when given: a smaller student)."""
    schedule = teacher_net.schedule
    real = Denoiser(ClassAnalyticDenoiser(mixture, schedule), schedule, "sample")
    allowed = torch.tensor(classes)
    sampler = lambda n, device: Cond(class_labels=allowed[torch.randint(len(allowed), (n,))].to(device))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            TrainerConfig(
                output_dir=tmp,
                max_train_steps=steps,
                seed=seed,
                export=False,
                final_checkpoint=False,
                log_every=1000,
                num_validation_images=0,
            )
        )
        generator = Denoiser(generator_net, schedule, "epsilon") if generator_net is not None else teacher_net
        critic = Denoiser(critic_net, schedule, "epsilon") if critic_net is not None else teacher_net
        method = StudentDMD2(
            TeacherContext(real, (2,), cond_sampler=sampler),
            config.dmd2(),
            student_init=generator,
            critic_init=critic,
            grid_classes=classes,
        )
        trainer.fit(method, None)
    return method.generator.eval()


def train_students(
    mixture, teacher_net, num_students: int, config: MSDConfig, steps: int, seed: int = 0, nets=None, critic_nets=None
):
    """K students on contiguous class ranges (the router MSD's pipeline uses), one after another; `nets` and
    `critic_nets` (one per student) replace the teacher-net as G's and F's start."""
    router = fit_class_range(num_students, mixture.num_classes)
    gens = [
        train_student(
            mixture,
            teacher_net,
            part,
            config,
            steps,
            seed_for(seed, "student", k),
            nets[k] if nets else None,
            critic_nets[k] if critic_nets else None,
        )
        for k, part in enumerate(class_parts(router))
    ]
    return Students(gens, router)


def tsm_network(
    mixture: ClassMixture, teacher_net: Denoiser, width: int, config: MSDConfig, steps: int, seed: int = 0
):
    """Stage 0: a width-`width` MLP regressing the teacher-net's eps on noised mixture samples of all classes."""
    torch.manual_seed(seed)
    student = Denoiser(mlp(mixture, width), teacher_net.schedule, "epsilon")
    method = TeacherScoreMatching(TeacherContext(teacher_net, (2,)), student, config)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            TrainerConfig(
                output_dir=tmp,
                max_train_steps=steps,
                seed=seed,
                export=False,
                final_checkpoint=False,
                log_every=1000,
                num_validation_images=0,
            )
        )
        trainer.fit(method, MixtureBatches(mixture, config.train_batch_size, seed))
    return student.net
