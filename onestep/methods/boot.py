"""BOOT: data-free distillation by bootstrapping (Gu et al. 2023, arXiv 2306.05544).

Follows docs/methods/boot.md. A time-conditioned student g(eps, t) predicts the signal y_t of the teacher's
deterministic DDIM trajectory started from the noise eps (x_t = alpha_t y_t + sigma_t eps). Per iteration
(no real images are used): i ~ U{1..N}, t = tau_i, s = tau_{i-1},

    y_t = SG[g(eps, t)],  target = y_t + delta(t, s) (f(alpha_t y_t + sigma_t eps, t) - y_t),
    L = (1 / delta^2) |g(eps, s) - target|^2 + lambda_BC |g(eps, T) - SG[f(eps, T)]|^2      (B-paper)

one network, one optimiser. Sampling is g(eps, clean): one network evaluation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..context import STOCK_FLOW_PIPELINES, STOCK_TEXT_PIPELINES, TeacherContext
from ..denoiser import Cond, Denoiser
from ..errors import UserError
from ..flags import (
    OPTIMISATION,
    finite_float,
    non_negative_float,
    non_negative_int,
    option,
    positive_float,
    positive_int,
)
from ..generator import CLEAN, SignalGenerator
from ..lora import apply_lora
from ..losses import bootstrap_loss, bootstrap_target, boundary_loss, signal_step
from ..schedules import NoiseSchedule
from .base import Method, Update

BOUNDARIES = ("paper", "exact")
INTERVAL_WEIGHTS = ("uniform", "delta2")


@dataclass
class BOOTConfig:
    flag_group = "BOOT (docs/methods/boot.md)"
    _PAPER = ("boundary", lambda b: b == "paper", "--boundary paper (B-exact has no boundary loss)")
    flag_requires = {
        "boundary_weight": _PAPER,
        "boundary_every": _PAPER,
        "boundary_batch_size": _PAPER,
        "curriculum_fraction": ("curriculum", bool, "--curriculum"),
    }

    learning_rate: float = option(
        1e-4,
        "Adam(W) learning rate (1e-4 small models, 1e-5 SD-size UNets; unverified).",
        parse=non_negative_float,
        group=OPTIMISATION,
    )
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = option(0.0, "AdamW weight decay.", parse=non_negative_float, group=OPTIMISATION)
    train_batch_size: int = option(32, "Noise maps per process per iteration.", parse=positive_int, group=OPTIMISATION)
    grid_size: int = option(
        20, "N: intervals of the time grid between the noise end and the clean end (1..T).", parse=positive_int
    )
    boundary: str = option(
        "paper",
        "paper: boundary loss g(eps, T) = f(eps, T); exact: the trajectory starts at x_T = noise.",
        choices=BOUNDARIES,
    )
    boundary_weight: float = option(1.0, "lambda_BC, the boundary loss's weight (B-paper).", parse=non_negative_float)
    boundary_every: int = option(1, "Compute the boundary loss every k-th iteration.", parse=positive_int)
    boundary_batch_size: int | None = option(
        None, "Compute the boundary loss on the first m noise maps (None: all).", parse=positive_int
    )
    interval_weight: str = option(
        "uniform", "w_i: uniform (1) or delta2 (delta^2, a plain MSE on the signal).", choices=INTERVAL_WEIGHTS
    )
    param_timestep: int | None = option(
        None, "Fixed timestep of the student's output conversion (None: T, the noise end).", parse=non_negative_int
    )
    guidance_scale: float = option(
        1.0, "Teacher CFG scale inside the targets (1 = off; needs a null class or empty prompt).", parse=finite_float
    )
    curriculum: bool = option(
        False, "Train the noisiest intervals first, all of them after --curriculum_fraction of the run."
    )
    curriculum_fraction: float = option(
        0.2,
        "Fraction of --max_train_steps the curriculum takes to open every interval (a resume with another "
        "--max_train_steps moves it).",
        parse=positive_float,
    )


def time_grid(num_timesteps: int, grid_size: int) -> list[int]:
    """tau_1 < ... < tau_N = T-1: round(i T / N) - 1, i.e. i T / N - 1 when N divides T. tau_0 is the
    clean end (index CLEAN, alpha = 1, sigma = 0), never the schedule's index 0."""
    return [int(round(i * num_timesteps / grid_size)) - 1 for i in range(1, grid_size + 1)]


def check_schedule(schedule: NoiseSchedule, prediction_type: str, grid: list[int], param_timestep: int) -> None:
    """Refuse, in one sentence, a teacher schedule BOOT cannot use: the signal recursion needs x_t = alpha x0 +
    sigma eps with a clean end and a grid that gets strictly noisier, and an eps-student needs alpha > 0 where it
    converts."""
    if schedule.shifted or schedule.kind not in ("vp", "flow", "edm"):
        raise UserError(
            f"The teacher's {schedule.kind} schedule is not of the form x_t = alpha x0 + sigma eps, so it has no clean "
            f"end BOOT can use."
        )
    a, s = schedule.alphas, schedule.sigmas
    if not a[0] > s[0]:
        raise UserError(
            f"The teacher's schedule has no usable clean end: at its least noisy timestep the noise still outweighs "
            f"the signal (sigma/alpha = {float(s[0] / a[0]):.3g}), so BOOT's last step would not reach clean data."
        )
    idx = torch.tensor(grid)
    ratio = s[idx] / a[idx]  # exp(lambda); inf where alpha = 0 (a flow's noise end)
    if not ((s[idx] > 0).all() and (ratio[1:] > ratio[:-1]).all()):
        raise UserError(
            "The teacher's schedule does not get strictly noisier along BOOT's time grid; choose another --grid_size."
        )
    if prediction_type == "epsilon" and not a[param_timestep] > 1e-6:
        raise UserError(
            f"alpha is 0 at timestep {param_timestep}: an eps-prediction student cannot be converted there "
            f"(x0 = (x - sigma eps) / alpha); pass a smaller --param_timestep."
        )


BOOT_FLOW_SAMPLING = (
    " samples in one network evaluation: the transformer is told timestep 0 (the clean end) and its\n"
    "velocity is converted with the sigma of `param_timestep` (scheduler/scheduler_config.json), x0 = skip * noise +\n"
    "output_scale * velocity. BOOT has no multi-step sampler. "
)


def check_flow_contract(contract: dict) -> None:
    """StableDiffusion3Pipeline and FluxPipeline hand the scheduler's timestep to the transformer with the unit
    noise as it is (no init_noise_sigma, no scale_model_input); a contract that needs either cannot be exported."""
    if contract["input_scale"] != 1.0 or contract["input_gain"] != 1.0:
        raise UserError(
            f"This BOOT student reads its noise scaled by {contract['input_scale']} x {contract['input_gain']}, which "
            "the stock SD3 / Flux pipelines do not apply; a flow-matching teacher's student reads it unscaled."
        )


class BOOT(Method):
    ema_models = ("student",)
    exported_models = ("student",)
    needs_data = False  # BOOT is data-free: the trainer never asks the data source for a batch

    def __init__(
        self,
        context: TeacherContext,
        config: BOOTConfig,
        student_init: Denoiser | None = None,
        max_train_steps: int | None = None,
    ):
        """`student_init` (default: the teacher) is the network the student starts from (the toy recipe starts
        from a fitted teacher-net or a random MLP while `teacher` is analytic)."""
        super().__init__()
        teacher, uncond = context.denoiser, context.uncond
        c, sched = config, teacher.schedule
        T = sched.num_timesteps
        if not 1 <= c.grid_size <= T:
            raise UserError(f"--grid_size {c.grid_size} must lie within 1..{T}, the teacher's number of timesteps.")
        if c.boundary not in BOUNDARIES:
            raise UserError(f"--boundary must be one of {', '.join(BOUNDARIES)}, got {c.boundary!r}.")
        if c.interval_weight not in INTERVAL_WEIGHTS:
            raise UserError(
                f"--interval_weight must be one of {', '.join(INTERVAL_WEIGHTS)}, got {c.interval_weight!r}."
            )
        param = T - 1 if c.param_timestep is None else c.param_timestep
        if not 0 <= param < T:
            raise UserError(f"--param_timestep {param} must lie within 0..{T - 1}.")
        if c.boundary_every < 1 or (c.boundary_batch_size is not None and c.boundary_batch_size < 1):
            raise UserError("--boundary_every and --boundary_batch_size must be at least 1.")
        if c.boundary_batch_size is not None and c.boundary_batch_size > c.train_batch_size:
            raise UserError(
                f"--boundary_batch_size {c.boundary_batch_size} is larger than --train_batch_size "
                f"{c.train_batch_size}: the boundary loss reads the first m noise maps of the batch."
            )
        if not 0 < c.curriculum_fraction <= 1:
            raise UserError(f"--curriculum_fraction {c.curriculum_fraction} must lie in (0, 1].")
        if c.guidance_scale < 1:
            raise UserError(f"--guidance_scale {c.guidance_scale} must be at least 1 (1 = no guidance).")
        if c.guidance_scale > 1 and uncond is None:
            raise UserError("Teacher guidance needs the teacher's unconditional input (a null class or empty prompt).")
        grid = time_grid(T, c.grid_size)
        check_schedule(sched, teacher.prediction_type, grid, param)
        self.context, self.config, self.sample_shape = context, c, tuple(context.sample_shape)
        self.teacher = teacher.eval().requires_grad_(False)
        self.cond_sampler = context.cond_sampler or (lambda n, device: None)
        self.uncond, self.decode = uncond, context.decode
        self.max_train_steps = max_train_steps
        self.grid = torch.tensor([CLEAN, *grid])  # grid[i] = tau_i, grid[0] = the clean end
        self.top = grid[-1]
        self.updates = [Update("student", "student")]
        init = student_init if student_init is not None else teacher
        self.student = SignalGenerator(copy.deepcopy(init).train().requires_grad_(True), param)
        self._check_grid_labels(grid)
        if c.curriculum and not max_train_steps:
            raise UserError("--curriculum needs --max_train_steps, the run length its schedule is a fraction of.")
        self.lora = apply_lora(self.student.denoiser.net, context.lora)

    def _check_grid_labels(self, grid: list[int]) -> None:
        """A grid so fine that tau_1 is timestep 0 tells the network the clean end's label at two different
        targets (VP: label 0; EDM: the smallest sigma's); refuse it and name the largest N that works."""
        student, T = self.student, self.teacher.schedule.num_timesteps
        if float(student.labels(torch.tensor([grid[0]]))[0]) != student.clean_label():
            return
        largest = max(n for n in range(1, T + 1) if time_grid(T, n)[0] > 0)
        raise UserError(
            f"--grid_size {self.config.grid_size} puts a grid point at timestep 0, which the student cannot tell "
            f"from the clean end; use at most {largest}."
        )

    # -- set-up --------------------------------------------------------------------------------
    def models(self):
        return {"student": self.student}

    def optimizers(self):
        c = self.config
        params = [p for p in self.student.parameters() if p.requires_grad]  # a LoRA student: the adapter only
        return {
            "student": torch.optim.AdamW(
                params, lr=c.learning_rate, betas=c.adam_betas, weight_decay=c.adam_weight_decay
            )
        }

    def to(self, device):
        self.teacher.to(device)
        return self

    # -- schedule arithmetic (float64) ---------------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) per index, the clean end (CLEAN) being alpha = 1, sigma = 0 (not abar[0], which would make
        the end slightly noisy)."""
        a, s = self.teacher.schedule.coefficients(t.clamp(min=0), t.device)
        clean = t < 0
        return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(s), s)

    def exact_start(self, eps: torch.Tensor) -> torch.Tensor:
        """B-exact (`--boundary exact`): y_T = (prior_std - sigma_T) eps / alpha_T, so that x_T is the pure-noise input
        itself; with alpha_T = 0, delta(T, s) = 1 and y_T drops out (0 here)."""
        sched = self.teacher.schedule
        a, s = (float(v) for v in sched.coefficients(torch.tensor([self.top])))
        return eps * ((sched.prior_std(self.top) - s) / a) if a > 0 else torch.zeros_like(eps)

    def lowest_interval(self, step: int) -> int:
        """1, or with the curriculum the lowest interval index allowed at this step (top intervals first)."""
        c, N = self.config, self.config.grid_size
        if not c.curriculum:
            return 1
        fraction = min(1.0, (step + 1) / max(1.0, c.curriculum_fraction * self.max_train_steps))
        return N - max(1, math.ceil(fraction * N)) + 1

    def teacher_x0(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        w = self.config.guidance_scale
        uncond = self.uncond(cond) if w > 1 else None
        return self.teacher.guided(x, t, cond, uncond, w)

    @torch.no_grad()
    def reference_trajectory(self, eps: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """The teacher's own trajectory from eps on the grid, y_ref(tau_i) for i = 0 (clean) .. N, by the
        recursion y_s = y_t + delta(t, s) (f(x_t, t) - y_t) (what a perfect student outputs; B-exact: the stock DDIM
        sampler from x_T = eps)."""
        n, shape = eps.shape[0], (-1, *([1] * (eps.ndim - 1)))
        top = torch.full((n,), self.top, device=eps.device)
        if self.config.boundary == "paper":
            y = self.teacher_x0(eps * self.teacher.schedule.prior_std(self.top), top, cond).double()
        else:
            y = self.exact_start(eps).double()
        ys = [y]
        for i in range(self.config.grid_size, 0, -1):
            t, s = self.grid[i].expand(n).to(eps.device), self.grid[i - 1].expand(n).to(eps.device)
            (a_t, s_t), (a_s, s_s) = self.coefficients(t), self.coefficients(s)
            f = self.teacher_x0((a_t.reshape(shape) * y + s_t.reshape(shape) * eps.double()).float(), t, cond)
            y = bootstrap_target(y, f, signal_step(a_t, s_t, a_s, s_s))
            ys.append(y)
        return torch.stack(ys[::-1])

    # -- one iteration -------------------------------------------------------------------------
    def start_iteration(self, batch, info):
        """Everything without gradient: the student at t, the teacher step of the target and the boundary target."""
        c, device, B = self.config, info.device, self.config.train_batch_size
        cond = self.cond_sampler(B, device)
        eps = torch.randn(B, *self.sample_shape, device=device)
        i = torch.randint(self.lowest_interval(info.step), c.grid_size + 1, (B,), device=device)
        grid = self.grid.to(device)
        t, s = grid[i], grid[i - 1]
        (a_t, s_t), (a_s, s_s) = self.coefficients(t), self.coefficients(s)
        delta = signal_step(a_t, s_t, a_s, s_s)
        with_boundary = c.boundary == "paper" and info.step % c.boundary_every == 0
        m = B if c.boundary_batch_size is None else min(B, c.boundary_batch_size)
        student = self.unwrap(self.prepared.get("student", self.student))
        with torch.no_grad():  # in train mode: a teacher network with dropout would make this target noisy
            y_t = student(eps, t, cond).double()
            if c.boundary == "exact":  # no network at T: the trajectory starts from x_T = the noise input
                top = (t == self.top).reshape(-1, *([1] * (eps.ndim - 1)))
                y_t = torch.where(top, self.exact_start(eps).double(), y_t)
            shape = (-1, *([1] * (eps.ndim - 1)))
            x_t = (a_t.reshape(shape) * y_t + s_t.reshape(shape) * eps.double()).float()
            xs, ts, conds = [x_t], [t], cond
            if with_boundary:  # the teacher at the noise end on the student's own input, in the same batch
                xs.append(eps[:m] * self.teacher.schedule.prior_std(self.top))
                ts.append(torch.full((m,), self.top, device=device))
                conds = None if cond is None else cond.cat(cond[:m])
            with self.timer.phase("teacher"):
                f = self.teacher_x0(torch.cat(xs), torch.cat(ts), conds)
            target = bootstrap_target(y_t, f[:B], delta)
        weight = delta**2 if c.interval_weight == "delta2" else None
        return {"eps": eps, "cond": cond, "s": s, "target": target, "delta": delta, "weight": weight,
                "boundary_x0": f[B:] if with_boundary else None}  # fmt: skip

    def loss(self, name, st):
        """Gradient only through g(eps, s) (and g(eps, T) for L_BC), in one forward of the prepared student."""
        c, eps, cond, s = self.config, st["eps"], st["cond"], st["s"]
        B, f_T = eps.shape[0], st["boundary_x0"]
        student = self.prepared.get("student", self.student)
        if f_T is None:
            g_s = student(eps, s, cond)
        else:
            m = f_T.shape[0]
            top = torch.full((m,), self.top, device=s.device)
            g = student(torch.cat([eps, eps[:m]]), torch.cat([s, top]), None if cond is None else cond.cat(cond[:m]))
            g_s, g_T = g[:B], g[B:]
        loss_bs = bootstrap_loss(g_s, st["target"], st["delta"], st["weight"])
        logs = {"loss_bs": loss_bs.detach()}
        if f_T is None:
            return loss_bs, logs
        loss_bc = boundary_loss(g_T, f_T)
        logs["loss_bc"] = loss_bc.detach()
        return loss_bs + c.boundary_weight * loss_bc, logs

    # -- outputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        z = torch.randn(num, *self.sample_shape, generator=torch.Generator().manual_seed(seed)).to(device)
        cond = self.context.grid_conditions(num, device)
        x = models["student"](z, torch.full((num,), CLEAN, device=device), cond)
        return (self.decode(x) if self.decode is not None else x).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from onestep.pipelines.boot import BootScheduler

        from ..export import BOOT_SAMPLING, Card, export_boot_pixel, hub_id
        from ..flow_export import flow_guidance_note
        from ..flow_teachers import FLOW_PIPELINES
        from ..text_export import export_text_to_image

        student, target = models["student"], self.context.export
        contract = student.conversion()
        scheduler = BootScheduler(**contract, num_train_timesteps=self.teacher.schedule.num_timesteps)
        card = Card("BOOT one-step student", self._card(extra_card, contract), method="boot", steps=1)
        card.base_model = hub_id(self.context.source)
        flow = target is not None and target.pipeline in STOCK_FLOW_PIPELINES
        if target is not None and (flow or target.pipeline in STOCK_TEXT_PIPELINES):
            card.title = "BOOT one-step text-to-image student"
            if flow:
                check_flow_contract(contract)
                call = (
                    f"`{self._flow_call()}`"
                    + BOOT_FLOW_SAMPLING
                    + flow_guidance_note(target.pipeline, target.guidance)
                    + "\n"
                )
            else:
                call = "`pipe(prompt, num_inference_steps=1, guidance_scale=0)`" + BOOT_SAMPLING
            what = FLOW_PIPELINES[target.pipeline] if flow else "Stable Diffusion pipeline"
            card.loading = (
                "## Loading\n\n`pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` gives the "
                f"stock {what} with BOOT's one-step scheduler (this folder ships\n"
                "`scheduler/boot.py`, which holds the sampling contract; read it before trusting it).\n\n" + call
            )
            export_text_to_image(
                student.denoiser.net,
                target,
                scheduler,
                output_dir,
                card,
                lora=self.lora,
                sample_size=self.sample_shape[-1],
                ship=("boot.py", "BootScheduler"),
            )
            return
        export_boot_pixel(
            student.denoiser.net, scheduler, output_dir, card, self.context.num_classes, self.sample_shape[-1]
        )

    def product(self, folder: str) -> str:
        target = self.context.export
        if target is not None and target.pipeline in STOCK_FLOW_PIPELINES:  # a transformer, not a UNet
            return f"student pipeline  {folder} (model_index.json, transformer/, scheduler/, README.md)"
        return super().product(folder)

    def _flow_call(self) -> str:
        from ..flow_export import flow_call

        target = self.context.export
        return flow_call(target.pipeline, 1, target.resolution, target.guidance)

    def usage(self, folder: str) -> str:
        load = f"DiffusionPipeline.from_pretrained({folder!r}, trust_remote_code=True)"
        target = self.context.export
        if target is not None and target.pipeline in STOCK_FLOW_PIPELINES:
            return f"{load}{self._flow_call().removeprefix('pipe')}.images"
        if target is not None and target.pipeline in STOCK_TEXT_PIPELINES:
            return f"{load}(prompt, num_inference_steps=1, guidance_scale=0).images"
        return f"{load}({'class_labels=[3, 7]' if self.context.num_classes else 'batch_size=2'}).images"

    def _card(self, extra_card: dict, contract: dict) -> dict:
        from ..export import metrics_line

        c = self.config
        boundary = f"B-paper (L_BC weight {c.boundary_weight})" if c.boundary == "paper" else "B-exact (x_T = noise)"
        target = self.context.export
        text = target is not None and target.pipeline in STOCK_TEXT_PIPELINES + STOCK_FLOW_PIPELINES
        return {
            "method": "BOOT (Gu et al. 2023, arXiv 2306.05544): data-free, bootstrapped Signal-ODE",
            "teacher": self.context.source,
            "preset": extra_card.get("preset", "-"),
            "training_steps": extra_card.get("training_steps"),
            "data used": "none (noise" + (" and prompts)" if text else ")"),
            "time grid": f"N = {c.grid_size} intervals, top timestep {self.top}",
            "boundary": boundary,
            "network told timestep": f"{contract['embed_timestep']} (the clean end)",
            "conversion": f"{contract['prediction_type']} at timestep {contract['param_timestep']} "
            f"(alpha {contract['alpha']:.6g}, sigma {contract['sigma']:.6g})",
            "teacher guidance scale": c.guidance_scale,
            "learning rate": c.learning_rate,
            "batch per process": c.train_batch_size,
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "metrics": metrics_line(extra_card.get("eval")),
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }
