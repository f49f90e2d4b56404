"""DisBack small-scale verification (shared/methods/disback.md section 9) on the 2-D Gaussian mixture.

    python -m onestep.eval.recipes.disback_gmm --output eval/figures/disback_gmm.json   (about 7 min on 2 CPU cores)

Teacher: the MLP teacher-net fitted to the analytic denoiser (checked: its 100-step DDIM samples against the
energy-distance floor). For each initial generator G0 (the teacher-net at t = 399; a copy regressed onto one
off-centre blob), stage 1 records N = 10 snapshots of a teacher-net copy fine-tuned on G0's samples, then three
stage-2 arms run with identical budgets, seeds, batches and R = 5:
  A  plain DMD2 (F = teacher copy, target = teacher throughout)
  B  DMD2 with F = S'_N (the critic's warm start only)
  C  DisBack (F = S'_N, targets S'_9 .. S'_1, then the teacher), the spec's fixed rule (M = steps / 40)
  and C with the converged rule (rho 0.5, phases between M/2 and 2M), each for every seed in --seeds.
ED^2 to the true mixture and mode coverage every --eval_every iterations; iterations to each threshold (the
spec's 2x floor, and fixed levels a one-step MLP reaches) and the final ED.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace

import torch

from onestep.sampling import ddim_sample
from onestep.testing.disback_toy import (
    base_config,
    blob_generator,
    build_arm,
    initial_dm_gradient,
    record_path,
    run_arm,
)
from onestep.testing.gmm import GaussianMixture, energy_distance, energy_distance_floor
from onestep.testing.toy import evaluate_generator, fit_teacher_net, sd_schedule, teacher_ddim_result


def iterations_to(history: list[dict], threshold: float, every: int) -> int | None:
    """The first evaluated iteration whose ED is below the threshold (history[0] is iteration 0)."""
    for i, row in enumerate(history):
        if row["energy_distance"] < threshold:
            return i * every
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="disback_gmm.json")
    p.add_argument("--steps", type=int, default=3000, help="Stage-2 critic iterations per arm.")
    p.add_argument("--path_steps", type=int, default=None, help="Stage-1 updates (default: 5%% of --steps, N = 10).")
    p.add_argument("--path_learning_rate", type=float, default=None, help="Stage-1 lr (default: stage 2's, 1e-4).")
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--cases", default="teacher_g0,blob_g0")
    p.add_argument("--seeds", default="0,1,2", help="Seeds of stage 1 and of every arm (noise and batches).")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    gmm, sched = GaussianMixture.circle(), sd_schedule()
    net = fit_teacher_net(gmm, sched, steps=2000, lr=3e-3, batch=512)
    floor = energy_distance_floor(gmm, repeats=20)
    teacher_ed = teacher_ddim_result(net, gmm).energy_distance
    thresholds = {"2x floor (spec)": 2 * floor, "0.05": 0.05, "0.02": 0.02}
    record = {
        "floor": floor,
        "teacher_net_ddim100_ed": teacher_ed,
        "teacher_within_2x_floor": teacher_ed < 2 * floor,
        "settings": vars(args),
        "cases": {},
    }
    print(json.dumps({k: v for k, v in record.items() if k != "cases"}), flush=True)
    config = base_config(path_steps=args.path_steps, path_learning_rate=args.path_learning_rate).resolved(args.steps)
    seeds = [int(x) for x in args.seeds.split(",")]
    for case in args.cases.split(","):
        g0 = None if case == "teacher_g0" else blob_generator(net)
        g0_net = g0 if g0 is not None else net
        g0_sample = lambda z, g0_net=g0_net: g0_net(z, torch.full((z.shape[0],), 399))  # noqa: E731
        out = {"g0": _metrics(evaluate_generator(g0_sample, gmm)), "seeds": {}}
        for seed in seeds:
            out["seeds"][seed] = _one_seed(args, case, seed, net, config, gmm, g0, g0_sample, thresholds)
        out["summary"] = _summary(out["seeds"], thresholds)
        print(case, json.dumps(out["summary"]), flush=True)
        record["cases"][case] = out
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    print(f"Wrote {args.output}")


ARMS = {"A": {}, "B": {}, "C": {}, "C, converged rule": {"switch_rule": "converged"}}


def _one_seed(args, case, seed, net, config, gmm, g0, g0_sample, thresholds) -> dict:
    """Stage 1 with this seed, then every arm with the same seed (same noise and batches)."""
    out = {"arms": {}}
    with tempfile.TemporaryDirectory() as path_dir:
        t0 = time.time()
        stage1 = record_path(net, config, path_dir, gmm, g0=g0, seed=seed)
        out["stage1_seconds"] = round(time.time() - t0, 1)
        if seed == 0:
            out["path"] = _path_report(stage1, net, g0_sample, gmm, path_dir, config.num_snapshots)
        # Spec 9's unit check: mean|x0_fake - x0_target| at the start of stage 2. Arm A's is exactly 0 (F is the
        # teacher); arm B's (F = S'_N, target = teacher) is what A's becomes once its critic has learnt G0.
        out["initial_dm_gradient"] = {
            arm: initial_dm_gradient(build_arm(arm, net, config, gmm, path_dir, g0)) for arm in ("A", "B", "C")
        }
        for arm, change in ARMS.items():
            t0 = time.time()
            res, method = run_arm(
                arm[0], net, replace(config, **change), args.steps, gmm, path_dir, g0, args.eval_every, seed
            )
            history = method.history
            row = {
                **_metrics(res),
                "seconds": round(time.time() - t0, 1),
                "iterations_to": {k: iterations_to(history, v, args.eval_every) for k, v in thresholds.items()},
                "ed_history": [round(h["energy_distance"], 5) for h in history],
            }
            if arm.startswith("C"):
                row["switches"] = method.switches
            out["arms"][arm] = row
            print(case, seed, arm, json.dumps({k: v for k, v in row.items() if k != "ed_history"}), flush=True)
    return out


def _summary(per_seed: dict, thresholds: dict) -> dict:
    """Per arm: final ED (mean and per seed) and iterations to each threshold (per seed; None = not reached)."""
    out = {}
    for arm in ARMS:
        rows = [s["arms"][arm] for s in per_seed.values()]
        finals = [r["energy_distance"] for r in rows]
        out[arm] = {
            "final_ed_mean": sum(finals) / len(finals),
            "final_ed": finals,
            "iterations_to": {k: [r["iterations_to"][k] for r in rows] for k in thresholds},
            "modes_covered": [r["modes_covered"] for r in rows],
        }
    grads = [s["initial_dm_gradient"] for s in per_seed.values()]
    out["initial_dm_gradient_mean"] = {arm: sum(g[arm] for g in grads) / len(grads) for arm in ("A", "B", "C")}
    return out


def _metrics(res) -> dict:
    return {"energy_distance": res.energy_distance, **res.modes}


def _path_report(stage1, net, g0_sample, gmm, path_dir, n) -> dict:
    """How far the path went: ED of each snapshot's 50-step DDIM samples to G0's samples and to the mixture."""
    from onestep.methods.disback import load_snapshot

    g = torch.Generator().manual_seed(7)
    z = torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        g0_x = g0_sample(torch.randn(2000, 2, generator=g)).double()
    copy_net = copy.deepcopy(net)
    rows = []
    for i in range(n + 1):
        if i:
            load_snapshot(path_dir, i, copy_net.net)
        x = ddim_sample(copy_net, z, num_steps=50).double()
        truth = gmm.sample(2000, torch.Generator().manual_seed(8))
        rows.append({"snapshot": i, "ed_to_g0": energy_distance(x, g0_x), "ed_to_mixture": energy_distance(x, truth)})
    return {"snapshots": rows, "loss_plateau_at_update": stage1.plateau()}


if __name__ == "__main__":
    main()
