"""The SR table and figure on the held-out photographs (onestep/sr_data.py EVAL_IMAGES): `onestep-eval sr`
(PSNR / SSIM on Y, border = the scale cut) for bicubic, each teacher at its full steps and at one step, and each
one-step student (OFTSR at t = 0, 0.5, 1), with images per second; and one side-by-side PNG (a row per image:
LR nearest-upsampled, bicubic, the teachers at full steps, the students, HR; centre crops).

    python -m onestep.eval.recipes.sr_natural --resshift onestep/assets/sr-resshift-teacher --tadsr outputs/tadsr \
        --flow onestep/assets/sr-flow-teacher --oftsr outputs/oftsr --output eval/figures/sr
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from onestep.eval.commands import super_resolution
from onestep.sr_data import write_eval_set

SCALE = 4


def rows_to_run(args) -> list[tuple[str, dict]]:
    out = [("bicubic", {"sr": os.path.join(args.data, "bicubic")})]
    if args.resshift:
        out += [
            ("ResShift teacher, 15 steps", {"pipeline": args.resshift}),
            ("ResShift teacher, 1 step", {"pipeline": args.resshift, "steps": 1}),
        ]
    if args.tadsr:
        out.append(("TAD-SR student, 1 step", {"pipeline": args.tadsr}))
    if args.flow:
        out += [
            (f"flow teacher, {args.flow_steps} Euler steps", {"pipeline": args.flow, "steps": args.flow_steps}),
            ("flow teacher, 1 step", {"pipeline": args.flow, "steps": 1}),
        ]
    if args.oftsr:
        out += [(f"OFTSR student, t = {t}", {"pipeline": args.oftsr, "t": t}) for t in (0.0, 0.5, 1.0)]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="outputs/sr-eval", help="Written by onestep.sr_data --write_eval if missing.")
    p.add_argument("--crop", type=int, default=256, help="Centre crop of each held-out image (0: whole images).")
    p.add_argument("--resshift", help="The ResShift teacher folder.")
    p.add_argument("--tadsr", help="The TAD-SR student folder.")
    p.add_argument("--flow", help="The flow teacher folder.")
    p.add_argument("--flow_steps", type=int, default=20)
    p.add_argument("--oftsr", help="The OFTSR student folder.")
    p.add_argument("--output", default="eval/figures/sr")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.data, "hr")):
        write_eval_set(args.data, SCALE, args.crop or None)
    os.makedirs(args.output, exist_ok=True)
    table, images = [], {}
    for i, (name, kw) in enumerate(rows_to_run(args)):
        record_path = os.path.join(args.output, f"row{i}.json")
        source = {"sr": kw["sr"]} if "sr" in kw else {"pipeline": kw["pipeline"], "lr": os.path.join(args.data, "lr")}
        record = super_resolution(
            os.path.join(args.data, "hr"),
            record_path,
            crop_border=SCALE,
            steps=kw.get("steps"),
            t=kw.get("t"),
            **source,
        )
        table.append(
            {
                "row": name,
                "psnr_y": record["psnr_y"],
                "ssim_y": record["ssim_y"],
                "psnr_rgb": record["psnr_rgb"],  # OFTSR's papers report RGB (oftsr.md section 8)
                "ssim_rgb": record["ssim_rgb"],
                "images_per_second": record.get("images_per_second"),
                "record": record_path,
            }
        )
        print(json.dumps(table[-1]), flush=True)
        images[name] = _outputs(kw, args.data)
    with open(os.path.join(args.output, "table.json"), "w") as f:
        json.dump(table, f, indent=2)
    _figures(images, args.data, args.output)
    print(f"Wrote {args.output}/table.json and {args.output}/side_by_side.png")


def _outputs(kw: dict, data: str) -> dict[str, np.ndarray]:
    """Each image's output for the figure (the pipeline rerun with the evaluation's seed scheme)."""
    import torch

    from onestep.eval.sources import generators, load_pipeline
    from onestep.utils import to_uint8

    names = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(data, "hr")))
    if "sr" in kw:
        return {n: np.asarray(Image.open(os.path.join(kw["sr"], f"{n}.png")).convert("RGB")) for n in names}
    pipe = load_pipeline(kw["pipeline"], torch.device("cpu"))
    out = {}
    for i, n in enumerate(names):
        call = {
            "image": Image.open(os.path.join(data, "lr", f"{n}.png")).convert("RGB"),
            "generator": generators(0, [i])[0],
        }
        call.update({k: kw[k] for k in ("t",) if kw.get(k) is not None})
        if kw.get("steps"):
            call["num_inference_steps"] = kw["steps"]
        out[n] = to_uint8(pipe(output_type="np", **call).images, (0, 1), "auto")[0]
    return out


def _figures(images: dict[str, dict[str, np.ndarray]], data: str, folder: str, crop: int = 112) -> None:
    """One PNG: a row per held-out image (its centre crop x crop, for legibility), a column per method."""
    from PIL import ImageDraw

    columns = [
        name for name in images if "1 step" not in name or "student" in name
    ]  # the teachers' 1 step: table only
    columns = [c for c in columns if "t = 0.5" not in c]
    labels = ["LR", *[_short(c) for c in columns], "HR"]
    rows = []
    for n in next(iter(images.values())):
        hr = np.asarray(Image.open(os.path.join(data, "hr", f"{n}.png")).convert("RGB"))
        lr = Image.open(os.path.join(data, "lr", f"{n}.png")).convert("RGB")
        panels = [np.asarray(lr.resize(hr.shape[1::-1], Image.NEAREST)), *[images[c][n] for c in columns], hr]
        top, left = (hr.shape[0] - crop) // 2, (hr.shape[1] - crop) // 2
        rows.append(np.concatenate([p[top : top + crop, left : left + crop] for p in panels], axis=1))
    grid = np.concatenate(rows, axis=0)
    figure = Image.new("RGB", (grid.shape[1], grid.shape[0] + 16), "white")
    draw = ImageDraw.Draw(figure)
    for i, label in enumerate(labels):
        draw.text((i * crop + 4, 2), label, fill="black")
    figure.paste(Image.fromarray(grid), (0, 16))
    figure.save(os.path.join(folder, "side_by_side.png"), optimize=True)


def _short(row: str) -> str:
    """'ResShift teacher, 15 steps' -> 'ResShift 15', 'OFTSR student, t = 1.0' -> 'OFTSR t=1.0'."""
    name, _, detail = row.partition(", ")
    name = name.replace(" teacher", "").replace(" student", "")
    detail = detail.replace(" Euler steps", "").replace(" steps", "").replace(" step", "").replace(" = ", "=")
    return f"{name} {detail}" if detail and detail != "1" else name


if __name__ == "__main__":
    main()
