"""The regression warm start on teacher ODE pairs (DMD2's SDXL one-step recipe): pairs, loss, stage hand-over to
DMD2."""

import pytest
import torch

from onestep.context import TeacherContext
from onestep.denoiser import Cond, Denoiser
from onestep.ode_pairs import make_ode_pairs, pair_conditions, pair_noise
from onestep.sampling import ddim_sample
from onestep.schedules import DiscreteVPSchedule
from tests.helpers import PY, run, tiny_unet


class _Net(torch.nn.Module):
    """A diffusers-like UNet call signature around the tiny UNet (class labels as the condition)."""

    def __init__(self):
        super().__init__()
        self.unet = tiny_unet(num_class_embeds=4)

    def forward(self, x, t, cond=None):
        return self.unet(x, t, class_labels=cond.class_labels if cond is not None else None).sample


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    sched = DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear", 1000)
    return Denoiser(_Net(), sched, "epsilon").eval().requires_grad_(False)


def labels(n, device):
    return Cond(class_labels=torch.randint(0, 3, (n,), device=device))


def test_pairs_do_not_depend_on_chunking_or_processes_and_are_the_teachers_ddim_output(teacher, tmp_path):
    common = dict(shape=(1, 8, 8), num_pairs=7, num_steps=3, guidance_scale=2.0, seed=5, identity="t", device="cpu")
    uncond = lambda c: Cond(class_labels=torch.full_like(c.class_labels, 3))  # noqa: E731
    one = make_ode_pairs(teacher, labels, uncond, cache_dir=str(tmp_path / "a"), chunk=7, **common)
    # Two "processes" sharing one cache folder: each makes its own chunks, waits for the other (here the
    # barrier runs rank 0), then reads all of them.
    kw = dict(cache_dir=str(tmp_path / "b"), chunk=3, world_size=2, **common)
    rank0 = lambda: make_ode_pairs(teacher, labels, uncond, rank=0, **kw)  # noqa: E731
    two = make_ode_pairs(teacher, labels, uncond, rank=1, barrier=rank0, **kw)
    assert torch.equal(one.noise, two.noise) and torch.allclose(one.target, two.target, rtol=1e-4, atol=1e-3)
    idx = [2, 6]
    cond = pair_conditions(labels, idx, 5, "cpu")
    assert torch.equal(
        cond.class_labels,
        pair_conditions(labels, [2], 5, "cpu").cat(pair_conditions(labels, [6], 5, "cpu")).class_labels,
    )
    z = pair_noise(idx, (1, 8, 8), 5)
    expected = ddim_sample(teacher, z, cond, 3, 2.0, uncond(cond))
    assert torch.allclose(one.target[idx], expected, rtol=1e-4, atol=1e-3)
    # The pair's condition draw leaves the caller's random stream where it was.
    torch.manual_seed(1)
    a = torch.rand(1)
    torch.manual_seed(1)
    pair_conditions(labels, idx, 5, "cpu")
    assert torch.equal(torch.rand(1), a)


def test_regression_fits_the_pairs_and_lpips_inputs_are_images(teacher):
    from onestep.methods.base import StepInfo
    from onestep.methods.dmd2 import DMD2Config
    from onestep.methods.regression import ODERegression
    from onestep.ode_pairs import OdePairs

    torch.manual_seed(0)
    z = torch.randn(8, 1, 8, 8)
    pairs = OdePairs(z, 0.5 * torch.tanh(z), seed=0)  # a fixed map G must learn from its own noise input
    config = DMD2Config(conditioning_timesteps=[399], train_batch_size=8, learning_rate=1e-3, gan=False)
    method = ODERegression(TeacherContext(teacher, (1, 8, 8), cond_sampler=labels), config, pairs)
    method.attach(method.models(), lambda m: m)
    opt = method.optimizers()["generator"]
    info = StepInfo(0, ("generator",), torch.Generator(), torch.device("cpu"))
    losses = []
    for _ in range(60):
        loss, logs = method.loss("generator", method.start_iteration(None, info))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(logs["loss_mse"]))
    assert losses[-1] < 0.5 * losses[0]

    seen = []

    class FakeLPIPS(torch.nn.Module):
        def forward(self, a, b):
            seen.append(a.shape)
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    method.lpips = FakeLPIPS()
    loss, logs = method.loss("generator", method.start_iteration(None, info))
    assert "loss_lpips" in logs and loss.requires_grad and seen == [torch.Size([8, 3, 64, 64])]


def test_regression_stage_hands_its_generator_to_dmd2_and_refuses_unavailable_lpips(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "warm"
    common = ["--eval_steps", "0", "--validation_steps", "1000", "--train_batch_size", "4"]
    warm = [
        *common,
        "--preset",
        "digits-regression",
        "--regression_pairs",
        "8",
        "--regression_teacher_steps",
        "2",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
    ]
    r = run([PY, "train/dmd2.py", *warm, "--regression_loss", "mse", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Regression loss: MSE, because --regression_loss mse." in r.stdout
    r = run(
        [
            PY,
            "train/dmd2.py",
            *common,
            "--max_train_steps",
            "1",
            "--checkpointing_steps",
            "1",
            "--output_dir",
            str(tmp_path / "dmd2"),
            "--init_from_checkpoint",
            str(out / "checkpoint-2"),
            "--generator_learning_rate",
            "0",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "critic not in it: started afresh" in r.stdout + r.stderr
    # With the generator's learning rate at 0, DMD2's generator is still exactly the warm start's.
    warm_g = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    dmd2_g = load_file(str(tmp_path / "dmd2" / "checkpoint-1" / "model.safetensors"))
    assert warm_g.keys() == dmd2_g.keys() and all(torch.equal(warm_g[k], dmd2_g[k]) for k in warm_g)

    r = run([PY, "-c", LPIPS_REFUSED, *warm, "--output_dir", str(tmp_path / "refused")])
    assert r.returncode == 2 and "--regression_loss lpips is not available here: no weights" in r.stderr
    assert not (tmp_path / "refused" / "ode_pairs").exists()


LPIPS_REFUSED = r"""
import sys
import onestep.methods.regression as reg
reg.lpips_loss_or_reason = lambda: (None, "no weights")
sys.argv = ["train/dmd2.py", *sys.argv[1:], "--regression_loss", "lpips"]
sys.path.insert(0, "train")
import dmd2
from onestep.cli import run_main
run_main(dmd2.main)
"""
