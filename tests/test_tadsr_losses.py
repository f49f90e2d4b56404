"""TAD-SR's unit identities: the HSD gradient is zero at z_s = z_ref and equals
(a/c)[(z_s - z_ref) - (x0_hat(x_s) - x0_hat(x_r))]; the perturbation noise is Gaussian and the teacher's input is
scaled exactly once; the hinge losses and the time-aware heads."""

import pytest
import torch

from onestep.context import TeacherContext
from onestep.denoiser import Cond, Denoiser
from onestep.discriminator import TimeAwareDiscriminator
from onestep.losses import hinge_discriminator_loss, hinge_generator_loss
from onestep.methods.tadsr import TADSR, TADSRConfig
from onestep.schedules import ResShiftSchedule
from tests.helpers import tiny_unet


def _method(net=None, scale_input=False, **overrides):
    torch.manual_seed(0)
    sched = ResShiftSchedule(15, kappa=2.0, scale_input=scale_input)
    teacher = Denoiser(net or tiny_unet(channels=1, in_channels=2), sched, "sample")
    return TADSR(TeacherContext(teacher, (1, 8, 8)), TADSRConfig(**{"gan": False, **overrides}))


def test_hsd_gradient_is_zero_at_the_reference_and_follows_the_identity():
    method = _method()
    z_ref, u = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    cond = Cond(image=u)
    assert method.score_gradient(z_ref.clone(), z_ref, cond).abs().max() == 0
    z_s = z_ref + 0.3 * torch.randn_like(z_ref)
    torch.manual_seed(5)
    g = method.score_gradient(z_s, z_ref, cond)
    torch.manual_seed(5)  # the same t_h and n, drawn in the same order
    t = method.hsd_set[torch.randint(len(method.hsd_set), (4,))]
    n = torch.randn_like(z_s)
    sched, teacher = method.teacher.schedule, method.teacher
    x_s, x_r = sched.add_noise(z_s, n, t, u), sched.add_noise(z_ref, n, t, u)
    a, c = (v.reshape(-1, 1, 1, 1) for v in sched.coefficients(t))
    identity = (a / c) * ((z_s - z_ref) - (teacher(x_s, t, cond) - teacher(x_r, t, cond)))
    assert torch.allclose(g.double(), identity.double(), atol=1e-3 * identity.abs().max())
    assert set(t.tolist()) <= {0, 1, 2}  # ResShift's small-noise set


class _Spy(torch.nn.Module):
    """A 'network' that records what it reads and predicts x0 = 0."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, time, cond):
        self.seen.append((x.detach().clone(), time.detach().clone()))
        return torch.zeros_like(x)


@pytest.mark.parametrize("scale_input", [False, True])
def test_perturbation_noise_is_gaussian_and_the_teacher_input_is_scaled_once(scale_input):
    spy = _Spy()
    method = _method(net=spy, scale_input=scale_input, score_loss="sds")
    z = torch.zeros(256, 1, 16, 16)  # with z_s = u = 0 the teacher reads c_t n (/ sqrt(kappa^2 eta_t + 1))
    method.score_gradient(z, z, Cond(image=z))
    x, time = spy.seen[-1]
    sched = method.teacher.schedule
    t = time.round().long()
    scale = (sched.kappa**2 * sched.etas[t] + 1).sqrt() if scale_input else torch.ones(len(t), dtype=torch.float64)
    n = x.double() * (scale / sched.sigmas[t]).reshape(-1, 1, 1, 1)
    assert abs(float(n.mean())) < 0.01 and abs(float(n.var()) - 1) < 0.02  # N(0, 1), not U[0, 1)


def test_hinge_losses():
    real, fake = torch.tensor([[2.0, 0.5]]), torch.tensor([[-2.0, 0.5]])
    assert hinge_discriminator_loss(real, fake) == pytest.approx(0.5 * 0.5 + 0.5 * 1.5)
    assert hinge_generator_loss(fake) == pytest.approx(0.75)


def test_time_aware_heads_read_the_time_and_the_ablation_does_not():
    feats = [torch.randn(3, 16, 4, 4), torch.randn(3, 16)]
    for film in (True, False):
        torch.manual_seed(0)
        disc = TimeAwareDiscriminator([(16, 4, 4), (16,)], embed_dim=32, logit_channels=8, film=film)
        for head in disc.heads:  # leave the zero initialisation so the features reach the logits
            torch.nn.init.normal_(head.conv.weight, std=0.1)
        disc.eval()  # spectral norm iterates its power method in training mode
        out0, out5 = disc(feats, torch.zeros(3)), disc(feats, torch.full((3,), 5.0))
        assert out0.shape == (3, 8 * 16 + 8)
        assert (not torch.allclose(out0, out5)) == film


def test_the_discriminator_reads_real_and_fake_perturbed_with_one_gaussian_noise():
    """Real = perturb(z_gt, t_d, n), fake = perturb(z_s, t_d, n) with the same Gaussian n and t_d."""
    from onestep.data import Batch

    method = _method(gan=True, disc_embed_dim=16)
    seen = []
    method.encoder = lambda x, t, cond: seen.append((x.detach().clone(), t.clone())) or [x]
    method.prepared = method.models()
    B = 512
    z_gt, u = torch.randn(B, 1, 8, 8), torch.zeros(B, 1, 8, 8)
    batch = Batch(z_gt, Cond(image=u))

    class Due:
        due = ("generator",)

    state = method.start_iteration(batch, Due())
    (real, t_real), (fake, t_fake) = seen
    assert torch.equal(t_real, t_fake) and set(t_real.tolist()) <= set(range(14))
    sched = method.teacher.schedule
    a, c = (v.reshape(-1, 1, 1, 1).float() for v in sched.coefficients(t_real))  # u = 0: no b_t u term
    n_real, n_fake = (real - a * z_gt) / c, (fake - a * state["z_s"].detach()) / c
    assert torch.allclose(n_real, n_fake, atol=1e-4)
    assert abs(float(n_real.mean())) < 0.02 and abs(float(n_real.var()) - 1) < 0.03  # N(0, 1), not U[0, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hsd_timesteps=[0], hsd_uniform=True), "pass one of them"),
        (dict(gan=True, disc_embed_dim=15), "must be even"),
        (dict(reg_weight=0.0, score_loss="none"), "Every generator loss is off"),
    ],
)
def test_contradictory_options_are_refused_in_one_sentence(overrides, message):
    from onestep.errors import UserError

    with pytest.raises(UserError, match=message):
        _method(**overrides)


def test_the_default_features_end_each_level_with_its_attention_where_it_has_one():
    from diffusers import UNet2DModel

    from onestep.methods.tadsr import default_feature_modules

    net = UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    assert default_feature_modules(net) == ["down_blocks.0.resnets.1", "down_blocks.1.attentions.1", "mid_block"]


def test_heads_on_one_token_features_normalise_enough_numbers_per_group():
    """GroupNorm(32) over 128 one-token features would normalise 4 numbers a group, near-blinding the head (the toy
    recipe's MLP features); a (C, H, W) map keeps the published GroupNorm(32)."""
    from onestep.discriminator import MIN_PER_GROUP, TimeAwareHead

    vector, grid = TimeAwareHead((128,), embed_dim=16), TimeAwareHead((64, 4, 4), embed_dim=16)
    assert 128 // vector.norm.num_groups >= MIN_PER_GROUP and grid.norm.num_groups == 32


@pytest.mark.parametrize("disc_lr, expected", [(None, 2e-5), (1e-3, 1e-3)])
def test_the_discriminator_learns_at_the_generators_rate_unless_told_otherwise(disc_lr, expected):
    rates = {
        name: opt.param_groups[0]["lr"]
        for name, opt in _method(gan=True, learning_rate=2e-5, disc_learning_rate=disc_lr).optimizers().items()
    }
    assert rates == {"generator": 2e-5, "discriminator": expected}
