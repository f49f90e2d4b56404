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
    CROP_SCHEME,
    GENERATION,
    SUPER_RESOLUTION,
    PipelineSampler,
    SamplePlan,
    SuperResolutionRunner,
    TeacherSampler,
    bundled_low_resolution,
    check_kind,
    check_same_size,
    crop_boxes,
    digits_reference_images,
    image_channels,
    input_channels,
    list_images,
    read_image,
    read_images,
    refuse_super_resolution_teacher,
    resolve_sr_pipeline,
    run_sharded,
    sr_default_steps,
    sr_input_size,
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


def _sampler(source: SourceOptions, sampling: SamplingOptions, device, command: str = "fid"):
    _check_class_flags(source)
    if source.pipeline:
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[sampling.dtype]
        return PipelineSampler(
            source.pipeline,
            device,
            sampling.steps,
            sampling.guidance_scale,
            dtype,
            sampling.trust_remote_code,
            expect=GENERATION,
            command=command,
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
    command: str = "fid",
) -> tuple[metrics.FeatureStats, dict]:
    """Features of the evaluated images (pipeline, teacher, image folder, or a saved statistics file);
    crop_size: centre-crop the images of a folder as they are read (None or 0: off); command: named when a
    pipeline of the wrong kind is refused."""
    if source.stats:
        stats = metrics.FeatureStats.load(source.stats)
        _check_same_features(stats, extractor, source.stats)
        return stats, {
            "kind": "statistics file",
            "path": os.path.abspath(source.stats),
            "sha256": file_sha256(source.stats),
            **stats.meta,
        }
    sampler = _sampler(source, sampling, device, command)
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
    check_kind(source.pipeline, GENERATION, metric)
    if source.teacher:
        refuse_super_resolution_teacher(source.teacher)
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
    gen, gen_info = generated_features(source, sampling, extractor, state, device, features.crop_size, command=metric)
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
    check_kind(source.pipeline, GENERATION, "stats")
    if source.teacher:
        refuse_super_resolution_teacher(source.teacher)
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
        stats, _ = generated_features(source, sampling, extractor, state, device, features.crop_size, command="stats")
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
    check_kind(source.pipeline, GENERATION, "clip")
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
        sampler = _sampler(source, sampling, device, "clip")
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


# The figures of one measurement: against the HR image, against the teacher's output, and LPIPS.
SR_FIGURES = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y", "sharpness")
TEACHER_FIGURES = ("teacher_psnr_y", "teacher_mad")
TEACHER_DISTANCE = (
    "teacher_psnr_y: PSNR on Y of the output against the teacher's output for the same LR input and noise seed; "
    "teacher_mad: their mean absolute difference in 8-bit levels over RGB; both after the border cut"
)


def _channels_word(channels: int) -> str:
    return "grey (1 channel)" if channels == 1 else "colour (3 channels)"


def _check_sr_options(
    *,
    sr,
    pipeline,
    lr,
    t,
    crop_border,
    seeds,
    seed,
    crops_per_image,
    crop_size,
    teacher,
    teacher_steps,
    lpips,
    lpips_files,
) -> list[int]:
    """Everything the flags alone can say is wrong, before any file is read; returns the seeds."""
    if crop_border < 0:
        raise UserError(f"--crop-border must be 0 or more; got {crop_border}.")
    if t is not None and (sr or not 0.0 <= t <= 1.0):
        raise UserError(f"--t is a pipeline's knob in [0, 1] (OFTSR); got {t}" + (" with --sr." if sr else "."))
    if sr and pipeline:
        raise UserError("Give --sr (super-resolved images) or --pipeline (with --lr), not both.")
    if not sr and not (pipeline and lr):
        raise UserError("Give --sr (super-resolved images) or --pipeline with --lr (low-resolution inputs).")
    seeds = [seed] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds needs distinct seeds, e.g. 0,1,2; got {','.join(map(str, seeds)) or 'none'}.")
    if crops_per_image < 0:
        raise UserError(f"--crops-per-image must be 0 (whole images) or more; got {crops_per_image}.")
    if crops_per_image and not crop_size:
        raise UserError("--crops-per-image needs --crop-size (the side of each crop, in HR pixels).")
    if crop_size and not crops_per_image:
        raise UserError("--crop-size is the side of the random crops; give --crops-per-image K with it.")
    if teacher_steps is not None and not teacher:
        raise UserError("--teacher-steps sets the steps of --teacher; give --teacher FOLDER with it.")
    if teacher and not lr:
        raise UserError("--teacher runs on the low-resolution inputs; pass --lr with --sr.")
    weights, backbone = lpips_files
    if bool(weights) != bool(backbone):
        raise UserError("LPIPS from local files needs both --lpips-weights (linear layers) and --lpips-backbone.")
    if lpips and weights:
        raise UserError("Give --lpips (downloads its AlexNet) or --lpips-weights with --lpips-backbone, not both.")
    return seeds


def _check_crop_border(files: list[str], border: int, crop: int | None = None) -> None:
    """Before any image is decoded: the smallest HR image (or the crop) keeps at least SSIM's window after the
    border cut (less would write NaN into the record); the sizes come from the file headers."""
    k = metrics.SSIM_MIN_SIZE
    sizes = {p: image_size(p) for p in files}
    smallest = min(files, key=lambda p: min(sizes[p]))
    w, h = sizes[smallest]
    if crop:
        if crop > min(w, h):
            raise UserError(f"--crop-size {crop} is larger than the {w}x{h} HR image {smallest}; take smaller crops.")
        w = h = crop
    what = f"the {crop}x{crop} crops" if crop else f"the {w}x{h} HR image {smallest}"
    largest = (min(w, h) - k) // 2
    if largest < 0:
        raise UserError(
            f"{what[0].upper() + what[1:]} is smaller than SSIM's {k}x{k} window; measure images of at least {k}x{k} pixels."
        )
    if border > largest:
        left = f"{max(w - 2 * border, 0)}x{max(h - 2 * border, 0)}"
        raise UserError(
            f"--crop-border {border} leaves {left} of {what}, less than SSIM's {k}x{k} window; "
            f"the largest border allowed is {largest}."
        )


def _scale_of(hr_path: str, lr_path: str) -> int:
    (w, h), (lw, lh) = image_size(hr_path), image_size(lr_path)
    if w % lw or h % lh or w // lw != h // lh:
        raise UserError(
            f"The HR image {hr_path} is {w}x{h} but its LR image {lr_path} is {lw}x{lh}, not the same integer "
            f"fraction of both sides; crops need LR images exactly 1/scale of their HR images."
        )
    return w // lw


def _check_channels(names, hr_files, sr_files, lr_files) -> dict[str, int]:
    """Grey against colour is refused per pair (file headers only); returns each HR image's channels."""
    channels = {}
    for name in names:
        channels[name] = c = image_channels(hr_files[name])
        for other, what, hint in (
            (sr_files, "SR", "PSNR / SSIM across channel counts mean nothing, so convert one of the two"),
            (lr_files, "LR", "give LR and HR images with the same channels"),
        ):
            if other is not None and image_channels(other[name]) != c:
                raise UserError(
                    f"The {what} image {other[name]} is {_channels_word(4 - c)} but its HR image "
                    f"{hr_files[name]} is {_channels_word(c)}; {hint}."
                )
    return channels


def _check_output_channels(out: np.ndarray, channels: int, flag: str, path: str, hr_path: str) -> None:
    if out.shape[-1] != channels:
        raise UserError(
            f"{flag} {path} makes {_channels_word(out.shape[-1])} images but the HR image {hr_path} is "
            f"{_channels_word(channels)}; score a grey model on grey images and a colour model on colour images."
        )


def _check_output_size(image: np.ndarray, target: np.ndarray, what: str) -> None:
    if image.shape[:2] != target.shape[:2]:
        raise UserError(
            f"The output for {what} is {image.shape[1]}x{image.shape[0]} but its HR image is "
            f"{target.shape[1]}x{target.shape[0]}."
        )


def _window(image: np.ndarray, box: tuple[int, int] | None, size: int | None, factor: int = 1) -> np.ndarray:
    """The crop of side `size` HR pixels at box (top, left) of an image `factor` times smaller (an LR image);
    box None: the whole image."""
    if box is None:
        return image
    top, left, side = box[0] // factor, box[1] // factor, size // factor
    return image[top : top + side, left : left + side]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _lpips_scorer(lpips: bool, weights: str | None, backbone: str | None, device):
    if weights:
        return metrics.LocalLPIPS(weights, backbone, device)
    if lpips:
        return metrics.DownloadedLPIPS(device)
    return None


def _measure(out: np.ndarray, target: np.ndarray, border: int, teacher_out=None, scorer=None) -> dict:
    """The figures of one output against its HR image (and the teacher's output), after the border cut."""
    a, b = metrics.crop_border(out, border), metrics.crop_border(target, border)
    ya, yb = metrics.rgb_to_y(a), metrics.rgb_to_y(b)
    row = {
        "psnr_rgb": metrics.psnr(a, b),
        "ssim_rgb": metrics.ssim(a, b),
        "psnr_y": metrics.psnr(ya, yb),
        "ssim_y": metrics.ssim(ya, yb),
        "sharpness": metrics.sharpness(ya, yb),
    }
    if teacher_out is not None:
        ta = metrics.crop_border(teacher_out, border)
        row["teacher_psnr_y"] = metrics.psnr(ya, metrics.rgb_to_y(ta))
        row["teacher_mad"] = metrics.mean_abs_diff(a, ta)
    if scorer is not None:
        row["lpips"] = scorer(a, b)
    return row


def _read_native(path: str) -> np.ndarray:
    """uint8 (H, W, C) with the file's own channels: 1 for grey files, else 3."""
    from onestep.images import open_image

    channels = image_channels(path)
    image = np.asarray(open_image(path, channels))
    return image[..., None] if channels == 1 else image


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
    seeds: Sequence[int] | None = None,
    crops_per_image: int = 0,
    crop_size: int | None = None,
    teacher: str | None = None,
    teacher_steps: int | None = None,
    lpips_weights: str | None = None,
    lpips_backbone: str | None = None,
    output_cache: dict | None = None,
) -> dict:
    """PSNR / SSIM (RGB and Y), sharpness [, distance to a teacher's output, LPIPS] of the super-resolved images
    in folder sr, or of a pipeline's outputs from the low-resolution folder lr, against the folder hr (paired by
    file name); crop_border: pixels cut from each border first; t: the pipeline's fidelity-realism knob (OFTSR).

    seeds (default [seed]): each seed draws the pipelines' noise and, with crops_per_image K > 0, K random
    crop_size crops per image (sources.CROP_SCHEME); every figure is averaged per seed, then reported as the
    mean and standard deviation over seeds. teacher (an SR pipeline folder, at teacher_steps): its outputs for
    the same inputs and seeds, against which the outputs are also measured. lpips_weights and lpips_backbone:
    LPIPS from local files (metrics.LocalLPIPS); lpips: the lpips package's, downloaded. output_cache: a dict
    shared between calls so the same pipeline call runs once (recipes). The JSON record goes to output, and is
    returned."""
    check_output(output, "sr.json")
    seeds = _check_sr_options(
        sr=sr,
        pipeline=pipeline,
        lr=lr,
        t=t,
        crop_border=crop_border,
        seeds=seeds,
        seed=seed,
        crops_per_image=crops_per_image,
        crop_size=crop_size,
        teacher=teacher,
        teacher_steps=teacher_steps,
        lpips=lpips,
        lpips_files=(lpips_weights, lpips_backbone),
    )
    pipeline, teacher = (resolve_sr_pipeline(p) if p else None for p in (pipeline, teacher))
    check_kind(pipeline, SUPER_RESOLUTION, "sr")
    check_kind(teacher, SUPER_RESOLUTION, "sr", "--teacher")
    state = _state()
    device = _device(device, state)
    hr_files = _by_name(hr)
    sr_files = _by_name(sr) if sr else None
    lr_files = _by_name(lr) if lr else None
    for other, what in ((sr_files, "SR"), (lr_files, "LR")):
        missing = sorted(set(hr_files) - set(other or hr_files))
        if missing:
            raise UserError(f"No {what} image matches the HR image {hr_files[missing[0]]} (images pair by file name).")
    names = sorted(hr_files)[:num_samples] if num_samples else sorted(hr_files)
    _check_crop_border([hr_files[n] for n in names], crop_border, crop_size)
    channels = _check_channels(names, hr_files, sr_files, lr_files)
    scales = {n: _scale_of(hr_files[n], lr_files[n]) for n in names} if lr_files and crops_per_image else {}
    for name, scale in scales.items():
        if crop_size % scale:
            raise UserError(
                f"--crop-size {crop_size} is not a multiple of the scale {scale} of {hr_files[name]} over its LR image; "
                f"pick a multiple so each LR crop is whole."
            )
    scorer = _lpips_scorer(lpips, lpips_weights, lpips_backbone, device)  # a bad weight file: named before any work

    def runner(path, n_steps, knob, flag):
        sampler = PipelineSampler(
            path, device, n_steps, None, None, trust_remote_code, expect=SUPER_RESOLUTION, command="sr", flag=flag
        )
        return SuperResolutionRunner(sampler, n_steps, knob, output_cache)

    student = None if sr else runner(pipeline, steps, t, "--pipeline")
    teacher_runner = runner(teacher, teacher_steps, None, "--teacher") if teacher else None
    hr_images = {n: read_image(hr_files[n]) for n in names}
    low_images = {n: _read_native(lr_files[n]) for n in names} if lr_files else {}
    sr_images = {n: read_image(sr_files[n]) for n in names} if sr_files else {}
    rows = []
    for s in seeds:
        for i, name in enumerate(names):
            boxes = [None]
            if crops_per_image:
                size = hr_images[name].shape[1::-1]
                boxes = crop_boxes(name, size, crop_size, crops_per_image, s, scales.get(name, 1))
            for k, box in enumerate(boxes):
                index = i * crops_per_image + k if crops_per_image else i  # the pipelines' noise (CROP_SCHEME)
                what = name if box is None else f"{name} (crop at {box[0]},{box[1]})"
                target = _window(hr_images[name], box, crop_size)
                low = _window(low_images[name], box, crop_size, scales.get(name, 1)) if low_images else None
                made = {}
                for key, run, flag in (("out", student, "--pipeline"), ("teacher", teacher_runner, "--teacher")):
                    if run is not None:
                        made[key] = run([low], s, [index], what)[0]
                        _check_output_channels(made[key], channels[name], flag, run.sampler.path, hr_files[name])
                        made[key] = _as_rgb(made[key])
                if student is None:
                    made["out"] = _window(sr_images[name], box, crop_size)
                for image in made.values():
                    _check_output_size(image, target, what)
                row = {"image": name, "seed": s}
                if box is not None:
                    row["crop"] = {"top": box[0], "left": box[1], "size": crop_size}
                row.update(_measure(made["out"], target, crop_border, made.get("teacher"), scorer))
                rows.append(row)
    figures = list(SR_FIGURES) + (list(TEACHER_FIGURES) if teacher_runner else []) + (["lpips"] if scorer else [])
    over_seeds = {
        key: metrics.seed_summary({s: float(np.mean([r[key] for r in rows if r["seed"] == s])) for s in seeds})
        for key in figures
    }
    record = new_record("sr", device, 1, command_line)
    for key in figures:
        record[key] = over_seeds[key]["mean"]
    if student is not None:
        record["t"] = t
        record["images_per_second"] = student.images / student.seconds if student.seconds else None
    if scorer is None:
        record["lpips"] = None
        record["lpips_note"] = (
            "not computed: pass --lpips-weights (the lpips package's linear layers, e.g. weights/v0.1/alex.pth) "
            "and --lpips-backbone (torchvision's AlexNet or VGG16 weights) to compute it offline, or --lpips to "
            "download them (needs the lpips package and internet once)"
        )
    else:
        record["lpips_model"] = scorer.describe()
    record.update(
        {
            "protocol": {
                "data_range": 255,
                "crop_border": crop_border,
                "y_channel": "BT.601 (MATLAB rgb2ycbcr), 16..235",
                "ssim": "Gaussian window sigma 1.5 (11 taps), K1 0.01, K2 0.03, population covariance, mean over channels",
                "sharpness": metrics.SHARPNESS_DEFINITION,
                "teacher_distance": TEACHER_DISTANCE if teacher_runner else None,
                "grey_images": "measured as R = G = B (PSNR and SSIM equal the one-channel figures)",
                "over_seeds": "each figure averaged over the images (and crops) of one seed; mean and sample "
                "standard deviation (ddof 1; null with one seed) over the seeds",
            },
            "hr": os.path.abspath(hr),
            "source": student.describe() if student else {"kind": "image folder", "path": os.path.abspath(sr)},
            "teacher": teacher_runner.describe() if teacher_runner else None,
            "seeds": seeds,
            "crops": {
                "per_image": crops_per_image,
                "size": crop_size,
                "scheme": CROP_SCHEME,
            }
            if crops_per_image
            else None,
            "over_seeds": over_seeds,
            "num_images": len(names),
            "measurements_per_seed": len(rows) // len(seeds),
            "per_image": rows,
        }
    )
    if _is_main(state):
        write_record(output, record)
        print(_sr_summary(record, over_seeds, seeds, crops_per_image) + f" -> {output}")
    return record


def _sr_summary(record: dict, over_seeds: dict, seeds: list[int], crops: int) -> str:
    def value(key, digits):
        s = over_seeds[key]
        text = f"{s['mean']:.{digits}f}"
        return text + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")

    line = (
        f"PSNR {value('psnr_rgb', 3)} dB (Y {value('psnr_y', 3)}), SSIM {value('ssim_rgb', 4)} (Y {value('ssim_y', 4)}), "
        f"sharpness {value('sharpness', 3)}"
    )
    if "teacher_psnr_y" in over_seeds:
        line += f", to the teacher: PSNR-Y {value('teacher_psnr_y', 3)} dB, MAD {value('teacher_mad', 3)}"
    line += (
        f", LPIPS {value('lpips', 4)}"
        if "lpips" in over_seeds
        else " (LPIPS skipped: no --lpips-weights/--lpips-backbone)"
    )
    line += f" over {record['num_images']} images" + (f" x {crops} crops" if crops else "")
    if len(seeds) > 1:
        line += f", mean ± std over {len(seeds)} seeds"
    return line


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


def _n_steps(n: int | None) -> str:
    return "default steps" if n is None else f"{n} step" + ("s" if n != 1 else "")


def bench(
    pipeline: str,
    output: str,
    *,
    steps: int | None = None,
    teacher: str | None = None,
    teacher_steps: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
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
    image: str | None = None,
) -> dict:
    """Sampling speed of a student pipeline beside its teacher at N steps (each of teacher_steps): same batch,
    device, noise. A generation student: batch_size (default 64) images from noise, the teacher (a UNet teacher
    folder or "digits") sampled with DDIM (default 50 steps). A super-resolution student: batch_size (default 1)
    copies of the low-resolution `image` (default: a bundled held-out photograph degraded to the pipeline's input
    size), the teacher an SR pipeline folder (default: its own steps). run: a training output folder whose
    timing.json is included; plot: a PNG bar chart. The JSON record goes to output, and is returned.
    num_classes, null_class: the class layout of a class-conditional teacher without onestep.json."""
    check_output(output, "bench.json")
    check_output(plot, "bench.png", "--plot")
    if not teacher and (num_classes is not None or null_class is not None):
        raise UserError("--num-classes and --null-class describe the classes of a --teacher; drop them here.")
    if run and not os.path.isfile(os.path.join(run, "timing.json")):  # before the timing, not after
        raise UserError(f"{run} has no timing.json; pass the output folder of a training run.")
    if image and not os.path.isfile(image):
        raise UserError(f"--image {image} does not exist; pass a low-resolution image file.")
    pipeline = resolve_sr_pipeline(pipeline)
    device = _device(device, None)
    student = PipelineSampler(pipeline, device, steps, None, None, trust_remote_code)
    if student.kind == SUPER_RESOLUTION:
        if guidance_scale is not None or num_classes is not None or null_class is not None:
            raise UserError(
                f"--guidance-scale, --num-classes and --null-class describe class-conditional generation teachers; "
                f"the student {pipeline} is a super-resolution pipeline."
            )
        batch_size = batch_size or 1
        rows, extra = _bench_super_resolution(
            student, steps, teacher, teacher_steps, image, batch_size, repeats, warmup, seed, device, trust_remote_code
        )
    else:
        if image:
            raise UserError(
                f"--image is the low-resolution input of a super-resolution student; {pipeline} is a generation "
                f"pipeline ({type(student.pipe).__name__}), which takes none."
            )
        batch_size = batch_size or 64
        rows, extra = _bench_generation(
            student,
            steps,
            teacher,
            teacher_steps or (50,),
            guidance_scale,
            batch_size,
            (repeats, warmup, seed, device),
            (num_classes, null_class),
        )
    for r in rows[1:]:
        r["student_speedup"] = rows[0]["images_per_s"] and rows[0]["images_per_s"] / r["images_per_s"]
    record = new_record("bench", device, 1, command_line)
    record.update(
        {
            "kind": student.kind,
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "torch_threads": torch.get_num_threads(),
            "timing": "wall clock per pipeline call (noise, network, decode to uint8), median of repeats",
            **extra,
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
        extra_text = f", student is {r['student_speedup']:.1f}x faster" if "student_speedup" in r else ""
        print(
            f"{r['sampler']}: {r['images_per_s']:.1f} images/s ({r['ms_per_image']:.1f} ms per image, "
            f"{r['latency_s_median'] * 1000:.1f} ms per batch of {batch_size}{extra_text})"
        )
    return record


def _timing_row(name: str, source: dict, times: list[float], batch_size: int) -> dict:
    med = statistics.median(times)
    return {
        "sampler": name,
        "source": source,
        "latency_s_median": med,
        "latency_s_all": times,
        "images_per_s": batch_size / med,
        "ms_per_image": 1000 * med / batch_size,
    }


def _bench_generation(student, steps, teacher, teacher_steps, guidance_scale, batch_size, timing, classes):
    """Rows of the generation student (and the DDIM teacher at each of teacher_steps) on one batch of noise."""
    (repeats, warmup, seed, device), (num_classes, null_class) = timing, classes
    samplers = [(f"student ({_n_steps(steps or len(student.pipe.config.get('timesteps', [1])))})", student)]
    for n in teacher_steps if teacher else ():
        sampler = TeacherSampler(teacher, n, device, guidance_scale or 1.0, num_classes, null_class)
        samplers.append((f"teacher DDIM {_n_steps(n)}", sampler))
    batch = range(batch_size)
    rows = []
    for name, sampler in samplers:
        labels = SamplePlan(batch_size, batch_size, seed, "uniform", sampler.num_classes).labels()
        times = _time(lambda s=sampler, lab=labels: s(batch, seed, lab), repeats, warmup, device)
        rows.append(_timing_row(name, sampler.describe(), times, batch_size))
    return rows, {}


def _bench_super_resolution(
    student, steps, teacher, teacher_steps, image, batch_size, repeats, warmup, seed, device, trust_remote_code
):
    """Rows of the SR student (and its SR teacher at each of teacher_steps) on batch_size copies of one LR image."""
    channels = input_channels(student.pipe)
    if image:
        from onestep.images import open_image

        low = np.asarray(open_image(image, channels)).reshape(*image_size(image)[::-1], channels)
        given = {"kind": "image file", "path": os.path.abspath(image), "sha256": file_sha256(image)}
        given["size"] = f"{low.shape[1]}x{low.shape[0]}"
    else:
        side = sr_input_size(student.pipe)
        if side is None:
            raise UserError(
                f"{student.path} ({type(student.pipe).__name__}) does not say its input size; pass --image LR.png."
            )
        low, given = bundled_low_resolution(side, int(student.pipe.config.get("upscale_factor", 4)), channels)
    runners = [
        (f"student ({_n_steps(steps or sr_default_steps(student.pipe))})", SuperResolutionRunner(student, steps))
    ]
    if teacher:
        teacher = resolve_sr_pipeline(teacher)
        for n in teacher_steps or (None,):
            sampler = _bench_sr_teacher(teacher, n, student.path, device, trust_remote_code)
            runners.append(
                (f"teacher, {_n_steps(n or sr_default_steps(sampler.pipe))}", SuperResolutionRunner(sampler, n))
            )
    lows, batch = [low] * batch_size, list(range(batch_size))
    rows = []
    for name, run in runners:
        times = _time(lambda r=run: r(lows, seed, batch, "the benchmark image"), repeats, warmup, device)
        rows.append(_timing_row(name, run.describe(), times, batch_size))
    return rows, {"input": given}


def _bench_sr_teacher(teacher: str, steps, student_path: str, device, trust_remote_code: bool) -> PipelineSampler:
    """An SR student's --teacher: an SR pipeline folder; a UNet teacher or 'digits' is refused in one sentence."""
    hint = (
        f"--teacher {teacher} is not a super-resolution pipeline, but the student {student_path} is one; pass the SR "
        f"teacher it was distilled from (a SuperResolutionPipeline folder, or sr-flow / sr-resshift)."
    )
    if not os.path.isfile(os.path.join(teacher, "model_index.json")):
        raise UserError(hint)
    try:
        check_kind(teacher, SUPER_RESOLUTION, "bench", "--teacher")
        return PipelineSampler(
            teacher, device, steps, None, None, trust_remote_code, expect=SUPER_RESOLUTION, command="bench"
        )
    except UserError as err:
        if "is a generation pipeline" in str(err):
            raise UserError(hint) from None
        raise


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
