"""The README quality table for the bundled digits teacher and DMD2 students (issue: onestep-eval).

    python -m onestep.eval.recipes.digits_table --student outputs/dmd2-digits [--student other-run ...]

Every row is made with the public `onestep-eval` commands (run in-process here); the records land in
--output_dir (one JSON per figure) and the table is printed as Markdown and saved as table.json.
"""

from __future__ import annotations

import argparse
import json
import os

from onestep.cli import run_main


def _eval(argv: list[str]) -> dict:
    from onestep.eval.cli import main

    return main(argv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", action="append", default=[], help="student pipeline folder(s)")
    p.add_argument("--teacher", default="digits")
    p.add_argument(
        "--teacher_steps", type=int, nargs="+", default=[1, 2, 4, 50], help="teacher rows of the speed benchmark"
    )
    p.add_argument(
        "--teacher_fid_steps",
        type=int,
        nargs="*",
        default=None,
        help="teacher rows of the FID table (default: --teacher_steps)",
    )
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--bench_batch", type=int, default=64)
    p.add_argument("--output_dir", default="outputs/digits-table")
    args = p.parse_args(argv)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    common = [
        "--ref",
        "digits",
        "--features",
        "digits",
        "--num-samples",
        str(args.num_samples),
        "--batch-size",
        "100",
        "--seed",
        "0",
    ]
    sources = [
        (f"teacher DDIM {n} step{'s' if n > 1 else ''}", f"teacher{n}", ["--teacher", args.teacher, "--steps", str(n)])
        for n in (args.teacher_steps if args.teacher_fid_steps is None else args.teacher_fid_steps)
    ]
    sources += [
        (f"student {os.path.basename(os.path.normpath(s))}", f"student{i}", ["--pipeline", s])
        for i, s in enumerate(args.student)
    ]
    rows = []
    for label, key, src in sources:
        stats = os.path.join(out, f"{key}.npz")
        fid = _eval(
            [
                "fid",
                *src,
                *common,
                "--save-stats",
                stats,
                "--output",
                os.path.join(out, f"{key}-fid.json"),
                "--plot",
                os.path.join(out, f"{key}.png"),
            ]
        )
        kid = _eval(
            [
                "kid",
                "--stats",
                stats,
                "--ref",
                "digits",
                "--features",
                "digits",
                "--seed",
                "0",
                "--output",
                os.path.join(out, f"{key}-kid.json"),
            ]
        )
        rows.append(
            {
                "sampler": label,
                "fid": fid["fid"],
                "kid": kid["kid"],
                "class_accuracy": fid["class_accuracy"],
                "source": fid["generated"]["source"],
            }
        )
    speed = {}
    for i, s in enumerate(args.student):
        bench = _eval(
            [
                "bench",
                "--pipeline",
                s,
                "--teacher",
                args.teacher,
                "--teacher-steps",
                *map(str, args.teacher_steps),
                "--batch-size",
                str(args.bench_batch),
                "--output",
                os.path.join(out, f"bench{i}.json"),
                "--plot",
                os.path.join(out, f"bench{i}.png"),
            ]
        )
        res = bench["results"]
        speed[f"student {os.path.basename(os.path.normpath(s))}"] = res[0]["images_per_s"]
        for n, r in zip(args.teacher_steps, res[1:]):
            speed.setdefault(f"teacher DDIM {n} step{'s' if n > 1 else ''}", r["images_per_s"])
    for r in rows:
        r["images_per_s"] = speed.get(r["sampler"])
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"num_samples": args.num_samples, "rows": rows}, f, indent=2)
    print(
        f"\n| sampler | FID (digits features) | KID | class accuracy | images/s (batch {args.bench_batch}) |\n|---|---|---|---|---|"
    )
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        print(f"| {r['sampler']} | {r['fid']:.4f} | {r['kid']:.5f} | {r['class_accuracy']:.3f} | {ips} |")
    return rows


if __name__ == "__main__":
    run_main(main)
