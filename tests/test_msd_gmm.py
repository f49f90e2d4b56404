"""MSD's claim on the class-conditional Gaussian mixture (docs/methods/msd.md), at a budget that fits the
suite: with the same per-student batch and iterations, 4 students on contiguous class ranges end closer to the
mixture than one student for all 16 classes (eval/recipes/msd_gmm.py measures it at 3,000 iterations and more K)."""

import pytest
import torch

from onestep.denoiser import Cond
from onestep.generator import OneStepGenerator
from onestep.methods.msd import MSDConfig
from onestep.testing.msd_toy import ClassMixture, class_metrics, fit_teacher_net, single_thread, train_students


@pytest.fixture(scope="module")
def results():
    with single_thread():
        mixture = ClassMixture(16)
        net = fit_teacher_net(mixture, width=48, steps=1000)
        config = MSDConfig(
            learning_rate=1e-4, train_batch_size=128, ttur_ratio=5, gan=False, conditioning_timesteps=[399]
        )
        untrained = OneStepGenerator(net, [399])
        out = {"untrained": class_metrics(lambda z, c: untrained.sample(z, Cond(class_labels=c)), mixture, n=500)}
        for k in (1, 4):
            out[k] = class_metrics(train_students(mixture, net, k, config, 400).sample, mixture, n=500)
    return out


def test_four_students_beat_one_at_equal_per_student_batch(results):
    one, four = results[1], results[4]
    # Energy distance only: at the recipe's 3,000 iterations K = 4 also wins on ED (0.026 vs 0.036) but not on
    # modes covered (0.94 vs 1.31 of 4), so the test asserts the part of the claim that holds (README).
    assert four["energy_distance"] < 0.85 * one["energy_distance"]


def test_training_moves_every_student_towards_the_mixture(results):
    assert results[1]["energy_distance"] < results["untrained"]["energy_distance"]
    assert torch.isfinite(torch.tensor([results[4]["energy_distance"], results[4]["histogram_l1"]])).all()
