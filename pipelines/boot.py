"""BOOT students (shared/methods/boot.md section 6): one network evaluation, no noise schedule at sampling time.

Self-contained (torch + diffusers only): the export copies this file into the student folder (the pipeline
class at its root, the scheduler in scheduler/), so `DiffusionPipeline.from_pretrained(folder,
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

import json
import os

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

    def set_timesteps(self, num_inference_steps: int | None = 1, device=None, **kwargs):
        if num_inference_steps not in (None, 1):
            raise ValueError(
                f"A BOOT student samples in one step (BOOT has no multi-step sampler): call it with "
                f"num_inference_steps=1, not {num_inference_steps}."
            )
        self.num_inference_steps = 1
        self.timesteps = torch.tensor([self.config.embed_timestep], dtype=torch.float32, device=device)

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
    """A BOOT student of a pixel UNet2DModel teacher, unconditional or class-conditional: z -> x0 in one step."""

    def __init__(self, unet, scheduler: BootScheduler, num_classes: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # num_classes: the real classes (a teacher trained for CFG also embeds a null class after them).
        self.register_to_config(num_classes=num_classes if num_classes is not None else unet.config.num_class_embeds)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load an exported folder with this (installed) class, without running the copies of this file stored
        in the folder, so no trust_remote_code is needed."""
        folder = str(pretrained_model_name_or_path)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        import diffusers

        with open(index_path) as f:
            index = json.load(f)
        dtype = kwargs.pop("torch_dtype", None)
        unet_class = getattr(diffusers, index["unet"][1])
        unet = unet_class.from_pretrained(folder, subfolder="unet", **({"torch_dtype": dtype} if dtype else {}))
        scheduler = BootScheduler.from_pretrained(folder, subfolder="scheduler")
        return cls(unet=unet, scheduler=scheduler, num_classes=index.get("num_classes"))

    def _labels(self, batch_size, class_labels, generator):
        num_classes = self.config.num_classes
        if class_labels is None:
            batch_size = 1 if batch_size is None else batch_size
            if batch_size < 1:
                raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
            if num_classes is None:
                return batch_size, None
            gen = generator if isinstance(generator, torch.Generator) else None
            return batch_size, torch.randint(0, num_classes, (batch_size,), generator=gen)
        if num_classes is None:
            raise ValueError("This student is unconditional; call it without class_labels.")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty; give one label per image, or leave it out.")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must lie in 0..{num_classes - 1}.")
        return labels.shape[0], labels

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
        self.scheduler.set_timesteps(num_inference_steps)
        batch_size, labels = self._labels(batch_size, class_labels, generator)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = self.unet.config.out_channels
        channels = channels // 2 if channels == 2 * self.unet.config.in_channels else channels  # learned sigma
        device, dtype = self._execution_device, self.unet.dtype
        shape = (batch_size, self.unet.config.in_channels, *size)
        z = latents.to(device) if latents is not None else randn_tensor(shape, generator=generator, device=device)
        x = z.float() * self.scheduler.init_noise_sigma
        t = self.scheduler.timesteps.to(device).expand(batch_size)
        inp = self.scheduler.scale_model_input(x, t).to(dtype)
        out = self.unet(inp, t, class_labels=None if labels is None else labels.to(device)).sample
        x0 = self.scheduler.step(out[:, :channels].float(), t, x).prev_sample
        images = (x0 / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
