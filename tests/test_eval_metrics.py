"""Metric math of onestep-eval against clean-fid, scikit-image and a hand-computed CLIP score."""

import json

import numpy as np
import pytest
import torch

from onestep.errors import UserError
from onestep.eval import metrics
from onestep.eval.features import DigitsFeatures
from onestep.eval.sources import digits_reference_images


def _features(seed, n=400, d=16, shift=0.0):
    rng = np.random.RandomState(seed)
    mix = rng.randn(d, d) * 0.3 + np.eye(d)
    return rng.randn(n, d) @ mix + shift


def test_fid_equals_clean_fid_including_a_saved_statistics_file(tmp_path):
    from cleanfid.fid import fid_from_feats

    a, b = _features(0), _features(1, n=300, shift=0.3)
    expected = fid_from_feats(a, b)
    gen = metrics.FeatureStats.from_features(a, {"note": "gen"})
    gen.save(str(tmp_path / "gen.npz"))
    loaded = metrics.FeatureStats.load(str(tmp_path / "gen.npz"))
    assert loaded.meta["note"] == "gen" and loaded.meta["num_images"] == 400
    got = metrics.fid(loaded, metrics.FeatureStats.from_features(b))
    assert got == pytest.approx(expected, rel=1e-6)
    # clean-fid's own statistics layout (mu/sigma only) loads too.
    np.savez(tmp_path / "cf.npz", mu=np.mean(b, 0), sigma=np.cov(b, rowvar=False))
    assert metrics.fid(gen, metrics.FeatureStats.load(str(tmp_path / "cf.npz"))) == pytest.approx(expected, rel=1e-6)


def test_kid_equals_clean_fid_and_leaves_the_global_rng_alone():
    from cleanfid.fid import kernel_distance

    a, b = _features(2, n=250), _features(3, n=200, shift=0.2)
    np.random.seed(7)
    expected = kernel_distance(
        b, a, num_subsets=20, max_subset_size=150
    )  # clean-fid's compute_kid: (reference, generated)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    got = metrics.kid(
        metrics.FeatureStats.from_features(a),
        metrics.FeatureStats.from_features(b),
        seed=7,
        num_subsets=20,
        max_subset_size=150,
    )
    assert got == pytest.approx(expected, rel=1e-6)
    assert np.array_equal(np.random.get_state()[1], before)


def test_self_fid_is_zero_and_fid_grows_with_the_perturbation():
    ext = DigitsFeatures()
    images, _ = digits_reference_images()
    ref = metrics.FeatureStats.from_features(ext(images))
    assert abs(metrics.fid(ref, ref)) < 1e-6
    rng = np.random.RandomState(0)
    noise = rng.randn(*images.shape)
    values = []
    for level in (8, 16, 32, 64):  # Gaussian pixel noise, std in grey levels
        noisy = np.clip(images.astype(np.float64) + level * noise, 0, 255).round().astype(np.uint8)
        values.append(metrics.fid(metrics.FeatureStats.from_features(ext(noisy)), ref))
    assert values[0] > 1e-3 and all(x < y for x, y in zip(values, values[1:])), values


def test_shipped_digits_classifier_reaches_its_recorded_test_accuracy():
    from onestep.eval import digits_classifier as dc

    model, info = dc.load()
    images, labels, _, test_idx = dc.split_digits()
    with torch.no_grad():
        acc = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    assert acc == pytest.approx(info["test_accuracy"], abs=1e-4) and acc >= 0.97
    # classify() sees what the features see: uint8 images at any size go through the same preprocessing.
    ext = DigitsFeatures()
    uint8, y = digits_reference_images()
    assert (ext.classify(uint8[test_idx.numpy()]) == y[test_idx.numpy()]).mean() >= 0.97


def test_in_training_evaluator_takes_typed_options(tmp_path, monkeypatch):
    """build_evaluator(the run's EvalConfig, teacher_id, seed, device): digits features and reference by
    default for the digits teacher, the same noise at every evaluation; no reference otherwise is an error."""
    from onestep.config import EvalConfig
    from onestep.data import load_digits_images
    from onestep.eval.intraining import build_evaluator

    x, y = load_digits_images(16)  # (N, 1, 16, 16) in [-1, 1]
    by_class = [np.flatnonzero(y.numpy() == c) for c in range(10)]
    seeds = []

    def sample(n, seed):  # real digits drawn by the seed, class i mod 10 (as sample_fn's contract says)
        seeds.append(seed)
        rng = np.random.RandomState(seed % 2**32)
        return x[[rng.choice(by_class[i % 10]) for i in range(n)]]

    evaluator = build_evaluator(EvalConfig(eval_samples=150), "digits", seed=3, device="cpu")
    first, second = evaluator(sample), evaluator(sample)
    assert set(first) == {"fid_digits_150", "class_accuracy"} and first == second
    assert seeds[:2] == seeds[2:] and len(seeds) == 4  # 150 samples in batches of 100, the same seeds each time
    assert first["class_accuracy"] >= 0.95 and 0 <= first["fid_digits_150"] < 5
    noise = evaluator(lambda n, seed: torch.rand(n, 1, 16, 16) * 2 - 1)
    assert noise["fid_digits_150"] > 10 * first["fid_digits_150"]
    assert (
        build_evaluator(EvalConfig(eval_samples=150), "digits", seed=4, device="cpu")(sample) != first
    )  # other noise
    with pytest.raises(UserError, match="--eval_reference"):
        build_evaluator(EvalConfig(), "some/teacher", seed=0, device="cpu")
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Inception weights"):  # features default to inception for other teachers
        build_evaluator(EvalConfig(eval_reference="digits"), "some/teacher", seed=0, device="cpu")


def test_dimension_mismatch_and_missing_features_are_user_errors():
    a = metrics.FeatureStats.from_features(_features(0, d=16))
    b = metrics.FeatureStats.from_features(_features(1, d=8))
    with pytest.raises(UserError, match="different dimensions"):
        metrics.fid(a, b)
    with pytest.raises(UserError, match="needs the features"):
        metrics.kid(metrics.FeatureStats(a.mu, a.sigma), a)


def _skimage_pair():
    from skimage import data

    hr = data.astronaut()[100:196, 150:246]
    rng = np.random.RandomState(0)
    out = np.clip(hr.astype(np.float64) + rng.randn(*hr.shape) * 12, 0, 255).astype(np.uint8)
    return out, hr


def test_psnr_and_ssim_match_scikit_image_rgb_and_y():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out, hr = _skimage_pair()
    kw = dict(data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert metrics.psnr(out, hr) == pytest.approx(peak_signal_noise_ratio(hr, out, data_range=255), rel=1e-9)
    assert metrics.ssim(out, hr) == pytest.approx(structural_similarity(hr, out, channel_axis=-1, **kw), rel=1e-9)
    yo, yh = metrics.rgb_to_y(out), metrics.rgb_to_y(hr)
    assert metrics.psnr(yo, yh) == pytest.approx(peak_signal_noise_ratio(yh, yo, data_range=255), rel=1e-9)
    assert metrics.ssim(yo, yh) == pytest.approx(structural_similarity(yh[..., 0], yo[..., 0], **kw), rel=1e-9)
    # The luma of pure white and black (MATLAB rgb2ycbcr convention).
    assert metrics.rgb_to_y(np.array([[255, 255, 255], [0, 0, 0]], dtype=np.uint8))[:, 0] == pytest.approx(
        [235, 16], abs=1e-3
    )


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_config(tmp_path):
    path = tmp_path / "tiny-test-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def test_clip_score_equals_a_hand_computation(tmp_path):
    import open_clip
    from PIL import Image

    from onestep.eval.clip import clip_scores, load_open_clip, scale_scores

    torch.manual_seed(0)
    clip = load_open_clip(tiny_clip_config(tmp_path), "none")
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(3)]
    captions = ["a red bird", "two cats on a sofa", "x " * 200]  # the last one needs truncation
    got = clip_scores(clip, images, captions, prefix="A photo depicts ", crop_size=32)
    # By hand: centre square crop, LANCZOS to 32, CLIP preprocess, unit embeddings, dot product.
    model, _, preprocess = clip.model, None, clip.preprocess
    tok = open_clip.get_tokenizer("tiny-test-clip")
    expected = []
    for im, cap in zip(images, captions):
        pil = Image.fromarray(im[:, 10:50]).resize((32, 32), Image.LANCZOS)
        with torch.no_grad():
            e_i = model.encode_image(preprocess(pil)[None])
            e_t = model.encode_text(tok(["A photo depicts " + cap]))
        expected.append(float((e_i / e_i.norm() * (e_t / e_t.norm())).sum()))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert scale_scores(np.array([0.3, -0.1]), "100") == pytest.approx([30.0, 0.0])
