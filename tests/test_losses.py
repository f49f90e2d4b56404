import copy

import torch
import torch.nn.functional as F

from onestep.denoiser import Denoiser
from onestep.losses import dm_gradient, dm_loss, gan_discriminator_loss, gan_generator_loss
from onestep.testing.gmm import MLPDenoiserNet
from onestep.testing.toy import sd_schedule


def test_dm_gradient_matches_spec_formula():
    x, real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    g = dm_gradient(x, real, fake)
    for i in range(5):
        n_i = (x[i] - real[i]).abs().mean()  # mean over C, H, W of one sample
        assert torch.allclose(g[i], (fake[i] - real[i]) / n_i)


def test_dm_gradient_replaces_non_finite_by_zero():
    x = torch.zeros(2, 3)
    real = torch.zeros(2, 3)  # normaliser 0 -> inf / nan
    fake = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    g = dm_gradient(x, real, fake)
    assert torch.isfinite(g).all() and torch.equal(g, torch.zeros_like(g))


def test_dm_loss_gradient_is_g_over_numel():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    g = torch.randn(4, 3, 8, 8)
    dm_loss(x, g).backward()
    assert torch.allclose(x.grad, g / x.numel(), atol=1e-9)


def test_dm_gradient_is_exactly_zero_when_critic_equals_teacher():
    # With w = 1 and F = T at initialisation the gradient vanishes exactly.
    sched = sd_schedule()
    teacher = Denoiser(MLPDenoiserNet(), sched, "epsilon")
    critic = copy.deepcopy(teacher)
    x = torch.randn(16, 2)
    t = torch.randint(20, 981, (16,))
    x_t = sched.add_noise(x, torch.randn_like(x), t)
    with torch.no_grad():
        g = dm_gradient(x, teacher(x_t, t), critic(x_t, t))
    assert torch.count_nonzero(g) == 0


def test_gan_losses_are_non_saturating_softplus():
    real, fake = torch.randn(7), torch.randn(7)
    assert torch.allclose(gan_discriminator_loss(real, fake), F.softplus(fake).mean() + F.softplus(-real).mean())
    assert torch.allclose(gan_generator_loss(fake), F.softplus(-fake).mean())
    # A perfect discriminator drives its loss to 0 and the generator's up.
    assert gan_discriminator_loss(torch.full((3,), 50.0), torch.full((3,), -50.0)) < 1e-6
    assert gan_generator_loss(torch.full((3,), -50.0)) > 49
