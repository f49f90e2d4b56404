"""Prompts for the zero-shot COCO protocol of DMD2 (and GigaGAN, DMD): N captions of COCO-2014 val.

One caption per image (the first by annotation id), N images drawn with a fixed seed, written as JSONL
rows {"text", "image_id", "file_name"} that `onestep-eval fid --prompts` and `clip --prompts` read.
The FID reference is the val2014 image folder itself; both sides are centre-cropped and resized to 256:

    python -m onestep.eval.recipes.coco_prompts --annotations annotations/captions_val2014.json --num 30000 --output coco30k.jsonl
    onestep-eval fid --pipeline outputs/dmd2-sd15 --prompts coco30k.jsonl --num-samples 30000 --steps 1 \
        --guidance-scale 0 --ref val2014 --crop-size 256 --dtype fp16 --output coco_fid.json
"""

from __future__ import annotations

import argparse
import json
import os
import random

from onestep.cli import positive_int, run_main
from onestep.errors import UserError


def coco_prompts(annotations: str, num: int, seed: int = 0) -> list[dict]:
    if not os.path.isfile(annotations):
        raise UserError(f"The COCO captions file {annotations} does not exist (annotations/captions_val2014.json).")
    try:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
        files = {im["id"]: im["file_name"] for im in data["images"]}
        first = {}
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):
            first.setdefault(ann["image_id"], ann["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(
            f"{annotations} is not a COCO captions file (images + annotations with image_id and caption)."
        ) from None
    ids = sorted(i for i in first if i in files)
    if num > len(ids):
        raise UserError(f"--num {num} is more than the {len(ids)} captioned images in {annotations}.")
    chosen = sorted(random.Random(seed).sample(ids, num))
    return [{"text": first[i], "image_id": i, "file_name": files[i]} for i in chosen]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotations", required=True, help="COCO captions JSON, e.g. annotations/captions_val2014.json")
    p.add_argument("--num", type=positive_int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="a .jsonl prompt file")
    args = p.parse_args(argv)
    rows = coco_prompts(args.annotations, args.num, args.seed)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, args.output)
    print(f"{len(rows)} prompts -> {args.output}")


if __name__ == "__main__":
    run_main(main)
