"""The work behind each `onestep-eval` subcommand, as library functions with typed options (options.py);
cli.py parses the command line and calls them."""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from onestep.errors import UserError
from onestep.images import image_size
from onestep.utils import file_sha256

from . import metrics
from .features import DigitsFeatures, build_features
from .options import ClipOptions, FeatureOptions, ReferenceOptions, SamplingOptions, SourceOptions
from .record import CommandLine, check_output, new_record, write_record
from .sources import (
    PipelineSampler,
    SamplePlan,
    TeacherSampler,
    check_same_size,
    digits_reference_images,
    list_images,
    read_image,
    read_images,
    run_sharded,
)


def _state():
    """accelerate's process state when launched with several processes, else None (plain single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU: say it, or a gloo run degrades to 2 copies.
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
        return PartialState(cpu=cpu)
    return None


def _device(device: str | None, state):
    if device:
        return torch.device(device)
    if state is not None:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_main(state) -> bool:
    return state is None or state.is_main_process


def _check_class_flags(source: SourceOptions) -> None:
    if not source.teacher and (source.num_classes is not None or source.null_class is not None):
        raise UserError("--num-classes and --null-class describe the classes of a --teacher; drop them here.")


def _sampler(source: SourceOptions, sampling: SamplingOptions, device):
    _check_class_flags(source)
    if source.pipeline:
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[sampling.dtype]
        return PipelineSampler(
            source.pipeline, device, sampling.steps, sampling.guidance_scale, dtype, sampling.trust_remote_code
        )
    if source.teacher:
        if not sampling.steps:
            raise UserError("--teacher needs --steps (the number of DDIM steps).")
        return TeacherSampler(
            source.teacher,
            sampling.steps,
            device,
            sampling.guidance_scale if sampling.guidance_scale is not None else 1.0,
            source.num_classes,
            source.null_class,
        )
    return None


def generated_features(
    source: SourceOptions,
    sampling: SamplingOptions,
    extractor,
    state,
    device,
    crop_size: int | None = None,
    prompts: list[str] | None = None,
) -> tuple[metrics.FeatureStats, dict]:
    """Features of the evaluated images (pipeline, teacher, image folder, or a saved statistics file);
    crop_size: centre-crop the images of a folder as they are read (None or 0: off)."""
    if source.stats:
        stats = metrics.FeatureStats.load(source.stats)
        _check_same_features(stats, extractor, source.stats)
        return stats, {
            "kind": "statistics file",
            "path": os.path.abspath(source.stats),
            "sha256": file_sha256(source.stats),
            **stats.meta,
        }
    sampler = _sampler(source, sampling, device)
    if prompts is None and source.prompts:
        from onestep.data import read_prompts

        if sampler is None:
            raise UserError(
                "--prompts applies to generated images (--pipeline); an image folder is evaluated as it is."
            )
        prompts = read_prompts(source.prompts)
    num_samples, seed = sampling.num_samples, sampling.seed
    if prompts is not None and num_samples:
        prompts = [prompts[i % len(prompts)] for i in range(num_samples)]  # N images cycle over the prompts
    classify = isinstance(extractor, DigitsFeatures)
    if sampler is None:
        files = list_images(source.images)
        if num_samples:
            if num_samples > len(files):
                raise UserError(
                    f"--num-samples {num_samples} is more than the {len(files)} images in {source.images}."
                )
            files = files[:num_samples]
        crop = crop_size or 0
        if not crop:  # with a crop, mixed sizes are fine: every image is cropped before stacking
            check_same_size(files)
        plan = SamplePlan(len(files), sampling.batch_size)
        described = {
            "kind": "image folder",
            "path": os.path.abspath(source.images),
            "num_images": len(files),
            "sha256": files_sha256(files),
        }

        def work(b):
            images = read_images(files[b.start : b.stop], crop)
            return extractor(images), None, images if b.start == 0 else None
    else:
        if not num_samples:
            raise UserError("--num-samples is required when images are generated.")
        num_classes = sampler.num_classes if prompts is None else None
        plan = SamplePlan(num_samples, sampling.batch_size, seed, sampling.class_sampling, num_classes)
        labels = plan.labels()
        described = sampler.describe()
        if prompts is not None:
            described["prompts_file"] = {
                "path": os.path.abspath(source.prompts),
                "sha256": file_sha256(source.prompts),
            }

        def work(b):
            lab = labels[b.start : b.stop] if labels is not None else None
            images = sampler(b, seed, lab, prompts[b.start : b.stop] if prompts is not None else None)
            preds = extractor.classify(images) if (classify and lab is not None) else None
            return extractor(images), preds, images if b.start == 0 else None

    parts = run_sharded(plan.batches(), work, state)
    feats = np.concatenate([p[0] for p in parts])
    meta = {"source": described, "sampling": plan.describe(), "features": extractor.describe()}
    if parts[0][1] is not None:
        preds = np.concatenate([p[1] for p in parts])
        meta["class_accuracy"] = float(np.mean(preds == plan.labels()))
    stats = metrics.FeatureStats.from_features(feats, meta)
    stats.first_images = parts[0][2]
    return stats, meta


def _check_same_features(stats: metrics.FeatureStats, extractor, path: str) -> None:
    made_with, mine = stats.meta.get("features", {}), extractor.describe()
    if made_with and any(made_with.get(k) != mine[k] for k in ("name", "weights_sha256", "resize")):
        raise UserError(
            f"{path} was made with other features ({made_with.get('name')}, weights {str(made_with.get('weights_sha256'))[:12]}) "
            f"than this run ({mine['name']}, weights {str(mine['weights_sha256'])[:12]}); remake it or pass the matching --features."
        )


def files_sha256(files: list[str]) -> str:
    """One hash over a list of image files (names and each file's SHA-256), so a folder reference is pinned."""
    import hashlib

    h = hashlib.sha256()
    for path in files:
        h.update(os.path.basename(path).encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def reference_features(
    reference: ReferenceOptions,
    extractor,
    state=None,
    *,
    batch_size: int = 64,
    mode: str = "clean",
    crop_size: int | None = None,
    kid: bool = False,
) -> tuple[metrics.FeatureStats, dict]:
    """Features of the reference. mode: clean-fid's mode of named statistics; crop_size: centre-crop the
    images of a reference folder as they are read (None or 0: off); kid: also fetch the features of
    clean-fid's named statistics (KID needs them)."""
    name, split, res = reference.ref_name, reference.ref_split, reference.ref_res
    if name:
        if res is None and split != "custom":
            raise UserError("--ref-name needs --ref-res (the statistics' resolution), unless --ref-split custom.")
        if not extractor.name.startswith("inception"):
            raise UserError(
                "clean-fid's named statistics are Inception statistics; use --features inception with --ref-name."
            )
        from cleanfid.features import get_reference_statistics

        try:
            mu, sigma = get_reference_statistics(name, res, mode=mode, split=split)
            feats = None
            if kid:
                feats = get_reference_statistics(name, res, mode=mode, split=split, metric="KID")
        except Exception as err:  # clean-fid raises URLError/HTTPError/FileNotFoundError
            raise UserError(
                f"Cannot get clean-fid's statistics {name}/{split}/{res} ({err.__class__.__name__}); "
                f"they are downloaded on first use, or pass --ref with a statistics file or image folder."
            ) from None
        stats = metrics.FeatureStats(mu, sigma, feats, {})
        return stats, {"kind": "clean-fid statistics", "name": name, "split": split, "res": res, "mode": mode}
    ref = reference.ref
    if ref is None:
        raise UserError(
            "Give a reference: --ref (image folder, statistics .npz, or 'digits') or --ref-name (clean-fid statistics)."
        )
    if ref == "digits":
        images, _ = digits_reference_images()
        stats = metrics.FeatureStats.from_features(extractor(images))
        import hashlib

        return stats, {
            "kind": "bundled dataset",
            "name": "scikit-learn digits, all 1,797 images at 16x16",
            "num_images": len(images),
            "sha256": hashlib.sha256(images.tobytes()).hexdigest(),
        }
    if os.path.isfile(ref):
        stats = metrics.FeatureStats.load(ref)
        _check_same_features(stats, extractor, ref)
        return stats, {
            "kind": "statistics file",
            "path": os.path.abspath(ref),
            "sha256": file_sha256(ref),
            "num_images": stats.meta.get("num_images"),
        }
    files = list_images(ref)
    crop = crop_size or 0
    if not crop:
        check_same_size(files)
    plan = SamplePlan(len(files), batch_size)
    feats = np.concatenate(
        run_sharded(plan.batches(), lambda b: extractor(read_images(files[b.start : b.stop], crop)), state)
    )
    return metrics.FeatureStats.from_features(feats), {
        "kind": "image folder",
        "path": os.path.abspath(ref),
        "num_images": len(files),
        "sha256": files_sha256(files),
    }


def _extractor(features: FeatureOptions, device):
    return build_features(
        features.features,
        device,
        features.mode,
        features.inception_weights,
        features.clip_model,
        features.clip_pretrained,
        features.crop_size or 0,
    )


def _save_grid(images: np.ndarray | None, path: str) -> None:
    if images is None:
        return
    from onestep.utils import save_image_grid

    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(x, path, scale=max(1, 128 // images.shape[1]))


def distance(
    metric: str,
    source: SourceOptions,
    sampling: SamplingOptions,
    features: FeatureOptions,
    reference: ReferenceOptions,
    output: str,
    *,
    save_stats: str | None = None,
    plot: str | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    command_line: CommandLine | None = None,
) -> dict:
    """fid and kid (metric): generated (or folder, or saved) features against a reference; the JSON record
    goes to output (command_line: recorded in it), and is returned. save_stats: also save the evaluated
    features as .npz; plot: a PNG grid of the first 64 evaluated images."""
    if metric not in ("fid", "kid"):
        raise ValueError(f"metric must be 'fid' or 'kid', got {metric!r}")
    check_output(output, f"{metric}.json")
    check_output(save_stats, "generated.npz", "--save-stats")
    check_output(plot, f"{metric}.png", "--plot")
    _check_class_flags(source)
    if sampling.num_samples is not None and sampling.num_samples < 2:
        raise UserError(
            f"{metric.upper()} needs at least 2 images per set; got --num-samples {sampling.num_samples}."
            if metric == "fid"
            else f"KID needs at least 2 images per set (its unbiased estimate compares pairs); got --num-samples {sampling.num_samples}."
        )
    if reference.ref_name and reference.ref_res is None and reference.ref_split != "custom":  # before any weights load
        raise UserError("--ref-name needs --ref-res (the statistics' resolution), unless --ref-split custom.")
    state = _state()
    device = _device(sampling.device, state)
    start = time.perf_counter()
    extractor = _extractor(features, device)
    ref, ref_info = reference_features(
        reference,
        extractor,
        state,
        batch_size=sampling.batch_size,
        mode=features.mode,
        crop_size=features.crop_size,
        kid=metric == "kid",
    )
    gen, gen_info = generated_features(source, sampling, extractor, state, device, features.crop_size)
    record = new_record(metric, device, state.num_processes if state else 1, command_line)
    warning = None
    if metric == "fid":
        warning = metrics.fid_sample_warning(gen, ref)
        if warning:  # scipy's "singular matrix" warning and clean-fid's print say the same, less clearly
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                value = metrics.fid(gen, ref)
            record["warning"] = warning
        else:
            value = metrics.fid(gen, ref)
    else:
        value = metrics.kid(gen, ref, sampling.seed, kid_subsets, kid_subset_size)
        record["kid_protocol"] = {
            "num_subsets": kid_subsets,
            "max_subset_size": kid_subset_size,
            "subset_seed": sampling.seed,
            "kernel": "(x.y / d + 1)^3, unbiased MMD^2 (clean-fid kernel_distance)",
        }
    record.update(
        {
            metric: value,
            "generated": gen_info,
            "reference": ref_info,
            "features": extractor.describe(),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    if "class_accuracy" in gen_info:
        record["class_accuracy"] = gen_info["class_accuracy"]
    if _is_main(state):
        if save_stats and not source.stats:
            gen.save(save_stats)
        if plot:
            _save_grid(getattr(gen, "first_images", None), plot)
        write_record(output, record)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        extra = f", class accuracy {record['class_accuracy']:.4f}" if "class_accuracy" in record else ""
        print(
            f"{metric.upper()} {value:.6g} ({gen.meta.get('num_images', '?')} vs {ref.meta.get('num_images', len(ref.feats) if ref.feats is not None else '?')} images, "
            f"{extractor.name}{extra}) -> {output}"
        )
    return record


def make_stats(
    source: SourceOptions,
    sampling: SamplingOptions,
    features: FeatureOptions,
    output: str,
    *,
    cleanfid_name: str | None = None,
) -> dict:
    """Features of any source saved as .npz at output (source.images "digits": the bundled dataset), and,
    with cleanfid_name, as clean-fid custom statistics. Returns the statistics' meta."""
    check_output(output, "stats.npz")
    _check_class_flags(source)
    state = _state()
    device = _device(sampling.device, state)
    extractor = _extractor(features, device)
    if source.images == "digits":
        images, _ = digits_reference_images()
        stats = metrics.FeatureStats.from_features(
            extractor(images),
            {"source": {"kind": "bundled dataset", "name": "sklearn digits"}, "features": extractor.describe()},
        )
    else:
        stats, _ = generated_features(source, sampling, extractor, state, device, features.crop_size)
    if not _is_main(state):
        return {}
    if cleanfid_name and not extractor.name.startswith("inception"):
        raise UserError(
            "clean-fid custom statistics are Inception statistics; use --features inception with --cleanfid-name."
        )
    stats.save(output)
    if cleanfid_name:
        _write_cleanfid_custom(stats, cleanfid_name, features.mode, extractor)
    print(f"Wrote statistics of {stats.meta['num_images']} images ({extractor.name}, dim {stats.dim}) to {output}")
    return stats.meta


def _write_cleanfid_custom(stats, name: str, mode: str, extractor) -> None:
    """Where clean-fid's make_custom_stats puts them, so compute_fid(dataset_split="custom") finds them."""
    import cleanfid

    if not extractor.name.startswith("inception"):
        raise UserError("clean-fid custom statistics are Inception statistics; use --features inception.")
    folder = os.path.join(os.path.dirname(cleanfid.__file__), "stats")
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"{name}_{mode}_custom_na".lower())
    if os.path.exists(base + ".npz"):
        raise UserError(
            f"clean-fid already has custom statistics named {name}; remove them with cleanfid.fid.remove_custom_stats first."
        )
    np.savez(base + ".npz", mu=stats.mu, sigma=stats.sigma)
    np.savez(base + "_kid.npz", feats=stats.feats)


def clip_score(
    source: SourceOptions,
    sampling: SamplingOptions,
    clip_options: ClipOptions,
    output: str,
    *,
    command_line: CommandLine | None = None,
) -> dict:
    """CLIP score of a text-to-image pipeline over source.prompts, or of captioned images (source.images with
    source.prompts or its metadata.jsonl); the JSON record goes to output, and is returned."""
    from onestep.data import read_captions, read_prompts

    from .clip import clip_scores, load_open_clip, scale_scores

    check_output(output, "clip.json")
    state = _state()
    device = _device(sampling.device, state)
    start = time.perf_counter()
    prefix, crop_size, seed = clip_options.prefix, clip_options.crop_size, sampling.seed
    clip = None  # loaded after the inputs are checked: a ViT-g-14 takes a while
    if source.images:
        files = list_images(source.images)
        if source.prompts:
            prompts = read_prompts(source.prompts)
        elif os.path.isfile(os.path.join(source.images, "metadata.jsonl")):
            prompts = read_captions(source.images, files)
        else:
            raise UserError(f"Pass --prompts, or put a metadata.jsonl (file_name, text) in {source.images}.")
        if len(prompts) != len(files):
            raise UserError(
                f"{source.images} holds {len(files)} images but there are {len(prompts)} prompts; they pair in sorted order."
            )
        n = sampling.num_samples or len(files)
        if n > len(files):
            raise UserError(f"--num-samples {n} is more than the {len(files)} images in {source.images}.")
        files, prompts = files[:n], prompts[:n]
        plan = SamplePlan(n, sampling.batch_size)
        work = (
            lambda b: clip_scores(
                clip,
                [read_image(p) for p in files[b.start : b.stop]],  # noqa: E731
                prompts[b.start : b.stop],
                prefix,
                crop_size,
            )
        )
        described = {"kind": "image folder", "path": os.path.abspath(source.images)}
    else:
        if source.teacher:
            raise UserError(
                "clip scores text-to-image pipelines (--pipeline) or captioned images (--images), not --teacher."
            )
        if not source.prompts:
            raise UserError("--prompts FILE is required with --pipeline.")
        all_prompts = read_prompts(source.prompts)
        n = sampling.num_samples or len(all_prompts)
        prompts = [all_prompts[i % len(all_prompts)] for i in range(n)]
        sampler = _sampler(source, sampling, device)
        plan = SamplePlan(n, sampling.batch_size, seed)
        work = lambda b: clip_scores(
            clip,
            sampler(b, seed, None, prompts[b.start : b.stop]),
            prompts[b.start : b.stop],  # noqa: E731
            prefix,
            crop_size,
        )
        described = sampler.describe()
    clip = load_open_clip(clip_options.model, clip_options.pretrained, device)
    cos = np.concatenate(run_sharded(plan.batches(), work, state))
    value = float(np.mean(scale_scores(cos, clip_options.scale)))
    record = new_record("clip", device, state.num_processes if state else 1, command_line)
    record.update(
        {
            "clip_score": value,
            "scale": {
                "raw": "raw cosine (DMD2's convention, ~0.3)",
                "100": "100 * max(cosine, 0) (torchmetrics' convention, ~30)",
            }[clip_options.scale],
            "prompt_prefix": prefix,
            "prompts_file": os.path.abspath(source.prompts) if source.prompts else None,
            "num_images": int(len(cos)),
            "image_preprocess": f"centre crop to square, LANCZOS resize to {crop_size}, then open_clip's preprocess"
            if crop_size
            else "open_clip's preprocess only",
            "clip_model": {
                "name": clip.model_name,
                "pretrained": clip.pretrained,
                "weights_sha256": clip.weights_sha256,
            },
            "source": described,
            "sampling": plan.describe(),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    if _is_main(state):
        write_record(output, record)
        print(
            f"CLIP score {value:.6g} ({clip_options.scale}, {len(cos)} images, {clip.model_name}/{clip.pretrained}) -> {output}"
        )
    return record


def _by_name(folder: str) -> dict[str, str]:
    """Images keyed by their path inside the folder without extension (LR/SR/HR pair by name)."""
    return {os.path.splitext(os.path.relpath(p, folder))[0]: p for p in list_images(folder)}


def super_resolution(
    hr: str,
    output: str,
    *,
    sr: str | None = None,
    pipeline: str | None = None,
    lr: str | None = None,
    steps: int | None = None,
    num_samples: int | None = None,
    crop_border: int = 0,
    lpips: bool = False,
    seed: int = 0,
    device: str | None = None,
    trust_remote_code: bool = False,
    command_line: CommandLine | None = None,
    t: float | None = None,
) -> dict:
    """PSNR / SSIM (RGB and Y) [and LPIPS] of the super-resolved images in folder sr, or of a pipeline's
    outputs from the low-resolution folder lr, against the folder hr (paired by file name); crop_border:
    pixels cut from each border first; t: the pipeline's fidelity-realism knob (OFTSR). The JSON record goes to
    output, and is returned."""
    check_output(output, "sr.json")
    if crop_border < 0:
        raise UserError(f"--crop-border must be 0 or more; got {crop_border}.")
    if t is not None and (sr or not 0.0 <= t <= 1.0):
        raise UserError(f"--t is a pipeline's knob in [0, 1] (OFTSR); got {t}" + (" with --sr." if sr else "."))
    state = _state()
    device = _device(device, state)
    hr_files = _by_name(hr)
    if sr:
        other = _by_name(sr)
    else:
        if not (pipeline and lr):
            raise UserError("Give --sr (super-resolved images) or --pipeline with --lr (low-resolution inputs).")
        other = _by_name(lr)
    missing = sorted(set(hr_files) - set(other))
    if missing:
        raise UserError(
            f"No {'SR' if sr else 'LR'} image matches the HR image {hr_files[missing[0]]} (images pair by file name)."
        )
    names = sorted(hr_files)[:num_samples] if num_samples else sorted(hr_files)
    _check_crop_border([hr_files[n] for n in names], crop_border)
    sampler = None if sr else PipelineSampler(pipeline, device, steps, None, None, trust_remote_code)
    rows, pipeline_seconds = [], 0.0
    for i, name in enumerate(names):
        target = read_image(hr_files[name])
        if sampler is None:
            out = read_image(other[name])
        else:
            from PIL import Image

            from onestep.utils import to_uint8

            from .sources import generators

            low = Image.fromarray(read_image(other[name]))
            kwargs = {"image": low, "generator": generators(seed, [i])[0], "output_type": "np"}
            if steps:
                kwargs["num_inference_steps"] = steps
            if t is not None:
                kwargs["t"] = t
            start = time.perf_counter()
            try:
                images = sampler.pipe(**kwargs).images
            except ValueError as err:  # the pipeline refuses the input or the knob in one sentence
                raise UserError(f"{pipeline} refused {name}: {err}") from None
            out = to_uint8(images, (0, 1), "auto")[0]  # pipeline output: [0, 1]
            pipeline_seconds += time.perf_counter() - start
        if out.shape != target.shape:
            raise UserError(
                f"The output for {name} is {out.shape[1]}x{out.shape[0]} but its HR image is {target.shape[1]}x{target.shape[0]}."
            )
        a, b = metrics.crop_border(out, crop_border), metrics.crop_border(target, crop_border)
        ya, yb = metrics.rgb_to_y(a), metrics.rgb_to_y(b)
        rows.append(
            {
                "image": name,
                "psnr_rgb": metrics.psnr(a, b),
                "ssim_rgb": metrics.ssim(a, b),
                "psnr_y": metrics.psnr(ya, yb),
                "ssim_y": metrics.ssim(ya, yb),
            }
        )
    record = new_record("sr", device, 1, command_line)
    for key in ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y"):
        record[key] = float(np.mean([r[key] for r in rows]))
    if sampler is not None:
        record["t"] = t
        record["images_per_second"] = len(rows) / pipeline_seconds if pipeline_seconds else None
    record["lpips"] = None
    record["lpips_note"] = (
        "not computed: LPIPS needs the lpips package and its backbone weights (pip install lpips; downloads AlexNet once)"
    )
    if lpips:
        record["lpips"], record["lpips_note"] = _lpips(names, hr_files, other, sampler, device)
    record.update(
        {
            "protocol": {
                "data_range": 255,
                "crop_border": crop_border,
                "y_channel": "BT.601 (MATLAB rgb2ycbcr), 16..235",
                "ssim": "Gaussian window sigma 1.5 (11 taps), K1 0.01, K2 0.03, population covariance, mean over channels",
            },
            "hr": os.path.abspath(hr),
            "source": sampler.describe() if sampler else {"kind": "image folder", "path": os.path.abspath(sr)},
            "num_images": len(rows),
            "per_image": rows,
        }
    )
    if _is_main(state):
        write_record(output, record)
        print(
            f"PSNR {record['psnr_rgb']:.3f} dB (Y {record['psnr_y']:.3f}), SSIM {record['ssim_rgb']:.4f} (Y {record['ssim_y']:.4f}) "
            f"over {len(rows)} images -> {output}"
        )
    return record


def _check_crop_border(files: list[str], border: int) -> None:
    """Before any image is decoded: the smallest HR image keeps at least SSIM's window after the border cut
    (less would write NaN into the record); the sizes come from the file headers."""
    k = metrics.SSIM_MIN_SIZE
    sizes = {p: image_size(p) for p in files}
    smallest = min(files, key=lambda p: min(sizes[p]))
    w, h = sizes[smallest]
    largest = (min(w, h) - k) // 2
    if largest < 0:
        raise UserError(
            f"The HR image {smallest} is {w}x{h}, smaller than SSIM's {k}x{k} window; measure images of at least {k}x{k} pixels."
        )
    if border > largest:
        left = f"{max(w - 2 * border, 0)}x{max(h - 2 * border, 0)}"
        raise UserError(
            f"--crop-border {border} leaves {left} of the {w}x{h} HR image {smallest}, less than SSIM's {k}x{k} window; "
            f"the largest border allowed is {largest}."
        )


def _lpips(names, hr, other, sampler, device):
    if sampler is not None:
        raise UserError("--lpips with --pipeline is not supported yet; save the outputs and pass --sr.")
    try:
        import lpips  # the optional extra onestep[lpips]
    except ImportError:
        raise UserError("--lpips needs the optional lpips package: pip install 'onestep[lpips]'.") from None
    try:
        net = lpips.LPIPS(net="alex", verbose=False).to(device)
    except Exception as err:  # torchvision fetches the AlexNet backbone on first use
        raise UserError(
            f"--lpips could not load its AlexNet weights ({err.__class__.__name__}); run it once on a machine "
            f"with internet so torchvision caches them."
        ) from None
    vals = []
    for name in names:
        a = torch.from_numpy(read_image(other[name])).permute(2, 0, 1)[None].float() / 127.5 - 1
        b = torch.from_numpy(read_image(hr[name])).permute(2, 0, 1)[None].float() / 127.5 - 1
        vals.append(float(net(a.to(device), b.to(device)).item()))
    return float(np.mean(vals)), "lpips AlexNet v0.1, inputs in [-1, 1]"


def _time(fn, repeats: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def bench(
    pipeline: str,
    output: str,
    *,
    steps: int | None = None,
    teacher: str | None = None,
    teacher_steps: Sequence[int] = (50,),
    guidance_scale: float | None = None,
    batch_size: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    device: str | None = None,
    trust_remote_code: bool = False,
    run: str | None = None,
    plot: str | None = None,
    command_line: CommandLine | None = None,
    num_classes: int | None = None,
    null_class: int | None = None,
) -> dict:
    """Sampling speed of a student pipeline beside its teacher at N steps (each of teacher_steps): same batch,
    device, noise. run: a training output folder whose timing.json is included; plot: a PNG bar chart.
    The JSON record goes to output, and is returned. num_classes, null_class: the class layout of a
    class-conditional teacher without onestep.json."""
    check_output(output, "bench.json")
    check_output(plot, "bench.png", "--plot")
    if not teacher and (num_classes is not None or null_class is not None):
        raise UserError("--num-classes and --null-class describe the classes of a --teacher; drop them here.")
    if run and not os.path.isfile(os.path.join(run, "timing.json")):  # before the timing, not after
        raise UserError(f"{run} has no timing.json; pass the output folder of a training run.")
    device = _device(device, None)
    student = PipelineSampler(pipeline, device, steps, None, None, trust_remote_code)
    n_steps = lambda n: f"{n} step" + ("s" if n != 1 else "")  # noqa: E731
    samplers = [(f"student ({n_steps(steps or len(student.pipe.config.get('timesteps', [1])))})", student)]
    for n in teacher_steps:
        if teacher:
            samplers.append(
                (
                    f"teacher DDIM {n_steps(n)}",
                    TeacherSampler(teacher, n, device, guidance_scale or 1.0, num_classes, null_class),
                )
            )
    batch = range(batch_size)
    rows = []
    for name, sampler in samplers:
        labels = SamplePlan(batch_size, batch_size, seed, "uniform", sampler.num_classes).labels()
        times = _time(lambda s=sampler, lab=labels: s(batch, seed, lab), repeats, warmup, device)
        med = statistics.median(times)
        rows.append(
            {
                "sampler": name,
                "source": sampler.describe(),
                "latency_s_median": med,
                "latency_s_all": times,
                "images_per_s": batch_size / med,
            }
        )
    for r in rows[1:]:
        r["student_speedup"] = rows[0]["images_per_s"] and rows[0]["images_per_s"] / r["images_per_s"]
    record = new_record("bench", device, 1, command_line)
    record.update(
        {
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "torch_threads": torch.get_num_threads(),
            "timing": "wall clock per pipeline call (noise, network, decode to uint8), median of repeats",
            "results": rows,
        }
    )
    if run:
        import json

        path = os.path.join(run, "timing.json")
        if not os.path.isfile(path):
            raise UserError(f"{run} has no timing.json; pass the output folder of a training run.")
        with open(path) as f:
            record["training_step_breakdown"] = json.load(f)
    if plot:
        _speed_plot(rows, plot)
    write_record(output, record)
    for r in rows:
        extra = f", student is {r['student_speedup']:.1f}x faster" if "student_speedup" in r else ""
        print(
            f"{r['sampler']}: {r['images_per_s']:.1f} images/s ({r['latency_s_median'] * 1000:.1f} ms per batch of {batch_size}{extra})"
        )
    return record


def _speed_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.6 * len(rows) + 1))
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.barh([r["sampler"] for r in rows], [r["images_per_s"] for r in rows])
    ax.set_xscale("log")
    # Label the decades only: matplotlib's default also labels minor ticks, which then overlap.
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    for i, r in enumerate(rows):
        ax.annotate(f" {r['images_per_s']:.3g}", (r["images_per_s"], i), va="center", fontsize=8)
    ax.set_xlabel("images / s (log scale)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
