"""Metric math: Frechet and kernel distances on features (through clean-fid's own functions),
feature statistics files, and PSNR/SSIM for super-resolution."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from onestep.errors import UserError


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (and the features, for KID), with how they were made."""

    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, feats: np.ndarray, meta: dict | None = None) -> FeatureStats:
        if len(feats) < 2:
            raise UserError(
                f"Feature statistics need at least 2 images per set (a covariance of one is undefined); got {len(feats)}."
            )
        # Exactly clean-fid's fid_from_feats: np.mean and np.cov(rowvar=False) in float64.
        return cls(np.mean(feats, axis=0), np.cov(feats, rowvar=False), feats, dict(meta or {}, num_images=len(feats)))

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str) -> None:
        """npz with mu, sigma, feats (float32) and meta (JSON): clean-fid reads mu/sigma by the same keys."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta))}
        if self.feats is not None:
            arrays["feats"] = self.feats.astype(np.float32)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        """Our files and clean-fid's (mu/sigma for FID, feats-only `_kid.npz` for KID)."""
        if not os.path.isfile(path):
            raise UserError(f"The statistics file {path} does not exist.")
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable .npz statistics file ({err.__class__.__name__}).") from None
        meta = json.loads(str(data["meta"])) if "meta" in data else {"source": path}
        feats = data["feats"].astype(np.float64) if "feats" in data else None
        if "mu" in data and "sigma" in data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        elif feats is not None:
            mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
        else:
            raise UserError(f"{path} holds neither mu/sigma nor feats; make it with onestep-eval stats.")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{path} has inconsistent shapes (mu {mu.shape}, sigma {sigma.shape}).")
        return cls(mu, sigma, feats, meta)


def _check_dims(a: FeatureStats, b: FeatureStats) -> None:
    if a.dim != b.dim:
        ea, eb = a.meta.get("features", {}).get("name", "?"), b.meta.get("features", {}).get("name", "?")
        raise UserError(
            f"The two feature sets have different dimensions ({a.dim} from {ea}, {b.dim} from {eb}); "
            f"make both with the same --features."
        )


def num_images(stats: FeatureStats) -> int | None:
    """How many feature vectors a set was made of (None: unknown, e.g. clean-fid's mu/sigma-only files)."""
    if stats.feats is not None:
        return len(stats.feats)
    n = stats.meta.get("num_images")
    return int(n) if isinstance(n, int) else None


def fid_sample_warning(gen: FeatureStats, ref: FeatureStats) -> str | None:
    """One sentence when a set has no more feature vectors than the feature dimension: its covariance is
    then singular (rank <= N - 1) and the Frechet distance means nothing; None otherwise."""
    dim = gen.dim
    short = [
        (what, n)
        for what, n in (("generated", num_images(gen)), ("reference", num_images(ref)))
        if n is not None and n <= dim
    ]
    if not short:
        return None
    sets = " and ".join(f"{n} {what}" for what, n in short)
    return (
        f"the FID is meaningless with {sets} images for {dim}-d features: a set's covariance is singular unless "
        f"it has N > {dim} (the feature dimension) samples; use more than {dim} images per set."
    )


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between two Gaussians fitted to features (clean-fid's frechet_distance)."""
    from cleanfid.fid import frechet_distance

    _check_dims(a, b)
    try:
        return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
    except ValueError as err:  # clean-fid: "Imaginary component" when the covariances are too singular
        n = min(a.meta.get("num_images", 0) or 0, b.meta.get("num_images", 0) or 0)
        raise UserError(
            f"The Frechet distance is numerically undefined ({err}); with {n or 'few'} images for "
            f"{a.dim}-d features the covariance is singular: use more samples."
        ) from None


def kid(
    gen: FeatureStats, ref: FeatureStats, seed: int = 0, num_subsets: int = 100, max_subset_size: int = 1000
) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel over random subsets (clean-fid's kernel_distance,
    called as its compute_kid does: reference first). The estimator is unbiased, so it can dip below 0
    when the two sets are close.

    clean-fid draws the subsets from numpy's global generator; seed it here and restore it after, so
    the figure is reproducible from the recorded seed without disturbing the caller."""
    from cleanfid.fid import kernel_distance

    _check_dims(gen, ref)
    if gen.feats is None or ref.feats is None:
        raise UserError(
            "KID needs the features themselves, not only mu/sigma; make the statistics with onestep-eval stats."
        )
    if max_subset_size < 2:
        raise UserError("--kid-subset-size must be at least 2.")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(ref.feats, gen.feats, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


# --- super-resolution -------------------------------------------------------------------------------


def rgb_to_y(images: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma as MATLAB's rgb2ycbcr (16..235), the SR literature's Y channel; (..., 3) -> (..., 1)."""
    x = images.astype(np.float64)
    y = 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0
    return y[..., None]


SSIM_MIN_SIZE = 2 * int(3.5 * 1.5 + 0.5) + 1  # 11: ssim()'s Gaussian window (sigma 1.5, truncated at 3.5 sigma)


def crop_border(image: np.ndarray, border: int) -> np.ndarray:
    return image[border:-border, border:-border] if border > 0 else image


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Wang et al. 2004 SSIM, Gaussian window (sigma 1.5, 11 taps), population covariances, averaged over
    channels (H, W, C): scikit-image's structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=255, channel_axis=-1)."""
    from scipy.ndimage import gaussian_filter

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    truncate = 3.5
    pad = int(truncate * sigma + 0.5)  # (win_size - 1) // 2 for the 11-tap window
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        blur = lambda z: gaussian_filter(z, sigma=sigma, truncate=truncate, mode="reflect")  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(s[pad:-pad, pad:-pad].mean() if pad else s.mean())
    return float(np.mean(values))
