"""MSD: Multi-student Diffusion Distillation (Song et al., ICML 2025, arXiv 2410.23274).

Documented in docs/methods/msd.md. One teacher, K one-step students; student k sees only the conditions the
router sends to it (V_k, section 4.1) and is trained independently, as a DMD2 student, in up to three stages:
  stage 0  TSM  (4.2, students smaller than the teacher): regress the teacher's native output over all t;
  stage 1  DM   (4.3): DMD2's distribution matching with conditions from V_k (+ optional DMD1 regression);
  stage 2  ADM  (4.4): stage 1's weights plus DMD2's GAN head, real data filtered to V_k.
This file holds what one stage of one student does; onestep/presets/msd.py runs the students.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..context import TeacherContext
from ..denoiser import Cond, Denoiser
from ..errors import UserError
from ..flags import non_negative_float, non_negative_int, option, positive_int, probability
from ..losses import weighted_squared_error
from ..sampling import ddim_sample
from .base import Method, Update
from .dmd2 import DMD2, DMD2Config


@dataclass
class MSDConfig(DMD2Config):
    """DMD2's settings (every student's) plus MSD's own. Iteration budgets are per student."""

    flag_group = "MSD (docs/methods/msd.md)"
    _SMALL = ("student_config", bool, "--student_config (a smaller student, which starts from TSM)")
    flag_requires = {
        **DMD2Config.flag_requires,
        "tsm_steps": _SMALL,
        "tsm_learning_rate": _SMALL,
        "tsm_data": _SMALL,
        "tsm_conditions": _SMALL,
        "tsm_null_dropout": _SMALL,
        "tsm_teacher_steps": _SMALL,
        "student_critic": _SMALL,
        "adm_learning_rate": ("gan", bool, "--gan (the second stage, DM + GAN)"),
        "regression_weight": ("stabiliser", lambda s: s == "regression", "--stabiliser regression"),
    }

    num_students: int = option(
        2, "K, the number of students (at most 8, and at most the number of classes).", parse=positive_int
    )
    partition: str | None = option(
        None,
        "class_range (class labels), kmeans_balanced (prompts; the default for text), kmeans or pca_quadrant.",
        choices=("class_range", "kmeans_balanced", "kmeans", "pca_quadrant"),
    )
    router_file: str | None = option(None, "A router.json fitted before (another run's) instead of fitting one.")
    router_seed: int = option(0, "Seed of the k-means++ initialisation of text partitions.")
    router_max_prompts: int = option(
        1_000_000, "Text partitions are fitted on a seeded subsample of at most this many.", parse=positive_int
    )
    router_pooling: str = option(
        "masked_mean",
        "Pooled prompt embedding: masked_mean (non-padding tokens) or mean (all tokens).",
        choices=("masked_mean", "mean"),
    )
    router_normalisation: str = option(
        "l2", "The pooled embedding L2-normalised (l2) or not (none).", choices=("l2", "none")
    )
    dm_steps: int = option(
        0, "Of each student's --max_train_steps, the first this many are DM only (stage 1).", parse=non_negative_int
    )
    adm_learning_rate: float | None = option(
        None, "Stage 2's (DM + GAN) learning rate of G and critic (None: stage 1's).", parse=non_negative_float
    )
    student_config: str | None = option(
        None, "A smaller UNet config (JSON) for the students; they start from TSM (stage 0)."
    )
    student_critic: str = option(
        "teacher",
        "The critic F of a smaller student: teacher (a teacher copy) or student (its size).",
        choices=("teacher", "student"),
    )
    tsm_steps: int = option(
        1000, "TSM iterations of a smaller student (0: start it from random weights).", parse=non_negative_int
    )
    tsm_learning_rate: float | None = option(
        None, "TSM's learning rate (None: --learning_rate).", parse=non_negative_float
    )
    tsm_data: str = option("real", "TSM's x0: real images, or teacher samples (DDIM).", choices=("real", "teacher"))
    tsm_conditions: str = option("all", "TSM's conditions: all, or part (the student's own).", choices=("all", "part"))
    tsm_null_dropout: float = option(
        0.1, "Share of null conditions in TSM, for CFG-trained teachers.", parse=probability
    )
    tsm_teacher_steps: int = option(25, "DDIM steps of --tsm_data teacher.", parse=positive_int)
    stabiliser: str = option(
        "ttur",
        "ttur (DMD2), or regression (DMD1: + a regression loss on teacher ODE pairs).",
        choices=("ttur", "regression"),
    )
    regression_weight: float = option(
        0.25, "lambda_reg of --stabiliser regression (DMD1's value, unverified).", parse=non_negative_float
    )

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
        context: TeacherContext,
        student: Denoiser,
        config: MSDConfig,
        grid_classes: list[int] | None = None,
        student_info: dict | None = None,
    ):
        """`context`: the teacher, with the conditions TSM draws (all, or the student's part); `student_info`:
        what student.json records beside the exported network."""
        super().__init__()
        self.teacher = context.denoiser.eval().requires_grad_(False)
        self.student = student.train().requires_grad_(True)
        self.config, self.sample_shape = config, tuple(context.sample_shape)
        self.cond_sampler, self.uncond = context.cond_sampler, context.uncond
        self.grid_classes, self.decode, self.student_info = grid_classes, context.decode, student_info or {}
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
            models["student"].net, output_dir, {**self.student_info, **_steps(extra_card)}, self.sample_shape[-1]
        )


class RegressionTerm:
    """DMD1's regression stabiliser (msd.md 4.3): distance(G(z_j, c_j), y_j) over the teacher ODE pairs
    (onestep/ode_pairs.py), drawn from the full, unfiltered set whatever the student's part: the pairs' conditions
    come from the unrestricted sampler. LPIPS (VGG) on images where its weights load, else MSE."""

    def __init__(self, pairs, full_cond_sampler, weight: float, lpips_module=None):
        self.pairs, self.full_cond_sampler, self.weight, self.lpips = pairs, full_cond_sampler, weight, lpips_module

    def loss(self, student: StudentDMD2, batch_size: int, device) -> torch.Tensor:
        from ..ode_pairs import pair_conditions
        from .regression import lpips_input

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
        return self.lpips(*(lpips_input(v, student.decode) for v in (x, y))).mean()


class StudentDMD2(DMD2):
    """One MSD student in stage 1 or 2: DMD2 on the conditions of its part (the cond_sampler and real data it is
    given are already restricted to V_k), optionally with the regression stabiliser; exports its UNet only."""

    exports_stock_pipeline = False  # the students are assembled into MSD's own pipeline, which samples any t

    def __init__(
        self,
        *args,
        grid_classes: list[int] | None = None,
        regression: RegressionTerm | None = None,
        student_info: dict | None = None,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.grid_classes, self.regression, self.student_info = grid_classes, regression, student_info or {}

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

        info = {**self.student_info, **_steps(extra_card), "conditioning_timesteps": models["generator"].timesteps}
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
