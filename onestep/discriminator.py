"""GAN heads. DMD2's head reads the fake-score critic's bottleneck features; TAD-SR's time-aware heads read the
frozen teacher's encoder features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .utils import sinusoidal_embedding

MIN_PER_GROUP = 16  # numbers one GroupNorm group normalises on the 1x1 map (published sizes: 24 and 40)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(32, channels)  # GroupNorm(32) where the width allows it
    return nn.GroupNorm(groups, channels)


def _group_norm_1x1(channels: int) -> nn.GroupNorm:
    """The norm after the conv that reduces the map to 1x1, where each group normalises only C / groups
    numbers. GroupNorm(32) there is the published layout at C = 768 or 1280 (24 or 40 numbers a group);
    at C = 64 it normalised 2 numbers, leaving each channel near +-1 (a near-binary logit), and at C = 32
    one number, a constant 0: the head was blind and D sat at chance (loss 2 ln 2). So take the most groups
    (up to 32) that still hold MIN_PER_GROUP numbers each, one group below that width."""
    fits = [g for g in range(1, 33) if channels % g == 0 and channels // g >= MIN_PER_GROUP]
    return nn.GroupNorm(max(fits, default=1), channels)


class DMD2Head(nn.Module):
    """Per-sample logit from bottleneck features, keeping the channel width C throughout.

    Spatial (C, S, S) features: [Conv4x4 s2 p1 -> GN -> SiLU] until 4x4, then one conv that covers the
    remaining map (4x4 s4 at the published sizes) -> GN -> SiLU, then Conv1x1 -> 1 channel. The norms are
    GroupNorm(32) at the published widths; on the 1x1 map a narrow C gets fewer groups (_group_norm_1x1).
    Vector (C,) features (MLP critics in the toy test bed): Linear(C, 64) -> SiLU -> Linear(64, 1).
    """

    def __init__(self, feature_shape: tuple[int, ...]):
        super().__init__()
        if len(feature_shape) == 1:
            (c,) = feature_shape
            self.net = nn.Sequential(nn.Linear(c, 64), nn.SiLU(), nn.Linear(64, 1))
            return
        if len(feature_shape) != 3:
            raise ValueError(f"GAN head expects (C,) or (C, H, W) features, got shape {tuple(feature_shape)}.")
        c, h, w = feature_shape
        if h != w:
            raise ValueError(f"GAN head expects square bottleneck features, got {h}x{w}.")
        layers: list[nn.Module] = []
        size = h
        while size > 4:
            layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), _group_norm(c), nn.SiLU()]
            size //= 2
        layers += [nn.Conv2d(c, c, size, stride=size), _group_norm_1x1(c), nn.SiLU(), nn.Conv2d(c, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # the head runs in fp32, as DMD2's does
            return self.net(features.float()).reshape(features.shape[0])


# -- TAD-SR (docs/methods/tadsr.md): time-aware heads on the frozen teacher's encoder ----------


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module, scale: float):
        super().__init__()
        self.fn, self.scale = fn, scale

    def forward(self, x):
        return (x + self.fn(x)) * self.scale


def _sn_conv1d(c_in: int, c_out: int, kernel: int, circular: bool) -> nn.Module:
    from torch.nn.utils.parametrizations import spectral_norm

    mode = "circular" if circular else "zeros"
    return spectral_norm(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, padding_mode=mode))


class TimeAwareHead(nn.Module):
    """One head on a (C, H, W) feature map (a (C,) vector is read as 1x1), as TAD-SR's:
    FiLM(t): [scale, shift] = Linear_{E->2C}(SiLU(sinusoidal(t, E))), h = GN(h)(1 + scale) + shift;
    h = Conv3x3_{zero-init}(SiLU(h)); tokens (B, C, HW); spectral-norm Conv1d(k=1, circular) -> GN(4) ->
    LeakyReLU(0.2); a residual block Conv1d(k=9, circular) -> GN(4) -> LeakyReLU(0.2); Conv1d(k=1) to
    `logit_channels` logits per token. `film=False` drops the FiLM (the time-agnostic ablation).
    `residual_scale`: 1/sqrt(2) as StyleGAN-T (unverified), or 1 (a plain residual sum)."""

    def __init__(
        self,
        feature_shape: tuple[int, ...],
        embed_dim: int = 160,
        logit_channels: int = 64,
        film: bool = True,
        residual_scale: float = 2**-0.5,
    ):
        super().__init__()
        c = feature_shape[0]
        tokens = math.prod(feature_shape[1:]) if len(feature_shape) > 1 else 1
        self.embed_dim, self.film = embed_dim, film
        # On one token (MLP features) GroupNorm(32) would normalise C/32 numbers a group and erase them.
        self.norm = _group_norm_1x1(c) if tokens == 1 else _group_norm(c)
        self.to_film = nn.Linear(embed_dim, 2 * c) if film else None
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv.weight)  # as in TAD-SR's released heads
        nn.init.zeros_(self.conv.bias)
        # A circular pad of 4 needs at least as many tokens; on fewer (MLP features: one token) the k=9 conv with
        # zero padding would act through its centre tap alone, which a k=1 conv is, at a ninth of the cost.
        circular = tokens >= 9
        groups = math.gcd(4, c)
        self.tokens = nn.Sequential(
            _sn_conv1d(c, c, 1, circular),
            nn.GroupNorm(groups, c),
            nn.LeakyReLU(0.2),
            _Residual(
                nn.Sequential(
                    _sn_conv1d(c, c, 9 if circular else 1, circular), nn.GroupNorm(groups, c), nn.LeakyReLU(0.2)
                ),
                residual_scale,
            ),
            _sn_conv1d(c, logit_channels, 1, False),
        )

    def forward(self, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            if h.ndim == 2:
                h = h[:, :, None, None]
            h = self.norm(h)
            if self.to_film is not None:
                scale, shift = self.to_film(F.silu(sinusoidal_embedding(time, self.embed_dim))).chunk(2, dim=1)
                h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
            h = self.conv(F.silu(h))
            return self.tokens(h.flatten(2)).flatten(1)


class TimeAwareDiscriminator(nn.Module):
    """TAD-SR's D: one TimeAwareHead per teacher feature map; logits of all heads concatenated, (B, L)."""

    def __init__(self, feature_shapes: list[tuple[int, ...]], **head_options):
        super().__init__()
        self.heads = nn.ModuleList(TimeAwareHead(shape, **head_options) for shape in feature_shapes)

    def forward(self, features: list[torch.Tensor], time: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f, time) for head, f in zip(self.heads, features)], dim=1)


class TokenHead(nn.Module):
    """Per-sample logit from a transformer block's token sequence (B, L, D), the DiT counterpart of DMD2Head:
    LayerNorm(D) -> Linear(D, hidden) -> SiLU -> Linear(hidden, 1) on every token, then the mean over tokens (a
    patch-GAN-style average, so the head takes any resolution). `feature_shape` is one sample's (L, D)."""

    def __init__(self, feature_shape: tuple[int, ...], hidden: int = 256):
        super().__init__()
        if len(feature_shape) != 2:
            raise ValueError(f"Token head expects (L, D) token features, got shape {tuple(feature_shape)}.")
        d = feature_shape[-1]
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # fp32, as DMD2Head
            return self.net(features.float()).mean(dim=(1, 2))


def gan_head(feature_shape: tuple[int, ...]) -> nn.Module:
    """DMD2's GAN head for the critic's features: TokenHead on a transformer block's tokens (L, D) (SD3, Flux),
    DMD2Head on a UNet's (C, H, W) map or an MLP's (C,) vector."""
    return TokenHead(feature_shape) if len(feature_shape) == 2 else DMD2Head(feature_shape)
