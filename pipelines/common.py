"""The code every onestep pipeline file shares, written once.

The pipeline files are self-contained (the export copies one file into a folder that must load where onestep is not
installed), so they cannot import this module. Each holds a copy of what it uses, marked as diffusers marks copies:
`# Copied from onestep.pipelines.common.<name>[.<method>]` on the line before the copy (and its decorators), with an
optional ` with Old->New` renaming. `python -m onestep.testing.copies` lists the copies that drifted from the
originals here; `--fix` rewrites them. Edit the original, then run it with --fix.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image


class SharedPipelineMethods(DiffusionPipeline):
    """The originals of the methods the pipeline classes copy (never instantiated)."""

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

    @property
    def _edm(self) -> bool:
        """An EDM scheduler config (EDMEulerScheduler, ...) marks EDM-preconditioned students."""
        return type(self.scheduler).__name__.startswith("EDM")

    def _edm_sigma(self, t: int) -> torch.Tensor:
        """sigma at index t of the ascending Karras grid the students were trained on (float64; T-1 is sigma_max)."""
        c = self.scheduler.config
        i = torch.arange(c.num_train_timesteps, dtype=torch.float64) / (c.num_train_timesteps - 1)
        top, bottom = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
        return ((top + i * (bottom - top)) ** c.rho).flip(0)[t]

    def _tile_progress(self, counts: list[int]):
        """diffusers' progress bar over a call's tile evaluations (`counts`: the tiles of each pass over the image)
        when some pass takes more than one tile; pipe.set_progress_bar_config(disable=True) turns it off."""
        return self.progress_bar(total=sum(counts)) if max(counts) > 1 else contextlib.nullcontext()

    def _tiled(self, fn, x: torch.Tensor, cond: torch.Tensor, progress=None) -> torch.Tensor:
        """fn(x, cond) on overlapping tiles of the canvas (config tile_size and tile_overlap), blended with linear
        ramps whose weights sum to 1; `progress` (a bar or None) advances once per tile."""
        tile, overlap = self.config.tile_size, self.config.tile_overlap
        return _tile_map(fn, (x, cond), tuple(x.shape[-2:]), tile, overlap, (1, 1), 1, progress)


# -- loading ------------------------------------------------------------------------------------------------


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


def _is_component(value) -> bool:
    """model_index.json's [library, class] entries (null, null: an optional component left out)."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


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


# -- checks of a call's arguments (one sentence each) --------------------------------------------------------


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_output_type(output_type, allowed: tuple[str, ...] = ("pil", "np", "pt")) -> None:
    if not isinstance(output_type, str) or output_type not in allowed:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, allowed))}; got {output_type!r}.")


def _check_batch_size(batch_size, given: int | None = None, what: str = "class labels") -> int:
    """The number of images: one per given condition (`given` of them), else batch_size (default 1)."""
    if batch_size is None:
        return 1 if given is None else given
    if not _is_integer(batch_size):
        raise TypeError(f"batch_size must be an integer; got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    if given is not None and batch_size != given:
        raise ValueError(f"batch_size={batch_size} does not match the {given} {what} given; leave batch_size out.")
    return int(batch_size)


def _check_class_labels(class_labels, num_classes: int) -> torch.Tensor:
    """An integer, a list of them, or an integer array or tensor -> a 1-D long tensor of labels in 0..num_classes-1
    (a float such as 3.5 is refused, not rounded)."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"class_labels must be integers; got a {labels.dtype} {type(class_labels).__name__}: convert it with "
                f".long() (or .astype(int)) after checking its values."
            )
        if labels.ndim > 1:
            raise ValueError(f"class_labels must be one label per image (1-D); got shape {tuple(labels.shape)}.")
        labels = labels.long().reshape(-1)
    else:
        items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
        bad = [c for c in items if not _is_integer(c)]
        if bad:
            raise TypeError(f"class_labels must be integers (an int or a list of ints); got {bad[0]!r}.")
        labels = torch.tensor([int(c) for c in items], dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError(
            "class_labels is empty; give one label per image, or leave it out (random labels, batch_size images)."
        )
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        raise ValueError(f"class_labels must lie in 0..{num_classes - 1}; got {int(outside[0])}.")
    return labels


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


def _check_latents(latents, shape: tuple[int, ...]):
    """None, or a float tensor of exactly `shape` (the unit noise of every image)."""
    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        what = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise TypeError(f"latents must be a float torch.Tensor of shape {tuple(shape)}; got {what}.")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"latents must have shape {tuple(shape)}, one {'x'.join(map(str, shape[1:]))} noise per image; got "
            f"{tuple(latents.shape)}."
        )
    return latents


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


def _images_output(images: torch.Tensor, output_type: str, return_dict: bool):
    """[0, 1] images (B, C, H, W) as output_type asks: "pt" as they are, "np" (B, H, W, C) float32 arrays, "pil"
    a list of PIL images."""
    if output_type != "pt":
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images = DiffusionPipeline.numpy_to_pil(images)
    return ImagePipelineOutput(images=images) if return_dict else (images,)


# -- super-resolution inputs ---------------------------------------------------------------------------------


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


# -- tiles -------------------------------------------------------------------------------------------------


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


def _tile_count(grid, tile: int, overlap: int) -> int:
    """How many windows _tile_map takes on a (H, W) grid."""
    return len(_spans(grid[0], tile, overlap)) * len(_spans(grid[1], tile, overlap))


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
