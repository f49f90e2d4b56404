"""BOOT students (Gu et al. 2023): one network evaluation, no noise schedule at sampling time.

Self-contained (torch, diffusers, numpy and PIL only; the code shared with the other pipeline files is copied from
onestep/pipelines/common.py, each copy marked `# Copied from`): the export copies this file into the student folder
(the pipeline class at its root, the scheduler in scheduler/), so `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` works where onestep is not installed.

The sampling contract lives in BootScheduler's config. The student's network is told `embed_timestep` (the
clean end's label: 0, or EDM's c_noise of the smallest sigma), while its output is converted with the
coefficients of the fixed timestep it was parametrised at (`param_timestep`: the noise end unless a preset chose
another):

    x = input_scale * z,    x0 = skip * x + output_scale * U(input_gain * x, embed_timestep)

(eps teachers: skip = 1/alpha_T, output_scale = -sigma_T/alpha_T). A stock scheduler (DDIM, LCM) converts with
the same timestep it feeds the network, which is wrong for BOOT and would silently give other images.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class BootScheduler(SchedulerMixin, ConfigMixin):
    """One step from pure noise to x0 with a BOOT student's fixed conversion (see the module docstring). The
    remaining fields record where the numbers came from (teacher parametrisation, noise-end timestep, alpha, sigma)."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        embed_timestep: float = 0.0,
        input_scale: float = 1.0,
        input_gain: float = 1.0,
        skip: float = 0.0,
        output_scale: float = 1.0,
        prediction_type: str = "sample",
        param_timestep: int = 999,
        alpha: float = 1.0,
        sigma: float = 0.0,
        num_train_timesteps: int = 1000,
    ):
        self.init_noise_sigma = input_scale
        self.set_timesteps(1)

    def set_timesteps(self, num_inference_steps: int | None = 1, device=None, sigmas=None, mu=None, **kwargs):
        """One step at `embed_timestep`. StableDiffusion3Pipeline and FluxPipeline also pass their noise levels
        (`sigmas`: Flux's linspace(1, 1/n, n)) and resolution-dependent shift (`mu`); a BOOT student converts with
        fixed numbers instead, so both are ignored, but n noise levels are n steps and refused as such."""
        steps = num_inference_steps if sigmas is None else len(sigmas)
        if steps not in (None, 1):
            raise ValueError(
                f"A BOOT student samples in one step (BOOT has no multi-step sampler): call it with "
                f"num_inference_steps=1, not {steps}."
            )
        self.num_inference_steps = 1
        self.timesteps = torch.tensor([self.config.embed_timestep], dtype=torch.float32, device=device)

    def set_begin_index(self, begin_index: int = 0):
        """FluxPipeline sets where its loop starts; there is one step."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample * self.config.input_gain

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """x0 from the network output and the noise it read, in float64 (skip is 1/alpha_T = 14.6 for SD)."""
        c = self.config
        x0 = (c.skip * sample.double() + c.output_scale * model_output.double()).to(sample.dtype)
        return SchedulerOutput(prev_sample=x0) if return_dict else (x0,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class BootPipeline(DiffusionPipeline):
    """A BOOT student of a pixel UNet2DModel teacher, unconditional or class-conditional: z -> x0 in one step.

    `BootPipeline.from_pretrained(folder)` loads an export without running its boot.py (BootScheduler included), and
    still loads it when that file was deleted; `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
    then fails inside diffusers' loader, an error this class cannot intercept (from_pretrained says more)."""

    def __init__(self, unet, scheduler: BootScheduler, num_classes: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # num_classes: the real classes (a teacher trained for CFG also embeds a null class after them).
        self.register_to_config(num_classes=num_classes if num_classes is not None else unet.config.num_class_embeds)

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

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images in one step. `class_labels` (class-conditional students) sets the batch size;
        otherwise `batch_size` (default 1). `latents` is the unit noise z (default: drawn from `generator`)."""
        _check_output_type(output_type)
        steps = _check_num_inference_steps(
            num_inference_steps, 1, "BOOT has no multi-step sampler: call it with num_inference_steps=1 or without"
        )
        self.scheduler.set_timesteps(steps)
        num_classes, labels = self.config.num_classes, None
        if class_labels is not None:
            if num_classes is None:
                raise ValueError("This student is unconditional; call it without class_labels.")
            labels = _check_class_labels(class_labels, num_classes)
        batch_size = _check_batch_size(batch_size, None if labels is None else len(labels))
        generator = _check_generator(generator, batch_size)
        if labels is None and num_classes is not None:
            single = generator if isinstance(generator, torch.Generator) else None
            labels = torch.randint(0, num_classes, (batch_size,), generator=single)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = self.unet.config.out_channels
        channels = channels // 2 if channels == 2 * self.unet.config.in_channels else channels  # learned sigma
        device, dtype = self._execution_device, self.unet.dtype
        shape = (batch_size, self.unet.config.in_channels, *size)
        latents = _check_latents(latents, shape)
        z = latents.to(device) if latents is not None else randn_tensor(shape, generator=generator, device=device)
        x = z.float() * self.scheduler.init_noise_sigma
        t = self.scheduler.timesteps.to(device).expand(batch_size)
        inp = self.scheduler.scale_model_input(x, t).to(dtype)
        out = self.unet(inp, t, class_labels=None if labels is None else labels.to(device)).sample
        x0 = self.scheduler.step(out[:, :channels].float(), t, x).prev_sample
        return _images_output((x0 / 2 + 0.5).clamp(0, 1), output_type, return_dict)


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


# Copied from onestep.pipelines.common._check_batch_size
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


# Copied from onestep.pipelines.common._check_class_labels
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


# Copied from onestep.pipelines.common._check_latents
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
