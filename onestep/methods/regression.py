"""Regression warm start on teacher ODE pairs (DMD2: the published SDXL one-step run starts here).

The generator G(z_j, t_c, c_j) regresses onto the teacher's sampler output y_j for fixed pairs
(onestep/ode_pairs.py), with LPIPS on decoded images where LPIPS's weights can be loaded, else MSE in
the model's space; the run says which. DMD2 then continues from this stage's weights (its critic, absent here,
starts from the teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..context import TeacherContext
from ..errors import UserError
from ..generator import OneStepGenerator
from ..lora import apply_lora
from ..ode_pairs import OdePairs, pair_conditions
from .base import Method, Update
from .dmd2 import DMD2, DMD2Config

LOSSES = ("auto", "lpips", "mse")


def lpips_loss_or_reason(net: str = "vgg") -> tuple[torch.nn.Module | None, str]:
    """An LPIPS module, or None and why not (the package or its backbone weights are missing)."""
    try:
        import lpips  # the optional extra onestep[lpips]
    except ImportError:
        return None, "the lpips package is not installed (pip install 'onestep[lpips]')"
    try:
        return lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False), ""
    except Exception as err:  # offline: torchvision cannot fetch the backbone's ImageNet weights
        return None, f"LPIPS could not load its {net} weights ({err.__class__.__name__})"


def lpips_input(x: torch.Tensor, decode=None) -> torch.Tensor:
    """Images in [-1, 1], 3 channels, at least 64 px (LPIPS's backbones need a few downsamplings)."""
    img = decode(x) if decode is not None else x
    if img.shape[1] == 1:
        img = img.repeat(1, 3, 1, 1)
    if img.shape[-1] < 64:
        img = F.interpolate(img, size=(64, 64), mode="bilinear", align_corners=False)
    return img.clamp(-1, 1)


class ODERegression(DMD2):
    """Only DMD2's generator, trained by regression. It reuses DMD2's sample grid, export and usage (the
    student is the same OneStepGenerator), so it skips DMD2's constructor, which would also build a critic."""

    new_in_stage: dict = {}

    def __init__(
        self,
        context: TeacherContext,
        config: DMD2Config,
        pairs: OdePairs,
        lpips_module: torch.nn.Module | None = None,
        loss_note: str = "",
    ):
        Method.__init__(self)
        if config.regression_loss not in LOSSES:
            raise UserError(f"--regression_loss must be one of {', '.join(LOSSES)}, got {config.regression_loss!r}.")
        teacher = context.denoiser
        self.context, self.config, self.sample_shape, self.pairs = context, config, tuple(context.sample_shape), pairs
        self.teacher = teacher.eval().requires_grad_(False)
        self.real_score = self.teacher
        self.cond_sampler = context.cond_sampler or (lambda n, device: None)
        self.decode = context.decode
        self.lpips, self.loss_note = lpips_module, loss_note
        self.needs_data = False
        self.updates = [Update("generator", "generator")]
        self.generator = OneStepGenerator(self._trainable_copy(teacher), config.conditioning_timesteps[:1])
        self.lora = apply_lora(self.generator.denoiser.net, context.lora)

    def models(self):
        return {"generator": self.generator}

    def optimizers(self):
        c = self.config
        params = [p for p in self.generator.parameters() if p.requires_grad]
        lr = c.learning_rate if c.generator_learning_rate is None else c.generator_learning_rate
        return {"generator": torch.optim.AdamW(params, lr=lr, betas=c.adam_betas, weight_decay=c.adam_weight_decay)}

    def memory_networks(self):
        return [self.generator.denoiser.net]

    def to(self, device):
        self.teacher.to(device)
        if self.lpips is not None:
            self.lpips.to(device)
        return self

    def start_iteration(self, batch, info):
        B, device = self.config.train_batch_size, info.device
        idx = torch.randint(len(self.pairs), (B,))  # the trainer seeds this stream per (seed, rank, step)
        cond = pair_conditions(self.cond_sampler, idx.tolist(), self.pairs.seed, device)
        z = self.pairs.noise[idx].to(device)
        gen = self.prepared["generator"]
        plain = self.unwrap(gen)
        x = gen(plain.noise_input(z), plain.timestep_at(0, z), cond)
        return {"x": x, "target": self.pairs.target[idx].to(device)}

    def loss(self, name, s):
        x, y = s["x"].float(), s["target"]
        if self.lpips is None:
            loss = F.mse_loss(x, y)
            return loss, {"loss_mse": loss.detach()}
        loss = self.lpips(*(lpips_input(v, self.decode) for v in (x, y))).mean()
        return loss, {"loss_lpips": loss.detach()}

    def _card(self, extra_card: dict) -> dict:
        c = self.config
        return {
            "method": "regression warm start on teacher ODE pairs (DMD2's SDXL one-step recipe; continue with DMD2)",
            "teacher": self.context.source,
            "preset": extra_card.get("preset", "-"),
            "training_steps": extra_card.get("training_steps"),
            "pairs": f"{len(self.pairs)} x DDIM {c.regression_teacher_steps} steps, CFG {c.guidance_scale}",
            "regression loss": "LPIPS" if self.lpips is not None else f"MSE ({self.loss_note})",
            "learning rate": c.learning_rate,
            "full configuration": "training_config.json in the training output folder",
        }


def build_regression(setup, pairs_dir: str) -> ODERegression:
    """The warm start of a prepared stage: pairs made (or read back) on every process into `pairs_dir`, the loss
    chosen."""
    from ..ode_pairs import make_ode_pairs

    c, acc, context = setup.config.method, setup.trainer.accelerator, setup.context
    if c.regression_teacher_steps > context.denoiser.schedule.num_timesteps:
        raise UserError(
            f"--regression_teacher_steps {c.regression_teacher_steps} exceeds the teacher's "
            f"{context.denoiser.schedule.num_timesteps} timesteps."
        )
    lpips_module, reason = (None, "--regression_loss mse") if c.regression_loss == "mse" else lpips_loss_or_reason()
    if lpips_module is None and c.regression_loss == "lpips":
        raise UserError(f"--regression_loss lpips is not available here: {reason}; use --regression_loss mse.")
    if acc.is_main_process:
        print(f"Regression loss: {'LPIPS (VGG) on decoded images' if lpips_module else f'MSE, because {reason}'}.")
    pairs = make_ode_pairs(
        context.denoiser,
        context.cond_sampler or (lambda n, device: None),
        context.uncond,
        context.sample_shape,
        c.regression_pairs,
        c.regression_teacher_steps,
        c.guidance_scale,
        setup.config.trainer.seed,
        c.regression_pairs_dir or pairs_dir,
        identity=_pairs_identity(context),
        device=acc.device,
        rank=acc.process_index,
        world_size=acc.num_processes,
        barrier=acc.wait_for_everyone,
        progress=print if acc.is_main_process else (lambda msg: None),
    )
    return ODERegression(context, c, pairs, lpips_module=lpips_module, loss_note=reason)


def _pairs_identity(context: TeacherContext) -> str:
    """What, beside the shape, seeds and settings, makes the pairs: the teacher, and for SD3 / Flux the shift of its
    training schedule (Flux's follows the resolution) and the guidance input it reads."""
    identity = (context.source, context.denoiser.prediction_type)
    schedule, export = context.denoiser.schedule, context.export
    if getattr(schedule, "flow_shift", None) is not None:
        identity += (schedule.flow_shift, export.guidance if export is not None else None)
    return repr(identity)
