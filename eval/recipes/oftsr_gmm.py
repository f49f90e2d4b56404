"""OFTSR small-scale verification (docs/methods/oftsr.md) on the conditional (SR) Gaussian mixture, 3 seeds per arm.

    OMP_NUM_THREADS=1 python -m onestep.eval.recipes.oftsr_gmm

writes the full record (every teacher, every seed) to eval/figures/oftsr_gmm.json and the claims record to
eval/figures/claims/oftsr-gmm.json. Measured wall time of the default run: 32 minutes (1,916 s) at one thread on a
2-core CPU shared with another job (a 20,000-iteration stage-2 run took 130 to 280 s).

1. Stage 1: 3x128 MLP teachers (x_t, x_LR, t) -> v trained with L_flow, l1 and l2, through the real Trainer (seed
   11, fixed); their relative MSE against the exact velocity v*, the PSNR / posterior ED of their ODE endpoints and
   of their one-step estimate x0 + v(x0, 0). An l2 teacher learns the conditional mean velocity, so its t = 0 step
   is the posterior mean; an l1 teacher learns the coordinate-wise median.
2. Stage 2 (sigma_p = 0.2; dt 0.05, midpoint, align 0.01, BC 0.1, batch 256) with three teachers: the exact
   velocity, the l2 teacher-net and the l1 teacher-net. The student starts from the teacher-net it distils (the l2
   one for the exact teacher). A seed changes the stage-2 training draws; the teachers, the test inputs and the
   evaluation noise stay fixed.
3. The t sweep {0, 0.25, 0.5, 0.75, 1} (and 0.99, the released code's "t = 1") on 200 test y with 256 seeds each:
   PSNR against the ground truth and the posterior ED (mean over y of ED^2, 256 vs 256 posterior samples).
Claims, per teacher: PSNR(t = 0) within 0.2 dB of the exact MMSE PSNR (and, for a teacher-net, of its own one-step
estimate: the student's part of the claim); PSNR and posterior ED fall monotonically in t; at t = 0.99 the
posterior ED is at most 0.005 above the teacher ODE endpoint's (a tolerance t = 0.75 fails: the recipe states that
check too, as a control), and the PSNR 2 to 4 dB below the MMSE PSNR.
No budget cut: stage 2 runs 20,000 iterations per run, as the earlier one-seed version did. A first run at 12,000
(24 minutes) left the t = 0.99 end short (posterior ED 0.008 above the exact ODE endpoint's, against 0.004 at
20,000); eval/figures/oftsr_gmm_12k.json keeps it.
Not run: sigma_p = 0 and the ablations of dt, Euler, clamp_s and the alternative losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from onestep.context import TeacherContext
from onestep.denoiser import Denoiser
from onestep.eval.verdicts import mean_std
from onestep.methods.oftsr import OFTSR, OFTSRConfig, flow_sample, start_state
from onestep.schedules import ConditionalFlowSchedule
from onestep.testing.sr_gmm import (
    AnalyticFlowNet,
    ConditionalGMM,
    ConditionalMLP,
    exact_flow_endpoint,
    exact_velocity,
    fit_on_sr_gmm,
    posterior_distance,
    psnr,
    test_set,
)

SAMPLES = 256
T_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
SWEEP = (0.0, 0.25, 0.5, 0.75, 0.99, 1.0)
TEACHERS = ("exact", "l2 teacher-net", "l1 teacher-net")
MMSE_TOLERANCE = 0.2  # dB
ENDPOINT_TOLERANCE = 0.005  # posterior ED above the teacher's own ODE endpoint (the floor moves by ~0.002)


def measure(sample_fn, x, u, exact, sigma_p) -> dict:
    """PSNR and posterior ED of sample_fn(u_rep, x0) over S = 256 start states x0 per test y."""
    B = x.shape[0]
    u_rep = u.float().repeat_interleave(SAMPLES, 0)
    eps = torch.randn(u_rep.shape, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        out = sample_fn(u_rep, start_state(u_rep, eps, sigma_p)).double().reshape(B, SAMPLES, -1)
    return {"psnr": psnr(out, x), "posterior_ed": posterior_distance(out, exact)}


def relative_velocity_error(velocity, cgmm, sigma_p, n: int = 4096) -> float:
    """E|v - v*|^2 / E|v*|^2 over x1 ~ data, x0 ~ the start state, t ~ U[0, 0.99]."""
    g = torch.Generator().manual_seed(3)
    x1, u = cgmm.sample(n, g)
    x0 = start_state(u, torch.randn(u.shape, generator=g, dtype=torch.float64), sigma_p)
    t = 0.99 * torch.rand(n, generator=g, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    exact = exact_velocity(cgmm, x_t, u, t, sigma_p)
    with torch.no_grad():
        got = velocity(x_t.float(), u.float(), t.float()).double()
    return float((got - exact).square().mean() / exact.square().mean())


def train_teacher_net(cgmm, sched, loss: str, args) -> tuple[Denoiser, object]:
    """Stage 1 (OFTSR's teacher stage) through the Trainer: the teacher-net and its velocity wrapper."""
    torch.manual_seed(0)
    den = Denoiser(ConditionalMLP(), sched, "flow")
    cfg = OFTSRConfig(flow_loss=loss, learning_rate=args.lr, train_batch_size=args.batch)
    method = OFTSR(TeacherContext(den, (8,)), cfg, train_teacher=True)
    fit_on_sr_gmm(
        method, cgmm, args.teacher_steps, args.batch, seed=11, learning_rate_warmup=100, lr_scheduler="cosine"
    )
    return den.eval().requires_grad_(False), method.student.eval()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="eval/figures/oftsr_gmm.json", help="The full record.")
    p.add_argument("--claims", default="eval/figures/claims/oftsr-gmm.json", help="The claims record.")
    p.add_argument("--sigma_p", type=float, default=0.2)
    p.add_argument("--teacher_steps", type=int, default=3000, help="Stage-1 iterations of each teacher-net.")
    p.add_argument("--steps", type=int, default=20000, help="Stage-2 iterations per run.")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="Both stages, cosine after 100 warm-up iterations (MLPs).")
    p.add_argument("--test_size", type=int, default=200)
    p.add_argument("--ode_steps", type=int, default=100, help="RK4 steps of the exact teacher ODE.")
    p.add_argument("--teachers", default=",".join(TEACHERS), help="Comma-separated subset of: " + ", ".join(TEACHERS))
    p.add_argument("--seeds", default="0,1,2", help="Stage-2 training seeds; every teacher runs once per seed.")
    args = p.parse_args(argv)
    seeds, teachers = [int(s) for s in args.seeds.split(",")], args.teachers.split(",")
    start_time = time.time()
    torch.manual_seed(0)
    sp = args.sigma_p
    cgmm, sched = ConditionalGMM.default(), ConditionalFlowSchedule(sp)
    x, u = test_set(cgmm, args.test_size)
    posterior = cgmm.posterior_samples(u, SAMPLES, torch.Generator().manual_seed(7))
    endpoint = lambda u_, x0: exact_flow_endpoint(cgmm, x0, u_, sp, steps=args.ode_steps)  # noqa: E731
    references = {
        "exact posterior mean (MMSE)": {"psnr": psnr(cgmm.posterior_mean(u), x)},
        "exact posterior samples (ED: the floor, two independent sets)": {
            "psnr": psnr(posterior, x),
            "posterior_ed": posterior_distance(
                cgmm.posterior_samples(u, SAMPLES, torch.Generator().manual_seed(8)), posterior
            ),
        },
        "exact teacher ODE endpoint": {
            "ode": f"RK4, {args.ode_steps} steps",
            **measure(endpoint, x, u, posterior, sp),
        },
    }
    print(json.dumps(references, indent=1), flush=True)

    # 1. Stage 1: the teacher-nets, trained once.
    nets = {}
    for loss in ("l1", "l2"):
        t0 = time.time()
        den, v = train_teacher_net(cgmm, sched, loss, args)
        nets[f"{loss} teacher-net"] = den
        ode = lambda u_, x0, v=v: flow_sample(v, x0, u_, 50, "midpoint")  # noqa: E731
        one_step = lambda u_, x0, v=v: x0 + v(x0, u_, torch.zeros(len(u_)))  # noqa: E731
        references[f"stage 1 {loss} teacher-net"] = {
            "relative_velocity_mse": relative_velocity_error(v, cgmm, sp),
            "ode_endpoint": {"ode": "midpoint, 50 steps", **measure(ode, x, u, posterior, sp)},
            "one_step_t0": measure(one_step, x, u, posterior, sp),
            "seconds": round(time.time() - t0, 1),
        }
        print(json.dumps(references[f"stage 1 {loss} teacher-net"]), flush=True)

    # 2-3. Stage 2 per teacher and seed, then the t sweep.
    rows = []
    for name in teachers:
        teacher = Denoiser(AnalyticFlowNet(cgmm, sp), sched, "flow") if name == "exact" else nets[name]
        init = nets["l2 teacher-net" if name == "exact" else name]
        for seed in seeds:
            t0 = time.time()
            cfg = OFTSRConfig(learning_rate=args.lr, train_batch_size=args.batch)
            method = OFTSR(TeacherContext(teacher, (8,)), cfg, student_init=init)
            fit_on_sr_gmm(
                method, cgmm, args.steps, args.batch, seed=seed, learning_rate_warmup=100, lr_scheduler="cosine"
            )
            seconds = round(time.time() - t0, 1)
            student = method.student.eval()
            sweep = {}
            for t in SWEEP:
                fn = lambda u_, x0, t=t, g=student: x0 + g(x0, u_, torch.full((len(u_),), t))  # noqa: E731
                sweep[str(t)] = measure(fn, x, u, posterior, sp)
            rows.append({"teacher": name, "seed": seed, "steps": args.steps, "train_seconds": seconds, "sweep": sweep})
            print(json.dumps(rows[-1]), flush=True)
    record = {
        "recipe": "oftsr_gmm",
        "args": {**vars(args), "seeds": seeds},
        "references": references,
        "rows": rows,
        "summary": summarise(rows),
        "wall_seconds": round(time.time() - start_time, 1),
    }
    _write(args.output, record)
    command = ("python -m onestep.eval.recipes.oftsr_gmm" + "".join(f" {a}" for a in argv)).strip()
    _write(
        args.claims,
        {"recipe": command, "machine": "2-core CPU, one thread", "record": args.output, "claims": claims(record)},
    )


def summarise(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["teacher"] for r in rows):
        mine = [r for r in rows if r["teacher"] == name]
        out[name] = {
            t: {
                k: dict(zip(("mean", "std"), mean_std([r["sweep"][t][k] for r in mine])))
                for k in ("psnr", "posterior_ed")
            }
            for t in mine[0]["sweep"]
        }
    return out


def _write(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"Wrote {path}", flush=True)


def _teacher_endpoint(record: dict, name: str) -> dict:
    refs = record["references"]
    return refs["exact teacher ODE endpoint"] if name == "exact" else refs[f"stage 1 {name}"]["ode_endpoint"]


def claims(record: dict) -> list[dict]:
    """Per teacher, the paper's claims from per-seed values (verdicts are computed when rendered)."""
    mmse = record["references"]["exact posterior mean (MMSE)"]["psnr"]
    out = []
    for name in dict.fromkeys(r["teacher"] for r in record["rows"]):
        mine = [r["sweep"] for r in record["rows"] if r["teacher"] == name]
        at = lambda t, key, mine=mine: [s[str(t)][key] for s in mine]  # noqa: E731
        ode_ed = _teacher_endpoint(record, name)["posterior_ed"]
        teacher = "the exact teacher" if name == "exact" else f"the {name}"
        out.append(
            {
                "claim": f"{teacher.capitalize()}: t = 0 gives the MMSE estimate (PSNR within {MMSE_TOLERANCE} dB "
                f"of the exact posterior mean's {mmse:.2f})",
                "kind": "below",
                "values": [abs(v - mmse) for v in at(0.0, "psnr")],
                "threshold": MMSE_TOLERANCE,
            }
        )
        if name != "exact":  # the exact teacher's one-step estimate is the posterior mean itself
            own = record["references"][f"stage 1 {name}"]["one_step_t0"]["psnr"]
            out.append(
                {
                    "claim": f"{teacher.capitalize()}: t = 0 gives its teacher's one-step estimate x0 + v(x0, 0) "
                    f"(PSNR within {MMSE_TOLERANCE} dB of its {own:.2f})",
                    "kind": "below",
                    "values": [abs(v - own) for v in at(0.0, "psnr")],
                    "threshold": MMSE_TOLERANCE,
                }
            )
        for key, what in (("psnr", "PSNR"), ("posterior_ed", "posterior ED")):
            drops = [min(s[str(a)][key] - s[str(b)][key] for a, b in zip(T_SWEEP, T_SWEEP[1:])) for s in mine]
            out.append(
                {
                    "claim": f"{teacher.capitalize()}: {what} falls monotonically over t = 0, 0.25, 0.5, 0.75, 1 "
                    "(smallest step-to-step fall)",
                    "kind": "above",
                    "values": drops,
                    "threshold": 0.0,
                }
            )
        for t, control in ((0.99, ""), (0.75, " (control: a wrong t must fail this)")):
            out.append(
                {
                    "claim": f"{teacher.capitalize()}: at t = {t} the posterior ED is at most {ENDPOINT_TOLERANCE} "
                    f"above its teacher's ODE endpoint's ({ode_ed:.4f}){control}",
                    "kind": "below",
                    "values": [v - ode_ed for v in at(t, "posterior_ed")],
                    "threshold": ENDPOINT_TOLERANCE,
                }
            )
        out.append(
            {
                "claim": f"{teacher.capitalize()}: PSNR at t = 0.99 about 3 dB below the MMSE PSNR (within 1 dB of 3)",
                "kind": "below",
                "values": [abs(mmse - v - 3.0) for v in at(0.99, "psnr")],
                "threshold": 1.0,
            }
        )
    return out


if __name__ == "__main__":
    main()
