"""Small helpers shared by several layers."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


def seed_for(*parts) -> int:
    """A 63-bit seed derived from any parts (seed, rank, step, ...), stable across runs and machines."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid[..., 0] if c == 1 else grid


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1) -> None:
    from PIL import Image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
