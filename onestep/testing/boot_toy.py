"""BOOT on the Gaussian-mixture test bed (docs/methods/boot.md): the analytic teacher on any schedule, the reference
trajectories (the signal recursion y_s = y_t + delta (f - y_t) and an x-space DDIM loop, both float64), the student
MLP, and training through the real Trainer with a data source that refuses to be read."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from ..context import TeacherContext
from ..denoiser import Denoiser
from ..generator import CLEAN
from ..losses import signal_step
from ..methods.boot import BOOT, BOOTConfig, time_grid
from ..schedules import DiscreteVPSchedule, NoiseSchedule, RectifiedFlowSchedule
from ..trainer import Trainer, TrainerConfig
from .gmm import GaussianMixture, MLPDenoiserNet, energy_distance, mode_stats
from .toy import sd_schedule


def sd15_first_500() -> DiscreteVPSchedule:
    """SD1.5's first 500 steps: the noise end has alpha = 0.53, so the two boundary conventions start from clearly
    different x_T (their reference samples differ by 6% of the data variance, against 0.1% on the full schedule)."""
    return DiscreteVPSchedule(sd_schedule().alphas_cumprod[:500])


SCHEDULES = {"sd15": sd_schedule, "flow": lambda: RectifiedFlowSchedule(1000), "sd15-500": sd15_first_500}
OTHER_BOUNDARY = {"paper": "exact", "exact": "paper"}


def exact_x0(gmm: GaussianMixture, schedule: NoiseSchedule, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] in float64 for per-sample schedule indices t."""
    a, s = schedule.coefficients(t.long(), x.device)
    return gmm.posterior_mean(x.double(), a, s)


class AnalyticTeacherNet(nn.Module):
    """A network-shaped exact x0 predictor (prediction type "sample") on any schedule: the time it is given is
    the schedule's model time (a flow's is (t + 1), not the index), mapped back to the index."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.gmm, self.schedule = gmm, schedule
        self.register_buffer("times", schedule.model_time(torch.arange(schedule.num_timesteps)).float())

    def forward(self, x, time, cond=None):
        t = torch.searchsorted(self.times, time.float().contiguous()).clamp(max=len(self.times) - 1)
        return exact_x0(self.gmm, self.schedule, x, t).to(x.dtype)


def analytic_teacher(gmm: GaussianMixture, schedule: NoiseSchedule) -> Denoiser:
    return Denoiser(AnalyticTeacherNet(gmm, schedule), schedule, "sample").eval().requires_grad_(False)


def _coefficients(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    if t == CLEAN:
        return 1.0, 0.0
    a, s = schedule.coefficients(torch.tensor([t]))
    return float(a[0]), float(s[0])


def _start(gmm, schedule, eps, top: int, boundary: str) -> torch.Tensor:
    """y_T: the teacher's x0 on the noise (B-paper) or the y that makes x_T the noise itself (B-exact)."""
    a, s = _coefficients(schedule, top)
    if boundary == "paper":
        return exact_x0(gmm, schedule, eps * schedule.prior_std(top), torch.full((eps.shape[0],), top))
    return eps.double() * (schedule.prior_std(top) - s) / a if a > 0 else torch.zeros_like(eps, dtype=torch.float64)


def reference_trajectory(gmm, schedule, eps: torch.Tensor, grid_size: int, boundary: str = "paper") -> torch.Tensor:
    """y_ref(tau_i; eps) for i = 0..N (index 0: the clean end), float64, by the signal recursion of BOOT."""
    grid = [CLEAN, *time_grid(schedule.num_timesteps, grid_size)]
    ys = [None] * len(grid)
    ys[-1] = y = _start(gmm, schedule, eps, grid[-1], boundary)
    e = eps.double()
    for i in range(len(grid) - 1, 0, -1):
        (a_t, s_t), (a_s, s_s) = _coefficients(schedule, grid[i]), _coefficients(schedule, grid[i - 1])
        f = exact_x0(gmm, schedule, a_t * y + s_t * e, torch.full((eps.shape[0],), grid[i]))
        delta = float(signal_step(*(torch.tensor(v, dtype=torch.float64) for v in (a_t, s_t, a_s, s_s))))
        ys[i - 1] = y = y + delta * (f - y)
    return torch.stack(ys)


def ddim_trajectory(gmm, schedule, eps: torch.Tensor, grid_size: int, boundary: str = "paper") -> torch.Tensor:
    """The same trajectory from an x-space DDIM loop (schedule.ddim_step), read back as y = (x - sigma eps) / alpha."""
    grid = [CLEAN, *time_grid(schedule.num_timesteps, grid_size)]
    e = eps.double()
    a_T, s_T = _coefficients(schedule, grid[-1])
    x = a_T * _start(gmm, schedule, eps, grid[-1], boundary) + s_T * e
    ys = [None] * len(grid)
    for i in range(len(grid) - 1, 0, -1):
        a, s = _coefficients(schedule, grid[i])
        ys[i] = (x - s * e) / a if a > 0 else _start(gmm, schedule, eps, grid[-1], boundary)
        t = torch.full((eps.shape[0],), grid[i])
        x0 = exact_x0(gmm, schedule, x, t)
        x = schedule.ddim_step(x, x0, t, None if grid[i - 1] == CLEAN else torch.full_like(t, grid[i - 1]))
    ys[0] = x
    return torch.stack(ys)


class ReferenceStudent(nn.Module):
    """The reference trajectory in the student's place, g(eps, t) = y_ref(t; eps) (the loss self-test: both losses
    must vanish).
    `shift` moves every lookup one grid level up, an off-by-one the self-test must catch."""

    def __init__(self, gmm, schedule, grid_size: int, boundary: str = "paper", shift: int = 0):
        super().__init__()
        self.gmm, self.schedule, self.grid_size, self.boundary, self.shift = gmm, schedule, grid_size, boundary, shift
        self.grid = [CLEAN, *time_grid(schedule.num_timesteps, grid_size)]

    def forward(self, eps, t, cond=None):
        ys = reference_trajectory(self.gmm, self.schedule, eps, self.grid_size, self.boundary)
        level = torch.tensor([self.grid.index(int(v)) for v in t]).add(self.shift).clamp(max=self.grid_size)
        return ys[level, torch.arange(eps.shape[0])].float()


def fit_teacher_net(
    gmm,
    schedule,
    prediction_type: str,
    width: int = 256,
    steps: int = 2000,
    batch: int = 512,
    lr: float = 3e-3,
    seed=0,
) -> Denoiser:
    """A teacher-net MLP regressed onto the analytic teacher in its own parametrisation (eps, v, x0 or flow)."""
    torch.manual_seed(seed)
    den = Denoiser(MLPDenoiserNet(dim=gmm.dim, width=width), schedule, prediction_type)
    opt = torch.optim.Adam(den.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = gmm.sample(batch, g).float()
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            target = schedule.from_x0(exact_x0(gmm, schedule, x_t, t).float(), x_t, t, prediction_type)
        loss = (den.raw(x_t, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return den.eval().requires_grad_(False)


def random_student(dim: int, schedule, prediction_type: str, width: int = 256, seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(MLPDenoiserNet(dim=dim, width=width), schedule, prediction_type)


class RefusingData:
    """A data source that fails the run if anything reads it (BOOT is data-free)."""

    reads = 0

    def batch(self, *args, **kwargs):
        RefusingData.reads += 1
        raise AssertionError("BOOT's training loop read real data.")


@dataclass
class Evaluation:
    """Fixed noise, its reference trajectory, and the mixture's total variance (the coupling error's scale)."""

    eps: torch.Tensor
    y_ref: torch.Tensor  # (N+1, n, d): index 0 is the clean end
    variance: float
    y_other_clean: torch.Tensor  # the other boundary convention's reference sample from the same noise
    history: list = field(default_factory=list)


def coupling_errors(method: BOOT, evaluation: Evaluation) -> list[float]:
    """E|g(eps, tau_i) - y_ref(tau_i)|^2 / Var(x) for every grid level i = 0 (clean) .. N."""
    student = method.student
    out = []
    with torch.no_grad():
        for i, t in enumerate(method.grid.tolist()):
            g = student(evaluation.eps, torch.full((evaluation.eps.shape[0],), t)).double()
            out.append(float((g - evaluation.y_ref[i]).square().sum(1).mean() / evaluation.variance))
    return out


def make_evaluation(gmm, schedule, grid_size: int, boundary: str, n: int = 2000, seed: int = 123) -> Evaluation:
    eps = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(seed))
    x = gmm.sample(100_000, torch.Generator().manual_seed(seed + 1))
    variance = float((x - x.mean(0)).square().sum(1).mean())
    other = reference_trajectory(gmm, schedule, eps, grid_size, OTHER_BOUNDARY[boundary])[0]
    return Evaluation(eps, reference_trajectory(gmm, schedule, eps, grid_size, boundary), variance, other)


def propagation(history: list[list[float]], every: int) -> dict:
    """The paper's "high t first" claim, read from the coupling error per grid level over training: for each
    level, the first evaluated iteration at which its error is within 10x of its own final value, and its error
    relative to its initial value a fifth of the way through training (index 0 = the clean end)."""
    levels = range(len(history[0]))
    within = []
    for level in levels:
        series = [h[level] for h in history]
        within.append(next(k * every for k, v in enumerate(series) if v <= 10 * series[-1]))
    early = history[max(1, len(history) // 5)]
    return {
        "iteration_within_10x_of_final": within,
        "relative_error_at_one_fifth": [early[level] / history[0][level] for level in levels],
        "at_iteration": max(1, len(history) // 5) * every,
    }


CLEAN_END, TOP = slice(0, 3), slice(-5, None)  # the clean end and the two levels above it; the five noisiest


def ordering(history: list[list[float]], every: int) -> dict:
    """The two readings of "the error falls first at high t", each as (clean end, top) means over its levels:
    how far each level's error has fallen by a fifth of training (relative to its own start), and the iteration
    at which each level first comes within 10x of its own final error."""
    p = propagation(history, every)
    fell, settled = p["relative_error_at_one_fifth"], p["iteration_within_10x_of_final"]

    def ends(values):
        return {"clean_end": sum(values[CLEAN_END]) / 3, "top": sum(values[TOP]) / 5}

    return {"relative_error_at_one_fifth": ends(fell), "iteration_within_10x_of_final": ends(settled)}


class ToyBOOT(BOOT):
    """BOOT whose 'validation grid' records the coupling error per grid level (metrics over training)."""

    evaluation: Evaluation

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        self.evaluation.history.append(coupling_errors(self, self.evaluation))
        return torch.zeros(1, 1, 1, 1)


@dataclass
class BootToyResult:
    coupling: list[float]  # per grid level, index 0 = clean
    coupling_other_boundary: float  # the clean end against the other boundary convention's reference
    energy_distance: float  # g(eps, clean) vs the true mixture
    reference_energy_distance: float  # the N-step reference sampler (y_ref at the clean end) vs the mixture
    modes: dict
    reference_modes: dict
    history: list  # coupling errors per level at each evaluation
    seconds: float = 0.0


def run_boot_gmm(
    config: BOOTConfig,
    steps: int,
    schedule_name: str = "sd15",
    student_init: Denoiser | str = "teacher-net",
    gmm: GaussianMixture | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    lr_scheduler: str = "cosine",
    data=None,
    output_dir: str | None = None,
    checkpointing_steps: int | None = None,
) -> tuple[BootToyResult, ToyBOOT]:
    """Train BOOT on the mixture with the analytic teacher through the real Trainer, handing it a data source
    that raises if read. `student_init`: a Denoiser, "teacher-net" (fitted), or "random" (drawn from `seed`, which
    also seeds the training draws)."""
    import time

    gmm = gmm or GaussianMixture.circle()
    schedule = SCHEDULES[schedule_name]()
    kind = "flow" if schedule.kind == "flow" else "epsilon"
    if isinstance(student_init, str):
        fit = {"teacher-net": fit_teacher_net, "random": lambda g, s, k: random_student(g.dim, s, k, seed=seed)}
        fit = fit[student_init]
        student_init = fit(gmm, schedule, kind)
    method = ToyBOOT(
        TeacherContext(analytic_teacher(gmm, schedule), (gmm.dim,)),
        config,
        student_init=student_init,
        max_train_steps=steps,
    )
    method.evaluation = make_evaluation(gmm, schedule, config.grid_size, config.boundary)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            TrainerConfig(
                output_dir=output_dir or tmp,
                max_train_steps=steps,
                seed=seed,
                max_grad_norm=1.0,
                lr_scheduler=lr_scheduler,
                num_validation_images=1 if eval_every else 0,
                validation_steps=eval_every,
                checkpointing_steps=checkpointing_steps,
                final_checkpoint=output_dir is not None,
                export=False,
                log_every=100,
            )
        )
        trainer.fit(method, data if data is not None else RefusingData())
    seconds = time.time() - start
    ev = method.evaluation
    with torch.no_grad():
        x = method.student(ev.eps, torch.full((ev.eps.shape[0],), CLEAN)).double()
    true = gmm.sample(ev.eps.shape[0], torch.Generator().manual_seed(7))
    result = BootToyResult(
        coupling=coupling_errors(method, ev),
        coupling_other_boundary=float((x - ev.y_other_clean).square().sum(1).mean() / ev.variance),
        energy_distance=energy_distance(x, true),
        reference_energy_distance=energy_distance(ev.y_ref[0], true),
        modes=mode_stats(gmm, x),
        reference_modes=mode_stats(gmm, ev.y_ref[0]),
        history=ev.history,
        seconds=seconds,
    )
    return result, method
