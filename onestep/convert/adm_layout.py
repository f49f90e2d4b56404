"""The ADM layout: DhariwalUNet's hyperparameters read from its parameter names, and its parameters mapped
onto diffusers' UNet2DModel (the layer map is in onestep/convert/edm_adm.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UserError

_RESNET_PARTS = (
    ("norm0", "norm1"),
    ("conv0", "conv1"),
    ("affine", "time_emb_proj"),
    ("norm1", "norm2"),
    ("conv1", "conv2"),
    ("skip", "conv_shortcut"),
)


@dataclass
class ADMArchitecture:
    """DhariwalUNet's hyperparameters, as read from a checkpoint."""

    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int
    model_channels: int
    channel_mult: list[int]
    num_blocks: int
    attn_resolutions: list[int]
    emb_channels: int
    channels_per_head: int
    num_groups: int
    dropout: float

    @property
    def resolutions(self) -> list[int]:
        return [self.img_resolution >> level for level in range(len(self.channel_mult))]

    def unet_config(self) -> dict:
        attn = [res in self.attn_resolutions for res in self.resolutions]
        return dict(
            sample_size=self.img_resolution,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            time_embedding_type="positional",
            flip_sin_to_cos=True,  # EDM: cos first
            freq_shift=0,  # EDM: endpoint=False, frequencies 10000^(-i / (C/2))
            time_embedding_dim=self.emb_channels,
            down_block_types=["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn],
            up_block_types=["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)],
            block_out_channels=[self.model_channels * m for m in self.channel_mult],
            layers_per_block=self.num_blocks,
            downsample_type="resnet",
            upsample_type="resnet",
            dropout=self.dropout,
            act_fn="silu",
            attention_head_dim=self.channels_per_head,
            norm_num_groups=self.num_groups,
            attn_norm_num_groups=self.num_groups,  # else the mid-block attention has no norm under scale_shift
            norm_eps=1e-5,
            resnet_time_scale_shift="scale_shift",
            num_class_embeds=self.label_dim or None,
        )


def single_setting(values: set, what: str, path: str):
    if len(values) != 1:
        raise UserError(f"{path}: the network mixes {what} {sorted(values)}; UNet2DModel uses a single one.")
    return values.pop()


# -- architecture -------------------------------------------------------------------------------------------
def infer_architecture(
    sd: dict, channels_per_head: int, norm_groups: int, dropout: float, path: str = ""
) -> ADMArchitecture:
    """DhariwalUNet's hyperparameters from its parameter names and shapes. `norm_groups` follows EDM's rule
    (min(groups, channels // 4) per norm), unless the pickle recorded the groups (then pass them as-is)."""
    found = [m for m in (re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k) for k in sd) if m]
    if len(found) != 1 or "map_layer0.weight" not in sd or "out_conv.weight" not in sd:
        raise UserError(
            f"{path} is not an EDM ADM (DhariwalUNet) checkpoint: no enc.<R>x<R>_conv / map_layer0 / out_conv."
        )
    res0 = int(found[0].group(1))
    model_channels, in_channels = sd[found[0].group(0)].shape[:2]
    resolutions = [
        res0 >> level
        for level in range(res0.bit_length())
        if f"enc.{res0 >> level}x{res0 >> level}_block0.conv0.weight" in sd
    ]
    num_blocks = sum(1 for k in sd if re.fullmatch(rf"enc\.{res0}x{res0}_block\d+\.conv0\.weight", k))
    widths = [sd[f"enc.{r}x{r}_block0.conv0.weight"].shape[0] for r in resolutions]
    if any(w % model_channels for w in widths) or widths[0] != model_channels:
        raise UserError(
            f"{path}: level widths {widths} are not multiples of the first level's {model_channels}; diffusers' "
            "timestep features are as wide as the first level, EDM's as model_channels (channel_mult[0] must be 1)."
        )
    arch = ADMArchitecture(
        img_resolution=res0,
        in_channels=int(in_channels),
        out_channels=int(sd["out_conv.weight"].shape[0]),
        label_dim=int(sd["map_label.weight"].shape[1]) if "map_label.weight" in sd else 0,
        model_channels=int(model_channels),
        channel_mult=[w // model_channels for w in widths],
        num_blocks=num_blocks,
        attn_resolutions=[r for r in resolutions if f"enc.{r}x{r}_block0.qkv.weight" in sd],
        emb_channels=int(sd["map_layer0.weight"].shape[0]),
        channels_per_head=channels_per_head,
        num_groups=norm_groups,
        dropout=dropout,
    )
    norms = {k for k in sd if re.search(r"(norm\d|out_norm)\.weight$", k)}
    groups = {min(norm_groups, sd[k].shape[0] // 4) for k in norms}
    arch.num_groups = single_setting(groups, "GroupNorm group counts (EDM: min(groups, channels // 4))", path)
    for key in (k for k in sd if k.endswith("qkv.weight")):
        if (sd[key].shape[0] // 3) % channels_per_head:
            raise UserError(
                f"{path}: {key} has {sd[key].shape[0] // 3} channels, not a multiple of {channels_per_head} per head."
            )
    return arch


# -- mapping ------------------------------------------------------------------------------------------------
class _Mapper:
    def __init__(self, sd: dict, arch: ADMArchitecture, path: str):
        self.sd, self.arch, self.path = sd, arch, path
        self.out, self.used = {}, set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise UserError(f"{self.path} lacks {key}, which an ADM network of this shape has.")
        self.used.add(key)
        return self.sd[key].float()

    def copy(self, src: str, dst: str) -> None:
        self.out[f"{dst}.weight"] = self.take(f"{src}.weight")
        if f"{src}.bias" in self.sd:
            self.out[f"{dst}.bias"] = self.take(f"{src}.bias")

    def block(self, src: str, resnet: str, attention: str | None = None) -> None:
        for edm, diffusers in _RESNET_PARTS:
            if f"{src}.{edm}.weight" in self.sd:
                self.copy(f"{src}.{edm}", f"{resnet}.{diffusers}")
            key = f"{src}.{edm}.resample_filter"
            if key in self.sd:  # nearest-neighbour / 2x2-average resampling is the [1, 1] filter only
                if not torch.allclose(self.take(key), torch.full((1, 1, 2, 2), 0.25)):
                    raise UserError(
                        f"{self.path}: {key} is not the [1, 1] box filter that diffusers' resampling uses."
                    )
        if attention is not None:
            self.attention(src, attention)
        elif f"{src}.qkv.weight" in self.sd:
            raise UserError(f"{self.path}: {src} has attention where the layout has none.")

    def attention(self, src: str, dst: str) -> None:
        weight, bias = self.take(f"{src}.qkv.weight")[:, :, 0, 0], self.take(f"{src}.qkv.bias")
        channels = weight.shape[1]
        heads = channels // self.arch.channels_per_head
        weight = weight.reshape(heads, self.arch.channels_per_head, 3, channels)
        bias = bias.reshape(heads, self.arch.channels_per_head, 3)
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            self.out[f"{dst}.{name}.weight"] = weight[:, :, j].reshape(channels, channels).contiguous()
            self.out[f"{dst}.{name}.bias"] = bias[:, :, j].reshape(channels).contiguous()
        self.copy(f"{src}.norm2", f"{dst}.group_norm")
        self.out[f"{dst}.to_out.0.weight"] = self.take(f"{src}.proj.weight")[:, :, 0, 0]
        self.out[f"{dst}.to_out.0.bias"] = self.take(f"{src}.proj.bias")

    def run(self) -> dict:
        arch, res = self.arch, self.arch.resolutions
        self.copy(f"enc.{res[0]}x{res[0]}_conv", "conv_in")
        self.copy("map_layer0", "time_embedding.linear_1")
        self.copy("map_layer1", "time_embedding.linear_2")
        if arch.label_dim:
            self.out["class_embedding.weight"] = self.take("map_label.weight").t().contiguous()
        for level, r in enumerate(res):
            attn = r in arch.attn_resolutions
            for i in range(arch.num_blocks):
                dst = f"down_blocks.{level}"
                self.block(f"enc.{r}x{r}_block{i}", f"{dst}.resnets.{i}", f"{dst}.attentions.{i}" if attn else None)
            if level + 1 < len(res):
                self.block(f"enc.{res[level + 1]}x{res[level + 1]}_down", f"down_blocks.{level}.downsamplers.0")
        deepest = res[-1]
        self.block(f"dec.{deepest}x{deepest}_in0", "mid_block.resnets.0", "mid_block.attentions.0")
        self.block(f"dec.{deepest}x{deepest}_in1", "mid_block.resnets.1")
        for j, level in enumerate(reversed(range(len(res)))):
            r, dst, attn = res[level], f"up_blocks.{j}", res[level] in arch.attn_resolutions
            for i in range(arch.num_blocks + 1):
                self.block(f"dec.{r}x{r}_block{i}", f"{dst}.resnets.{i}", f"{dst}.attentions.{i}" if attn else None)
            if level > 0:
                self.block(f"dec.{res[level - 1]}x{res[level - 1]}_up", f"{dst}.upsamplers.0")
        self.copy("out_norm", "conv_norm_out")
        self.copy("out_conv", "conv_out")
        left = sorted(k for k in set(self.sd) - self.used if not k.startswith("map_augment."))
        if left:
            raise UserError(f"{self.path} has parameters outside the ADM layout, e.g. {', '.join(left[:3])}.")
        return self.out


def convert_state_dict(sd: dict, arch: ADMArchitecture, path: str = "") -> dict:
    """EDM DhariwalUNet parameters -> diffusers UNet2DModel parameters (see the module docstring)."""
    return _Mapper(sd, arch, path).run()


def build_unet(sd: dict, arch: ADMArchitecture, path: str = ""):
    from diffusers import UNet2DModel

    unet = UNet2DModel(**arch.unet_config())
    unet.load_state_dict(convert_state_dict(sd, arch, path), strict=True)
    return unet.eval()
