"""Flow-matching transformer teachers: Stable Diffusion 3 and Flux, as diffusers' pipelines run them.

Both predict the velocity v = eps - x0 on the path x_t = (1 - sigma) x0 + sigma eps, and both pipelines step
diffusers' FlowMatchEulerDiscreteScheduler; they differ in how the training index maps to sigma and in how the
transformer is called:

- SD3 (StableDiffusion3Pipeline): a static shift, sigma = shift s / (1 + (shift - 1) s) with shift 3.0 and
  s = (t + 1) / T; the transformer reads (B, C, H, W) latents, `timestep` = sigma * 1000, the joint CLIP + T5 token
  states and the two CLIP pooled embeddings concatenated.
- Flux (FluxPipeline): a resolution-dependent shift, sigma = e^mu / (e^mu + 1/s - 1), mu linear in the number of
  latent tokens (`resolution_mu`); the transformer reads 2x2 latent patches packed into tokens with their position
  ids, `timestep` = sigma (the pipeline divides the scheduler's sigma * 1000 by 1000), the T5 states, the CLIP pooled
  embedding and, guidance-distilled, the guidance scale as an input (`Cond.guidance`) instead of a second pass.

At training time the index -> sigma map is fixed for the whole run: SD3's static shift, or Flux's shift evaluated
once at the training resolution (`flow_schedule_from_scheduler_config(config, resolution)`). `FlowMatchSchedule`
holds that map; its model_time is the scheduler's timestep, sigma * 1000, and each adapter passes it on as its
pipeline does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .denoiser import Cond, Denoiser
from .errors import UserError
from .loading import Teacher, read_json
from .schedules import RectifiedFlowSchedule, ScheduleSpec

FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
FLOW_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}

# LoRA on the attention projections of both stream types (image: to_*, text: add_*_proj / to_add_out), the modules
# diffusers' SD3 and Flux LoRA training scripts adapt. Flux's single-stream blocks have to_q/k/v but no to_out.
TRANSFORMER_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


# -- schedules ---------------------------------------------------------------------------------------------------


def resolution_mu(image_seq_len: int, scheduler_config: dict) -> float:
    """Flux's resolution-dependent shift exponent: FluxPipeline's `calculate_shift`, linear in the token count."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def image_seq_len(resolution: int | tuple[int, int], vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """Latent tokens of a (height, width) image (or a square side): 2x2 patches of the autoencoder's latents."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    step = vae_scale_factor * patch_size
    return (h // step) * (w // step)


class FlowMatchSchedule(RectifiedFlowSchedule):
    """Rectified flow with a shifted time: index t -> s = (t + 1) / T -> sigma, x_t = (1 - sigma) x0 + sigma eps.

    Static shift (SD3): sigma = shift s / (1 + (shift - 1) s). Resolution-dependent shift (Flux): given mu,
    sigma = e^mu / (e^mu + 1/s - 1) ("exponential", the same map with shift = e^mu) or mu / (mu + 1/s - 1)
    ("linear"). These are FlowMatchEulerDiscreteScheduler's formulas, so sigmas[t] equals the scheduler's own table
    at index T - 1 - t (its tables run from noise to data). model_time is sigma * T, the scheduler's timestep."""

    def __init__(
        self, num_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None, time_shift_type="exponential"
    ):
        s = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        if mu is not None:
            shift = math.exp(mu) if time_shift_type == "exponential" else mu
        if not (math.isfinite(shift) and shift > 0):
            raise UserError(f"A flow-matching shift must be a positive number, got {shift} (mu {mu}).")
        if mu is None:
            sigmas = shift * s / (1 + (shift - 1) * s)
        else:
            sigmas = shift / (shift + (1 / s - 1))
        self.flow_shift, self.mu = float(shift), mu
        self.sigmas, self.alphas = sigmas, 1 - sigmas


def flow_schedule_from_scheduler_config(
    config: dict, resolution: int | tuple[int, int] | None = None, vae_scale_factor: int = 8, patch_size: int = 2
) -> ScheduleSpec:
    """The training schedule of a FlowMatchEulerDiscreteScheduler config: its static shift, or (use_dynamic_shifting)
    the shift its pipeline would use at `resolution` (pixels), computed once. The config's inference-only options
    (shift_terminal, Karras/exponential/beta sigmas) do not enter the training map."""
    T = int(config.get("num_train_timesteps", 1000))
    if not config.get("use_dynamic_shifting"):
        return ScheduleSpec(FlowMatchSchedule(T, shift=float(config.get("shift", 1.0))), "flow")
    if resolution is None:
        raise UserError(
            "This teacher's scheduler shifts its noise levels by image size (use_dynamic_shifting); pass the "
            "training resolution to fix its schedule."
        )
    mu = resolution_mu(image_seq_len(resolution, vae_scale_factor, patch_size), config)
    return ScheduleSpec(
        FlowMatchSchedule(T, mu=mu, time_shift_type=config.get("time_shift_type", "exponential")), "flow"
    )


# -- adapters ----------------------------------------------------------------------------------------------------


def _load_parts(path: str, parts: list[tuple[str, type]], revision, variant, torch_dtype) -> list:
    """Tokenizers and text encoders from a pipeline folder or hub id, one sentence on failure."""
    loaded = []
    for sub, cls in parts:
        if os.path.isdir(path) and not os.path.isdir(os.path.join(path, sub)):
            raise UserError(f"The teacher folder {path} has no {sub}/; its prompts need every tokenizer and encoder.")
        kwargs = {"subfolder": sub, "revision": revision}
        if "Tokenizer" not in cls.__name__:
            kwargs.update(variant=variant, torch_dtype=torch_dtype or torch.float32)
        try:
            loaded.append(cls.from_pretrained(path, **kwargs))
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot load {sub} from {path}: {str(err).splitlines()[0][:160]}") from None
    return loaded


def _tokens(tokenizer, prompts: list[str], length: int, device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


class SD3PromptEncoder:
    """StableDiffusion3Pipeline.encode_prompt: the penultimate hidden states of CLIP-L and CLIP-G concatenated,
    zero-padded to the T5 width and followed by the T5 states along the sequence (`encoder_hidden_states`), and both
    CLIP pooled embeddings concatenated (`text_embeds`). The unconditional input is the empty prompt encoded the
    same way (the pipeline's negative_prompt=""). Without a T5 encoder its states are zeros, as in the pipeline."""

    classifier_free_guidance = True

    def __init__(self, tokenizers: list, encoders: list, max_sequence_length: int = 256, t5_width: int | None = None):
        self.tokenizers, self.encoders = tokenizers, encoders
        self.max_sequence_length, self.t5_width = max_sequence_length, t5_width
        self._empty: dict[str, Cond] = {}
        for enc in encoders:
            enc.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, path: str, revision=None, variant=None, torch_dtype=None, max_sequence_length: int = 256
    ) -> SD3PromptEncoder:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts = [
            ("tokenizer", CLIPTokenizer),
            ("tokenizer_2", CLIPTokenizer),
            ("text_encoder", CLIPTextModelWithProjection),
            ("text_encoder_2", CLIPTextModelWithProjection),
        ]
        if _has_component(path, "text_encoder_3", revision):
            parts += [("tokenizer_3", T5TokenizerFast), ("text_encoder_3", T5EncoderModel)]
        loaded = _load_parts(path, parts, revision, variant, torch_dtype)
        tokenizers, encoders = loaded[0:2] + loaded[4:5], loaded[2:4] + loaded[5:6]
        width = None
        if len(encoders) == 2:  # the pipeline's zeros are as wide as the transformer's context input
            width = config_json(path, "transformer/config.json", revision)["joint_attention_dim"]
        return cls(tokenizers, encoders, max_sequence_length, width)

    def to(self, device):
        for enc in self.encoders:
            enc.to(device)
        self._empty.clear()
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        device, dtype = self.encoders[0].device, self.encoders[0].dtype
        clip_length = self.tokenizers[0].model_max_length  # the pipeline pads both CLIP prompts to the first's
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.encoders[:2]):
            out = enc(_tokens(tok, prompts, clip_length, device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(dtype))
        clip = torch.cat(hidden, dim=-1)
        if len(self.encoders) == 3:
            t5_enc = self.encoders[2]
            ids = _tokens(self.tokenizers[2], prompts, self.max_sequence_length, device)
            t5 = t5_enc(ids)[0].to(t5_enc.dtype)
        else:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.t5_width, device=device, dtype=dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Cond(encoder_hidden_states=torch.cat([clip, t5], dim=-2), text_embeds=torch.cat(pooled, dim=-1))

    def uncond(self, cond: Cond) -> Cond:
        n = cond.encoder_hidden_states.shape[0]
        key = str(self.encoders[0].device)
        if key not in self._empty:
            self._empty[key] = self.encode([""])
        empty = self._empty[key]
        return Cond(
            encoder_hidden_states=empty.encoder_hidden_states.expand(n, -1, -1),
            text_embeds=empty.text_embeds.expand(n, -1),
        )


class FluxPromptEncoder:
    """FluxPipeline.encode_prompt: the T5 states (`encoder_hidden_states`) and the CLIP pooled output
    (`text_embeds`); a guidance-distilled transformer's guidance scale goes into `Cond.guidance`.

    Flux has no unconditional input: guidance is an input of the transformer, distilled from classifier-free
    guidance, so `uncond` raises and `classifier_free_guidance` is False."""

    classifier_free_guidance = False

    def __init__(self, tokenizers: list, encoders: list, guidance_scale: float | None = 3.5, max_sequence_length=512):
        self.tokenizers, self.encoders = tokenizers, encoders
        self.guidance_scale, self.max_sequence_length = guidance_scale, max_sequence_length
        for enc in encoders:
            enc.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        revision=None,
        variant=None,
        torch_dtype=None,
        guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
    ) -> FluxPromptEncoder:
        """`guidance_scale` (FluxPipeline's default 3.5) is dropped for a transformer without a guidance embedding."""
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        parts = [
            ("tokenizer", CLIPTokenizer),
            ("tokenizer_2", T5TokenizerFast),
            ("text_encoder", CLIPTextModel),
            ("text_encoder_2", T5EncoderModel),
        ]
        tok, tok2, enc, enc2 = _load_parts(path, parts, revision, variant, torch_dtype)
        if not config_json(path, "transformer/config.json", revision).get("guidance_embeds", False):
            guidance_scale = None
        return cls([tok, tok2], [enc, enc2], guidance_scale, max_sequence_length)

    def to(self, device):
        for enc in self.encoders:
            enc.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        (clip_tok, t5_tok), (clip, t5) = self.tokenizers, self.encoders
        device = clip.device
        pooled = clip(_tokens(clip_tok, prompts, clip_tok.model_max_length, device), output_hidden_states=False)
        states = t5(_tokens(t5_tok, prompts, self.max_sequence_length, device), output_hidden_states=False)[0]
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((len(prompts),), float(self.guidance_scale), device=device)
        return Cond(
            encoder_hidden_states=states.to(t5.dtype),
            text_embeds=pooled.pooler_output.to(clip.dtype),
            guidance=guidance,
        )

    def uncond(self, cond: Cond) -> Cond:
        raise UserError(
            "Flux is guidance-distilled and has no unconditional input: it takes its guidance scale as an input "
            "(Cond.guidance), so run it without classifier-free guidance (guidance scale 1)."
        )


# -- loading -----------------------------------------------------------------------------------------------------


def _is_hub_id(path: str) -> bool:
    return not os.path.exists(path) and not path.startswith((".", "/", "~")) and path.count("/") == 1


def config_json(path: str, filename: str, revision: str | None = None) -> dict:
    """A JSON file of a pipeline folder or hub id."""
    if not _is_hub_id(path):
        return read_json(os.path.join(path, filename))
    from huggingface_hub import hf_hub_download

    try:
        return read_json(hf_hub_download(path, filename, revision=revision))
    except UserError:
        raise
    except Exception as err:  # network, auth, missing file: one sentence whatever the cause
        raise UserError(
            f"Cannot fetch {filename} of {path} from the hub ({err.__class__.__name__}); check the id and your network."
        ) from None


def _has_component(path: str, name: str, revision: str | None) -> bool:
    index = config_json(path, "model_index.json", revision)
    return (index.get(name) or [None])[0] is not None


def _last(entry) -> str | None:
    """A class name from a config entry: the name itself, or the last item of a [library, class] pair."""
    if isinstance(entry, (list, tuple)):
        entry = entry[-1] if entry else None
    return entry if isinstance(entry, str) else None


def flow_teacher_kind(path: str, revision: str | None = None) -> str | None:
    """The kind of a Stable Diffusion 3 ("sd3") or Flux ("flux") pipeline folder or hub id, read from its
    transformer/config.json or model_index.json; None for anything else or what cannot be read."""
    for filename in ("transformer/config.json", "model_index.json"):
        try:
            config = config_json(path, filename, revision)
        except UserError:
            continue
        name = _last(config.get("_class_name"))  # a remote-code pipeline names itself [module, class]
        kind = FLOW_TRANSFORMERS.get(name) or FLOW_TRANSFORMERS.get(_last(config.get("transformer")))
        kind = kind or {v: k for k, v in FLOW_PIPELINES.items()}.get(name)
        if kind:
            return kind
    return None


@dataclass
class FlowTeacher(Teacher):
    """A Teacher whose network is a transformer (unet_class / unet_config hold the transformer's), plus its kind
    ("sd3" or "flux"), the autoencoder's scale factor and the resolution its schedule was fixed at."""

    kind: str = "sd3"
    vae_scale_factor: int = 8
    resolution: int | tuple[int, int] | None = None

    @property
    def transformer_class(self) -> str:
        return self.unet_class

    @property
    def transformer_config(self) -> dict:
        return self.unet_config


def load_flow_teacher(
    path_or_id: str,
    revision: str | None = None,
    variant: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> FlowTeacher:
    """An SD3 or Flux pipeline folder or hub id -> a frozen teacher Denoiser (flow prediction) on the training
    schedule: the static shift, or the resolution-dependent one fixed at `resolution` (pixels; Flux needs it)."""
    kind = flow_teacher_kind(path_or_id, revision)
    if kind is None:
        raise UserError(
            f"{path_or_id} is not a Stable Diffusion 3 or Flux pipeline (no SD3Transformer2DModel or "
            "FluxTransformer2DModel in transformer/config.json or model_index.json)."
        )
    sched_cfg = config_json(path_or_id, "scheduler/scheduler_config.json", revision)
    vae_cfg = config_json(path_or_id, "vae/config.json", revision)
    vae_scale_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    import diffusers

    cls_name = {v: k for k, v in FLOW_TRANSFORMERS.items()}[kind]
    try:
        transformer = getattr(diffusers, cls_name).from_pretrained(
            path_or_id, subfolder="transformer", revision=revision, variant=variant, torch_dtype=torch_dtype
        )
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load the teacher transformer from {path_or_id}: {str(err).splitlines()[0]}") from None
    patch = 2 if kind == "flux" else transformer.config.patch_size
    spec = flow_schedule_from_scheduler_config(sched_cfg, resolution, vae_scale_factor, patch)
    denoiser = Denoiser(transformer, spec.schedule, spec.prediction_type)
    denoiser.eval().requires_grad_(False)
    return FlowTeacher(
        denoiser, cls_name, dict(transformer.config), sched_cfg, path_or_id, kind, vae_scale_factor, resolution
    )


# -- export ------------------------------------------------------------------------------------------------------
