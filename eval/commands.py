"""The work behind each `onestep-eval` subcommand; cli.py only parses arguments."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from onestep.errors import UserError

from . import metrics
from .features import DigitsFeatures, build_features, file_sha256
from .record import new_record, write_record
from .sources import (PipelineSampler, SamplePlan, TeacherSampler, check_same_size, digits_reference_images,
                      list_images, read_image, read_images, run_sharded)


def _state():
    """accelerate's process state when launched with several processes, else None (plain single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU: say it, or a gloo run degrades to 2 copies.
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
        return PartialState(cpu=cpu)
    return None


def _device(args, state):
    if args.device:
        return torch.device(args.device)
    if state is not None:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_main(state) -> bool:
    return state is None or state.is_main_process


def _sampler(args, device):
    if args.pipeline:
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        return PipelineSampler(args.pipeline, device, args.steps, args.guidance_scale, dtype, args.trust_remote_code)
    if args.teacher:
        if not args.steps:
            raise UserError("--teacher needs --steps (the number of DDIM steps).")
        return TeacherSampler(args.teacher, args.steps, device, args.guidance_scale if args.guidance_scale is not None else 1.0)
    return None


def generated_features(args, extractor, state, device, prompts=None) -> tuple[metrics.FeatureStats, dict]:
    """Features of the evaluated images (pipeline, teacher, image folder, or a saved statistics file)."""
    if getattr(args, "stats", None):
        stats = metrics.FeatureStats.load(args.stats)
        _check_same_features(stats, extractor, args.stats)
        return stats, {"kind": "statistics file", "path": os.path.abspath(args.stats), "sha256": file_sha256(args.stats), **stats.meta}
    sampler = _sampler(args, device)
    if prompts is None and getattr(args, "prompts", None):
        from onestep.data import read_prompts
        if sampler is None:
            raise UserError("--prompts applies to generated images (--pipeline); an image folder is evaluated as it is.")
        prompts = read_prompts(args.prompts)
    if prompts is not None and args.num_samples:
        prompts = [prompts[i % len(prompts)] for i in range(args.num_samples)]  # N images cycle over the prompts
    classify = isinstance(extractor, DigitsFeatures)
    if sampler is None:
        files = list_images(args.images)
        if args.num_samples:
            if args.num_samples > len(files):
                raise UserError(f"--num-samples {args.num_samples} is more than the {len(files)} images in {args.images}.")
            files = files[: args.num_samples]
        crop = getattr(args, "crop_size", 0)
        if not crop:  # with a crop, mixed sizes are fine: every image is cropped before stacking
            check_same_size(files)
        plan = SamplePlan(len(files), args.batch_size)
        source = {"kind": "image folder", "path": os.path.abspath(args.images), "num_images": len(files), "sha256": files_sha256(files)}
        def work(b):
            images = read_images(files[b.start:b.stop], crop)
            return extractor(images), None, images if b.start == 0 else None
    else:
        if not args.num_samples:
            raise UserError("--num-samples is required when images are generated.")
        num_classes = sampler.num_classes if prompts is None else None
        plan = SamplePlan(args.num_samples, args.batch_size, args.seed, args.class_sampling, num_classes)
        labels = plan.labels()
        source = sampler.describe()
        if prompts is not None:
            source["prompts_file"] = {"path": os.path.abspath(args.prompts), "sha256": file_sha256(args.prompts)}
        def work(b):
            lab = labels[b.start:b.stop] if labels is not None else None
            images = sampler(b, args.seed, lab, prompts[b.start:b.stop] if prompts is not None else None)
            preds = extractor.classify(images) if (classify and lab is not None) else None
            return extractor(images), preds, images if b.start == 0 else None
    parts = run_sharded(plan.batches(), work, state)
    feats = np.concatenate([p[0] for p in parts])
    meta = {"source": source, "sampling": plan.describe(), "features": extractor.describe()}
    if parts[0][1] is not None:
        preds = np.concatenate([p[1] for p in parts])
        meta["class_accuracy"] = float(np.mean(preds == plan.labels()))
    stats = metrics.FeatureStats.from_features(feats, meta)
    stats.first_images = parts[0][2]
    return stats, meta


def _check_same_features(stats: metrics.FeatureStats, extractor, path: str) -> None:
    made_with, mine = stats.meta.get("features", {}), extractor.describe()
    if made_with and any(made_with.get(k) != mine[k] for k in ("name", "weights_sha256", "resize")):
        raise UserError(f"{path} was made with other features ({made_with.get('name')}, weights {str(made_with.get('weights_sha256'))[:12]}) "
                        f"than this run ({mine['name']}, weights {str(mine['weights_sha256'])[:12]}); remake it or pass the matching --features.")


def files_sha256(files: list[str]) -> str:
    """One hash over a list of image files (names and contents), so a folder reference is pinned."""
    import hashlib
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.basename(path).encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def reference_features(args, extractor, state) -> tuple[metrics.FeatureStats, dict]:
    if args.ref_name:
        if args.ref_res is None and args.ref_split != "custom":
            raise UserError("--ref-name needs --ref-res (the statistics' resolution), unless --ref-split custom.")
        if not extractor.name.startswith("inception"):
            raise UserError("clean-fid's named statistics are Inception statistics; use --features inception with --ref-name.")
        from cleanfid.features import get_reference_statistics
        try:
            mu, sigma = get_reference_statistics(args.ref_name, args.ref_res, mode=args.mode, split=args.ref_split)
            feats = None
            if args.command == "kid":
                feats = get_reference_statistics(args.ref_name, args.ref_res, mode=args.mode, split=args.ref_split, metric="KID")
        except Exception as err:  # clean-fid raises URLError/HTTPError/FileNotFoundError
            raise UserError(f"Cannot get clean-fid's statistics {args.ref_name}/{args.ref_split}/{args.ref_res} ({err.__class__.__name__}); "
                            f"they are downloaded on first use, or pass --ref with a statistics file or image folder.") from None
        stats = metrics.FeatureStats(mu, sigma, feats, {})
        return stats, {"kind": "clean-fid statistics", "name": args.ref_name, "split": args.ref_split, "res": args.ref_res, "mode": args.mode}
    ref = args.ref
    if ref is None:
        raise UserError("Give a reference: --ref (image folder, statistics .npz, or 'digits') or --ref-name (clean-fid statistics).")
    if ref == "digits":
        images, _ = digits_reference_images()
        stats = metrics.FeatureStats.from_features(extractor(images))
        import hashlib
        return stats, {"kind": "bundled dataset", "name": "scikit-learn digits, all 1,797 images at 16x16", "num_images": len(images),
                       "sha256": hashlib.sha256(images.tobytes()).hexdigest()}
    if os.path.isfile(ref):
        stats = metrics.FeatureStats.load(ref)
        _check_same_features(stats, extractor, ref)
        return stats, {"kind": "statistics file", "path": os.path.abspath(ref), "sha256": file_sha256(ref),
                       "num_images": stats.meta.get("num_images")}
    files = list_images(ref)
    crop = getattr(args, "crop_size", 0)
    if not crop:
        check_same_size(files)
    plan = SamplePlan(len(files), args.batch_size)
    feats = np.concatenate(run_sharded(plan.batches(), lambda b: extractor(read_images(files[b.start:b.stop], crop)), state))
    return metrics.FeatureStats.from_features(feats), {"kind": "image folder", "path": os.path.abspath(ref), "num_images": len(files),
                                                       "sha256": files_sha256(files)}


def _extractor(args, device):
    return build_features(args.features, device, args.mode, args.inception_weights, args.clip_model, args.clip_pretrained,
                          getattr(args, "crop_size", 0))


def _save_grid(images: np.ndarray | None, path: str) -> None:
    if images is None:
        return
    from onestep.utils import save_image_grid
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(x, path, scale=max(1, 128 // images.shape[1]))


def distance(args) -> dict:
    """fid and kid: generated (or folder, or saved) features against a reference."""
    if args.ref_name and args.ref_res is None and args.ref_split != "custom":  # before any weights load
        raise UserError("--ref-name needs --ref-res (the statistics' resolution), unless --ref-split custom.")
    state = _state()
    device = _device(args, state)
    start = time.perf_counter()
    extractor = _extractor(args, device)
    ref, ref_info = reference_features(args, extractor, state)
    gen, gen_info = generated_features(args, extractor, state, device)
    record = new_record(args.command, device, state.num_processes if state else 1, args)
    if args.command == "fid":
        value = metrics.fid(gen, ref)
    else:
        value = metrics.kid(gen, ref, args.seed, args.kid_subsets, args.kid_subset_size)
        record["kid_protocol"] = {"num_subsets": args.kid_subsets, "max_subset_size": args.kid_subset_size,
                                  "subset_seed": args.seed, "kernel": "(x.y / d + 1)^3, unbiased MMD^2 (clean-fid kernel_distance)"}
    record.update({args.command: value, "generated": gen_info, "reference": ref_info, "features": extractor.describe(),
                   "seconds": round(time.perf_counter() - start, 2)})
    if "class_accuracy" in gen_info:
        record["class_accuracy"] = gen_info["class_accuracy"]
    if _is_main(state):
        if args.save_stats and not args.stats:
            gen.save(args.save_stats)
        if args.plot:
            _save_grid(getattr(gen, "first_images", None), args.plot)
        write_record(args.output, record)
        extra = f", class accuracy {record['class_accuracy']:.4f}" if "class_accuracy" in record else ""
        print(f"{args.command.upper()} {value:.6g} ({gen.meta.get('num_images', '?')} vs {ref.meta.get('num_images', len(ref.feats) if ref.feats is not None else '?')} images, "
              f"{extractor.name}{extra}) -> {args.output}")
    return record


def make_stats(args) -> dict:
    """Features of any source saved as .npz (and, with --cleanfid-name, as clean-fid custom statistics)."""
    state = _state()
    device = _device(args, state)
    extractor = _extractor(args, device)
    if args.images == "digits":
        images, _ = digits_reference_images()
        stats = metrics.FeatureStats.from_features(extractor(images), {"source": {"kind": "bundled dataset", "name": "sklearn digits"},
                                                                         "features": extractor.describe()})
    else:
        stats, _ = generated_features(args, extractor, state, device)
    if not _is_main(state):
        return {}
    if args.cleanfid_name and not extractor.name.startswith("inception"):
        raise UserError("clean-fid custom statistics are Inception statistics; use --features inception with --cleanfid-name.")
    stats.save(args.output)
    if args.cleanfid_name:
        _write_cleanfid_custom(stats, args.cleanfid_name, args.mode, extractor)
    print(f"Wrote statistics of {stats.meta['num_images']} images ({extractor.name}, dim {stats.dim}) to {args.output}")
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
        raise UserError(f"clean-fid already has custom statistics named {name}; remove them with cleanfid.fid.remove_custom_stats first.")
    np.savez(base + ".npz", mu=stats.mu, sigma=stats.sigma)
    np.savez(base + "_kid.npz", feats=stats.feats)


def clip_score(args) -> dict:
    from onestep.data import read_captions, read_prompts
    from .clip import clip_scores, load_open_clip, scale_scores
    state = _state()
    device = _device(args, state)
    start = time.perf_counter()
    clip = None  # loaded after the inputs are checked: a ViT-g-14 takes a while
    if args.images:
        files = list_images(args.images)
        if args.prompts:
            prompts = read_prompts(args.prompts)
        elif os.path.isfile(os.path.join(args.images, "metadata.jsonl")):
            prompts = read_captions(args.images, files)
        else:
            raise UserError(f"Pass --prompts, or put a metadata.jsonl (file_name, text) in {args.images}.")
        if len(prompts) != len(files):
            raise UserError(f"{args.images} holds {len(files)} images but there are {len(prompts)} prompts; they pair in sorted order.")
        n = args.num_samples or len(files)
        if n > len(files):
            raise UserError(f"--num-samples {n} is more than the {len(files)} images in {args.images}.")
        files, prompts = files[:n], prompts[:n]
        plan = SamplePlan(n, args.batch_size)
        work = lambda b: clip_scores(clip, [read_image(p) for p in files[b.start:b.stop]],  # noqa: E731
                                     prompts[b.start:b.stop], args.prefix, args.crop_size)
        source = {"kind": "image folder", "path": os.path.abspath(args.images)}
    else:
        if args.teacher:
            raise UserError("clip scores text-to-image pipelines (--pipeline) or captioned images (--images), not --teacher.")
        if not args.prompts:
            raise UserError("--prompts FILE is required with --pipeline.")
        all_prompts = read_prompts(args.prompts)
        n = args.num_samples or len(all_prompts)
        prompts = [all_prompts[i % len(all_prompts)] for i in range(n)]
        sampler = _sampler(args, device)
        plan = SamplePlan(n, args.batch_size, args.seed)
        work = lambda b: clip_scores(clip, sampler(b, args.seed, None, prompts[b.start:b.stop]), prompts[b.start:b.stop],  # noqa: E731
                                     args.prefix, args.crop_size)
        source = sampler.describe()
    clip = load_open_clip(args.model, args.pretrained, device)
    cos = np.concatenate(run_sharded(plan.batches(), work, state))
    value = float(np.mean(scale_scores(cos, args.scale)))
    record = new_record("clip", device, state.num_processes if state else 1, args)
    record.update({"clip_score": value, "scale": {"raw": "raw cosine (DMD2's convention, ~0.3)",
                                                   "100": "100 * max(cosine, 0) (torchmetrics' convention, ~30)"}[args.scale],
                   "prompt_prefix": args.prefix, "prompts_file": os.path.abspath(args.prompts) if args.prompts else None,
                   "num_images": int(len(cos)), "image_preprocess": f"centre crop to square, LANCZOS resize to {args.crop_size}, then open_clip's preprocess"
                   if args.crop_size else "open_clip's preprocess only",
                   "clip_model": {"name": clip.model_name, "pretrained": clip.pretrained, "weights_sha256": clip.weights_sha256},
                   "source": source, "sampling": plan.describe(), "seconds": round(time.perf_counter() - start, 2)})
    if _is_main(state):
        write_record(args.output, record)
        print(f"CLIP score {value:.6g} ({args.scale}, {len(cos)} images, {clip.model_name}/{clip.pretrained}) -> {args.output}")
    return record


def _by_name(folder: str) -> dict[str, str]:
    """Images keyed by their path inside the folder without extension (LR/SR/HR pair by name)."""
    return {os.path.splitext(os.path.relpath(p, folder))[0]: p for p in list_images(folder)}


def super_resolution(args) -> dict:
    state = _state()
    device = _device(args, state)
    hr = _by_name(args.hr)
    if args.sr:
        other = _by_name(args.sr)
    else:
        if not (args.pipeline and args.lr):
            raise UserError("Give --sr (super-resolved images) or --pipeline with --lr (low-resolution inputs).")
        other = _by_name(args.lr)
    missing = sorted(set(hr) - set(other))
    if missing:
        raise UserError(f"No {'SR' if args.sr else 'LR'} image matches the HR image {hr[missing[0]]} (images pair by file name).")
    names = sorted(hr)[: args.num_samples] if args.num_samples else sorted(hr)
    sampler = None if args.sr else PipelineSampler(args.pipeline, device, args.steps, None, None, args.trust_remote_code)
    rows = []
    for i, name in enumerate(names):
        target = read_image(hr[name])
        if sampler is None:
            out = read_image(other[name])
        else:
            from PIL import Image
            from .sources import generators, to_uint8
            lr = Image.fromarray(read_image(other[name]))
            kwargs = {"image": lr, "generator": generators(args.seed, [i])[0], "output_type": "np"}
            if args.steps:
                kwargs["num_inference_steps"] = args.steps
            out = to_uint8(sampler.pipe(**kwargs).images)[0]
        if out.shape != target.shape:
            raise UserError(f"The output for {name} is {out.shape[1]}x{out.shape[0]} but its HR image is {target.shape[1]}x{target.shape[0]}.")
        a, b = metrics.crop_border(out, args.crop_border), metrics.crop_border(target, args.crop_border)
        ya, yb = metrics.rgb_to_y(a), metrics.rgb_to_y(b)
        rows.append({"image": name, "psnr_rgb": metrics.psnr(a, b), "ssim_rgb": metrics.ssim(a, b),
                     "psnr_y": metrics.psnr(ya, yb), "ssim_y": metrics.ssim(ya, yb)})
    record = new_record("sr", device, 1, args)
    for key in ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y"):
        record[key] = float(np.mean([r[key] for r in rows]))
    record["lpips"] = None
    record["lpips_note"] = "not computed: LPIPS needs the lpips package and its backbone weights (pip install lpips; downloads AlexNet once)"
    if args.lpips:
        record["lpips"], record["lpips_note"] = _lpips(rows, names, hr, other, sampler, args, device)
    record.update({"protocol": {"data_range": 255, "crop_border": args.crop_border, "y_channel": "BT.601 (MATLAB rgb2ycbcr), 16..235",
                                "ssim": "Gaussian window sigma 1.5 (11 taps), K1 0.01, K2 0.03, population covariance, mean over channels"},
                   "hr": os.path.abspath(args.hr), "source": sampler.describe() if sampler else {"kind": "image folder", "path": os.path.abspath(args.sr)},
                   "num_images": len(rows), "per_image": rows})
    if _is_main(state):
        write_record(args.output, record)
        print(f"PSNR {record['psnr_rgb']:.3f} dB (Y {record['psnr_y']:.3f}), SSIM {record['ssim_rgb']:.4f} (Y {record['ssim_y']:.4f}) "
              f"over {len(rows)} images -> {args.output}")
    return record


def _lpips(rows, names, hr, other, sampler, args, device):
    if sampler is not None:
        raise UserError("--lpips with --pipeline is not supported yet; save the outputs and pass --sr.")
    try:
        import lpips  # optional: not a dependency
        net = lpips.LPIPS(net="alex", verbose=False).to(device)
    except Exception as err:
        raise UserError(f"--lpips needs the lpips package and its weights ({err.__class__.__name__}); pip install lpips on a machine with internet once.") from None
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


def bench(args) -> dict:
    """Sampling speed of a student pipeline beside its teacher at N steps: same batch, device, noise."""
    device = _device(args, None)
    student = PipelineSampler(args.pipeline, device, args.steps, None, None, args.trust_remote_code)
    samplers = [(f"student ({args.steps or len(student.pipe.config.get('timesteps', [1]))} step)", student)]
    for n in args.teacher_steps:
        if args.teacher:
            samplers.append((f"teacher DDIM {n} steps", TeacherSampler(args.teacher, n, device, args.guidance_scale or 1.0)))
    plan = SamplePlan(args.batch_size, args.batch_size, args.seed, "uniform", student.num_classes)
    labels = plan.labels()
    batch = range(args.batch_size)
    rows = []
    for name, sampler in samplers:
        times = _time(lambda: sampler(batch, args.seed, labels), args.repeats, args.warmup, device)
        med = statistics.median(times)
        rows.append({"sampler": name, "source": sampler.describe(), "latency_s_median": med, "latency_s_all": times,
                     "images_per_s": args.batch_size / med})
    for r in rows[1:]:
        r["student_speedup"] = rows[0]["images_per_s"] and rows[0]["images_per_s"] / r["images_per_s"]
    record = new_record("bench", device, 1, args)
    record.update({"batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup, "torch_threads": torch.get_num_threads(),
                   "timing": "wall clock per pipeline call (noise, network, decode to uint8), median of repeats", "results": rows})
    if args.run:
        import json
        path = os.path.join(args.run, "timing.json")
        if not os.path.isfile(path):
            raise UserError(f"{args.run} has no timing.json; pass the output folder of a training run.")
        with open(path) as f:
            record["training_step_breakdown"] = json.load(f)
    if args.plot:
        _speed_plot(rows, args.plot)
    write_record(args.output, record)
    for r in rows:
        extra = f", student is {r['student_speedup']:.1f}x faster" if "student_speedup" in r else ""
        print(f"{r['sampler']}: {r['images_per_s']:.1f} images/s ({r['latency_s_median'] * 1000:.1f} ms per batch of {args.batch_size}{extra})")
    return record


def _speed_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(rows) + 1))
    ax.barh([r["sampler"] for r in rows], [r["images_per_s"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log scale)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
