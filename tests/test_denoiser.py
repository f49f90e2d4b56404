import pytest
import torch

from onestep.critic import Critic
from onestep.denoiser import Cond, Denoiser
from onestep.discriminator import DMD2Head
from onestep.schedules import DiscreteVPSchedule, KarrasSchedule
from onestep.testing.gmm import MLPDenoiserNet
from tests.helpers import tiny_cond_unet, tiny_unet

SCHED = DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear", 1000)


def test_unet2d_adapter_passes_class_labels_and_converts_eps():
    unet = tiny_unet(num_class_embeds=4)
    den = Denoiser(unet, SCHED, "epsilon")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 999])
    labels = torch.tensor([0, 1, 2])
    eps = unet(x, t.float(), class_labels=labels).sample
    a, s = SCHED.alphas[t].reshape(-1, 1, 1, 1), SCHED.sigmas[t].reshape(-1, 1, 1, 1)
    expected = ((x.double() - s * eps.double()) / a).float()
    got = den(x, t, Cond(class_labels=labels))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(den(x, t, Cond(class_labels=labels.flip(0))), got)


@pytest.mark.parametrize("sdxl", [False, True])
def test_unet2d_condition_adapter_text_and_sdxl_added_conditions(sdxl):
    unet = tiny_cond_unet(sdxl=sdxl)
    den = Denoiser(unet, SCHED, "epsilon")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    cond = Cond(encoder_hidden_states=torch.randn(2, 5, 12))
    kwargs = {}
    if sdxl:
        cond.text_embeds, cond.time_ids = torch.randn(2, 8), torch.randn(2, 6)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
    direct = unet(x, t.float(), encoder_hidden_states=cond.encoder_hidden_states, **kwargs).sample
    assert torch.allclose(den.raw(x, t, cond), direct, atol=1e-6)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        den(x, t, None)


def test_cfg_equals_two_separate_teacher_calls():
    unet = tiny_unet(num_class_embeds=4)
    den = Denoiser(unet, SCHED, "epsilon")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([100, 400, 800])
    cond, uncond = Cond(class_labels=torch.tensor([0, 1, 2])), Cond(class_labels=torch.full((3,), 3))
    w = 3.5
    c, u = den(x, t, cond), den(x, t, uncond)
    assert torch.allclose(den.guided(x, t, cond, uncond, w), u + w * (c - u), atol=1e-4)
    # The same guidance applied to eps gives the same x0 (conversions are affine).
    eps = den.raw(x, t, uncond) + w * (den.raw(x, t, cond) - den.raw(x, t, uncond))
    assert torch.allclose(SCHED.to_x0(eps, x, t, "epsilon"), u + w * (c - u), atol=1e-3)


def test_edm_preconditioning():
    sched = KarrasSchedule()
    net = MLPDenoiserNet(dim=2)
    den = Denoiser(net, sched, "edm")
    x, t = torch.randn(4, 2), torch.tensor([0, 300, 700, 999])
    sigma = sched.sigmas[t].reshape(-1, 1)
    sd = 0.5
    c_skip, c_out, c_in = (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / (sigma**2 + sd**2).sqrt(),
        1 / (sigma**2 + sd**2).sqrt(),
    )
    F_out = net((c_in * x.double()).float(), (sigma.log() / 4).reshape(-1).float())
    assert torch.allclose(den(x, t), (c_skip * x.double() + c_out * F_out.double()).float(), atol=1e-5)
    target, weight = den.denoising_target(x, torch.randn_like(x), t)
    assert torch.equal(target, x) and torch.allclose(weight.double(), 1 / sigma.reshape(-1) ** 2 + 1 / sd**2)


def test_critic_reads_mid_block_through_a_hook_and_stops_early():
    unet = tiny_unet(num_class_embeds=4)
    seen, ran_decoder = {}, []
    unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))  # runs before the critic's hook
    unet.up_blocks[0].register_forward_hook(lambda m, i, o: ran_decoder.append(1))
    critic = Critic(Denoiser(unet, SCHED, "epsilon"))
    critic.head = DMD2Head(critic.feature_shape((1, 8, 8), Cond(class_labels=torch.tensor([0]))))
    ran_decoder.clear()
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([5, 600]), Cond(class_labels=torch.tensor([1, 2]))
    feats = critic.features(x, t, cond)
    assert torch.equal(feats, seen["mid"]) and not ran_decoder
    raw, logits = critic(x, t, cond, with_logits=True)
    assert ran_decoder and logits.shape == (2,)
    assert torch.allclose(logits, critic.head(seen["mid"]), atol=1e-6)
    assert torch.allclose(raw, unet(x, t.float(), class_labels=cond.class_labels).sample, atol=1e-6)


@pytest.mark.parametrize("shape,blocks", [((64, 8, 8), 1), ((32, 32, 32), 3), ((16, 4, 4), 0), ((128,), 0)])
def test_dmd2_head_follows_the_published_layout(shape, blocks):
    head = DMD2Head(shape)
    out = head(torch.randn(3, *shape))
    assert out.shape == (3,)
    strided = [m for m in head.net if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == blocks
