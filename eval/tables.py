"""Every results table in docs/ is rendered from its JSON record by this one script, so the text and the numbers
cannot drift apart:

    python -m onestep.eval.tables            # rewrite the tables in docs/ from their records
    python -m onestep.eval.tables --check    # exit 1 and name each table that differs from its record

In a page, a table sits between `<!-- table: NAME -->` and `<!-- end table -->`; NAME is a key of TABLES.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"(<!-- table: (?P<name>[\w\-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def _pm(summary: dict, digits: int = 3, scale: float = 1.0) -> str:
    return f"{summary['mean'] * scale:.{digits}f} ± {summary['std'] * scale:.{digits}f}"


def render_leaderboard(record: dict) -> str:
    seeds = ", ".join(str(s) for s in record["seeds"])
    lines = [
        "| method | FID | KID (x1000) | class accuracy | training seconds | images/s | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        seconds = _pm(r["train_seconds"], 0) if "train_seconds" in r else "-"
        ips = f"{r['images_per_s']['mean']:.0f}"
        lines.append(
            f"| {r['label']} | {_pm(r['fid'])} | {_pm(r['kid'], 2, 1000)} | {_pm(r['class_accuracy'])} | "
            f"{seconds} | {ips} | {seeds if 'train_seconds' in r else 'sampling ' + seeds} |"
        )
    return "\n".join(lines) + "\n"


def _table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def _ms(values: list[float], digits: int) -> str:
    from .verdicts import mean_std

    m, s = mean_std(values)
    return f"{m:.{digits}g} ± {s:.2g}"


def claim_verdict(claim: dict) -> tuple[str, str]:
    """(what was measured, the verdict), both from the claim's per-seed values by the one rule (verdicts.py).

    A claim is {"claim": text, "kind": "below" | "above", "values": [...], "threshold": x} or
    {"claim": text, "kind": "better", "a": {"label", "values"}, "b": {"label", "values"}, "lower_is_better": bool}."""
    from . import verdicts

    digits = claim.get("digits", 3)
    n = len(claim["values"]) if "values" in claim else min(len(claim["a"]["values"]), len(claim["b"]["values"]))
    if claim["kind"] in ("below", "above"):
        rule = verdicts.below if claim["kind"] == "below" else verdicts.above
        word = "<" if claim["kind"] == "below" else ">"
        measured = f"{_ms(claim['values'], digits)} ({word} {claim['threshold']:.{digits}g}?)"
        return measured + f", {n} seeds", rule(claim["values"], claim["threshold"])
    a, b = claim["a"], claim["b"]
    measured = f"{a['label']} {_ms(a['values'], digits)} vs {b['label']} {_ms(b['values'], digits)}, {n} seeds"
    return measured, verdicts.better(a["values"], b["values"], claim.get("lower_is_better", True))


def render_claims(record: dict) -> str:
    """A claims record ({"claims": [...]}) as a table; every verdict is recomputed from the values."""
    rows = []
    for c in record["claims"]:
        measured, verdict = claim_verdict(c)
        rows.append([c["claim"], measured, f"**{verdict}**"])
    return _table(["claim", "measured (mean ± std over seeds)", "verdict"], rows)


def _cell(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['mean']:,.{digits}f} ± {value['std']:,.{digits}f}"
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else str(value)


def render_arms(record: dict, columns: tuple) -> str:
    """A full Gaussian-mixture record as one row per arm: first its reference rows (one value each), then every arm
    as mean ± std over its seeds. `columns` holds (key, header, digits); a key is read from the arm's summary, else
    from the arm itself (e.g. its iterations); "-" where an arm has no value."""
    rows = [
        [name, *[_cell(ref.get(key), digits) for key, _, digits in columns]]
        for name, ref in record.get("reference_rows", {}).items()
    ]
    for arm in record["arms"]:
        rows.append([arm["label"], *[_cell(arm["summary"].get(key, arm.get(key)), d) for key, _, d in columns]])
    return _table(["arm", *[header for _, header, _ in columns]], rows)


DMD2_ARM_COLUMNS = (
    ("energy_distance", "ED^2", 4),
    ("modes_covered", "modes", 2),
    ("weight_tv", "weight TV", 3),
    ("precision", "precision", 2),
    ("iterations", "iterations", 0),
)
DISBACK_ARM_COLUMNS = (
    ("iterations_to_0.05", "iterations to ED^2 < 0.05", 0),
    ("iterations_to_0.02", "to < 0.02", 0),
    ("energy_distance", "final ED^2", 4),
    ("weight_tv", "weight TV", 3),
    ("walk_length", "walk (iterations)", 0),
    ("early_switches", "switches before the cap", 1),
    ("initial_dm_gradient", "DM gradient at the start", 3),
)
MSD_ARM_COLUMNS = (
    ("energy_distance", "ED^2", 4),
    ("modes_covered", "components covered", 2),
    ("precision", "precision", 2),
    ("histogram_l1", "histogram L1", 3),
    ("iterations", "iterations per student", 0),
)

BOOT_ARM_COLUMNS = (
    ("coupling_clean", "coupling error", 4),
    ("coupling_other_boundary", "to the other convention's reference", 4),
    ("energy_distance", "ED^2", 4),
    ("reference_energy_distance", "ED^2 of its reference", 4),
    ("modes_covered", "modes", 1),
    ("weight_tv", "weight TV", 3),
    ("seconds", "seconds", 0),
)
TADSR_ARM_COLUMNS = (
    ("psnr", "PSNR (dB)", 3),
    ("posterior_ed", "posterior ED", 4),
    ("spread", "spread", 3),
    ("modes_covered", "modes reached", 2),
    ("seconds", "seconds", 0),
)


def render_summary(record: dict, columns: tuple) -> str:
    """A record whose "summary" maps each arm to {metric: {mean, std}} over its seeds, after its fixed "references"
    rows (one value each, if any), one row per arm; "-" where a row has no value."""
    rows = [[r["arm"], *[_cell(r.get(key), d) for key, _, d in columns]] for r in record.get("references", [])]
    labels = {r["arm"]: r.get("label", r["arm"]) for r in record.get("arms", record.get("rows", []))}
    for arm, summary in record["summary"].items():
        rows.append([labels.get(arm, arm), *[_cell(summary.get(key), d) for key, _, d in columns]])
    return _table(["arm", *[header for _, header, _ in columns]], rows)


def render_t_sweep(record: dict) -> str:
    """OFTSR's t sweep: PSNR and posterior ED at each t, mean ± std over the seeds, one column pair per teacher."""
    teachers = list(record["summary"])
    headers = ["t", *[f"{what}, {name}" for name in teachers for what in ("PSNR (dB)", "posterior ED")]]
    rows = []
    for t in record["summary"][teachers[0]]:
        cells = [[_cell(record["summary"][n][t]["psnr"], 3), _cell(record["summary"][n][t]["posterior_ed"], 4)]
                 for n in teachers]  # fmt: skip
        rows.append([t, *[c for pair in cells for c in pair]])
    return _table(headers, rows)


SR_COLUMNS = (
    ("psnr_y", "PSNR Y (dB)", 2),
    ("ssim_y", "SSIM Y", 3),
    ("psnr_rgb", "PSNR RGB (dB)", 2),
    ("ssim_rgb", "SSIM RGB", 3),
    ("sharpness", "sharpness", 3),
    ("teacher_psnr_y", "PSNR Y to its teacher (dB)", 2),
)


def render_sr(rows: list[dict]) -> str:
    """The held-out photograph table (eval/recipes/sr_natural.py): mean ± std over seeds, images/s on one CPU."""

    def cell(row, key, digits):
        if row.get(key) is None:
            return "-"
        value = row[key]
        if isinstance(value, str) or value == float("inf"):
            return "(itself)"
        std = row.get(f"{key}_std")
        return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    body = []
    for row in rows:
        ips = row.get("images_per_second")
        body.append([row["row"], *[cell(row, k, d) for k, _, d in SR_COLUMNS], "-" if ips is None else f"{ips:.2f}"])
    return _table(["row", *[h for _, h, _ in SR_COLUMNS], "images/s"], body)


# name -> (record path relative to the repository, renderer)
TABLES = {
    "leaderboard": ("eval/figures/leaderboard/leaderboard.json", render_leaderboard),
    "dmd2-gmm-arms": ("eval/figures/dmd2_gmm.json", functools.partial(render_arms, columns=DMD2_ARM_COLUMNS)),
    "disback-gmm-arms": ("eval/figures/disback_gmm.json", functools.partial(render_arms, columns=DISBACK_ARM_COLUMNS)),
    "msd-gmm-arms": ("eval/figures/msd_gmm.json", functools.partial(render_arms, columns=MSD_ARM_COLUMNS)),
    "sr-heldout": ("eval/figures/sr/table.json", render_sr),
    "boot-gmm-arms": ("eval/figures/boot_gmm.json", functools.partial(render_summary, columns=BOOT_ARM_COLUMNS)),
    "tadsr-gmm-arms": ("eval/figures/tadsr_gmm.json", functools.partial(render_summary, columns=TADSR_ARM_COLUMNS)),
    "oftsr-gmm-sweep": ("eval/figures/oftsr_gmm.json", render_t_sweep),
}


def register_claims(name: str, record: str) -> None:
    TABLES[name] = (record, render_claims)


for _method in ("dmd2", "disback", "boot", "msd", "tadsr", "oftsr"):
    register_claims(f"{_method}-gmm", f"eval/figures/claims/{_method}-gmm.json")
register_claims("tadsr-gan-ablation", "eval/figures/claims/tadsr-gan-ablation.json")


def render(name: str, root: str = ROOT) -> str:
    path, renderer = TABLES[name]
    with open(os.path.join(root, path)) as f:
        return renderer(json.load(f))


def pages(root: str = ROOT) -> list[str]:
    out = [os.path.join(root, "README.md")]
    for folder, _, files in os.walk(os.path.join(root, "docs")):
        out += [os.path.join(folder, f) for f in files if f.endswith(".md")]
    return sorted(out)


def stale(root: str = ROOT, fix: bool = False) -> list[str]:
    """'page: table' for every table whose text differs from its record (rewritten when fix is set)."""
    problems = []
    for page in pages(root):
        text = open(page, encoding="utf-8").read()
        where = os.path.relpath(page, root)

        def replace(m, where=where):
            name = m.group("name")
            if name not in TABLES:
                problems.append(f"{where}: unknown table {name!r}")
                return m.group(0)
            if not os.path.exists(os.path.join(root, TABLES[name][0])):
                problems.append(f"{where}: {name} has no record ({TABLES[name][0]})")
                return m.group(0)
            fresh = render(name, root)
            if fresh != m.group("body"):
                problems.append(f"{where}: {name}")
            return m.group(1) + fresh + m.group(4)

        new = MARKER.sub(replace, text)
        if fix and new != text:
            with open(page, "w", encoding="utf-8") as f:
                f.write(new)
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="Only report tables that differ from their records.")
    args = p.parse_args(argv)
    problems = stale(fix=not args.check)
    for line in problems:
        print(("differs: " if args.check else "rewrote: ") + line)
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
