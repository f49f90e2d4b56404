"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

Follows docs/methods/dmd2.md. Per iteration: x = G(z); every R-th iteration a generator
update on L_G = lambda_DM L_DM + lambda_Ggan L_Ggan; every iteration a critic update on
L_C = L_fake + lambda_Dgan L_D, with the GAN head on the critic's bottleneck.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..context import STOCK_FLOW_PIPELINES, STOCK_TEXT_PIPELINES, TeacherContext
from ..critic import Critic
from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..discriminator import gan_head
from ..errors import UserError
from ..flags import (
    OPTIMISATION,
    finite_float,
    non_negative_float,
    non_negative_int,
    option,
    positive_int,
)
from ..generator import OneStepGenerator
from ..lora import apply_lora
from ..losses import DenoisingLoss, dm_gradient, dm_loss, gan_discriminator_loss, gan_generator_loss
from ..text_export import check_exportable_timesteps
from .base import Method, Update


@dataclass
class DMD2Config:
    flag_group = "DMD2 (docs/methods/dmd2.md)"
    _GAN = ("gan", bool, "--gan")
    flag_requires = {
        "gan_generator_weight": _GAN,
        "gan_discriminator_weight": _GAN,
        "gan_feature_module": _GAN,
        "gan_max_timestep": _GAN,
        "gan_alone": _GAN,
    }

    learning_rate: float = option(
        1e-4, "Adam(W) learning rate of every trained network.", parse=non_negative_float, group=OPTIMISATION
    )
    generator_learning_rate: float | None = option(
        None, "The generator's own learning rate (None: --learning_rate).", parse=non_negative_float
    )
    critic_learning_rate: float | None = option(
        None, "The critic's and its head's (None: --learning_rate).", parse=non_negative_float
    )
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = option(0.01, "AdamW weight decay.", parse=non_negative_float, group=OPTIMISATION)
    train_batch_size: int = option(
        32,
        "Student samples per process per iteration (and real images for the GAN).",
        parse=positive_int,
        group=OPTIMISATION,
    )
    ttur_ratio: int = option(5, "Critic updates per generator update (R).", parse=positive_int)
    guidance_scale: float = option(
        1.0, "Real-score CFG scale (1 = off; needs a null class or empty prompt).", parse=finite_float
    )
    conditioning_timesteps: list[int] = option([999], "Comma-separated, descending: 999 or 999,749,499,249.")
    dm_t_min: int = option(
        20, "Lowest timestep of the distribution-matching loss's noise draw.", parse=non_negative_int
    )
    dm_t_max: int = option(
        980, "Highest timestep of the distribution-matching loss's noise draw.", parse=non_negative_int
    )
    dm_weight: float = 1.0
    gan: bool = option(True, "GAN head on the critic (--no-gan: DM only).")
    gan_generator_weight: float = option(
        3e-3, "Weight of the generator's GAN loss next to the DM loss.", parse=non_negative_float
    )
    gan_discriminator_weight: float = option(
        1e-2, "Weight of the discriminator loss next to the critic's denoising loss.", parse=non_negative_float
    )
    gan_feature_module: str | None = option(
        None, "Critic submodule the GAN head reads (None: the UNet's mid_block; SD3 / Flux: a joint block's tokens)."
    )
    gan_max_timestep: int | None = option(
        None, "D's inputs are noised at t in 0..this (None: T-1; 0: clean images).", parse=non_negative_int
    )
    gan_alone: bool = option(False, "Generator trained on the GAN term only, without the DM loss.")
    fake_score: str = "critic"  # "critic", or "none" (ablation: x0_fake := x, i.e. SDS)
    fake_score_fp32: bool = True  # run the DM-loss critic query without autocast
    # The regression warm start (the published SDXL one-step recipe), a stage of its own before DMD2
    # (presets sdxl-1step, ...):
    regression_pairs: int = option(
        10_000, "Regression stage: number of fixed noise/teacher-output pairs.", parse=positive_int
    )
    regression_teacher_steps: int = option(
        50, "Regression stage: the teacher's DDIM steps per pair.", parse=positive_int
    )
    regression_loss: str = option(
        "auto",
        "Regression stage: lpips, mse, or auto (LPIPS where its weights load, else MSE).",
        choices=("auto", "lpips", "mse"),
    )
    regression_pairs_dir: str | None = option(
        None, "Regression stage: where pairs are cached (None: the stage's folder/ode_pairs)."
    )


class DMD2(Method):
    ema_models = ("generator",)
    exported_models = ("generator",)
    new_in_stage = {"critic": ("head.",)}  # SD1.5 stage 2 adds the GAN head to stage 1's critic
    fresh_in_stage = ("critic",)  # after the regression warm start (no critic) it starts from the teacher
    exports_stock_pipeline = True  # a text teacher's student becomes a stock StableDiffusion(XL)Pipeline

    def __init__(
        self,
        context: TeacherContext,
        config: DMD2Config,
        student_init: Denoiser | None = None,
        real_score: Denoiser | None = None,
        critic_init: Denoiser | None = None,
    ):
        """`student_init` (default: the teacher) is the network G and F start from; the toy recipe
        uses an analytic teacher for the real score and a fitted teacher-net to initialise them.
        `critic_init` (default: student_init's) is F's own start when it differs (MSD's smaller students keep a
        teacher-sized critic). `real_score` (default: the teacher) is what the generator is matched to; DisBack
        replaces it along its degradation path, through this argument or the `real_score` attribute."""
        super().__init__()
        teacher, uncond = context.denoiser, context.uncond
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
        if self.exports_stock_pipeline:  # refuse, before training, a step list the stock pipeline cannot sample
            check_exportable_timesteps(context.export, config.conditioning_timesteps)
        self.context, self.config, self.sample_shape = context, config, tuple(context.sample_shape)
        self.teacher = teacher.eval().requires_grad_(False)
        self.cond_sampler = context.cond_sampler or (lambda n, device: None)
        self.uncond = uncond
        self.decode = context.decode  # latent teachers: latents -> images in [-1, 1] for sample grids
        self.needs_data = config.gan
        self.updates = [Update("generator", "generator", every=config.ttur_ratio), Update("critic", "critic", every=1)]
        self.critic_objective = DenoisingLoss()  # the teacher's own objective over the full t range

        # G and F start as exact copies of the teacher; the head is new.
        init = student_init if student_init is not None else teacher
        self.generator = OneStepGenerator(self._trainable_copy(init), config.conditioning_timesteps)
        critic_start = critic_init if critic_init is not None else init
        self.critic = Critic(self._trainable_copy(critic_start), feature_module=config.gan_feature_module)
        example_cond = self.cond_sampler(1, torch.device("cpu"))
        if config.gan:  # D = head(bottleneck of F), trained with F
            self.critic.head = gan_head(self.critic.feature_shape(self.sample_shape, example_cond))
        self.real_score: Denoiser = self.teacher if real_score is None else real_score.eval().requires_grad_(False)
        self.lora = apply_lora(self.generator.denoiser.net, context.lora)  # the generator only; F stays fully trained

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
        # Noising, both x0-predictions and g without gradient: only dm_loss carries g into G.
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
        """The per-element generator gradient g = omega * (x0_fake - x0_real); DMD2's omega is
        1 / mean_{C,H,W}|x - x0_real| per sample."""
        return dm_gradient(x, x0_real, x0_fake)

    def _generator_gan_loss(self, critic, x, cond):
        """The GAN term for G: gradient flows through F and the head into G; F and the head are not updated by it."""
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
        # The teacher's own objective: t over the full range (not the DM loss's 20..980), fresh noise, no CFG.
        noised = self.critic_objective.noise(self.unwrap(critic).denoiser, x, cond)
        x_t, t = noised.x_t, noised.t
        if not c.gan:
            raw, _ = critic(x_t, t, cond)
            loss = self.critic_objective.error(raw, noised).mean()
            return loss, {"loss_fake": loss.detach()}
        # The D loss, with real and fake batched through F in one pass. With D's noise over the full range
        # (the default), the fake half is the denoising input itself: it is already noised at its own
        # t ~ U{0..T-1} with fresh noise, exactly the distribution D's fake input should have.
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
        cond = self.context.grid_conditions(num, device)
        noise = lambda like: torch.randn(like.shape, generator=g).to(like.device)  # noqa: E731
        x = models["generator"].sample(z, cond, noise_fn=noise)
        return (self.decode(x) if self.decode is not None else x).clamp(-1, 1)

    method_tag = "dmd2"  # the model card's tag

    def export(self, models, output_dir, extra_card):
        from ..export import Card, export_one_step, hub_id
        from ..text_export import export_dmd2_text_to_image

        target = self.context.export
        if target is None:
            raise UserError("DMD2 export needs the teacher context's export target (the teacher's scheduler).")
        gen = models["generator"]
        card = Card("Text-to-image student", self._card(extra_card), method=self.method_tag)
        card.base_model = hub_id(self.context.source)
        if target.pipeline in STOCK_TEXT_PIPELINES + STOCK_FLOW_PIPELINES:  # StableDiffusion(XL|3)Pipeline, Flux
            return export_dmd2_text_to_image(
                gen.denoiser.net,
                target,
                gen.timesteps,
                output_dir,
                card,
                lora=self.lora,
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
            target.scheduler_config,
            gen.timesteps,
            output_dir,
            card.rows,
            target.num_classes,
            sample_size=self.sample_shape[-1],
            card_info={"method": card.method, "base_model": card.base_model},
        )

    def product(self, folder: str) -> str:
        target = self.context.export
        if target is not None and target.pipeline in STOCK_FLOW_PIPELINES:  # a transformer, not a UNet
            return f"student pipeline  {folder} (model_index.json, transformer/, scheduler/, README.md)"
        return super().product(folder)

    def usage(self, folder: str) -> str:
        steps = len(self.generator.timesteps)
        target = self.context.export
        if target is not None and target.pipeline in STOCK_FLOW_PIPELINES:
            from ..flow_export import flow_call

            call = flow_call(target.pipeline, steps, target.resolution, target.guidance)
            return f"DiffusionPipeline.from_pretrained({folder!r}){call.removeprefix('pipe')}.images"
        if target is not None and target.pipeline in STOCK_TEXT_PIPELINES:  # the stock pipeline: no remote code
            return f"DiffusionPipeline.from_pretrained({folder!r})(prompt, num_inference_steps={steps}, guidance_scale=0).images"
        labels = "class_labels=[3, 7]" if self.context.num_classes else "batch_size=2"
        return f"{super().usage(folder)}({labels}).images"

    def _card(self, extra_card: dict) -> dict:
        from ..export import metrics_line

        c = self.config
        return {
            "method": "DMD2 (Yin et al. 2024, arXiv 2405.14867)",
            "teacher": self.context.source,
            "preset": extra_card.get("preset", "-"),
            "training_steps": f"{extra_card.get('training_steps')} critic iterations",
            "generator updates": -(-int(extra_card.get("training_steps", 0)) // c.ttur_ratio),
            "real-score guidance scale": c.guidance_scale,
            "TTUR ratio": c.ttur_ratio,
            "GAN (G / D weight)": f"{c.gan_generator_weight} / {c.gan_discriminator_weight}" if c.gan else "off",
            "learning rate": c.learning_rate,
            "batch per process": c.train_batch_size,
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "metrics": metrics_line(extra_card.get("eval")),
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }


def _cat(a: Cond | None, b: Cond | None) -> Cond | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise ValueError("Real and generated batches must both carry conditions or both carry none.")
    return a.cat(b)
