"""Super-resolution with a UNet that reads [x, u] on its channels (u = the bicubic-upsampled low-resolution image):
TAD-SR and OFTSR one-step students, and the multi-step teachers they were distilled from.

Self-contained (torch + diffusers only): the export copies this file into the folder, so
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works where onestep is not installed.

The sampling contract lives in model_index.json: the noise schedule of the affine family
x_t = a_t x0 + b_t u + c_t eps (`schedule`: ResShift, a conditional rectified flow, or VP), the network's
prediction type, and the mode:
    one_step   x_T = (a_T + b_T) u + c_T eps (or c_T eps) at T, one network call at `timestep` -> x0  (TAD-SR)
    sampler    deterministic DDIM over num_inference_steps of the schedule from that start          (teachers)
    velocity   x0 = sqrt(1 - sigma_p^2) u + sigma_p eps, x = x0 + v(x0, t), t in [0, 1] the knob    (OFTSR)
Inputs larger than the training size (`tile_size`, high-resolution pixels) are processed in overlapping tiles
blended with linear ramps; the noise is drawn once for the whole image, so overlapping tiles see the same noise.
"""

from __future__ import annotations

import inspect
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

MODES = ("one_step", "sampler", "velocity")


class SuperResolutionPipeline(DiffusionPipeline):
    def __init__(
        self,
        unet,
        schedule: dict | None = None,
        prediction_type: str = "sample",
        mode: str = "one_step",
        timestep: int | None = None,
        start: str = "lr",
        upscale_factor: int = 4,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        default_t: float = 1.0,
        output_scale: float = 1.0,
        velocity_sign: float = -1.0,
        num_inference_steps: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.register_modules(unet=unet)
        tile = tile_size or unet.config.sample_size
        self.register_to_config(
            schedule=schedule or {"kind": "conditional_flow", "sigma_p": 0.2, "num_timesteps": 1000},
            prediction_type=prediction_type,
            mode=mode,
            timestep=timestep,
            start=start,
            upscale_factor=upscale_factor,
            tile_size=tile,
            tile_overlap=tile // 8 if tile_overlap is None else tile_overlap,
            default_t=default_t,
            output_scale=output_scale,
            velocity_sign=velocity_sign,  # this project's flow networks output start - data = -(OFTSR's velocity)
            num_inference_steps=num_inference_steps,  # sampler mode's default (None: every step of the schedule)
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load an exported folder with this (installed) class, without running the copy of this file stored in
        the folder, so no trust_remote_code is needed."""
        folder = str(pretrained_model_name_or_path)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        import diffusers

        with open(index_path) as f:
            index = json.load(f)
        dtype = kwargs.pop("torch_dtype", None)
        unet = getattr(diffusers, index["unet"][1]).from_pretrained(
            folder, subfolder="unet", **({"torch_dtype": dtype} if dtype else {})
        )
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "unet"}
        return cls(unet=unet, **{k: v for k, v in index.items() if k in names})

    # -- the schedule --------------------------------------------------------------------------------
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, c, model time) per schedule index, float64."""
        s = self.config.schedule
        if s["kind"] == "resshift":
            eta = torch.tensor(s["etas"], dtype=torch.float64)
            return 1 - eta, eta, s["kappa"] * eta.sqrt(), torch.arange(len(eta), dtype=torch.float64)
        if s["kind"] == "conditional_flow":
            T, p = s["num_timesteps"], s["sigma_p"]
            r = torch.arange(1, T + 1, dtype=torch.float64) / T
            return 1 - r, r * math.sqrt(1 - p**2), r * p, (1 - r) * 999
        if s["kind"] == "vp":
            abar = torch.tensor(s["alphas_cumprod"], dtype=torch.float64)
            return abar.sqrt(), torch.zeros_like(abar), (1 - abar).sqrt(), torch.arange(len(abar), dtype=torch.float64)
        raise ValueError(f"Unknown schedule kind {s['kind']!r} in the pipeline config.")

    def _input_scale(self, index: int) -> float:
        s = self.config.schedule
        if s["kind"] == "resshift" and s.get("scale_input"):
            return 1 / math.sqrt(s["kappa"] ** 2 * s["etas"][index] + 1)
        return 1.0

    def _net(self, x: torch.Tensor, time: float, u: torch.Tensor) -> torch.Tensor:
        """The network's native output for [x, u] at model time `time`."""
        t = torch.full((x.shape[0],), float(time), device=x.device, dtype=torch.float32)
        inp = torch.cat([x, u], dim=1).to(self.unet.dtype)
        return self.unet(inp, t).sample[:, : x.shape[1]].float()

    def _to_x0(self, out, x, u, a, b, c):
        kind = self.config.prediction_type
        if kind == "sample":
            return out
        if kind == "epsilon":
            return ((x.double() - b * u.double() - c * out.double()) / a).float()
        if kind == "v_prediction":
            return (a * x.double() - c * out.double()).float()
        if kind == "flow":  # x0 = x_t - (1 - a) v, v = start - data
            return (x.double() - (1 - a) * out.double()).float()
        raise ValueError(f"Unsupported prediction_type {kind!r} in the pipeline config.")

    def _x0(self, x: torch.Tensor, u: torch.Tensor, index: int, tables) -> torch.Tensor:
        a, b, c, times = (float(v[index]) for v in tables)
        scale = self._input_scale(index)
        return self._tiled(lambda xt, ut: self._to_x0(self._net(xt * scale, times, ut), xt, ut, a, b, c), x, u)

    # -- tiles -----------------------------------------------------------------------------------------
    def _tiled(self, fn, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """fn on overlapping tiles of the high-resolution canvas, blended with linear ramps (weights sum to 1)."""
        H, W = x.shape[-2:]
        tile, overlap = self.config.tile_size, self.config.tile_overlap
        if H <= tile and W <= tile:
            return fn(x, u)
        out = torch.zeros_like(x, dtype=torch.float32)
        total = torch.zeros(1, 1, H, W, device=x.device)
        for top, h in _spans(H, tile, overlap):
            for left, w in _spans(W, tile, overlap):
                window = (..., slice(top, top + h), slice(left, left + w))
                weight = _ramp(h, overlap, x.device)[:, None] * _ramp(w, overlap, x.device)[None, :]
                out[window] += fn(x[window], u[window]).float() * weight
                total[window] += weight
        return out / total

    # -- inputs ----------------------------------------------------------------------------------------
    def _low_resolution(self, image) -> torch.Tensor:
        """PIL image(s) or a [0, 1] tensor (C, h, w) / (B, C, h, w) -> (B, C, h, w) in [-1, 1]."""
        channels = self.unet.config.in_channels // 2  # the UNet reads [x, u], both of the image's channels
        want = {1: "L", 3: "RGB"}.get(channels)
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
            for im in image:
                if im.mode != want:
                    what = {"L": "grayscale", "RGBA": "RGBA (with transparency)", "LA": "grayscale with alpha"}
                    raise ValueError(
                        f"The image is {what.get(im.mode, im.mode)}, but this model super-resolves {want} images; "
                        f"convert it first, e.g. image.convert({want!r})."
                    )
            if len({im.size for im in image}) > 1:
                raise ValueError("All images of one call must have the same size; call the pipeline once per size.")
            arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in image])
            lr = torch.from_numpy(arr.reshape(*arr.shape[:3], -1)).permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            lr = image.float()[None] if image.ndim == 3 else image.float()
            if lr.ndim != 4 or lr.shape[1] != channels:
                raise ValueError(
                    f"A tensor image must be (C, h, w) or (B, C, h, w) with C = {channels}; got {tuple(image.shape)}."
                )
        else:
            raise ValueError(
                f"image must be a PIL image, a list of them, or a [0, 1] tensor; got {type(image).__name__}."
            )
        h, w = lr.shape[-2:]
        scale, tile = self.config.upscale_factor, self.config.tile_size
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        for side in (h * scale, w * scale):
            if side < tile and side % factor:
                raise ValueError(
                    f"A {w}x{h} image cannot be taken: x{scale} gives {w * scale}x{h * scale}, and a side smaller than "
                    f"the {tile}-pixel tile must be a multiple of {factor} (the UNet's downsampling); crop or pad it."
                )
        if min(h, w) < 2:
            raise ValueError(f"A {w}x{h} image is too small to upsample; give at least 2x2 pixels.")
        return lr * 2 - 1

    # -- the call --------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image,
        generator: torch.Generator | list[torch.Generator] | None = None,
        t: float | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """x`upscale_factor` images of `image` (PIL image(s) or a [0, 1] tensor). `t` (velocity mode, OFTSR): the
        fidelity (0) - realism (1) knob, default `default_t`. `num_inference_steps`: sampler mode only (default:
        every step of the schedule)."""
        cfg = self.config
        if t is not None and cfg.mode != "velocity":
            raise ValueError(f"This {cfg.mode} pipeline has no t knob; call it without t.")
        t = cfg.default_t if t is None else float(t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1] (0 = fidelity, 1 = realism); got {t}.")
        if cfg.mode != "sampler" and num_inference_steps not in (None, 1):
            raise ValueError(f"A one-step student takes num_inference_steps=1 (or none); got {num_inference_steps}.")
        device = self._execution_device
        lr = self._low_resolution(image).to(device)
        u = F.interpolate(lr, scale_factor=cfg.upscale_factor, mode="bicubic", align_corners=False)
        eps = randn_tensor(u.shape, generator=generator, device=device, dtype=torch.float32)
        tables = self._tables()
        T = len(tables[0])
        if cfg.mode == "velocity":
            p = cfg.schedule["sigma_p"]
            x0 = math.sqrt(1 - p**2) * u + p * eps
            v = self._tiled(lambda xt, ut: cfg.velocity_sign * self._net(xt, t * 999, ut), x0, u)
            x = x0 + cfg.output_scale * v
        else:
            n = num_inference_steps or cfg.num_inference_steps or T
            steps = _trailing(T, n) if cfg.mode == "sampler" else [cfg.timestep]
            if not 1 <= n <= T:
                raise ValueError(f"num_inference_steps must lie in 1..{T}; got {num_inference_steps}.")
            # The start state is built at the noisiest index even when a student is called at another timestep.
            a, b, c, _ = (float(v[steps[0] if cfg.mode == "sampler" else T - 1]) for v in tables)
            x = (a + b) * u + c * eps if cfg.start == "lr" else c * eps
            for i, index in enumerate(steps):
                x0 = self._x0(x, u, index, tables)
                if i + 1 < len(steps):
                    a_t, b_t, c_t, _ = (float(v[index]) for v in tables)
                    a_s, b_s, c_s, _ = (float(v[steps[i + 1]]) for v in tables)
                    x = a_s * x0 + b_s * u + (c_s / c_t) * (x - a_t * x0 - b_t * u)
            x = x0
        images = (x.clamp(-1, 1) / 2 + 0.5).float()
        if output_type == "pt":
            result = images
        else:
            result = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def _trailing(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' trailing spacing: the first step at the noisiest index T-1."""
    step = num_timesteps / num_steps
    return [int(round(num_timesteps - i * step)) - 1 for i in range(num_steps)]


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
