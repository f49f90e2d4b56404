"""One-step (or few-step) sampling for distilled UNet2DModel students, unconditional or class-conditional.

Self-contained (torch + diffusers only): `onestep export` copies this file into the student folder, so
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works where onestep is not installed.

The sampling contract is saved in model_index.json (`timesteps`: the conditioning timestep(s) the
student was trained at) and in the scheduler config (the noise schedule and prediction type), so a user
only writes `pipe(class_labels=[3, 7], generator=g)`.

An EDM scheduler config (EDMEulerScheduler, ...) marks an EDM-preconditioned student (Karras et al. 2022,
Table 1): timestep t indexes the ascending Karras grid of num_train_timesteps sigmas from sigma_min to sigma_max,
the chain starts from sigma_t z, and x0 = c_skip x + c_out F(c_in x, ln(sigma) / 4). DMD2's ImageNet-64 student
is x0 = D(80 z; 80, class).
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class OneStepPipeline(DiffusionPipeline):
    """G(z, t_0) -> x0 -> re-noise to t_1 with fresh noise -> G -> ... (DMD2 multi-step sampling)."""

    def __init__(self, unet, scheduler, timesteps: list[int] | None = None, num_classes: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # num_classes: the real classes (a teacher trained for CFG also embeds a null class after them).
        self.register_to_config(
            timesteps=list(timesteps) if timesteps is not None else [scheduler.config.num_train_timesteps - 1],
            num_classes=num_classes if num_classes is not None else unet.config.num_class_embeds,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load an exported folder with this (installed) class, without executing the copy of the
        pipeline file stored in the folder, so no trust_remote_code is needed."""
        folder = str(pretrained_model_name_or_path)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        import diffusers

        with open(index_path) as f:
            index = json.load(f)
        torch_dtype = kwargs.pop("torch_dtype", None)
        params = inspect.signature(cls.__init__).parameters
        init = {}
        for name, value in index.items():
            if name.startswith("_") or name not in params:
                continue
            if isinstance(value, list) and len(value) == 2 and value[0] == "diffusers":
                component = getattr(diffusers, value[1])
                extra = {"torch_dtype": torch_dtype} if torch_dtype is not None and hasattr(component, "dtype") else {}
                init[name] = component.from_pretrained(folder, subfolder=name, **extra)
            else:
                init[name] = value
        return cls(**init)

    @property
    def _edm(self) -> bool:
        return type(self.scheduler).__name__.startswith("EDM")

    def _edm_sigma(self, t: int) -> torch.Tensor:
        """sigma at index t of the grid the student was trained on (float64; index T-1 is sigma_max)."""
        c = self.scheduler.config
        i = torch.arange(c.num_train_timesteps, dtype=torch.float64) / (c.num_train_timesteps - 1)
        top, bottom = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
        return ((top + i * (bottom - top)) ** c.rho).flip(0)[t]

    def _coefficients(self, t: int):
        """(alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t noise; EDM: alpha = 1."""
        if self._edm:
            sigma = self._edm_sigma(t)
            return torch.ones_like(sigma), sigma
        # float64: at t = 999 of SD's schedule alpha is ~0.068 and the conversion divides by it.
        abar = self.scheduler.alphas_cumprod.double()[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def _edm_x0(self, x: torch.Tensor, t: int, labels: torch.Tensor | None) -> torch.Tensor:
        """D(x; sigma_t) = c_skip x + c_out F(c_in x, c_noise), EDM's preconditioning in float64."""
        sigma, sd = self._edm_sigma(t), self.scheduler.config.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = (sigma.log() / 4).float().repeat(x.shape[0]).to(x.device)
        out = self.unet((c_in * x.double()).float().to(self.unet.dtype), c_noise, class_labels=labels).sample
        return (c_skip * x.double() + c_out * out[:, : x.shape[1]].float().double()).float()

    def _to_x0(self, out: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        a, s = self._coefficients(t)
        kind = self.scheduler.config.prediction_type
        out, x = out.double(), x.double()
        if kind == "epsilon":
            return (x - s * out) / a
        if kind == "v_prediction":
            return a * x - s * out
        if kind == "sample":
            return out
        raise ValueError(f"Unsupported prediction_type {kind!r} in the scheduler config.")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images. `class_labels` (class-conditional students) sets the batch size; otherwise
        `batch_size` (default 1, at least 1). `num_inference_steps` may pick the first n (1 <= n <= trained)
        of the trained timesteps; default: all of them."""
        trained = list(self.config.timesteps)
        steps = len(trained) if num_inference_steps is None else num_inference_steps
        if not 1 <= steps <= len(trained):
            raise ValueError(
                f"num_inference_steps must be between 1 and {len(trained)}, the steps this student was trained for "
                f"(timesteps {trained}); got {steps}."
            )
        num_classes = self.config.num_classes
        if class_labels is not None:
            if num_classes is None:
                raise ValueError("This student is unconditional; call it without class_labels.")
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 0:
                raise ValueError(
                    "class_labels is empty; give one label per image, or leave it out (random labels, batch_size images)."
                )
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"class_labels must lie in 0..{num_classes - 1}.")
            batch_size = labels.shape[0]
        else:
            if batch_size is None:
                batch_size = 1
            if batch_size < 1:
                raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
            labels = None
            if num_classes is not None:
                labels = torch.randint(
                    0,
                    num_classes,
                    (batch_size,),
                    generator=generator if isinstance(generator, torch.Generator) else None,
                )
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device, dtype = self._execution_device, self.unet.dtype
        x = (
            latents.to(device)
            if latents is not None
            else randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        )
        if labels is not None:
            labels = labels.to(device)
        if self._edm:  # unit noise (latents too) scaled to the first noise level, as the student was trained
            x = x * float(self._edm_sigma(trained[0]))
        for i, t in enumerate(trained[:steps]):
            if self._edm:
                x0 = self._edm_x0(x, t, labels)
            else:
                tt = torch.full((batch_size,), t, device=device, dtype=torch.long)
                out = self.unet(x.to(dtype), tt, class_labels=labels).sample.float()
                x0 = self._to_x0(out[:, : x.shape[1]], x, t).float()
            if i + 1 < steps:
                a, s = self._coefficients(trained[i + 1])
                noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=torch.float32)
                x = (a * x0.double() + s * noise.double()).float()
        images = (x0 / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            result = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
