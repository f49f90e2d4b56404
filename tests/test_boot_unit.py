"""BOOT's arithmetic, without training (docs/methods/boot.md): the time grid and its
deltas, the signal recursion against an x-space DDIM loop, the loss self-test, the student's parametrisation
at initialisation, the bad-input refusals, and the exported pipeline's call against g(eps, clean) by hand."""

import pytest
import torch

from onestep.context import TeacherContext
from onestep.denoiser import Cond, Denoiser
from onestep.errors import UserError
from onestep.generator import CLEAN
from onestep.losses import bootstrap_loss, bootstrap_target, signal_step
from onestep.methods.base import StepInfo
from onestep.methods.boot import BOOT, BOOTConfig, time_grid
from onestep.sampling import ddim_sample
from onestep.schedules import DiscreteVPSchedule, KarrasSchedule, RectifiedFlowSchedule
from onestep.testing.boot_toy import (
    SCHEDULES,
    ReferenceStudent,
    analytic_teacher,
    ddim_trajectory,
    reference_trajectory,
)
from onestep.testing.gmm import GaussianMixture
from tests.helpers import tiny_unet

GMM = GaussianMixture.circle()


def _info(step=0):
    return StepInfo(step, ("student",), torch.Generator().manual_seed(0), torch.device("cpu"))


def test_grid_and_deltas_follow_the_papers_definition():
    assert time_grid(1000, 20) == list(range(49, 1000, 50)) and time_grid(1000, 1) == [999]
    sched = SCHEDULES["sd15"]()
    grid = torch.tensor([CLEAN, *time_grid(1000, 20)])
    method = BOOT(TeacherContext(analytic_teacher(GMM, sched), (2,)), BOOTConfig())
    (a_t, s_t), (a_s, s_s) = method.coefficients(grid[1:]), method.coefficients(grid[:-1])
    delta = signal_step(a_t, s_t, a_s, s_s)
    # For SD1.5 and N = 20 the deltas range 0.15..0.35 and the last interval (to clean) has delta = 1.
    assert delta[0] == 1 and 0.15 < delta[1:].min() and delta[1:].max() < 0.35
    # The clean end is alpha = 1, sigma = 0, not abar[0] = 0.99915.
    assert method.coefficients(torch.tensor([CLEAN])) == (
        torch.ones(1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
    )
    # A flow's noise end has alpha = 0: delta(T, s) = 1.
    flow = BOOT(TeacherContext(analytic_teacher(GMM, RectifiedFlowSchedule()), (2,)), BOOTConfig())
    (a, s), (a2, s2) = flow.coefficients(torch.tensor([999])), flow.coefficients(torch.tensor([949]))
    assert float(a) == 0 and float(signal_step(a, s, a2, s2)) == 1


@pytest.mark.parametrize("schedule", ["sd15", "flow"])
@pytest.mark.parametrize("boundary", ["paper", "exact"])
def test_signal_recursion_equals_x_space_ddim(schedule, boundary):
    """The y-recursion and an x-space DDIM loop agree to ~1e-12 (float64, analytic teacher)."""
    eps = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sched = SCHEDULES[schedule]()
    y, x = reference_trajectory(GMM, sched, eps, 20, boundary), ddim_trajectory(GMM, sched, eps, 20, boundary)
    assert (y - x).abs().max() < 1e-12


def test_b_exact_reference_is_the_stock_ddim_sampler_and_b_paper_differs_slightly():
    sched = SCHEDULES["sd15"]()
    eps = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    stock = ddim_sample(analytic_teacher(GMM, sched), eps, num_steps=20).double()  # trailing: 999, 949, ..., 49
    exact, paper = reference_trajectory(GMM, sched, eps, 20, "exact")[0], reference_trajectory(GMM, sched, eps, 20)[0]
    assert (exact - stock).abs().max() < 1e-4
    gap = (paper - exact).norm(dim=1).mean()
    assert 1e-3 < gap < 0.2  # B-paper's x_T is not eps: a few percent of the data scale at alpha_999 = 0.068


class _GarbageAtTop(ReferenceStudent):
    """The reference student except at T, where it is far off: B-exact must not read g(eps, T) at all."""

    def forward(self, eps, t, cond=None):
        out = super().forward(eps, t, cond)
        return torch.where((t == self.grid[-1])[:, None], torch.full_like(out, 1e3), out)


@pytest.mark.parametrize(
    "schedule,boundary", [("sd15", "paper"), ("sd15", "exact"), ("flow", "paper"), ("edm", "paper"), ("edm", "exact")]
)
def test_loss_self_test_reference_trajectory_gives_zero_loss(schedule, boundary):
    """The loss self-test: the reference trajectory in place of g makes L_BS and L_BC vanish; one level off does not.
    Under B-exact the student at T is replaced by garbage: the trajectory must start from x_T = noise regardless."""
    sched = KarrasSchedule() if schedule == "edm" else SCHEDULES[schedule]()
    student = _GarbageAtTop if boundary == "exact" else ReferenceStudent
    losses = {}
    for shift in (0, 1):
        method = BOOT(
            TeacherContext(analytic_teacher(GMM, sched), (2,)), BOOTConfig(train_batch_size=256, boundary=boundary)
        )
        method.attach({"student": student(GMM, sched, 20, boundary, shift)}, lambda m: m)
        torch.manual_seed(0)
        _, logs = method.loss("student", method.start_iteration(None, _info()))
        losses[shift] = logs
    assert losses[0]["loss_bs"] < 1e-12
    if boundary == "paper":
        assert losses[0]["loss_bc"] < 1e-12
    assert losses[1]["loss_bs"] > 1e-4


def test_bootstrap_loss_is_a_derivative_match():
    y_t, f, g_s = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    delta = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    loss = bootstrap_loss(g_s, bootstrap_target(y_t, f, delta), delta)
    derivative = ((g_s - y_t) / delta[:, None].float() - (f - y_t)).square().mean(1).mean()
    assert torch.allclose(loss, derivative, rtol=1e-5)


@pytest.mark.parametrize(
    "schedule,kind",
    [("vp", "epsilon"), ("vp", "v_prediction"), ("vp", "sample"), ("flow", "flow"), ("edm", "edm")],
)
def test_student_starts_at_the_teachers_boundary_exactly(schedule, kind):
    """With the teacher's weights, g(eps, T) = f(eps, T) for every parametrisation, and g at other
    times differs only through the timestep embedding."""
    sched = {"vp": DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear"), "flow": RectifiedFlowSchedule(),
             "edm": KarrasSchedule()}[schedule]  # fmt: skip
    torch.manual_seed(0)
    teacher = Denoiser(tiny_unet(), sched, kind).eval()
    method = BOOT(TeacherContext(teacher, (1, 8, 8)), BOOTConfig())
    eps = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        g_T = method.student(eps, torch.full((2,), 999))
        f_T = teacher(eps * sched.prior_std(999), torch.full((2,), 999))
        g_clean = method.student(eps, torch.full((2,), CLEAN))
    assert torch.equal(g_T, f_T) and not torch.allclose(g_T, g_clean)


def test_one_iteration_trains_only_the_student_through_g_at_s():
    sched = DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear")
    torch.manual_seed(0)
    teacher = Denoiser(tiny_unet(num_class_embeds=4), sched, "epsilon").eval()
    sampler = lambda n, device: Cond(class_labels=torch.randint(0, 3, (n,)))  # noqa: E731
    method = BOOT(TeacherContext(teacher, (1, 8, 8), cond_sampler=sampler, uncond=lambda c: Cond(class_labels=torch.full_like(c.class_labels, 3))), BOOTConfig(train_batch_size=4, guidance_scale=2.0))  # fmt: skip
    method.attach(method.models(), lambda m: m)
    torch.manual_seed(1)
    state = method.start_iteration(None, _info())
    assert not state["target"].requires_grad and state["boundary_x0"].shape == (4, 1, 8, 8)
    loss, logs = method.loss("student", state)
    loss.backward()
    assert set(logs) == {"loss_bs", "loss_bc"} and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_curriculum_opens_intervals_from_the_top():
    method = BOOT(
        TeacherContext(analytic_teacher(GMM, SCHEDULES["sd15"]()), (2,)),
        BOOTConfig(curriculum=True),
        max_train_steps=100,
    )
    lows = [method.lowest_interval(step) for step in (0, 9, 19, 50)]
    assert lows == [20, 11, 1, 1]
    assert BOOT(TeacherContext(method.teacher, (2,)), BOOTConfig(), max_train_steps=100).lowest_interval(0) == 1


@pytest.mark.parametrize(
    "config,teacher,message",
    [
        (BOOTConfig(grid_size=0), "sd15", "--grid_size 0 must lie within 1..1000"),
        (BOOTConfig(grid_size=1001), "sd15", "--grid_size 1001 must lie within 1..1000"),
        (BOOTConfig(), "noisy", "no usable clean end"),
        (BOOTConfig(param_timestep=999), "zero-snr", "alpha is 0 at timestep 999"),
        (BOOTConfig(boundary="both"), "sd15", "--boundary must be one of"),
        (BOOTConfig(guidance_scale=2.0), "sd15", "unconditional input"),
        (BOOTConfig(grid_size=667), "sd15", "--grid_size 667 puts a grid point at timestep 0.*at most 666"),
        (BOOTConfig(curriculum=True), "sd15", "--curriculum needs --max_train_steps"),
    ],
)
def test_bad_input_is_refused_in_one_sentence(config, teacher, message):
    abar = torch.cumprod(1 - torch.full((1000,), 0.01, dtype=torch.float64), 0)
    schedules = {
        "sd15": SCHEDULES["sd15"](),
        "noisy": DiscreteVPSchedule(abar * 0.4),  # even its least noisy timestep is mostly noise
        "zero-snr": DiscreteVPSchedule(torch.cat([abar[:-1], torch.zeros(1, dtype=torch.float64)])),
    }
    teacher = Denoiser(tiny_unet(), schedules[teacher], "epsilon")
    with pytest.raises(UserError, match=message) as err:
        BOOT(TeacherContext(teacher, (1, 8, 8)), config)
    assert "\n" not in str(err.value)


def _by_hand(net, z, labels, kind):
    """g(eps, clean) written out per parametrisation: the network told the clean end, converted at the noise end."""
    if kind == "epsilon":  # SD schedule, conversion at --param_timestep 399
        abar = DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear").alphas_cumprod[399]
        return (
            z.double() - (1 - abar).sqrt() * net(z, torch.zeros(3), class_labels=labels).sample.double()
        ) / abar.sqrt()
    if kind == "flow":  # alpha_T = 0, sigma_T = 1: x0 = z - v
        return z.double() - net(z, torch.zeros(3), class_labels=labels).sample.double()
    edm = KarrasSchedule()  # x = 80 z, D = c_skip x + c_out F(c_in x, c_noise(sigma_min))
    x, sd, sigma = 80 * z.double(), 0.5, 80.0
    c_skip, c_out, c_in = (
        sd**2 / (sigma**2 + sd**2),
        sigma * sd / (sigma**2 + sd**2) ** 0.5,
        1 / (sigma**2 + sd**2) ** 0.5,
    )
    noise = torch.full((3,), float(edm.sigmas[0].log() / 4))
    return c_skip * x + c_out * net((c_in * x).float(), noise, class_labels=labels).sample.double()


@pytest.mark.parametrize("kind", ["epsilon", "flow", "edm"])
def test_exported_pipeline_call_equals_g_at_the_clean_end_by_hand(kind, tmp_path):
    from onestep.pipelines.boot import BootPipeline

    torch.manual_seed(0)
    sched = {"epsilon": DiscreteVPSchedule.from_betas(0.00085, 0.012, "scaled_linear"), "flow": RectifiedFlowSchedule(),
             "edm": KarrasSchedule()}[kind]  # fmt: skip
    teacher = Denoiser(tiny_unet(num_class_embeds=4), sched, kind).eval()
    config = BOOTConfig(param_timestep=399 if kind == "epsilon" else None)
    method = BOOT(TeacherContext(teacher, (1, 8, 8), num_classes=3), config)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a trained student differs from the teacher
    method.export(method.models(), str(tmp_path), {"training_steps": 0})
    pipe = BootPipeline.from_pretrained(str(tmp_path))
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    images = pipe(class_labels=labels, latents=z, output_type="pt").images
    with torch.no_grad():
        by_hand = _by_hand(method.student.denoiser.net, z, labels, kind)
        g = method.student(z, torch.full((3,), CLEAN), Cond(class_labels=labels))
    assert torch.allclose(images, (by_hand.float() / 2 + 0.5).clamp(0, 1), atol=1e-5)
    assert torch.allclose(by_hand.float(), g, atol=1e-4 * max(1.0, float(by_hand.abs().max())))
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        pipe(class_labels=[0], num_inference_steps=4)
