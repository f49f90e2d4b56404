"""DisBack on a text-to-image teacher (a tiny SDXL built in code): both stages through train/disback.py with a LoRA
student and CFG, the path trained with the null prompt, and DMD2's export (the stock SDXL pipeline at t = 399
plus the adapter folder)."""

import json

import torch

from tests.helpers import PY, run


def test_sdxl_lora_student_walks_the_path_and_exports_the_stock_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from onestep.testing.tiny_sd import save_tiny_sdxl

    teacher = save_tiny_sdxl(str(tmp_path / "sdxl"))
    (tmp_path / "prompts.txt").write_text("a cat\na red car on a street\n")
    out = tmp_path / "run"
    r = run(
        [
            PY,
            "train/disback.py",
            "--preset",
            "sdxl-1step",
            "--pretrained_model_name_or_path",
            teacher,
            "--prompt_file",
            str(tmp_path / "prompts.txt"),
            "--output_dir",
            str(out),
            "--no-gan",
            "--lora_rank",
            "4",
            "--mixed_precision",
            "no",
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "2",
            "--path_steps",
            "2",
            "--num_snapshots",
            "2",
            "--switch_every",
            "1",
            "--validation_steps",
            "1000",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    path = json.loads((out / "path" / "path.json").read_text())
    assert path["uncond_prob"] == 0.1  # CFG 8 on the targets: S' learnt the null prompt too
    assert "target guidance | cfg_all" in (out / "README.md").read_text()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    image = pipe("a cat", num_inference_steps=1, guidance_scale=0, generator=torch.Generator().manual_seed(0))
    assert [int(t) for t in pipe.scheduler.timesteps] == [399] and image.images[0].size == (16, 16)
