"""MSD small-scale verification (shared/methods/msd.md section 9) on the class-conditional Gaussian mixture.

    python -m onestep.eval.recipes.msd_gmm --output eval/figures/msd_gmm.json     (about 10 minutes on 2 CPU cores)

16 classes x 4 modes, exact real score, a width-48 teacher-net (capacity-limited) initialising G and F, DMD2 toy
settings (R = 5, lr 1e-4, no GAN, t_c = 399), the same iterations per student, all through the real Trainer:
  k1 .. k8      K in {1, 2, 4, 8} contiguous class ranges, the same per-student batch B
  k1_total      K = 1 with batch 4B: the total batch of K = 4
  tsm / random  4 students of width H/2, G initialised by TSM (all classes) or randomly; F a teacher-net copy
Metrics (per class, averaged over the 16): energy distance and 64x64-bin histogram L1 to true samples (2k each),
modes covered (of 4).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from onestep.methods.msd import MSDConfig
from onestep.testing.msd_toy import (
    ClassMixture,
    class_metrics,
    fit_teacher_net,
    mlp,
    reference_metrics,
    single_thread,
    train_students,
    tsm_network,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="msd_gmm.json")
    p.add_argument("--steps", type=int, default=3000, help="Critic iterations per student.")
    p.add_argument("--batch", type=int, default=128, help="Per-student batch B.")
    p.add_argument("--width", type=int, default=48, help="Teacher-net width H.")
    p.add_argument("--tsm_steps", type=int, default=3000)
    p.add_argument("--arms", default="k1,k2,k4,k8,k1_total,tsm,random")
    args = p.parse_args(argv)
    with single_thread():
        run(args, args.arms.split(","))


def run(args, arms):
    mixture = ClassMixture(16)
    t0 = time.time()
    net = fit_teacher_net(mixture, width=args.width)
    rows = [{"arm": "true samples (floor)", **reference_metrics(mixture)}]
    rows.append(
        {
            "arm": f"untrained G (teacher-net H={args.width} at t=399)",
            **class_metrics(lambda z, c: _teacher_one_step(net, z, c), mixture),
            "seconds": round(time.time() - t0, 1),
        }
    )
    config = MSDConfig(
        learning_rate=1e-4, train_batch_size=args.batch, ttur_ratio=5, gan=False, conditioning_timesteps=[399]
    )

    def arm(name, num_students, cfg=config, nets=None):
        start = time.time()
        students = train_students(mixture, net, num_students, cfg, args.steps, nets=nets)
        row = {
            "arm": name,
            "students": num_students,
            "per_student_batch": cfg.train_batch_size,
            "iterations_per_student": args.steps,
            **class_metrics(students.sample, mixture),
            "seconds": round(time.time() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    for k in (1, 2, 4, 8):
        if f"k{k}" in arms:
            arm(f"K={k}, batch B={args.batch} per student", k)
    if "k1_total" in arms:
        arm(
            f"K=1, batch 4B={4 * args.batch} (equal total batch to K=4)",
            1,
            MSDConfig(**{**config.__dict__, "train_batch_size": 4 * args.batch}),
        )
    half = args.width // 2
    if "tsm" in arms:
        start = time.time()
        tsm = tsm_network(mixture, net, half, MSDConfig(learning_rate=3e-3, train_batch_size=1024), args.tsm_steps)
        rows.append(
            {
                "arm": f"TSM fit (width {half}, all classes, {args.tsm_steps} iterations)",
                "seconds": round(time.time() - start, 1),
            }
        )
        arm(f"K=4, width H/2={half}, G from TSM", 4, nets=[_copy(tsm) for _ in range(4)])
    if "random" in arms:
        torch.manual_seed(0)
        arm(f"K=4, width H/2={half}, G random", 4, nets=[mlp(mixture, half) for _ in range(4)])
    rows.append({"arm": "total", "seconds": round(time.time() - t0, 1)})
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"Wrote {args.output}")


def _teacher_one_step(net, z, labels):
    from onestep.denoiser import Cond

    return net(z, torch.full((len(z),), 399), Cond(class_labels=labels))


def _copy(module):
    import copy

    return copy.deepcopy(module)


if __name__ == "__main__":
    main()
