"""TAD-SR: one-step diffusion super-resolution with time-aware distillation (He et al. 2024, arXiv 2408.07476).

Documented in docs/methods/tadsr.md. Per iteration, from the start state x_T = (a_T + b_T) u + c_T eps:
    z_s = G(x_T, T*, LR),  z_tch = SG[teacher DDIM over its steps from the same x_T];
    D step:  L_D = hinge on the time-aware heads over the frozen teacher's encoder features of
             perturb(z_gt, t_d, n) (real) and SG[perturb(z_s, t_d, n)] (fake);
    G step:  L_G = lambda_reg |z_s - z_tch|^2 + lambda_HSD mean(SG[g] z_s) + lambda_GAN (-D(fake)),
             g = eps_hat(perturb(SG[z_s], t_h, n)) - eps_hat(perturb(z_ref, t_h, n)) at small t_h (HSD).
Perturbations use Gaussian noise (the released code's uniform noise is a bug: docs/methods/tadsr.md, 'Deviations
from the paper and the public code'), the teacher's input is scaled once (by the Denoiser), and the teacher never
trains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..context import TeacherContext
from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..discriminator import TimeAwareDiscriminator
from ..errors import UserError
from ..flags import OPTIMISATION, non_negative_float, non_negative_int, option, positive_float, positive_int
from ..losses import (
    hinge_discriminator_loss,
    hinge_generator_loss,
    score_difference,
    score_distillation_loss,
)
from ..sampling import ddim_from, trailing_timesteps
from .base import Method, Update
from .denoising import DiffusionTraining

SCORE_LOSSES = ("hsd", "sds", "none")


@dataclass
class TADSRConfig:
    flag_group = "TAD-SR (docs/methods/tadsr.md)"
    _GAN = ("gan", bool, "--gan")
    _SCORE = ("score_loss", lambda loss: loss != "none", "--score_loss hsd or sds")
    flag_requires = {
        "gan_weight": _GAN,
        "disc_timesteps": _GAN,
        "disc_learning_rate": _GAN,
        "time_aware": _GAN,
        "disc_embed_dim": _GAN,
        "disc_logit_channels": _GAN,
        "disc_residual_scale": _GAN,
        "disc_feature_modules": _GAN,
        "hsd_weight": _SCORE,
        "hsd_timesteps": _SCORE,
        "hsd_uniform": _SCORE,
        "hsd_reference": ("score_loss", lambda loss: loss == "hsd", "--score_loss hsd"),
    }

    learning_rate: float = option(
        5e-5,
        "AdamW learning rate of the generator (and of the discriminator unless --disc_learning_rate).",
        parse=non_negative_float,
        group=OPTIMISATION,
    )
    disc_learning_rate: float | None = option(
        None, "The discriminator's AdamW learning rate (None: --learning_rate).", parse=non_negative_float
    )
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = option(0.0, "AdamW weight decay.", parse=non_negative_float, group=OPTIMISATION)
    train_batch_size: int = option(8, "HR crops per process per iteration.", parse=positive_int, group=OPTIMISATION)
    reg_weight: float = option(
        1.0, "lambda_reg: regression onto the teacher's multi-step output.", parse=non_negative_float
    )
    hsd_weight: float = option(1.0, "lambda_HSD: high-frequency score distillation.", parse=non_negative_float)
    gan_weight: float = option(0.02, "lambda_GAN: the time-aware GAN's generator term.", parse=non_negative_float)
    reg_target: str = option(
        "teacher", "teacher (its multi-step output from the same x_T) or gt (the HR image).", choices=("teacher", "gt")
    )
    score_loss: str = option(
        "hsd", "hsd, sds (vanilla score distillation, the ablation) or none.", choices=SCORE_LOSSES
    )
    hsd_reference: str = option(
        "teacher", "z_ref of HSD: teacher (default) or gt (the ablation 'SDS+HR').", choices=("teacher", "gt")
    )
    hsd_timesteps: list[int] | None = option(
        None, "HSD's small-noise set, comma-separated (None: 0,1,2 for ResShift, else the lowest 20% of steps)."
    )
    hsd_uniform: bool = option(False, "HSD over all steps but the last instead.")
    gan: bool = option(True, "The time-aware discriminator (--no-gan: regression and HSD only).")
    disc_timesteps: list[int] | None = option(None, "D's noise levels, comma-separated (None: 0..T-2).")
    time_aware: bool = option(True, "FiLM(t) in the discriminator heads (--no-time_aware: time-agnostic heads).")
    disc_embed_dim: int = option(
        160, "Width E of the heads' time embedding (ResShift 160, SeeSR 320).", parse=positive_int
    )
    disc_logit_channels: int = option(64, "Logits per token of each head (c_dim).", parse=positive_int)
    disc_residual_scale: float = option(
        2**-0.5, "The heads' residual (x + f(x)) * this (1/sqrt 2, unverified; 1 = plain sum).", parse=positive_float
    )
    disc_feature_modules: str | None = option(
        None, "Teacher submodules D reads, comma-separated (None: each level's last map + mid)."
    )
    start: str = option("lr", "x_T: lr ((a_T + b_T) u + c_T eps) or noise (c_T eps).", choices=("lr", "noise"))
    student_timestep: int | None = option(
        None, "T*, the student's time input (None: the teacher's last step).", parse=non_negative_int
    )
    teacher_steps: int | None = option(
        None, "Steps of the teacher's DDIM sampler (None: all of them; 50 for latent SR).", parse=positive_int
    )
    noise_level: int = option(
        20, "x4 upscaler teachers: the low-resolution image's noise level (class label).", parse=non_negative_int
    )


class TeacherEncoder:
    """Feature maps of named submodules of a frozen teacher network, read with forward hooks during a teacher
    call that stops after the last of them (the decoder never runs). Gradients reach the input, not the teacher."""

    def __init__(self, denoiser: Denoiser, module_names: list[str]):
        self.denoiser, self.names = denoiser, list(module_names)
        self._captured: dict[str, torch.Tensor] | None = None
        for name in self.names:
            try:
                module = denoiser.net.get_submodule(name)
            except AttributeError:
                raise UserError(
                    f"The teacher network has no submodule {name!r} to read discriminator features from "
                    f"(--disc_feature_modules)."
                ) from None
            module.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def capture(module, inputs, output):
            if self._captured is None:
                return
            if isinstance(output, tuple):
                output = output[0]
            self._captured[name] = getattr(output, "sample", output)  # diffusers' output dataclasses
            if len(self._captured) == len(self.names):
                raise _Stop

        return capture

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> list[torch.Tensor]:
        self._captured = {}
        try:
            self.denoiser.raw(x_t, t, cond)
        except _Stop:
            pass
        finally:
            captured, self._captured = self._captured, None
        missing = [n for n in self.names if n not in captured]
        if missing:
            raise UserError(f"The teacher's forward never ran {missing[0]!r}; choose other --disc_feature_modules.")
        return [captured[n] for n in self.names]


class _Stop(Exception):
    pass


def default_feature_modules(net: nn.Module) -> list[str]:
    """The default features D reads, for any teacher: the last feature map of every resolution level and the mid
    block (diffusers UNets); the hidden layers but the last of an MLP with `blocks` (the toy test bed)."""
    if hasattr(net, "down_blocks") and hasattr(net, "mid_block"):
        levels = []
        for i, block in enumerate(net.down_blocks):  # attention blocks end a level with their attention's output
            attentions = getattr(block, "attentions", None)
            last = f"attentions.{len(attentions) - 1}" if attentions else f"resnets.{len(block.resnets) - 1}"
            levels.append(f"down_blocks.{i}.{last}")
        return levels + ["mid_block"]
    if hasattr(net, "blocks") and len(net.blocks) > 1:
        return [f"blocks.{i}" for i in range(len(net.blocks) - 1)]
    raise UserError("Name the teacher submodules the discriminator reads with --disc_feature_modules.")


class TADSR(Method):
    ema_models = ("generator",)
    exported_models = ("generator",)
    no_lr_warmup = ("discriminator",)  # D skips the warm-up, as TAD-SR's does (its rate: G's unless told otherwise)

    def __init__(
        self,
        context: TeacherContext,
        config: TADSRConfig,
        student_init: Denoiser | None = None,
        feature_teacher: Denoiser | None = None,
        preview: Batch | None = None,
    ):
        """`student_init` (default: the teacher) is what G copies; `feature_teacher` (default: the teacher) is the
        frozen network whose encoder D reads (the toy recipe: an analytic teacher, a fitted teacher-net for both).
        `preview`: a fixed batch of HR images and their condition for the sample grids (the context's `decode`
        turns a latent teacher's latents into pixels for them)."""
        super().__init__()
        teacher = context.denoiser
        self.context, self.decode = context, context.decode
        for name, value, allowed in (
            ("score_loss", config.score_loss, SCORE_LOSSES),
            ("reg_target", config.reg_target, ("teacher", "gt")),
            ("hsd_reference", config.hsd_reference, ("teacher", "gt")),
            ("start", config.start, ("lr", "noise")),
        ):
            if value not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}.")
        if config.hsd_timesteps and config.hsd_uniform:
            raise UserError("--hsd_timesteps and --hsd_uniform both choose HSD's timesteps; pass one of them.")
        if config.gan and config.disc_embed_dim % 2:
            raise UserError(f"--disc_embed_dim must be even (sine and cosine halves); got {config.disc_embed_dim}.")
        hsd_on = config.score_loss != "none" and config.hsd_weight
        if not (config.reg_weight or hsd_on or (config.gan and config.gan_weight)):
            raise UserError("Every generator loss is off (--reg_weight, --hsd_weight/--score_loss, --gan_weight).")
        T = teacher.schedule.num_timesteps
        self.config, self.sample_shape = config, tuple(context.sample_shape)
        self.preview = preview
        self.teacher = teacher.eval().requires_grad_(False)
        self.student_t = T - 1 if config.student_timestep is None else config.student_timestep
        self.teacher_timesteps = trailing_timesteps(T, config.teacher_steps or T)
        self.hsd_set = self._timestep_set("hsd_timesteps", self._default_hsd_set(), T)
        self.disc_set = self._timestep_set("disc_timesteps", list(range(T - 1)), T)
        if not 0 <= self.student_t < T or not 1 <= len(self.teacher_timesteps) <= T:
            raise UserError(f"--student_timestep and --teacher_steps must lie within the teacher's {T} steps.")
        init = student_init if student_init is not None else teacher
        self.generator = copy.deepcopy(init).train().requires_grad_(True)  # an exact teacher copy
        self.needs_data = True
        self.updates = [Update("generator", "generator")]
        self.discriminator = None
        if config.gan:  # the D step, then the G step, every iteration (1:1)
            self.feature_teacher = (feature_teacher or teacher).eval().requires_grad_(False)
            names = (
                config.disc_feature_modules.split(",")
                if config.disc_feature_modules
                else default_feature_modules(self.feature_teacher.net)
            )
            self.encoder = TeacherEncoder(self.feature_teacher, names)
            self.discriminator = TimeAwareDiscriminator(
                self._feature_shapes(),
                embed_dim=config.disc_embed_dim,
                logit_channels=config.disc_logit_channels,
                film=config.time_aware,
                residual_scale=config.disc_residual_scale,
            )
            self.updates = [Update("discriminator", "discriminator"), Update("generator", "generator")]

    def _default_hsd_set(self) -> list[int]:
        T = self.teacher.schedule.num_timesteps
        if self.config.hsd_uniform:
            return list(range(T - 1))
        if self.teacher.schedule.kind == "resshift":
            return [0, 1, 2]
        return list(range(max(1, round(0.2 * T))))

    def _timestep_set(self, name: str, default: list[int], T: int) -> torch.Tensor:
        values = getattr(self.config, name) or default
        if not values or not all(0 <= v < T for v in values):
            raise UserError(f"--{name} must be timesteps within 0..{T - 1}; got {values}.")
        return torch.tensor(values)

    @torch.no_grad()
    def _feature_shapes(self) -> list[tuple[int, ...]]:
        x = torch.zeros(1, *self.sample_shape)
        # A latent teacher's condition (LR pixels, text, noise level) is not shaped like x: take the preview's.
        cond = self.preview.cond[:1] if self.preview is not None and self.preview.cond is not None else Cond(image=x)
        return [tuple(f.shape[1:]) for f in self.encoder(x, torch.zeros(1, dtype=torch.long), cond)]

    # -- set-up --------------------------------------------------------------------------------
    def models(self):
        out = {"generator": self.generator}
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator
        return out

    def optimizers(self):
        c = self.config
        adamw = lambda m, lr: torch.optim.AdamW(  # noqa: E731  D has no warm-up of its own
            [p for p in m.parameters() if p.requires_grad], lr=lr, betas=c.adam_betas, weight_decay=c.adam_weight_decay
        )
        disc_lr = c.learning_rate if c.disc_learning_rate is None else c.disc_learning_rate
        rates = {"generator": c.learning_rate, "discriminator": disc_lr}
        return {name: adamw(m, rates[name]) for name, m in self.models().items()}

    def memory_networks(self):
        return [self.generator.net]

    def to(self, device):
        self.teacher.to(device)
        if self.discriminator is not None:
            self.feature_teacher.to(device)
        return self

    # -- the start state, the teacher's sampler and the perturbation ---------------------------------
    def _index(self, t: int | torch.Tensor, n: int, device) -> torch.Tensor:
        return torch.full((n,), int(t), dtype=torch.long, device=device)

    def start_state(self, u: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_T = (a_T + b_T) u + c_T eps ('x0 replaced by u': ResShift's prior u + kappa sqrt(eta_T) eps), or c_T eps
        with start = noise."""
        sched, t = self.teacher.schedule, self._index(self.teacher_timesteps[0], u.shape[0], u.device)
        if self.config.start == "lr":
            return sched.add_noise(u, eps, t, u)
        c = sched.coefficients(t, u.device)[1].reshape(-1, *([1] * (u.ndim - 1)))
        return (c * eps.double()).to(eps.dtype)

    def teacher_sample(self, x_T: torch.Tensor, cond: Cond) -> torch.Tensor:
        return ddim_from(self.teacher, x_T, cond, self.teacher_timesteps)

    def perturb(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """a_t z + b_t u + c_t n, with Gaussian n."""
        return self.teacher.schedule.add_noise(z, noise, t, u)

    def _draw(self, values: torch.Tensor, n: int, device) -> torch.Tensor:
        return values[torch.randint(len(values), (n,))].to(device)

    # -- one iteration -------------------------------------------------------------------------
    def start_iteration(self, batch: Batch, info):
        c, gen = self.config, self.prepared["generator"]
        z_gt, cond = batch.images, batch.cond
        u, B, device = cond.u, batch.images.shape[0], batch.images.device
        x_T = self.start_state(u, torch.randn_like(z_gt))
        with torch.set_grad_enabled("generator" in info.due), self.timer.phase("generator"):
            z_s = gen(x_T, self._index(self.student_t, B, device), cond)
        z_tch = None
        if (c.reg_weight and c.reg_target == "teacher") or (c.score_loss == "hsd" and c.hsd_reference == "teacher"):
            with self.timer.phase("teacher"):
                z_tch = self.teacher_sample(x_T, cond)
        state = {"z_s": z_s, "z_tch": z_tch, "z_gt": z_gt, "cond": cond}
        if self.discriminator is not None:  # one t_d and one Gaussian n per sample, shared by real and fake
            t_d, noise = self._draw(self.disc_set, B, device), torch.randn_like(z_gt)
            with torch.no_grad():
                state["real_features"] = self.encoder(self.perturb(z_gt, t_d, noise, u), t_d, cond)
            with torch.set_grad_enabled("generator" in info.due):
                state["fake_features"] = self.encoder(self.perturb(z_s, t_d, noise, u), t_d, cond)
            state["disc_time"] = self.feature_teacher.schedule.model_time(t_d)
        return state

    def loss(self, name, s):
        return self._discriminator_loss(s) if name == "discriminator" else self._generator_loss(s)

    def _discriminator_loss(self, s):
        disc = self.prepared["discriminator"]
        logits_real = disc(s["real_features"], s["disc_time"])
        logits_fake = disc([f.detach() for f in s["fake_features"]], s["disc_time"])
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        return loss, {
            "loss_d": loss.detach(),
            "d_real": logits_real.detach().mean(),
            "d_fake": logits_fake.detach().mean(),
        }

    def _generator_loss(self, s):
        c, z_s = self.config, s["z_s"]
        logs, loss = {}, torch.zeros((), device=z_s.device)
        if c.reg_weight:
            target = s["z_tch"] if c.reg_target == "teacher" else s["z_gt"]
            loss_reg = (z_s.float() - target.float()).square().mean()
            loss, logs["loss_reg"] = loss + c.reg_weight * loss_reg, loss_reg.detach()
        if c.score_loss != "none" and c.hsd_weight:
            g = self.score_gradient(z_s.detach(), s["z_tch"] if c.hsd_reference == "teacher" else s["z_gt"], s["cond"])
            loss_hsd = score_distillation_loss(z_s, g)
            loss, logs["loss_hsd"] = loss + c.hsd_weight * loss_hsd, loss_hsd.detach()
            logs["hsd_grad_abs"] = g.abs().mean()
        if self.discriminator is not None and c.gan_weight:
            disc = self.unwrap(self.prepared["discriminator"])
            flags = [(p, p.requires_grad) for p in disc.parameters()]
            disc.requires_grad_(False)  # the gradient reaches G only (D's grads are not touched)
            try:
                loss_gan = hinge_generator_loss(disc(s["fake_features"], s["disc_time"]))
            finally:
                for p, flag in flags:
                    p.requires_grad_(flag)
            loss, logs["loss_g_gan"] = loss + c.gan_weight * loss_gan, loss_gan.detach()
        return loss, logs

    @torch.no_grad()
    def score_gradient(self, z_s: torch.Tensor, z_ref: torch.Tensor, cond: Cond) -> torch.Tensor:
        """HSD's g = eps_hat(x_s) - eps_hat(x_r) with one Gaussian n shared by x_s and x_r,
        or vanilla SDS's eps_hat(x_s) - n."""
        u, B = cond.u, z_s.shape[0]
        t = self._draw(self.hsd_set, B, z_s.device)
        noise = torch.randn_like(z_s)
        sched = self.teacher.schedule
        x_s = self.perturb(z_s, t, noise, u)
        eps_s = sched.eps_from_x0(self.teacher(x_s, t, cond), x_s, t, u)
        if self.config.score_loss == "sds":
            return score_difference(eps_s, noise)
        x_r = self.perturb(z_ref, t, noise, u)
        return score_difference(eps_s, sched.eps_from_x0(self.teacher(x_r, t, cond), x_r, t, u))

    # -- outputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, generator: Denoiser, cond: Cond, eps: torch.Tensor) -> torch.Tensor:
        """One student step from the start state."""
        x_T = self.start_state(cond.u, eps)
        return generator(x_T, self._index(self.student_t, eps.shape[0], eps.device), cond)

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        """Rows of bicubic u, student, teacher, HR for the preview batch."""
        if self.preview is None:
            return torch.zeros(1, *self.sample_shape)
        k = max(1, min(num // 4, self.preview.images.shape[0]))
        hr, cond = self.preview.images[:k].to(device), self.preview.cond[:k].to(device)
        eps = torch.randn(hr.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        student = self.sample(models["generator"], cond, eps)
        teacher = self.teacher_sample(self.start_state(cond.u, eps), cond)
        rows = torch.cat([cond.u, student, teacher, hr])
        return (self.decode(rows) if self.decode is not None else rows).clamp(-1, 1)

    def pipeline_config(self) -> dict:
        from ..export import sr_schedule_description

        target = self.context.export
        return {
            "schedule": sr_schedule_description(self.teacher.schedule),
            "prediction_type": self.teacher.prediction_type,
            "mode": "one_step",
            "timestep": self.student_t,
            "start": self.config.start,
            "upscale_factor": (target.upscale_factor if target else None) or 4,
            "tile_size": target.resolution if target else None,
        }

    def export(self, models, output_dir, extra_card):
        from ..export import Card, export_latent_super_resolution, export_super_resolution, hub_id, metrics_line

        c, target = self.config, self.context.export
        rows = {
            "method": "TAD-SR (He et al. 2024, arXiv 2408.07476)",
            "teacher": self.context.source,
            "upscale factor": self.pipeline_config()["upscale_factor"],
            "student timestep": self.student_t,
            "loss weights (reg / HSD / GAN)": f"{c.reg_weight} / {c.hsd_weight} / {c.gan_weight if c.gan else 'off'}",
            "training steps": extra_card.get("training_steps"),
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "metrics": metrics_line(extra_card.get("eval"), "onestep-eval sr"),
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }
        card = Card("One-step super-resolution student (TAD-SR)", rows, method="tad-sr", steps=1)
        card.base_model = hub_id(self.context.source)
        call = "`pipe(image=low_res, generator=torch.Generator().manual_seed(0)).images`: one network evaluation"
        net = models["generator"].net
        if target is not None and target.latent_sr:  # diffusers' latent SR teachers (onestep/latent_sr.py)
            config = self.pipeline_config()
            export_latent_super_resolution(net, output_dir, card, config, target, call + " and one decode.")
            return
        export_super_resolution(net, output_dir, card, self.pipeline_config(), call + ".")

    def product(self, folder: str) -> str:
        files = "latent_super_resolution.py" if self.context.kind == "latent_sr" else "super_resolution.py"
        return f"student pipeline  {folder} (model_index.json, unet/, {files}, README.md)"

    def usage(self, folder: str) -> str:
        return f"{super().usage(folder)}(image=low_res_pil).images"


# -- the ResShift-style teacher (train/sr_teacher.py) ------------------------------------------------------


@dataclass
class ResShiftTeacherConfig:
    flag_group = "teacher network and schedule"

    learning_rate: float = option(2e-4, "AdamW learning rate.", parse=non_negative_float, group=OPTIMISATION)
    adam_weight_decay: float = option(0.0, "AdamW weight decay.", parse=non_negative_float, group=OPTIMISATION)
    train_batch_size: int = option(16, "HR crops per process per iteration.", parse=positive_int, group=OPTIMISATION)
    cond_dropout: float = 0.0  # (class-conditional teachers only; unused here)
    # The ResShift schedule of the bundled teacher: T = 15, kappa = 2, m = 0.04, e_end = 0.99, p = 0.3.
    num_timesteps: int = option(15, "T, the schedule's steps.", parse=positive_int)
    kappa: float = option(2.0, "kappa: the noise scale, c_t = kappa sqrt(eta_t).", parse=positive_float)
    min_noise: float = option(0.04, "m of sqrt(eta_1) = min(m / kappa, m, sqrt(0.001)).", parse=positive_float)
    eta_end: float = option(0.99, "sqrt(eta_T).", parse=positive_float)
    power: float = option(0.3, "p, the schedule's shape.", parse=positive_float)
    scale_input: bool = option(False, "Feed x_t / sqrt(kappa^2 eta_t + 1) (ResShift's latent input scaling).")
    block_out_channels: str = option("32,64,128", "The UNet's channel widths, comma-separated.")
    layers_per_block: int = option(1, "ResNet layers per UNet level.", parse=positive_int)


class ResShiftTeacherTraining(DiffusionTraining):
    """A pixel ResShift teacher: an x0-predicting UNet reading [x_t, u], trained with the plain x0 MSE over
    uniform t (ResShift's objective), exported as a teacher folder that is also a SuperResolutionPipeline."""

    def __init__(
        self,
        denoiser: Denoiser,
        config: ResShiftTeacherConfig,
        sample_shape,
        upscale_factor: int,
        resolution: int,
        preview=None,
        training_data: str | None = None,
    ):
        super().__init__(denoiser, config, sample_shape, scheduler_config={})
        self.upscale_factor, self.resolution, self.preview = upscale_factor, resolution, preview
        self.training_data = training_data  # recorded in the teacher folder's onestep.json

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        if self.preview is None:
            return torch.zeros(1, *self.sample_shape)
        k = max(1, min(num // 3, self.preview.images.shape[0]))
        hr, cond = self.preview.images[:k].to(device), self.preview.cond[:k].to(device)
        den, u = models["model"], cond.u
        T = den.schedule.num_timesteps
        eps = torch.randn(hr.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        x_T = den.schedule.add_noise(u, eps, torch.full((k,), T - 1, device=device), u)
        return torch.cat([u, ddim_from(den, x_T, cond, list(range(T - 1, -1, -1))), hr]).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from ..export import Card, export_super_resolution, metrics_line, sr_schedule_description

        c = self.config
        args = {k: getattr(c, k) for k in ("num_timesteps", "kappa", "min_noise", "eta_end", "power", "scale_input")}
        teacher_info = {
            "sr_schedule": {"kind": "resshift", "prediction_type": "sample", **args},
            "upscale_factor": self.upscale_factor,
            "training_data": self.training_data,
        }
        pipeline = {
            "schedule": sr_schedule_description(models["model"].schedule),
            "prediction_type": "sample",
            "mode": "sampler",
            "start": "lr",
            "upscale_factor": self.upscale_factor,
            "tile_size": self.resolution,
        }
        rows = {
            "schedule": f"ResShift T={c.num_timesteps}, kappa={c.kappa}, p={c.power}",
            "training steps": extra_card.get("training_steps"),
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "training data": self.training_data,
            "metrics": metrics_line(extra_card.get("eval"), "onestep-eval sr"),
        }
        card = Card("ResShift-style super-resolution teacher (pixel space)", rows, extra_tags=["teacher"])
        call = f"`pipe(image=low_res).images`: {c.num_timesteps} DDIM steps (num_inference_steps= fewer)."
        export_super_resolution(models["model"].net, output_dir, card, pipeline, call, teacher_info=teacher_info)

    def product(self, folder: str) -> str:
        return f"teacher  {folder} (unet/, onestep.json; also a SuperResolutionPipeline)"

    def usage(self, folder: str) -> str:
        return f"a teacher for train/tadsr.py --pretrained_model_name_or_path {folder}"
