"""Argument groups shared by the train/ scripts (diffusers-examples names), and their error handling."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError
from .trainer import TrainerConfig


def positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def non_negative_int(value: str) -> int:
    v = positive_int(value) if value.strip() != "0" else 0
    return v


def add_trainer_args(p: argparse.ArgumentParser, output_dir: str) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--output_dir", default=output_dir, help="Where the exported pipeline, checkpoints, sample grids and logs go.")
    g.add_argument("--max_train_steps", type=positive_int, default=None, help="Optimisation iterations (DMD2: critic steps).")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="Micro-batches summed into each update.")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="Autocast dtype (bf16 recommended on CUDA).")
    g.add_argument("--max_grad_norm", type=float, default=None, help="Clip each model's gradient norm to this value.")
    g.add_argument("--lr_scheduler", choices=["constant", "linear", "cosine"], default="constant",
                   help="Learning-rate decay after the warm-up.")
    g.add_argument("--lr_warmup_steps", type=int, default=None, help="Iterations of linear learning-rate warm-up.")
    g.add_argument("--ema_decay", type=float, default=None, help="Weight EMA of the student (0 = off).")
    g.add_argument("--checkpointing_steps", type=positive_int, default=None, help="Iterations between resumable checkpoints.")
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None, help="Keep only this many newest checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder.")
    g.add_argument("--init_from_checkpoint", default=None,
                   help="Start from an earlier run's weights only (a checkpoint-<step> folder), e.g. DMD2 stage 2 after stage 1.")
    g.add_argument("--report_to", choices=["none", "tensorboard", "wandb", "all"], default="none",
                   help="Experiment tracker (logs/losses.csv and loss_curves.png are written in any case).")
    g.add_argument("--validation_steps", type=positive_int, default=None, help="Iterations between PNG sample grids.")
    g.add_argument("--seed", type=int, default=0, help="Every random draw of the run follows from it (exact resume).")
    g.add_argument("--eval_steps", type=non_negative_int, default=None,
                   help="Iterations between in-training FID evaluations (EMA weights, fixed noise; 0 = off); logged to logs/eval.csv and trackers.")
    g.add_argument("--eval_samples", type=positive_int, default=500, help="Samples per in-training evaluation.")
    g.add_argument("--eval_features", choices=["digits", "inception", "clip"], default=None,
                   help="Feature extractor for in-training FID (default: digits for the digits teacher, else inception).")
    g.add_argument("--eval_reference", default=None, help="Reference for in-training FID: image folder, statistics .npz, or 'digits'.")
    g.add_argument("--inception_weights", default=None, help="Local copy of clean-fid's Inception weights (offline machines).")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNets.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use xformers attention (CUDA only; SDPA is used otherwise).")


def help_formatter(preset_class):
    """--help that shows every default: a flag left unset takes its value from --preset when the preset
    has a field of that name (the epilog lists the presets' values), else the default argparse shows."""
    preset_fields = set(preset_class.__dataclass_fields__)

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):
            text = action.help or ""
            if not action.option_strings or action.default is argparse.SUPPRESS or "%(default)" in text:
                return text
            if action.default is None and action.dest in preset_fields:
                return text + " (default: from --preset)"
            if action.default is not None and action.default is not False:
                return text + " (default: %(default)s)"
            return text

    return Formatter


def trainer_config(args, defaults: dict, run_config: dict) -> TrainerConfig:
    """Command-line values override the preset's defaults, which override TrainerConfig's."""
    def pick(name):
        value = getattr(args, name, None)
        return value if value is not None else defaults.get(name, getattr(TrainerConfig, name))
    ema = pick("ema_decay")
    return TrainerConfig(
        output_dir=args.output_dir,
        max_train_steps=pick("max_train_steps"),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=pick("mixed_precision"),
        max_grad_norm=pick("max_grad_norm"),
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=pick("lr_warmup_steps"),
        ema_decay=ema if ema else None,
        checkpointing_steps=pick("checkpointing_steps"),
        checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint,
        init_from_checkpoint=getattr(args, "init_from_checkpoint", None),
        report_to=args.report_to,
        validation_steps=pick("validation_steps"),
        eval_steps=pick("eval_steps"),
        seed=args.seed,
        run_config=run_config,
    )


def apply_memory_options(unets, args, device) -> None:
    """Gradient checkpointing and the attention backend for every diffusers UNet in `unets`."""
    import warnings
    for unet in unets:
        if args.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if device.type != "cuda":
            warnings.warn("xformers needs CUDA; using PyTorch SDPA attention instead.")
            return
        try:
            import xformers  # noqa: F401
        except ImportError:
            warnings.warn("xformers is not installed (pip install 'onestep[xformers]'); using PyTorch SDPA attention instead.")
            return
        for unet in unets:
            unet.enable_xformers_memory_efficient_attention()


def run_main(main) -> None:
    """Run a script's main; bad input ends as one sentence on stderr and exit status 2. A run stopped by
    SIGTERM/SIGINT (after writing its checkpoint) exits with 128 + the signal number."""
    try:
        result = main()
        if isinstance(result, dict) and result.get("interrupted"):
            sys.exit(128 + int(result.get("signal", 15)))
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
