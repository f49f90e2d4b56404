"""Fake-score critic F: a trainable copy of the teacher denoiser, plus read access to its bottleneck.

Bottleneck features are captured with a forward hook on a named submodule (the UNet mid block), never by
copying the UNet's forward. For a features-only pass the hook stops the forward early, so the decoder
does not run (DMD2's generator GAN term needs only D(x) = head(bottleneck)). A GAN head is the method's:
it sets `critic.head` (a module reading the features) after sizing it with `feature_shape`.
"""

from __future__ import annotations

import torch
from torch import nn

from .denoiser import Cond, Denoiser
from .errors import UserError


class _StopForward(Exception):
    pass


def _is_fsdp_sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


class Critic(nn.Module):
    """F (a Denoiser), its bottleneck features, and an optional head on them (`head`, set by the method)."""

    def __init__(self, denoiser: Denoiser, feature_module: str | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.feature_module = feature_module or denoiser.adapter.bottleneck_name
        self.head: nn.Module | None = None
        self._features = None
        self._stop_early = False
        self._hooked = False
        self.early_exit = True  # False: always run the whole forward (what FSDP2-sharded critics do)

    def _hook(self) -> None:
        if self._hooked:
            return
        if self.feature_module is None:
            raise UserError(
                "Critic features need a bottleneck: pass --gan_feature_module (a submodule name of the critic network)."
            )
        try:
            module = self.denoiser.net.get_submodule(self.feature_module)
        except AttributeError:
            raise UserError(
                f"The critic network has no submodule {self.feature_module!r} to read GAN features from "
                f"(--gan_feature_module; e.g. mid_block, or a down block such as down_blocks.1)."
            ) from None
        module.register_forward_hook(self._capture)
        self._hooked = True

    def _capture(self, module, inputs, output):
        self._features = output[0] if isinstance(output, tuple) else output
        if self._stop_early:
            raise _StopForward

    @torch.no_grad()
    def feature_shape(self, sample_shape: tuple[int, ...], example_cond: Cond | None = None) -> tuple[int, ...]:
        """Shape of one sample's bottleneck features (C, H, W) or (C,), probed with one forward."""
        x = torch.zeros(1, *sample_shape, device=next(self.denoiser.parameters()).device)
        t = torch.zeros(1, dtype=torch.long, device=x.device)
        cond = example_cond[:1] if example_cond is not None else None
        return tuple(self.features(x, t, cond).shape[1:])

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        """Bottleneck features only; the network stops right after the hooked module. Under FSDP2 the
        forward runs to the end instead: FSDP's per-module hooks expect every forward to finish."""
        self._hook()
        self._stop_early = self.early_exit and not _is_fsdp_sharded(self)
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
        """(native denoiser output, head logits or None) from one full pass."""
        if with_logits:
            self._hook()
        raw = self.denoiser.raw(x_t, t, cond)
        logits = None
        if with_logits:
            feats, self._features = self._features, None
            logits = self.head(feats)
        self._features = None
        return raw, logits
