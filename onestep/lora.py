"""LoRA on the generator only (DMD2's published LoRA: rank 64, alpha 8, dropout 0; the critic is always
fully fine-tuned), through peft as diffusers' own LoRA training scripts do, so the adapter exports in the
format `pipe.load_lora_weights(...)` reads."""

from __future__ import annotations

from .errors import UserError

# Attention q/k/v/out, transformer proj_in/out and feed-forward, resnet convs and shortcut, the
# up/down-sampler convs, and the time-embedding projections.
DMD2_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def add_lora(unet, rank: int, alpha: float, targets=DMD2_LORA_TARGETS) -> dict:
    """Freeze `unet` and give it a trainable LoRA adapter (B = 0 at start, so it starts as the teacher).
    Returns the adapter's config as metadata for export."""
    from peft import LoraConfig

    names = {n for n, _ in unet.named_modules()}
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise UserError(f"The LoRA targets {', '.join(targets)} match no module of the generator's network.")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=list(targets)
    )
    unet.requires_grad_(False)
    unet.add_adapter(config)
    return config.to_dict()


def lora_state_dict(unet) -> dict:
    """The adapter weights in peft's key layout, which load_lora_weights reads as it is. Not converted with
    diffusers' convert_state_dict_to_diffusers: that renames only the attention projections (to the old
    `lora.down`/`lora.up` names), and a dict mixing both layouts loads without its attention layers."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def apply_lora(net, request, default_targets=DMD2_LORA_TARGETS) -> dict | None:
    """LoRA on a method's student network when the teacher context asks for it (`request`: a
    context.LoraRequest or None); returns the adapter's metadata for export, or None. Without targets in the
    request, an SD3 or Flux transformer takes the attention projections of both its streams, as diffusers' SD3 and
    Flux LoRA scripts adapt (the UNet list's resnet and sampler convs are not in it)."""
    if request is None:
        return None
    from .flow_teachers import FLOW_TRANSFORMERS, TRANSFORMER_LORA_TARGETS

    if type(net).__name__ in FLOW_TRANSFORMERS:
        default_targets = TRANSFORMER_LORA_TARGETS
    return add_lora(net, request.rank, request.alpha, request.targets or default_targets)
