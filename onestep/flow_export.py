"""Exporting students of flow-matching transformer teachers (SD3, Flux) as the stock StableDiffusion3Pipeline /
FluxPipeline: a scheduler config whose plain call reproduces the trained times (checked against the pipeline's own
timestep set-up), the LoRA adapter, and the model card's loading text."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .export import LORA_FOLDER, TEXT_TO_IMAGE, Card, loading_text, ship_pipeline_file, write_folder
from .flow_teachers import (
    FLOW_PIPELINES,
    config_json,
    flow_schedule_from_scheduler_config,
    image_seq_len,
    resolution_mu,
)

TIMESTEP_TOLERANCE = 2e-3  # in timestep units (sigma * 1000): float32 rounding of the scheduler's own arithmetic


def plain_call_timesteps(kind: str, scheduler, num_steps: int, seq_len: int = 4096) -> list[float]:
    """The timesteps (sigma * 1000) a plain `pipe(prompt, num_inference_steps=num_steps)` call evaluates the
    transformer at, set up as StableDiffusion3Pipeline / FluxPipeline.__call__ set up their scheduler. FluxPipeline
    always passes sigmas linspace(1, 1/n, n) and mu from the token count; SD3 passes mu only where the config
    shifts dynamically, and otherwise lets the scheduler space its (already shifted) sigma range evenly."""
    cfg = scheduler.config
    if kind == "flux":
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = resolution_mu(seq_len, cfg)
        if sigmas is None:
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    elif cfg.get("use_dynamic_shifting"):
        scheduler.set_timesteps(num_steps, mu=resolution_mu(seq_len, {"max_shift": 1.16, **cfg}))
    else:
        scheduler.set_timesteps(num_steps)
    return [float(t) for t in scheduler.timesteps]


def _unshifted_grid(kind: str, num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """The evenly spaced times a plain call shifts: Flux's linspace(1, 1/n, n); SD3's linspace over the scheduler's
    unshifted sigma range (1 down to float32(1/T), where the config shifts dynamically)."""
    if kind == "flux":
        return np.linspace(1.0, 1 / num_steps, num_steps)
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, use_dynamic_shifting=True)
    T = num_train_timesteps
    return np.linspace(s.sigma_max * T, s.sigma_min * T, num_steps) / T


def _fixed_shift_config(base: dict, kind: str, sigmas: list[float]) -> dict | None:
    """Several steps from sigma = 1: a dynamic-shift config whose mu is the same at every resolution (base_shift =
    max_shift = mu) and whose shift_terminal stretches the last sigma onto the trained one. 1 - sigma_i of a shifted
    even grid u_i is (1 - u_i) / (m (1 - c (1 - u_i))) with m = e^mu, c = (m - 1) / m; matching the trained ratios
    (1 - sigma_i) / (1 - sigma_last) at i = 1 fixes c. Whether the other steps match is checked by the caller."""
    k = len(sigmas)
    if k < 2 or abs(sigmas[0] - 1) > 1e-9 or sigmas[-1] >= 1:
        return None
    a = 1 - _unshifted_grid(kind, k, int(base.get("num_train_timesteps", 1000)))
    b = 1 - np.asarray(sigmas, dtype=np.float64)
    c = 0.0
    if k > 2:
        q = (b[1] / b[-1]) * a[-1] / a[1]
        if q * a[1] == a[-1]:
            return None
        c = (q - 1) / (q * a[1] - a[-1])
    if not c < 1:
        return None
    mu = math.log(1 / (1 - c))
    return {
        **base,
        "use_dynamic_shifting": True,
        "time_shift_type": "exponential",
        "base_shift": mu,
        "max_shift": mu,
        "shift_terminal": float(sigmas[-1]),
    }


def _quiet_scheduler(config: dict):
    """FlowMatchEulerDiscreteScheduler.from_config without its warning that sigma_max / sigma_min 'will be
    ignored': they are kept in the config and its exponential sigmas read them."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    finally:
        logging.set_verbosity(level)


def flow_stock_scheduler(
    teacher_scheduler_config: dict,
    kind: str,
    sigmas: list[float],
    seq_len: int = 4096,
    timesteps=None,
    renoise: bool = True,
):
    """A FlowMatchEulerDiscreteScheduler whose plain `num_inference_steps=len(sigmas)` call in the kind's pipeline
    evaluates the transformer at exactly the trained noise levels `sigmas` (descending), checked numerically:
    - one step at sigma = 1: the teacher's own config;
    - several steps from sigma = 1: a resolution-independent dynamic shift plus shift_terminal (_fixed_shift_config),
      re-noising each x0 prediction with fresh noise (stochastic_sampling, the multi-step sampler DMD2 trains;
      renoise=False: deterministic Euler steps);
    - one step at sigma < 1: exponential sigmas between sigma_max = sigma_min = that sigma (every shifted grid
      starts at sigma = 1; these two config keys are not parameters of the class, but it keeps and reads them).
    Otherwise raises UserError naming the closest plain-call timesteps."""
    k = len(sigmas)
    T = int(teacher_scheduler_config.get("num_train_timesteps", 1000))
    target = np.asarray(sigmas, dtype=np.float64) * T
    base = {key: v for key, v in teacher_scheduler_config.items() if not key.startswith("_")}
    base.update(
        stochastic_sampling=renoise and k > 1,
        shift_terminal=None,
        invert_sigmas=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
    )
    base.pop("use_flow_sigmas", None)
    # The resolution-independent config first: the teacher's own dynamic one would match only at seq_len.
    candidates = [_fixed_shift_config(base, kind, sigmas), base]
    if k == 1 and sigmas[0] < 1:
        candidates.append({**base, "use_exponential_sigmas": True, "sigma_max": sigmas[0], "sigma_min": sigmas[0]})
    closest = None
    for config in filter(None, candidates):
        got = np.asarray(plain_call_timesteps(kind, _quiet_scheduler(config), k, seq_len))
        err = float(np.abs(got - target).max())
        if err <= TIMESTEP_TOLERANCE:
            return _quiet_scheduler(config)
        if closest is None or err < closest[0]:
            closest = (err, [round(float(t), 3) for t in got])
    shown = list(timesteps) if timesteps is not None else [round(float(t), 3) for t in target]
    raise UserError(
        f"No stock FlowMatchEulerDiscreteScheduler config makes a plain {k}-step {FLOW_PIPELINES[kind]} call evaluate "
        f"the trained timesteps {shown} (model times {[round(float(t), 3) for t in target]}; closest: {closest[1]}); "
        f"train several steps at evenly spaced indices from {T - 1} (sigma 1), e.g. "
        f"{T - 1},{3 * T // 4 - 1},{T // 2 - 1},{T // 4 - 1}, and one step at any index."
    )


@dataclass
class FlowExportPlan:
    """What an export of trained indices needs from the teacher folder: the pipeline class, the teacher's scheduler
    config, the trained noise levels on the schedule of the training resolution, and that resolution's token count."""

    pipeline_class: type
    scheduler_config: dict
    sigmas: list[float]
    seq_len: int


def flow_export_plan(
    teacher_path: str,
    kind: str,
    timesteps: list[int],
    resolution: int | tuple[int, int] | None = None,
    revision: str | None = None,
) -> FlowExportPlan:
    """The plan of exporting the trained indices `timesteps` of a student of the teacher at `teacher_path`."""
    import diffusers

    if kind not in FLOW_PIPELINES:
        raise UserError(f"Unknown flow teacher kind {kind!r}; expected one of {', '.join(FLOW_PIPELINES)}.")
    sched_cfg = config_json(teacher_path, "scheduler/scheduler_config.json", revision)
    vae_cfg = config_json(teacher_path, "vae/config.json", revision)
    vae_scale_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    patch = 2 if kind == "flux" else config_json(teacher_path, "transformer/config.json", revision)["patch_size"]
    schedule = flow_schedule_from_scheduler_config(sched_cfg, resolution, vae_scale_factor, patch).schedule
    sigmas = [float(schedule.sigmas[int(t)]) for t in timesteps]
    seq_len = image_seq_len(resolution, vae_scale_factor, patch) if resolution is not None else 4096
    return FlowExportPlan(getattr(diffusers, FLOW_PIPELINES[kind]), sched_cfg, sigmas, seq_len)


def check_flow_export(
    teacher_path: str, kind: str, timesteps: list[int], resolution=None, revision: str | None = None
) -> None:
    """Refuse, before training, trained indices whose plain pipeline call no stock scheduler config reproduces."""
    plan = flow_export_plan(teacher_path, kind, timesteps, resolution, revision)
    flow_stock_scheduler(plan.scheduler_config, kind, plan.sigmas, plan.seq_len, timesteps)


def save_flow_pipeline(
    transformer,
    teacher_path: str,
    kind: str,
    scheduler,
    output_dir: str,
    card,
    lora: dict | None = None,
    resolution: int | tuple[int, int] | None = None,
    revision: str | None = None,
    ship: tuple[str, str] | None = None,
    check=None,
) -> None:
    """The stock StableDiffusion3Pipeline / FluxPipeline folder of a student transformer: the teacher's VAE, text
    encoders and tokenizers, the transformer and `scheduler`, which carries the sampling contract. A LoRA student
    (lora = its adapter config) also gets lora/pytorch_lora_weights.safetensors for
    `teacher_pipe.load_lora_weights(folder + "/lora")`; the folder's own transformer has it fused in, made through
    that same diffusers path. SD3's transformer records the training resolution as its default sample size.
    `ship`: (pipeline file, scheduler class) when the scheduler is one of ours (BOOT's), copied into scheduler/;
    `check(folder)` runs on the written folder before it is moved in."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    cls = getattr(diffusers, FLOW_PIPELINES[kind])
    vae_cfg = config_json(teacher_path, "vae/config.json", revision)
    vae_scale_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)

    def save(tmp):
        if lora is not None:
            adapter = os.path.join(tmp, LORA_FOLDER)
            # The PEFT-format state dict, as diffusers' SD3 and Flux LoRA training scripts save it.
            cls.save_lora_weights(
                adapter,
                transformer_lora_layers=get_peft_model_state_dict(transformer),
                transformer_lora_adapter_metadata=lora,
            )
            pipe = cls.from_pretrained(teacher_path, scheduler=scheduler, revision=revision)
            pipe.load_lora_weights(adapter)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        else:
            pipe = cls.from_pretrained(teacher_path, transformer=transformer, scheduler=scheduler, revision=revision)
        if kind == "sd3" and resolution is not None:
            h = resolution if isinstance(resolution, int) else resolution[0]
            pipe.transformer.register_to_config(sample_size=h // vae_scale_factor)
        pipe.save_pretrained(tmp)
        if ship is not None:
            ship_pipeline_file(tmp, ship[0], None, ship[1])
        if check is not None:
            check(tmp)

    write_folder(output_dir, save, card)


def export_flow_pipeline(
    transformer,
    teacher_path: str,
    kind: str,
    timesteps: list[int],
    output_dir: str,
    card,
    lora: dict | None = None,
    resolution: int | tuple[int, int] | None = None,
    guidance_scale: float = 3.5,  # Flux only
    revision: str | None = None,
    renoise: bool = True,
) -> None:
    """An SD3 / Flux student as the stock StableDiffusion3Pipeline / FluxPipeline (save_flow_pipeline) with a
    FlowMatchEulerDiscreteScheduler config whose plain `pipe(prompt, num_inference_steps=len(timesteps))` call
    evaluates the transformer at the trained indices' noise levels (on the schedule of `resolution`, which a
    dynamic-shift teacher needs). `guidance_scale` (Flux) is the guidance the student was trained to read; the
    model card tells callers to pass it. Several steps re-noise each x0 prediction with fresh noise
    (renoise=False: deterministic Euler steps). `card`: an export.Card, or a dict of its rows."""

    plan = flow_export_plan(teacher_path, kind, timesteps, resolution, revision)
    sigmas, seq_len = plan.sigmas, plan.seq_len
    scheduler = flow_stock_scheduler(plan.scheduler_config, kind, sigmas, seq_len, timesteps, renoise)
    card = card if isinstance(card, Card) else Card("Text-to-image student", dict(card))
    steps = len(timesteps)
    card.rows = {
        **card.rows,
        "sampling steps": steps,
        "conditioning timesteps": list(timesteps),
        "noise levels (sigma)": [round(s, 6) for s in sigmas],
        "pipeline": plan.pipeline_class.__name__,
    }
    card.pipeline_tag, card.steps = TEXT_TO_IMAGE, steps
    notes = {k: bool(scheduler.config.get(k)) for k in ("use_exponential_sigmas", "stochastic_sampling")}
    notes["fixed_shift"] = bool(scheduler.config.get("shift_terminal"))
    card.loading = _flow_loading(plan.pipeline_class.__name__, kind, sigmas, lora, resolution, guidance_scale, notes)
    save_flow_pipeline(
        transformer,
        teacher_path,
        kind,
        scheduler,
        output_dir,
        card,
        lora,
        resolution,
        revision,
        check=lambda tmp: _check_saved_scheduler(tmp, kind, sigmas, seq_len),
    )


def flow_call(kind: str, steps: int, resolution=None, guidance_scale: float | None = None) -> str:
    """The plain call of an SD3 / Flux student: SD3 with the pipeline's CFG off (guidance was distilled in), Flux
    with the guidance input it was trained with."""
    size = ""
    if resolution is not None:
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        size = f", height={h}, width={w}"
    guidance = guidance_scale if kind == "flux" and guidance_scale is not None else 1.0
    return f"pipe(prompt, num_inference_steps={steps}, guidance_scale={guidance}{size})"


def _check_saved_scheduler(folder: str, kind: str, sigmas: list[float], seq_len: int) -> None:
    """The written scheduler config, loaded back as the pipeline loads it, still gives the trained times."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    got = plain_call_timesteps(kind, _quiet_scheduler(config), len(sigmas), seq_len)
    T = config.get("num_train_timesteps", 1000)
    if max(abs(g - s * T) for g, s in zip(got, sigmas)) > TIMESTEP_TOLERANCE:
        raise UserError(f"The exported scheduler config does not load back to the trained timesteps (got {got}).")


def flow_guidance_note(kind: str, guidance_scale: float | None) -> str:
    if kind == "flux" and guidance_scale is not None:
        return f"`guidance_scale={guidance_scale}` is the guidance input the student was trained with."
    if kind == "flux":
        return "This transformer has no guidance input; `guidance_scale` does not change the images."
    return "Guidance was distilled in: `guidance_scale=1.0` turns off the pipeline's classifier-free guidance."


def _flow_loading(pipeline, kind, sigmas, lora, resolution, guidance_scale, notes: dict) -> str:
    """The card's "## Loading" section: the plain call that runs the trained noise levels."""

    call = flow_call(kind, len(sigmas), resolution, guidance_scale)
    guidance = flow_guidance_note(kind, guidance_scale)
    text = (
        f"`{call}` evaluates the transformer at noise level(s) sigma = {[round(s, 6) for s in sigmas]}\n"
        f"(timesteps {[round(s * 1000, 3) for s in sigmas]}), the ones it was trained at: the saved scheduler config "
        f"reproduces them. {guidance}\n"
    )
    if notes["use_exponential_sigmas"]:
        text += (
            "\nThe scheduler config starts the step below sigma = 1 through its `sigma_max` / `sigma_min` keys: diffusers "
            "warns on loading that they 'will be ignored', but FlowMatchEulerDiscreteScheduler keeps and reads them.\n"
        )
    if notes["fixed_shift"]:
        text += (
            "\nThe config's resolution-dependent shift is pinned (base_shift = max_shift) and its shift_terminal set, so "
            "the noise levels above hold at every height and width.\n"
        )
    if notes["stochastic_sampling"]:
        text += (
            "\nEach step re-noises the x0 prediction with fresh noise (the scheduler's stochastic sampling), drawn from "
            "torch's global generator (the pipeline does not hand `generator` to the scheduler): call "
            "`torch.manual_seed(...)` before the call for repeatable samples.\n"
        )
    if lora is not None:
        text += (
            '\nThe LoRA adapter alone: `teacher_pipe.load_lora_weights(folder + "/lora")`, with the scheduler from '
            'this folder (`FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")`).\n'
        )
    return loading_text(pipeline, text)
