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


def test_the_gan_ablation_reads_ds_loss_at_the_end_of_a_run_and_pairs_the_arms_by_metric(tmp_path):
    from onestep.eval.recipes.tadsr_gan_ablation import LAST_ROWS, claims, final_discriminator_loss

    (tmp_path / "logs").mkdir()
    rows = ["step,loss_d,loss_reg"] + [f"{10 * i},{2.0 if i <= 5 else 1.5},0.1" for i in range(1, 5 + LAST_ROWS + 1)]
    (tmp_path / "logs" / "losses.csv").write_text("\n".join(rows) + "\n")
    assert final_discriminator_loss(str(tmp_path)) == pytest.approx(1.5)  # exactly the last LAST_ROWS rows count
    (tmp_path / "logs" / "losses.csv").write_text("step,loss_reg\n10,0.1\n")
    with pytest.raises(SystemExit, match="no loss_d"):
        final_discriminator_loss(str(tmp_path))
    with_d = [{"loss_d": 1.9, "sharpness": 0.6, "psnr_y": 25.0, "teacher_psnr_y": 33.0}] * 3
    without = [{"sharpness": 0.5, "psnr_y": 25.1, "teacher_psnr_y": 34.0}] * 3
    out = {c["claim"].split(":")[0]: c for c in claims(with_d, without)}
    assert out["D leaves chance in the full default run"]["values"] == [1.9] * 3
    sharper = out["D sharpens the student"]
    assert sharper["a"]["values"] == [0.6] * 3 and sharper["b"]["values"] == [0.5] * 3
    assert (
        not sharper["lower_is_better"]
        and out["D moves the student away from its teacher's samples"]["lower_is_better"]
    )
