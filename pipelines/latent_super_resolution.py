"""One-step latent super-resolution students of diffusers' latent SR teachers (TAD-SR):
`LDMSuperResolutionPipeline`-shaped (a UNet2DModel on a VQModel latent, the low-resolution image concatenated) and
`StableDiffusionUpscalePipeline`-shaped (a UNet2DConditionModel on an AutoencoderKL latent, the low-resolution
pixels noised by `low_res_scheduler` at `noise_level` concatenated, the noise level as class labels, a prompt).

Self-contained (torch, diffusers, numpy and PIL only; the code shared with the other pipeline files is copied from
onestep/pipelines/common.py, each copy marked `# Copied from`): the export copies this file into the folder, so
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
    """One-step x`upscale_factor` latent super-resolution (the module docstring has the contract).

    `LatentSuperResolutionPipeline.from_pretrained(folder)` loads an export without running its
    latent_super_resolution.py, and still loads it when that file was deleted; `DiffusionPipeline.from_pretrained(
    folder, trust_remote_code=True)` then fails inside diffusers' loader, an error this class cannot intercept
    (from_pretrained says more)."""

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

    def autoencoder_tiles(self) -> tuple[int, int]:
        """(tile, overlap) of the autoencoder's windows, in latent pixels: the size it was trained at (its config's
        sample_size, as diffusers' tiled VAE reads it), at least the UNet's tile, a quarter of it overlapping."""
        size = self.autoencoder.config.sample_size
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        tile = max(size // self.latent_factor, self.config.tile_size, 1)
        return tile, tile // 4

    def encode(self, images: torch.Tensor, progress=None) -> torch.Tensor:
        """[-1, 1] pixels -> latents (the posterior mode of a KL autoencoder: deterministic). Images larger than
        autoencoder_tiles() are encoded in overlapping windows whose latents are blended with linear ramps."""
        f = self.latent_factor
        tile, overlap = self.autoencoder_tiles()
        grid = (images.shape[-2] // f, images.shape[-1] // f)
        return _tile_map(self._encode, (images,), grid, tile, overlap, (f,), 1, progress)

    def decode(self, latents: torch.Tensor, progress=None) -> torch.Tensor:
        """Latents -> [-1, 1] pixels, in overlapping windows blended with linear ramps when larger than a tile."""
        tile, overlap = self.autoencoder_tiles()
        grid = tuple(latents.shape[-2:])
        return _tile_map(self._decode, (latents,), grid, tile, overlap, (1,), self.latent_factor, progress)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        images = images.to(ae.device, ae.dtype)
        if self.vqvae is not None:
            return self.vqvae.encode(images).latents.float()
        return self.vae.encode(images).latent_dist.mode().float() * self._scale()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
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
        """The image(s) to upscale (see __call__) -> (B, 3, h, w) in [-1, 1]."""
        lr = _image_tensor(image, 3)
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
        prompts = [prompt] * batch if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings; got {type(prompt).__name__}.")
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

    # -- tiles ---------------------------------------------------------------------------------------------
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
        """x`upscale_factor` images of `image` in one student evaluation and one decode.

        `image`: PIL RGB image(s), numpy arrays (h, w, 3) or (B, h, w, 3), or tensors (3, h, w) or (B, 3, h, w);
        uint8 pixels (0..255) are divided by 255, so a tensor from torchvision.io.read_image goes in as it is, and
        float pixels must lie in [0, 1] (a float image in [-1, 1], [0, 255] or with NaN/inf is refused). A list of
        equal-size images is one batch; `generator` may be a list with one generator per image. `prompt` and
        `noise_level` (default: the trained one): upscaler students only. `output_type`: "pil", "np" or "pt".

        Large images run in overlapping tiles at every stage, blended with linear ramps: the autoencoder encodes and
        decodes windows of autoencoder_tiles(), the student reads windows of `tile_size` latent pixels, with
        diffusers' progress bar over them (`pipe.set_progress_bar_config(disable=True)` turns it off). Memory: one
        window's activations, plus a few full-size float32 canvases (the bicubic input, the blended output and its
        weights, the conversion to output_type), about 50 bytes per output pixel in all. Measured on the tiny test
        models (a 3-level VQ autoencoder, a 2-level UNet, 128-pixel windows, one CPU thread): a 1024x1024 output from
        256x256 peaks about 55 MB above the resident memory before the call (output_type "pil"; "np": about 36 MB),
        where the whole image in one piece takes about 350 MB; the test suite holds it under 150 MB."""
        cfg = self.config
        _check_output_type(output_type)
        _check_num_inference_steps(num_inference_steps, 1, "a one-step student")
        if noise_level is not None and self.low_res_scheduler is None:
            raise ValueError("This model takes no noise_level (its teacher reads the low-resolution image as is).")
        level = cfg.noise_level if noise_level is None else noise_level
        if self.low_res_scheduler is not None:
            limit = min(cfg.max_noise_level, (self.unet.config.num_class_embeds or 1) - 1)
            if not _is_integer(level) or not 0 <= level <= limit:
                raise ValueError(f"noise_level must be an integer in 0..{limit} (this model's range); got {level!r}.")
        device = self._execution_device
        lr = self._low_resolution(image).to(device)
        generator = _check_generator(generator, lr.shape[0])
        with self._fp32_autoencoder():
            return self._call(lr, prompt, generator, int(level), output_type, return_dict)

    def _call(self, lr, prompt, generator, level: int, output_type: str, return_dict: bool):
        cfg, device = self.config, lr.device
        B, s, f = lr.shape[0], cfg.upscale_factor, self.latent_factor
        grid = (lr.shape[-2] * s // f, lr.shape[-1] * s // f)
        text = self._text(prompt, B, device)
        ae_tiles = _tile_count(grid, *self.autoencoder_tiles())
        counts = [ae_tiles, _tile_count(grid, cfg.tile_size, cfg.tile_overlap), ae_tiles]
        with self._tile_progress(counts) as bar:
            u = self.encode(F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False), bar)
            eps = randn_tensor(u.shape, generator=generator, device=device, dtype=torch.float32)
            cond = (
                lr
                if tuple(lr.shape[-2:]) == grid
                else F.interpolate(lr, size=grid, mode="bicubic", align_corners=False)
            )
            levels = None
            if self.low_res_scheduler is not None:
                levels = torch.full((B,), level, dtype=torch.long, device=device)
                noise = randn_tensor(cond.shape, generator=generator, device=device, dtype=torch.float32)
                cond = self.low_res_scheduler.add_noise(cond, noise, levels)
            T = len(cfg.schedule["alphas_cumprod"])
            a, c = self._coefficients(T - 1)  # the start state is built at the noisiest index
            x = (a * u + c * eps) if cfg.start == "lr" else c * eps
            del u, eps
            z = self._tiled(lambda xt, lt: self._x0(xt, lt, text, levels), x, cond, bar)
            del x
            images = self.decode(z, bar)
        return _images_output(images.clamp_(-1, 1).mul_(0.5).add_(0.5), output_type, return_dict)


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
