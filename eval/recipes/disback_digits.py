"""DisBack against DMD2 on the bundled digits teacher: the in-training FID curves (the convergence-speed claim)
drawn from the runs' logs/eval.csv, and the quality-table FID of each export where its onestep-eval record
(`<run folder>-fid.json`, or --fid RUN=FILE) exists.

    accelerate launch train/dmd2.py --output_dir /tmp/dmd2-ref
    accelerate launch train/disback.py                       # outputs/disback-digits (+ outputs/disback-digits-path)
    onestep-eval fid --pipeline RUN --ref digits --features digits --num-samples 2000 --output RUN-fid.json  # each
    python -m onestep.eval.recipes.disback_digits --dmd2 /tmp/dmd2-ref --disback outputs/disback-digits

Several runs per method (e.g. seeds) may be given. Left panel: FID against the iterations of the distillation
loop (DisBack's stage 2, DMD2's only loop). Right panel: against seconds of training loop from each run's
timing.json (iterations mapped linearly), DisBack's curve starting after its stage 1 (`<run>-path/timing.json`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os


def _curve(run_dir: str) -> tuple[list[int], list[float]]:
    with open(os.path.join(run_dir, "logs", "eval.csv")) as f:
        rows = list(csv.DictReader(f))
    key = next(k for k in rows[0] if k.startswith("fid"))
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _run(run_dir: str, disback: bool, fids: dict) -> dict:
    steps, fid = _curve(run_dir)
    timing = _json(os.path.join(run_dir, "timing.json"))
    config = _json(os.path.join(run_dir, "training_config.json"))
    start = 0.0
    out = {"run": run_dir, "seed": config["trainer"]["seed"], "steps": steps, "fid": fid}
    if disback:
        path = _json(os.path.join(run_dir.rstrip("/") + "-path", "timing.json"))
        start = path["total_seconds"]
        m = config["method"]
        out.update(stage1_seconds=start, teacher_target_from=(m["num_snapshots"] - 1) * m["switch_every"])
    out["seconds"] = [start + s * timing["total_seconds"] / timing["steps"] for s in steps]
    out["training_seconds"] = start + timing["total_seconds"]
    record = fids.get(run_dir, run_dir.rstrip("/") + "-fid.json")
    out["export_fid_2000"] = _json(record)["fid"] if os.path.isfile(record) else None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dmd2", nargs="+", required=True, help="DMD2 run folders (logs/eval.csv, timing.json).")
    p.add_argument("--disback", nargs="+", required=True, help="DisBack stage-2 folders (stage 1 in <folder>-path).")
    p.add_argument("--fid", nargs="*", default=[], help="RUN=FILE: the onestep-eval fid record of RUN's export.")
    p.add_argument("--plot", default="eval/figures/disback-digits-fid.png")
    p.add_argument("--output", default="eval/figures/disback_digits.json")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fids = dict(item.split("=", 1) for item in args.fid)
    runs = {
        "DMD2": [_run(r, False, fids) for r in args.dmd2],
        "DisBack": [_run(r, True, fids) for r in args.disback],
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (name, rows), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        for i, r in enumerate(rows):
            style = dict(color=color, ls="-" if i == 0 else "--", marker="o" if name == "DMD2" else "s")
            label = f"{name} (digits-cpu, seed {r['seed']})"
            axes[0].plot(r["steps"], r["fid"], label=label, **style)
            axes[1].plot(r["seconds"], r["fid"], label=label, **style)
    first = runs["DisBack"][0]
    axes[0].axvline(first["teacher_target_from"], color="gray", ls=":", label="DisBack's target reaches the teacher")
    axes[1].axvline(first["stage1_seconds"], color="gray", ls="-.", label="DisBack's stage 1 ends")
    for ax, label in zip(axes, ("iterations (DisBack: stage 2)", "seconds of training loop")):
        ax.set_xlabel(label)
        ax.set_ylabel("in-training FID (digits features, 500)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    with open(args.output, "w") as f:
        json.dump(runs, f, indent=2)
    for name, rows in runs.items():
        for r in rows:
            print(name, r["seed"], "FID", r["export_fid_2000"], "curve", [round(v, 3) for v in r["fid"]])
    print(f"Wrote {args.plot} and {args.output}")


if __name__ == "__main__":
    main()
