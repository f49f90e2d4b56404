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


SHARPNESS_DEFINITION = (
    "sharpness = E(output) / E(HR), E(x) = the mean over interior pixels of the squared 4-neighbour Laplacian "
    "(x[i-1,j] + x[i+1,j] + x[i,j-1] + x[i,j+1] - 4 x[i,j]) of the Y channel (BT.601), after the border cut: "
    "1 = as much high-frequency energy as the reference, below 1 = blurrier, above 1 = sharper or noisier"
)


def laplacian_energy(image: np.ndarray) -> float:
    """The mean squared 4-neighbour Laplacian of a one-channel image (H, W) or (H, W, 1), over the pixels whose
    four neighbours exist, so no padding rule enters the figure."""
    x = image.astype(np.float64).reshape(image.shape[0], image.shape[1])
    lap = x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]
    return float(np.mean(lap**2))


def sharpness(y_out: np.ndarray, y_ref: np.ndarray) -> float:
    """laplacian_energy of the output's Y over the reference's (SHARPNESS_DEFINITION); NaN for a flat reference."""
    ref = laplacian_energy(y_ref)
    return laplacian_energy(y_out) / ref if ref > 0 else float("nan")


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 8-bit levels over every pixel and channel."""
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# --- LPIPS from local weight files --------------------------------------------------------------------------

# The lpips package's trunks: torchvision's `features` cut after each ReLU it reads, and the channels there.
LPIPS_TRUNKS = {
    "alex": {"slices": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)), "channels": (64, 192, 384, 256, 256)},
    "vgg": {"slices": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), "channels": (64, 128, 256, 512, 512)},
}
# lpips' ScalingLayer: inputs in [-1, 1] shifted and scaled to ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def _load_state_dict(path: str, flag: str) -> dict:
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not a readable state dict
        raise UserError(
            f"{flag} {path} is not a readable PyTorch weights file ({err.__class__.__name__}); pass the .pth itself."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{flag} {path} holds no state dict of tensors; pass a .pth saved from a model's state_dict()."
        )
    return state


class LocalLPIPS:
    """LPIPS v0.1 (Zhang et al. 2018, the lpips package's network) built from two local files, nothing downloaded:
    `weights`, the lpips package's linear layers (weights/v0.1/alex.pth or vgg.pth: lin0..lin4.model.1.weight),
    and `backbone`, torchvision's AlexNet or VGG16 state dict (its `features.*` entries; which one is read
    from the first convolution's kernel). Images: uint8 (H, W, 3); the distance of one pair is returned."""

    def __init__(self, weights: str, backbone: str, device="cpu"):
        import torch
        import torchvision

        lin, trunk = (
            _load_state_dict(weights, "--lpips-weights"),
            _load_state_dict(backbone, "--lpips-backbone"),
        )
        if "features.0.weight" in trunk:
            trunk = {k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.")}
        first = trunk.get("0.weight")
        kernel = None if first is None or first.ndim != 4 else first.shape[-1]
        self.net = {11: "alex", 3: "vgg"}.get(kernel) if "10.weight" in trunk else None
        if self.net is None:
            raise UserError(
                f"--lpips-backbone {backbone} is neither torchvision's AlexNet nor its VGG16 weights (no features.0 "
                f"convolution of kernel 11 or 3); pass alexnet-owt-7be5be79.pth or vgg16-397923af.pth."
            )
        build = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}[self.net]
        features = build(weights=None).features
        try:
            features.load_state_dict(trunk)
        except RuntimeError as err:
            raise UserError(
                f"--lpips-backbone {backbone} does not fit torchvision's {self.net} ({str(err).splitlines()[0][:120]})."
            ) from None
        channels = LPIPS_TRUNKS[self.net]["channels"]
        self.lins = []
        for i, c in enumerate(channels):
            w = lin.get(f"lin{i}.model.1.weight")
            if w is None or tuple(w.shape) != (1, c, 1, 1):
                raise UserError(
                    f"--lpips-weights {weights} has no linear layer lin{i}.model.1.weight of shape (1, {c}, 1, 1) for "
                    f"the {self.net} backbone; pass the lpips package's weights/v0.1/{self.net}.pth."
                )
            self.lins.append(w.float().to(device))
        self.device = torch.device(device)
        self.features = features.to(self.device).eval()
        self.slices = LPIPS_TRUNKS[self.net]["slices"]
        self.files = {"weights": weights, "backbone": backbone}

    def describe(self) -> dict:
        from onestep.utils import file_sha256

        return {
            "name": f"LPIPS v0.1, {self.net} trunk, from local files",
            "weights": {"path": os.path.abspath(self.files["weights"]), "sha256": file_sha256(self.files["weights"])},
            "backbone": {
                "path": os.path.abspath(self.files["backbone"]),
                "sha256": file_sha256(self.files["backbone"]),
            },
        }

    def _layers(self, x):
        out = []
        for start, stop in self.slices:
            for i in range(start, stop):
                x = self.features[i](x)
            out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))  # lpips' normalize_tensor
        return out

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        import torch

        shift = torch.tensor(LPIPS_SHIFT, device=self.device).view(1, 3, 1, 1)
        scale = torch.tensor(LPIPS_SCALE, device=self.device).view(1, 3, 1, 1)

        def prepare(img):
            x = torch.tensor(img, device=self.device).permute(2, 0, 1)[None].float()
            return (x / 127.5 - 1 - shift) / scale

        with torch.no_grad():
            try:
                fa, fb = self._layers(prepare(a)), self._layers(prepare(b))
            except RuntimeError:  # a pooling stage left nothing: the image is smaller than the trunk's reach
                raise UserError(
                    f"LPIPS ({self.net}) cannot take a {a.shape[1]}x{a.shape[0]} image, too small for its trunk; measure larger images or crops."
                ) from None
            total = sum(((x - y) ** 2 * w).sum(dim=1).mean() for x, y, w in zip(fa, fb, self.lins))
        return float(total)


class DownloadedLPIPS:
    """The lpips package's AlexNet LPIPS as it ships (`--lpips`): torchvision fetches the trunk on first use."""

    def __init__(self, device="cpu"):
        try:
            import lpips  # the optional extra onestep[lpips]
        except ImportError:
            raise UserError("--lpips needs the optional lpips package: pip install 'onestep[lpips]'.") from None
        try:
            self.net = lpips.LPIPS(net="alex", verbose=False).to(device)
        except Exception as err:  # torchvision fetches the AlexNet backbone on first use
            raise UserError(
                f"--lpips could not load its AlexNet weights ({err.__class__.__name__}); run it once on a machine "
                f"with internet so torchvision caches them, or pass --lpips-weights and --lpips-backbone."
            ) from None
        self.device = device

    def describe(self) -> dict:
        return {"name": "lpips AlexNet v0.1 (the lpips package, trunk from torchvision's cache), inputs in [-1, 1]"}

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        import torch

        prepare = lambda img: torch.tensor(img).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
        with torch.no_grad():
            return float(self.net(prepare(a).to(self.device), prepare(b).to(self.device)).item())


def seed_summary(per_seed: dict[int, float]) -> dict:
    """Mean and sample standard deviation (ddof 1; None with one seed) of one figure over seeds."""
    values = np.array(list(per_seed.values()), dtype=np.float64)
    with np.errstate(invalid="ignore"):  # PSNR of identical images is inf: its spread is undefined
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        mean = float(np.mean(values))
    return {"mean": mean, "std": std, "per_seed": {str(s): float(v) for s, v in per_seed.items()}}
