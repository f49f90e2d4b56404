"""FID during training: a small, fixed-noise sample of the student scored against reference statistics.

The same seeds are used at every evaluation, so the curve shows the student changing, not the noise.
"""

from __future__ import annotations

import numpy as np
import torch

from onestep.errors import UserError
from onestep.utils import seed_for, to_uint8

from . import metrics
from .features import DigitsFeatures, build_features


class FIDEvaluator:
    def __init__(
        self,
        features: str = "digits",
        reference: str = "digits",
        num_samples: int = 500,
        batch_size: int = 100,
        seed: int = 0,
        device="cpu",
        inception_weights: str | None = None,
    ):
        from .commands import reference_features
        from .options import ReferenceOptions

        self.extractor = build_features(features, device, inception_weights=inception_weights)
        self.reference, _ = reference_features(
            ReferenceOptions(ref=reference), self.extractor, None, batch_size=batch_size
        )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.name = f"fid_{features}_{num_samples}"

    @torch.no_grad()
    def __call__(self, sample_fn) -> dict[str, float]:
        """sample_fn(n, seed) -> (n, C, H, W) images in [-1, 1], class labels cycling 0..C-1."""
        feats, correct, count = [], 0, 0
        for chunk, start in enumerate(range(0, self.num_samples, self.batch_size)):
            n = min(self.batch_size, self.num_samples - start)
            images = to_uint8(sample_fn(n, seed_for(self.seed, "eval", chunk)))
            feats.append(self.extractor(images))
            if isinstance(self.extractor, DigitsFeatures):
                correct += int((self.extractor.classify(images) == np.arange(n) % 10).sum())
                count += n
        out = {self.name: metrics.fid(metrics.FeatureStats.from_features(np.concatenate(feats)), self.reference)}
        if count:
            out["class_accuracy"] = correct / count
        return out


def build_evaluator(evaluation, teacher_id: str, seed: int, device) -> FIDEvaluator:
    """The in-training FID evaluator of a run distilling (or training) teacher_id, its noise fixed by seed.
    `evaluation`: the run's onestep.config.EvalConfig (eval_samples, eval_features, eval_reference,
    inception_weights)."""
    reference = evaluation.eval_reference or ("digits" if teacher_id == "digits" else None)
    features = evaluation.eval_features or ("digits" if teacher_id == "digits" else "inception")
    if reference is None:
        raise UserError(
            "--eval_steps needs --eval_reference (an image folder or a statistics .npz from onestep-eval stats)."
        )
    return FIDEvaluator(
        features,
        reference,
        evaluation.eval_samples,
        seed=seed,
        device=device,
        inception_weights=evaluation.inception_weights,
    )
