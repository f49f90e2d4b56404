"""One-step latent super-resolution students of diffusers' latent SR teachers (TAD-SR, shared/methods/tadsr.md 6):
`LDMSuperResolutionPipeline`-shaped (a UNet2DModel on a VQModel latent, the low-resolution image concatenated) and
`StableDiffusionUpscalePipeline`-shaped (a UNet2DConditionModel on an AutoencoderKL latent, the low-resolution
pixels noised by `low_res_scheduler` at `noise_level` concatenated, the noise level as class labels, a prompt).

Self-contained (torch + diffusers only): the export copies this file into the folder, so
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works where onestep is not installed.

One call: u = the bicubic-upsampled low-resolution image, encoded; x_T = (a_T + b_T) u + c_T eps (`start` = "lr") or
c_T eps (VP: b = 0); one student evaluation at `timestep` on [x_T, LR on the latent grid] -> x0 (latent); decode.
Latent canvases larger than the training size (`tile_size`, latent pixels) run in overlapping tiles blended with
linear ramps; the noise is drawn once for the whole canvas.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


class LatentSuperResolutionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vqvae", "vae", "text_encoder", "tokenizer", "low_res_scheduler"]

    def __init__(
        self,
        unet,
        vqvae=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        low_res_scheduler=None,
        schedule: dict | None = None,
        prediction_type: str = "epsilon",
        timestep: int | None = None,
        start: str = "lr",
        upscale_factor: int = 4,
        noise_level: int = 20,
        max_noise_level: int = 350,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ):
        super().__init__()
        if (vqvae is None) == (vae is None):
            raise ValueError("A latent super-resolution pipeline needs exactly one autoencoder: vqvae or vae.")
        self.register_modules(
            unet=unet,
            vqvae=vqvae,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            low_res_scheduler=low_res_scheduler,
        )
        tile = tile_size or unet.config.sample_size
        self.register_to_config(
            schedule=schedule or {"kind": "vp", "alphas_cumprod": []},
            prediction_type=prediction_type,
            timestep=timestep,
            start=start,
            upscale_factor=upscale_factor,
            noise_level=noise_level,
            max_noise_level=max_noise_level,
            tile_size=tile,
            tile_overlap=tile // 4 if tile_overlap is None else tile_overlap,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load an exported folder with this (installed) class, without running the copy of this file stored in
        the folder, so no trust_remote_code is needed."""
        folder = str(pretrained_model_name_or_path)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        with open(index_path) as f:
            index = json.load(f)
        dtype = kwargs.pop("torch_dtype", None)
        parts, components = {}, ("unet", "vqvae", "vae", "text_encoder", "tokenizer", "low_res_scheduler")
        for name in components:
            library, class_name = index.get(name) or (None, None)
            if library is None:
                continue
            klass = getattr(importlib.import_module(library), class_name)
            weights = dtype is not None and name not in ("tokenizer", "low_res_scheduler")
            parts[name] = klass.from_pretrained(folder, subfolder=name, **({"torch_dtype": dtype} if weights else {}))
        names = set(inspect.signature(cls.__init__).parameters) - {"self", *components}
        return cls(**parts, **{k: v for k, v in index.items() if k in names})

    # -- the autoencoder ---------------------------------------------------------------------------
    @property
    def autoencoder(self):
        return self.vqvae if self.vqvae is not None else self.vae

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    def _scale(self) -> float:
        """VQ latents are used unscaled (LDMSuperResolutionPipeline); KL latents times the VAE's scaling_factor."""
        return 1.0 if self.vqvae is not None else float(self.vae.config.scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> latents (the posterior mode of a KL autoencoder: deterministic)."""
        ae = self.autoencoder
        images = images.to(ae.device, ae.dtype)
        if self.vqvae is not None:
            return self.vqvae.encode(images).latents.float()
        return self.vae.encode(images).latent_dist.mode().float() * self._scale()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        return ae.decode((latents / self._scale()).to(ae.device, ae.dtype)).sample.float()

    @contextlib.contextmanager
    def _fp32_autoencoder(self):
        """An fp16 autoencoder whose config asks for it (force_upcast, as the SD x4 upscaler's VAE) runs in fp32
        for the call, as diffusers' pipelines upcast it, and is fp16 again afterwards."""
        ae = self.autoencoder
        upcast = ae.dtype == torch.float16 and getattr(ae.config, "force_upcast", False)
        if upcast:
            ae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                ae.to(dtype=torch.float16)

    # -- conditions ------------------------------------------------------------------------------------
    def _low_resolution(self, image) -> torch.Tensor:
        """PIL image(s) or a [0, 1] tensor (C, h, w) / (B, C, h, w) -> (B, 3, h, w) in [-1, 1]."""
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
            if any(im.mode != "RGB" for im in image):
                raise ValueError(
                    "This model super-resolves RGB images; convert the image first: image.convert('RGB')."
                )
            if len({im.size for im in image}) > 1:
                raise ValueError("All images of one call must have the same size; call the pipeline once per size.")
            arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in image])
            lr = torch.from_numpy(arr).permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            lr = image.float()[None] if image.ndim == 3 else image.float()
            if lr.ndim != 4 or lr.shape[1] != 3:
                raise ValueError(
                    f"A tensor image must be (3, h, w) or (B, 3, h, w) in [0, 1]; got {tuple(image.shape)}."
                )
        else:
            raise ValueError(
                f"image must be a PIL image, a list of them, or a [0, 1] tensor; got {type(image).__name__}."
            )
        h, w = lr.shape[-2:]
        s, f, tile = self.config.upscale_factor, self.latent_factor, self.config.tile_size
        down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        for side in (h * s, w * s):
            if side % f or (side // f < tile and (side // f) % down):
                raise ValueError(
                    f"A {w}x{h} image cannot be taken: x{s} gives {w * s}x{h * s}, whose sides must be multiples of "
                    f"{f} (the autoencoder) and, below {tile * f} pixels, of {f * down} (the UNet); crop or pad it."
                )
        return lr * 2 - 1

    def _text(self, prompt, batch: int, device) -> torch.Tensor | None:
        if self.text_encoder is None:
            if prompt:
                raise ValueError("This model takes no prompt (its teacher has no text encoder).")
            return None
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise ValueError(f"Give one prompt, or one per image ({batch}); got {len(prompts)}.")
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return self.text_encoder(ids.input_ids.to(self.text_encoder.device))[0]

    # -- the student -------------------------------------------------------------------------------------
    def _coefficients(self, index: int) -> tuple[float, float]:
        """(a, c) of the VP schedule at an index: sqrt(abar), sqrt(1 - abar) (b = 0)."""
        abar = torch.tensor(self.config.schedule["alphas_cumprod"], dtype=torch.float64)[index]
        return float(abar.sqrt()), float((1 - abar).sqrt())

    def _x0(self, x, lr, text, levels) -> torch.Tensor:
        """One student evaluation on [x, LR] at `timestep`, converted to x0."""
        cfg, unet = self.config, self.unet
        a, c = self._coefficients(cfg.timestep)
        t = torch.full((x.shape[0],), float(cfg.timestep), device=x.device)
        inp = torch.cat([x, lr], dim=1).to(unet.dtype)
        if text is not None:
            out = unet(inp, t, encoder_hidden_states=text.to(unet.dtype), class_labels=levels).sample
        else:
            out = unet(inp, t).sample
        out = out[:, : x.shape[1]].double()
        if cfg.prediction_type == "epsilon":
            return ((x.double() - c * out) / a).float()
        if cfg.prediction_type == "v_prediction":
            return (a * x.double() - c * out).float()
        if cfg.prediction_type == "sample":
            return out.float()
        raise ValueError(f"Unsupported prediction_type {cfg.prediction_type!r} in the pipeline config.")

    def _tiled(self, fn, x: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """fn on overlapping tiles of the latent canvas, blended with linear ramps (weights sum to 1)."""
        H, W = x.shape[-2:]
        tile, overlap = self.config.tile_size, self.config.tile_overlap
        if H <= tile and W <= tile:
            return fn(x, lr)
        out = torch.zeros_like(x, dtype=torch.float32)
        total = torch.zeros(1, 1, H, W, device=x.device)
        for top, h in _spans(H, tile, overlap):
            for left, w in _spans(W, tile, overlap):
                window = (..., slice(top, top + h), slice(left, left + w))
                weight = _ramp(h, overlap, x.device)[:, None] * _ramp(w, overlap, x.device)[None, :]
                out[window] += fn(x[window], lr[window]) * weight
                total[window] += weight
        return out / total

    # -- the call ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str | list[str] = "",
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise_level: int | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """x`upscale_factor` images of `image` (PIL image(s) or a [0, 1] tensor) in one student evaluation and one
        decode. `prompt` and `noise_level` (default: the trained one): upscaler students only."""
        cfg = self.config
        if num_inference_steps not in (None, 1):
            raise ValueError(f"A one-step student takes num_inference_steps=1 (or none); got {num_inference_steps}.")
        if noise_level is not None and self.low_res_scheduler is None:
            raise ValueError("This model takes no noise_level (its teacher reads the low-resolution image as is).")
        level = cfg.noise_level if noise_level is None else noise_level
        if self.low_res_scheduler is not None:
            limit = min(cfg.max_noise_level, (self.unet.config.num_class_embeds or 1) - 1)
            if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= limit:
                raise ValueError(f"noise_level must be an integer in 0..{limit} (this model's range); got {level!r}.")
        device = self._execution_device
        lr = self._low_resolution(image).to(device)
        with self._fp32_autoencoder():
            return self._call(lr, prompt, generator, int(level), output_type, return_dict)

    def _call(self, lr, prompt, generator, level: int, output_type: str, return_dict: bool):
        cfg, device = self.config, lr.device
        B, s, f = lr.shape[0], cfg.upscale_factor, self.latent_factor
        hr_size = (lr.shape[-2] * s, lr.shape[-1] * s)
        grid = (hr_size[0] // f, hr_size[1] // f)
        u = self.encode(F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False))
        eps = randn_tensor(u.shape, generator=generator, device=device, dtype=torch.float32)
        cond = (
            lr if tuple(lr.shape[-2:]) == grid else F.interpolate(lr, size=grid, mode="bicubic", align_corners=False)
        )
        text = self._text(prompt, B, device)
        levels = None
        if self.low_res_scheduler is not None:
            levels = torch.full((B,), level, dtype=torch.long, device=device)
            noise = randn_tensor(cond.shape, generator=generator, device=device, dtype=torch.float32)
            cond = self.low_res_scheduler.add_noise(cond, noise, levels)
        T = len(cfg.schedule["alphas_cumprod"])
        a, c = self._coefficients(T - 1)  # the start state is built at the noisiest index
        x = (a * u + c * eps) if cfg.start == "lr" else c * eps
        z = self._tiled(lambda xt, lt: self._x0(xt, lt, text, levels), x, cond)
        images = (self.decode(z).clamp(-1, 1) / 2 + 0.5).float()
        if output_type == "pt":
            result = images
        else:
            result = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, size) of the tiles along one axis: every `tile - overlap` pixels, the last one flush with the end."""
    if length <= tile:
        return [(0, length)]
    starts = list(range(0, length - tile, max(tile - overlap, 1))) + [length - tile]
    return [(s, tile) for s in starts]


def _ramp(size: int, overlap: int, device) -> torch.Tensor:
    """Blending weights along a tile: rising linearly over `overlap` pixels at both ends, 1 inside, never 0."""
    i = torch.arange(size, device=device, dtype=torch.float32)
    return torch.minimum(torch.ones_like(i), torch.minimum(i + 1, size - i) / (overlap + 1))
