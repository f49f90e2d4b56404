"""DMD2 small-scale verification (docs/methods/dmd2.md) on the 2-D Gaussian mixture, 3 seeds per arm.

    OMP_NUM_THREADS=1 python -m onestep.eval.recipes.dmd2_gmm

writes the full record (every arm, every seed) to eval/figures/dmd2_gmm.json and the claims record to
eval/figures/claims/dmd2-gmm.json. Measured wall time of the default run: 39 minutes (2,353 s) at one thread on a
2-core CPU shared with another job.

8 isotropic components (std 0.05) on the unit circle, weights ∝ k+1, SD1.5's scaled-linear schedule, analytic real
score unless stated; G and F start from a 3x128 MLP teacher-net fitted once (seed 0) to the analytic eps; batch
512, Adam lr 1e-4, R = 5, no GAN unless stated, all through the real Trainer. A seed changes the student's training
draws (noise, timesteps, GAN batches, a new GAN head); the mixture, the teacher-net and the evaluation noise stay
fixed. Arm groups (--arms):
  tc999         the published recipe, t_c = 999, 20k iterations
  tc399         t_c = 399 (also TTUR's R = 5 arm)
  ttur          R = 1 at the generator updates of R = 5 (a fifth of the critic iterations)
  sds           x0_fake := x (no critic): expected mode collapse
  imperfect     teacher with uniform weights instead of ∝ k+1, real data from the true mixture: DM only,
                DM + GAN at the published weights (3e-3 / 1e-2) and at 10x them
  gan_causes    why the GAN does not fix the imperfect teacher: the GAN alone (no DM term), DM + GAN 0.3 / 1, 1 / 1
  tc999_causes  why t_c = 999 does not converge: lr 1e-4 against the published 1e-5, the generator's network run in
                float64, the same network read as an x0 prediction (10k iterations each); plus the teacher-net's eps
                and x0 errors at t = 399 and 999
Budget: every arm keeps its one-seed length (3k iterations; 20k at t_c = 999; 10k for the t_c = 999 causes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from onestep.denoiser import Denoiser
from onestep.eval.verdicts import mean_std
from onestep.methods.dmd2 import DMD2Config
from onestep.testing.gmm import AnalyticDenoiser, GaussianMixture, energy_distance_floor
from onestep.testing.toy import fit_teacher_net, run_dmd2_gmm, sd_schedule, teacher_ddim_result

METRICS = ("energy_distance", "modes_covered", "weight_tv", "precision")
IMPERFECT = dict(conditioning_timesteps=[399], imperfect=True)


@dataclass
class Arm:
    label: str
    steps: str = "steps"  # which iteration option sets its length
    eval_every: int | None = None
    student: str = "teacher-net"  # teacher-net | float64 | x0
    config: dict = field(default_factory=dict)


ARMS = {
    "tc999": Arm("DM, t_c = 999 (the published recipe)", "long_steps", 2500),
    "tc399": Arm("DM, t_c = 399 (also TTUR R = 5)", eval_every=500, config=dict(conditioning_timesteps=[399])),
    "ttur_r1": Arm(
        "TTUR R = 1, the generator updates of R = 5",
        "r1_steps",
        config=dict(conditioning_timesteps=[399], ttur_ratio=1),
    ),
    "sds": Arm("no critic (SDS: x0_fake := x)", config=dict(conditioning_timesteps=[399], fake_score="none")),
    "imperfect_dm": Arm("imperfect teacher, DM only", config=IMPERFECT),
    "imperfect_gan": Arm("imperfect teacher, DM + GAN 3e-3 / 1e-2 (published)", config=dict(**IMPERFECT, gan=True)),
    "imperfect_gan10": Arm(
        "imperfect teacher, DM + GAN 3e-2 / 1e-1",
        config=dict(**IMPERFECT, gan=True, gan_generator_weight=3e-2, gan_discriminator_weight=1e-1),
    ),
    "gan_alone": Arm(
        "imperfect teacher, GAN alone (no DM term), weight 1",
        config=dict(**IMPERFECT, gan=True, gan_alone=True, gan_generator_weight=1.0),
    ),
    "gan_0.3": Arm(
        "imperfect teacher, DM + GAN 0.3 / 1",
        config=dict(**IMPERFECT, gan=True, gan_generator_weight=0.3, gan_discriminator_weight=1.0),
    ),
    "gan_1": Arm(
        "imperfect teacher, DM + GAN 1 / 1",
        config=dict(**IMPERFECT, gan=True, gan_generator_weight=1.0, gan_discriminator_weight=1.0),
    ),
    "tc999_10k": Arm("DM, t_c = 999, lr 1e-4", "cause_steps", 1000),
    "tc999_lr1e-5": Arm("DM, t_c = 999, the published lr 1e-5", "cause_steps", 1000, config=dict(learning_rate=1e-5)),
    "tc999_float64": Arm("DM, t_c = 999, generator network in float64", "cause_steps", 1000, "float64"),
    "tc999_x0": Arm("DM, t_c = 999, the same network read as an x0 prediction", "cause_steps", 1000, "x0"),
}
GROUPS = {
    "tc999": ["tc999"],
    "tc399": ["tc399"],
    "ttur": ["ttur_r1"],
    "sds": ["sds"],
    "imperfect": ["imperfect_dm", "imperfect_gan", "imperfect_gan10"],
    "gan_causes": ["gan_alone", "gan_0.3", "gan_1"],
    "tc999_causes": ["tc999_10k", "tc999_lr1e-5", "tc999_float64", "tc999_x0"],
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="eval/figures/dmd2_gmm.json", help="The full record.")
    p.add_argument("--claims", default="eval/figures/claims/dmd2-gmm.json", help="The claims record.")
    p.add_argument("--steps", type=int, default=3000, help="Critic iterations per arm.")
    p.add_argument("--long_steps", type=int, default=20000, help="Critic iterations of the t_c = 999 arm.")
    p.add_argument("--cause_steps", type=int, default=10000, help="Critic iterations of the tc999_causes arms.")
    p.add_argument("--arms", default=",".join(GROUPS), help="Comma-separated groups of: " + ", ".join(GROUPS))
    p.add_argument("--seeds", default="0,1,2", help="Training seeds; every arm runs once per seed.")
    args = p.parse_args(argv)
    groups, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown arm group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    steps = {"steps": args.steps, "long_steps": args.long_steps, "cause_steps": args.cause_steps}
    steps["r1_steps"] = args.steps // 5
    start = time.time()
    torch.manual_seed(0)
    gmm, sched = GaussianMixture.circle(), sd_schedule()
    wrong = GaussianMixture.circle(weights=torch.ones(8))
    net = fit_teacher_net(gmm, sched, steps=2000, lr=3e-3, batch=512)
    record = {
        "setup": {**{k: v for k, v in vars(args).items() if k not in ("output", "claims")}, "seeds": seeds},
        "reference_rows": _references(net, gmm, wrong, sched),
        "teacher_net_errors": teacher_net_errors(net, gmm, sched),
        "arms": [],
    }
    print(json.dumps(record["reference_rows"]), flush=True)
    students = {"teacher-net": net, "float64": _float64(net), "x0": Denoiser(net.net, sched, "sample")}
    for name in [a for g in groups for a in GROUPS[g]]:
        arm, n = ARMS[name], steps[ARMS[name].steps]
        row = {"arm": name, "label": arm.label, "iterations": n, "seeds": {}}
        for seed in seeds:
            row["seeds"][str(seed)] = _run(arm, n, seed, gmm, wrong, students[arm.student])
            print(name, seed, json.dumps({k: v for k, v in row["seeds"][str(seed)].items() if k != "history"}))
        row["summary"] = _summary(row["seeds"].values())
        record["arms"].append(row)
    record["wall_seconds"] = round(time.time() - start, 1)
    _write(args.output, record)
    command = ("python -m onestep.eval.recipes.dmd2_gmm" + "".join(f" {a}" for a in argv)).strip()
    _write(
        args.claims,
        {"recipe": command, "machine": "2-core CPU, one thread", "record": args.output, "claims": claims(record)},
    )


def _run(arm: Arm, steps: int, seed: int, gmm, wrong, student) -> dict:
    overrides = {k: v for k, v in arm.config.items() if k != "imperfect"}
    config = DMD2Config(**{**dict(learning_rate=1e-4, train_batch_size=512, ttur_ratio=5, gan=False), **overrides})
    t0 = time.time()
    res, method = run_dmd2_gmm(
        config,
        steps,
        gmm=gmm,
        teacher_net=student,
        eval_every=arm.eval_every,
        teacher_gmm=wrong if arm.config.get("imperfect") else None,
        seed=seed,
    )
    out = {"energy_distance": res.energy_distance, **res.modes, "seconds": round(time.time() - t0, 1)}
    if arm.eval_every:
        out["history"] = [{"iteration": i * arm.eval_every, **h} for i, h in enumerate(method.history)]
    return out


def _summary(rows) -> dict:
    rows = list(rows)
    return {k: dict(zip(("mean", "std"), mean_std([r[k] for r in rows]))) for k in (*METRICS, "seconds")}


def _references(net, gmm, wrong, sched) -> dict:
    """One row each (no training, so no seeds): the floor, the teacher-net's and the imperfect teacher's own
    samples, and the untrained generator."""
    teacher = Denoiser(AnalyticDenoiser(wrong, sched), sched, "sample")
    return {
        "floor: 95th percentile, two true 5k sets (20 repeats)": {
            "energy_distance": energy_distance_floor(gmm, repeats=20)
        },
        "teacher-net, DDIM 100 steps": _metrics_of(teacher_ddim_result(net, gmm)),
        "untrained G (teacher-net at t = 399 on pure noise)": _metrics_of(_evaluate_one_step(net, gmm)),
        "imperfect teacher (uniform weights): its own DDIM 100 samples": _metrics_of(
            teacher_ddim_result(teacher, gmm)
        ),
    }


def _evaluate_one_step(net, gmm):
    from onestep.testing.toy import evaluate_generator

    return evaluate_generator(lambda z: net(z, torch.full((z.shape[0],), 399)), gmm)


def _metrics_of(res) -> dict:
    return {"energy_distance": res.energy_distance, **res.modes}


def _values(record: dict, arm: str, key: str) -> list[float]:
    row = next(r for r in record["arms"] if r["arm"] == arm)
    return [float(s[key]) for s in row["seeds"].values()]


def claims(record: dict) -> list[dict]:
    """Every claim of the method page, each from per-seed values (the verdicts are computed when rendered)."""
    have, out = {r["arm"] for r in record["arms"]}, []

    def better(claim, a, b, key="energy_distance", labels=None, digits=3):
        if {a, b} <= have:
            la, lb = labels or (a, b)
            out.append(
                {
                    "claim": claim,
                    "kind": "better",
                    "a": {"label": la, "values": _values(record, a, key)},
                    "b": {"label": lb, "values": _values(record, b, key)},
                    "lower_is_better": True,
                    "digits": digits,
                }
            )

    def threshold(claim, arm, key, kind, value, digits=3):
        if arm in have:
            out.append(
                {
                    "claim": claim,
                    "kind": kind,
                    "values": _values(record, arm, key),
                    "threshold": value,
                    "digits": digits,
                }
            )

    setup = record["setup"]
    n, long, cause = (f"{setup[k]:,}" for k in ("steps", "long_steps", "cause_steps"))
    threshold(
        f"t_c = 399: every one of the 8 modes covered after {n} iterations", "tc399", "modes_covered", "above", 7.5
    )
    threshold("t_c = 399: mode weights reproduced (weight TV below 0.05)", "tc399", "weight_tv", "below", 0.05)
    threshold(f"t_c = 399: ED^2 below 0.02 after {n} iterations", "tc399", "energy_distance", "below", 0.02)
    threshold(
        f"The published t_c = 999 reaches ED^2 below 0.02 in {long} iterations",
        "tc999",
        "energy_distance",
        "below",
        0.02,
    )
    better(
        f"t_c = 399 ({n} iterations) ends closer to the mixture than t_c = 999 ({long})",
        "tc399",
        "tc999",
        labels=("399", "999"),
    )
    better(
        f"t_c = 999: the published lr 1e-5 ends closer than lr 1e-4 ({cause} iterations, ED^2)",
        "tc999_lr1e-5",
        "tc999_10k",
        labels=("1e-5", "1e-4"),
    )
    better(
        f"t_c = 999: the generator's network in float64 ends closer than in float32 ({cause} iterations)",
        "tc999_float64",
        "tc999_10k",
        labels=("float64", "float32"),
    )
    better(
        f"t_c = 999: the same network read as an x0 prediction ends closer than read as eps ({cause} iterations)",
        "tc999_x0",
        "tc999_10k",
        labels=("x0", "eps"),
    )
    better(
        "TTUR: R = 5 ends closer than R = 1 at an equal number of generator updates (ED^2)",
        "tc399",
        "ttur_r1",
        labels=("R = 5", "R = 1"),
    )
    threshold(
        "Without the critic (SDS) the generator collapses: fewer than 4 of the 8 modes covered",
        "sds",
        "modes_covered",
        "below",
        4,
        digits=2,
    )
    for arm, weights in (
        ("imperfect_gan", "3e-3 / 1e-2 (published)"),
        ("imperfect_gan10", "3e-2 / 1e-1"),
        ("gan_0.3", "0.3 / 1"),
        ("gan_1", "1 / 1"),
    ):
        better(
            f"Imperfect teacher: DM + GAN {weights} lowers the mode-weight error (TV) below DM only",
            arm,
            "imperfect_dm",
            "weight_tv",
            labels=("DM + GAN", "DM only"),
        )
    better(
        "Imperfect teacher: the GAN alone (no DM term) lowers the mode-weight error (TV) below DM only",
        "gan_alone",
        "imperfect_dm",
        "weight_tv",
        labels=("GAN alone", "DM only"),
    )
    return out


class _Float64(torch.nn.Module):
    """The teacher-net's copy run entirely in float64 (the eps -> x0 conversion already is)."""

    def __init__(self, net):
        super().__init__()
        self.net = copy.deepcopy(net).double()
        self.blocks = self.net.blocks  # the GAN head's feature module keeps its name

    def forward(self, x, t, cond=None):
        return self.net(x.double(), t, cond)


def _float64(den: Denoiser) -> Denoiser:
    return Denoiser(_Float64(den.net), den.schedule, den.prediction_type)


def teacher_net_errors(net: Denoiser, gmm, sched, n: int = 4096) -> list[dict]:
    """RMS error of the teacher-net against the analytic posterior at t = 399 and 999, in eps and in x0:
    at 999 an eps error becomes an x0 error 1/alpha = 14.6 times larger."""
    exact = Denoiser(AnalyticDenoiser(gmm, sched), sched, "sample")
    g, rows = torch.Generator().manual_seed(1), []
    for t in (399, 999):
        x0 = gmm.sample(n, g).float()
        tt = torch.full((n,), t)
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), tt)
        with torch.no_grad():
            x0_exact, x0_net = exact(x_t, tt), net(x_t, tt)
            eps_err = net.raw(x_t, tt) - sched.from_x0(x0_exact, x_t, tt, "epsilon")
        rms = lambda v: float(v.double().square().mean().sqrt())  # noqa: E731
        rows.append({"t": t, "eps_rms": rms(eps_err), "x0_rms": rms(x0_net - x0_exact)})
    return rows


def _write(path: str, payload: dict) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"Wrote {path}", flush=True)


if __name__ == "__main__":
    main()
