"""Tiny models built in code for the tests (nothing is downloaded)."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_unet(num_class_embeds=None, sample_size=8, channels=1, in_channels=None, widths=(8, 16), norm_num_groups=4):
    """A tiny UNet2DModel; `in_channels` > `channels` makes an SR-shaped one (x_t and u on the input channels)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels or channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
        norm_num_groups=norm_num_groups,
    )


def tiny_cond_unet(sdxl=False):
    from onestep.testing.tiny_sd import tiny_cond_unet as build

    return build(cross_attention_dim=12, pooled_dim=8 if sdxl else None)


def sd_scheduler_config(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    s = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )
    return dict(s.config, _class_name="DDPMScheduler")


def save_tiny_teacher(path, num_classes=3, null_class=3):
    """A diffusers teacher folder with a random tiny class-conditional UNet (loads through load_teacher)."""
    from onestep.export import save_teacher

    torch.manual_seed(0)
    unet = tiny_unet(num_class_embeds=num_classes + 1)
    save_teacher(
        unet, sd_scheduler_config(), path, {"note": "test"}, {"num_classes": num_classes, "null_class": null_class}
    )
    return path


def run(cmd, env=None, timeout=600, cwd=ROOT):
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


PY = sys.executable


def save_hf_dataset(root, captions, caption_column="text", sizes=None):
    """A Hugging Face dataset on disk (one parquet file, image + caption columns): load_dataset reads the
    folder as it would a hub id. Images are random, of the given (width, height) sizes."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    sizes = sizes or [(22, 18)] * len(captions)
    images = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    ds = datasets.Dataset.from_dict({"image": images, caption_column: captions})
    os.makedirs(os.path.join(root, "data"))
    ds.to_parquet(os.path.join(root, "data", "train-00000-of-00001.parquet"))
    return str(root)


def check_model_card(folder, method=None, pipeline_tag="unconditional-image-generation", rows=("teacher",)):
    """An exported folder's README.md is the Hub's YAML front matter, then a Markdown card: returns (header, body)
    after checking the header's fields (library, task, tags) and that the body names each of `rows`."""
    import yaml

    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\n"), "the card must start with YAML front matter"
    header_text, body = text[4:].split("\n---\n", 1)
    header = yaml.safe_load(header_text)
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == pipeline_tag
    assert "onestep" in header["tags"]
    if method is not None:
        assert method in header["tags"] and "one-step" in header["tags"]
    assert body.lstrip().startswith("# ") and "## Loading" in body
    for row in rows:
        assert f"| {row} |" in body, row
    return header, body
