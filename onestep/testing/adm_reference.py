"""A small reference of EDM's ADM network (Dhariwal & Nichol's UNet as `DhariwalUNet` inside `EDMPrecond`,
Karras et al. 2022, Table 1 preconditioning), written from the architecture for the converter's tests.

Parameter names follow EDM's checkpoints (`model.enc.16x16_block0.conv0.weight`, ...), so a state dict of
this module has the layout of a real ImageNet-64 checkpoint. The forward is written independently of
diffusers (resampling through the 2x2 filter EDM stores, attention through EDM's fused qkv layout), so that
agreement with the converted UNet2DModel checks the weight mapping rather than restating it.
`write_edm_pickle` stores a network the way EDM's `torch_utils.persistence` pickles it.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))
        self.bias = nn.Parameter(0.1 * torch.randn(cout)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """3x3 / 1x1 convolution; with up or down, the 2x2 box filter (`resample_filter`) is applied first.
    kernel 0: resampling only (EDM's parameter-free skip of up/down blocks)."""

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False):
        super().__init__()
        self.up, self.down = up, down
        self.weight = (
            nn.Parameter(torch.randn(cout, cin, kernel, kernel) / math.sqrt(cin * kernel**2)) if kernel else None
        )
        self.bias = nn.Parameter(0.1 * torch.randn(cout)) if kernel else None
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25) if up or down else None)

    def forward(self, x):
        channels = x.shape[1]
        if self.up:  # each pixel spread over a 2x2 patch
            f = (4 * self.resample_filter).expand(channels, 1, 2, 2)
            x = F.conv_transpose2d(x, f, stride=2, groups=channels)
        if self.down:  # each 2x2 patch averaged
            x = F.conv2d(x, self.resample_filter.expand(channels, 1, 2, 2), stride=2, groups=channels)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    """EDM's rule: min(num_groups, channels // 4) groups."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.num_groups = min(num_groups, channels // 4)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, eps=1e-5)


class UNetBlock(nn.Module):
    """ADM residual block: norm, SiLU, (resample), conv; adaptive GroupNorm (x * (1 + scale) + shift from the
    embedding); SiLU, conv; skip; then optional multi-head self-attention with a residual."""

    def __init__(self, cin, cout, emb, up=False, down=False, attention=False, channels_per_head=64, num_groups=32):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.dropout = 0.1  # recorded as EDM's ImageNet network does; this eval-only reference never applies it
        self.num_heads = cout // channels_per_head if attention else 0
        self.norm0 = GroupNorm(cin, num_groups)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
        self.affine = Linear(emb, 2 * cout)
        self.norm1 = GroupNorm(cout, num_groups)
        self.conv1 = Conv2d(cout, cout, 3)
        needs_skip = cin != cout or up or down
        self.skip = Conv2d(cin, cout, 1 if cin != cout else 0, up=up, down=down) if needs_skip else None
        if self.num_heads:
            self.norm2 = GroupNorm(cout, num_groups)
            self.qkv = Conv2d(cout, 3 * cout, 1)
            self.proj = Conv2d(cout, cout, 1)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv1(F.silu(self.norm1(h) * (1 + scale) + shift))
        x = h + (self.skip(x) if self.skip is not None else x)
        if self.num_heads:
            b, c, height, width = x.shape
            # qkv channels are laid out (head, channel within the head, q/k/v)
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            weights = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(q.shape[1]), dim=2)
            attended = torch.einsum("nqk,nck->ncq", weights, v).reshape(b, c, height, width)
            x = x + self.proj(attended)
        return x


class PositionalEmbedding(nn.Module):
    """[cos(x f_i), sin(x f_i)] with f_i = 10000^(-i / (C/2)), i < C/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.num_channels = channels

    def forward(self, x):
        half = self.num_channels // 2
        freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = x[:, None].float() * freqs[None]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class DhariwalUNet(nn.Module):
    def __init__(
        self,
        img_resolution=16,
        in_channels=3,
        out_channels=3,
        label_dim=0,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_blocks=2,
        attn_resolutions=(8, 4),
        channels_per_head=8,
        num_groups=32,
        channel_mult_emb=4,
    ):
        super().__init__()
        emb = model_channels * channel_mult_emb
        block = dict(emb=emb, channels_per_head=channels_per_head, num_groups=num_groups)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None
        self.label_dim = label_dim

        self.enc = nn.ModuleDict()
        skips = []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level in reversed(range(len(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout, num_groups)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_onehot=None):
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            emb = emb + self.map_label(class_onehot)
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if block.in_channels != x.shape[1]:  # blocks that read a skip connection
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4) (Karras et al. 2022, Table 1)."""

    def __init__(self, sigma_data: float = 0.5, **unet):
        super().__init__()
        self.sigma_data = sigma_data
        self.model = DhariwalUNet(**unet)
        self.label_dim = self.model.label_dim

    def forward(self, x, sigma, class_labels=None):
        x, sigma = x.double(), sigma.double().reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        onehot = F.one_hot(class_labels, self.label_dim).float() if self.label_dim else None
        out = self.model((c_in * x).float(), (sigma.log() / 4).flatten().float(), onehot)
        return (c_skip * x + c_out * out.double()).float()


# -- EDM's pickle format ------------------------------------------------------------------------------------
_PERSISTENT = (Linear, Conv2d, GroupNorm, UNetBlock, PositionalEmbedding, DhariwalUNet, EDMPrecond)


def _never_called(meta):  # stands in for EDM's reconstruct function; a safe reader never calls it
    raise AssertionError("EDM's reconstruct function was called")


class EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict, in which EDM pickles its dataset options."""


@contextlib.contextmanager
def _edm_module_names():
    """Pickle refers to functions and classes by module and name: make EDM's names resolvable while writing."""
    fakes = {
        "torch_utils.persistence": ("_reconstruct_persistent_obj", _never_called),
        "dnnlib.util": ("EasyDict", EasyDict),
    }
    added = []
    for module_name, (name, obj) in fakes.items():
        obj.__module__, obj.__qualname__ = module_name, name
        for package in (module_name.split(".")[0], module_name):
            if package not in sys.modules:
                sys.modules[package] = types.ModuleType(package)
                added.append(package)
        setattr(sys.modules[module_name], name, obj)
    try:
        yield
    finally:
        for package in added:
            del sys.modules[package]


class _EDMPickler(pickle.Pickler):
    """Pickles our modules as EDM's persistent classes do: (reconstruct, (meta,)), meta holding the class's
    module source (omitted here), its name and the instance's state."""

    def reducer_override(self, obj):
        if type(obj) in _PERSISTENT:
            state = dict(obj.__dict__, _init_args=(), _init_kwargs={})
            meta = dict(type="class", version=6, module_src="# omitted", class_name=type(obj).__name__, state=state)
            return _never_called, (meta,)
        return NotImplemented


def write_edm_pickle(net: EDMPrecond, path: str, extra: dict | None = None) -> None:
    """{'ema': net, ...} in the layout of EDM's network-snapshot pickles (plus `extra` entries)."""
    with _edm_module_names():
        data = {"ema": net, "augment_pipe": None, "dataset_kwargs": EasyDict(resolution=16), **(extra or {})}
        with open(path, "wb") as f:
            _EDMPickler(f, protocol=4).dump(data)
