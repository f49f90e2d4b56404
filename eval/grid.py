"""Side-by-side sample grid: teacher DDIM at 1 and 50 steps (trailing spacing) beside a student pipeline.

python -m onestep.eval.grid --student outputs/dmd2-digits --output grid.png
"""

from __future__ import annotations

import argparse

import torch

from onestep.cli import run_main


def comparison_grid(teacher_id: str, student_dir: str, num_per_class: int = 2, seed: int = 0, teacher_steps=(1, 50)):
    """Rows: one per sampler; columns: classes 0..C-1 repeated num_per_class times; same noise everywhere."""
    from onestep.denoiser import Cond
    from onestep.loading import load_teacher, read_class_info
    from onestep.pipelines import OneStepPipeline
    from onestep.sampling import ddim_sample

    teacher = load_teacher(teacher_id)
    info = read_class_info(teacher_id, teacher.unet_config)
    num_classes = info.get("num_classes") or 1
    cfg = teacher.unet_config
    labels = torch.arange(num_classes).repeat(num_per_class)
    z = torch.randn(
        len(labels),
        cfg["in_channels"],
        cfg["sample_size"],
        cfg["sample_size"],
        generator=torch.Generator().manual_seed(seed),
    )
    cond = Cond(class_labels=labels) if info.get("num_classes") else None
    rows = [ddim_sample(teacher.denoiser, z, cond, num_steps=n).clamp(-1, 1) for n in teacher_steps]
    pipe = OneStepPipeline.from_pretrained(student_dir)
    student = pipe(
        class_labels=labels if cond is not None else None, batch_size=len(labels), latents=z, output_type="pt"
    ).images
    rows.append(student * 2 - 1)
    names = [f"teacher DDIM {n} step{'s' if n > 1 else ''}" for n in teacher_steps] + ["student (1 step)"]
    return torch.cat(rows), len(labels), names


def main(argv=None):
    from onestep.utils import save_image_grid

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="digits")
    p.add_argument("--student", required=True)
    p.add_argument("--output", default="comparison.png")
    p.add_argument("--num_per_class", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="Nearest-neighbour upscaling of the PNG.")
    args = p.parse_args(argv)
    images, ncol, names = comparison_grid(args.teacher, args.student, args.num_per_class, args.seed)
    save_image_grid(images, args.output, nrow=ncol, scale=args.scale)
    print(f"Wrote {args.output}: rows = {', '.join(names)}")


if __name__ == "__main__":
    run_main(main)
