"""OFTSR: one-step flow super-resolution with a tunable fidelity-realism trade-off (Zhu et al., arXiv 2412.09465).

Documented in docs/methods/oftsr.md, in OFTSR's notation (time 0 = the start x0 = sqrt(1 - sigma_p^2) x_LR + sigma_p eps,
time 1 = the HR image x1, velocity v = x1 - x0). This project's flow networks output start - data (the affine
family's "flow" prediction), so v = -network(concat(x, x_LR), t * 999) (FlowVelocity).

Stage 1 (the teacher):  L_flow = mean |v_theta(x_t, t) - (x1 - x0)|,  x_t = (1 - t) x0 + t x1.
Stage 2 (distillation), per sample t ~ U[t_min, t_max], s = min(t + dt, t_max), h = s - t:
    x_t = x0 + t SG[v_phi(t)],  v_bar = RK2 teacher velocity from (x_t, t) over h,
    L = |v_phi(s) - SG[v_phi(t) + (h/s)(v_bar - v_phi(t))]|^2 + 0.01 (1-t)^2 |v_phi(t) - v_bar|^2
        + 0.1 |v_phi(t_bc) - SG[v_theta(x0, t_bc)]|^2.
The student's one-step output at the knob t is x0 + v_phi(x0, t).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..context import TeacherContext
from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..errors import UserError
from ..flags import OPTIMISATION, non_negative_float, option, positive_float, positive_int, unit_interval
from ..losses import rk2_velocity, time_weighted_mse, trajectory_target
from ..utils import per_sample
from .base import Method, Update

SOLVERS = {"euler": None, "midpoint": 0.5, "heun": 1.0, "ralston": 2 / 3}  # the RK2 ratio r


@dataclass
class OFTSRConfig:
    flag_group = "OFTSR (docs/methods/oftsr.md)"

    learning_rate: float = option(
        1e-4, "Adam learning rate (both stages).", parse=non_negative_float, group=OPTIMISATION
    )
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = option(0.0, "Adam weight decay.", parse=non_negative_float, group=OPTIMISATION)
    train_batch_size: int = option(8, "HR crops per process per iteration.", parse=positive_int, group=OPTIMISATION)
    # Distillation (the student stage)
    dt: float = option(0.05, "The trajectory step between the student's two times.", parse=positive_float)
    t_min: float = option(0.01, "Lowest t drawn, in [0, 1).", parse=unit_interval)
    t_max: float = option(0.99, "Highest t drawn, in (0, 1].", parse=unit_interval)
    clamp_s: bool = option(True, "s = min(t + dt, t_max) (--no-clamp_s: the paper's s = t + dt).")
    solver: str = option("midpoint", "The teacher step: euler, midpoint, heun or ralston.", choices=tuple(SOLVERS))
    align_weight: float = option(0.01, "lambda_align.", parse=non_negative_float)
    bc_weight: float = option(0.1, "lambda_BC.", parse=non_negative_float)
    align_target: str = option(
        "v_bar", "v_bar (the RK2 velocity) or instant (v_theta(x_t, t), the paper).", choices=("v_bar", "instant")
    )
    bc_time: str = option(
        "zero", "Boundary at zero (the paper) or t_min (the released trainer).", choices=("zero", "t_min")
    )
    default_t: float = option(
        1.0, "The exported pipeline's t when none is given (0 = fidelity, 1 = realism).", parse=unit_interval
    )
    output_scale: float = option(
        1.0, "x = x0 + scale * v (1; the released sampler uses 1 - 1e-3).", parse=positive_float
    )
    # The teacher stage: the noise-augmented conditional rectified flow and its network
    sigma_p: float = option(0.2, "Teacher stage: the start state's noise sigma_p.", parse=positive_float)
    flow_loss: str = option("l1", "Teacher stage: l1 or l2.", choices=("l1", "l2"))
    flow_t_min: float = option(1e-3, "Teacher stage: t ~ U[this, 1].", parse=unit_interval)
    block_out_channels: str = option("32,64,128", "Teacher stage: the UNet's channel widths, comma-separated.")
    layers_per_block: int = option(1, "Teacher stage: ResNet layers per UNet level.", parse=positive_int)
    teacher_sample_steps: int = option(
        20, "Euler steps of the flow teacher in grids and its pipeline's default.", parse=positive_int
    )


class FlowVelocity(nn.Module):
    """OFTSR's v(x, x_LR, t) = x1 - x0 direction, t in [0, 1] per sample, from a Denoiser whose network speaks
    this project's flow convention (output = start - data, at model time t * 999)."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self.denoiser.adapter(x, t.float() * 999, Cond(image=u)).float()


def start_state(u: torch.Tensor, eps: torch.Tensor, sigma_p: float) -> torch.Tensor:
    """The noise-augmented start state x0 = sqrt(1 - sigma_p^2) x_LR + sigma_p eps."""
    return math.sqrt(1 - sigma_p**2) * u + sigma_p * eps


@torch.no_grad()
def flow_sample(velocity, x0: torch.Tensor, u: torch.Tensor, steps: int, solver: str = "euler") -> torch.Tensor:
    """The teacher ODE from t = 0 to 1 with fixed Euler or RK2 steps (the paper's adaptive RK45 is not needed at
    toy size)."""
    x, h, r = x0, 1.0 / steps, SOLVERS[solver]
    for i in range(steps):
        t = torch.full((x.shape[0],), i * h, device=x.device)
        k1 = velocity(x, u, t)
        x = x + h * (k1 if r is None else rk2_velocity(k1, velocity(x + r * h * k1, u, t + r * h), r))
    return x


def flow_matching_loss(velocity, x1: torch.Tensor, u: torch.Tensor, sigma_p: float, t_min: float, kind: str):
    """The teacher's loss, per sample: t ~ U[t_min, 1], x_t = (1 - t) x0 + t x1, |v(x_t, t) - (x1 - x0)| (l1) or
    squared (l2)."""
    x0 = start_state(u, torch.randn_like(x1), sigma_p)
    t = t_min + (1 - t_min) * torch.rand(x1.shape[0], device=x1.device)
    tt = per_sample(t, x1)
    err = velocity((1 - tt) * x0 + tt * x1, u, t) - (x1 - x0)
    return err.abs().mean() if kind == "l1" else err.square().mean()


class OFTSR(Method):
    """The student stage (or, with train_teacher, the teacher stage: the context's network is then trained)."""

    ema_models = ("student",)
    exported_models = ("student",)

    def __init__(
        self,
        context: TeacherContext,
        config: OFTSRConfig,
        student_init: Denoiser | None = None,
        preview: Batch | None = None,
        train_teacher: bool = False,
    ):
        """`train_teacher`: the teacher stage, whose method trains the context's network itself by flow matching."""
        super().__init__()
        teacher = context.denoiser
        if config.solver not in SOLVERS:
            raise UserError(f"--solver must be one of {', '.join(SOLVERS)}; got {config.solver!r}.")
        for name, value, allowed in (
            ("align_target", config.align_target, ("v_bar", "instant")),
            ("bc_time", config.bc_time, ("zero", "t_min")),
            ("flow_loss", config.flow_loss, ("l1", "l2")),
        ):
            if value not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}.")
        if not 0 <= config.t_min < config.t_max <= 1 or config.dt <= 0:
            raise UserError(
                f"Need 0 <= t_min < t_max <= 1 and dt > 0; got {config.t_min}, {config.t_max}, {config.dt}."
            )
        if config.dt > config.t_max - config.t_min:
            raise UserError(
                f"--dt {config.dt} is larger than the time range t_max - t_min = {config.t_max - config.t_min:g}: "
                f"the student's second time would always be clamped to t_max; choose a smaller --dt."
            )
        if not config.clamp_s and config.t_max + config.dt > 1:
            raise UserError(
                f"--no-clamp_s with t_max {config.t_max} and dt {config.dt} trains at flow times above 1 "
                f"(s = t + dt up to {config.t_max + config.dt:g}); lower --t_max to at most {1 - config.dt:g}."
            )
        if not 0 <= config.flow_t_min < 1:
            raise UserError(f"--flow_t_min must lie in [0, 1); got {config.flow_t_min}.")
        if not 0 <= config.default_t <= 1:
            raise UserError(f"--default_t must lie in [0, 1]; got {config.default_t}.")
        if teacher.schedule.kind != "conditional_flow":
            raise UserError(
                f"OFTSR distils a noise-augmented conditional flow teacher; this one's schedule is "
                f"{teacher.schedule.kind} (train one with train/oftsr.py --preset teacher-cpu)."
            )
        self.context, self.config, self.sample_shape = context, config, tuple(context.sample_shape)
        self.preview, self.train_teacher = preview, train_teacher
        self.sigma_p = teacher.schedule.sigma_p
        self.needs_data = True
        self.updates = [Update("student", "student")]
        if train_teacher:
            self.student = FlowVelocity(teacher.train().requires_grad_(True))
            self.teacher = None
        else:  # the student starts as a copy of the teacher's (EMA) weights, as in the paper
            self.teacher = FlowVelocity(teacher.eval().requires_grad_(False))
            init = student_init if student_init is not None else teacher
            self.student = FlowVelocity(copy.deepcopy(init).train().requires_grad_(True))

    def models(self):
        return {"student": self.student}

    def optimizers(self):
        c = self.config
        params = [p for p in self.student.parameters() if p.requires_grad]
        return {
            "student": torch.optim.Adam(
                params, lr=c.learning_rate, betas=c.adam_betas, weight_decay=c.adam_weight_decay
            )
        }

    def memory_networks(self):
        return [self.student.denoiser.net]

    def to(self, device):
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def start_iteration(self, batch: Batch, info):
        return batch

    def loss(self, name, batch: Batch):
        c, student = self.config, self.prepared["student"]
        x1, u = batch.images, batch.cond.u
        if self.train_teacher:
            loss = flow_matching_loss(student, x1, u, self.sigma_p, c.flow_t_min, c.flow_loss)
            return loss, {"loss_flow": loss.detach()}
        return self.distillation_loss(student, self.teacher, x1, u)

    def distillation_loss(self, student, teacher, x1: torch.Tensor, u: torch.Tensor):
        """Stage 2's loss of the module docstring (the draws come from the global generator the trainer seeds per
        step)."""
        c, B, device = self.config, x1.shape[0], x1.device
        x0 = start_state(u, torch.randn_like(x1), self.sigma_p)
        t = c.t_min + (c.t_max - c.t_min) * torch.rand(B, device=device)
        s = torch.clamp(t + c.dt, max=c.t_max) if c.clamp_s else t + c.dt
        h = s - t
        t_bc = torch.full_like(t, 0.0 if c.bc_time == "zero" else c.t_min)
        # The student's three queries (t, s, t_bc) in one batched forward.
        v_t, v_s, v_bc = student(
            x0.repeat(3, *[1] * (x0.ndim - 1)), u.repeat(3, *[1] * (u.ndim - 1)), torch.cat([t, s, t_bc])
        ).chunk(3)
        with torch.no_grad():
            x_t = x0 + per_sample(t, x0) * v_t.detach()
            k1 = teacher(x_t, u, t)
            r = SOLVERS[c.solver]
            v_bar = k1 if r is None else rk2_velocity(k1, teacher(x_t + r * per_sample(h, k1) * k1, u, t + r * h), r)
            v_bc_teacher = teacher(x0, u, t_bc)
        loss_distill = time_weighted_mse(v_s, trajectory_target(v_t, v_bar, h, s))
        loss_align = time_weighted_mse(v_t, v_bar if c.align_target == "v_bar" else k1, (1 - t) ** 2)
        loss_bc = time_weighted_mse(v_bc, v_bc_teacher)
        loss = loss_distill + c.align_weight * loss_align + c.bc_weight * loss_bc
        return loss, {
            "loss_distill": loss_distill.detach(),
            "loss_align": loss_align.detach(),
            "loss_bc": loss_bc.detach(),
        }

    # -- outputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, student, u: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """The one-step output x0 + scale * v_phi(x0, t) at the knob t."""
        x0 = start_state(u, eps, self.sigma_p)
        return x0 + self.config.output_scale * student(x0, u, torch.full((u.shape[0],), float(t), device=u.device))

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        """Rows of bicubic u, [student at t = 0 and t = 1 | the teacher's Euler samples], HR."""
        if self.preview is None:
            return torch.zeros(1, *self.sample_shape)
        k = max(1, min(num // 4, self.preview.images.shape[0]))
        hr, u = self.preview.images[:k].to(device), self.preview.cond.u[:k].to(device)
        eps = torch.randn(hr.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        net = models["student"]
        if self.train_teacher:
            rows = [flow_sample(net, start_state(u, eps, self.sigma_p), u, self.config.teacher_sample_steps)]
        else:
            rows = [self.sample(net, u, eps, 0.0), self.sample(net, u, eps, 1.0)]
        return torch.cat([u, *rows, hr]).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from ..export import Card, export_super_resolution, hub_id, metrics_line

        c, target = self.config, self.context.export
        net = models["student"].denoiser.net
        common = {
            "schedule": {"kind": "conditional_flow", "sigma_p": self.sigma_p, "num_timesteps": 1000},
            "prediction_type": "flow",
            "upscale_factor": (target.upscale_factor if target else None) or 4,
            "tile_size": target.resolution if target else None,
        }
        rows = {
            "teacher": self.context.source,
            "sigma_p": self.sigma_p,
            "upscale factor": common["upscale_factor"],
            "training steps": extra_card.get("training_steps"),
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "metrics": metrics_line(extra_card.get("eval"), "onestep-eval sr"),
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }
        if self.train_teacher:
            card = Card(
                "Conditional rectified-flow SR teacher (OFTSR's teacher stage)",
                {"flow loss": c.flow_loss, **rows},
                extra_tags=["teacher"],
            )
            teacher_info = {
                "sr_schedule": {"kind": "conditional_flow", "sigma_p": self.sigma_p, "prediction_type": "flow"},
                "upscale_factor": common["upscale_factor"],
                "training_data": target.training_data if target else None,
            }
            call = (
                f"`pipe(image=low_res, num_inference_steps={c.teacher_sample_steps}).images`: Euler steps of the flow."
            )
            config = {**common, "mode": "sampler", "start": "lr", "num_inference_steps": c.teacher_sample_steps}
            export_super_resolution(net, output_dir, card, config, call, teacher_info=teacher_info)
            return
        rows = {
            "method": "OFTSR (Zhu et al., arXiv 2412.09465)",
            **rows,
            "dt / solver / align / BC": f"{c.dt} / {c.solver} / {c.align_weight} / {c.bc_weight}",
            "default t": c.default_t,
        }
        card = Card("One-step super-resolution student (OFTSR)", rows, method="oftsr", steps=1)
        card.base_model = hub_id(self.context.source)
        call = (
            "`pipe(image=low_res, t=0.5, generator=torch.Generator().manual_seed(0)).images`: one network evaluation; "
            "t in [0, 1] trades fidelity (0, high PSNR) for realism (1)."
        )
        config = {**common, "mode": "velocity", "default_t": c.default_t, "output_scale": c.output_scale}
        export_super_resolution(net, output_dir, card, config, call)

    def product(self, folder: str) -> str:
        if self.train_teacher:
            return f"teacher  {folder} (unet/, onestep.json; also a SuperResolutionPipeline)"
        return f"student pipeline  {folder} (model_index.json, unet/, super_resolution.py, README.md)"

    def usage(self, folder: str) -> str:
        if self.train_teacher:
            return (
                f"a teacher for train/oftsr.py --pretrained_model_name_or_path {folder}; as a pipeline "
                f"{super().usage(folder)}(image=low_res_pil).images"
            )
        return f"{super().usage(folder)}(image=low_res_pil, t=0.5).images"
