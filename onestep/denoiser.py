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
    guidance: torch.Tensor | None = None  # (B,) guidance scale a guidance-distilled teacher reads (Flux)

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


# -- flow-matching transformers (SD3, Flux) ---------------------------------------------------------------------


def _text(cond: Cond | None, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if cond is None or cond.encoder_hidden_states is None or cond.text_embeds is None:
        raise ValueError(
            f"A {kind} transformer needs encoder_hidden_states and pooled text_embeds in its conditioning."
        )
    return cond.encoder_hidden_states, cond.text_embeds


class SD3TransformerAdapter(NetworkAdapter):
    """SD3Transformer2DModel as StableDiffusion3Pipeline calls it: `timestep` = sigma * 1000 (the model time as is),
    joint CLIP + T5 token states, pooled CLIP embeddings; (B, C, H, W) in and out, the velocity eps - x0.

    GAN features: the image tokens (B, L, D) of the middle joint block, read at its second norm (the block's own
    output is a (text, image) tuple whose first element is the text stream)."""

    def __init__(self, net):
        super().__init__(net)
        self.bottleneck_name = f"transformer_blocks.{len(net.transformer_blocks) // 2}.norm2"

    def forward(self, x, time, cond):
        states, pooled = _text(cond, "SD3")
        return self.net(
            hidden_states=x,
            timestep=time,
            encoder_hidden_states=states.to(x.dtype),
            pooled_projections=pooled.to(x.dtype),
            return_dict=False,
        )[0]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W): FluxPipeline._unpack_latents, in latent pixels."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens: (0, row, column), FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxTransformerAdapter(NetworkAdapter):
    """FluxTransformer2DModel as FluxPipeline calls it: 2x2 latent patches packed into tokens with (0, row, column)
    ids, zero text ids, `timestep` = model time / 1000 = sigma (after rounding it to the latents' dtype, as the
    pipeline does), the guidance scale from `Cond.guidance` where the transformer embeds one; the output is unpacked
    to (B, C, H, W), the velocity eps - x0.

    GAN features: the image tokens (B, L, D) of the last double-stream block, read at its second norm. The
    single-stream blocks that follow mix text and image tokens into one sequence; this is the deepest point where
    the image tokens stand alone."""

    def __init__(self, net):
        super().__init__(net)
        self.bottleneck_name = f"transformer_blocks.{len(net.transformer_blocks) - 1}.norm2"

    def forward(self, x, time, cond):
        states, pooled = _text(cond, "Flux")
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches; latents of {h}x{w} are not even-sized.")
        guidance = None
        if self.net.config.guidance_embeds:
            if cond.guidance is None:
                raise ValueError(
                    "This Flux transformer is guidance-distilled: set the guidance scale in Cond.guidance."
                )
            guidance = cond.guidance.to(device=x.device, dtype=torch.float32).expand(b)
        out = self.net(
            hidden_states=pack_latents(x),
            timestep=time.to(x.dtype).expand(b) / 1000,
            guidance=guidance,
            pooled_projections=pooled.to(x.dtype),
            encoder_hidden_states=states.to(x.dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=latent_image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


def adapt(net: nn.Module) -> NetworkAdapter:
    """Wrap a network in the adapter matching its class (diffusers UNets and flow transformers, else a plain
    module)."""
    if isinstance(net, NetworkAdapter):
        return net
    name = type(net).__name__
    if name == "UNet2DModel":
        return UNet2DAdapter(net)
    if name == "UNet2DConditionModel":
        return UNet2DConditionAdapter(net)
    if name == "SD3Transformer2DModel":
        return SD3TransformerAdapter(net)
    if name == "FluxTransformer2DModel":
        return FluxTransformerAdapter(net)
    return NetworkAdapter(net)


class Denoiser(nn.Module):
    """x0_hat(x_t, t, cond) for a network of a given parametrisation (as in EDM, Karras et al. 2022:
    preconditioning as a wrapper separate from the architecture). `t` is an integer index tensor of shape (B,)."""

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
