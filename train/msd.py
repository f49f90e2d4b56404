"""MSD, multi-student distillation (Song et al. 2025): K one-step students, each a DMD2 student trained on its own
part of the classes or prompts, and one pipeline that routes every item to its student (NFE 1).

With no arguments it distils the bundled digits teacher into 2 students (classes 0-4 and 5-9) on the CPU:

    accelerate launch train/msd.py

By default the students train one after another in this process. To spread them over K machines, run
`--student_index k` on machine k (same --output_dir on a shared disk, or copy the student-<k>/ folders together
afterwards), then the same command with --assemble instead; text teachers first fit the router once, with
--fit_router, so that every run uses the same one. Every option left out comes from --preset (listed at
the end) or from --config, a training_config.json an earlier run wrote.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import non_negative_float, non_negative_int, positive_int, run_main  # noqa: E402
from train.dmd2 import DMD2_FLAGS  # noqa: E402  (DMD2's flags, declared once)

# MSD's own flags (shared/methods/msd.md): name, type (bool: --x / --no-x), help. Defaults come from --preset.
MSD_FLAGS = (
    ("num_students", positive_int, "K, the number of students (at most 8, and at most the number of classes)."),
    ("partition", str, "class_range (class labels), kmeans_balanced (prompts; default), kmeans or pca_quadrant."),
    ("router_file", str, "A router.json fitted before (another run's) instead of fitting one."),
    ("router_seed", int, "Seed of the k-means++ initialisation of text partitions."),
    ("router_max_prompts", positive_int, "Text partitions are fitted on a seeded subsample of at most this many."),
    ("router_pooling", str, "Pooled prompt embedding: masked_mean (non-padding tokens) or mean (all tokens)."),
    ("router_normalisation", str, "The pooled embedding L2-normalised (l2) or not (none)."),
    ("dm_steps", non_negative_int, "Of each student's --max_train_steps, the first this many are DM only (stage 1)."),
    ("adm_learning_rate", non_negative_float, "Stage 2's (DM + GAN) learning rate of G and critic (None: stage 1's)."),
    ("student_config", str, "A smaller UNet config (JSON) for the students; they start from TSM (stage 0)."),
    ("student_critic", str, "The critic F of a smaller student: teacher (a teacher copy) or student (its size)."),
    ("tsm_steps", non_negative_int, "TSM iterations of a smaller student (0: start it from random weights)."),
    ("tsm_learning_rate", non_negative_float, "TSM's learning rate (None: --learning_rate)."),
    ("tsm_data", str, "TSM's x0: real images, or teacher samples (DDIM)."),
    ("tsm_conditions", str, "TSM's conditions: all, or part (the student's own)."),
    ("tsm_null_dropout", float, "Share of null conditions in TSM, for CFG-trained teachers."),
    ("tsm_teacher_steps", positive_int, "DDIM steps of --tsm_data teacher."),
    ("stabiliser", str, "ttur (DMD2), or regression (DMD1: + a regression loss on teacher ODE pairs)."),
    ("regression_weight", non_negative_float, "lambda_reg of --stabiliser regression."),
)


def build_parser():
    from onestep.presets.msd import DEFAULT_PRESET, PRESETS
    from onestep.run_setup import GROUPS, run_parser

    groups = tuple(g for g in GROUPS if g != "in-training evaluation")  # measured on the assembled pipeline
    p = run_parser(__doc__, PRESETS, DEFAULT_PRESET, groups)
    g = p.add_argument_group("DMD2, every student's (shared/methods/dmd2.md)")
    own = p.add_argument_group("MSD (shared/methods/msd.md)")
    for group, flags in ((g, [f for f in DMD2_FLAGS if f[0] != "stage"]), (own, MSD_FLAGS)):
        for name, kind, text in flags:
            how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
            group.add_argument(f"--{name}", help=text, **how)
    run = own.add_mutually_exclusive_group()
    run.add_argument("--student_index", type=int, help="Train only student k (0-based), e.g. one per machine.")
    run.add_argument("--assemble", action="store_true", help="Only assemble the trained students into the pipeline.")
    run.add_argument(
        "--fit_router",
        action="store_true",
        help="Only fit and save the router (text teachers: do this once before training one student per run).",
    )
    return p


def main(argv=None):
    from onestep.config import resolve
    from onestep.methods.msd import MSDConfig
    from onestep.methods.msd_run import MSDRun
    from onestep.presets.msd import DEFAULT_PRESET, PRESETS

    args = build_parser().parse_args(argv)
    config, preset = resolve(vars(args), PRESETS, DEFAULT_PRESET, MSDConfig)
    return MSDRun(config, preset).run(
        student_index=args.student_index, assemble_only=args.assemble, fit_router=args.fit_router
    )


if __name__ == "__main__":
    run_main(main)
