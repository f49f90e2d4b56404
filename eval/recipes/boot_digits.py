"""BOOT on the bundled digits teacher: does the student reproduce the teacher's noise-to-image map?

    python -m onestep.eval.recipes.boot_digits --student outputs/boot-digits [--other outputs/dmd2-digits]

From the same noise z and class labels: the student's one-step image, the teacher's DDIM with 20, 50 and 1
step (trailing spacing: 20 steps visit exactly BOOT's default grid 999, 949, ..., 49 and start at x_T = z), and
the teacher's B-paper trajectory on the student's own grid (its start x_T = alpha_T f(z, T) + sigma_T z), the
student's training target. Coupling error = E|x - x_ref|^2 / E|x_ref - mean(x_ref)|^2 over pixels in [-1, 1]
(images clamped as a pipeline returns them). `--other` measures another one-step student from the same noise for
contrast (DMD2's does not try to keep the teacher's coupling). Writes JSON and a comparison grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from onestep.cli import run_main
from onestep.context import TeacherContext


def _student_images(folder: str, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from onestep.eval.sources import load_pipeline

    pipe = load_pipeline(folder, "cpu")
    images = []
    for i in range(0, len(z), 250):
        out = pipe(class_labels=labels[i : i + 250], latents=z[i : i + 250], output_type="pt").images
        images.append(out * 2 - 1)
    return torch.cat(images)


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    var = (ref - ref.mean(0)).square().flatten(1).sum(1).mean()
    return float((x - ref).square().flatten(1).sum(1).mean() / var)


def main(argv=None):
    from onestep.denoiser import Cond
    from onestep.errors import UserError
    from onestep.loading import load_teacher, read_class_info
    from onestep.methods.boot import BOOT, BOOTConfig
    from onestep.sampling import ddim_sample
    from onestep.utils import save_image_grid

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="outputs/boot-digits")
    p.add_argument("--other", action="append", default=[], help="other one-step students for contrast")
    p.add_argument("--teacher", default="digits")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="eval/figures/boot_digits.json")
    p.add_argument("--grid", default="eval/figures/digits-boot-comparison.png")
    args = p.parse_args(argv)
    with open(os.path.join(args.student, "training_config.json")) as f:
        trained = json.load(f)["method"]
    teacher = load_teacher(args.teacher)
    num_classes = read_class_info(args.teacher, teacher.unet_config).get("num_classes")
    shape = (
        teacher.unet_config["in_channels"],
        teacher.unet_config["sample_size"],
        teacher.unet_config["sample_size"],
    )
    z = torch.randn(args.num, *shape, generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.num) % (num_classes or 1)
    cond = Cond(class_labels=labels) if num_classes else None
    config = BOOTConfig(**{k: v for k, v in trained.items() if k != "adam_betas"})
    if config.guidance_scale > 1:
        raise UserError(
            f"{args.student} was trained with teacher guidance {config.guidance_scale}; this recipe compares with the "
            "unguided teacher's DDIM, so it takes unguided students only."
        )
    method = BOOT(TeacherContext(teacher.denoiser, shape), config)  # only for its reference trajectory (no training)
    refs = {}
    with torch.no_grad():
        for n in (1, 20, 50):
            refs[f"teacher DDIM {n}"] = torch.cat(
                [ddim_sample(teacher.denoiser, z[i : i + 250], cond[i : i + 250] if cond else None, num_steps=n)
                 for i in range(0, args.num, 250)]
            ).clamp(-1, 1)  # fmt: skip
        refs[f"teacher B-{config.boundary} trajectory, N = {config.grid_size}"] = torch.cat(
            [method.reference_trajectory(z[i : i + 250], cond[i : i + 250] if cond else None)[0].float()
             for i in range(0, args.num, 250)]
        ).clamp(-1, 1)  # fmt: skip
    students = {"BOOT student": _student_images(args.student, z, labels)}
    for folder in args.other:
        students[f"{os.path.basename(folder.rstrip('/'))} student"] = _student_images(folder, z, labels)
    table = {s: {r: _relative_error(x, ref) for r, ref in refs.items()} for s, x in students.items()}
    table["teacher DDIM 20 (for scale)"] = {
        r: _relative_error(refs["teacher DDIM 20"], ref) for r, ref in refs.items()
    }
    record = {"command": "python -m onestep.eval.recipes.boot_digits " + " ".join(sys.argv[1:] if argv is None else argv), "num": args.num,
              "seed": args.seed, "student": os.path.abspath(args.student), "coupling_error": table}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(table, indent=1))
    cols = 2 * (num_classes or 10)
    rows = [refs["teacher DDIM 1"], refs["teacher DDIM 20"], refs["teacher DDIM 50"], *students.values()]
    save_image_grid(torch.cat([r[:cols] for r in rows]), args.grid, nrow=cols, scale=4)
    names = ["teacher DDIM 1", "teacher DDIM 20", "teacher DDIM 50", *students]
    print(f"Wrote {args.output} and {args.grid}: rows = {', '.join(names)}")


if __name__ == "__main__":
    run_main(main)
