"""GAN heads. DMD2's head reads the fake-score critic's bottleneck features (DMD2 spec 4.3)."""

from __future__ import annotations

import math

import torch
from torch import nn

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
        with torch.autocast(features.device.type, enabled=False):  # the head runs in fp32 (DMD2 spec 4.3)
            return self.net(features.float()).reshape(features.shape[0])
