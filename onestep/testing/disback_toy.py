"""DisBack on the Gaussian-mixture test bed (docs/methods/disback.md), through the real Trainer.

The teacher is a network here (S' is a fine-tuned copy of it): the MLP teacher-net fitted to the analytic
denoiser. G0 is the teacher-net at the conditioning timestep (the DMD2 toy's untrained generator) or, the
harder case, a copy regressed onto one off-centre blob. Arms: A plain DMD2 (F = teacher copy,
target = teacher), B DMD2 with F = S'_N, C DisBack (F = S'_N, targets S'_{N-1} .. S'_1, then the teacher).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..context import TeacherContext
from ..denoiser import Denoiser
from ..methods.disback import DegradationPath, DisBack, DisBackConfig, load_snapshot
from .gmm import GaussianMixture
from .toy import ToyDMD2, evaluate_generator, fit_on_gmm

ARMS = ("A", "B", "C")


class ToyDisBack(DisBack):
    """DisBack whose 'validation grid' measures the generator on the mixture, as ToyDMD2's does."""

    gmm: GaussianMixture
    history: list
    dm_grads: list  # mean|x0_fake - x0_target| of every generator update, whatever the switch rule
    sample_grid = ToyDMD2.sample_grid

    def loss(self, name, s):
        loss, logs = super().loss(name, s)
        if "dm_grad_abs" in logs:
            self.dm_grads.append(float(logs["dm_grad_abs"]))
        return loss, logs


def blob_generator(
    net: Denoiser, t: int = 399, center=(0.7, -0.5), std: float = 0.05, steps: int = 400, seed: int = 0
) -> Denoiser:
    """The harder G0: a copy of the teacher-net regressed so that noise at timestep t maps onto one blob."""
    g0 = copy.deepcopy(net).train().requires_grad_(True)
    opt = torch.optim.Adam(g0.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(center)
    for _ in range(steps):
        z = torch.randn(512, 2, generator=gen)
        loss = (g0(z, torch.full((512,), t)) - (mean + std * z)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return g0.eval().requires_grad_(False)


def record_path(
    net: Denoiser,
    config: DisBackConfig,
    path_dir: str,
    gmm: GaussianMixture,
    g0: Denoiser | None = None,
    seed: int = 0,
) -> DegradationPath:
    """Stage 1 on the mixture: S'_1..S'_N of the teacher-net fine-tuned on G0's samples, into path_dir."""
    method = DegradationPath(TeacherContext(net, (gmm.dim,)), config, path_dir, generator_init=g0)
    fit_on_gmm(method, gmm, config.path_steps, config.train_batch_size, seed, export=True)
    return method


def run_arm(
    arm: str,
    net: Denoiser,
    config: DisBackConfig,
    steps: int,
    gmm: GaussianMixture,
    path_dir: str,
    g0: Denoiser | None = None,
    eval_every: int | None = None,
    seed: int = 0,
):
    """One stage-2 arm for `steps` iterations (same seed, batches and R in every arm); returns (result, method)."""
    method = build_arm(arm, net, config, gmm, path_dir, g0)
    method.gmm, method.history, method.dm_grads = gmm, [], []
    fit_on_gmm(method, gmm, steps, config.train_batch_size, seed, eval_every=eval_every)
    gen = method.generator
    return evaluate_generator(lambda z: gen.sample(z), gmm), method


def build_arm(arm: str, net: Denoiser, config: DisBackConfig, gmm: GaussianMixture, path_dir: str, g0=None):
    """Arm A, B or C before training."""
    if arm == "C":
        method = ToyDisBack(TeacherContext(net, (gmm.dim,)), config, path_dir, generator_init=g0)
    else:
        method = ToyDMD2(TeacherContext(net, (gmm.dim,)), dmd2_config_of(config))
        if g0 is not None:
            method.generator.denoiser.load_state_dict(g0.state_dict())
        if arm == "B":  # only the critic's warm start from the path
            load_snapshot(path_dir, config.num_snapshots, method.critic.denoiser.net)
    return method


def dmd2_config_of(config: DisBackConfig):
    """The base loop's own config (DisBack's fields dropped)."""
    from dataclasses import fields

    from ..methods.dmd2 import DMD2Config

    return DMD2Config(**{f.name: getattr(config, f.name) for f in fields(DMD2Config)})


@torch.no_grad()
def initial_dm_gradient(method, n: int = 4096, seed: int = 0) -> float:
    """mean|x0_fake - x0_target| on G0's samples before any update (the unit check)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *method.sample_shape, generator=g)
    x = method.generator.sample(z)
    t = torch.randint(method.config.dm_t_min, method.config.dm_t_max + 1, (n,), generator=g)
    x_t = method.teacher.schedule.add_noise(x, torch.randn(x.shape, generator=g), t)
    return float((method.critic.denoiser(x_t, t) - method.real_score(x_t, t)).abs().mean())


def base_config(**overrides) -> DisBackConfig:
    """The toy's settings: DMD2's GMM recipe (batch 512, Adam lr 1e-4, R = 5, no GAN, t_c = 399)."""
    c = DisBackConfig(learning_rate=1e-4, train_batch_size=512, ttur_ratio=5, gan=False, conditioning_timesteps=[399])
    return replace(c, **overrides)
