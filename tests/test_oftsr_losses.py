"""OFTSR's unit identities on the conditional mixture with the exact teacher: with the exact
average-velocity map in place of the student, L_distill is ~0 (up to the RK2 step's error) and L_BC = 0; the
one-step estimate at t = 0 is the posterior mean."""

import pytest
import torch

from onestep.context import TeacherContext
from onestep.denoiser import Cond, Denoiser
from onestep.methods.oftsr import OFTSR, FlowVelocity, OFTSRConfig, start_state
from onestep.schedules import ConditionalFlowSchedule
from onestep.testing.sr_gmm import AnalyticFlowNet, ConditionalGMM, exact_average_velocity

SIGMA_P = 0.2


def _setup(**overrides):
    cgmm = ConditionalGMM.default()
    sched = ConditionalFlowSchedule(SIGMA_P)
    teacher = Denoiser(AnalyticFlowNet(cgmm, SIGMA_P), sched, "flow")
    method = OFTSR(TeacherContext(teacher, (8,)), OFTSRConfig(**overrides))
    g = torch.Generator().manual_seed(0)
    x1, u = cgmm.sample(64, g)
    return cgmm, method, x1.float(), u.float()


class _ExactMap(torch.nn.Module):
    """The student replaced by the exact average-velocity map of the teacher's ODE from x0."""

    def __init__(self, cgmm, ignore_t=False):
        super().__init__()
        self.cgmm, self.ignore_t = cgmm, ignore_t

    def forward(self, x0, u, t):
        t = torch.zeros_like(t) if self.ignore_t else t
        return exact_average_velocity(self.cgmm, x0, u, SIGMA_P, t, steps=150).float()


def test_distillation_loss_vanishes_for_the_exact_average_velocity_map():
    cgmm, method, x1, u = _setup()
    torch.manual_seed(1)
    _, logs = method.distillation_loss(_ExactMap(cgmm), method.teacher, x1, u)
    torch.manual_seed(1)  # the same draws with the map at t = 0 everywhere (the student at its initialisation)
    _, wrong = method.distillation_loss(_ExactMap(cgmm, ignore_t=True), method.teacher, x1, u)
    assert float(logs["loss_bc"]) < 1e-10  # V(0) = v*(x0, 0): the boundary term is exactly satisfied
    assert float(logs["loss_distill"]) < 1e-6 and float(wrong["loss_distill"]) > 1e2 * float(logs["loss_distill"])


def test_the_one_step_estimate_at_t0_is_the_posterior_mean():
    cgmm, method, x1, u = _setup()
    x0 = start_state(u, torch.randn_like(u), SIGMA_P)
    x = x0 + method.teacher(x0, u, torch.zeros(len(u)))
    assert torch.allclose(x.double(), cgmm.posterior_mean(u), atol=1e-5)


def test_velocity_sign_matches_the_schedules_flow_convention():
    """FlowVelocity's v = x1 - x0 and the Denoiser's x0-space view of the same network agree:
    x1_hat = x_t + (1 - tau) v at index i, tau = 1 - (i + 1) / T."""
    cgmm, method, x1, u = _setup()
    den = method.teacher.denoiser
    i = torch.full((len(u),), 499)
    tau = 1 - (i.double() + 1) / 1000
    x_t = den.schedule.add_noise(x1, torch.randn_like(x1), i, u)
    x1_hat = den(x_t, i, Cond(image=u))
    v = FlowVelocity(den)(x_t, u, tau.float())
    assert torch.allclose(x1_hat, x_t + (1 - tau.float()).unsqueeze(-1) * v, atol=1e-4)


class _RecordingStudent(torch.nn.Module):
    """A linear 'student' whose batched output (the t, s and t_bc queries stacked) keeps its gradient."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x0, u, t):
        self.out = self.w * x0 + (1 - self.w) * u + t[:, None]
        self.out.retain_grad()
        return self.out


def test_stop_gradients_sit_where_the_method_puts_them():
    """L_distill trains only v(s) (its target SG[v_t + (h/s)(v_bar - v_t)] and x_t carry no gradient),
    L_align only v(t), L_BC only v(t_bc)."""
    grads = {}
    for name, weights in {"distill": (0.0, 0.0), "align": (1.0, 0.0), "bc": (0.0, 1.0)}.items():
        cgmm, method, x1, u = _setup(align_weight=weights[0], bc_weight=weights[1])
        student = _RecordingStudent()
        torch.manual_seed(2)
        loss, _ = method.distillation_loss(student, method.teacher, x1, u)
        loss.backward()
        grads[name] = [g.abs().sum().item() for g in student.out.grad.chunk(3)]  # (t, s, t_bc)
    assert grads["distill"][0] == 0 and grads["distill"][1] > 0 and grads["distill"][2] == 0
    assert grads["align"][0] > 0 and grads["align"][1] == pytest.approx(grads["distill"][1])
    assert grads["bc"][2] > 0 and grads["bc"][0] == 0
