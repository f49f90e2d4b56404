"""BOOT small-scale verification (docs/methods/boot.md) on the 2-D Gaussian mixture, 3 seeds per arm.

    OMP_NUM_THREADS=1 python -m onestep.eval.recipes.boot_gmm

writes the full record (every arm, every seed) to eval/figures/boot_gmm.json and the claims record to
eval/figures/claims/boot-gmm.json. Measured wall time of the default run: 41 minutes (2,450 s) at one thread on a
2-core CPU shared with another job (a 6,000-iteration arm took 70 to 160 s, with the other job's load).

8 isotropic modes (std 0.05) on the unit circle, weights ∝ k+1, analytic teacher, student MLP 3x256 with a
sinusoidal time embedding and the parametrisation of the method page, Adam lr 1e-3 with cosine decay, clipping 1.0,
batch 256, N = 20, all through the real Trainer with a data source that raises if read. A seed changes the
student's training draws (and a random initialisation); the mixture, the teacher-nets (fitted once, seed 0) and the
evaluation noise stay fixed. Parts:
  1 reference    y-recursion vs x-space DDIM (float64), every schedule, both boundary conventions, 3 noise draws
  2 self-test    the reference trajectory in place of g: L_BS and L_BC (and one grid level off, for contrast)
  3 training     teacher-net and random initialisation on SD1.5 (conversion at T = 999 and at 399) and on the
                 flow: coupling error per grid level over training, energy distance and modes of g(eps, clean)
  4 boundaries   B-paper and B-exact on SD1.5's first 500 steps, where the two references differ by 6% of the
                 variance (0.1% on the full schedule); every student is also measured against the other reference.
Budget, to keep the default run near 45 minutes at one thread: 6,000 iterations at batch 256 per arm, as in the
one-seed version (7.5% of the samples of batch 1024 x 20k). Cuts: the two boundary arms run half that (their
references are far apart, so the budget does not decide them), and the sensitivity arms (N = 10, N = 50,
lambda_BC = 0.1, B-exact on the full SD1.5 schedule) are not in the default list: name them with --arms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from onestep.context import TeacherContext
from onestep.eval.verdicts import mean_std
from onestep.methods.base import StepInfo
from onestep.methods.boot import BOOT, BOOTConfig
from onestep.testing.boot_toy import (
    OTHER_BOUNDARY,
    SCHEDULES,
    ReferenceStudent,
    analytic_teacher,
    ddim_trajectory,
    fit_teacher_net,
    make_evaluation,
    ordering,
    propagation,
    random_student,
    reference_trajectory,
    run_boot_gmm,
)
from onestep.testing.gmm import GaussianMixture, energy_distance_floor


@dataclass
class Arm:
    schedule: str
    init: str  # "teacher-net" or "random"
    label: str
    overrides: dict = field(default_factory=dict)
    steps_fraction: float = 1.0  # of --steps


ARMS = {
    "sd15-teacher-net": Arm("sd15", "teacher-net", "SD1.5, teacher-net init, conversion at T = 999"),
    "sd15-random": Arm("sd15", "random", "SD1.5, random init, conversion at T = 999"),
    "sd15-param399": Arm("sd15", "teacher-net", "SD1.5, teacher-net init, conversion at 399", {"param_timestep": 399}),
    "sd15-param399-random": Arm("sd15", "random", "SD1.5, random init, conversion at 399", {"param_timestep": 399}),
    "flow-teacher-net": Arm("flow", "teacher-net", "flow, teacher-net init"),
    "flow-random": Arm("flow", "random", "flow, random init"),
    "sd15-500-paper": Arm("sd15-500", "teacher-net", "SD1.5's first 500 steps, B-paper", {}, 0.5),
    "sd15-500-exact": Arm("sd15-500", "teacher-net", "SD1.5's first 500 steps, B-exact", {"boundary": "exact"}, 0.5),
    # not in the default list (budget): the sensitivity arms and B-exact on the full schedule
    "sd15-exact": Arm("sd15", "teacher-net", "SD1.5, B-exact, teacher-net init", {"boundary": "exact"}),
    "N10": Arm("sd15", "teacher-net", "N = 10 (SD1.5, teacher-net init)", {"grid_size": 10}),
    "N50": Arm("sd15", "teacher-net", "N = 50 (SD1.5, teacher-net init)", {"grid_size": 50}),
    "lambda0.1": Arm("sd15", "teacher-net", "lambda_BC = 0.1 (SD1.5, teacher-net init)", {"boundary_weight": 0.1}),
}
DEFAULT_ARMS = list(ARMS)[:8]
RANDOM_INIT_ARMS = ("flow-random", "sd15-random", "sd15-param399-random")


def reference_check(gmm, seed: int) -> list[dict]:
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = []
    for name, make in SCHEDULES.items():
        for boundary in ("paper", "exact"):
            sched = make()
            y, x = reference_trajectory(gmm, sched, eps, 20, boundary), ddim_trajectory(gmm, sched, eps, 20, boundary)
            rows.append({"schedule": name, "boundary": boundary, "max_abs_difference": float((y - x).abs().max())})
    return rows


def reference_gaps(gmm) -> dict:
    """E|y_ref(clean) B-paper - y_ref(clean) B-exact|^2 / Var(x) per schedule, on the evaluation noise."""
    out = {}
    for name, make in SCHEDULES.items():
        ev = make_evaluation(gmm, make(), 20, "paper")
        out[name] = float((ev.y_ref[0] - ev.y_other_clean).square().sum(1).mean() / ev.variance)
    return out


def self_test(gmm, seed: int) -> list[dict]:
    rows = []
    for name, make in SCHEDULES.items():
        for boundary in ("paper", "exact"):
            sched, row = make(), {"schedule": name, "boundary": boundary}
            for shift, label in ((0, "reference"), (1, "one level off")):
                config = BOOTConfig(train_batch_size=1024, boundary=boundary)
                method = BOOT(TeacherContext(analytic_teacher(gmm, sched), (2,)), config)
                method.attach({"student": ReferenceStudent(gmm, sched, 20, boundary, shift)}, lambda m: m)
                torch.manual_seed(seed)
                info = StepInfo(0, ("student",), torch.Generator().manual_seed(seed), torch.device("cpu"))
                _, logs = method.loss("student", method.start_iteration(None, info))
                row[label] = {k: float(v) for k, v in logs.items()}
            rows.append(row)
    return rows


def _row(name: str, seed: int, result, every: int, config: BOOTConfig, steps: int) -> dict:
    return {
        "arm": name,
        "label": ARMS[name].label,
        "seed": seed,
        "schedule": ARMS[name].schedule,
        "init": ARMS[name].init,
        "steps": steps,
        "grid_size": config.grid_size,
        "boundary": config.boundary,
        "boundary_weight": config.boundary_weight,
        "param_timestep": config.param_timestep,
        "coupling_clean": result.coupling[0],
        "coupling_other_boundary": result.coupling_other_boundary,
        "coupling_per_level": result.coupling,
        "energy_distance": result.energy_distance,
        "reference_energy_distance": result.reference_energy_distance,
        "modes": result.modes,
        "reference_modes": result.reference_modes,
        "history_every": every,
        "history": result.history,
        "propagation": propagation(result.history, every) if result.history else None,
        "ordering": ordering(result.history, every) if result.history else None,
        "seconds": round(result.seconds, 1),
    }


SUMMARY_KEYS = ("coupling_clean", "coupling_other_boundary", "energy_distance", "reference_energy_distance")


def summarise(rows: list[dict]) -> dict:
    """Mean and std over seeds of each arm's headline numbers."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        entry = {k: mean_std([r[k] for r in mine]) for k in SUMMARY_KEYS}
        entry["modes_covered"] = mean_std([r["modes"]["modes_covered"] for r in mine])
        entry["weight_tv"] = mean_std([r["modes"]["weight_tv"] for r in mine])
        entry["seconds"] = mean_std([r["seconds"] for r in mine])
        out[arm] = {k: {"mean": v[0], "std": v[1]} for k, v in entry.items()}
    return out


def _values(rows, arm, read) -> list[float]:
    return [float(read(r)) for r in rows if r["arm"] == arm]


def _ends(rows, arm, measure) -> dict[str, list[float]]:
    """Per-seed (clean end, noisiest levels) values of one of `ordering`'s two measures."""
    mine = [r for r in rows if r["arm"] == arm]
    return {end: [float(r["ordering"][measure][end]) for r in mine] for end in ("clean_end", "top")}


def _self_test_losses(rows: list[dict]) -> list[float]:
    return [v for r in rows for k, v in r["reference"].items() if k in ("loss_bs", "loss_bc")]


def claims(report: dict) -> list[dict]:
    """Every claim of the method page, each from per-seed values (the verdicts are computed when rendered)."""
    rows, out = report["arms"], []
    have = {r["arm"] for r in rows}
    seeds = report["setup"]["seeds"]
    out.append(
        {
            "claim": "The y-recursion equals an x-space DDIM loop (largest absolute difference over every "
            "schedule and both boundary conventions)",
            "kind": "below",
            "values": [max(r["max_abs_difference"] for r in report["reference_check"][str(s)]) for s in seeds],
            "threshold": 1e-10,
        }
    )
    out.append(
        {
            "claim": "Self-test: the reference trajectory in the student's place gives L_BS = 0 (and L_BC = 0 "
            "under B-paper; the largest over every schedule and both conventions)",
            "kind": "below",
            "values": [max(_self_test_losses(report["self_test"][str(s)])) for s in seeds],
            "threshold": 1e-10,
        }
    )
    out.append(
        {
            "claim": "Self-test: one grid level off, L_BS is clearly non-zero (smallest over every schedule and "
            "both conventions)",
            "kind": "above",
            "values": [min(r["one level off"]["loss_bs"] for r in report["self_test"][str(s)]) for s in seeds],
            "threshold": 1e-4,
        }
    )
    for arm in ("sd15-teacher-net", "sd15-random", "sd15-param399", "sd15-param399-random", "flow-teacher-net",
                "flow-random", "N10"):  # fmt: skip
        if arm in have:
            out.append(
                {
                    "claim": f"Coupling error to the teacher's own trajectory below 1%: {ARMS[arm].label}",
                    "kind": "below",
                    "values": _values(rows, arm, lambda r: r["coupling_clean"]),
                    "threshold": 0.01,
                }
            )
    for init, (a, b) in {
        "teacher-net": ("sd15-param399", "sd15-teacher-net"),
        "random": ("sd15-param399-random", "sd15-random"),
    }.items():
        if {a, b} <= have:
            out.append(
                {
                    "claim": f"Converting at timestep 399 instead of T = 999 lowers the coupling error ({init} init)",
                    "kind": "better",
                    "a": {"label": "399", "values": _values(rows, a, lambda r: r["coupling_clean"])},
                    "b": {"label": "999", "values": _values(rows, b, lambda r: r["coupling_clean"])},
                    "lower_is_better": True,
                }
            )
    trained = [a for a in DEFAULT_ARMS if a in have]
    per_seed = [[r for r in rows if r["seed"] == s and r["arm"] in trained] for s in seeds]
    out.append(
        {
            "claim": "Every arm reaches all 8 modes (fewest modes covered over the arms)",
            "kind": "above",
            "values": [min(r["modes"]["modes_covered"] for r in rs) for rs in per_seed],
            "threshold": 7.5,
            "digits": 2,
        }
    )
    out.append(
        {
            "claim": "No arm beats its own N-step reference sampler (smallest ED^2 of the student minus its "
            "reference's, over the arms)",
            "kind": "above",
            "values": [min(r["energy_distance"] - r["reference_energy_distance"] for r in rs) for rs in per_seed],
            "threshold": 0.0,
        }
    )
    for arm in RANDOM_INIT_ARMS:
        if arm not in have:
            continue
        label = ARMS[arm].label
        fell, settled = (
            _ends(rows, arm, "relative_error_at_one_fifth"),
            _ends(rows, arm, "iteration_within_10x_of_final"),
        )
        out.append(
            {
                "claim": f"The error falls first at high t ({label}): a fifth into training the five noisiest "
                "levels' error has fallen further, relative to its start, than the clean end's",
                "kind": "better",
                "a": {"label": "noisiest", "values": fell["top"]},
                "b": {"label": "clean end", "values": fell["clean_end"]},
                "lower_is_better": True,
            }
        )
        out.append(
            {
                "claim": f"The noisiest levels settle first ({label}): they come within 10x of their final error "
                "at an earlier iteration than the clean end",
                "kind": "better",
                "a": {"label": "noisiest", "values": settled["top"]},
                "b": {"label": "clean end", "values": settled["clean_end"]},
                "lower_is_better": True,
                "digits": 4,
            }
        )
    gaps = report["reference_gaps"]
    for arm, schedule in (("sd15-teacher-net", "sd15"), ("sd15-exact", "sd15"), ("sd15-500-paper", "sd15-500"),
                          ("sd15-500-exact", "sd15-500")):  # fmt: skip
        if arm not in have:
            continue
        own = ARMS[arm].overrides.get("boundary", "paper")
        where = "SD1.5's first 500 steps" if schedule == "sd15-500" else "the full SD1.5 schedule"
        out.append(
            {
                "claim": f"On {where} (the two references {100 * gaps[schedule]:.2g}% of the variance apart) the "
                f"B-{own} student is closer to its own reference than to B-{OTHER_BOUNDARY[own]}'s",
                "kind": "better",
                "a": {"label": "own", "values": _values(rows, arm, lambda r: r["coupling_clean"])},
                "b": {"label": "other", "values": _values(rows, arm, lambda r: r["coupling_other_boundary"])},
                "lower_is_better": True,
            }
        )
    if {"N50", "sd15-teacher-net"} <= have:
        out.append(
            {
                "claim": "N = 20 couples better than N = 50 at this budget",
                "kind": "better",
                "a": {"label": "N = 20", "values": _values(rows, "sd15-teacher-net", lambda r: r["coupling_clean"])},
                "b": {"label": "N = 50", "values": _values(rows, "N50", lambda r: r["coupling_clean"])},
                "lower_is_better": True,
            }
        )
    if {"lambda0.1", "sd15-teacher-net"} <= have:
        out.append(
            {
                "claim": "lambda_BC = 1 couples better than lambda_BC = 0.1",
                "kind": "better",
                "a": {"label": "1", "values": _values(rows, "sd15-teacher-net", lambda r: r["coupling_clean"])},
                "b": {"label": "0.1", "values": _values(rows, "lambda0.1", lambda r: r["coupling_clean"])},
                "lower_is_better": True,
            }
        )
    return out


def _write(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"Wrote {path}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="eval/figures/boot_gmm.json", help="The full record.")
    p.add_argument("--claims", default="eval/figures/claims/boot-gmm.json", help="The claims record.")
    p.add_argument("--steps", type=int, default=6000, help="Iterations per training arm (boundary arms: half).")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=256, help="Student (and teacher-net) MLP width.")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="Comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--seeds", default="0,1,2", help="Training seeds, each arm runs once per seed.")
    args = p.parse_args(argv)
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    start = time.time()
    gmm = GaussianMixture.circle()
    report = {
        "setup": {**{k: v for k, v in vars(args).items() if k not in ("output", "claims")}, "seeds": seeds},
        "reference_check": {str(s): reference_check(gmm, s) for s in seeds},
        "self_test": {str(s): self_test(gmm, s) for s in seeds},
        "reference_gaps": reference_gaps(gmm),
        "ed_floor_2000": energy_distance_floor(gmm, n=2000, repeats=20),
    }
    print(json.dumps({k: report[k] for k in ("reference_gaps", "ed_floor_2000")}), flush=True)
    nets, rows = {}, []
    for arm in arms:
        spec = ARMS[arm]
        kind = "flow" if spec.schedule == "flow" else "epsilon"
        steps = max(1, round(args.steps * spec.steps_fraction))
        every = max(1, steps // 15)
        config = BOOTConfig(learning_rate=1e-3, train_batch_size=args.batch, **spec.overrides)
        if spec.init == "teacher-net" and spec.schedule not in nets:
            t0 = time.time()
            nets[spec.schedule] = fit_teacher_net(gmm, SCHEDULES[spec.schedule](), kind, width=args.width)
            report[f"teacher_net_fit_seconds_{spec.schedule}"] = round(time.time() - t0, 1)
        for seed in seeds:
            if spec.init == "teacher-net":
                init = nets[spec.schedule]
            else:
                init = random_student(2, SCHEDULES[spec.schedule](), kind, args.width, seed=seed)
            result, _ = run_boot_gmm(config, steps, spec.schedule, init, gmm=gmm, eval_every=every, seed=seed)
            rows.append(_row(arm, seed, result, every, config, steps))
            brief = {k: v for k, v in rows[-1].items() if k not in ("history", "coupling_per_level", "propagation")}
            print(json.dumps(brief), flush=True)
    report["arms"] = rows
    report["summary"] = summarise(rows)
    report["wall_seconds"] = round(time.time() - start, 1)
    _write(args.output, report)
    command = "python -m onestep.eval.recipes.boot_gmm" + "".join(f" {a}" for a in argv)
    record = {"recipe": command.strip(), "machine": "2-core CPU, one thread", "record": args.output}
    _write(args.claims, {**record, "claims": claims(report)})


if __name__ == "__main__":
    main()
