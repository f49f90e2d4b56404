"""DMD2 export of EDM-preconditioned students: the folder loads with diffusers alone and its plain call gives the
generator's own samples (one step: x0 = D(80 z; 80, class)); a preset's missing converted teacher says how to make it."""

import json
import math
import os

import numpy as np
import pytest
import torch

from onestep.context import ExportTarget, TeacherContext
from onestep.denoiser import Cond
from onestep.errors import UserError
from onestep.export import save_teacher
from onestep.loading import load_teacher
from onestep.methods.dmd2 import DMD2, DMD2Config
from onestep.pipelines import OneStepPipeline
from tests.helpers import PY, ROOT, run, tiny_unet

NUM_CLASSES, SIZE, LABELS, SEED = 10, 8, [3, 7], 0
EDM_SCHEDULER = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
STEPS = {"one": [999], "few": [999, 600]}

# Each folder loaded in one fresh process that cannot import onestep, called as a user would.
SAMPLE_IN_FRESH_PROCESS = r"""
import sys, torch, numpy as np
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline
for folder in sys.argv[2:]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    out = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(int(sys.argv[1])), output_type="np").images
    np.save(folder + ".npy", out)
assert 'onestep' not in sys.modules, 'the export must load without importing onestep'
print(type(pipe).__name__)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (generator, folder)}: DMD2 students of a tiny EDM teacher, moved off the teacher, then exported."""
    root = tmp_path_factory.mktemp("edm")
    torch.manual_seed(0)
    unet = tiny_unet(num_class_embeds=NUM_CLASSES, sample_size=SIZE, channels=3)
    save_teacher(unet, EDM_SCHEDULER, str(root / "teacher"), {"note": "test"}, {"num_classes": NUM_CLASSES})
    teacher = load_teacher(str(root / "teacher"))
    out = {}
    for name, steps in STEPS.items():
        context = TeacherContext(
            teacher.denoiser,
            (3, SIZE, SIZE),
            cond_sampler=lambda n, device: Cond(class_labels=torch.zeros(n, dtype=torch.long, device=device)),
            num_classes=NUM_CLASSES,
            export=ExportTarget("one_step", teacher.scheduler_config, num_classes=NUM_CLASSES),
        )
        method = DMD2(context, DMD2Config(conditioning_timesteps=steps, gan=False))
        gen = method.generator.eval()
        with torch.no_grad():  # a student that differs from the teacher, so the export must carry its weights
            for p in gen.parameters():
                p.add_(0.05 * torch.randn_like(p))
        method.export(method.models(), str(root / name), {"training_steps": 1})
        out[name] = (gen, root / name)
    r = run(
        [PY, "-c", SAMPLE_IN_FRESH_PROCESS, str(SEED), *(str(folder) for _, folder in out.values())], cwd=str(root)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["OneStepPipeline"]
    return out


def _own_samples(gen, num_steps=None):
    """The generator's `sample` with the pipeline's random draws: z first, then each re-noising's noise."""
    g = torch.Generator().manual_seed(SEED)
    z = torch.randn(len(LABELS), 3, SIZE, SIZE, generator=g)
    noise = lambda like: torch.randn(like.shape, generator=g)  # noqa: E731
    x0 = gen.sample(z, Cond(class_labels=torch.tensor(LABELS)), num_steps=num_steps, noise_fn=noise)
    return (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", list(STEPS))
def test_exported_pipeline_gives_the_generators_samples(exported, name):
    gen, folder = exported[name]
    loaded = np.load(str(folder) + ".npy")
    want = _own_samples(gen)
    assert loaded.shape == (2, SIZE, SIZE, 3) and 0.05 < loaded.std()
    np.testing.assert_allclose(loaded, want, rtol=0, atol=1e-6)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EDMEulerScheduler" and scheduler["num_train_timesteps"] == 1000
    assert json.loads((folder / "model_index.json").read_text())["timesteps"] == STEPS[name]
    card = (folder / "README.md").read_text()
    assert "timestep 999 is sigma 80.0" in card and "ConsistencyModelPipeline" in card


def test_installed_class_samples_the_same_and_takes_fewer_steps(exported):
    gen, folder = exported["few"]
    pipe = OneStepPipeline.from_pretrained(str(folder))
    call = lambda **kw: pipe(
        class_labels=LABELS, generator=torch.Generator().manual_seed(SEED), output_type="np", **kw
    )  # noqa: E731
    np.testing.assert_allclose(call().images, np.load(str(folder) + ".npy"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(call(num_inference_steps=1).images, _own_samples(gen, 1), rtol=0, atol=1e-6)


def test_one_step_sample_is_D_of_80z_at_sigma_80(exported):
    """Karras et al. 2022, Table 1, written out here: x0 = c_skip x + c_out F(c_in x, ln(sigma) / 4), x = 80 z."""
    gen, folder = exported["one"]
    g = torch.Generator().manual_seed(SEED)
    x = 80.0 * torch.randn(len(LABELS), 3, SIZE, SIZE, generator=g)
    sigma, sd = 80.0, 0.5
    c_skip, c_out, c_in = sd**2 / (sigma**2 + sd**2), sigma * sd / math.hypot(sigma, sd), 1 / math.hypot(sigma, sd)
    with torch.no_grad():
        f = gen.denoiser.net(c_in * x, torch.full((2,), math.log(sigma) / 4), class_labels=torch.tensor(LABELS))
    x0 = c_skip * x + c_out * f.sample
    want = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.load(str(folder) + ".npy"), want, rtol=0, atol=1e-5)


def test_missing_converted_teacher_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"python -m onestep\.convert\.edm_adm .* \./teachers/edm-imagenet64"):
        load_teacher("./teachers/edm-imagenet64")
    script = os.path.join(ROOT, "train", "dmd2.py")
    r = run([PY, script, "--preset", "imagenet64-edm", "--output_dir", str(tmp_path / "out")], cwd=str(tmp_path))
    assert r.returncode == 2 and "onestep.convert.edm_adm" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
