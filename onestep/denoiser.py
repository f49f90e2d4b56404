"""Denoiser: any network + schedule + parametrisation -> x0_hat(x_t, t, cond).

Everything below this layer speaks x0-space through `Denoiser`; the network-specific call lives in a
small adapter (diffusers UNet2DModel, UNet2DConditionModel, or a plain module). Conditioning travels as
one `Cond` object so that methods never care whether a teacher takes class labels or text.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from .schedules import NoiseSchedule


@dataclass
class Cond:
    """Per-sample conditioning. Every tensor field has the batch on dim 0; None means absent."""

    class_labels: torch.Tensor | None = None  # (B,) long
    encoder_hidden_states: torch.Tensor | None = None  # (B, L, D) text embeddings
    text_embeds: torch.Tensor | None = None  # (B, D) SDXL pooled embeddings
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL added time ids
    image: torch.Tensor | None = None  # (B, C, H, W) concatenated on channels (SR)
    shift: torch.Tensor | None = None  # u of x_t = a x0 + b u + c eps where it is not `image` (latent SR)

    @property
    def u(self) -> torch.Tensor | None:
        """The affine family's u: `shift` where set (a latent teacher reads the low-resolution pixels but mixes
        the encoded upsampled image into x_t), else the concatenated image itself (pixel SR)."""
        return self.shift if self.shift is not None else self.image

    def _map(self, fn) -> Cond:
        return replace(
            self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}
        )

    def to(self, device) -> Cond:
        return self._map(lambda v: v.to(device))

    def __getitem__(self, index) -> Cond:
        return self._map(lambda v: v[index])

    def cat(self, other: Cond) -> Cond:
        kw = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if (a is None) != (b is None):
                raise ValueError(f"Cannot batch conditions: {f.name} is set on one side only.")
            kw[f.name] = None if a is None else torch.cat([a, b])
        return Cond(**kw)

    def where(self, mask: torch.Tensor, other: Cond) -> Cond:
        """Per sample: `other` where mask (B,) is set, else self (condition dropout: `other` = the null condition).
        Fields set on one side only keep self's."""
        kw = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is not None and b is not None:
                a = torch.where(mask.reshape(-1, *([1] * (a.ndim - 1))).to(a.device), b.to(a.device, a.dtype), a)
            kw[f.name] = a
        return Cond(**kw)

    def __len__(self) -> int:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        return 0


class NetworkAdapter(nn.Module):
    """Calls a network with (x, model_time, cond) and returns its native output tensor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        return self.net(x, time, cond)

    # Where the GAN head reads features (DMD2: the UNet mid block).
    bottleneck_name: str | None = None


class UNet2DAdapter(NetworkAdapter):
    """diffusers UNet2DModel, with optional class labels and channel-concatenated image conditioning."""

    bottleneck_name = "mid_block"

    def forward(self, x, time, cond):
        cond = cond or Cond()
        if cond.image is not None:
            x = torch.cat([x, cond.image.to(x.dtype)], dim=1)
        out = self.net(x, time, class_labels=cond.class_labels).sample
        return out[:, : self.out_channels]

    @property
    def out_channels(self) -> int:
        # ADM-style "learned sigma" UNets return 2C channels; the first C are the prediction.
        c = self.net.config.out_channels
        return c // 2 if c == 2 * self.net.config.in_channels else c


class UNet2DConditionAdapter(NetworkAdapter):
    """diffusers UNet2DConditionModel: text embeddings, and SDXL's pooled embeddings + time ids."""

    bottleneck_name = "mid_block"

    def forward(self, x, time, cond):
        if cond is None or cond.encoder_hidden_states is None:
            raise ValueError("A UNet2DConditionModel teacher needs encoder_hidden_states in its conditioning.")
        added = None
        if cond.text_embeds is not None:
            added = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
        if cond.image is not None:
            x = torch.cat([x, cond.image.to(x.dtype)], dim=1)
        hidden = cond.encoder_hidden_states.to(x.dtype) if x.is_floating_point() else cond.encoder_hidden_states
        return self.net(x, time, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def adapt(net: nn.Module) -> NetworkAdapter:
    """Wrap a network in the adapter matching its class (diffusers UNets, else a plain module)."""
    if isinstance(net, NetworkAdapter):
        return net
    name = type(net).__name__
    if name == "UNet2DModel":
        return UNet2DAdapter(net)
    if name == "UNet2DConditionModel":
        return UNet2DConditionAdapter(net)
    return NetworkAdapter(net)


class Denoiser(nn.Module):
    """x0_hat(x_t, t, cond) for a network of a given parametrisation (EDM spec: preconditioning as a
    wrapper separate from the architecture). `t` is an integer index tensor of shape (B,)."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str):
        super().__init__()
        self.adapter = adapt(net)
        self.schedule = schedule
        self.prediction_type = prediction_type

    @property
    def net(self) -> nn.Module:
        return self.adapter.net

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """The network's native output (eps, v, velocity or x0), as its training loss sees it."""
        return self(x_t, t, cond, native=True)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None, native: bool = False
    ) -> torch.Tensor:
        """x0_hat, or with native=True the network's own output (one forward either way, so a
        DDP-wrapped Denoiser can serve both). EDM networks are preconditioned: their native output is D."""
        sched, kind = self.schedule, self.prediction_type
        out = self.adapter(sched.model_input(x_t, t, kind), sched.model_time(t), cond)
        if native and kind != "edm":
            return out
        return sched.to_x0(out.float(), x_t.float(), t, kind, self._shift_image(cond))

    def _shift_image(self, cond: Cond | None) -> torch.Tensor | None:
        """u of the affine family: the conditioning image, where the schedule mixes it into x_t."""
        return cond.u if (self.schedule.shifted and cond is not None) else None

    def denoising_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Cond | None = None):
        """(target for `raw`, per-sample weight or None): the network's own denoising objective."""
        return self.schedule.denoising_target(x0, eps, t, self.prediction_type, self._shift_image(cond))

    def guided(self, x_t, t, cond: Cond, uncond: Cond | None, scale: float) -> torch.Tensor:
        """Classifier-free guidance in x0-space: uncond + w (cond - uncond), one batched forward.

        All conversions are affine in the network output, so guiding x0 equals guiding eps or v."""
        if uncond is None or scale == 1.0:
            return self(x_t, t, cond)
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), uncond.cat(cond))
        x0_u, x0_c = both.chunk(2)
        return x0_u + scale * (x0_c - x0_u)
