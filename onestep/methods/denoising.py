"""Plain diffusion training (the teacher's own objective), used by train/teacher.py.

DDPM (Ho et al. 2020, Eq. 14) generalised to the Denoiser's parametrisation, with condition dropout so
the trained teacher supports classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Batch
from ..denoiser import Cond, Denoiser
from ..flags import OPTIMISATION, non_negative_float, option, positive_int, probability
from ..losses import DenoisingLoss
from ..sampling import ddim_sample
from .base import Method, Update


@dataclass
class DenoisingConfig:
    flag_group = "teacher network"

    learning_rate: float = option(2e-4, "AdamW learning rate.", parse=non_negative_float, group=OPTIMISATION)
    adam_weight_decay: float = option(0.0, "AdamW weight decay.", parse=non_negative_float, group=OPTIMISATION)
    train_batch_size: int = option(64, "Images per process per iteration.", parse=positive_int, group=OPTIMISATION)
    cond_dropout: float = option(0.1, "Null-class probability, for classifier-free guidance.", parse=probability)
    # The network and schedule train/teacher.py builds (the bundled digits teacher's):
    block_out_channels: str = option("32,64,64", "The UNet's channel widths, comma-separated.")
    channels: int | None = option(
        None, "Image channels (None: 1 for the digits, 3 for an image folder).", parse=positive_int
    )
    beta_schedule: str = option(
        "scaled_linear", "Noise schedule.", choices=("scaled_linear", "linear", "squaredcos_cap_v2")
    )
    prediction_type: str = option("epsilon", "What the UNet predicts.", choices=("epsilon", "v_prediction", "sample"))


class DiffusionTraining(Method):
    updates = [Update("denoise", "model")]
    ema_models = ("model",)

    def __init__(
        self,
        denoiser: Denoiser,
        config: DenoisingConfig,
        sample_shape: tuple[int, ...],
        scheduler_config: dict,
        num_classes: int | None = None,
        null_class: int | None = None,
    ):
        """`null_class`: the class index trained as 'no condition' (with probability cond_dropout), for CFG."""
        super().__init__()
        self.null_class = null_class
        self.scheduler_config = scheduler_config
        self.denoiser = denoiser
        self.config = config
        self.sample_shape = sample_shape
        self.num_classes = num_classes
        self.objective = DenoisingLoss()

    def models(self):
        return {"model": self.denoiser}

    def optimizers(self):
        return {
            "model": torch.optim.AdamW(
                self.denoiser.parameters(), lr=self.config.learning_rate, weight_decay=self.config.adam_weight_decay
            )
        }

    def start_iteration(self, batch: Batch, info):
        return batch

    def loss(self, name, batch: Batch):
        x0, cond = batch.images, batch.cond
        if (
            cond is not None
            and cond.class_labels is not None
            and self.null_class is not None
            and self.config.cond_dropout > 0
        ):
            drop = torch.rand(x0.shape[0], device=x0.device) < self.config.cond_dropout
            labels = torch.where(drop, torch.full_like(cond.class_labels, self.null_class), cond.class_labels)
            cond = Cond(class_labels=labels, image=cond.image)
        model = self.prepared["model"]
        loss = self.objective(self.denoiser, x0, cond, call=lambda x_t, t, c: model(x_t, t, c, native=True)).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num, *self.sample_shape, generator=g).to(device)
        cond = None
        if self.num_classes:
            cond = Cond(class_labels=(torch.arange(num) % self.num_classes).to(device))
        return ddim_sample(models["model"], z, cond, num_steps=50).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        from ..export import metrics_line, save_teacher

        info = {"num_classes": self.num_classes, "null_class": self.null_class} if self.num_classes else None
        rows = {
            "preset": extra_card.get("preset", "-"),
            "prediction": self.scheduler_config.get("prediction_type"),
            "classes": self.num_classes or "unconditional",
            "training steps": extra_card.get("training_steps"),
            "weight EMA (exported)": extra_card.get("ema_decay") or "off",
            "metrics": metrics_line(extra_card.get("eval")),
        }
        save_teacher(models["model"].net, self.scheduler_config, output_dir, rows, info)

    def product(self, folder: str) -> str:
        return f"teacher  {folder} (unet/, scheduler/, onestep.json)"

    def usage(self, folder: str) -> str:
        return f"a teacher for the train scripts: --pretrained_model_name_or_path {folder}"
