"""Tiny Stable-Diffusion-shaped pipelines built in code (no download), saved with save_pretrained.

The tokenizer is the real CLIP BPE tokenizer, rebuilt from the vocabulary file that open_clip ships,
so prompts tokenise exactly as with SD's own tokenizer; every network is tiny and randomly initialised.
"""

from __future__ import annotations

import gzip
import json
import os

import torch


def clip_tokenizer_files(folder: str) -> str:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, from open_clip's bundled BPE file."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    clip_tokenizer_files(folder)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def tiny_text_encoder(hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_cond_unet(cross_attention_dim: int = 12, pooled_dim: int | None = None):
    """A tiny UNet2DConditionModel (8x8 latents, 4 channels); with `pooled_dim`, SDXL's added conditions
    (pooled text embeddings of that width and 6 time ids)."""
    from diffusers import UNet2DConditionModel

    sdxl = {}
    if pooled_dim is not None:
        sdxl = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=pooled_dim + 6 * 4,
        )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
        **sdxl,
    )


def save_tiny_sd15(path: str, seed: int = 0) -> str:
    """SD1.5 layout: one CLIP text encoder (width 12), VAE with factor 2, 16x16 images, 8x8 latents."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = tiny_cond_unet(cross_attention_dim=12)
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=tiny_text_encoder(12),
        tokenizer=clip_tokenizer(os.path.join(path, ".tok")),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_sdxl(path: str, seed: int = 0) -> str:
    """SDXL layout: two text encoders (8 + 12 wide, the second with projection), pooled embeds, time ids."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = tiny_cond_unet(cross_attention_dim=20, pooled_dim=12)
    tok = clip_tokenizer(os.path.join(path, ".tok"))
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=tiny_text_encoder(8),
        text_encoder_2=tiny_text_encoder(12, projection=True),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=_scheduler(),
    )
    pipe.save_pretrained(path)
    return path
