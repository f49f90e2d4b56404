"""Fake-score critic F: a trainable copy of the teacher denoiser, plus read access to its bottleneck.

Bottleneck features are captured with a forward hook on a named submodule (the UNet mid block), never by
copying the UNet's forward. For a features-only pass the hook stops the forward early, so the decoder
does not run (the generator's GAN term needs only D(x) = head(bottleneck)).
"""
from __future__ import annotations

import torch
from torch import nn

from .denoiser import Cond, Denoiser
from .discriminator import DMD2Head
from .sharding import fsdp_unit_names


class _StopForward(Exception):
    pass


class Critic(nn.Module):
    """F (a Denoiser) and, optionally, DMD2's GAN head on F's bottleneck."""

    def __init__(self, denoiser: Denoiser, feature_module: str | None = None, with_head: bool = False,
                 sample_shape: tuple[int, ...] | None = None, example_cond: Cond | None = None):
        super().__init__()
        self.denoiser = denoiser
        name = feature_module or denoiser.adapter.bottleneck_name
        self.head = None
        self._features = None
        self._stop_early = False
        # Stopping the forward by an exception is safe for plain and DDP modules; FSDP's per-module
        # hooks expect every forward to finish, so sharded runs set this to False (full pass).
        self.early_exit = True
        if with_head:
            if name is None:
                raise ValueError("The GAN head needs a bottleneck: pass feature_module (a submodule name of the critic network).")
            try:
                module = denoiser.net.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"The critic network has no submodule {name!r} to read GAN features from.") from err
            module.register_forward_hook(self._capture)
            shape = self._probe_feature_shape(sample_shape, example_cond)
            self.head = DMD2Head(shape)
        self._no_split_modules = fsdp_unit_names(denoiser.net, *(["DMD2Head"] if with_head else []))

    def _capture(self, module, inputs, output):
        self._features = output[0] if isinstance(output, tuple) else output
        if self._stop_early:
            raise _StopForward

    @torch.no_grad()
    def _probe_feature_shape(self, sample_shape, example_cond):
        if sample_shape is None:
            raise ValueError("The GAN head needs sample_shape to size itself.")
        x = torch.zeros(1, *sample_shape, device=next(self.denoiser.parameters()).device)
        t = torch.zeros(1, dtype=torch.long, device=x.device)
        cond = example_cond[:1] if example_cond is not None else None
        return tuple(self.features(x, t, cond).shape[1:])

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        """Bottleneck features only; the network stops right after the hooked module (with `early_exit`)."""
        self._stop_early = self.early_exit
        out = None
        try:
            out = self.denoiser.raw(x_t, t, cond)
        except _StopForward:
            pass
        finally:
            self._stop_early = False
        feats, self._features = self._features, None
        if out is not None:
            # FSDP2 gathers a unit's weights for the backward when the gradient reaches the unit's output;
            # tie the full pass's output in (with weight 0) so the UNet's own weights are there in time.
            feats = feats + 0.0 * torch.nan_to_num(out.mean())  # nan_to_num: an inf output must not turn this into NaN
        return feats

    def logits(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        return self.head(self.features(x_t, t, cond))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None, with_logits: bool = False):
        """(native denoiser output, GAN logits or None) from one full pass."""
        raw = self.denoiser.raw(x_t, t, cond)
        logits = None
        if with_logits:
            feats, self._features = self._features, None
            logits = self.head(feats)
        self._features = None
        return raw, logits
