"""The arithmetic of the recipes that turn evaluation records into figures."""

import pytest

from onestep.eval.recipes.oftsr_knob import knob_points


def test_knob_points_average_crops_per_seed_then_images_then_seeds():
    rows = [
        {"image": "a", "seed": 0, "psnr_y": 20.0, "sharpness": 0.5},
        {"image": "a", "seed": 0, "psnr_y": 22.0, "sharpness": 0.7},  # a second crop of the same image and seed
        {"image": "b", "seed": 0, "psnr_y": 30.0, "sharpness": 1.0},
        {"image": "a", "seed": 1, "psnr_y": 23.0, "sharpness": 0.6},
        {"image": "b", "seed": 1, "psnr_y": 31.0, "sharpness": 1.2},
    ]
    out = knob_points(rows, [0, 1])
    # seed 0: a = 21, b = 30 -> 25.5; seed 1: a = 23, b = 31 -> 27
    assert out["psnr_y"]["mean"] == pytest.approx(26.25)
    assert out["psnr_y"]["std"] == pytest.approx(((25.5 - 26.25) ** 2 + (27 - 26.25) ** 2) ** 0.5)
    assert out["psnr_y"]["per_image"] == {"a": pytest.approx(22.0), "b": pytest.approx(30.5)}
    assert out["sharpness"]["per_image"]["b"] == pytest.approx(1.1)
    assert knob_points(rows[:3], [0])["psnr_y"]["std"] is None
