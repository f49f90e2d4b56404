"""MSD small-scale verification (docs/methods/msd.md) on the class-conditional Gaussian mixture, 3 seeds per arm.

    OMP_NUM_THREADS=1 python -m onestep.eval.recipes.msd_gmm

writes the full record (every arm, every seed) to eval/figures/msd_gmm.json and the claims record to
eval/figures/claims/msd-gmm.json. The default run took 1,013 s (about 17 minutes) at one thread on a 2-core
CPU shared with another job.

16 classes x 4 modes, exact real score, a width-48 teacher-net (capacity-limited on purpose, fitted once with seed
0) initialising G and F, DMD2 with R = 5, lr 1e-4, no GAN, t_c = 399 and the DM noise drawn from timesteps
DM_T_MIN..DM_T_MAX (the default 20..980 never shows the loss the components: at t = 20 the noise is already 7x
their std), the same iterations per student, all through the real Trainer:
  k1 .. k8      K in {1, 2, 4, 8} contiguous class ranges, the same per-student batch B
  k1_total      K = 1 with batch 4B: the total batch of K = 4
  tsm           4 students of width H/2, G initialised by TSM (all classes); F a teacher-net copy
  tsm_critic    as tsm, with each student's critic F at the student's width (F from the same TSM network)
  random        4 students of width H/2, G initialised randomly and trained for --steps + --tsm_steps iterations
                (as long as the TSM students' TSM and DM stages together); F a teacher-net copy
A seed changes each student's training draws (noise, timesteps, conditions), its TSM run and a random
initialisation; the mixture, the teacher-net and the evaluation noise stay fixed. Metrics per class, averaged over
the 16 (onestep/testing/msd_toy.py's class_metrics): energy distance and 64x64-bin histogram L1 to 2k true samples,
components covered (of 4, nearest-component assignment as on the unconditional test bed), precision (share within
3 std of a component) and the components still covered counting only those precise samples.
Budget: 4,000 iterations per student at batch 128 (the random arm 6,000: its TSM stage's 2,000 added).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace

import torch

from onestep.denoiser import Cond
from onestep.eval.verdicts import mean_std
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

ARMS = ("k1", "k2", "k4", "k8", "k1_total", "tsm", "tsm_critic", "random")
METRICS = ("energy_distance", "modes_covered", "precision", "modes_held_precisely", "histogram_l1", "seconds")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="eval/figures/msd_gmm.json", help="The full record.")
    p.add_argument("--claims", default="eval/figures/claims/msd-gmm.json", help="The claims record.")
    p.add_argument("--steps", type=int, default=4000, help="Critic iterations per student.")
    p.add_argument("--batch", type=int, default=128, help="Per-student batch B.")
    p.add_argument("--width", type=int, default=48, help="Teacher-net width H.")
    p.add_argument("--dm_t_min", type=int, default=0, help="Lowest timestep of the DM loss's noise draw.")
    p.add_argument("--dm_t_max", type=int, default=200, help="Highest timestep of the DM loss's noise draw.")
    p.add_argument("--tsm_steps", type=int, default=2000)
    p.add_argument("--arms", default=",".join(ARMS), help="Comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--seeds", default="0,1,2", help="Training seeds; every arm runs once per seed.")
    args = p.parse_args(argv)
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    with single_thread():
        record = run(args, arms, seeds)
    _write(args.output, record)
    command = ("python -m onestep.eval.recipes.msd_gmm" + "".join(f" {a}" for a in argv)).strip()
    _write(
        args.claims,
        {"recipe": command, "machine": "2-core CPU, one thread", "record": args.output, "claims": claims(record)},
    )


def run(args, arms: list[str], seeds: list[int]) -> dict:
    start = time.time()
    mixture = ClassMixture(16)
    net = fit_teacher_net(mixture, width=args.width)
    half = args.width // 2
    config = MSDConfig(
        learning_rate=1e-4,
        train_batch_size=args.batch,
        ttur_ratio=5,
        gan=False,
        conditioning_timesteps=[399],
        dm_t_min=args.dm_t_min,
        dm_t_max=args.dm_t_max,
    )
    torch.manual_seed(0)
    record = {
        "setup": {**{k: v for k, v in vars(args).items() if k not in ("output", "claims")}, "seeds": seeds},
        "reference_rows": {
            "true samples (floor)": reference_metrics(mixture),
            f"untrained G (teacher-net H = {args.width} at t = 399)": class_metrics(
                lambda z, c: _one_step(net, z, c), mixture
            ),
            f"untrained G (random width {half})": class_metrics(
                lambda z, c: _one_step(_denoiser(mlp(mixture, half), net), z, c), mixture
            ),
        },
        "arms": [],
    }
    tsm_nets = {}
    if {"tsm", "tsm_critic"} & set(arms):
        tsm_config = MSDConfig(learning_rate=3e-3, train_batch_size=1024)
        record["tsm"] = {}
        for seed in seeds:
            t0 = time.time()
            tsm_nets[seed] = tsm_network(mixture, net, half, tsm_config, args.tsm_steps, seed=seed)
            record["tsm"][str(seed)] = {
                "seconds": round(time.time() - t0, 1),
                **class_metrics(lambda z, c, s=seed: _one_step(_denoiser(tsm_nets[s], net), z, c), mixture),
            }
        record["reference_rows"][f"untrained G (TSM, width {half}, {args.tsm_steps} iterations)"] = _mean_of(
            record["tsm"].values()
        )
    specs = {
        "k1": ("K = 1", 1, config, None, args.steps),
        "k2": ("K = 2", 2, config, None, args.steps),
        "k4": ("K = 4", 4, config, None, args.steps),
        "k8": ("K = 8", 8, config, None, args.steps),
        "k1_total": (
            "K = 1, batch 4B (the total batch of K = 4)",
            1,
            replace(config, train_batch_size=4 * args.batch),
            None,
            args.steps,
        ),
        "tsm": (f"K = 4, width {half}, G from TSM, teacher-width critic", 4, config, "tsm", args.steps),
        "tsm_critic": (
            f"K = 4, width {half}, G from TSM, student-width critic",
            4,
            replace(config, student_critic="student"),
            "tsm",
            args.steps,
        ),
        "random": (
            f"K = 4, width {half}, G random, {args.steps + args.tsm_steps} iterations",
            4,
            config,
            "random",
            args.steps + args.tsm_steps,
        ),
    }
    for arm in arms:
        label, k, cfg, init, steps = specs[arm]
        row = {
            "arm": arm,
            "label": label,
            "students": k,
            "per_student_batch": cfg.train_batch_size,
            "iterations": steps,
            "seeds": {},
        }
        for seed in seeds:
            nets = critics = None
            if init == "tsm":
                nets = [copy.deepcopy(tsm_nets[seed]) for _ in range(k)]
            elif init == "random":
                torch.manual_seed(seed)
                nets = [mlp(mixture, half) for _ in range(k)]
            if cfg.student_critic == "student":
                critics = [copy.deepcopy(n) for n in nets]
            t0 = time.time()
            students = train_students(mixture, net, k, cfg, steps, seed=seed, nets=nets, critic_nets=critics)
            row["seeds"][str(seed)] = {
                **class_metrics(students.sample, mixture),
                "seconds": round(time.time() - t0, 1),
            }
            print(arm, seed, json.dumps(row["seeds"][str(seed)]), flush=True)
        row["summary"] = _mean_of(row["seeds"].values())
        record["arms"].append(row)
    record["wall_seconds"] = round(time.time() - start, 1)
    return record


def _mean_of(rows) -> dict:
    rows = list(rows)
    keys = [k for k in METRICS if all(k in r for r in rows)]
    return {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rows]))) for k in keys}


def _denoiser(network, teacher):
    from onestep.denoiser import Denoiser

    return Denoiser(network, teacher.schedule, "epsilon")


def _one_step(den, z, labels):
    return den(z, torch.full((len(z),), 399), Cond(class_labels=labels))


def _values(record: dict, arm: str, key: str) -> list[float] | None:
    row = next((r for r in record["arms"] if r["arm"] == arm), None)
    return None if row is None else [float(s[key]) for s in row["seeds"].values()]


HIGHER_IS_BETTER = ("modes_covered", "modes_held_precisely", "precision")


def claims(record: dict) -> list[dict]:
    """Every claim of the method page, each from per-seed values (the verdicts are computed when rendered)."""
    out = []

    def better(claim, a, b, key="energy_distance", la=None, lb=None, digits=3):
        va, vb = _values(record, a, key), _values(record, b, key)
        if va is not None and vb is not None:
            out.append(
                {
                    "claim": claim,
                    "kind": "better",
                    "a": {"label": la or a, "values": va},
                    "b": {"label": lb or b, "values": vb},
                    "lower_is_better": key not in HIGHER_IS_BETTER,
                    "digits": digits,
                }
            )

    ks = [a for a in ("k1", "k2", "k4", "k8") if _values(record, a, "modes_covered") is not None]
    for key, what in (
        ("modes_covered", "place their share of samples nearest every component (components covered"),
        (
            "modes_held_precisely",
            "hold every component precisely (components covered counting only samples within 3 std",
        ),
    ):
        if ks:
            per_seed = zip(*[_values(record, a, key) for a in ks])
            out.append(
                {
                    "claim": f"Before K is compared: the students {what}, of 4, fewest over K = 1, 2, 4, 8)",
                    "kind": "above",
                    "values": [min(v) for v in per_seed],
                    "threshold": 3.5,
                    "digits": 2,
                }
            )
    better("K = 4 beats K = 1 at equal per-student batch and size (ED^2)", "k4", "k1", la="K = 4", lb="K = 1")
    better("K = 4 beats K = 1 given K = 1 the same total batch (ED^2)", "k4", "k1_total", la="K = 4", lb="K = 1, 4B")
    better("K = 4 beats K = 1 on the histogram L1", "k4", "k1", "histogram_l1", "K = 4", "K = 1")
    better("K = 4 beats K = 1 on precision", "k4", "k1", "precision", "K = 4", "K = 1")
    better("More students help: K = 2 beats K = 1 (ED^2)", "k2", "k1", la="K = 2", lb="K = 1")
    better("More students help: K = 4 beats K = 2 (ED^2)", "k4", "k2", la="K = 4", lb="K = 2")
    better("More students help: K = 8 beats K = 4 (ED^2)", "k8", "k4", la="K = 8", lb="K = 4")
    better(
        "Smaller students: TSM initialisation beats a random one trained as long (TSM + DM iterations, ED^2)",
        "tsm",
        "random",
        la="TSM",
        lb="random",
    )
    better(
        "Smaller students: a teacher-width critic beats a student-width one (ED^2)",
        "tsm",
        "tsm_critic",
        la="teacher-width",
        lb="student-width",
    )
    return out


def _write(path: str, payload: dict) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"Wrote {path}", flush=True)


if __name__ == "__main__":
    main()
