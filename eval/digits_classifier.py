"""A small CNN trained on scikit-learn's digits: the offline feature extractor for the bundled default.

Inception needs downloaded weights and was trained on 299x299 photographs; for 16x16 digits a classifier
trained on the digits themselves gives features that separate what matters (shape, class, stroke) and
works offline. FID/KID on its 64-d penultimate features are comparable only with each other, never with
Inception FIDs.

Train (about 3 minutes on 2 CPU cores) and write the shipped weights:

    python -m onestep.eval.digits_classifier --output onestep/assets/digits-classifier
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ASSET_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "onestep", "assets", "digits-classifier"
)
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "classifier.json"
IMAGE_SIZE = 16
FEATURE_DIM = 64


def bundled_dir() -> str:
    """The shipped classifier: beside the installed package (wheel) or the checkout's onestep/assets."""
    import onestep

    return os.path.join(os.path.dirname(onestep.__file__), "assets", "digits-classifier")


class DigitsClassifier(nn.Module):
    """16x16 grey -> conv 32 -> conv 64 /2 -> conv 64 /2 -> 64-d features -> 10 logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def preprocess(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8, any size and channel count -> (N, 1, 16, 16) in [-1, 1].

    Grey = channel mean; resize with antialiased bilinear (a no-op at 16x16)."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).float().div(255.0)
    x = x.permute(0, 3, 1, 2)[:, :3].mean(dim=1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x * 2 - 1


def split_digits(seed: int = 0):
    """The fixed 75/25 stratified split the shipped classifier was trained and tested on."""
    from sklearn.model_selection import train_test_split

    from onestep.data import load_digits_images

    images, labels = load_digits_images(IMAGE_SIZE)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, stratify=labels.numpy(), random_state=seed)
    return images, labels, torch.from_numpy(train_idx), torch.from_numpy(test_idx)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel and mild scale/rotation: generated digits are not pixel-aligned."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) - 0.5) * 0.3
    scale = 1 + (torch.rand(n, generator=g) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=g) - 0.5) * (2 * 2 / IMAGE_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train(steps: int = 3000, batch_size: int = 128, seed: int = 0) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(seed)
    images, labels, train_idx, test_idx = split_digits()
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (batch_size,), generator=g)]
        loss = F.cross_entropy(model(_augment(images[idx], g)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        test_acc = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
        train_acc = (model(images[train_idx]).argmax(1) == labels[train_idx]).float().mean().item()
        feature_scale = feature_rms(model, images)
    info = {
        "test_accuracy": round(test_acc, 4),
        "feature_scale": feature_scale,
        "train_accuracy": round(train_acc, 4),
        "num_test": len(test_idx),
        "num_train": len(train_idx),
        "split": "sklearn train_test_split(test_size=0.25, stratify=labels, random_state=0)",
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "image_size": IMAGE_SIZE,
        "feature_dim": FEATURE_DIM,
        "preprocess": "grey = mean of RGB, antialiased bilinear resize to 16x16, scaled to [-1, 1]",
    }
    return model, info


def feature_rms(model: DigitsClassifier, images: torch.Tensor) -> float:
    """RMS of the raw features over the digits: extractors divide by it so that |x|^2 / d ~ 1, the range
    in which KID's cubic kernel (x.y / d + 1)^3 is well conditioned (as for Inception features)."""
    with torch.no_grad():
        f = model.features(images).double()
    return float(f.pow(2).mean().sqrt())


def load(path: str | None = None) -> tuple[DigitsClassifier, dict]:
    from safetensors.torch import load_file

    from onestep.errors import UserError

    path = path or bundled_dir()
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise UserError(
            f"The digits classifier weights are missing ({weights}); reinstall onestep or run "
            f"python -m onestep.eval.digits_classifier --output {path}."
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(weights))
    with open(os.path.join(path, INFO_FILE)) as f:
        info = json.load(f)
    return model.eval().requires_grad_(False), info


def main(argv=None):
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=ASSET_DIR)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model, info = train(args.steps, seed=args.seed)
    os.makedirs(args.output, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.output, WEIGHTS_FILE))
    with open(os.path.join(args.output, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
