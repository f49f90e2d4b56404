"""DisBack small-scale verification (docs/methods/disback.md) on the 2-D Gaussian mixture, 3 seeds per arm.

    OMP_NUM_THREADS=1 python -m onestep.eval.recipes.disback_gmm

writes the full record (every arm, every seed) to eval/figures/disback_gmm.json and the claims record to
eval/figures/claims/disback-gmm.json. Measured wall time of the default run: 18 minutes (1,097 s) at one thread on a
2-core CPU shared with another job.

Teacher: the 3x128 MLP teacher-net fitted once (seed 0) to the analytic denoiser (its 100-step DDIM samples are
checked against the energy-distance floor). Two initial generators G0: the teacher-net at t = 399 on pure noise,
and a copy regressed onto one off-centre blob (1 mode of 8). Per G0 and seed, stage 1 records N = 10 snapshots of
a teacher-net copy fine-tuned on G0's samples (150 updates), then every arm runs 3,000 stage-2 iterations with the
same seed, batches and R = 5 (DMD2's toy settings, t_c = 399):
  A             plain DMD2 (F = teacher copy, target = teacher throughout)
  B             DMD2 with F = S'_N (the critic's warm start only)
  C             DisBack (F = S'_N, targets S'_9 .. S'_1, then the teacher), the default fixed rule M = steps / 40
  C_short       C with M = --short_every (default 20: a 180-iteration walk, no longer than A takes to converge)
  C_converged   C with the converged rule at its defaults (rho 0.5, window 5, phases between M/2 and 2M)
  C_tuned       C with the converged rule at --tuned_rho / --tuned_window (measured for this toy; see the docs)
A seed changes stage 1's and stage 2's training draws; the mixture, the teacher-net, G0 and the evaluation noise
stay fixed. ED^2 to the true mixture every --eval_every iterations (2k samples), iterations to each threshold, the
final ED^2 (5k samples), the DM gradient at the start of stage 2, and for the converged rule how many switches came
before the 2M cap. Budget: every arm keeps its one-seed length (3,000 iterations).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

from onestep.eval.verdicts import mean_std
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

CASES = {"teacher_g0": "teacher-net G0", "blob_g0": "blob G0"}
THRESHOLDS = ("0.05", "0.02")
SUMMARY_KEYS = (
    "energy_distance",
    "weight_tv",
    "modes_covered",
    "precision",
    "walk_length",
    "early_switches",
    "initial_dm_gradient",
    "phase_gradient_ratio",
    "seconds",
    *(f"iterations_to_{t}" for t in THRESHOLDS),
)


def iterations_to(history: list[dict], threshold: float, every: int) -> int | None:
    """The first evaluated iteration whose ED is below the threshold (history[0] is iteration 0)."""
    for i, row in enumerate(history):
        if row["energy_distance"] < threshold:
            return i * every
    return None


def arm_settings(args) -> dict:
    """Arm name -> (label, stage-2 kind A/B/C, config changes)."""
    m = args.steps // 40
    converged = dict(switch_rule="converged", switch_min_steps=None, switch_max_steps=None)
    return {
        "A": ("A: DMD2", "A", {}),
        "B": ("B: DMD2, critic from S'_N", "B", {}),
        "C": (f"C: DisBack, M = {m} (walk {9 * m})", "C", {}),
        "C_short": (
            f"C: DisBack, M = {args.short_every} (walk {9 * args.short_every})",
            "C",
            dict(switch_every=args.short_every, switch_min_steps=None, switch_max_steps=None),
        ),
        "C_converged": ("C: converged rule, rho 0.5, window 5", "C", converged),
        "C_tuned": (
            f"C: converged rule, rho {args.tuned_rho:g}, window {args.tuned_window}",
            "C",
            dict(**converged, switch_rho=args.tuned_rho, switch_window=args.tuned_window),
        ),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="eval/figures/disback_gmm.json", help="The full record.")
    p.add_argument("--claims", default="eval/figures/claims/disback-gmm.json", help="The claims record.")
    p.add_argument("--steps", type=int, default=3000, help="Stage-2 critic iterations per arm.")
    p.add_argument("--path_steps", type=int, default=None, help="Stage-1 updates (default: 5%% of --steps, N = 10).")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--short_every", type=int, default=20, help="M of the short-walk arm.")
    p.add_argument("--tuned_rho", type=float, default=0.9, help="rho of the tuned converged rule.")
    p.add_argument("--tuned_window", type=int, default=3, help="Window of the tuned converged rule.")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--arms", default="A,B,C,C_short,C_converged,C_tuned")
    p.add_argument("--seeds", default="0,1,2", help="Seeds of stage 1 and of every arm (noise and batches).")
    args = p.parse_args(argv)
    seeds, cases, arms = [int(x) for x in args.seeds.split(",")], args.cases.split(","), args.arms.split(",")
    settings = arm_settings(args)
    unknown = [a for a in arms if a not in settings] + [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown arm(s) or case(s): {', '.join(unknown)}")
    start = time.time()
    torch.manual_seed(0)
    gmm, sched = GaussianMixture.circle(), sd_schedule()
    net = fit_teacher_net(gmm, sched, steps=2000, lr=3e-3, batch=512)
    floor = energy_distance_floor(gmm, repeats=20)
    teacher = teacher_ddim_result(net, gmm)
    record = {
        "setup": {**{k: v for k, v in vars(args).items() if k not in ("output", "claims")}, "seeds": seeds},
        "floor": floor,
        "teacher_within_2x_floor": teacher.energy_distance < 2 * floor,
        "reference_rows": {
            "floor: 95th percentile, two true 5k sets (20 repeats)": {"energy_distance": floor},
            "teacher-net, DDIM 100 steps": _metrics(teacher),
        },
        "stage1": {},
        "arms": [],
    }
    config = base_config(path_steps=args.path_steps).resolved(args.steps)
    for case in cases:
        g0 = None if case == "teacher_g0" else blob_generator(net)
        g0_net = g0 if g0 is not None else net
        g0_sample = lambda z, g0_net=g0_net: g0_net(z, torch.full((z.shape[0],), 399))  # noqa: E731
        record["reference_rows"][f"{CASES[case]} (untrained)"] = _metrics(evaluate_generator(g0_sample, gmm))
        rows = {
            a: {"arm": f"{case}/{a}", "case": case, "label": f"{CASES[case]}, {settings[a][0]}", "seeds": {}}
            for a in arms
        }
        record["stage1"][case] = {}
        for seed in seeds:
            stage1, per_arm = _one_seed(args, seed, net, config, gmm, g0, g0_sample, settings, arms)
            record["stage1"][case][str(seed)] = stage1
            for a in arms:
                rows[a]["seeds"][str(seed)] = per_arm[a]
        for row in rows.values():
            row["summary"] = _summary(row["seeds"].values())
            record["arms"].append(row)
    record["wall_seconds"] = round(time.time() - start, 1)
    _write(args.output, record)
    command = ("python -m onestep.eval.recipes.disback_gmm" + "".join(f" {a}" for a in argv)).strip()
    _write(
        args.claims,
        {"recipe": command, "machine": "2-core CPU, one thread", "record": args.output, "claims": claims(record)},
    )


def _one_seed(args, seed, net, config, gmm, g0, g0_sample, settings, arms) -> tuple[dict, dict]:
    """Stage 1 with this seed, then every arm with the same seed (same noise and batches)."""
    stage1, out = {}, {}
    with tempfile.TemporaryDirectory() as path_dir:
        t0 = time.time()
        path = record_path(net, config, path_dir, gmm, g0=g0, seed=seed)
        stage1["seconds"] = round(time.time() - t0, 1)
        stage1["loss_plateau_at_update"] = path.plateau()
        if seed == 0:
            stage1["snapshots"] = _path_report(net, g0_sample, gmm, path_dir, config.num_snapshots)
        # mean|x0_fake - x0_target| at the start of stage 2. Arm A's is exactly 0 (F is the teacher); arm B's
        # (F = S'_N, target = teacher) is what A's becomes once its critic has learnt G0.
        start_grad = {k: initial_dm_gradient(build_arm(k, net, config, gmm, path_dir, g0)) for k in ("A", "B", "C")}
        for arm in arms:
            label, kind, change = settings[arm]
            arm_config = replace(config, **change).resolved(args.steps)
            t0 = time.time()
            res, method = run_arm(kind, net, arm_config, args.steps, gmm, path_dir, g0, args.eval_every, seed)
            history = method.history
            row = {
                **_metrics(res),
                "seconds": round(time.time() - t0, 1),
                "initial_dm_gradient": start_grad[kind],
                **{f"iterations_to_{t}": iterations_to(history, float(t), args.eval_every) for t in THRESHOLDS},
                "ed_history": [round(h["energy_distance"], 5) for h in history],
            }
            if kind == "C":
                row.update(_walk(method.switches, arm_config, method.dm_grads))
                row["dm_gradient_per_update"] = [round(g, 4) for g in method.dm_grads]
            out[arm] = row
            brief = {k: v for k, v in row.items() if k not in ("ed_history", "dm_gradient_per_update")}
            print(arm, seed, json.dumps(brief), flush=True)
    return stage1, out


def _walk(switches: list, config, dm_grads: list[float]) -> dict:
    """The walk's switches, its length (the iteration it reached the teacher) and, for the converged rule, how many
    switches came before the phase cap (the rule fired) rather than at it. Whatever the rule, each phase of 10 or
    more generator updates also gives the converged rule's own ratio (mean DM gradient of its last 5 updates over
    its first 5): below rho is what the rule waits for."""
    starts = [0] + [it for it, _ in switches]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    out = {"switches": switches, "walk_length": starts[-1] if len(switches) == 9 else None}
    r, ratios = config.ttur_ratio, []
    for a, b in zip(starts, starts[1:]):
        phase = dm_grads[a // r : b // r]
        if len(phase) >= 10:
            ratios.append(round(sum(phase[-5:]) / sum(phase[:5]), 3))
    out["phase_gradient_ratios"] = ratios
    out["phase_gradient_ratio"] = sum(ratios) / len(ratios) if ratios else None
    if config.switch_rule == "converged":
        out["early_switches"] = sum(n < config.switch_max_steps for n in lengths)
        out["phase_bounds"] = [config.switch_min_steps, config.switch_max_steps]
    return out


def _summary(rows) -> dict:
    """Mean and std over seeds per key; None where a seed has no value (e.g. a threshold it never reached)."""
    rows, out = list(rows), {}
    for key in SUMMARY_KEYS:
        values = [r.get(key) for r in rows]
        if all(v is not None for v in values):
            out[key] = dict(zip(("mean", "std"), mean_std([float(v) for v in values])))
        elif any(key in r for r in rows):
            out[key] = None
    return out


def _metrics(res) -> dict:
    return {"energy_distance": res.energy_distance, **res.modes}


def _path_report(net, g0_sample, gmm, path_dir, n) -> list[dict]:
    """How far the path went: ED of each snapshot's 50-step DDIM samples to G0's samples and to the mixture."""
    from onestep.methods.disback import load_snapshot

    g = torch.Generator().manual_seed(7)
    z = torch.randn(2000, 2, generator=g)
    with torch.no_grad():
        g0_x = g0_sample(torch.randn(2000, 2, generator=g)).double()
    copy_net = copy.deepcopy(net)
    truth = gmm.sample(2000, torch.Generator().manual_seed(8))
    rows = []
    for i in range(n + 1):
        if i:
            load_snapshot(path_dir, i, copy_net.net)
        x = ddim_sample(copy_net, z, num_steps=50).double()
        rows.append({"snapshot": i, "ed_to_g0": energy_distance(x, g0_x), "ed_to_mixture": energy_distance(x, truth)})
    return rows


def _values(record: dict, arm: str, key: str) -> list[float] | None:
    row = next((r for r in record["arms"] if r["arm"] == arm), None)
    if row is None:
        return None
    values = [s.get(key) for s in row["seeds"].values()]
    return None if any(v is None for v in values) else [float(v) for v in values]


def claims(record: dict) -> list[dict]:
    """Every claim of the method page, each from per-seed values (the verdicts are computed when rendered).
    A threshold some seed never reached leaves its speed claim out (the full record shows it)."""
    out = []
    for case, name in CASES.items():
        labels = {r["arm"].split("/")[1]: r["label"].split(", ", 1)[1] for r in record["arms"] if r["case"] == case}
        walk = {a: labels[a].removeprefix("C: ") for a in ("C", "C_short") if a in labels}

        def better(claim, a, b, key, la, lb, digits=4, case=case, name=name):
            va, vb = _values(record, f"{case}/{a}", key), _values(record, f"{case}/{b}", key)
            if va is not None and vb is not None:
                if key.startswith("iterations_to"):  # whole iterations, however many digits
                    digits = len(str(int(max(va + vb))))
                out.append(
                    {
                        "claim": f"{name}: {claim}",
                        "kind": "better",
                        "a": {"label": la, "values": va},
                        "b": {"label": lb, "values": vb},
                        "lower_is_better": True,
                        "digits": digits,
                    }
                )

        for t in THRESHOLDS:
            for arm, text in walk.items():
                better(
                    f"{text} reaches ED^2 < {t} in fewer iterations than DMD2",
                    arm,
                    "A",
                    f"iterations_to_{t}",
                    "DisBack",
                    "DMD2",
                )
        for t in THRESHOLDS:
            better(
                f"the critic's warm start alone (B) reaches ED^2 < {t} in fewer iterations than DMD2",
                "B",
                "A",
                f"iterations_to_{t}",
                "B",
                "DMD2",
            )
            if "C_short" in walk:
                better(
                    f"the walk adds speed to the warm start: {walk['C_short']} reaches ED^2 < {t} in fewer "
                    "iterations than B",
                    "C_short",
                    "B",
                    f"iterations_to_{t}",
                    "DisBack",
                    "B",
                )
        for arm, text in walk.items():
            a, b = _values(record, f"{case}/{arm}", "energy_distance"), _values(record, f"{case}/A", "energy_distance")
            if a is not None and b is not None:
                out.append(
                    {
                        "claim": f"{name}: final quality no worse than DMD2, {text}: per-seed final ED^2 of "
                        "DisBack minus DMD2's below the ED floor",
                        "kind": "below",
                        "values": [x - y for x, y in zip(a, b)],
                        "threshold": round(record["floor"], 4),
                        "digits": 3,
                    }
                )
        better(
            "at the start of stage 2 the DM gradient against S'_9 is smaller than against the teacher with the "
            "same critic S'_N (C vs B)",
            "C",
            "B",
            "initial_dm_gradient",
            "S'_9",
            "teacher",
            3,
        )
        v = _values(record, f"{case}/C", "phase_gradient_ratio")
        if v is not None:
            out.append(
                {
                    "claim": f"{name}: within a phase of the walk ({walk['C']}) the DM gradient falls, as the "
                    "converged rule assumes (mean over phases of its last 5 generator updates' value over its "
                    "first 5)",
                    "kind": "below",
                    "values": v,
                    "threshold": 1.0,
                    "digits": 2,
                }
            )
        for arm in ("C_converged", "C_tuned"):
            v = _values(record, f"{case}/{arm}", "early_switches")
            if v is not None:
                out.append(
                    {
                        "claim": f"{name}: the {labels[arm].removeprefix('C: ')} switches before the 2M cap in "
                        "most of the 9 phases",
                        "kind": "above",
                        "values": v,
                        "threshold": 4.5,
                        "digits": 2,
                    }
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
