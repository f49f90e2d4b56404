"""The CSV logs and curves a run writes (logs/losses.csv, logs/eval.csv, loss_curves.png, eval.png)."""

from __future__ import annotations

import csv
import os


def flat(d: dict) -> dict:
    """Tracker-friendly values: numbers, strings and booleans as they are, anything else as text."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


def read_history(path: str, upto: int | None = None) -> list[dict]:
    """Rows of a run's log up to step `upto` (None: all of them); a resumed run continues the same file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [
            {k: (int(float(v)) if k == "step" else float(v)) for k, v in r.items() if v != ""}
            for r in csv.DictReader(f)
        ]
    return [r for r in rows if upto is None or r["step"] <= upto]


def write_history(path: str, history: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys = sorted({k for r in history for k in r} - {"step"})
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", *keys])
        w.writeheader()
        w.writerows(history)
    os.replace(path + ".tmp", path)


def plot_history(history: list[dict], path: str) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in history for k in r} - {"step", "lr", "train_seconds"})
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2 * max(len(keys), 1)), squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_ylabel(key, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
