"""The SR table and figure on the held-out photographs (onestep/sr_data.py EVAL_IMAGES): `onestep-eval sr`
(PSNR / SSIM on Y and RGB, border = the scale cut, sharpness, and the distance to a teacher's samples) for bicubic,
each teacher at its full steps and at one step, and each one-step student (OFTSR at t = 0, 0.5, 1), with images per
second; and one side-by-side PNG (a row per image: LR nearest-upsampled, bicubic, the teachers at full steps, the
students, HR; centre crops).

Every figure is measured over --seeds (default 0, 1, 2: the pipelines' noise and the crops) on --crops-per-image
random --crop-size crops of each image (0: whole images), and reported as the mean over seeds with its standard
deviation (columns *_std). The teacher distance of a row is to the full-step teacher of its family: the ResShift
teacher for the ResShift rows and TAD-SR, the flow teacher for the flow rows and OFTSR, and for bicubic the first
teacher given (column `teacher`); a pipeline call shared by several rows runs once.

    python -m onestep.eval.recipes.sr_natural --resshift onestep/assets/sr-resshift-teacher --tadsr outputs/tadsr \
        --flow onestep/assets/sr-flow-teacher --oftsr outputs/oftsr --output eval/figures/sr
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from onestep.cli import int_list, non_negative_int, positive_int
from onestep.eval.commands import super_resolution
from onestep.eval.record import json_safe
from onestep.sr_data import write_eval_set

SCALE = 4
# The table's figures (record keys); each also gets a *_std column (standard deviation over seeds).
FIGURES = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "sharpness", "teacher_psnr_y", "teacher_mad", "lpips")


def ensure_held_out_set(data: str, crop: int | None = 256) -> None:
    """The held-out LR/HR/bicubic folders under `data`, written (centre crops of `crop` px) if missing."""
    if not os.path.isdir(os.path.join(data, "hr")):
        write_eval_set(data, SCALE, crop)


def teachers(args) -> dict[str, dict]:
    """The full-step teacher of each family given: what the rows of that family are measured against."""
    out = {}
    if args.resshift:
        out["resshift"] = {"row": "ResShift teacher, 15 steps", "pipeline": args.resshift, "steps": None}
    if args.flow:
        row = f"flow teacher, {args.flow_steps} Euler steps"
        out["flow"] = {"row": row, "pipeline": args.flow, "steps": args.flow_steps}
    return out


def rows_to_run(args) -> list[tuple[str, dict]]:
    """(row name, how it is made): sr (a folder) or pipeline [steps, t], and its teacher family (None: none)."""
    first = next(iter(teachers(args)), None)
    out = [("bicubic", {"sr": os.path.join(args.data, "bicubic"), "family": first})]
    if args.resshift:
        out += [
            ("ResShift teacher, 15 steps", {"pipeline": args.resshift, "family": "resshift"}),
            ("ResShift teacher, 1 step", {"pipeline": args.resshift, "steps": 1, "family": "resshift"}),
        ]
    if args.tadsr:
        out.append(
            ("TAD-SR student, 1 step", {"pipeline": args.tadsr, "family": "resshift" if args.resshift else None})
        )
    if args.flow:
        out += [
            (
                f"flow teacher, {args.flow_steps} Euler steps",
                {"pipeline": args.flow, "steps": args.flow_steps, "family": "flow"},
            ),
            ("flow teacher, 1 step", {"pipeline": args.flow, "steps": 1, "family": "flow"}),
        ]
    if args.oftsr:
        family = "flow" if args.flow else None
        out += [
            (f"OFTSR student, t = {t}", {"pipeline": args.oftsr, "t": t, "family": family}) for t in (0.0, 0.5, 1.0)
        ]
    return out


def measure_row(name: str, kw: dict, args, record_path: str, cache: dict) -> dict:
    """One row of the table: `onestep-eval sr` on the held-out set, its record written to record_path."""
    source = {"sr": kw["sr"]} if "sr" in kw else {"pipeline": kw["pipeline"]}
    teacher = teachers(args).get(kw.get("family"))
    record = super_resolution(
        os.path.join(args.data, "hr"),
        record_path,
        lr=os.path.join(args.data, "lr"),
        crop_border=SCALE,
        steps=kw.get("steps"),
        t=kw.get("t"),
        seeds=args.seeds,
        crops_per_image=args.crops_per_image,
        crop_size=args.crop_size if args.crops_per_image else None,
        teacher=teacher["pipeline"] if teacher else None,
        teacher_steps=teacher["steps"] if teacher else None,
        lpips_weights=args.lpips_weights,
        lpips_backbone=args.lpips_backbone,
        output_cache=cache,
        **source,
    )
    row = {"row": name}
    for key in FIGURES:
        if key in record["over_seeds"]:
            row[key] = record["over_seeds"][key]["mean"]
            row[f"{key}_std"] = record["over_seeds"][key]["std"]
    row.update(
        {
            "teacher": teacher["row"] if teacher else None,
            "images_per_second": record.get("images_per_second"),
            "seeds": record["seeds"],
            "crops_per_image": args.crops_per_image,
            "crop_size": args.crop_size if args.crops_per_image else None,
            "record": record_path,
        }
    )
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="outputs/sr-eval", help="Written by onestep.sr_data --write_eval if missing.")
    p.add_argument("--crop", type=int, default=256, help="Centre crop of each held-out image (0: whole images).")
    p.add_argument("--resshift", help="The ResShift teacher folder.")
    p.add_argument("--tadsr", help="The TAD-SR student folder.")
    p.add_argument("--flow", help="The flow teacher folder.")
    p.add_argument("--flow_steps", type=int, default=20)
    p.add_argument("--oftsr", help="The OFTSR student folder.")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="Noise and crop seeds (mean and std over them).")
    p.add_argument(
        "--crops_per_image", type=non_negative_int, default=4, help="Random crops per image and seed (0: whole)."
    )
    p.add_argument("--crop_size", type=positive_int, default=128, help="Side of each crop in HR pixels.")
    p.add_argument("--lpips_weights", help="Also LPIPS, offline: the lpips package's linear layers (.pth).")
    p.add_argument("--lpips_backbone", help="With --lpips_weights: torchvision's AlexNet or VGG16 weights (.pth).")
    p.add_argument("--output", default="eval/figures/sr")
    args = p.parse_args(argv)
    ensure_held_out_set(args.data, args.crop or None)
    os.makedirs(args.output, exist_ok=True)
    table, images, cache = [], {}, {}
    for i, (name, kw) in enumerate(rows_to_run(args)):
        table.append(measure_row(name, kw, args, os.path.join(args.output, f"row{i}.json"), cache))
        print(json.dumps(json_safe(table[-1])), flush=True)
        images[name] = _outputs(kw, args.data)
    with open(os.path.join(args.output, "table.json"), "w") as f:
        json.dump(json_safe(table), f, indent=2)  # PSNR of a teacher against itself is inf: "inf" in JSON
    _figures(images, args.data, args.output)
    print(f"Wrote {args.output}/table.json and {args.output}/side_by_side.png")
    return table


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
        crop = min(crop, *hr.shape[:2])
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
