"""MSD: Multi-student Diffusion Distillation (Song et al., ICML 2025, arXiv 2410.23274).

Follows shared/methods/msd.md. One teacher, K one-step students; student k sees only the conditions the
router sends to it (V_k, section 4.1) and is trained independently, as a DMD2 student, in up to three stages:
  stage 0  TSM  (4.2, students smaller than the teacher): regress the teacher's native output over all t;
  stage 1  DM   (4.3): DMD2's distribution matching with conditions from V_k (+ optional DMD1 regression);
  stage 2  ADM  (4.4): stage 1's weights plus DMD2's GAN head, real data filtered to V_k.
This file holds what one stage of one student does; onestep/methods/msd_run.py runs the students.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..denoiser import Cond, Denoiser
from ..errors import UserError
from ..losses import weighted_squared_error
from ..sampling import ddim_sample
from .base import Method, Update
from .dmd2 import DMD2, DMD2Config


@dataclass
class MSDConfig(DMD2Config):
    """DMD2's settings (every student's) plus MSD's own. Iteration budgets are per student."""

    num_students: int = 2  # K
    partition: str | None = None  # None: class_range (class labels) or kmeans_balanced (text); kmeans, pca_quadrant
    router_file: str | None = None  # a router.json fitted elsewhere (None: fit one at the start of the run)
    router_seed: int = 0  # k-means++ seed (text partitions)
    router_max_prompts: int = 1_000_000  # fit on a seeded subsample of at most this many prompts
    router_pooling: str = "masked_mean"  # pooled text embedding: mean over non-padding tokens (unverified), or "mean"
    router_normalisation: str = "l2"  # then L2-normalised (unverified), or "none"
    dm_steps: int = 0  # of each student's max_train_steps, the first ones are stage 1 (DM only); the rest stage 2
    # Stage 2's (adm) learning rate for G and the critic (None: stage 1's rates), as DMD2's SD1.5 stage 2 (5e-7).
    adm_learning_rate: float | None = None
    student_config: str | None = None  # a smaller UNet config (JSON) for the students (None: teacher-sized)
    student_critic: str = "teacher"  # F of a smaller student: a teacher copy (unverified), or "student" (its size)
    tsm_steps: int = 1000  # stage 0 iterations for a smaller student (0: start it from random weights)
    tsm_learning_rate: float | None = None  # None: learning_rate
    tsm_data: str = "real"  # real images (reportedly; unverified) or "teacher" samples (when no data exist)
    tsm_conditions: str = "all"  # all conditions (unverified) or "part" (the student's own)
    tsm_null_dropout: float = 0.1  # share of null conditions in TSM when the teacher has one (CFG-trained)
    tsm_teacher_steps: int = 25  # DDIM steps of the teacher samples of tsm_data="teacher"
    # "ttur" (DMD2) or "regression" (DMD1: + regression_weight * distance to the teacher ODE pairs of DMD2Config's
    # regression_pairs / regression_teacher_steps / regression_loss, the full unfiltered set for every student).
    stabiliser: str = "ttur"
    regression_weight: float = 0.25  # lambda_reg (DMD1 value, unverified)

    def dmd2(self) -> DMD2Config:
        """The DMD2 part, which each student's stages run."""
        return DMD2Config(**{f.name: getattr(self, f.name) for f in fields(DMD2Config)})


def check_msd_config(c: MSDConfig) -> None:
    """MSD's own settings, before anything is loaded or written."""
    if len(c.conditioning_timesteps) != 1:
        raise UserError("MSD students are one-step generators (NFE 1): pass one --conditioning_timesteps value.")
    choices = {
        "tsm_data": ("real", "teacher"),
        "tsm_conditions": ("all", "part"),
        "stabiliser": ("ttur", "regression"),
        "router_pooling": ("masked_mean", "mean"),
        "router_normalisation": ("l2", "none"),
        "student_critic": ("teacher", "student"),
    }
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise UserError(f"--{name} {getattr(c, name)!r} is not one of {', '.join(allowed)}.")
    if not 0 <= c.tsm_null_dropout < 1:
        raise UserError(f"--tsm_null_dropout {c.tsm_null_dropout} must lie in [0, 1).")


class TeacherScoreMatching(Method):
    """Stage 0 (msd.md 4.2): L_TSM = E || U_S(x_t, t, c) - SG[U_T(x_t, t, c)] ||^2 in the teacher's native output
    space (EDM: x0 with its weight), t ~ U{0..T-1}, x0 real (or teacher samples), no CFG on the target."""

    exported_models = ("student",)

    def __init__(
        self,
        teacher: Denoiser,
        student: Denoiser,
        config: MSDConfig,
        sample_shape: tuple[int, ...],
        cond_sampler: Callable[[int, torch.device], Cond | None],
        uncond: Callable[[Cond], Cond] | None,
        grid_classes: list[int] | None = None,
        decode: Callable | None = None,
        export_info: dict | None = None,
    ):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train().requires_grad_(True)
        self.config, self.sample_shape = config, tuple(sample_shape)
        self.cond_sampler, self.uncond = cond_sampler, uncond
        self.grid_classes, self.decode, self.export_info = grid_classes, decode, export_info or {}
        self.needs_data = config.tsm_data == "real"
        self.updates = [Update("tsm", "student")]

    def models(self):
        return {"student": self.student}

    def optimizers(self):
        c = self.config
        lr = c.learning_rate if c.tsm_learning_rate is None else c.tsm_learning_rate
        return {
            "student": torch.optim.AdamW(
                self.student.parameters(), lr=lr, betas=c.adam_betas, weight_decay=c.adam_weight_decay
            )
        }

    def to(self, device):
        self.teacher.to(device)
        return self

    def start_iteration(self, batch, info):
        c, device = self.config, info.device
        if batch is not None:
            x0, cond = batch.images, batch.cond
        else:  # teacher samples (deterministic DDIM from this iteration's noise)
            cond = self.cond_sampler(c.train_batch_size, device)
            z = torch.randn(c.train_batch_size, *self.sample_shape, device=device)
            with self.timer.phase("teacher"):
                x0 = ddim_sample(self.teacher, z, cond, c.tsm_teacher_steps)
        if self.uncond is not None and cond is not None and c.tsm_null_dropout > 0:
            cond = cond.where(torch.rand(x0.shape[0], device=device) < c.tsm_null_dropout, self.uncond(cond))
        x_t, t, eps = self.teacher.schedule.sample_noised(x0, 0, self.teacher.schedule.num_timesteps - 1)
        with torch.no_grad(), self.timer.phase("teacher"):
            target = self.teacher.raw(x_t, t, cond)
        _, weight = self.teacher.denoising_target(x0, eps, t, cond)
        return {"x_t": x_t, "t": t, "cond": cond, "target": target, "weight": weight}

    def loss(self, name, s):
        pred = self.prepared["student"](s["x_t"], s["t"], s["cond"], native=True)
        loss = weighted_squared_error(pred, s["target"], s["weight"]).mean()
        return loss, {"loss_tsm": loss.detach()}

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        """The TSM network as a diffusion model (DDIM, 20 steps) on the student's conditions."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num, *self.sample_shape, generator=g).to(device)
        cond = _grid_cond(self.grid_classes, self.cond_sampler, num, device)
        x = ddim_sample(models["student"], z, cond, 20)
        return (self.decode(x) if self.decode is not None else x).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from ..export import export_student_unet

        export_student_unet(
            models["student"].net, output_dir, {**self.export_info, **_steps(extra_card)}, self.sample_shape[-1]
        )


class RegressionTerm:
    """DMD1's regression stabiliser (msd.md 4.3): distance(G(z_j, c_j), y_j) over the teacher ODE pairs
    (onestep/ode_pairs.py), drawn from the full, unfiltered set whatever the student's part: the pairs' conditions
    come from the unrestricted sampler. LPIPS (VGG) on images where its weights load, else MSE."""

    def __init__(self, pairs, full_cond_sampler, weight: float, lpips_module=None):
        self.pairs, self.full_cond_sampler, self.weight, self.lpips = pairs, full_cond_sampler, weight, lpips_module

    def loss(self, student: StudentDMD2, batch_size: int, device) -> torch.Tensor:
        from ..ode_pairs import pair_conditions
        from .regression import ODERegression

        j = torch.randint(len(self.pairs), (batch_size,))  # the trainer seeds this stream per step
        cond = pair_conditions(self.full_cond_sampler, j.tolist(), self.pairs.seed, device)
        gen = student.prepared["generator"]
        z = self.pairs.noise[j].to(device)
        x_in, t_in = student.unwrap(gen).backward_simulate(z, None, 0)  # pure noise at t_c
        x, y = gen(x_in, t_in, cond).float(), self.pairs.target[j].to(device)
        if self.lpips is None:
            return (x - y).square().mean()
        self.lpips.to(device)
        # The warm start's LPIPS input (decoded, 3 channels, at least 64 px), read from the student's decode.
        return self.lpips(*(ODERegression._lpips_input(student, v) for v in (x, y))).mean()


class StudentDMD2(DMD2):
    """One MSD student in stage 1 or 2: DMD2 on the conditions of its part (the cond_sampler and real data it is
    given are already restricted to V_k), optionally with the regression stabiliser; exports its UNet only."""

    def __init__(self, *args, grid_classes: list[int] | None = None, regression: RegressionTerm | None = None, **kw):
        super().__init__(*args, **kw)
        self.grid_classes, self.regression = grid_classes, regression

    def _generator_loss(self, s):
        loss, logs = super()._generator_loss(s)
        if self.regression is not None:
            reg = self.regression.loss(self, self.config.train_batch_size, s["x"].device)
            loss = loss + self.regression.weight * reg
            logs["loss_reg"] = reg.detach()
        return loss, logs

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num, *self.sample_shape, generator=g).to(device)
        x = models["generator"].sample(z, _grid_cond(self.grid_classes, self.cond_sampler, num, device))
        return (self.decode(x) if self.decode is not None else x).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from ..export import export_student_unet

        info = {**self.export_info, **_steps(extra_card), "conditioning_timesteps": models["generator"].timesteps}
        export_student_unet(models["generator"].denoiser.net, output_dir, info, self.sample_shape[-1])

    def usage(self, folder: str) -> str:
        return f"one student's UNet: {folder}/unet (the assembled MSD pipeline is in the run's output folder)"


def _grid_cond(classes: list[int] | None, cond_sampler, num: int, device) -> Cond | None:
    """Sample-grid conditions: the part's classes in turn, else the part's own conditions."""
    if classes:
        return Cond(class_labels=torch.tensor([classes[i % len(classes)] for i in range(num)], device=device))
    return cond_sampler(num, device)


def _steps(extra_card: dict) -> dict:
    return {"training_steps": extra_card.get("training_steps"), "ema_decay": extra_card.get("ema_decay")}
