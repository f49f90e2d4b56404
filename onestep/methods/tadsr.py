"""TAD-SR: one-step diffusion super-resolution with time-aware distillation (He et al. 2024, arXiv 2408.07476).

Follows shared/methods/tadsr.md. Per iteration (section 5), from the start state x_T = (a_T + b_T) u + c_T eps:
    z_s = G(x_T, T*, LR),  z_tch = SG[teacher DDIM over its steps from the same x_T];
    D step:  L_D = hinge on the time-aware heads over the frozen teacher's encoder features of
             perturb(z_gt, t_d, n) (real) and SG[perturb(z_s, t_d, n)] (fake);
    G step:  L_G = lambda_reg |z_s - z_tch|^2 + lambda_HSD mean(SG[g] z_s) + lambda_GAN (-D(fake)),
             g = eps_hat(perturb(SG[z_s], t_h, n)) - eps_hat(perturb(z_ref, t_h, n)) at small t_h (HSD).
Perturbations use Gaussian noise (the released code's uniform noise is a bug, spec 10), the teacher's input is
scaled once (by the Denoiser), and the teacher never trains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..discriminator import TimeAwareDiscriminator
from ..errors import UserError
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
    learning_rate: float = 5e-5  # spec 7 (real SR): AdamW, also D's
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.0
    train_batch_size: int = 8
    reg_weight: float = 1.0  # lambda_reg / lambda_HSD / lambda_GAN: 1 / 1 / 0.02 (ResShift x4)
    hsd_weight: float = 1.0
    gan_weight: float = 0.02
    reg_target: str = "teacher"  # regression onto the teacher's output, or "gt" (option)
    score_loss: str = "hsd"  # "hsd"; "sds" (vanilla score distillation: g = eps_hat(x_s) - n); "none"
    hsd_reference: str = "teacher"  # z_ref: the teacher's output, or "gt" (ablation "SDS+HR")
    hsd_timesteps: list[int] | None = None  # None: {0, 1, 2} for ResShift, else the lowest 20% (unverified)
    hsd_uniform: bool = False  # HSD t over all steps but the last
    gan: bool = True
    disc_timesteps: list[int] | None = None  # None: 0..T-2 (ResShift {0..13})
    time_aware: bool = True  # FiLM(t) heads; --no-time_aware: time-agnostic heads (the ablation)
    disc_embed_dim: int = 160  # E of the heads' time embedding (ResShift 160, SeeSR 320)
    disc_logit_channels: int = 64  # c_dim: logits per token
    disc_residual_scale: float = 2**-0.5  # StyleGAN-T residual (x + f(x))/sqrt(2) (unverified); 1 = plain sum
    disc_feature_modules: str | None = None  # teacher submodules read (None: each level's last map + mid block)
    start: str = "lr"  # x_T = (a_T + b_T) u + c_T eps; "noise": c_T eps
    student_timestep: int | None = None  # T*, the student's time input (None: T-1)
    teacher_steps: int | None = None  # the teacher sampler's steps (None: all T, trailing spacing)
    noise_level: int = 20  # x4 upscaler teachers: the LR image's noise level (the pipeline's default)


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
    """Spec 4.3 generic: the last feature map of every resolution level and the mid block (diffusers UNets);
    the hidden layers but the last of an MLP with `blocks` (the toy test bed)."""
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


@torch.no_grad()
class TADSR(Method):
    ema_models = ("generator",)
    exported_models = ("generator",)
    no_lr_warmup = ("discriminator",)  # spec 5: D uses G's learning rate without the warm-up

    def __init__(
        self,
        teacher: Denoiser,
        config: TADSRConfig,
        sample_shape: tuple[int, ...],
        export_info: dict | None = None,
        student_init: Denoiser | None = None,
        feature_teacher: Denoiser | None = None,
        preview: Batch | None = None,
        decode=None,
    ):
        """`student_init` (default: the teacher) is what G copies; `feature_teacher` (default: the teacher) is the
        frozen network whose encoder D reads (the toy recipe: an analytic teacher, a fitted teacher-net for both).
        `preview`: a fixed batch of HR images and their condition for the sample grids; `decode`: latents -> pixels
        for those grids (latent teachers)."""
        super().__init__()
        self.decode = decode
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
        self.config, self.sample_shape = config, tuple(sample_shape)
        self.export_info, self.preview = export_info or {}, preview
        self.teacher = teacher.eval().requires_grad_(False)
        self.student_t = T - 1 if config.student_timestep is None else config.student_timestep
        self.teacher_timesteps = trailing_timesteps(T, config.teacher_steps or T)
        self.hsd_set = self._timestep_set("hsd_timesteps", self._default_hsd_set(), T)
        self.disc_set = self._timestep_set("disc_timesteps", list(range(T - 1)), T)
        if not 0 <= self.student_t < T or not 1 <= len(self.teacher_timesteps) <= T:
            raise UserError(f"--student_timestep and --teacher_steps must lie within the teacher's {T} steps.")
        init = student_init if student_init is not None else teacher
        self.generator = copy.deepcopy(init).train().requires_grad_(True)  # spec 2: an exact teacher copy
        self.needs_data = True
        self.updates = [Update("generator", "generator")]
        self.discriminator = None
        if config.gan:  # spec 5: the D step, then the G step, every iteration
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
        adamw = lambda m: torch.optim.AdamW(  # noqa: E731  spec 5: D uses G's learning rate, no warm-up of its own
            [p for p in m.parameters() if p.requires_grad],
            lr=c.learning_rate,
            betas=c.adam_betas,
            weight_decay=c.adam_weight_decay,
        )
        return {name: adamw(m) for name, m in self.models().items()}

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
        """x_T = (a_T + b_T) u + c_T eps (spec 3; 'x0 replaced by u'), or c_T eps with start = noise."""
        sched, t = self.teacher.schedule, self._index(self.teacher_timesteps[0], u.shape[0], u.device)
        if self.config.start == "lr":
            return sched.add_noise(u, eps, t, u)
        c = sched.coefficients(t, u.device)[1].reshape(-1, *([1] * (u.ndim - 1)))
        return (c * eps.double()).to(eps.dtype)

    def teacher_sample(self, x_T: torch.Tensor, cond: Cond) -> torch.Tensor:
        return ddim_from(self.teacher, x_T, cond, self.teacher_timesteps)

    def perturb(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """a_t z + b_t u + c_t n (spec 3), with Gaussian n."""
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
        if self.discriminator is not None:  # spec 4.3: one t_d and one Gaussian n per sample, shared by real and fake
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
            loss_reg = (z_s.float() - target.float()).square().mean()  # spec 4.1
            loss, logs["loss_reg"] = loss + c.reg_weight * loss_reg, loss_reg.detach()
        if c.score_loss != "none" and c.hsd_weight:
            g = self.score_gradient(z_s.detach(), s["z_tch"] if c.hsd_reference == "teacher" else s["z_gt"], s["cond"])
            loss_hsd = score_distillation_loss(z_s, g)  # spec 4.2 step 5
            loss, logs["loss_hsd"] = loss + c.hsd_weight * loss_hsd, loss_hsd.detach()
            logs["hsd_grad_abs"] = g.abs().mean()
        if self.discriminator is not None and c.gan_weight:
            disc = self.unwrap(self.prepared["discriminator"])
            flags = [(p, p.requires_grad) for p in disc.parameters()]
            disc.requires_grad_(False)  # the gradient reaches G only (spec 5: D's grads are not touched)
            try:
                loss_gan = hinge_generator_loss(disc(s["fake_features"], s["disc_time"]))
            finally:
                for p, flag in flags:
                    p.requires_grad_(flag)
            loss, logs["loss_g_gan"] = loss + c.gan_weight * loss_gan, loss_gan.detach()
        return loss, logs

    @torch.no_grad()
    def score_gradient(self, z_s: torch.Tensor, z_ref: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Spec 4.2 steps 1-4: HSD's g = eps_hat(x_s) - eps_hat(x_r) with one Gaussian n shared by x_s and x_r,
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
        """One student step from the start state (spec 6)."""
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

        info = self.export_info
        return {
            "schedule": sr_schedule_description(self.teacher.schedule),
            "prediction_type": self.teacher.prediction_type,
            "mode": "one_step",
            "timestep": self.student_t,
            "start": self.config.start,
            "upscale_factor": info.get("upscale_factor", 4),
            "tile_size": info.get("resolution"),
        }

    def export(self, models, output_dir, extra_card):
        from ..export import export_super_resolution

        card = {
            "title": "One-step super-resolution student (TAD-SR)",
            "method": "TAD-SR (He et al. 2024, arXiv 2408.07476)",
            "teacher": self.export_info.get("teacher", "?"),
            "upscale factor": self.export_info.get("upscale_factor", 4),
            "student timestep": self.student_t,
            "loss weights (reg / HSD / GAN)": f"{self.config.reg_weight} / {self.config.hsd_weight} / "
            f"{self.config.gan_weight if self.config.gan else 'off'}",
            "training steps": extra_card.get("training_steps"),
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }
        usage = "`pipe(image=low_res, generator=torch.Generator().manual_seed(0)).images`: one network evaluation."
        if self.export_info.get("latent_sr"):  # diffusers' latent SR teachers (onestep/latent_sr.py)
            from ..export import export_latent_super_resolution

            usage = usage.replace("evaluation.", "evaluation and one decode.")
            net = models["generator"].net
            export_latent_super_resolution(net, output_dir, card, self.pipeline_config(), self.export_info, usage)
            return
        export_super_resolution(models["generator"].net, output_dir, card, self.pipeline_config(), usage=usage)

    def usage(self, folder: str) -> str:
        return f"{super().usage(folder)}(image=low_res_pil).images"


# -- the ResShift-style teacher (train/sr_teacher.py) ------------------------------------------------------


@dataclass
class ResShiftTeacherConfig:
    learning_rate: float = 2e-4
    adam_weight_decay: float = 0.0
    train_batch_size: int = 16
    cond_dropout: float = 0.0  # (class-conditional teachers only; unused here)
    num_timesteps: int = 15  # tadsr.md section 3: T = 15, kappa = 2, m = 0.04, e_end = 0.99, p = 0.3
    kappa: float = 2.0
    min_noise: float = 0.04
    eta_end: float = 0.99
    power: float = 0.3
    scale_input: bool = False  # x_t / sqrt(kappa^2 eta + 1) (ResShift's latent input scaling)
    block_out_channels: str = "32,64,128"
    layers_per_block: int = 1


class ResShiftTeacherTraining(DiffusionTraining):
    """A pixel ResShift teacher: an x0-predicting UNet reading [x_t, u], trained with the plain x0 MSE over
    uniform t (ResShift's objective), exported as a teacher folder that is also a SuperResolutionPipeline."""

    def __init__(
        self, denoiser: Denoiser, config: ResShiftTeacherConfig, sample_shape, export_info: dict, preview=None
    ):
        super().__init__(denoiser, config, sample_shape, scheduler_config={})
        self.export_info, self.preview = export_info, preview

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
        from ..export import export_super_resolution, sr_schedule_description

        c, info = self.config, self.export_info
        args = {k: getattr(c, k) for k in ("num_timesteps", "kappa", "min_noise", "eta_end", "power", "scale_input")}
        teacher_info = {
            "sr_schedule": {"kind": "resshift", "prediction_type": "sample", **args},
            "upscale_factor": info["upscale_factor"],
        }
        pipeline = {
            "schedule": sr_schedule_description(models["model"].schedule),
            "prediction_type": "sample",
            "mode": "sampler",
            "start": "lr",
            "upscale_factor": info["upscale_factor"],
            "tile_size": info["resolution"],
        }
        card = {
            "title": "ResShift-style super-resolution teacher (pixel space)",
            "schedule": f"ResShift T={c.num_timesteps}, kappa={c.kappa}, p={c.power}",
            "training steps": extra_card.get("training_steps"),
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
        }
        usage = f"`pipe(image=low_res).images`: {c.num_timesteps} DDIM steps (num_inference_steps= fewer)."
        export_super_resolution(
            models["model"].net, output_dir, card, pipeline, teacher_info=teacher_info, usage=usage
        )
