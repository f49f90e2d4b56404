"""TAD-SR and OFTSR (stage 2) through the shared Trainer on the conditional mixture: a run cut at a checkpoint and
resumed ends exactly where an uninterrupted one does (models, TAD-SR's discriminator with its spectral-norm state,
optimisers, the EMA, the schedulers' and the run's counters), and the frozen network teacher never changes."""

import os

import pytest
import torch

from onestep.context import TeacherContext
from onestep.denoiser import Denoiser
from onestep.methods.oftsr import OFTSR, OFTSRConfig
from onestep.methods.tadsr import TADSR, TADSRConfig
from onestep.schedules import ConditionalFlowSchedule, ResShiftSchedule
from onestep.testing.sr_gmm import AnalyticSRDenoiser, ConditionalGMM, ConditionalMLP, fit_on_sr_gmm


def _tadsr(cgmm):
    """The analytic teacher samples; the network one (a fitted teacher-net stand-in) is copied and read by D."""
    sched = ResShiftSchedule(15, kappa=1.0)
    exact = Denoiser(AnalyticSRDenoiser(cgmm, sched), sched, "sample")
    net = Denoiser(ConditionalMLP(width=32), sched, "sample").requires_grad_(False)
    config = TADSRConfig(train_batch_size=16, teacher_steps=4, disc_embed_dim=16, disc_logit_channels=8)
    return TADSR(TeacherContext(exact, (8,)), config, student_init=net, feature_teacher=net), net


def _oftsr(cgmm):
    teacher = Denoiser(ConditionalMLP(width=32), ConditionalFlowSchedule(0.2), "flow")
    return OFTSR(TeacherContext(teacher, (8,)), OFTSRConfig(train_batch_size=16)), teacher


def _states(method, folder):
    out = {f"{n}.{k}": v.clone() for n, m in method.models().items() for k, v in m.state_dict().items()}
    for name in sorted(os.listdir(folder)):  # the EMA shadow, the schedulers' and the run's counters
        if name.startswith("custom_checkpoint"):
            for k, v in torch.load(os.path.join(folder, name), weights_only=True).items():
                if k != "seconds":  # the run's wall-clock time: the one entry that may differ
                    out[f"{name}.{k}"] = v
    return out


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("build", [_tadsr, _oftsr], ids=["tadsr", "oftsr"])
def test_resume_is_exact_and_the_teacher_never_changes(build, tmp_path):
    cgmm = ConditionalGMM.default()

    def fresh():
        torch.manual_seed(0)
        return build(cgmm)

    method, frozen_net = fresh()
    frozen = {k: v.clone() for k, v in frozen_net.state_dict().items()}
    run = dict(batch_size=16, seed=3, ema_decay=0.9, checkpointing_steps=3)
    fit_on_sr_gmm(method, cgmm, 6, output_dir=str(tmp_path / "a"), **run)
    whole = _states(method, tmp_path / "a" / "checkpoint-6")
    assert all(torch.equal(v, frozen_net.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is None for p in frozen_net.parameters())
    first, _ = fresh()
    fit_on_sr_gmm(first, cgmm, 3, output_dir=str(tmp_path / "b"), **run)
    second, _ = fresh()
    fit_on_sr_gmm(second, cgmm, 6, output_dir=str(tmp_path / "b"), resume=True, **run)
    resumed = _states(second, tmp_path / "b" / "checkpoint-6")
    assert whole.keys() == resumed.keys() and _equal(whole, resumed)
    assert not _equal(whole, _states(first, tmp_path / "b" / "checkpoint-3"))  # it did train between 3 and 6
