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
    # SD's alpha at t=999 is ~0.068 (DMD2 spec 3), not DDPM-linear's 0.006.
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
