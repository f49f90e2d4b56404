"""Small helpers shared by several layers."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch


def per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient (B,) so that it broadcasts over a (B, ...) tensor."""
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


def sinusoidal_embedding(time: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of time * max_period^(-i / (dim/2)), the diffusion UNets' timestep embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=time.device, dtype=torch.float32) / half)
    args = time.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([args.cos(), args.sin()], dim=1)


def seed_for(*parts) -> int:
    """A 63-bit seed derived from any parts (seed, rank, step, ...), stable across runs and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def to_uint8(images, value_range: tuple[float, float] = (-1, 1), layout: str = "NCHW") -> np.ndarray:
    """Images -> (N, H, W, C) uint8: clipped to value_range, scaled to 0..255 and rounded half to even
    (as when saved to PNG).

    The default is the models' convention: a tensor (N, C, H, W) in [-1, 1]. Pipeline output is
    to_uint8(images, (0, 1), "auto"): "auto" takes an ndarray as (N, H, W, C) and a tensor as (N, C, H, W)
    when its axis 1 holds 1, 3 or 4 channels and its last axis does not; a list of PIL images is
    stacked as RGB whatever the range. Tensors are computed in float32 on their own device; ndarrays in
    their own float dtype."""
    if layout not in ("NCHW", "NHWC", "auto"):
        raise ValueError(f"layout must be NCHW, NHWC or auto, got {layout!r}")
    if isinstance(images, list):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    lo, hi = value_range
    scale = 255 / (hi - lo)
    if isinstance(images, torch.Tensor):
        x = images.detach().float()
        if layout == "NCHW" or (
            layout == "auto" and x.ndim == 4 and x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4)
        ):
            x = x.permute(0, 2, 3, 1)
        return ((x.clamp(lo, hi) - lo) * scale).round().to(torch.uint8).cpu().numpy()
    x = np.asarray(images)
    if layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    return ((np.clip(x, lo, hi) - lo) * scale).round().astype(np.uint8)


def file_sha256(path: str) -> str:
    """SHA-256 (hex) of one file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = arr[i]
    return grid[..., 0] if c == 1 else grid


def save_image_grid(
    images: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1, min_width: int = 0
) -> None:
    """Write a PNG grid, enlarged `scale` times (nearest neighbour), or by the smallest whole factor that
    makes it at least `min_width` pixels wide: small images stay sharp and big enough to see in a viewer."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow))
    scale = max(scale, -(-min_width // img.width))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
