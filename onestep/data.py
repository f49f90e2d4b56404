"""Datasets and batch sources.

A batch source returns the batch for (step, micro-step, rank) deterministically: indices are drawn
with replacement from a generator seeded by those numbers, so a resumed run sees exactly the batches an
uninterrupted one would, and no sampler state needs checkpointing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .denoiser import Cond
from .errors import UserError
from .utils import seed_for

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def random_indices(n: int, batch_size: int, seed: int, rank: int, step: int, micro: int) -> torch.Tensor:
    """The dataset indices of one micro-batch: a pure function of (seed, rank, step, micro)."""
    g = torch.Generator().manual_seed(seed_for(seed, "data", rank, step, micro))
    return torch.randint(n, (batch_size,), generator=g)


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, H, W) in [-1, 1]
    cond: Cond | None = None
    low_res: torch.Tensor | None = None  # SR: the low-resolution crops the condition was made from


def load_digits_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, 1, size, size) images in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1), torch.tensor(digits.target, dtype=torch.long)


class TensorBatches:
    """Random batches from in-memory images (and optional class labels)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, seed: int = 0):
        if len(images) == 0:
            raise UserError("The training data holds no images.")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed

    def __len__(self):
        return len(self.images)

    def batch(self, step: int, micro: int, rank: int, device) -> Batch:
        idx = random_indices(len(self.images), self.batch_size, self.seed, rank, step, micro)
        cond = Cond(class_labels=self.labels[idx].to(device)) if self.labels is not None else None
        return Batch(self.images[idx].to(device), cond)


class ImageFolder(torch.utils.data.Dataset):
    """Images under a folder (recursively), resized and centre-cropped to `resolution`.

    Sub-folder names become class labels when `class_folders` is set (torchvision's ImageFolder
    convention). Every file is checked once up front so that a corrupt image is reported by name
    before training starts, not hours into it."""

    def __init__(
        self, root: str, resolution: int, channels: int = 3, class_folders: bool = False, verify: bool = True
    ):
        if not os.path.isdir(root):
            raise UserError(f"The data folder {root} does not exist.")
        self.paths = sorted(
            os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.paths:
            raise UserError(f"The data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        self.resolution, self.channels = resolution, channels
        self.labels = None
        if class_folders:
            names = sorted({os.path.relpath(os.path.dirname(p), root).split(os.sep)[0] for p in self.paths})
            if all(n.isdigit() for n in names):
                names = sorted(names, key=int)  # folders "0".."10" are class ids, not strings
            self.class_names = names
            self.labels = torch.tensor(
                [names.index(os.path.relpath(os.path.dirname(p), root).split(os.sep)[0]) for p in self.paths]
            )
        self.captions = (
            read_captions(root, self.paths) if os.path.isfile(os.path.join(root, "metadata.jsonl")) else None
        )
        if verify:
            for p in self.paths:
                self._verify(p)

    @staticmethod
    def _verify(path):
        """Decode the whole file (Image.verify() misses a truncated JPEG, which would then fail inside a
        DataLoader worker mid-run) with the same reader training uses."""
        from .images import open_image

        open_image(path)

    @staticmethod
    def _open(path, channels: int = 3):
        """8-bit L (channels 1) or RGB: 16-bit images scaled, transparency over white (onestep/images.py)."""
        from .images import open_image

        return open_image(path, channels)

    def __len__(self):
        return len(self.paths)

    @property
    def cache_identity(self):
        """What a latent cache of this data is keyed by."""
        return self.paths

    def __getitem__(self, i):
        img = self._open(self.paths[i], self.channels)
        label = int(self.labels[i]) if self.labels is not None else -1
        return center_crop_tensor(img, self.resolution), label


def center_crop_tensor(img, r: int) -> torch.Tensor:
    """Resize the short side to r (bicubic), centre-crop r x r, scale to [-1, 1], CHW."""
    from PIL import Image

    scale = r / min(img.size)
    img = img.resize((max(r, round(img.width * scale)), max(r, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - r) // 2, (img.height - r) // 2
    img = img.crop((left, top, left + r, top + r))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).reshape(r, r, -1).permute(2, 0, 1)


def _one_caption(value, row: int, name: str, column: str) -> str:
    """A caption cell: a string, or a list of strings (COCO-style datasets) of which the first is used."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise UserError(
            f"Row {row} of dataset {name!r} has no text caption in column {column!r} (found {type(value).__name__})."
        )
    return value


class HFImageCaptions(torch.utils.data.Dataset):
    """Image-caption pairs from a Hugging Face dataset (hub id or local dataset folder, through
    `datasets.load_dataset`), centre-cropped to `resolution`; the same interface as ImageFolder."""

    def __init__(
        self,
        name: str,
        resolution: int,
        split: str = "train",
        config_name: str | None = None,
        image_column: str = "image",
        caption_column: str = "text",
    ):
        try:
            import datasets
        except ImportError:
            raise UserError("--dataset_name needs the datasets package: pip install 'onestep[datasets]'.") from None
        try:
            ds = datasets.load_dataset(name, config_name, split=split)
        except Exception as err:  # offline, unknown id, bad split: datasets raises many types
            raise UserError(
                f"Cannot load dataset {name!r} (split {split!r}): {str(err).splitlines()[0] if str(err) else err.__class__.__name__}"
            ) from None
        for column in (image_column, caption_column):
            if column not in ds.column_names:
                raise UserError(
                    f"Dataset {name!r} has no column {column!r}; its columns are {', '.join(ds.column_names)} "
                    f"(choose with --image_column / --caption_column)."
                )
        if len(ds) == 0:
            raise UserError(f"Dataset {name!r} (split {split!r}) is empty.")
        self.ds, self.name, self.resolution, self.image_column = ds, name, resolution, image_column
        self.captions = [_one_caption(c, i, name, caption_column) for i, c in enumerate(ds[caption_column])]
        self._identity = (name, config_name, split, image_column, getattr(ds, "_fingerprint", None), len(ds))

    @property
    def cache_identity(self):
        return self._identity

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from PIL import Image

        try:
            img = self.ds[int(i)][self.image_column]
            if not isinstance(img, Image.Image):
                raise TypeError(f"not an image but {type(img).__name__}")
        except Exception as err:  # a corrupt or missing image is decoded lazily, here
            raise UserError(f"Cannot read image {i} of dataset {self.name!r} ({err}); remove or replace it.") from None
        return center_crop_tensor(img.convert("RGB"), self.resolution), -1


def read_captions(root: str, paths: list[str]) -> list[str]:
    """Captions from an HF imagefolder metadata.jsonl (file_name + text/caption), in the order of paths."""
    import json

    meta = os.path.join(root, "metadata.jsonl")
    by_name = {}
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                by_name[os.path.normpath(row["file_name"])] = row.get("text", row.get("caption"))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta} line {n} is not a JSON object with file_name and text.") from None
    captions = []
    for p in paths:
        text = by_name.get(os.path.normpath(os.path.relpath(p, root)))
        if not isinstance(text, str):
            raise UserError(f"{meta} has no caption (text) for {os.path.relpath(p, root)}.")
        captions.append(text)
    return captions


class CaptionedLatentBatches:
    """Real latents and their captions for the GAN of text-to-image teachers.

    With `cache_dir`, every image is encoded by the VAE once, up front, into safetensors shards (named by
    a hash of the file list, resolution and VAE), and training reads latents only; a later run with the
    same data reuses them. Latents are the VAE posterior mean (deterministic), times its scaling factor."""

    def __init__(
        self,
        dataset: ImageFolder | HFImageCaptions,
        batch_size: int,
        seed: int,
        encode_images,
        encode_text,
        cache_dir: str | None = None,
        cache_key: str = "",
        shard_size: int = 256,
        rank: int = 0,
        world_size: int = 1,
        barrier=None,
    ):
        if dataset.captions is None:
            raise UserError(
                "Text-to-image GAN data needs captions: put a metadata.jsonl (file_name, text) in --train_data_dir."
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.encode_images, self.encode_text = encode_images, encode_text
        self.latents = None
        if cache_dir:
            self.latents = self._cached(cache_dir, cache_key, shard_size, rank, world_size, barrier or (lambda: None))

    def _cached(self, cache_dir: str, key: str, shard_size: int, rank: int, world_size: int, barrier) -> torch.Tensor:
        """Shard k is encoded by rank k mod world_size (missing shards only), then every rank reads all."""
        import hashlib

        from safetensors.torch import save_file

        from .loading import read_weights

        os.makedirs(cache_dir, exist_ok=True)
        digest = hashlib.sha256(
            repr((self.dataset.cache_identity, self.dataset.resolution, key)).encode()
        ).hexdigest()[:16]
        paths = []
        for k, start in enumerate(range(0, len(self.dataset), shard_size)):
            path = os.path.join(cache_dir, f"latents-{digest}-{k:05d}.safetensors")
            paths.append(path)
            if k % world_size == rank and not os.path.exists(path):
                images = torch.stack(
                    [self.dataset[i][0] for i in range(start, min(start + shard_size, len(self.dataset)))]
                )
                save_file({"latents": self.encode_images(images).cpu().contiguous()}, f"{path}.{rank}.tmp")
                os.replace(f"{path}.{rank}.tmp", path)
        barrier()
        again = "delete it (or the cache folder) and run again: the latents are encoded anew"
        return torch.cat([read_weights(p, again)["latents"] for p in paths])

    def __len__(self):
        return len(self.dataset)

    def batch(self, step: int, micro: int, rank: int, device) -> Batch:
        idx = random_indices(len(self.dataset), self.batch_size, self.seed, rank, step, micro)
        if self.latents is not None:
            latents = self.latents[idx]
        else:
            latents = self.encode_images(torch.stack([self.dataset[int(i)][0] for i in idx]))
        cond = self.encode_text([self.dataset.captions[int(i)] for i in idx])
        return Batch(latents.to(device), cond.to(device))


class DatasetBatches:
    """Random batches from a map-style dataset, loaded by DataLoader workers in the background."""

    def __init__(
        self, dataset: ImageFolder, batch_size: int, seed: int = 0, num_workers: int = 0, micro_steps: int = 1
    ):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.micro_steps = num_workers, micro_steps
        self._iter, self._expected = None, None

    def _index_lists(self, step: int, micro: int, rank: int):
        while True:
            yield random_indices(len(self.dataset), self.batch_size, self.seed, rank, step, micro).tolist()
            micro += 1
            if micro == self.micro_steps:
                step, micro = step + 1, 0

    def batch(self, step: int, micro: int, rank: int, device) -> Batch:
        if self._expected != (step, micro):
            # (Re)start the loader here: the first call, or after a resume.
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._index_lists(step, micro, rank), num_workers=self.num_workers
            )
            self._iter = iter(loader)
        images, labels = next(self._iter)
        self._expected = (step, micro + 1) if micro + 1 < self.micro_steps else (step + 1, 0)
        cond = Cond(class_labels=labels.to(device)) if self.dataset.labels is not None else None
        return Batch(images.to(device), cond)


def read_prompts(path: str) -> list[str]:
    """A prompt file: plain text (one prompt per line, blank lines skipped) or JSON lines with a
    "text", "caption" or "prompt" field."""
    import json

    if not os.path.isfile(path):
        raise UserError(f"The prompt file {path} does not exist.")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {n} is not valid JSON.") from None
                text = next((row[k] for k in ("text", "caption", "prompt") if k in row), None)
                if not isinstance(text, str):
                    raise UserError(f'{path} line {n} has no "text", "caption" or "prompt" string.')
                line = text
            prompts.append(line)
    if not prompts:
        raise UserError(f"The prompt file {path} holds no prompts.")
    return prompts


def degrade(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The SR methods' degradation: bicubic downsampling by `scale` with antialiasing (OFTSR's H)."""
    return F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)


def upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """u, the low-resolution image brought back to the high resolution (bicubic), which SR teachers read."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)
