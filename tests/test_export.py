import json
import os

import torch

from onestep.denoiser import Cond, Denoiser
from onestep.export import export_one_step
from onestep.generator import OneStepGenerator
from onestep.pipelines import OneStepPipeline
from onestep.schedules import schedule_from_scheduler_config
from tests.helpers import PY, run, sd_scheduler_config, tiny_unet


def _student(tmp_path, timesteps):
    torch.manual_seed(1)
    unet = tiny_unet(num_class_embeds=4)
    cfg = sd_scheduler_config()
    export_one_step(unet, cfg, timesteps, str(tmp_path), {"teacher": "tiny", "method": "test"}, num_classes=3)
    spec = schedule_from_scheduler_config(cfg)
    return OneStepGenerator(Denoiser(unet, spec.schedule, spec.prediction_type), timesteps)


def test_pipeline_call_equals_the_trained_generator(tmp_path):
    gen = _student(tmp_path, [999])
    pipe = OneStepPipeline.from_pretrained(str(tmp_path))
    z = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])
    expected = gen.sample(z, Cond(class_labels=labels))
    got = pipe(class_labels=labels, latents=z, output_type="pt").images
    assert torch.allclose(got, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_multi_step_contract_is_saved_and_used(tmp_path):
    _student(tmp_path, [999, 749, 499, 249])
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["timesteps"] == [999, 749, 499, 249] and index["_class_name"] == ["one_step", "OneStepPipeline"]
    pipe = OneStepPipeline.from_pretrained(str(tmp_path))
    a = pipe(class_labels=[1], generator=torch.Generator().manual_seed(3), output_type="np").images
    b = pipe(class_labels=[1], generator=torch.Generator().manual_seed(3), output_type="np").images
    c = pipe(
        class_labels=[1], generator=torch.Generator().manual_seed(3), num_inference_steps=1, output_type="np"
    ).images
    assert (a == b).all() and not (a == c).all()


def test_export_is_self_contained_for_diffusers_alone(tmp_path):
    _student(tmp_path, [999])
    code = (
        "import sys, torch; sys.path = [p for p in sys.path if p not in ('', '.')]\n"
        "from diffusers import DiffusionPipeline\n"
        f"p = DiffusionPipeline.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "print(type(p).__name__, 'onestep' in sys.modules, p(batch_size=3, generator=torch.Generator().manual_seed(0), output_type='np').images.shape)"
    )
    r = run([PY, "-c", code], cwd=str(tmp_path.parent))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:2] == ["OneStepPipeline", "False"]
    # Re-exporting over an existing folder replaces it cleanly (no temporary folders left behind).
    _student(tmp_path, [999])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")]


def test_a_card_names_the_teacher_hub_id_as_base_model_and_a_local_teacher_not_at_all(tmp_path):
    import yaml

    from onestep.export import Card, hub_id

    assert hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert hub_id(str(tmp_path)) is None and hub_id("digits") is None and hub_id("./a/b") is None
    card = Card("Student", {"teacher": "x"}, method="dmd2", base_model=hub_id("owner/model"), steps=4)
    header = yaml.safe_load(card.text().split("---\n")[1])
    assert header["base_model"] == "owner/model" and header["tags"] == ["onestep", "dmd2", "few-step"]
