import pytest
import torch

from onestep.schedules import DiscreteVPSchedule, KarrasSchedule, RectifiedFlowSchedule, schedule_from_scheduler_config
from tests.helpers import sd_scheduler_config

SCHEDULES = {
    "vp": DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear", 1000),
    "edm": KarrasSchedule(),
    "flow": RectifiedFlowSchedule(),
}


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample", "flow"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_conversions_round_trip(name, kind):
    if kind == "v_prediction" and name != "vp":
        pytest.skip("v-prediction is defined for VP schedules")
    sched = SCHEDULES[name]
    x0 = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 999, (64,))  # below the last index, where flow's alpha is 0
    x_t = sched.add_noise(x0, eps, t)
    out = sched.from_x0(x0, x_t, t, kind)
    assert torch.allclose(sched.to_x0(out, x_t, t, kind), x0, atol=1e-8)
    if kind == "epsilon":
        assert torch.allclose(out, eps, atol=1e-8)


def test_vp_matches_diffusers_scheduler():
    from diffusers import DDPMScheduler

    cfg = sd_scheduler_config()
    spec = schedule_from_scheduler_config(cfg)
    ref = DDPMScheduler.from_config(cfg)
    assert torch.allclose(spec.schedule.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6)
    x0, eps, t = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4), torch.randint(0, 1000, (8,))
    assert torch.allclose(spec.schedule.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5)
    # SD's alpha at t=999 is ~0.068, not DDPM-linear's 0.006.
    assert abs(float(spec.schedule.alphas[999]) - 0.068) < 0.001


def test_karras_grid_is_ascending_with_published_ends():
    s = KarrasSchedule()
    assert torch.all(s.sigmas[1:] > s.sigmas[:-1])
    assert float(s.sigmas[0]) == pytest.approx(0.002) and float(s.sigmas[-1]) == pytest.approx(80.0)
    assert s.prior_std(999) == pytest.approx(80.0)


def test_flow_endpoint_is_pure_noise():
    s = RectifiedFlowSchedule()
    assert float(s.alphas[-1]) == 0.0 and float(s.sigmas[-1]) == 1.0


def test_ddim_step_to_same_time_is_identity_and_clean_returns_x0():
    s = SCHEDULES["vp"]
    x_t, x0 = torch.randn(4, 2), torch.randn(4, 2)
    t = torch.full((4,), 500)
    assert torch.allclose(s.ddim_step(x_t, x0, t, t), x_t, atol=1e-6)
    assert torch.equal(s.ddim_step(x_t, x0, t, None), x0)


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction"):
        schedule_from_scheduler_config({"_class_name": "DDPMScheduler", "prediction_type": "nonsense"})


# -- the affine family x_t = a x0 + b u + c eps, and diffusers' own schedulers ------------------------------


def test_resshift_schedule_matches_its_closed_form():
    from onestep.schedules import ResShiftSchedule

    s = ResShiftSchedule(num_timesteps=15, kappa=2.0, min_noise=0.04, eta_end=0.99, power=0.3)
    published = [
        0.020,
        0.117,
        0.176,
        0.234,
        0.292,
        0.351,
        0.412,
        0.476,
        0.542,
        0.610,
        0.681,
        0.754,
        0.830,
        0.909,
        0.990,
    ]
    assert torch.allclose(s.etas.sqrt(), torch.tensor(published, dtype=torch.float64), atol=1e-3)  # ResShift's values
    assert torch.allclose(s.alphas, 1 - s.etas) and torch.allclose(s.shifts, s.etas)
    assert torch.allclose(s.sigmas, 2.0 * s.etas.sqrt())
    # Start state: x0 replaced by u gives ResShift's prior u + kappa sqrt(eta_T) eps.
    u, eps, T = (
        torch.randn(3, 2, 4, 4, dtype=torch.float64),
        torch.randn(3, 2, 4, 4, dtype=torch.float64),
        torch.full((3,), 14),
    )
    assert torch.allclose(s.add_noise(u, eps, T, u), u + 2.0 * s.etas[14].sqrt() * eps)
    # The deterministic DDIM step of the affine family, written out.
    x0, x_t, t, prev = torch.randn_like(u), torch.randn_like(u), torch.full((3,), 9), torch.full((3,), 4)
    a, b, c = 1 - s.etas, s.etas, 2.0 * s.etas.sqrt()
    expected = a[4] * x0 + b[4] * u + c[4] / c[9] * (x_t - a[9] * x0 - b[9] * u)
    assert torch.allclose(s.ddim_step(x_t, x0, t, prev, u), expected)
    # ResShift's latent input scaling x_t / sqrt(kappa^2 eta_t + 1).
    scaled = ResShiftSchedule(scale_input=True).model_input(x_t, t, "epsilon")
    assert torch.allclose(scaled, x_t / (4 * s.etas[9] + 1).sqrt())


def test_conditional_flow_matches_oftsr_notation():
    from onestep.schedules import ConditionalFlowSchedule

    sp = 0.2
    s = ConditionalFlowSchedule(sigma_p=sp, num_timesteps=1000)
    x1, u, eps = (torch.randn(4, 3, 2, 2, dtype=torch.float64) for _ in range(3))
    idx = torch.tensor([0, 249, 749, 998])
    time = 1 - (idx.double() + 1) / 1000  # OFTSR's t: 1 at the data, 0 at the start state
    tt = time.reshape(-1, 1, 1, 1)
    x_t = s.add_noise(x1, eps, idx, u)
    assert torch.allclose(x_t, tt * x1 + (1 - tt) * (1 - sp**2) ** 0.5 * u + (1 - tt) * sp * eps)  # OFTSR's path
    assert torch.allclose(s.model_time(idx).double(), time * 999, atol=1e-4)
    # OFTSR's velocity points from the start to the data: x1_hat = x_t + (1 - t) v_oftsr; ours is its negative.
    v_oftsr = x1 - ((1 - sp**2) ** 0.5 * u + sp * eps)
    assert torch.allclose(s.to_x0(-v_oftsr, x_t, idx, "flow", u), x_t + (1 - tt) * v_oftsr)
    assert torch.allclose(s.to_x0(-v_oftsr, x_t, idx, "flow", u), x1)
    target, _ = s.denoising_target(x1, eps, idx, "flow", u)
    assert torch.allclose(target, -v_oftsr)
    with pytest.raises(ValueError, match="pass u"):
        s.add_noise(x1, eps, idx)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "flow"])
@pytest.mark.parametrize("name", ["resshift", "conditional_flow"])
def test_affine_conversions_round_trip(name, kind):
    from onestep.schedules import ConditionalFlowSchedule, ResShiftSchedule

    if name == "resshift" and kind == "flow":
        pytest.skip("ResShift is not a flow path")
    s = ResShiftSchedule() if name == "resshift" else ConditionalFlowSchedule()
    x0, u, eps = (torch.randn(16, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    t = torch.randint(0, s.num_timesteps - 1, (16,))
    x_t = s.add_noise(x0, eps, t, u)
    out = s.from_x0(x0, x_t, t, kind, u)
    assert torch.allclose(s.to_x0(out, x_t, t, kind, u), x0, atol=1e-8)
    assert torch.allclose(s.eps_from_x0(x0, x_t, t, u), eps, atol=1e-8)


def test_edm_conversions_round_trip_and_match_diffusers_preconditioning():
    from diffusers import EDMEulerScheduler

    s = KarrasSchedule()
    x0, eps = torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, 3, 4, 4, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,))
    x_t = s.add_noise(x0, eps, t)
    F = s.from_x0(x0, x_t, t, "edm")
    assert torch.allclose(s.to_x0(F, x_t, t, "edm").double(), x0, atol=1e-5)
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    sigma = s.sigmas[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(s.model_input(x_t, t, "edm"), ref.precondition_inputs(x_t, sigma))
    assert torch.allclose(s.to_x0(F, x_t, t, "edm").double(), ref.precondition_outputs(x_t, F, sigma), atol=1e-5)
    assert torch.allclose(s.model_time(t).double(), ref.precondition_noise(s.sigmas[t]).double(), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_ddim_step_matches_diffusers_ddim(prediction_type):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    ref.set_timesteps(10)
    sched = schedule_from_scheduler_config(dict(ref.config, _class_name="DDIMScheduler")).schedule
    x_t, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, prev = int(ref.timesteps[3]), int(ref.timesteps[4])
    expected = ref.step(out, t, x_t)
    tt, ss = torch.full((2,), t), torch.full((2,), prev)
    x0 = sched.to_x0(out, x_t, tt, prediction_type)
    assert torch.allclose(x0, expected.pred_original_sample, atol=1e-4)
    assert torch.allclose(sched.ddim_step(x_t, x0, tt, ss), expected.prev_sample, atol=1e-4)
