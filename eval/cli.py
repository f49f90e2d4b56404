"""onestep-eval: FID, KID, CLIP score, super-resolution metrics and sampling speed, each written as one
JSON record that holds the figure and everything needed to reproduce it.

Examples (the bundled digits default, offline):
    onestep-eval fid --pipeline outputs/dmd2-digits --ref digits --features digits --num-samples 2000
    onestep-eval fid --teacher digits --steps 50 --ref digits --features digits --num-samples 2000
    onestep-eval kid --pipeline outputs/dmd2-digits --ref digits --features digits --num-samples 2000
    onestep-eval bench --pipeline outputs/dmd2-digits --teacher digits --teacher-steps 1 50
With several processes (seeds do not depend on the process count):
    accelerate launch --num_processes 2 -m onestep.eval.cli fid ...
"""
from __future__ import annotations

import argparse
import sys

from onestep.cli import positive_int, run_main

from .clip import DEFAULT_MODEL, DEFAULT_PREFIX, DEFAULT_PRETRAINED, SCALES
from .features import FEATURES, FID_MODES


def _source_args(p, images_help="an image folder to evaluate as it is"):
    src = p.add_argument_group("what is evaluated (one of)")
    src.add_argument("--pipeline", help="a pipeline folder DiffusionPipeline.from_pretrained loads (ours included)")
    src.add_argument("--teacher", help="a teacher folder or 'digits', sampled with DDIM (trailing spacing) for --steps")
    src.add_argument("--images", help=images_help)
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=positive_int, default=None, help="num_inference_steps (teacher: DDIM steps)")
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--num-samples", type=positive_int, default=None)
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--class-sampling", choices=("uniform", "random"), default="uniform",
                   help="class-conditional pipelines: uniform = label i mod C (equal counts), random = i.i.d.")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a pipeline folder's own code to run")


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _feature_args(p):
    g = p.add_argument_group("features")
    g.add_argument("--features", choices=FEATURES, default="inception",
                   help="inception (clean-fid), clip (open_clip image embeddings) or digits (the shipped digits classifier)")
    g.add_argument("--mode", choices=FID_MODES, default="clean", help="clean-fid resize/weights mode (Inception)")
    g.add_argument("--inception-weights", default=None, help="a local copy of clean-fid's Inception weights (checked by SHA-256, then cached)")
    g.add_argument("--clip-model", default="ViT-B-32")
    g.add_argument("--clip-pretrained", default="openai")
    g.add_argument("--crop-size", type=non_negative_int, default=0,
                   help="centre-crop every image (generated and reference) to a square and LANCZOS-resize it to this size "
                        "before the features (DMD2's COCO protocol: 256); 0 = off")


def _ref_args(p):
    g = p.add_argument_group("reference")
    g.add_argument("--ref", help="an image folder, a statistics .npz (onestep-eval stats or clean-fid), or 'digits'")
    g.add_argument("--ref-name", help="clean-fid's named statistics (e.g. cifar10, ffhq) or a custom name")
    g.add_argument("--ref-split", default="train", help="clean-fid statistics split: train, test, custom, ...")
    g.add_argument("--ref-res", type=positive_int, default=None, help="clean-fid statistics resolution")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onestep-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    for name, what in (("fid", "Frechet Inception (or other feature) distance"), ("kid", "kernel Inception distance")):
        s = sub.add_parser(name, help=what)
        _source_args(s)
        s.add_argument("--prompts", help="text-to-image pipelines: prompt file (.txt or .jsonl); N images cycle over it")
        s.add_argument("--stats", help="evaluate a statistics .npz saved earlier (--save-stats) instead of sampling")
        _feature_args(s)
        _ref_args(s)
        s.add_argument("--save-stats", help="also save the evaluated features as .npz (reuse with --stats)")
        s.add_argument("--plot", help="write a PNG grid of the first 64 evaluated images")
        s.add_argument("--output", default=f"{name}.json")
        if name == "kid":
            s.add_argument("--kid-subsets", type=positive_int, default=100)
            s.add_argument("--kid-subset-size", type=positive_int, default=1000)

    s = sub.add_parser("stats", help="save feature statistics of a source (clean-fid make_custom_stats equivalent)")
    _source_args(s, "an image folder, or 'digits' for the bundled dataset")
    s.add_argument("--prompts", help="text-to-image pipelines: prompt file (.txt or .jsonl)")
    _feature_args(s)
    s.add_argument("--cleanfid-name", help="also register them as clean-fid custom statistics under this name")
    s.add_argument("--output", required=True)

    s = sub.add_parser("clip", help="CLIP score of a text-to-image pipeline (or captioned images)")
    _source_args(s, "an image folder paired with --prompts in sorted order, or with its metadata.jsonl")
    s.add_argument("--prompts", help="prompt file: .txt (one per line) or .jsonl (text/caption/prompt); with --images, "
                                      "line i pairs with the i-th image in sorted file-name order (10.png sorts before 2.png)")
    s.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or a JSON model config file")
    s.add_argument("--pretrained", default=DEFAULT_PRETRAINED, help="open_clip tag, a local checkpoint file, or none (random)")
    s.add_argument("--prefix", default=DEFAULT_PREFIX, help="prepended to every caption")
    s.add_argument("--scale", choices=SCALES, default="raw", help="raw cosine (DMD2) or 100 * max(cos, 0) (torchmetrics)")
    s.add_argument("--crop-size", type=non_negative_int, default=256, help="centre-crop + LANCZOS resize before CLIP's preprocess; 0 = off")
    s.add_argument("--output", default="clip.json")

    s = sub.add_parser("sr", help="PSNR / SSIM (RGB and Y) [and LPIPS] of super-resolution outputs")
    s.add_argument("--hr", required=True, help="ground-truth high-resolution images")
    s.add_argument("--sr", help="super-resolved images (paired with --hr by file name)")
    s.add_argument("--pipeline", help="a super-resolution pipeline, called as pipe(image=LR)")
    s.add_argument("--lr", help="low-resolution inputs for --pipeline (paired by file name)")
    s.add_argument("--steps", type=positive_int, default=None)
    s.add_argument("--num-samples", type=positive_int, default=None)
    s.add_argument("--crop-border", type=int, default=0, help="pixels cut from each border before measuring (SR papers: the scale)")
    s.add_argument("--lpips", action="store_true", help="also LPIPS (needs the lpips package and its weights)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--output", default="sr.json")

    s = sub.add_parser("bench", help="sampling speed of a student beside its teacher at N steps")
    s.add_argument("--pipeline", required=True, help="the student pipeline folder")
    s.add_argument("--steps", type=positive_int, default=None, help="student steps (default: all trained steps)")
    s.add_argument("--teacher", help="teacher folder or 'digits' (DDIM, trailing spacing)")
    s.add_argument("--teacher-steps", type=positive_int, nargs="+", default=[50])
    s.add_argument("--guidance-scale", type=float, default=None, help="teacher guidance (2 network passes per step when != 1)")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--repeats", type=positive_int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--run", help="a training output folder: include its per-phase step breakdown (timing.json)")
    s.add_argument("--plot", help="write a PNG of images/s per sampler")
    s.add_argument("--output", default="bench.json")
    return p


def _check_sources(args, parser) -> None:
    given = [k for k in ("pipeline", "teacher", "images", "stats") if getattr(args, k, None)]
    if args.command in ("fid", "kid", "stats", "clip") and len(given) != 1:
        what = "--pipeline, --teacher, --images" + (" or --stats" if args.command in ("fid", "kid") else "")
        parser.error(f"give exactly one of {what} (got {len(given) or 'none'}).")


def main(argv=None):
    from . import commands
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded, shell-quoted, in every JSON
    _check_sources(args, parser)
    if getattr(args, "crop_size", None) == 0:
        args.crop_size = None
    return {"fid": commands.distance, "kid": commands.distance, "stats": commands.make_stats, "clip": commands.clip_score,
            "sr": commands.super_resolution, "bench": commands.bench}[args.command](args)


def entry_point():
    run_main(main)


if __name__ == "__main__":
    entry_point()
