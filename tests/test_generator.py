import torch
from torch import nn

from onestep.denoiser import Denoiser
from onestep.generator import OneStepGenerator
from onestep.schedules import DiscreteVPSchedule

SCHED = DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear", 1000)


class Recorder(nn.Module):
    """x0-predicting 'network' that returns a fixed image and records the times it was queried at."""

    def __init__(self, value):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, x, time, cond=None):
        self.calls.append(int(time[0]))
        return torch.full_like(x, self.value)


def test_backward_simulation_follows_dmd2_section_5():
    net = Recorder(0.3)
    gen = OneStepGenerator(Denoiser(net, SCHED, "sample"), [999, 749, 499, 249])
    z = torch.randn(4096, 2)
    # k = 0: pure noise at the first entry, no network call.
    x, t = gen.backward_simulate(z, None, 0)
    assert torch.equal(x, z) and torch.all(t == 999) and net.calls == []
    # k = 2: G runs through the first two entries, then x0 is noised to t_2 with this iteration's z.
    x, t = gen.backward_simulate(z, None, 2)
    assert net.calls == [999, 749] and torch.all(t == 499)
    a, s = SCHED.alphas[499], SCHED.sigmas[499]
    assert torch.allclose(x.double(), a * 0.3 + s * z.double(), atol=1e-6)


def test_backward_simulation_marginal_matches_alpha_x0_plus_sigma_eps():
    net = Recorder(-0.5)
    gen = OneStepGenerator(Denoiser(net, SCHED, "sample"), [999, 499])
    x, t = gen.backward_simulate(torch.randn(20000, 1), None, 1)
    a, s = float(SCHED.alphas[499]), float(SCHED.sigmas[499])
    assert abs(float(x.mean()) - a * -0.5) < 0.02 and abs(float(x.std()) - s) < 0.02


def test_sampling_chain_renoises_with_fresh_noise():
    net = Recorder(0.1)
    gen = OneStepGenerator(Denoiser(net, SCHED, "sample"), [999, 500])
    draws = []

    def noise(like):
        draws.append(1)
        return torch.randn_like(like)

    out = gen.sample(torch.randn(3, 2), noise_fn=noise)
    assert net.calls == [999, 500] and len(draws) == 1 and torch.allclose(out, torch.full((3, 2), 0.1))
    assert len(gen.sample(torch.randn(3, 2), num_steps=1)) == 3 and net.calls[-1] == 999


def test_generator_rejects_bad_timesteps():
    import pytest

    with pytest.raises(ValueError):
        OneStepGenerator(Denoiser(Recorder(0), SCHED, "sample"), [249, 999])
    with pytest.raises(ValueError):
        OneStepGenerator(Denoiser(Recorder(0), SCHED, "sample"), [1000])
