"""onestep-eval: FID, KID, CLIP score, super-resolution metrics and sampling speed, each written as one
JSON record that holds the figure and everything needed to reproduce it.

Examples (the bundled digits default, offline):
    onestep-eval fid --pipeline outputs/dmd2-digits --ref digits --features digits --num-samples 2000
    onestep-eval fid --teacher digits --steps 50 --ref digits --features digits --num-samples 2000
    onestep-eval kid --pipeline outputs/dmd2-digits --ref digits --features digits --num-samples 2000
    onestep-eval bench --pipeline outputs/dmd2-digits --teacher digits --teacher-steps 1 50
Each subcommand writes one JSON record to --output (default: <subcommand>.json in the folder the command
runs from, e.g. ./fid.json) and prints its absolute path; --plot files go where --plot says.
With several processes (seeds do not depend on the process count):
    accelerate launch --num_processes 2 -m onestep.eval.cli fid ...
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from onestep.cli import int_list, non_negative_int, positive_int, run_main

from .clip import DEFAULT_MODEL, DEFAULT_PREFIX, DEFAULT_PRETRAINED, SCALES
from .features import FEATURES, FID_MODES
from .metrics import SHARPNESS_DEFINITION
from .options import ClipOptions, FeatureOptions, ReferenceOptions, SamplingOptions, SourceOptions
from .record import CommandLine

SR_DESCRIPTION = f"""PSNR and SSIM (on RGB and on the Y channel), sharpness, and optionally the distance to a teacher's
samples and LPIPS, of super-resolved images (--sr) or of a pipeline's outputs for --lr inputs, against --hr.

{textwrap.fill(SHARPNESS_DEFINITION + ".", 116)}

Distance to a teacher (--teacher): the teacher runs on the same LR inputs (and crops) with the same noise seeds;
teacher_psnr_y is the PSNR on Y of the output against the teacher's output, teacher_mad their mean absolute
difference in 8-bit levels over RGB, both after --crop-border.

LPIPS offline: --lpips-weights (the lpips package's linear layers) and --lpips-backbone (torchvision's AlexNet or
VGG16 weights), read with torch.load(weights_only=True), nothing downloaded; without them LPIPS is skipped.

Seeds and crops: --seeds 0,1,2 repeats the run per seed (noise and crops); every figure is averaged per seed and
reported as mean +- sample std over the seeds; the record keeps every image's value per seed.
"""


def _source_args(p, images_help="an image folder to evaluate as it is"):
    src = p.add_argument_group("what is evaluated (one of)")
    src.add_argument("--pipeline", help="a pipeline folder DiffusionPipeline.from_pretrained loads (ours included)")
    src.add_argument(
        "--teacher", help="a teacher folder or 'digits', sampled with DDIM (trailing spacing) for --steps"
    )
    src.add_argument("--images", help=images_help)
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=positive_int, default=None, help="num_inference_steps (teacher: DDIM steps)")
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--num-samples", type=positive_int, default=None)
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--class-sampling",
        choices=("uniform", "random"),
        default="uniform",
        help="class-conditional pipelines: uniform = label i mod C (equal counts), random = i.i.d.",
    )
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a pipeline folder's own code to run")


def _teacher_class_args(p):
    g = p.add_argument_group("class-conditional teachers without onestep.json (trained elsewhere)")
    g.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="the teacher's real classes: labels 0..N-1 are sampled (default: from the teacher's onestep.json)",
    )
    g.add_argument(
        "--null-class",
        type=non_negative_int,
        default=None,
        help="the teacher's unconditional class embedding, used for guidance (--guidance-scale != 1)",
    )


def _feature_args(p):
    g = p.add_argument_group("features")
    g.add_argument(
        "--features",
        choices=FEATURES,
        default="inception",
        help="inception (clean-fid), clip (open_clip image embeddings) or digits (the shipped digits classifier)",
    )
    g.add_argument("--mode", choices=FID_MODES, default="clean", help="clean-fid resize/weights mode (Inception)")
    g.add_argument(
        "--inception-weights",
        default=None,
        help="a local copy of clean-fid's Inception weights (checked by SHA-256, then cached)",
    )
    g.add_argument("--clip-model", default="ViT-B-32")
    g.add_argument("--clip-pretrained", default="openai")
    g.add_argument(
        "--crop-size",
        type=non_negative_int,
        default=0,
        help="centre-crop every image (generated and reference) to a square and LANCZOS-resize it to this size "
        "before the features (DMD2's COCO protocol: 256); 0 = off",
    )


def _ref_args(p):
    g = p.add_argument_group("reference")
    g.add_argument("--ref", help="an image folder, a statistics .npz (onestep-eval stats or clean-fid), or 'digits'")
    g.add_argument("--ref-name", help="clean-fid's named statistics (e.g. cifar10, ffhq) or a custom name")
    g.add_argument("--ref-split", default="train", help="clean-fid statistics split: train, test, custom, ...")
    g.add_argument("--ref-res", type=positive_int, default=None, help="clean-fid statistics resolution")


def _output_arg(p, default: str) -> None:
    p.add_argument(
        "--output",
        default=default,
        help=f"the JSON record's path (default: {default} in the folder you run the command from; "
        f"a file already there is replaced)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onestep-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    for name, what in (("fid", "Frechet Inception (or other feature) distance"), ("kid", "kernel Inception distance")):
        s = sub.add_parser(name, help=what)
        _source_args(s)
        s.add_argument(
            "--prompts", help="text-to-image pipelines: prompt file (.txt or .jsonl); N images cycle over it"
        )
        s.add_argument("--stats", help="evaluate a statistics .npz saved earlier (--save-stats) instead of sampling")
        _teacher_class_args(s)
        _feature_args(s)
        _ref_args(s)
        s.add_argument("--save-stats", help="also save the evaluated features as .npz (reuse with --stats)")
        s.add_argument("--plot", help="write a PNG grid of the first 64 evaluated images to this path")
        _output_arg(s, f"{name}.json")
        if name == "kid":
            s.add_argument("--kid-subsets", type=positive_int, default=100)
            s.add_argument("--kid-subset-size", type=positive_int, default=1000)

    s = sub.add_parser("stats", help="save feature statistics of a source (clean-fid make_custom_stats equivalent)")
    _source_args(s, "an image folder, or 'digits' for the bundled dataset")
    s.add_argument("--prompts", help="text-to-image pipelines: prompt file (.txt or .jsonl)")
    _teacher_class_args(s)
    _feature_args(s)
    s.add_argument("--cleanfid-name", help="also register them as clean-fid custom statistics under this name")
    s.add_argument("--output", required=True)

    s = sub.add_parser("clip", help="CLIP score of a text-to-image pipeline (or captioned images)")
    _source_args(s, "an image folder paired with --prompts in sorted order, or with its metadata.jsonl")
    s.add_argument(
        "--prompts",
        help="prompt file: .txt (one per line) or .jsonl (text/caption/prompt); with --images, "
        "line i pairs with the i-th image in sorted file-name order (10.png sorts before 2.png)",
    )
    s.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or a JSON model config file")
    s.add_argument(
        "--pretrained", default=DEFAULT_PRETRAINED, help="open_clip tag, a local checkpoint file, or none (random)"
    )
    s.add_argument("--prefix", default=DEFAULT_PREFIX, help="prepended to every caption")
    s.add_argument(
        "--scale", choices=SCALES, default="raw", help="raw cosine (DMD2) or 100 * max(cos, 0) (torchmetrics)"
    )
    s.add_argument(
        "--crop-size",
        type=non_negative_int,
        default=256,
        help="centre-crop + LANCZOS resize before CLIP's preprocess; 0 = off",
    )
    _output_arg(s, "clip.json")

    s = sub.add_parser(
        "sr",
        help="PSNR / SSIM (RGB and Y), sharpness [, distance to a teacher, LPIPS] of super-resolution outputs",
        description=SR_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--hr", required=True, help="ground-truth high-resolution images")
    s.add_argument("--sr", help="super-resolved images (paired with --hr by file name)")
    s.add_argument(
        "--pipeline",
        help="a super-resolution pipeline folder (or sr-flow / sr-resshift), called as pipe(image=LR)",
    )
    s.add_argument("--lr", help="low-resolution inputs for --pipeline and --teacher (paired by file name)")
    s.add_argument("--steps", type=positive_int, default=None)
    s.add_argument("--num-samples", type=positive_int, default=None, help="only the first N images (sorted by name)")
    s.add_argument(
        "--crop-border",
        type=non_negative_int,
        default=0,
        help="pixels cut from each border before measuring (SR papers: the scale)",
    )
    s.add_argument("--t", type=float, default=None, help="--pipeline's fidelity-realism knob t in [0, 1] (OFTSR)")
    g = s.add_argument_group("distance to a teacher's samples")
    g.add_argument(
        "--teacher",
        help="a super-resolution pipeline folder (e.g. sr-flow, sr-resshift) run on the same --lr inputs with the "
        "same seeds; adds teacher_psnr_y and teacher_mad",
    )
    g.add_argument(
        "--teacher-steps", type=positive_int, default=None, help="the teacher's steps (default: its own default)"
    )
    g = s.add_argument_group("LPIPS")
    g.add_argument(
        "--lpips-weights",
        help="the lpips package's linear-layer weights .pth (weights/v0.1/alex.pth or vgg.pth), read offline",
    )
    g.add_argument(
        "--lpips-backbone",
        help="torchvision's AlexNet or VGG16 weights .pth (e.g. alexnet-owt-7be5be79.pth), read offline",
    )
    g.add_argument(
        "--lpips",
        action="store_true",
        help="LPIPS AlexNet through the lpips package, which downloads its backbone once (needs internet)",
    )
    g = s.add_argument_group("seeds and crops")
    g.add_argument("--seed", type=int, default=None, help="the pipelines' noise seed (one run; default 0)")
    g.add_argument(
        "--seeds",
        type=int_list,
        default=None,
        help="several seeds, e.g. 0,1,2: every figure is reported as mean +- std over them (replaces --seed)",
    )
    g.add_argument(
        "--crops-per-image",
        type=non_negative_int,
        default=0,
        help="K random crops per image and seed, fixed by the seed and the image name (0: whole images)",
    )
    g.add_argument(
        "--crop-size",
        type=positive_int,
        default=None,
        help="the side of each crop in HR pixels (a multiple of the scale)",
    )
    s.add_argument("--device", default=None)
    s.add_argument("--trust-remote-code", action="store_true")
    _output_arg(s, "sr.json")

    s = sub.add_parser(
        "bench", help="sampling speed of a student (generation or super-resolution) beside its teacher at N steps"
    )
    s.add_argument("--pipeline", required=True, help="the student pipeline folder (generation or super-resolution)")
    s.add_argument("--steps", type=positive_int, default=None, help="student steps (default: all trained steps)")
    s.add_argument(
        "--teacher",
        help="generation: a teacher folder or 'digits' (DDIM, trailing spacing); super-resolution: an SR pipeline "
        "folder (e.g. sr-flow, sr-resshift)",
    )
    s.add_argument(
        "--teacher-steps",
        type=positive_int,
        nargs="+",
        default=None,
        help="the teacher's steps, one row each (default: 50 for DDIM; an SR teacher's own default)",
    )
    s.add_argument(
        "--image",
        help="super-resolution students: the low-resolution input to time (default: a bundled held-out photograph "
        "degraded to the pipeline's input size)",
    )
    s.add_argument(
        "--guidance-scale", type=float, default=None, help="teacher guidance (2 network passes per step when != 1)"
    )
    _teacher_class_args(s)
    s.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per call (default: 64 for generation, 1 for super-resolution)",
    )
    s.add_argument("--repeats", type=positive_int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--run", help="a training output folder: include its per-phase step breakdown (timing.json)")
    s.add_argument("--plot", help="write a PNG bar chart of images/s per sampler to this path")
    _output_arg(s, "bench.json")
    return p


def _check_sources(args, parser) -> None:
    given = [k for k in ("pipeline", "teacher", "images", "stats") if getattr(args, k, None)]
    if args.command in ("fid", "kid", "stats", "clip") and len(given) != 1:
        what = "--pipeline, --teacher, --images" + (" or --stats" if args.command in ("fid", "kid") else "")
        parser.error(f"give exactly one of {what} (got {len(given) or 'none'}).")
    if args.command == "sr" and args.seeds is not None and args.seed is not None:
        parser.error("give --seed or --seeds, not both.")


# --- from the parsed command line to the library's typed options (nothing below this file sees `args`) ---


def _source(args) -> SourceOptions:
    return SourceOptions(
        pipeline=args.pipeline,
        teacher=args.teacher,
        images=args.images,
        stats=getattr(args, "stats", None),
        prompts=args.prompts,
        num_classes=getattr(args, "num_classes", None),
        null_class=getattr(args, "null_class", None),
    )


def _sampling(args) -> SamplingOptions:
    return SamplingOptions(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        class_sampling=args.class_sampling,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )


def _features(args) -> FeatureOptions:
    return FeatureOptions(
        features=args.features,
        mode=args.mode,
        inception_weights=args.inception_weights,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
        crop_size=args.crop_size,
    )


def _distance(args, command_line: CommandLine) -> dict:
    from . import commands

    reference = ReferenceOptions(ref=args.ref, ref_name=args.ref_name, ref_split=args.ref_split, ref_res=args.ref_res)
    kid = {"kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size} if args.command == "kid" else {}
    return commands.distance(
        args.command,
        _source(args),
        _sampling(args),
        _features(args),
        reference,
        args.output,
        save_stats=args.save_stats,
        plot=args.plot,
        command_line=command_line,
        **kid,
    )


def _stats(args, command_line: CommandLine) -> dict:
    from . import commands

    return commands.make_stats(
        _source(args), _sampling(args), _features(args), args.output, cleanfid_name=args.cleanfid_name
    )


def _clip(args, command_line: CommandLine) -> dict:
    from . import commands

    clip = ClipOptions(
        model=args.model, pretrained=args.pretrained, prefix=args.prefix, scale=args.scale, crop_size=args.crop_size
    )
    return commands.clip_score(_source(args), _sampling(args), clip, args.output, command_line=command_line)


def _sr(args, command_line: CommandLine) -> dict:
    from . import commands

    return commands.super_resolution(
        args.hr,
        args.output,
        sr=args.sr,
        pipeline=args.pipeline,
        lr=args.lr,
        steps=args.steps,
        num_samples=args.num_samples,
        crop_border=args.crop_border,
        lpips=args.lpips,
        seed=0 if args.seed is None else args.seed,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        command_line=command_line,
        t=args.t,
        seeds=args.seeds,
        crops_per_image=args.crops_per_image,
        crop_size=args.crop_size,
        teacher=args.teacher,
        teacher_steps=args.teacher_steps,
        lpips_weights=args.lpips_weights,
        lpips_backbone=args.lpips_backbone,
    )


def _bench(args, command_line: CommandLine) -> dict:
    from . import commands

    return commands.bench(
        args.pipeline,
        args.output,
        steps=args.steps,
        teacher=args.teacher,
        teacher_steps=args.teacher_steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        run=args.run,
        plot=args.plot,
        command_line=command_line,
        num_classes=args.num_classes,
        null_class=args.null_class,
        image=args.image,
    )


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output = os.path.abspath(args.output)  # messages then say exactly where the record went
    _check_sources(args, parser)
    if getattr(args, "crop_size", None) == 0:
        args.crop_size = None
    # Recorded in every JSON: the command line as typed (shell-quoted) and the values it was parsed to.
    command_line = CommandLine(argv=list(sys.argv[1:] if argv is None else argv), arguments=dict(vars(args)))
    run = {"fid": _distance, "kid": _distance, "stats": _stats, "clip": _clip, "sr": _sr, "bench": _bench}[
        args.command
    ]
    return run(args, command_line)


def entry_point():
    run_main(main)


if __name__ == "__main__":
    entry_point()
