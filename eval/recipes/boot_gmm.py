"""BOOT small-scale verification (shared/methods/boot.md section 9) on the 2-D Gaussian mixture.

    python -m onestep.eval.recipes.boot_gmm --output eval/figures/boot_gmm.json      (about 10 minutes on 2 CPU cores)

8 isotropic modes (std 0.05) on the unit circle, weights ∝ k+1, analytic teacher, student MLP 3x256 with a
sinusoidal time embedding and the parametrisation of spec 3.4, Adam lr 1e-3 with cosine decay, clipping 1.0,
all through the real Trainer with a data source that raises if read. Parts:
  1 reference    y-recursion vs x-space DDIM (float64), SD1.5 and flow schedules, both boundary conventions
  2 self-test    the reference trajectory in place of g: L_BS and L_BC (and one grid level off, for contrast)
  3-4 training   teacher-net and random initialisation on both schedules: coupling error per grid level over
                 training, energy distance and modes of g(eps, clean) against the N-step reference sampler's
  5 sensitivity  N in {10, 50}, lambda_BC = 0.1, B-exact (SD1.5 schedule, teacher-net initialisation)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from onestep.methods.base import StepInfo
from onestep.methods.boot import BOOT, BOOTConfig
from onestep.testing.boot_toy import (
    SCHEDULES,
    ReferenceStudent,
    analytic_teacher,
    ddim_trajectory,
    fit_teacher_net,
    propagation,
    random_student,
    reference_trajectory,
    run_boot_gmm,
)
from onestep.testing.gmm import GaussianMixture, energy_distance_floor

# name: (schedule, student initialisation, BOOTConfig overrides); the first two are the spec's recipe.
ARMS = {
    "sd15-teacher-net": ("sd15", "teacher-net", {}),
    "sd15-random": ("sd15", "random", {}),
    "flow-teacher-net": ("flow", "teacher-net", {}),
    "flow-random": ("flow", "random", {}),
    "sd15-param399": ("sd15", "teacher-net", {"param_timestep": 399}),  # spec 3.4's option param_t
    "sd15-param399-random": ("sd15", "random", {"param_timestep": 399}),
    "N10": ("sd15", "teacher-net", {"grid_size": 10}),
    "N50": ("sd15", "teacher-net", {"grid_size": 50}),
    "lambda0.1": ("sd15", "teacher-net", {"boundary_weight": 0.1}),
    "exact": ("sd15", "teacher-net", {"boundary": "exact"}),
}


def reference_check(gmm) -> list[dict]:
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for name, make in SCHEDULES.items():
        for boundary in ("paper", "exact"):
            sched = make()
            y, x = reference_trajectory(gmm, sched, eps, 20, boundary), ddim_trajectory(gmm, sched, eps, 20, boundary)
            rows.append({"schedule": name, "boundary": boundary, "max_abs_difference": float((y - x).abs().max())})
    return rows


def self_test(gmm) -> list[dict]:
    rows = []
    for name, make in SCHEDULES.items():
        for boundary in ("paper", "exact"):
            sched, row = make(), {"schedule": name, "boundary": boundary}
            for shift, label in ((0, "reference"), (1, "one level off")):
                method = BOOT(analytic_teacher(gmm, sched), BOOTConfig(train_batch_size=1024, boundary=boundary), (2,))
                method.attach({"student": ReferenceStudent(gmm, sched, 20, boundary, shift)}, lambda m: m)
                torch.manual_seed(0)
                info = StepInfo(0, ("student",), torch.Generator(), torch.device("cpu"))
                _, logs = method.loss("student", method.start_iteration(None, info))
                row[label] = {k: float(v) for k, v in logs.items()}
            rows.append(row)
    return rows


def _row(name, result, every, config: BOOTConfig, extra=None) -> dict:
    return {
        "arm": name,
        "grid_size": config.grid_size,
        "boundary": config.boundary,
        "boundary_weight": config.boundary_weight,
        "coupling_clean": result.coupling[0],
        "coupling_per_level": result.coupling,
        "energy_distance": result.energy_distance,
        "reference_energy_distance": result.reference_energy_distance,
        "modes": result.modes,
        "reference_modes": result.reference_modes,
        "history_every": every,
        "history": result.history,
        "propagation": propagation(result.history, every) if result.history else None,
        "seconds": round(result.seconds, 1),
        **(extra or {}),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="eval/figures/boot_gmm.json")
    p.add_argument("--steps", type=int, default=6000, help="Iterations per training arm.")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=256, help="Student (and teacher-net) MLP width.")
    p.add_argument("--arms", default=",".join(ARMS), help="Comma-separated subset of: " + ", ".join(ARMS))
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    gmm = GaussianMixture.circle()
    report = {
        "setup": {k: v for k, v in vars(args).items() if k != "output"},
        "reference_check": reference_check(gmm),
        "self_test": self_test(gmm),
        "ed_floor_2000": energy_distance_floor(gmm, n=2000, repeats=20),
    }
    print(json.dumps({k: report[k] for k in ("reference_check", "self_test")}, indent=1), flush=True)
    nets, rows, every = {}, [], max(1, args.steps // 15)
    for arm in arms:
        schedule, init, overrides = ARMS[arm]
        kind = "flow" if schedule == "flow" else "epsilon"
        config = BOOTConfig(learning_rate=1e-3, train_batch_size=args.batch, **overrides)
        if init == "teacher-net" and schedule not in nets:
            start = time.time()
            nets[schedule] = fit_teacher_net(gmm, SCHEDULES[schedule](), kind, width=args.width)
            report[f"teacher_net_fit_seconds_{schedule}"] = round(time.time() - start, 1)
        init = nets[schedule] if init == "teacher-net" else random_student(2, SCHEDULES[schedule](), kind, args.width)
        result, _ = run_boot_gmm(config, args.steps, schedule, init, gmm=gmm, eval_every=every)
        rows.append(_row(arm, result, every, config, {"schedule": schedule, "init": ARMS[arm][1]}))
        print(
            json.dumps({k: v for k, v in rows[-1].items() if k not in ("history", "coupling_per_level")}), flush=True
        )
    report["arms"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
