"""The digits leaderboard: every generation method's default on the bundled digits teacher, on one machine, with
several seeds, beside the teacher's own DDIM sampler; quality at 2,000 samples, training wall time, speed, and
in-training FID against training seconds.

    python -m onestep.eval.recipes.leaderboard                       # 83 minutes on a 2-core CPU, alone
    python -m onestep.eval.recipes.leaderboard --seeds 0 --methods dmd2,boot

Rows: DMD2, DisBack, BOOT and MSD at their defaults, the regression warm start alone (--preset digits-regression)
and DMD2 from it (--preset digits-warmstart); the teacher's DDIM at 1, 2, 4 and 50 steps. Each run is the train
script as a user runs it, in a subprocess, one at a time (two jobs at once would share the cores and corrupt the
wall times). The recipe is resumable: a finished run is kept, an interrupted one resumes from its checkpoint.

Outputs: --record (the JSON record: every seed's values, mean and standard deviation), the table printed as
Markdown, and --figure (in-training FID against training seconds, one line per run).

Training wall time is the run's process time less its in-training evaluations and sample grids (what the user
waits for when those are off); FID/KID/class accuracy are measured on the shipped digits classifier's features
with `onestep-eval fid`, 2,000 samples, sampling seed 0; images/s with `onestep-eval bench` at batch 64.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
import subprocess
import sys
import time

from onestep.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (what the row is, the command line after `python`, extra flags)
METHODS = {
    "dmd2": ("DMD2 (default)", ["train/dmd2.py"]),
    "disback": ("DisBack (default, both stages)", ["train/disback.py"]),
    "boot": ("BOOT (default; in-training FID every 250)", ["train/boot.py", "--eval_steps", "250"]),
    "msd": ("MSD (default, 2 students)", ["train/msd.py"]),
    "regression": ("regression warm start alone", ["train/dmd2.py", "--preset", "digits-regression"]),
    "warmstart": ("DMD2 from the regression warm start", ["train/dmd2.py", "--preset", "digits-warmstart"]),
}
TEACHER_STEPS = (1, 2, 4, 50)
WALL_FILE = "leaderboard_wall.json"


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train(name: str, seed: int, out: str) -> float:
    """One training run (resumed if it was interrupted); its process wall-clock seconds, over every attempt."""
    wall_path = os.path.join(out, WALL_FILE)
    if os.path.isfile(os.path.join(out, "model_index.json")) and os.path.isfile(wall_path):
        with open(wall_path) as f:
            return json.load(f)["seconds"]
    earlier = 0.0
    if os.path.isfile(wall_path + ".partial"):
        with open(wall_path + ".partial") as f:
            earlier = json.load(f)["seconds"]
    _, command = METHODS[name]
    resume = ["--resume_from_checkpoint", "latest"] if os.path.isdir(out) and os.listdir(out) else []
    argv = [sys.executable, *command, "--seed", str(seed), "--output_dir", out, *resume]
    _say(f"train {name} seed {seed}: {' '.join(argv[1:])}")
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    seconds = earlier + time.perf_counter() - start
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "leaderboard_train.log"), "a") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        with open(wall_path + ".partial", "w") as f:
            json.dump({"seconds": seconds}, f)
        raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}); see {out}/leaderboard_train.log")
    with open(wall_path, "w") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def _timings(out: str) -> list[dict]:
    """Every timing.json of a run: its own, or each stage's (student-<k>/<stage>/ for MSD)."""
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "**", "timing.json"), recursive=True))]


def training_seconds(out: str, wall: float) -> float:
    """The process time less in-training evaluation and sample grids, over every stage."""
    spent = 0.0
    for timing in _timings(out):
        phases = timing.get("phases", {})
        spent += sum(phases.get(k, {}).get("seconds", 0.0) for k in ("evaluation", "validation"))
    return wall - spent


def fid_curve(out: str) -> list[tuple[float, float]]:
    """(training seconds, in-training FID) of every evaluation, stages laid end to end."""
    points, offset = [], 0.0
    for stage in _stage_folders(out):
        csv_path = os.path.join(stage, "logs", "eval.csv")
        if os.path.isfile(csv_path):
            with open(csv_path) as f:
                for row in csv.DictReader(f):
                    key = next((k for k in row if k.startswith("fid_")), None)
                    if key and row.get("train_seconds"):
                        points.append((offset + float(row["train_seconds"]), float(row[key])))
        timing = os.path.join(stage, "timing.json")
        if os.path.isfile(timing):
            offset += json.load(open(timing)).get("train_seconds", 0.0)
    return points


def _stage_folders(out: str) -> list[str]:
    """The run's own folder, or its stages' in the order they ran (training_config.json lists them)."""
    record = os.path.join(out, "training_config.json")
    stages = json.load(open(record)).get("stages") if os.path.isfile(record) else None
    return [os.path.join(out, s) for s in stages] if stages else [out]


def evaluate(source: list[str], key: str, work: str, num_samples: int, seed: int = 0) -> dict:
    """FID, KID and class accuracy of a pipeline or the teacher, with onestep-eval (in-process)."""
    from onestep.eval.cli import main as onestep_eval

    record = os.path.join(work, f"{key}-fid.json")
    if os.path.isfile(record):
        fid = json.load(open(record))
    else:
        common = ["--ref", "digits", "--features", "digits", "--num-samples", str(num_samples), "--batch-size", "100"]
        stats = os.path.join(work, f"{key}.npz")
        fid = onestep_eval(["fid", *source, *common, "--seed", str(seed), "--save-stats", stats, "--output", record])
        onestep_eval(
            ["kid", "--stats", stats, "--ref", "digits", "--features", "digits", "--seed", "0", "--output",
             os.path.join(work, f"{key}-kid.json")]
        )  # fmt: skip
    kid = json.load(open(os.path.join(work, f"{key}-kid.json")))
    return {"fid": fid["fid"], "kid": kid["kid"], "class_accuracy": fid["class_accuracy"]}


def speed(pipeline: str, key: str, work: str, teacher_steps: tuple[int, ...] = ()) -> list[float]:
    """Images/s of a student pipeline (and, with teacher_steps, of the digits teacher's DDIM at each)."""
    from onestep.eval.cli import main as onestep_eval

    record = os.path.join(work, f"{key}-bench.json")
    if not os.path.isfile(record):
        teacher = ["--teacher", "digits", "--teacher-steps", *map(str, teacher_steps)] if teacher_steps else []
        onestep_eval(["bench", "--pipeline", pipeline, *teacher, "--batch-size", "64", "--output", record])
    return [r["images_per_s"] for r in json.load(open(record))["results"]]


def summarise(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="Training seeds (comma-separated).")
    p.add_argument("--methods", default=",".join(METHODS), help=f"Rows to run, of: {', '.join(METHODS)}.")
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--output_dir", default="outputs/leaderboard", help="Runs and evaluation records.")
    p.add_argument("--record", default="eval/figures/leaderboard/leaderboard.json")
    p.add_argument("--figure", default="eval/figures/leaderboard/fid_vs_seconds.png")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        from onestep.errors import UserError

        raise UserError(f"Unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    work = os.path.join(args.output_dir, "eval")
    os.makedirs(work, exist_ok=True)
    rows, curves = [], {}
    for name in names:
        per_seed = {"fid": [], "kid": [], "class_accuracy": [], "train_seconds": [], "images_per_s": []}
        for seed in seeds:
            out = os.path.join(args.output_dir, f"{name}-seed{seed}")
            wall = train(name, seed, out)
            _say(f"evaluate {name} seed {seed}")
            quality = evaluate(["--pipeline", out], f"{name}-seed{seed}", work, args.num_samples)
            for k, v in quality.items():
                per_seed[k].append(v)
            per_seed["train_seconds"].append(training_seconds(out, wall))
            per_seed["images_per_s"].append(speed(out, f"{name}-seed{seed}", work)[0])
            curves[f"{name}-seed{seed}"] = fid_curve(out)
        rows.append({"row": name, "label": METHODS[name][0], **{k: summarise(v) for k, v in per_seed.items()}})
    first_run = os.path.join(args.output_dir, f"{names[0]}-seed{seeds[0]}")
    teacher_speed = dict(zip(TEACHER_STEPS, speed(first_run, "teacher", work, TEACHER_STEPS)[1:]))
    for steps in TEACHER_STEPS:  # the teacher's sampler: sampling seeds stand in for training seeds
        per_seed = {"fid": [], "kid": [], "class_accuracy": []}
        for seed in seeds:
            _say(f"evaluate the teacher's DDIM at {steps} steps, seed {seed}")
            quality = evaluate(
                ["--teacher", "digits", "--steps", str(steps)],
                f"teacher{steps}-seed{seed}",
                work,
                args.num_samples,
                seed,
            )
            for k, v in quality.items():
                per_seed[k].append(v)
        ips = teacher_speed[steps]
        label = f"teacher DDIM, {steps} step{'s' if steps > 1 else ''}"
        rows.append(
            {"row": f"teacher{steps}", "label": label, **{k: summarise(v) for k, v in per_seed.items()},
             "images_per_s": summarise([ips])}
        )  # fmt: skip
    record = {
        "recipe": "python -m onestep.eval.recipes.leaderboard " + " ".join(argv or sys.argv[1:]),
        "machine": _machine(),
        "seeds": seeds,
        "num_samples": args.num_samples,
        "protocol": "FID/KID/class accuracy on the shipped digits classifier's features, 2,000 samples, sampling "
        "seed 0 (teacher rows: sampling seeds = the seeds); training seconds = process wall time less in-training "
        "evaluation and sample grids; images/s from onestep-eval bench at batch 64",
        "rows": rows,
        "curves": curves,
    }
    os.makedirs(os.path.dirname(args.record) or ".", exist_ok=True)
    with open(args.record, "w") as f:
        json.dump(record, f, indent=2)
    plot(curves, rows, args.figure)
    from onestep.eval.tables import render_leaderboard

    print(render_leaderboard(record))
    return record


def _machine() -> dict:
    import platform

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}


def plot(curves: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours, labelled = {}, set()
    for run, points in sorted(curves.items()):
        name = run.rsplit("-seed", 1)[0]
        colour = colours.setdefault(name, f"C{len(colours)}")
        if points:
            xs, ys = zip(*points)
            label = name if name not in labelled else None
            labelled.add(name)
            ax.plot(xs, ys, "-o", color=colour, alpha=0.6, markersize=3, label=label)
    for r in rows:  # the final FID of each run at its training time
        if "train_seconds" in r:
            colour = colours.setdefault(r["row"], f"C{len(colours)}")
            # a method without in-training evaluation (MSD) is only its final crosses: name it there
            label = None if r["row"] in labelled else f"{r['row']} (final FID only)"
            ax.scatter(r["train_seconds"]["values"], r["fid"]["values"], color=colour, marker="x", label=label)
    teacher = next((r for r in rows if r["row"] == "teacher50"), None)
    if teacher:
        ax.axhline(teacher["fid"]["mean"], color="k", linestyle="--", linewidth=1, label="teacher, DDIM 50 steps")
    ax.set_xlabel("training seconds (2-core CPU; evaluation and grids excluded)")
    ax.set_ylabel("FID (digits features)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("In-training FID (500 samples) against training time; x: final FID at 2,000 samples")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
