"""OFTSR's fidelity-realism knob, both ways: for t in [0, 1], `onestep-eval sr` of the student on the held-out
photographs, with fidelity (PSNR-Y against HR) and realism (sharpness: the output's high-frequency energy over the
HR image's, 1 = as much detail as the real photograph, below 1 = blurrier) per image and in the mean, over --seeds,
on --crops_per_image random crops of each image. One JSON record and one figure (two panels, a thin line per image
and a thick line for the mean with its seed spread).

    python -m onestep.eval.recipes.oftsr_knob --oftsr outputs/oftsr --output eval/figures/sr/knob
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from onestep.cli import int_list, non_negative_int, positive_int
from onestep.eval.commands import super_resolution
from onestep.eval.record import json_safe
from onestep.sr_data import write_eval_set

SCALE = 4
FIGURES = (("psnr_y", "fidelity: PSNR-Y (dB)"), ("sharpness", "realism: sharpness (1 = the HR photograph)"))


def knob_points(record_rows: list[dict], seeds: list[int]) -> dict:
    """Per image and in the mean, each figure averaged over crops per seed, then mean and std over seeds."""
    images = sorted({r["image"] for r in record_rows})
    out = {}
    for key, _ in FIGURES:
        per_seed_image = {
            (s, n): float(np.mean([r[key] for r in record_rows if r["seed"] == s and r["image"] == n]))
            for s in seeds
            for n in images
        }
        per_seed_mean = [float(np.mean([per_seed_image[(s, n)] for n in images])) for s in seeds]
        out[key] = {
            "mean": float(np.mean(per_seed_mean)),
            "std": float(np.std(per_seed_mean, ddof=1)) if len(seeds) > 1 else None,
            "per_image": {n: float(np.mean([per_seed_image[(s, n)] for s in seeds])) for n in images},
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oftsr", required=True, help="The OFTSR student folder.")
    p.add_argument("--data", default="outputs/sr-eval", help="Written by onestep.sr_data --write_eval if missing.")
    p.add_argument("--crop", type=int, default=256, help="Centre crop of each held-out image (0: whole images).")
    p.add_argument("--t", type=str, default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="Knob values.")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="Noise and crop seeds.")
    p.add_argument("--crops_per_image", type=non_negative_int, default=4, help="Random crops per image and seed.")
    p.add_argument("--crop_size", type=positive_int, default=128, help="Side of each crop in HR pixels.")
    p.add_argument("--output", default="eval/figures/sr/knob")
    args = p.parse_args(argv)
    try:
        knobs = [float(v) for v in args.t.split(",")]
    except ValueError:
        p.error(f"--t must be comma-separated numbers in [0, 1], got {args.t!r}.")
    if not all(0 <= t <= 1 for t in knobs):
        p.error(f"--t values must lie in [0, 1], got {args.t!r}.")
    if not os.path.isdir(os.path.join(args.data, "hr")):
        write_eval_set(args.data, SCALE, args.crop or None)
    os.makedirs(args.output, exist_ok=True)
    points = []
    for t in knobs:
        record = super_resolution(
            os.path.join(args.data, "hr"),
            os.path.join(args.output, f"t{t:.2f}.json"),
            lr=os.path.join(args.data, "lr"),
            pipeline=args.oftsr,
            crop_border=SCALE,
            t=t,
            seeds=args.seeds,
            crops_per_image=args.crops_per_image,
            crop_size=args.crop_size if args.crops_per_image else None,
        )
        points.append({"t": t, **knob_points(record["per_image"], args.seeds)})
    result = {
        "recipe": "python -m onestep.eval.recipes.oftsr_knob",
        "student": os.path.abspath(args.oftsr),
        "seeds": args.seeds,
        "crops_per_image": args.crops_per_image,
        "crop_size": args.crop_size,
        "points": points,
    }
    with open(os.path.join(args.output, "knob.json"), "w") as f:
        json.dump(json_safe(result), f, indent=2)
    plot(result, os.path.join(args.output, "knob.png"))
    print(f"Wrote {args.output}/knob.json and {args.output}/knob.png")
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [p["t"] for p in result["points"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, FIGURES):
        for name in result["points"][0][key]["per_image"]:
            ax.plot(ts, [p[key]["per_image"][name] for p in result["points"]], lw=1, alpha=0.6, label=name)
        mean = np.array([p[key]["mean"] for p in result["points"]])
        std = np.array([p[key]["std"] or 0.0 for p in result["points"]])
        ax.plot(ts, mean, lw=2.5, color="black", label="mean")
        ax.fill_between(ts, mean - std, mean + std, color="black", alpha=0.15)
        ax.set_xlabel("t (0 = fidelity, 1 = realism)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, ls="--", color="grey", lw=1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"OFTSR's knob on the held-out photographs ({len(result['seeds'])} seeds, mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
