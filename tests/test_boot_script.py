"""The real train/boot.py: data-free for real, exact resume after SIGKILL, the export in a fresh process (pixel
and Stable-Diffusion-shaped, LoRA and teacher CFG), and bad input as one sentence with exit status 2."""

import importlib.util
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import PY, ROOT, check_model_card, run

SMALL = ["--train_batch_size", "2", "--validation_steps", "1000", "--grid_size", "10"]


def _script():
    spec = importlib.util.spec_from_file_location("train_boot", os.path.join(ROOT, "train", "boot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_data(monkeypatch):
    """Every way the run setup reaches real images fails the run."""
    import onestep.data
    import onestep.run_setup

    def refuse(*args, **kwargs):
        raise AssertionError("BOOT read real data")

    for module, name in ((onestep.run_setup, "load_digits_images"), (onestep.data, "load_digits_images"),
                         (onestep.run_setup, "real_pixel_data"), (onestep.data.ImageFolder, "__init__")):  # fmt: skip
        monkeypatch.setattr(module, name, refuse)


def _weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


FRESH_PIXEL = r"""
import sys, json, torch
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
out = pipe(class_labels=[3, 7], latents=z, output_type="pt").images
assert 'onestep' not in sys.modules, 'the export must load without importing onestep'
print(json.dumps({"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "images": out.tolist()}))
"""


def test_default_run_is_data_free_resumes_exactly_after_sigkill_and_loads_in_a_fresh_process(tmp_path, monkeypatch):
    script, ref, cut = _script(), tmp_path / "ref", tmp_path / "cut"
    _no_data(monkeypatch)
    args = [*SMALL, "--max_train_steps", "4", "--checkpointing_steps", "2"]
    script.main(["--output_dir", str(ref), *args])  # the default preset: the bundled digits teacher
    resolved = json.loads((ref / "training_config.json").read_text())
    assert resolved["method_name"] == "BOOT" and resolved["preset"] == "digits-cpu"
    assert "loss_bc" in (ref / "logs" / "losses.csv").read_text().splitlines()[0]
    # A long run killed with SIGKILL right after its first checkpoint, then resumed to the same end.
    cmd = [PY, "train/boot.py", "--output_dir", str(cut), *SMALL, "--max_train_steps", "100000",
           "--checkpointing_steps", "2"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoint-2").exists() and not (cut / "model_index.json").exists()
    script.main(["--output_dir", str(cut), *args, "--resume_from_checkpoint", "latest"])
    a, b = _weights(ref), _weights(cut)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert any(
        not torch.equal(a[k], v) for k, v in _weights(os.path.join(ROOT, "onestep/assets/digits-teacher")).items()
    )
    # The export in a fresh process (onestep not imported) equals the installed class's call.
    r = run([PY, "-c", FRESH_PIXEL, str(ref)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["class"] == "BootPipeline" and info["scheduler"] == "BootScheduler"
    from onestep.pipelines.boot import BootPipeline

    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    here = BootPipeline.from_pretrained(str(ref))(class_labels=[3, 7], latents=z, output_type="pt").images
    assert torch.allclose(torch.tensor(info["images"]), here, atol=1e-6)
    _, card = check_model_card(ref, "boot", rows=("teacher", "training_steps", "metrics", "boundary"))
    assert "BOOT" in card and "network told timestep" in card and "none (noise)" in card


FRESH_TEXT = r"""
import sys, json, torch
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
lat = pipe("a cat", num_inference_steps=1, guidance_scale=0, latents=z, output_type="latent").images
img = pipe("a cat", num_inference_steps=1, guidance_scale=0, latents=z, output_type="np").images
assert 'onestep' not in sys.modules
print(json.dumps({"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                  "latents": lat.tolist(), "shape": list(img.shape)}))
"""


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_text_to_image_student_with_lora_and_teacher_cfg_is_the_stock_pipeline_with_boots_scheduler(
    layout, tmp_path, monkeypatch
):
    """Prompts only, CFG on the teacher, LoRA on the student; the export is the stock StableDiffusion(XL)Pipeline
    whose one-step call equals g(eps, clean) by hand: the UNet told t = 0, converted with alpha_999, sigma_999."""
    from diffusers import DiffusionPipeline

    from onestep.testing.tiny_sd import save_tiny_sd15, save_tiny_sdxl

    _no_data(monkeypatch)
    teacher = (save_tiny_sdxl if layout == "sdxl" else save_tiny_sd15)(str(tmp_path / "teacher"))
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    out = tmp_path / "out"
    _script().main(
        [
            "--pretrained_model_name_or_path",
            teacher,
            "--prompt_file",
            str(tmp_path / "prompts.txt"),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            *SMALL,
            "--preset",
            layout,
            "--lora_rank",
            "4",
            "--learning_rate",
            "1e-2",
            "--mixed_precision",
            "no",
        ]
    )  # the published preset, CFG on the teacher
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    lat = pipe("a cat", num_inference_steps=1, guidance_scale=0, latents=z, output_type="latent").images
    if layout == "sdxl":
        emb, _, pooled, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
        ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]])
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    else:
        emb, added = pipe.encode_prompt("a cat", "cpu", 1, False)[0], {}
    with torch.no_grad():
        eps_hat = pipe.unet(z, torch.tensor(0.0), encoder_hidden_states=emb, **added).sample.double()
    abar = DiffusionPipeline.from_pretrained(teacher).scheduler.alphas_cumprod[999].double()
    by_hand = (z.double() - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    assert torch.allclose(lat.double(), by_hand, atol=1e-5)
    teacher_unet = _weights(teacher)
    assert any(not torch.equal(teacher_unet[k], v) for k, v in _weights(str(out)).items())  # LoRA fused in
    if layout == "sdxl":
        return
    r = run([PY, "-c", FRESH_TEXT, str(out)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["class"] == "StableDiffusionPipeline" and info["scheduler"] == "BootScheduler"
    assert torch.allclose(torch.tensor(info["latents"]).double(), by_hand, atol=1e-5) and info["shape"] == [
        1,
        16,
        16,
        3,
    ]


def _noisy_teacher(path):
    """A teacher whose least noisy timestep is still mostly noise: no clean end BOOT can use."""
    from onestep.export import save_teacher
    from tests.helpers import tiny_unet

    betas = [0.6] + [0.01] * 999
    save_teacher(tiny_unet(), {"_class_name": "DDPMScheduler", "trained_betas": betas}, path, {"note": "test"})
    return path


@pytest.mark.parametrize(
    "case,args,expected",
    [
        ("grid 0", ["--grid_size", "0"], "argument --grid_size: expected a positive integer, got '0'"),
        ("grid above T", ["--grid_size", "1001"], "--grid_size 1001 must lie within 1..1000"),
        ("no clean end", ["--pretrained_model_name_or_path", "NOISY"], "no usable clean end"),
    ],
)
def test_bad_input_gives_one_sentence_and_exit_status_2(case, args, expected, tmp_path, capsys):
    """Through run_main, what the script's __main__ calls (the CLI wiring itself is covered by the DMD2 tests)."""
    from onestep.cli import run_main

    args = [_noisy_teacher(str(tmp_path / "noisy")) if a == "NOISY" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: _script().main(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", *args]))
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "out" / "model_index.json").exists()
