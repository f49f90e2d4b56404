"""DMD2 small-scale verification (shared/methods/dmd2.md section 9) on the 2-D Gaussian mixture.

    python -m onestep.eval.recipes.dmd2_gmm --output dmd2_gmm.json      (about 10 minutes on 2 CPU cores)

Arms (all through the real Trainer, batch 512, Adam lr 1e-4, analytic real score unless stated):
  tc999        the spec's recipe, t_c = 999
  tc399        t_c = 399 (the test's setting)
  imperfect    teacher with uniform weights instead of ∝ k+1; real data from the true mixture:
               DM only vs DM + GAN (head on the critic's second hidden layer) vs the teacher's own samples
  ttur         R = 5 vs R = 1 at an equal number of generator updates
  sds          x0_fake := x (no critic): expected mode collapse
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from onestep.denoiser import Denoiser
from onestep.methods.dmd2 import DMD2Config
from onestep.testing.gmm import AnalyticDenoiser, GaussianMixture, energy_distance_floor
from onestep.testing.toy import fit_teacher_net, run_dmd2_gmm, sd_schedule, teacher_ddim_result


def _row(name, res, seconds, history=None):
    row = {"arm": name, "energy_distance": res.energy_distance, **res.modes, "seconds": round(seconds, 1)}
    if history:
        row["history"] = history
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="dmd2_gmm.json")
    p.add_argument("--steps", type=int, default=3000, help="Critic iterations per arm.")
    p.add_argument("--long_steps", type=int, default=20000, help="Critic iterations of the t_c = 999 arm.")
    p.add_argument("--arms", default="tc999,tc399,imperfect,ttur,sds")
    args = p.parse_args(argv)
    arms = set(args.arms.split(","))
    torch.manual_seed(0)
    gmm, sched = GaussianMixture.circle(), sd_schedule()
    net = fit_teacher_net(gmm, sched, steps=2000, lr=3e-3, batch=512)
    rows = [
        {"arm": "floor (95th pct, 5k vs 5k true samples)", "energy_distance": energy_distance_floor(gmm, repeats=20)}
    ]
    rows.append(_row("teacher-net, DDIM 100 steps", teacher_ddim_result(net, gmm), 0))
    base = dict(learning_rate=1e-4, train_batch_size=512, ttur_ratio=5, gan=False)

    def arm(name, steps, eval_every=None, **kw):
        cfg = DMD2Config(**{**base, **{k: v for k, v in kw.items() if k in DMD2Config.__dataclass_fields__}})
        t0 = time.time()
        res, method = run_dmd2_gmm(
            cfg, steps, gmm=gmm, teacher_net=net, eval_every=eval_every, teacher_gmm=kw.get("teacher_gmm")
        )
        rows.append(_row(name, res, time.time() - t0, method.history if eval_every else None))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "history"}), flush=True)

    if "tc999" in arms:
        arm("DM, t_c=999 (spec recipe)", args.long_steps, eval_every=2500)
    if "tc399" in arms:
        arm("DM, t_c=399", args.steps, eval_every=500, conditioning_timesteps=[399])
    if "imperfect" in arms:
        wrong = GaussianMixture.circle(weights=torch.ones(8))
        teacher = Denoiser(AnalyticDenoiser(wrong, sched), sched, "sample")
        rows.append(_row("imperfect teacher's own samples (DDIM 100)", teacher_ddim_result(teacher, gmm), 0))
        arm("imperfect teacher, DM only", args.steps, conditioning_timesteps=[399], teacher_gmm=wrong)
        arm(
            "imperfect teacher, DM + GAN (3e-3 / 1e-2)",
            args.steps,
            conditioning_timesteps=[399],
            teacher_gmm=wrong,
            gan=True,
        )
        arm(
            "imperfect teacher, DM + GAN (3e-2 / 1e-1)",
            args.steps,
            conditioning_timesteps=[399],
            teacher_gmm=wrong,
            gan=True,
            gan_generator_weight=3e-2,
            gan_discriminator_weight=1e-1,
        )
    if "ttur" in arms:
        g_updates = args.steps // 5
        arm(f"TTUR R=5 ({g_updates} G updates)", args.steps, conditioning_timesteps=[399])
        arm(f"TTUR R=1 ({g_updates} G updates)", g_updates, conditioning_timesteps=[399], ttur_ratio=1)
    if "sds" in arms:
        arm("no critic (SDS: x0_fake := x)", args.steps, conditioning_timesteps=[399], fake_score="none")
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
