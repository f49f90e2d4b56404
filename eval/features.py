"""Feature extractors for FID/KID: clean-fid's Inception, open_clip image towers, the digits classifier.

Every extractor maps uint8 images (N, H, W, C) to float64 features (N, D) and describes itself (name,
weights hash, resize policy) so a result file says exactly what was measured.
"""

from __future__ import annotations

import os
import shutil
import urllib.request

import numpy as np
import torch

from onestep.errors import UserError
from onestep.utils import file_sha256

# clean-fid's TorchScript Inception (StyleGAN2-ADA's conversion of the 2015-12-05 TF graph) and
# pytorch-fid's port, with their SHA-256 (the second is the prefix torch.hub checks in the file name).
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PT_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
PT_INCEPTION_SHA256_PREFIX = "6726825d"
PT_INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PT_INCEPTION_FILE
FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")


def cache_dir(*parts: str) -> str:
    """Per-user cache ($ONESTEP_CACHE, else $XDG_CACHE_HOME/onestep, else ~/.cache/onestep)."""
    root = os.environ.get("ONESTEP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "onestep"
    )
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "ONESTEP_OFFLINE"))


def _install_weights(given: str | None, target: str, matches, url: str, what: str) -> str:
    """Put verified weights at `target` (the user cache): from `given`, an earlier copy, or a download.
    Temporary names are per process, so several ranks installing at once each end with an atomic rename."""
    tmp = f"{target}.{os.getpid()}.tmp"
    if given:
        if not os.path.isfile(given):
            raise UserError(f"--inception-weights {given} does not exist.")
        digest = file_sha256(given)
        if not matches(digest):
            raise UserError(
                f"{given} is not {what} (SHA-256 {digest[:16]}... does not match); download it from {url}."
            )
        if os.path.abspath(given) != os.path.abspath(target):
            shutil.copyfile(given, tmp)
            os.replace(tmp, target)
        return digest
    if os.path.isfile(target):
        digest = file_sha256(target)
        if matches(digest):
            return digest
        os.replace(target, tmp)  # a corrupt cache entry: set it aside (atomic, other ranks may look too) ...
        os.remove(tmp)  # ... and fetch again below
    hint = f"download {url} on a machine with internet and pass --inception-weights PATH"
    if _offline():
        raise UserError(f"{what} is not in the cache ({target}) and downloads are off (HF_HUB_OFFLINE); {hint}.")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f)
    except OSError as err:
        raise UserError(f"Cannot download {what} ({err.__class__.__name__}); {hint}.") from None
    digest = file_sha256(tmp)
    if not matches(digest):
        os.remove(tmp)
        raise UserError(f"The downloaded {what} has the wrong SHA-256 ({digest[:16]}...); {hint}.")
    os.replace(tmp, target)
    return digest


def _to_rgb(images: np.ndarray) -> np.ndarray:
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images[..., :3]


class FeatureExtractor:
    name: str = ""
    dim: int = 0
    weights_sha256: str | None = None
    resize: str = ""
    batch_size: int = 64

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [self.extract(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, self.dim))

    def extract(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "weights_sha256": self.weights_sha256, "resize": self.resize}


class DigitsFeatures(FeatureExtractor):
    """64-d penultimate features of the shipped digits classifier; also classifies (class accuracy)."""

    def __init__(self, device="cpu", path: str | None = None):
        from . import digits_classifier as dc

        self.model, self.info = dc.load(path)
        self.model.to(device)
        self.device, self.dim, self.name = device, dc.FEATURE_DIM, "digits-classifier"
        weights = os.path.join(path or dc.bundled_dir(), dc.WEIGHTS_FILE)
        self.weights_sha256 = file_sha256(weights)
        self.resize = self.info["preprocess"]
        self._preprocess = dc.preprocess

    @torch.no_grad()
    def extract(self, images):
        # Scale in float32, so the features stay exactly representable in float32 statistics files.
        feats = self.model.features(self._preprocess(images).to(self.device)) / self.info["feature_scale"]
        return feats.float().double().cpu().numpy()

    @torch.no_grad()
    def classify(self, images: np.ndarray) -> np.ndarray:
        out = [
            self.model(self._preprocess(images[i : i + 256]).to(self.device)).argmax(1).cpu().numpy()
            for i in range(0, len(images), 256)
        ]
        return np.concatenate(out)

    def describe(self):
        return {
            **super().describe(),
            "test_accuracy": self.info.get("test_accuracy"),
            "feature_scale": self.info["feature_scale"],
        }


class InceptionFeatures(FeatureExtractor):
    """clean-fid's Inception-V3 pool features (2048-d) with the resize of the chosen clean-fid mode."""

    def __init__(self, mode: str = "clean", device="cpu", weights: str | None = None):
        from cleanfid.resize import build_resizer

        if mode not in FID_MODES:
            raise UserError(f"Unknown clean-fid mode {mode!r}; choose one of {', '.join(FID_MODES)}.")
        self.mode, self.device, self.dim = mode, device, 2048
        self.name = f"inception-v3 (clean-fid, mode {mode})"
        self.resize = {
            "clean": "PIL bicubic on float channels to 299x299 (clean-fid 'clean')",
            "legacy_tensorflow": "TF-style bilinear inside the network (clean-fid 'legacy_tensorflow')",
            "legacy_pytorch": "torch bilinear to 299x299 (clean-fid 'legacy_pytorch')",
        }[mode]
        folder = cache_dir("inception")
        if mode == "legacy_pytorch":
            hub = cache_dir("inception", "torch_hub")
            target = os.path.join(cache_dir("inception", "torch_hub", "checkpoints"), PT_INCEPTION_FILE)
            self.weights_sha256 = _install_weights(
                weights,
                target,
                lambda d: d.startswith(PT_INCEPTION_SHA256_PREFIX),
                PT_INCEPTION_URL,
                "pytorch-fid's Inception weights",
            )
            from cleanfid.inception_pytorch import InceptionV3

            previous = torch.hub.get_dir()
            torch.hub.set_dir(hub)  # clean-fid loads the weights through torch.hub; ours are already there
            try:
                model = InceptionV3(output_blocks=[3], resize_input=False)
            finally:
                torch.hub.set_dir(previous)
            self.model = model.to(device).eval()
            self._forward = lambda x: self.model(x / 255)[0].squeeze(-1).squeeze(-1)
        else:
            target = os.path.join(folder, INCEPTION_FILE)
            self.weights_sha256 = _install_weights(
                weights, target, lambda d: d == INCEPTION_SHA256, INCEPTION_URL, "clean-fid's Inception weights"
            )
            from cleanfid.inception_torchscript import InceptionV3W

            self.model = (
                InceptionV3W(folder, download=False, resize_inside=(mode == "legacy_tensorflow")).to(device).eval()
            )
            self._forward = self.model
        self._resizer = build_resizer(mode)

    @torch.no_grad()
    def extract(self, images):
        rgb = _to_rgb(images)
        resized = np.stack([self._resizer(im) for im in rgb]).astype(np.float32)
        x = torch.from_numpy(resized.transpose(0, 3, 1, 2)).to(self.device)
        return self._forward(x).double().cpu().numpy()


class ClipImageFeatures(FeatureExtractor):
    """open_clip image embeddings (as clean-fid's `clip_vit_b_32` FID), unnormalised."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "openai", device="cpu"):
        from .clip import load_open_clip

        self.clip = load_open_clip(model, pretrained, device, flags=("--clip-model", "--clip-pretrained"))
        self.device, self.dim = device, self.clip.embed_dim
        self.name = f"open_clip {self.clip.model_name} / {self.clip.pretrained}"
        self.weights_sha256 = self.clip.weights_sha256
        self.resize = "open_clip's preprocess (resize shorter side, centre crop, normalise)"

    @torch.no_grad()
    def extract(self, images):
        return self.clip.encode_images(_to_rgb(images), normalize=False).double().cpu().numpy()


FEATURES = ("digits", "inception", "clip")


class CenterCropped(FeatureExtractor):
    """Another extractor, fed images centre-cropped to a square and LANCZOS-resized to `size` first (the
    COCO protocol of DMD2 and GigaGAN: 256 px, for generated and real images alike)."""

    def __init__(self, inner: FeatureExtractor, size: int):
        self.inner, self.size = inner, size
        self.name, self.dim, self.weights_sha256 = inner.name, inner.dim, inner.weights_sha256
        self.resize = f"centre crop to square, LANCZOS to {size}; then {inner.resize}"

    def extract(self, images):
        from .sources import center_crop_resize

        if images.shape[1:3] != (self.size, self.size):  # folders are cropped as they are read
            images = np.stack([np.asarray(center_crop_resize(im, self.size)) for im in images])
        return self.inner.extract(images)

    def describe(self):
        return {**self.inner.describe(), "resize": self.resize}


def build_features(
    name: str,
    device="cpu",
    mode: str = "clean",
    inception_weights: str | None = None,
    clip_model: str = "ViT-B-32",
    clip_pretrained: str = "openai",
    crop_size: int = 0,
) -> FeatureExtractor:
    if crop_size:
        return CenterCropped(
            build_features(name, device, mode, inception_weights, clip_model, clip_pretrained), crop_size
        )
    if name == "digits":
        return DigitsFeatures(device)
    if name == "inception":
        return InceptionFeatures(mode, device, inception_weights)
    if name == "clip":
        return ClipImageFeatures(clip_model, clip_pretrained, device)
    raise UserError(f"Unknown feature extractor {name!r}; choose one of {', '.join(FEATURES)}.")
