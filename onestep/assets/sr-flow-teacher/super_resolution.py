"""Super-resolution with a UNet that reads [x, u] on its channels (u = the bicubic-upsampled low-resolution image):
TAD-SR and OFTSR one-step students, and the multi-step teachers they were distilled from.

Self-contained (torch, diffusers, numpy and PIL only; the code shared with the other pipeline files is copied from
onestep/pipelines/common.py, each copy marked `# Copied from`): the export copies this file into the folder, so
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

import contextlib
import importlib
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
    """x`upscale_factor` super-resolution with a UNet that reads [x, u] (the module docstring has the contract).

    `SuperResolutionPipeline.from_pretrained(folder)` loads an export without running its super_resolution.py, and
    still loads it when that file was deleted; `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
    then fails inside diffusers' loader, an error this class cannot intercept (from_pretrained says more)."""

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

    # Copied from onestep.pipelines.common.SharedPipelineMethods.from_pretrained
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder this class saved (`save_pretrained`, or onestep's export) with this installed class, without
        running the pipeline file the folder ships: no trust_remote_code is needed.

        Components load from their sub-folders; `torch_dtype` (or `dtype`), `variant`, `use_safetensors` and
        `low_cpu_mem_usage` apply to those with weights, and a keyword naming a component or a config entry replaces
        the folder's. The hub's download options are ignored (the folder is local); a path without model_index.json
        (a hub id) goes to diffusers' own from_pretrained. A folder whose model_index.json names another pipeline
        class is refused with the class that loads it.

        A folder whose shipped pipeline file was deleted still loads here. `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` cannot load it, and fails inside diffusers' own loader with an error that does not
        name the missing file (diffusers 0.42: "TypeError: attribute name must be string, not 'list'"), where this
        class cannot intercept it: load such a folder with this class, or copy the file from onestep/pipelines/ back.
        """
        return cls._load_pretrained(pretrained_model_name_or_path, **kwargs)

    # Copied from onestep.pipelines.common.SharedPipelineMethods._load_pretrained
    @classmethod
    def _load_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """from_pretrained's work (see there), for classes that add a step after loading."""
        folder = os.fspath(pretrained_model_name_or_path)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        with open(index_path) as f:
            index = json.load(f)
        _refuse_other_pipeline(index, cls, folder)
        torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        dtype = dtype if torch_dtype is None else torch_dtype
        options = ("variant", "use_safetensors", "low_cpu_mem_usage")
        weights = {"torch_dtype": dtype, **{k: kwargs.pop(k, None) for k in options}}
        weights = {k: v for k, v in weights.items() if v is not None}
        hub = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "trust_remote_code")
        for option in hub:  # nothing to fetch: the folder is local
            kwargs.pop(option, None)
        params = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got the unexpected keyword argument(s) {', '.join(unknown)}; it "
                f"takes the pipeline's components and config entries ({', '.join(params)}) and torch_dtype, "
                f"{', '.join(options)}."
            )
        init = {}
        for name in params:
            value = kwargs[name] if name in kwargs else index.get(name, inspect.Parameter.empty)
            if name not in kwargs and _is_component(value):
                value = _load_component(folder, name, value, weights)
            if value is not inspect.Parameter.empty:
                init[name] = value
        pipe = cls(**init)
        pipe.register_to_config(_name_or_path=folder)  # as diffusers' from_pretrained records it
        return pipe

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

    def _x0(self, x: torch.Tensor, u: torch.Tensor, index: int, tables, progress=None) -> torch.Tensor:
        a, b, c, times = (float(v[index]) for v in tables)
        scale = self._input_scale(index)
        fn = lambda xt, ut: self._to_x0(self._net(xt * scale, times, ut), xt, ut, a, b, c)
        return self._tiled(fn, x, u, progress)

    # -- tiles -----------------------------------------------------------------------------------------
    # Copied from onestep.pipelines.common.SharedPipelineMethods._tile_progress
    def _tile_progress(self, counts: list[int]):
        """diffusers' progress bar over a call's tile evaluations (`counts`: the tiles of each pass over the image)
        when some pass takes more than one tile; pipe.set_progress_bar_config(disable=True) turns it off."""
        return self.progress_bar(total=sum(counts)) if max(counts) > 1 else contextlib.nullcontext()

    # Copied from onestep.pipelines.common.SharedPipelineMethods._tiled
    def _tiled(self, fn, x: torch.Tensor, cond: torch.Tensor, progress=None) -> torch.Tensor:
        """fn(x, cond) on overlapping tiles of the canvas (config tile_size and tile_overlap), blended with linear
        ramps whose weights sum to 1; `progress` (a bar or None) advances once per tile."""
        tile, overlap = self.config.tile_size, self.config.tile_overlap
        return _tile_map(fn, (x, cond), tuple(x.shape[-2:]), tile, overlap, (1, 1), 1, progress)

    # -- inputs ----------------------------------------------------------------------------------------
    def _low_resolution(self, image) -> torch.Tensor:
        """The image(s) to upscale (see __call__) -> (B, C, h, w) in [-1, 1], C the image channels the UNet reads."""
        lr = _image_tensor(image, self.unet.config.in_channels // 2)  # the UNet reads [x, u]
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

    def _knob(self, t) -> float:
        """OFTSR's t: a number in [0, 1], default default_t (velocity mode only)."""
        if t is None:
            return float(self.config.default_t)
        if self.config.mode != "velocity":
            raise ValueError(f"This {self.config.mode} pipeline has no t knob; call it without t.")
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point():
            t = t.item()
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
            shown = repr(t) if isinstance(t, (str, list, tuple)) else type(t).__name__
            raise TypeError(f"t must be one number in [0, 1] (0 = fidelity, 1 = realism); got {shown:.40}.")
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"t must lie in [0, 1] (0 = fidelity, 1 = realism); got {t}.")
        return float(t)

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
        """x`upscale_factor` images of `image`.

        `image`: PIL image(s) (RGB, or L for a one-channel model), numpy arrays (h, w, C) or (B, h, w, C), or
        tensors (C, h, w) or (B, C, h, w); uint8 pixels (0..255) are divided by 255, so a tensor from
        torchvision.io.read_image goes in as it is, and float pixels must lie in [0, 1] (a float image in [-1, 1],
        [0, 255] or with NaN/inf is refused, not guessed at). A list of equal-size images is one batch; `generator`
        may be a list with one generator per image. `t` (velocity mode, OFTSR): the fidelity (0) - realism (1)
        knob, default `default_t`. `num_inference_steps`: sampler mode only (default: the config's, else every step
        of the schedule). `output_type`: "pil", "np" or "pt".

        An output larger than `tile_size` runs in overlapping tiles, with diffusers' progress bar over them
        (`pipe.set_progress_bar_config(disable=True)` turns it off)."""
        cfg = self.config
        _check_output_type(output_type)
        t = self._knob(t)
        tables = self._tables()
        T = len(tables[0])
        if cfg.mode == "sampler":
            n = _check_num_inference_steps(num_inference_steps, T, f"the {T} steps of the schedule")
            n = n or cfg.num_inference_steps or T
        else:
            _check_num_inference_steps(num_inference_steps, 1, "a one-step student")
        device = self._execution_device
        lr = self._low_resolution(image).to(device)
        generator = _check_generator(generator, lr.shape[0])
        u = F.interpolate(lr, scale_factor=cfg.upscale_factor, mode="bicubic", align_corners=False)
        eps = randn_tensor(u.shape, generator=generator, device=device, dtype=torch.float32)
        tiles = _tile_count(tuple(u.shape[-2:]), cfg.tile_size, cfg.tile_overlap)
        if cfg.mode == "velocity":
            p = cfg.schedule["sigma_p"]
            x0 = math.sqrt(1 - p**2) * u + p * eps
            with self._tile_progress([tiles]) as bar:
                v = self._tiled(lambda xt, ut: cfg.velocity_sign * self._net(xt, t * 999, ut), x0, u, bar)
            x = x0 + cfg.output_scale * v
        else:
            steps = _trailing(T, n) if cfg.mode == "sampler" else [cfg.timestep]
            # The start state is built at the noisiest index even when a student is called at another timestep.
            a, b, c, _ = (float(v[steps[0] if cfg.mode == "sampler" else T - 1]) for v in tables)
            x = (a + b) * u + c * eps if cfg.start == "lr" else c * eps
            with self._tile_progress([tiles] * len(steps)) as bar:
                for i, index in enumerate(steps):
                    x0 = self._x0(x, u, index, tables, bar)
                    if i + 1 < len(steps):
                        a_t, b_t, c_t, _ = (float(v[index]) for v in tables)
                        a_s, b_s, c_s, _ = (float(v[steps[i + 1]]) for v in tables)
                        x = a_s * x0 + b_s * u + (c_s / c_t) * (x - a_t * x0 - b_t * u)
            x = x0
        return _images_output((x.clamp(-1, 1) / 2 + 0.5).float(), output_type, return_dict)


def _trailing(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' trailing spacing: the first step at the noisiest index T-1."""
    step = num_timesteps / num_steps
    return [int(round(num_timesteps - i * step)) - 1 for i in range(num_steps)]


# Copied from onestep.pipelines.common._refuse_other_pipeline
def _refuse_other_pipeline(index: dict, cls, folder: str) -> None:
    """A folder saved by another pipeline class is refused in one sentence that names the class to load it with."""
    named = index.get("_class_name")
    module, name = named if isinstance(named, list) and len(named) == 2 else (None, named)
    if not isinstance(name, str) or name in {k.__name__ for k in cls.__mro__}:
        return
    ours = {
        "OneStepPipeline": "onestep.pipelines.OneStepPipeline",
        "MultiStudentPipeline": "onestep.pipelines.MultiStudentPipeline",
        "SuperResolutionPipeline": "onestep.pipelines.SuperResolutionPipeline",
        "LatentSuperResolutionPipeline": "onestep.pipelines.LatentSuperResolutionPipeline",
        "BootPipeline": "onestep.pipelines.boot.BootPipeline",
    }
    if name in ours:
        remote = "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
        how = f"{ours[name]}.from_pretrained(folder) or {remote}"
    elif module is None:  # a stock diffusers class, maybe with a shipped component (BOOT's scheduler)
        custom = [v for k, v in index.items() if not k.startswith("_") and _is_component(v)]
        custom = any(library not in (None, "diffusers", "transformers") for library, _ in custom)
        how = f"DiffusionPipeline.from_pretrained(folder{', trust_remote_code=True' if custom else ''})"
    else:
        how = f"DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) if you trust its {module}.py"
    raise ValueError(f"{folder} holds a {name}, not a {cls.__name__}; load it with {how}.")


# Copied from onestep.pipelines.common._is_component
def _is_component(value) -> bool:
    """model_index.json's [library, class] entries (null, null: an optional component left out)."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


# Copied from onestep.pipelines.common._load_component
def _load_component(folder: str, name: str, entry: list, weights: dict):
    """One component from its sub-folder. Classes come from diffusers, transformers or this very file (a scheduler
    such as BootScheduler): never from code in the folder."""
    library, class_name = entry
    if library is None:
        return None
    if library in ("diffusers", "transformers"):
        klass = getattr(importlib.import_module(library), class_name)
    elif library == __name__.rsplit(".", 1)[-1] and isinstance(globals().get(class_name), type):
        klass = globals()[class_name]
    else:
        raise ValueError(
            f"{folder}/model_index.json names its {name} as {library}.{class_name}, which only code shipped in the "
            f"folder defines; load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) if you "
            f"trust that code."
        )
    return klass.from_pretrained(os.path.join(folder, name), **(weights if hasattr(klass, "dtype") else {}))


# Copied from onestep.pipelines.common._is_integer
def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# Copied from onestep.pipelines.common._check_output_type
def _check_output_type(output_type, allowed: tuple[str, ...] = ("pil", "np", "pt")) -> None:
    if not isinstance(output_type, str) or output_type not in allowed:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, allowed))}; got {output_type!r}.")


# Copied from onestep.pipelines.common._check_generator
def _check_generator(generator, count: int):
    """None, one torch.Generator, or a list of exactly one per image (returned as a list, as randn_tensor takes)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != count:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {count} images; give one per image, or "
                f"a single generator."
            )
        return list(generator)
    raise TypeError(
        f"generator must be a torch.Generator or a list of them, one per image; got {type(generator).__name__}."
    )


# Copied from onestep.pipelines.common._check_num_inference_steps
def _check_num_inference_steps(num_inference_steps, maximum: int, why: str) -> int | None:
    """None (the pipeline's default) or an integer in 1..maximum; `why` says where the maximum comes from. 0 or a
    negative count is refused, not read as "the default"."""
    if num_inference_steps is None:
        return None
    if not _is_integer(num_inference_steps):
        raise TypeError(f"num_inference_steps must be an integer; got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= maximum:
        raise ValueError(f"num_inference_steps must be between 1 and {maximum} ({why}); got {num_inference_steps}.")
    return int(num_inference_steps)


# Copied from onestep.pipelines.common._images_output
def _images_output(images: torch.Tensor, output_type: str, return_dict: bool):
    """[0, 1] images (B, C, H, W) as output_type asks: "pt" as they are, "np" (B, H, W, C) float32 arrays, "pil"
    a list of PIL images."""
    if output_type != "pt":
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images = DiffusionPipeline.numpy_to_pil(images)
    return ImagePipelineOutput(images=images) if return_dict else (images,)


# Copied from onestep.pipelines.common._image_tensor
def _image_tensor(image, channels: int) -> torch.Tensor:
    """The image(s) to upscale as a float32 (B, C, h, w) tensor in [0, 1]. Takes PIL images (RGB, or L for one
    channel), numpy arrays (h, w, C) or (B, h, w, C) and tensors (C, h, w) or (B, C, h, w), each uint8 (divided by
    255: a tensor from torchvision.io.read_image, an array from imageio) or float in [0, 1], or a list of them of one
    size. A float image in another range ([-1, 1], [0, 255]) or with NaN or inf is refused, not rescaled."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("image is an empty list; give at least one image.")
    parts = [_one_image(item, channels) for item in items]
    if len({tuple(p.shape[-2:]) for p in parts}) > 1:
        raise ValueError("All images of one call must have the same size; call the pipeline once per size.")
    return torch.cat(parts)


# Copied from onestep.pipelines.common._one_image
def _one_image(image, channels: int) -> torch.Tensor:
    want = {1: "L", 3: "RGB"}.get(channels)
    if isinstance(image, Image.Image):
        if image.mode != want:
            what = {"L": "grayscale", "RGBA": "RGBA (with transparency)", "LA": "grayscale with alpha"}
            raise ValueError(
                f"The image is {what.get(image.mode, image.mode)}, but this model super-resolves {want} images; "
                f"convert it first, e.g. image.convert({want!r})."
            )
        array = np.asarray(image)
        return _unit_range(torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)[None], "PIL")
    if isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 and channels == 1 else image
        array = array[None] if array.ndim == 3 else array
        if array.ndim != 4 or array.shape[-1] != channels:
            raise ValueError(
                f"A numpy image must be (h, w, C) or (B, h, w, C) with C = {channels}; got shape {image.shape}."
            )
        if array.dtype.kind not in "uf":
            raise TypeError(f"A numpy image must be uint8 (0..255) or float in [0, 1]; got {array.dtype}.")
        return _unit_range(torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2), "numpy")
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tensor.shape[1] != channels:
            raise ValueError(
                f"A tensor image must be (C, h, w) or (B, C, h, w) with C = {channels}; got {tuple(image.shape)}."
            )
        return _unit_range(tensor.detach().cpu(), "tensor")
    raise TypeError(
        f"image must be a PIL image, a numpy array, a tensor or a list of them; got {type(image).__name__}."
    )


# Copied from onestep.pipelines.common._unit_range
def _unit_range(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 pixels / 255; float pixels as they are, once checked to be finite and in [0, 1]."""
    if pixels.numel() == 0:
        raise ValueError(f"The {kind} image has no pixels (shape {tuple(pixels.shape)}); give at least 2x2 of them.")
    if pixels.dtype == torch.uint8:
        return pixels.float() / 255
    if not pixels.is_floating_point():
        raise TypeError(f"A {kind} image must be uint8 (0..255) or float in [0, 1]; got {pixels.dtype}.")
    pixels = pixels.float()
    if not torch.isfinite(pixels).all():
        raise ValueError(
            f"The {kind} image holds NaN or infinite values; give float32 pixels in [0, 1] or uint8 ones."
        )
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"A float {kind} image must lie in [0, 1] (or be uint8, 0..255); got values in [{low:.3g}, {high:.3g}], "
            f"so rescale it first, e.g. (x + 1) / 2 for [-1, 1] or x / 255 for [0, 255]."
        )
    return pixels


# Copied from onestep.pipelines.common._tile_map
def _tile_map(fn, tensors, grid, tile: int, overlap: int, scales, out_scale: int = 1, progress=None) -> torch.Tensor:
    """fn(*windows) on overlapping windows of a (H, W) grid, blended with linear ramps (the weights sum to 1).
    tensors[i] has scales[i] pixels per grid cell and fn's output out_scale (an encoder: the grid is its output's,
    its input at the autoencoder's factor; a decoder: the reverse). Windows are `tile` cells, one every
    `tile - overlap`, the last flush with the end; `progress` (a bar or None) advances once per window."""
    H, W = grid
    if H <= tile and W <= tile:
        out = fn(*tensors)
        if progress is not None:
            progress.update()
        return out
    out = total = None
    k = out_scale
    for top, h in _spans(H, tile, overlap):
        for left, w in _spans(W, tile, overlap):
            parts = [t[..., top * s : (top + h) * s, left * s : (left + w) * s] for t, s in zip(tensors, scales)]
            y = fn(*parts).float()
            if out is None:
                out = y.new_zeros(*y.shape[:-2], H * k, W * k)
                total = y.new_zeros(1, 1, H * k, W * k)
            weight = _ramp(h * k, overlap * k, y.device)[:, None] * _ramp(w * k, overlap * k, y.device)[None, :]
            window = (..., slice(top * k, (top + h) * k), slice(left * k, (left + w) * k))
            out[window] += y * weight
            total[window] += weight
            if progress is not None:
                progress.update()
    return out.div_(total)


# Copied from onestep.pipelines.common._tile_count
def _tile_count(grid, tile: int, overlap: int) -> int:
    """How many windows _tile_map takes on a (H, W) grid."""
    return len(_spans(grid[0], tile, overlap)) * len(_spans(grid[1], tile, overlap))


# Copied from onestep.pipelines.common._spans
def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, size) of the tiles along one axis: every `tile - overlap` pixels, the last one flush with the end."""
    if length <= tile:
        return [(0, length)]
    starts = list(range(0, length - tile, max(tile - overlap, 1))) + [length - tile]
    return [(s, tile) for s in starts]


# Copied from onestep.pipelines.common._ramp
def _ramp(size: int, overlap: int, device) -> torch.Tensor:
    """Blending weights along a tile: rising linearly over `overlap` pixels at both ends, 1 inside, never 0."""
    i = torch.arange(size, device=device, dtype=torch.float32)
    return torch.minimum(torch.ones_like(i), torch.minimum(i + 1, size - i) / (overlap + 1))
