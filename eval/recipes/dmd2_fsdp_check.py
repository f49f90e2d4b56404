"""GPU check of DMD2 under FSDP2 (accelerate refuses FSDP on CPUs, so the test suite cannot run it).

On a tiny SDXL-shaped teacher built in code, with the real `train/dmd2.py`:
  1. 4-step student with backward simulation and the GAN on captioned images, trained once without
     accelerate and once under `accelerate launch --config_file train/fsdp_sdxl.yaml` (fp32 both): the
     exported UNets must agree (same seeds; only kernel order differs);
  2. a LoRA student under FSDP in bf16 with gradient checkpointing, stopped at a checkpoint and resumed;
  3. both FSDP exports reload with DiffusionPipeline.from_pretrained and generate with one call.

    python eval/recipes/dmd2_fsdp_check.py --num-processes 1 --output fsdp_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _captioned_folder(path: str) -> str:
    import numpy as np
    from PIL import Image

    os.makedirs(path)
    rng = np.random.RandomState(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}))
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.write("\n".join(rows))
    return path


def _run(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-6000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start


def _unet_weights(folder: str):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def _generate(folder: str, steps: int) -> list[int]:
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder).to("cuda" if torch.cuda.is_available() else "cpu")
    img = pipe("a cat", num_inference_steps=steps, guidance_scale=0, output_type="np").images
    return list(img.shape)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--output", default="fsdp_check.json")
    p.add_argument(
        "--teacher",
        default=None,
        help="a tiny SDXL folder made earlier by onestep.testing.tiny_sd.save_tiny_sdxl "
        "(building one needs open_clip's vocabulary, which a GPU machine may lack)",
    )
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    tmp = tempfile.mkdtemp(prefix="fsdp-check-")
    if args.teacher:
        teacher = os.path.abspath(args.teacher)
    else:
        from onestep.testing.tiny_sd import save_tiny_sdxl

        teacher = save_tiny_sdxl(os.path.join(tmp, "sdxl"))
    prompts = os.path.join(tmp, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a cat\na red car on a street\ntwo dogs on grass\n")
    data = _captioned_folder(os.path.join(tmp, "data"))
    fsdp = [
        "accelerate",
        "launch",
        "--config_file",
        "train/fsdp_sdxl.yaml",
        "--num_processes",
        str(args.num_processes),
    ]
    common = [
        "train/dmd2.py",
        "--pretrained_model_name_or_path",
        teacher,
        "--prompt_file",
        prompts,
        "--train_batch_size",
        "2",
        "--validation_steps",
        "1000",
        "--max_train_steps",
        "6",
        "--learning_rate",
        "1e-3",
    ]  # lr: visible change in 6 steps
    four_step = [
        "--preset",
        "sdxl-4step",
        "--conditioning_timesteps",
        "999,749,499,249",
        "--gan",
        "--train_data_dir",
        data,
        "--mixed_precision",
        "no",
    ]
    result = {"num_processes": args.num_processes}

    plain_dir, fsdp_dir = os.path.join(tmp, "plain"), os.path.join(tmp, "fsdp")
    result["plain_seconds"] = _run([sys.executable, *common, *four_step, "--output_dir", plain_dir])
    result["fsdp_seconds"] = _run([*fsdp, "--mixed_precision", "no", *common, *four_step, "--output_dir", fsdp_dir])
    a, b = _unet_weights(plain_dir), _unet_weights(fsdp_dir)
    teacher_w = _unet_weights(teacher)
    result["same_keys"] = sorted(a) == sorted(b)
    result["max_abs_diff_plain_vs_fsdp"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    result["max_abs_change_from_teacher"] = max(float((a[k].float() - teacher_w[k].float()).abs().max()) for k in a)
    result["fsdp_4step_image_shape"] = _generate(fsdp_dir, 4)

    lora_dir = os.path.join(tmp, "lora")
    lora = [
        "--preset",
        "sdxl-lora",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "4",
        "--no-gan",
        "--gradient_checkpointing",
        "--mixed_precision",
        "bf16",
        "--checkpointing_steps",
        "3",
        "--output_dir",
        lora_dir,
    ]
    stop_early = [c if c != "6" else "3" for c in common]
    result["lora_first_half_seconds"] = _run([*fsdp, "--mixed_precision", "bf16", *stop_early, *lora])
    result["lora_resume_seconds"] = _run(
        [*fsdp, "--mixed_precision", "bf16", *common, *lora, "--resume_from_checkpoint", "latest"]
    )
    result["lora_checkpoints"] = sorted(n for n in os.listdir(lora_dir) if n.startswith("checkpoint-"))
    with open(os.path.join(lora_dir, "logs", "losses.csv")) as f:
        result["lora_logged_steps"] = [int(float(r.split(",")[0])) for r in f.read().splitlines()[1:]]
    result["lora_files"] = sorted(os.listdir(os.path.join(lora_dir, "lora")))
    result["fsdp_lora_image_shape"] = _generate(lora_dir, 4)

    result["ok"] = (
        result["same_keys"]
        and result["max_abs_diff_plain_vs_fsdp"] < 1e-4
        and result["max_abs_change_from_teacher"] > 1e-6
        and result["lora_checkpoints"] == ["checkpoint-3", "checkpoint-6"]
    )
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if not result["ok"]:
        raise SystemExit("FSDP check failed")


if __name__ == "__main__":
    main()
