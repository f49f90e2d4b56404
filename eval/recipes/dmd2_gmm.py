"""DMD2 small-scale verification (shared/methods/dmd2.md section 9) on the 2-D Gaussian mixture.

    python -m onestep.eval.recipes.dmd2_gmm --output dmd2_gmm.json      (about 10 minutes on 2 CPU cores)

Arms (all through the real Trainer, batch 512, Adam lr 1e-4, analytic real score unless stated):
  tc999        the spec's recipe, t_c = 999
  tc399        t_c = 399 (the test's setting)
  imperfect    teacher with uniform weights instead of ∝ k+1; real data from the true mixture:
               DM only vs DM + GAN (head on the critic's second hidden layer) vs the teacher's own samples
  ttur         R = 5 vs R = 1 at an equal number of generator updates
  sds          x0_fake := x (no critic): expected mode collapse
  tc999_causes why t_c = 999 does not converge (issue 12): the published lr 1e-5, the generator's network
               run in float64, and the same network read as an x0 prediction instead of eps; plus the
               teacher-net's eps and x0 errors at t = 399 and 999
  gan_causes   why the GAN does not fix the imperfect teacher: GAN alone (no DM term) and GAN weights 0.3 / 1
"""

from __future__ import annotations

import argparse
import copy
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
    p.add_argument("--arms", default="tc999,tc399,imperfect,ttur,sds,tc999_causes,gan_causes")
    p.add_argument("--cause_steps", type=int, default=10000, help="Critic iterations of the tc999_causes arms.")
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

    def arm(name, steps, eval_every=None, student=None, **kw):
        cfg = DMD2Config(**{**base, **{k: v for k, v in kw.items() if k in DMD2Config.__dataclass_fields__}})
        t0 = time.time()
        res, method = run_dmd2_gmm(
            cfg, steps, gmm=gmm, teacher_net=student or net, eval_every=eval_every, teacher_gmm=kw.get("teacher_gmm")
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
    if "tc999_causes" in arms:
        rows.extend(teacher_net_errors(net, gmm, sched))
        n = args.cause_steps
        arm(f"DM, t_c=999, lr 1e-4 ({n} it)", n, eval_every=1000)
        arm("DM, t_c=999, published lr 1e-5", n, eval_every=1000, learning_rate=1e-5)
        arm("DM, t_c=999, generator in float64", n, eval_every=1000, student=_float64(net))
        arm("DM, t_c=999, same network read as x0", n, eval_every=1000, student=Denoiser(net.net, sched, "sample"))
    if "gan_causes" in arms:
        wrong = GaussianMixture.circle(weights=torch.ones(8))
        gan = dict(conditioning_timesteps=[399], teacher_gmm=wrong, gan=True)
        arm(
            "imperfect teacher, GAN alone (no DM term), weight 1",
            args.steps,
            **gan,
            gan_alone=True,
            gan_generator_weight=1.0,
        )
        arm(
            "imperfect teacher, DM + GAN 0.3 / 1",
            args.steps,
            **gan,
            gan_generator_weight=0.3,
            gan_discriminator_weight=1.0,
        )
        arm(
            "imperfect teacher, DM + GAN 1 / 1",
            args.steps,
            **gan,
            gan_generator_weight=1.0,
            gan_discriminator_weight=1.0,
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
        rows.append({"arm": f"teacher-net error at t={t}", "eps_rms": rms(eps_err), "x0_rms": rms(x0_net - x0_exact)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
