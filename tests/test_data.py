import pytest
import torch
from PIL import Image

from onestep.data import DatasetBatches, ImageFolder, TensorBatches, load_digits_images
from onestep.errors import UserError
from tests.helpers import save_hf_dataset


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


def test_hf_captions_take_the_first_of_a_list_and_refuse_missing_ones(tmp_path):
    from onestep.data import HFImageCaptions

    ds = HFImageCaptions(save_hf_dataset(tmp_path / "a", [["a cat", "a small cat"], ["a dog"]]), 8)
    assert ds.captions == ["a cat", "a dog"] and ds[1][0].shape == (3, 8, 8)
    with pytest.raises(UserError, match="Row 1 of dataset .* has no text caption"):
        HFImageCaptions(save_hf_dataset(tmp_path / "b", ["a cat", None]), 8)


def test_latent_cache_shards_are_encoded_once_split_across_ranks(tmp_path):
    """Rank r encodes shards r, r + P, ...; after the barrier every rank reads all of them."""
    from onestep.data import CaptionedLatentBatches, HFImageCaptions

    ds = HFImageCaptions(save_hf_dataset(tmp_path / "d", [f"c{i}" for i in range(5)]), 8)
    calls = {0: [], 1: []}

    def encoder(rank):
        def encode(images):
            calls[rank].append(len(images))
            return images[:, :1] * 2  # any deterministic function of the pixels

        return encode

    make = lambda rank, barrier: CaptionedLatentBatches(
        ds,
        2,
        0,
        encoder(rank),
        lambda t: None,
        cache_dir=str(tmp_path / "cache"),  # noqa: E731
        shard_size=2,
        rank=rank,
        world_size=2,
        barrier=barrier,
    )
    other = {}
    rank1 = make(
        1, barrier=lambda: other.setdefault(0, make(0, barrier=lambda: None))
    )  # rank 0 reaches the barrier too
    assert calls == {0: [2, 1], 1: [2]}  # shards 0 and 2 on rank 0, shard 1 on rank 1
    expected = torch.stack([ds[i][0] for i in range(5)])[:, :1] * 2
    assert torch.equal(rank1.latents, expected) and torch.equal(other[0].latents, expected)


def test_bad_hf_dataset_input_gives_one_sentence(tmp_path):
    from onestep.data import HFImageCaptions

    data = save_hf_dataset(tmp_path / "d", ["a cat", "a dog"])
    with pytest.raises(UserError, match="has no column 'caption'; its columns are image, text"):
        HFImageCaptions(data, 8, caption_column="caption")
    with pytest.raises(UserError, match=r"Cannot load dataset .*\(split 'validation'\): Unknown split"):
        HFImageCaptions(data, 8, split="validation")
