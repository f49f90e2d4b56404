"""Does TAD-SR's time-aware discriminator change the CPU default student? Students trained with it (the default) and
without it (--no-gan), one per seed, each measured on the held-out photographs by `onestep-eval sr` with the same
crops and noise (PSNR-Y against HR, sharpness, PSNR-Y against the 15-step teacher's samples), and D's hinge loss
over the end of each run (logs/losses.csv; 2 = chance). The claims, one value per training seed, go to
eval/figures/claims/tadsr-gan-ablation.json and are rendered into docs/methods/tadsr.md.

    for s in 0 1 2; do
        accelerate launch train/tadsr.py --seed $s --output_dir outputs/ablation/gan-s$s
        accelerate launch train/tadsr.py --seed $s --no-gan --output_dir outputs/ablation/nogan-s$s
    done
    python -m onestep.eval.recipes.tadsr_gan_ablation --with_gan outputs/ablation/gan-s{0,1,2} \\
        --without_gan outputs/ablation/nogan-s{0,1,2}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from onestep.cli import int_list, positive_int
from onestep.eval.commands import super_resolution
from onestep.eval.recipes.sr_natural import SCALE, ensure_held_out_set
from onestep.eval.record import json_safe
from onestep.run_logs import read_history

LAST_ROWS = 10  # D's loss at the end of a run: the mean of the last this many rows of logs/losses.csv


def final_discriminator_loss(run: str) -> float:
    path = os.path.join(run, "logs", "losses.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: the ablation reads D's loss from each run's logs.")
    rows = [r for r in read_history(path) if "loss_d" in r]
    if not rows:
        raise SystemExit(f"{run}/logs/losses.csv has no loss_d: was it trained with the discriminator?")
    return statistics.fmean(r["loss_d"] for r in rows[-LAST_ROWS:])


def measure(run: str, record_path: str, args, cache: dict) -> dict:
    """Held-out figures of one student, averaged over the evaluation seeds."""
    record = super_resolution(
        os.path.join(args.data, "hr"),
        record_path,
        lr=os.path.join(args.data, "lr"),
        pipeline=run,
        crop_border=SCALE,
        seeds=args.seeds,
        crops_per_image=args.crops_per_image,
        crop_size=args.crop_size,
        teacher=args.teacher,
        output_cache=cache,
    )
    return {key: record["over_seeds"][key]["mean"] for key in ("psnr_y", "sharpness", "teacher_psnr_y")}


def claims(with_gan: list[dict], without_gan: list[dict]) -> list[dict]:
    def arm(label, runs, key):
        return {"label": label, "values": [r[key] for r in runs]}

    return [
        {
            "claim": f"D leaves chance in the full default run: its hinge loss at the last {LAST_ROWS} logged "
            "iterations is below 2",
            "kind": "below",
            "values": [r["loss_d"] for r in with_gan],
            "threshold": 2.0,
            "digits": 4,
        },
        {
            "claim": "D sharpens the student: higher sharpness (the HR image's = 1) than without D",
            "kind": "better",
            "a": arm("with D", with_gan, "sharpness"),
            "b": arm("without", without_gan, "sharpness"),
            "lower_is_better": False,
        },
        {
            "claim": "D brings the student closer to HR: higher PSNR-Y (dB) than without D",
            "kind": "better",
            "a": arm("with D", with_gan, "psnr_y"),
            "b": arm("without", without_gan, "psnr_y"),
            "lower_is_better": False,
            "digits": 4,
        },
        {
            "claim": "D moves the student away from its teacher's samples: lower PSNR-Y to the teacher (dB)",
            "kind": "better",
            "a": arm("with D", with_gan, "teacher_psnr_y"),
            "b": arm("without", without_gan, "teacher_psnr_y"),
            "lower_is_better": True,
            "digits": 4,
        },
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--with_gan", nargs="+", required=True, help="Student folders trained with D, one per seed.")
    p.add_argument("--without_gan", nargs="+", required=True, help="Student folders trained with --no-gan.")
    p.add_argument("--teacher", default="sr-resshift", help="The teacher the distance is measured to.")
    p.add_argument("--data", default="outputs/sr-eval", help="Written by onestep.sr_data --write_eval if missing.")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="Evaluation seeds (noise and crops).")
    p.add_argument("--crops_per_image", type=positive_int, default=4)
    p.add_argument("--crop_size", type=positive_int, default=128)
    p.add_argument("--output", default="eval/figures/sr/tadsr-gan-ablation", help="Per-student records.")
    p.add_argument("--claims", default="eval/figures/claims/tadsr-gan-ablation.json")
    args = p.parse_args(argv)
    for run in args.with_gan + args.without_gan:
        if not os.path.isfile(os.path.join(run, "model_index.json")):
            raise SystemExit(f"{run} is not an exported TAD-SR student (no model_index.json).")
    final_loss = {run: final_discriminator_loss(run) for run in args.with_gan}  # before the slow part
    ensure_held_out_set(args.data)
    os.makedirs(args.output, exist_ok=True)
    cache, arms = {}, {"with_gan": [], "without_gan": []}
    for name in arms:
        for i, run in enumerate(getattr(args, name)):
            row = {"run": run, **measure(run, os.path.join(args.output, f"{name}-{i}.json"), args, cache)}
            if run in final_loss:
                row["loss_d"] = final_loss[run]
            arms[name].append(row)
            print(json.dumps(json_safe(row)), flush=True)
    record = {
        "recipe": "python -m onestep.eval.recipes.tadsr_gan_ablation",
        "evaluation": {"seeds": args.seeds, "crops_per_image": args.crops_per_image, "crop_size": args.crop_size},
        "runs": arms,
        "claims": claims(arms["with_gan"], arms["without_gan"]),
    }
    os.makedirs(os.path.dirname(args.claims) or ".", exist_ok=True)
    with open(args.claims, "w") as f:
        json.dump(json_safe(record), f, indent=1)
    print(f"Wrote {args.claims}")
    return record


if __name__ == "__main__":
    main()
