"""Super-resolution data: random high-resolution crops with their degraded low-resolution inputs.

Sources: the natural photographs scikit-image and scikit-learn ship (offline; a fixed split of whole images
held out for evaluation), `--train_data_dir` (HR images; LR made by the degradation), or paired
`--hr_dir/--lr_dir` (LR given, paired by file name, LR size x scale = HR size). The degradation is the SR
methods' bicubic antialiased downsampling (data.degrade); the teacher reads u = bicubic upsampling of the LR.
Crops, flips and image choices are a pure function of (seed, rank, step, micro), like every batch source.

    python -m onestep.sr_data --write_eval outputs/sr-eval     # hr/, lr/ and bicubic/ of the held-out images
    python -m onestep.sr_data --write_train outputs/sr-train   # the training photographs, as a --train_data_dir
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, Batch, degrade, random_indices, upsample
from .denoiser import Cond
from .errors import UserError
from .utils import seed_for

# Whole images: every colour photograph scikit-image and scikit-learn ship, the held-out ones never contributing a
# training crop (the synthetic colorwheel and logo are not photographs).
TRAIN_IMAGES = (
    "astronaut",
    "chelsea",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
    "china",
)
EVAL_IMAGES = ("coffee", "rocket", "flower")
# The bundled pixel x4 SR teachers (onestep/assets): with them, no data flag means the bundled photographs.
BUNDLED_SR_TEACHERS = ("sr-resshift", "sr-flow")
BUNDLED_PHOTOGRAPHS = "bundled photographs"  # a teacher folder's onestep.json training_data: distil it on them too


def natural_image(name: str) -> np.ndarray:
    """One bundled photograph as (H, W, 3) uint8."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    try:
        import skimage.data
    except ImportError:
        raise UserError(
            "The bundled natural images need scikit-image: pip install scikit-image (or pass --train_data_dir)."
        ) from None
    if name in ("motorcycle_left", "motorcycle_right"):
        return np.asarray(skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1])
    return np.asarray(getattr(skimage.data, name)())[..., :3]


def natural_images(split: str) -> dict[str, np.ndarray]:
    names = {"train": TRAIN_IMAGES, "eval": EVAL_IMAGES}[split]
    return {n: natural_image(n) for n in names}


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) uint8 -> (C, H, W) float in [-1, 1]."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    return torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def _list_images(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise UserError(f"The data folder {folder} does not exist.")
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise UserError(f"The data folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return {os.path.splitext(os.path.relpath(p, folder))[0]: p for p in paths}


AUGMENTATIONS = ("flips", "full")
RESCALES = (1.0, 0.75, 0.5)  # "full" augmentation: HR images also seen downscaled (more structure per crop)


class SRCrops:
    """Random `resolution` crops of HR images and u = upsample(LR), where LR is the degraded crop, or the matching
    crop of a given LR image. Augmentation "flips" (OFTSR's): horizontal flips, rare vertical ones; "full": also
    90-degree rotations, vertical flips as often as horizontal, and each image seen at 1, 0.75 and 0.5 times its
    size (antialiased; not for paired LR images, whose pairing a rescale would break). Images are decoded once and
    kept."""

    def __init__(
        self,
        hr: list,
        resolution: int,
        scale: int,
        batch_size: int,
        seed: int = 0,
        channels: int = 3,
        lr: list | None = None,
        hflip: float = 0.5,
        vflip: float = 0.06,
        names: list[str] | None = None,
        augmentation: str = "flips",
    ):
        """`hr` (and `lr`): arrays (H, W, C) uint8 or file paths."""
        if not hr:
            raise UserError("The super-resolution training data holds no images.")
        if augmentation not in AUGMENTATIONS:
            raise UserError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}.")
        full = augmentation == "full"
        self.rotate = full
        self.rescales = RESCALES if full and lr is None else (1.0,)
        vflip = 0.5 if full else vflip
        if resolution % scale:
            raise UserError(f"--resolution {resolution} must be a multiple of the upscale factor {scale}.")
        self.hr, self.lr, self.names = list(hr), lr, names or [str(i) for i in range(len(hr))]
        self.resolution, self.scale, self.batch_size, self.seed = resolution, scale, batch_size, seed
        self.channels, self.hflip, self.vflip = channels, hflip, vflip
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        for i in range(len(self.hr)):  # every image checked up front: a bad one is named before training
            self._check(i)

    @classmethod
    def from_folders(cls, hr_dir: str, lr_dir: str | None, **kw) -> SRCrops:
        hr = _list_images(hr_dir)
        lr = None
        if lr_dir:
            lr = _list_images(lr_dir)
            missing = sorted(set(hr) - set(lr))
            if missing:
                raise UserError(f"No low-resolution image in {lr_dir} matches {hr[missing[0]]} (images pair by name).")
        names = sorted(hr)
        return cls([hr[n] for n in names], lr=[lr[n] for n in names] if lr else None, names=names, **kw)

    def _image(self, which: str, i: int, rescale: float = 1.0) -> torch.Tensor:
        key = (which, i, rescale)
        if key not in self._cache:
            if rescale != 1.0:
                full = self._image(which, i)
                size = [max(self.resolution, int(round(d * rescale))) for d in full.shape[-2:]]
                small = torch.nn.functional.interpolate(full[None], size=size, mode="bicubic", antialias=True)
                self._cache[key] = small[0].clamp(-1, 1)
                return self._cache[key]
            src = (self.hr if which == "hr" else self.lr)[i]
            if isinstance(src, str):
                from .images import open_image

                src = np.asarray(open_image(src, self.channels))
            elif self.channels == 1 and src.ndim == 3:
                src = np.asarray(src.mean(-1).round().astype(np.uint8))
            self._cache[key] = _to_tensor(src)
        return self._cache[key]

    def _check(self, i: int) -> None:
        h, w = self._image("hr", i).shape[-2:]
        if min(h, w) < self.resolution:
            raise UserError(
                f"The image {self.names[i]} is {w}x{h}, smaller than the {self.resolution}-pixel crops (--resolution)."
            )
        if self.lr is not None:
            lh, lw = self._image("lr", i).shape[-2:]
            if (lh * self.scale, lw * self.scale) != (h, w):
                raise UserError(
                    f"The low-resolution image of {self.names[i]} is {lw}x{lh}; x{self.scale} that gives "
                    f"{lw * self.scale}x{lh * self.scale}, but its HR image is {w}x{h}."
                )

    def __len__(self):
        return len(self.hr)

    def batch(self, step: int, micro: int, rank: int, device) -> Batch:
        idx = random_indices(len(self.hr), self.batch_size, self.seed, rank, step, micro)
        g = torch.Generator().manual_seed(seed_for(self.seed, "sr-crop", rank, step, micro))
        r, s = self.resolution, self.scale
        hrs, lrs = [], []
        for i in idx.tolist():
            rescale = self.rescales[int(torch.randint(len(self.rescales), (1,), generator=g))] if self.rotate else 1.0
            img = self._image("hr", i, rescale)
            h, w = img.shape[-2:]
            top = int(torch.randint((h - r) // s + 1, (1,), generator=g)) * s  # on the LR grid, for paired data
            left = int(torch.randint((w - r) // s + 1, (1,), generator=g)) * s
            flips = torch.rand(2, generator=g).tolist()
            dims = [d for d, p, limit in zip((-1, -2), flips, (self.hflip, self.vflip)) if p < limit]
            hr = img[:, top : top + r, left : left + r]
            hr = hr.flip(dims) if dims else hr
            transposed = self.rotate and float(torch.rand(1, generator=g)) < 0.5
            if transposed:
                hr = hr.transpose(-1, -2)  # with the flips: all 8 symmetries of the square
            if self.lr is not None:
                lr = self._image("lr", i)[:, top // s : (top + r) // s, left // s : (left + r) // s]
                lr = lr.flip(dims) if dims else lr
                lr = lr.transpose(-1, -2) if transposed else lr
            else:
                lr = degrade(hr[None], s)[0]
            hrs.append(hr)
            lrs.append(lr)
        lr = torch.stack(lrs)
        return Batch(torch.stack(hrs).to(device), Cond(image=upsample(lr, s).to(device)), low_res=lr.to(device))


def write_eval_set(folder: str, scale: int = 4, crop: int | None = None) -> dict[str, int]:
    """hr/, lr/ and bicubic/ PNGs of the held-out photographs (each cropped to a multiple of `scale`, or
    centre-cropped to crop x crop): the LR made by the training degradation and rounded to 8 bits, bicubic/ its
    plain bicubic upsampling (the baseline `onestep-eval sr --sr` measures)."""
    from PIL import Image

    for sub in ("hr", "lr", "bicubic"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    sizes = {}
    for name, img in natural_images("eval").items():
        h, w = img.shape[:2]
        if crop:
            top, left = (h - crop) // 2, (w - crop) // 2
            img = img[top : top + crop, left : left + crop]
        img = img[: img.shape[0] // scale * scale, : img.shape[1] // scale * scale]
        lr = degrade(_to_tensor(img)[None], scale)[0]
        lr = ((lr.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(img).save(os.path.join(folder, "hr", f"{name}.png"))
        Image.fromarray(lr).save(os.path.join(folder, "lr", f"{name}.png"))
        bicubic = upsample(_to_tensor(lr)[None], scale)[0].clamp(-1, 1)
        bicubic = ((bicubic + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(bicubic).save(os.path.join(folder, "bicubic", f"{name}.png"))
        sizes[name] = img.shape[1]
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write_eval", help="Folder to write the held-out images' hr/, lr/ and bicubic/ into.")
    p.add_argument("--write_train", help="Folder to write the training photographs into (a --train_data_dir).")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--crop", type=int, default=None, help="Centre crop of each image (None: the whole image).")
    args = p.parse_args(argv)
    if not (args.write_eval or args.write_train):
        p.error("give --write_eval and/or --write_train")
    if args.write_eval:
        sizes = write_eval_set(args.write_eval, args.scale, args.crop)
        print(f"Wrote {len(sizes)} held-out images to {args.write_eval}/hr, /lr and /bicubic: {', '.join(sizes)}")
    if args.write_train:
        from PIL import Image

        os.makedirs(args.write_train, exist_ok=True)
        for name, img in natural_images("train").items():
            Image.fromarray(img).save(os.path.join(args.write_train, f"{name}.png"))
        print(f"Wrote the {len(TRAIN_IMAGES)} training photographs to {args.write_train}")


if __name__ == "__main__":
    main()
