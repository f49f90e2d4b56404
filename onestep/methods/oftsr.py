"""OFTSR: one-step flow super-resolution with a tunable fidelity-realism trade-off (Zhu et al., arXiv 2412.09465).

Follows shared/methods/oftsr.md, in OFTSR's notation (time 0 = the start x0 = sqrt(1 - sigma_p^2) x_LR + sigma_p eps,
time 1 = the HR image x1, velocity v = x1 - x0). This project's flow networks output start - data (the affine
family's "flow" prediction), so v = -network(concat(x, x_LR), t * 999) (FlowVelocity).

Stage 1 (the teacher, section 4.1):  L_flow = mean |v_theta(x_t, t) - (x1 - x0)|,  x_t = (1 - t) x0 + t x1.
Stage 2 (distillation, section 4.2), per sample t ~ U[t_min, t_max], s = min(t + dt, t_max), h = s - t:
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

from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..errors import UserError
from ..losses import rk2_velocity, time_weighted_mse, trajectory_target
from ..utils import per_sample
from .base import Method, Update

SOLVERS = {"euler": None, "midpoint": 0.5, "heun": 1.0, "ralston": 2 / 3}  # the RK2 ratio r


@dataclass
class OFTSRConfig:
    stage: str = "distill"  # "teacher": stage 1, the noise-augmented conditional rectified flow
    learning_rate: float = 1e-4  # Adam, both stages (spec 5)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.0
    train_batch_size: int = 8
    # Stage 2 (spec 4.2, 7)
    dt: float = 0.05
    t_min: float = 0.01
    t_max: float = 0.99
    clamp_s: bool = True  # s = min(t + dt, t_max) (the trainer's choice); --no-clamp_s: the paper's s = t + dt
    solver: str = "midpoint"  # the teacher step: euler, midpoint (default), heun, ralston
    align_weight: float = 0.01
    bc_weight: float = 0.1
    align_target: str = "v_bar"  # the RK2 velocity (trainer), or "instant": v_theta(x_t, t) (paper)
    bc_time: str = "zero"  # the boundary at t = 0 (paper), or "t_min" (trainer)
    default_t: float = 1.0  # the exported pipeline's t when the caller gives none (1 = realism)
    output_scale: float = 1.0  # x = x0 + scale * v (paper 1; the released sampler 1 - 1e-3)
    # Stage 1 (spec 4.1, 5): the teacher network and its objective
    sigma_p: float = 0.2  # the start state's noise (spec 7: DIV2K/ImageNet 0.2, FFHQ 0.1)
    flow_loss: str = "l1"  # l1 (paper's choice for restoration) or l2
    flow_t_min: float = 1e-3  # t ~ U[flow_t_min, 1]
    block_out_channels: str = "32,64,128"  # the teacher UNet train/oftsr.py --stage teacher builds
    layers_per_block: int = 1
    teacher_sample_steps: int = 20  # Euler steps of the teacher in sample grids and its pipeline's default


class FlowVelocity(nn.Module):
    """OFTSR's v(x, x_LR, t) = x1 - x0 direction, t in [0, 1] per sample, from a Denoiser whose network speaks
    this project's flow convention (output = start - data, at model time t * 999)."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self.denoiser.adapter(x, t.float() * 999, Cond(image=u)).float()


def start_state(u: torch.Tensor, eps: torch.Tensor, sigma_p: float) -> torch.Tensor:
    """x0 = sqrt(1 - sigma_p^2) x_LR + sigma_p eps (spec 3)."""
    return math.sqrt(1 - sigma_p**2) * u + sigma_p * eps


@torch.no_grad()
def flow_sample(velocity, x0: torch.Tensor, u: torch.Tensor, steps: int, solver: str = "euler") -> torch.Tensor:
    """The teacher ODE from t = 0 to 1 with fixed Euler or RK2 steps (the spec's RK45 is not needed at toy size)."""
    x, h, r = x0, 1.0 / steps, SOLVERS[solver]
    for i in range(steps):
        t = torch.full((x.shape[0],), i * h, device=x.device)
        k1 = velocity(x, u, t)
        x = x + h * (k1 if r is None else rk2_velocity(k1, velocity(x + r * h * k1, u, t + r * h), r))
    return x


def flow_matching_loss(velocity, x1: torch.Tensor, u: torch.Tensor, sigma_p: float, t_min: float, kind: str):
    """Spec 4.1 per sample: t ~ U[t_min, 1], x_t = (1 - t) x0 + t x1, |v(x_t, t) - (x1 - x0)| (l1) or squared (l2)."""
    x0 = start_state(u, torch.randn_like(x1), sigma_p)
    t = t_min + (1 - t_min) * torch.rand(x1.shape[0], device=x1.device)
    tt = per_sample(t, x1)
    err = velocity((1 - tt) * x0 + tt * x1, u, t) - (x1 - x0)
    return err.abs().mean() if kind == "l1" else err.square().mean()


class OFTSR(Method):
    """Stage 2 (or, with stage = teacher, stage 1: `teacher` is then the network being trained)."""

    ema_models = ("student",)
    exported_models = ("student",)

    def __init__(
        self,
        teacher: Denoiser,
        config: OFTSRConfig,
        sample_shape: tuple[int, ...],
        export_info: dict | None = None,
        student_init: Denoiser | None = None,
        preview: Batch | None = None,
    ):
        super().__init__()
        if config.solver not in SOLVERS:
            raise UserError(f"--solver must be one of {', '.join(SOLVERS)}; got {config.solver!r}.")
        for name, value, allowed in (
            ("stage", config.stage, ("distill", "teacher")),
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
        if not 0 <= config.default_t <= 1:
            raise UserError(f"--default_t must lie in [0, 1]; got {config.default_t}.")
        if teacher.schedule.kind != "conditional_flow":
            raise UserError(
                f"OFTSR distils a noise-augmented conditional flow teacher; this one's schedule is "
                f"{teacher.schedule.kind} (train one with train/oftsr.py --stage teacher)."
            )
        self.config, self.sample_shape = config, tuple(sample_shape)
        self.export_info, self.preview = export_info or {}, preview
        self.sigma_p = teacher.schedule.sigma_p
        self.needs_data = True
        self.updates = [Update("student", "student")]
        if config.stage == "teacher":
            self.student = FlowVelocity(teacher.train().requires_grad_(True))
            self.teacher = None
        else:  # spec 2: the student starts as a copy of the teacher's (EMA) weights
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
        if c.stage == "teacher":
            loss = flow_matching_loss(student, x1, u, self.sigma_p, c.flow_t_min, c.flow_loss)
            return loss, {"loss_flow": loss.detach()}
        return self.distillation_loss(student, self.teacher, x1, u)

    def distillation_loss(self, student, teacher, x1: torch.Tensor, u: torch.Tensor):
        """Spec 4.2 steps 1-6 (the draws come from the global generator the trainer seeds per step)."""
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
        """The one-step output x0 + scale * v_phi(x0, t) (spec 6)."""
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
        if self.config.stage == "teacher":
            rows = [flow_sample(net, start_state(u, eps, self.sigma_p), u, self.config.teacher_sample_steps)]
        else:
            rows = [self.sample(net, u, eps, 0.0), self.sample(net, u, eps, 1.0)]
        return torch.cat([u, *rows, hr]).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from ..export import export_super_resolution

        c, info = self.config, self.export_info
        net = models["student"].denoiser.net
        common = {
            "schedule": {"kind": "conditional_flow", "sigma_p": self.sigma_p, "num_timesteps": 1000},
            "prediction_type": "flow",
            "upscale_factor": info.get("upscale_factor", 4),
            "tile_size": info.get("resolution"),
        }
        card = {
            "teacher": info.get("teacher", "-"),
            "sigma_p": self.sigma_p,
            "upscale factor": common["upscale_factor"],
            "training steps": extra_card.get("training_steps"),
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }
        if c.stage == "teacher":
            card = {"title": "Conditional rectified-flow SR teacher (OFTSR stage 1)", "flow loss": c.flow_loss, **card}
            teacher_info = {
                "sr_schedule": {"kind": "conditional_flow", "sigma_p": self.sigma_p, "prediction_type": "flow"},
                "upscale_factor": common["upscale_factor"],
            }
            usage = (
                f"`pipe(image=low_res, num_inference_steps={c.teacher_sample_steps}).images`: Euler steps of the flow."
            )
            config = {**common, "mode": "sampler", "start": "lr", "num_inference_steps": c.teacher_sample_steps}
            export_super_resolution(net, output_dir, card, config, teacher_info=teacher_info, usage=usage)
            return
        card = {
            "title": "One-step super-resolution student (OFTSR)",
            "method": "OFTSR (Zhu et al., arXiv 2412.09465)",
            **card,
            "dt / solver / align / BC": f"{c.dt} / {c.solver} / {c.align_weight} / {c.bc_weight}",
            "default t": c.default_t,
        }
        usage = (
            "`pipe(image=low_res, t=0.5, generator=torch.Generator().manual_seed(0)).images`: one network evaluation; "
            "t in [0, 1] trades fidelity (0, high PSNR) for realism (1)."
        )
        config = {**common, "mode": "velocity", "default_t": c.default_t, "output_scale": c.output_scale}
        export_super_resolution(net, output_dir, card, config, usage=usage)

    def usage(self, folder: str) -> str:
        if self.config.stage == "teacher":
            return f"a teacher for train/oftsr.py --pretrained_model_name_or_path {folder}; as a pipeline {super().usage(folder)}(image=low_res_pil).images"
        return f"{super().usage(folder)}(image=low_res_pil, t=0.5).images"
