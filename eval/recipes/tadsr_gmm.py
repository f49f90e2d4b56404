"""TAD-SR small-scale verification (shared/methods/tadsr.md section 9) on the conditional (SR) Gaussian mixture.

    python -m onestep.eval.recipes.tadsr_gmm --output eval/figures/tadsr_gmm.json

Teacher: the exact posterior denoiser in the ResShift family (T = 15, kappa = 1), sampled with 15-step DDIM (good)
and a 4-step sub-sampled DDIM (blurrier: the regression and HSD reference). Student: a 3x128 MLP (x_T, u, t) -> x0
initialised from a teacher-net fitted to the exact denoiser, whose two hidden layers are the discriminator's
"encoder features". Arms at equal budgets, through the real Trainer: (1) reg; (2) reg + HSD; (3) reg + vanilla SDS;
(4) reg + HSD + time-aware GAN on real x; (5) as (4) without FiLM. Metrics on 200 test y with 256 samples each:
PSNR against the ground truth and the posterior energy distance (mean over y of ED^2, 256 vs 256 exact samples).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from onestep.denoiser import Cond, Denoiser
from onestep.methods.tadsr import TADSR, TADSRConfig
from onestep.sampling import ddim_from, trailing_timesteps
from onestep.schedules import ResShiftSchedule
from onestep.testing.sr_gmm import (
    AnalyticSRDenoiser,
    ConditionalGMM,
    fit_denoiser_net,
    fit_on_sr_gmm,
    posterior_distance,
    psnr,
    test_set,
)

SAMPLES = 256


def measure(sample_fn, x, u, exact) -> dict:
    """PSNR and posterior ED of sample_fn(u_rep, eps) -> (B * S, 8) over S = 256 draws per test y."""
    B = x.shape[0]
    u_rep = u.float().repeat_interleave(SAMPLES, 0)
    eps = torch.randn(u_rep.shape, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        out = sample_fn(u_rep, eps).double().reshape(B, SAMPLES, -1)
    return {"psnr": psnr(out, x), "posterior_ed": posterior_distance(out, exact)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="eval/figures/tadsr_gmm.json")
    p.add_argument("--steps", type=int, default=1500, help="Iterations per arm.")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4, help="Peak of the cosine schedule (50 warm-up iterations).")
    p.add_argument("--teacher_net_steps", type=int, default=2000)
    p.add_argument("--gan_weight", type=float, default=0.02, help="lambda_GAN of arms (4)-(5) (spec 7: 0.02).")
    p.add_argument("--arms", default="1,2,3,4,5")
    p.add_argument("--test_size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="The training seed, the same for every arm.")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cgmm, sched = ConditionalGMM.default(), ResShiftSchedule(15, kappa=1.0)
    exact = Denoiser(AnalyticSRDenoiser(cgmm, sched), sched, "sample")
    x, u = test_set(cgmm, args.test_size)
    posterior = cgmm.posterior_samples(u, SAMPLES, torch.Generator().manual_seed(7))
    t0 = time.time()
    net = fit_denoiser_net(cgmm, sched, steps=args.teacher_net_steps)
    rows = [
        {"arm": "exact posterior mean (MMSE)", "psnr": psnr(cgmm.posterior_mean(u), x)},
        {
            "arm": "exact posterior samples (ED: the floor, two independent sets)",
            "psnr": psnr(posterior, x),
            "posterior_ed": posterior_distance(
                cgmm.posterior_samples(u, SAMPLES, torch.Generator().manual_seed(8)), posterior
            ),
        },
        {"arm": "bicubic-like input u", "psnr": psnr(u, x)},
    ]
    T = sched.num_timesteps
    start = lambda u_, eps: sched.add_noise(u_, eps, torch.full((len(u_),), T - 1), u_)  # noqa: E731
    for name, steps in (("teacher, DDIM 15 steps", 15), ("teacher, DDIM 4 steps (the reference)", 4)):
        ts = trailing_timesteps(T, steps)
        rows.append(
            {
                "arm": name,
                **measure(lambda u_, e, ts=ts: ddim_from(exact, start(u_, e), Cond(image=u_), ts), x, u, posterior),
            }
        )
    rows.append(
        {
            "arm": "teacher-net, one step (the student's initialisation)",
            **measure(lambda u_, e: net(start(u_, e), torch.full((len(u_),), T - 1), Cond(image=u_)), x, u, posterior),
        }
    )
    print(json.dumps(rows, indent=1), f"\nreferences: {time.time() - t0:.0f}s", flush=True)
    base = dict(learning_rate=args.lr, train_batch_size=args.batch, teacher_steps=4, disc_embed_dim=64)
    arms = {
        "1": ("(1) reg only", dict(score_loss="none", gan=False)),
        "2": ("(2) reg + HSD", dict(score_loss="hsd", gan=False)),
        "3": ("(3) reg + vanilla SDS", dict(score_loss="sds", gan=False)),
        "4": ("(4) reg + HSD + time-aware GAN", dict(score_loss="hsd", gan=True, gan_weight=args.gan_weight)),
        "5": (
            "(5) as (4), heads without FiLM",
            dict(score_loss="hsd", gan=True, gan_weight=args.gan_weight, time_aware=False),
        ),
    }
    for key in args.arms.split(","):
        name, overrides = arms[key]
        t0 = time.time()
        method = TADSR(exact, TADSRConfig(**base, **overrides), (8,), student_init=net, feature_teacher=net)
        result = fit_on_sr_gmm(  # one seed for every arm: differences are the option's, not the draw's
            method, cgmm, args.steps, args.batch, seed=args.seed, learning_rate_warmup=50, lr_scheduler="cosine"
        )
        gen = method.generator.eval()
        rows.append(
            {
                "arm": name,
                **measure(lambda u_, e, m=method, g=gen: m.sample(g, Cond(image=u_), e), x, u, posterior),
                "steps": args.steps,
                "seconds": round(time.time() - t0, 1),
                # the last tenth of training: loss_d well below 2 (= 2 x hinge at chance) means D discriminates
                **{k: v for k, v in result["final_logs"].items() if k in ("loss_d", "d_real", "d_fake", "loss_hsd")},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    record = {"recipe": "tadsr_gmm", "args": vars(args), "rows": rows, "claims": claims(rows)}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record["claims"], indent=1), f"\nWrote {args.output}")


NOISE = 0.005  # ED^2 differences below this are not read as an effect (the floor row is ~ +-0.002)


def claims(rows: list[dict]) -> dict:
    """Spec 9's claims, each with the numbers it rests on and whether it held (ED differences beyond NOISE)."""
    by = {r["arm"].split(" ")[0]: r for r in rows if r["arm"].startswith("(")}
    ref = next(r for r in rows if r["arm"].startswith("teacher, DDIM 4"))
    out = {}
    if "(1)" in by:
        d = by["(1)"]
        out["(1) matches the 4-step teacher"] = {
            "psnr (1), teacher-4": [d["psnr"], ref["psnr"]],
            "posterior_ed (1), teacher-4": [d["posterior_ed"], ref["posterior_ed"]],
            "holds": abs(d["psnr"] - ref["psnr"]) < 0.3 and abs(d["posterior_ed"] - ref["posterior_ed"]) < NOISE,
        }
    if "(2)" in by and "(3)" in by:
        out["(3) vanilla SDS is mode-seeking vs (2): higher posterior ED"] = {
            "posterior_ed (2), (3)": [by["(2)"]["posterior_ed"], by["(3)"]["posterior_ed"]],
            "psnr (2), (3)": [by["(2)"]["psnr"], by["(3)"]["psnr"]],
            "holds": by["(3)"]["posterior_ed"] > by["(2)"]["posterior_ed"] + NOISE,
        }
    if "(4)" in by:
        d = by["(4)"]
        out["(4) beats its 4-step teacher in posterior ED, trading some PSNR"] = {
            "posterior_ed (4), teacher-4": [d["posterior_ed"], ref["posterior_ed"]],
            "psnr (4), teacher-4": [d["psnr"], ref["psnr"]],
            "holds": d["posterior_ed"] < ref["posterior_ed"] - NOISE and d["psnr"] < ref["psnr"],
        }
    if "(4)" in by and "(5)" in by:
        out["(5) vs (4): time-aware heads help"] = {
            "posterior_ed (4), (5)": [by["(4)"]["posterior_ed"], by["(5)"]["posterior_ed"]],
            "holds": by["(4)"]["posterior_ed"] < by["(5)"]["posterior_ed"] - NOISE,
            "note": "the spec expects this may not separate at toy scale",
        }
    return out


if __name__ == "__main__":
    main()
