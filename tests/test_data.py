import torch
from PIL import Image

from onestep.data import DatasetBatches, ImageFolder, TensorBatches, load_digits_images


def test_digits_are_16x16_in_minus_one_to_one_with_ten_classes():
    x, y = load_digits_images(16)
    assert x.shape == (1797, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))


def test_batches_depend_only_on_step_so_a_resumed_loader_replays_them(tmp_path):
    for c in ("0", "2", "10"):  # numeric class folders are ordered as numbers
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("L", (12, 10), color=int(c) * 20 + i).save(tmp_path / c / f"{i}.png")
    ds = ImageFolder(str(tmp_path), resolution=8, channels=1, class_folders=True)
    assert ds.class_names == ["0", "2", "10"]
    run = DatasetBatches(ds, batch_size=4, seed=1, micro_steps=2)
    straight = [run.batch(s, m, 0, "cpu") for s in range(3) for m in range(2)]
    resumed = DatasetBatches(ds, batch_size=4, seed=1, micro_steps=2)
    again = [resumed.batch(s, m, 0, "cpu") for s in range(1, 3) for m in range(2)]
    for a, b in zip(straight[2:], again):
        assert torch.equal(a.images, b.images) and torch.equal(a.cond.class_labels, b.cond.class_labels)
    assert straight[0].images.shape == (4, 1, 8, 8)
    # In-memory batches follow the same rule; different ranks draw different batches.
    x, y = load_digits_images(8)
    tb = TensorBatches(x, y, 8, seed=1)
    assert torch.equal(tb.batch(5, 0, 0, "cpu").images, tb.batch(5, 0, 0, "cpu").images)
    assert not torch.equal(tb.batch(5, 0, 0, "cpu").images, tb.batch(5, 0, 1, "cpu").images)
