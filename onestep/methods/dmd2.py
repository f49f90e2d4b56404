"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

Follows shared/methods/dmd2.md. Per iteration (section 5): x = G(z); every R-th iteration a generator
update on L_G = lambda_DM L_DM + lambda_Ggan L_Ggan; every iteration a critic update on
L_C = L_fake + lambda_Dgan L_D, with the GAN head on the critic's bottleneck.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..critic import Critic
from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..discriminator import DMD2Head
from ..errors import UserError
from ..generator import OneStepGenerator
from ..losses import DenoisingLoss, dm_gradient, dm_loss, gan_discriminator_loss, gan_generator_loss
from .base import Method, Update

CondSampler = Callable[[int, torch.device], Cond | None]


@dataclass
class DMD2Config:
    learning_rate: float = 1e-4  # same for G and critic (spec 7), unless one of the two below is set
    generator_learning_rate: float | None = None  # None: learning_rate
    critic_learning_rate: float | None = None  # None: learning_rate (the critic's GAN head included)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.01
    train_batch_size: int = 32  # generator samples per iteration (and real images for the GAN)
    ttur_ratio: int = 5  # R: critic updates per generator update
    guidance_scale: float = 1.0  # real-score CFG w (applied only if w > 1)
    conditioning_timesteps: list[int] = field(default_factory=lambda: [999])  # 1 entry: one-step
    dm_t_min: int = 20  # DM-loss t ~ U{t_min..t_max}, inclusive (0.02 T, 0.98 T)
    dm_t_max: int = 980
    dm_weight: float = 1.0
    gan: bool = True
    gan_generator_weight: float = 3e-3
    gan_discriminator_weight: float = 1e-2
    gan_feature_module: str | None = None  # critic submodule the head reads (None: the UNet mid block)
    gan_max_timestep: int | None = None  # D's inputs noised at t ~ U{0..this} (None: T-1; 0: clean-image classifier)
    gan_alone: bool = False  # the generator trains on the GAN term only, without the DM loss (official option)
    fake_score: str = "critic"  # "critic", or "none" (ablation: x0_fake := x, i.e. SDS)
    fake_score_fp32: bool = True  # run the DM-loss critic query without autocast
    # The regression warm start (spec 5, SDXL one-step), run before DMD2 as its own stage:
    stage: str = "distill"  # "regression": fit G to teacher ODE pairs (continue with --init_from_checkpoint)
    regression_pairs: int = 10_000  # fixed noises, each with the teacher's sampler output (CFG = guidance_scale)
    regression_teacher_steps: int = 50  # the teacher's DDIM steps (trailing spacing) per pair
    regression_loss: str = "auto"  # "lpips" on decoded images, "mse", or "auto": LPIPS where its weights load
    regression_pairs_dir: str | None = None  # where the pairs are cached (None: <output_dir>/ode_pairs)


class DMD2(Method):
    ema_models = ("generator",)
    exported_models = ("generator",)
    new_in_stage = {"critic": ("head.",)}  # SD1.5 stage 2 adds the GAN head to stage 1's critic
    fresh_in_stage = ("critic",)  # after the regression warm start (no critic) it starts from the teacher

    def __init__(
        self,
        teacher: Denoiser,
        config: DMD2Config,
        sample_shape: tuple[int, ...],
        cond_sampler: CondSampler | None = None,
        uncond: Callable[[Cond], Cond] | None = None,
        export_info: dict | None = None,
        student_init: Denoiser | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        real_score: Denoiser | None = None,
    ):
        """`student_init` (default: the teacher) is the network G and F start from; the toy recipe
        uses an analytic teacher for the real score and a fitted teacher-net to initialise them.
        `real_score` (default: the teacher) is what the generator is matched to; DisBack replaces it
        along its degradation path, through this argument or the `real_score` attribute."""
        super().__init__()
        if config.ttur_ratio < 1:
            raise UserError("The TTUR ratio must be at least 1.")
        if config.fake_score not in ("critic", "none"):
            raise UserError(f"fake_score must be 'critic' or 'none', got {config.fake_score!r}.")
        T = teacher.schedule.num_timesteps
        if not 0 <= config.dm_t_min <= config.dm_t_max < T:
            raise UserError(f"The DM timestep range {config.dm_t_min}..{config.dm_t_max} must lie within 0..{T - 1}.")
        if config.gan_max_timestep is not None and not 0 <= config.gan_max_timestep < T:
            raise UserError(f"--gan_max_timestep {config.gan_max_timestep} must lie within 0..{T - 1}.")
        if config.gan_alone and not config.gan:
            raise UserError("--gan_alone trains the generator on the GAN term only: it needs --gan.")
        if config.guidance_scale < 1:
            raise UserError(f"--guidance_scale {config.guidance_scale} must be at least 1 (1 = no guidance).")
        if config.guidance_scale > 1 and uncond is None:
            raise UserError(
                "Real-score guidance needs the teacher's unconditional input (a null class or empty prompt)."
            )
        if (export_info or {}).get("pipeline") in ("sd15", "sdxl"):  # refuse an unexportable step list before training
            from ..export import stock_scheduler

            stock_scheduler(
                export_info["scheduler_config"],
                config.conditioning_timesteps,
                offset_allowed=export_info["pipeline"] == "sdxl",
            )
        self.config, self.sample_shape = config, tuple(sample_shape)
        self.teacher = teacher.eval().requires_grad_(False)
        self.cond_sampler = cond_sampler or (lambda n, device: None)
        self.uncond = uncond
        self.export_info = export_info or {}
        self.decode = decode  # latent teachers: latents -> images in [-1, 1] for sample grids
        self.needs_data = config.gan
        self.updates = [Update("generator", "generator", every=config.ttur_ratio), Update("critic", "critic", every=1)]
        self.critic_objective = DenoisingLoss()  # spec 4.2: the teacher's own objective over the full t range

        # G and F start as exact copies of the teacher (spec 2); the head is new.
        init = student_init if student_init is not None else teacher
        self.generator = OneStepGenerator(self._trainable_copy(init), config.conditioning_timesteps)
        self.critic = Critic(self._trainable_copy(init), feature_module=config.gan_feature_module)
        example_cond = self.cond_sampler(1, torch.device("cpu"))
        if config.gan:  # spec 4.3: D = head(bottleneck of F), trained with F
            self.critic.head = DMD2Head(self.critic.feature_shape(self.sample_shape, example_cond))
        self.real_score: Denoiser = self.teacher if real_score is None else real_score.eval().requires_grad_(False)

    @staticmethod
    def _trainable_copy(teacher: Denoiser) -> Denoiser:
        return copy.deepcopy(teacher).train().requires_grad_(True)

    # -- set-up --------------------------------------------------------------------------------
    def models(self):
        return {"generator": self.generator, "critic": self.critic}

    def optimizers(self):
        c = self.config

        def adamw(module, lr):
            # Only trainable parameters: a LoRA generator's frozen base gets no optimizer state.
            params = [p for p in module.parameters() if p.requires_grad]
            lr = c.learning_rate if lr is None else lr
            return torch.optim.AdamW(params, lr=lr, betas=c.adam_betas, weight_decay=c.adam_weight_decay)

        return {
            "generator": adamw(self.generator, c.generator_learning_rate),
            "critic": adamw(self.critic, c.critic_learning_rate),
        }

    def memory_networks(self):
        # With the GAN on, the critic is left out of gradient checkpointing: its head reads the bottleneck
        # through a hook that stops the forward early, which checkpoint recomputation rejects.
        return [self.generator.denoiser.net] + ([] if self.config.gan else [self.critic.denoiser.net])

    def checkpointing_exclusions(self):
        return "the critic while the GAN head is on" if self.config.gan else ""

    def to(self, device):
        self.teacher.to(device)
        self.real_score.to(device)
        return self

    # -- one iteration -------------------------------------------------------------------------
    def start_iteration(self, batch: Batch | None, info):
        B, device = self.config.train_batch_size, info.device
        cond = self.cond_sampler(B, device)
        z = torch.randn(B, *self.sample_shape, device=device)
        gen = self.prepared["generator"]
        plain = self.unwrap(gen)
        with self.timer.phase("generator"):
            # Backward simulation: one k for the whole global batch (same stream on every rank); k = 0
            # (always, for one-step students) is plain noise at the first timestep.
            k = (
                int(torch.randint(len(plain.timesteps), (1,), generator=info.shared_generator))
                if len(plain.timesteps) > 1
                else 0
            )
            x_in, t_in = plain.backward_simulate(z, cond, k)
            with torch.set_grad_enabled("generator" in info.due):
                x = gen(x_in, t_in, cond)
        return {"x": x, "cond": cond, "real": batch}

    def _noised(self, x: torch.Tensor, t_low: int, t_high: int):
        return self.teacher.schedule.sample_noised(x, t_low, t_high)

    def loss(self, name, s):
        return self._generator_loss(s) if name == "generator" else self._critic_loss(s)

    def _gan_t_max(self) -> int:
        c, T = self.config, self.teacher.schedule.num_timesteps
        return T - 1 if c.gan_max_timestep is None else c.gan_max_timestep

    def _generator_loss(self, s):
        c, x, cond = self.config, s["x"], s["cond"]
        critic = self.unwrap(self.prepared["critic"])
        if c.gan_alone:
            loss_g_gan = self._generator_gan_loss(critic, x, cond)
            return c.gan_generator_weight * loss_g_gan, {"loss_g_gan": loss_g_gan.detach()}
        # Spec 4.1: all of steps 1-5 without gradient.
        with torch.no_grad():
            x_t, t, _ = self._noised(x.detach(), c.dm_t_min, c.dm_t_max)
            with self.timer.phase("teacher"):
                scale = self._real_guidance_scale()
                uncond = self.uncond(cond) if scale > 1 else None
                x0_real = self.real_score.guided(x_t, t, cond, uncond, scale)
            if c.fake_score == "none":
                x0_fake = x.detach()
            else:
                with torch.autocast(x.device.type, enabled=False) if c.fake_score_fp32 else nullcontext():
                    x0_fake = critic.denoiser(x_t.float(), t, cond)
            grad = self._dm_gradient(x.detach().float(), x0_real.float(), x0_fake.float(), t)
        loss_dm = dm_loss(x, grad)
        loss = c.dm_weight * loss_dm
        logs = {"loss_dm": loss_dm.detach(), "dm_grad_abs": (x0_fake - x0_real).abs().mean()}
        if c.gan:
            loss_g_gan = self._generator_gan_loss(critic, x, cond)
            loss = loss + c.gan_generator_weight * loss_g_gan
            logs["loss_g_gan"] = loss_g_gan.detach()
        return loss, logs

    # Hooks for methods built on DMD2 (DisBack swaps `real_score` along its path and may change these two).
    def _real_guidance_scale(self) -> float:
        """The CFG scale applied to the real score this iteration."""
        return self.config.guidance_scale

    def _dm_gradient(self, x, x0_real, x0_fake, t) -> torch.Tensor:
        """The per-element generator gradient g = omega * (x0_fake - x0_real); DMD2's omega (spec 4.1)."""
        return dm_gradient(x, x0_real, x0_fake)

    def _generator_gan_loss(self, critic, x, cond):
        """Spec 4.3: gradient flows through F and the head into G; F and the head are not updated by it."""
        flags = [(p, p.requires_grad) for p in critic.parameters()]
        critic.requires_grad_(False)
        try:
            x_d, t_d, _ = self._noised(x, 0, self._gan_t_max())
            return gan_generator_loss(critic.logits(x_d, t_d, cond))
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def _critic_loss(self, s):
        c, x, cond = self.config, s["x"].detach(), s["cond"]
        critic = self.prepared["critic"]
        T = self.teacher.schedule.num_timesteps
        # Spec 4.2: t over the full range, fresh noise, no CFG.
        noised = self.critic_objective.noise(self.unwrap(critic).denoiser, x, cond)
        x_t, t = noised.x_t, noised.t
        if not c.gan:
            raw, _ = critic(x_t, t, cond)
            loss = self.critic_objective.error(raw, noised).mean()
            return loss, {"loss_fake": loss.detach()}
        # Spec 4.3 with real and fake batched through F in one pass. With D's noise over the full range
        # (the default), the fake half is the denoising input itself: it is already noised at its own
        # t ~ U{0..T-1} with fresh noise, exactly the distribution D's fake input is specified to have.
        # With --gan_max_timestep below T-1, D's fakes are a third part, noised over 0..max.
        real: Batch = s["real"]
        t_max, B = self._gan_t_max(), x.shape[0]
        x_r, t_r, _ = self._noised(real.images, 0, t_max)
        parts, times, conds = [x_t, x_r], [t, t_r], _cat(cond, real.cond)
        if t_max != T - 1:
            x_f, t_f, _ = self._noised(x, 0, t_max)
            parts, times, conds = [x_t, x_f, x_r], [t, t_f, t_r], _cat(cond, _cat(cond, real.cond))
        raw, logits = critic(torch.cat(parts), torch.cat(times), conds, with_logits=True)
        logits = logits[-2 * B :]  # D's fakes, then the reals
        loss_fake = self.critic_objective.error(raw[:B], noised).mean()
        loss_d = gan_discriminator_loss(logits_real=logits[B:], logits_fake=logits[:B])
        loss = loss_fake + c.gan_discriminator_weight * loss_d
        return loss, {
            "loss_fake": loss_fake.detach(),
            "loss_d": loss_d.detach(),
            "d_real": logits[B:].detach().mean(),
            "d_fake": logits[:B].detach().mean(),
        }

    # -- outputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num, *self.sample_shape, generator=g).to(device)
        num_classes = self.export_info.get("num_classes")
        cond = (
            Cond(class_labels=(torch.arange(num) % num_classes).to(device))
            if num_classes
            else self.cond_sampler(num, device)
        )
        noise = lambda like: torch.randn(like.shape, generator=g).to(like.device)  # noqa: E731
        x = models["generator"].sample(z, cond, noise_fn=noise)
        return (self.decode(x) if self.decode is not None else x).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from ..export import export_one_step, export_text_to_image

        info = self.export_info
        if "scheduler_config" not in info:
            raise UserError("DMD2 export needs export_info['scheduler_config'] (the teacher's scheduler).")
        gen = models["generator"]
        if info.get("pipeline") in ("sd15", "sdxl"):  # stock StableDiffusion(XL)Pipeline
            return export_text_to_image(
                gen.denoiser.net,
                info["teacher_path"],
                info["pipeline"] == "sdxl",
                gen.timesteps,
                output_dir,
                self._card(extra_card),
                lora=info.get("lora"),
                sample_size=self.sample_shape[-1],
            )
        kind, prediction = self.teacher.schedule.kind, self.teacher.prediction_type
        vp = kind == "vp" and prediction in ("epsilon", "v_prediction", "sample")
        if not (vp or (kind, prediction) == ("edm", "edm")):  # OneStepPipeline samples these two families
            raise UserError(
                f"Export supports discrete VP teachers (eps, v or x0 prediction) and EDM-preconditioned ones for now; "
                f"this teacher is {kind}/{prediction}. The checkpoints hold the trained student."
            )
        export_one_step(
            gen.denoiser.net,
            info["scheduler_config"],
            gen.timesteps,
            output_dir,
            self._card(extra_card),
            info.get("num_classes"),
            sample_size=self.sample_shape[-1],
        )

    def usage(self, folder: str) -> str:
        steps = len(self.generator.timesteps)
        if self.export_info.get("pipeline") in ("sd15", "sdxl"):  # the stock pipeline: no remote code
            return f"DiffusionPipeline.from_pretrained({folder!r})(prompt, num_inference_steps={steps}, guidance_scale=0).images"
        labels = "class_labels=[3, 7]" if self.export_info.get("num_classes") else "batch_size=2"
        return f"{super().usage(folder)}({labels}).images"

    def _card(self, extra_card: dict) -> dict:
        c, info = self.config, self.export_info
        return {
            "method": "DMD2 (Yin et al. 2024, arXiv 2405.14867)",
            "teacher": info.get("teacher", "?"),
            "preset": extra_card.get("preset", "-"),
            "training_steps": f"{extra_card.get('training_steps')} critic iterations",
            "generator updates": -(-int(extra_card.get("training_steps", 0)) // c.ttur_ratio),
            "real-score guidance scale": c.guidance_scale,
            "TTUR ratio": c.ttur_ratio,
            "GAN (G / D weight)": f"{c.gan_generator_weight} / {c.gan_discriminator_weight}" if c.gan else "off",
            "learning rate": c.learning_rate,
            "batch per process": c.train_batch_size,
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "metrics": _metrics_line(extra_card.get("eval")),
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }


def _cat(a: Cond | None, b: Cond | None) -> Cond | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("Real and generated batches must both carry conditions or both carry none.")
    return a.cat(b)


def _metrics_line(values: dict | None) -> str:
    if not values:
        return "not measured in training; measure with onestep-eval fid (README of the onestep checkout)"
    return (
        ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        + " (in-training, EMA weights, fixed noise; see logs/eval.csv)"
    )
