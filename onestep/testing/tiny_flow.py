"""Tiny Stable Diffusion 3 and Flux pipelines built in code (no download), saved with save_pretrained.

Each has the layout of the real model: SD3 reads two CLIP text encoders with projection and a T5 encoder, Flux
one CLIP encoder (pooled output) and T5, and both a 16-channel autoencoder. The CLIP tokenizer is the real BPE
tokenizer (see tiny_sd.py); the T5 tokenizer is a small Unigram vocabulary built here (lower-case letters, digits,
punctuation and a few whole words), saved as a tokenizer.json that T5TokenizerFast loads. Every network is tiny
and randomly initialised: 16x16 images, 8x8 latents (autoencoder factor 2).
"""

from __future__ import annotations

import os
import string

import torch

from .tiny_sd import clip_tokenizer, tiny_text_encoder

T5_WIDTH = 24  # wider than the two CLIP encoders together (8 + 12), as SD3's T5 is (4096 > 768 + 1280)
T5_WORDS = "a the of on in and with photo cat dog dogs red blue car street grass two tree house".split()


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -4.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab += [("\u2581" + c, -4.5) for c in string.ascii_lowercase]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
    )
    return T5EncoderModel(cfg)


def _vae(scaling_factor: float, shift_factor: float):
    """16 latent channels and a shift factor, as the SD3 and Flux autoencoders (their real factors)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_transformer(seed: int = 0):
    """SD3Transformer2DModel: 2 joint blocks, width 16, 8x8 latents in 2x2 patches, T5 width context, pooled 8 + 12."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=16,
        pooled_projection_dim=8 + 12,
        pos_embed_max_size=16,
    )


def tiny_flux_transformer(seed: int = 0):
    """FluxTransformer2DModel (guidance-distilled, as FLUX.1-dev): 1 double and 1 single block, width 16, packed
    2x2 latent patches (64 = 16 channels x 4), T5 width context, CLIP (8 wide) pooled projection."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def save_tiny_sd3(path: str, seed: int = 0) -> str:
    """StableDiffusion3Pipeline layout with SD3's scheduler (FlowMatchEulerDiscreteScheduler, static shift 3.0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = tiny_sd3_transformer(seed)
    clip_tok = clip_tokenizer(os.path.join(path, ".tok"))
    t5_tok = _t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(1.5305, 0.0609),
        text_encoder=tiny_text_encoder(8, projection=True),
        tokenizer=clip_tok,
        text_encoder_2=tiny_text_encoder(12, projection=True),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5_encoder(len(t5_tok)),
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_flux(path: str, seed: int = 0) -> str:
    """FluxPipeline layout with FLUX.1-dev's scheduler (dynamic, resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux_transformer(seed)
    t5_tok = _t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(0.3611, 0.1159),
        text_encoder=tiny_text_encoder(8),
        tokenizer=clip_tokenizer(os.path.join(path, ".tok")),
        text_encoder_2=_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
    )
    pipe.save_pretrained(path)
    return path
