"""CLIP score with open_clip, with the protocol explicit.

DMD2 reports the raw cosine between the image and text embeddings of open_clip ViT-g-14
(laion2b_s12b_b42k), captions prefixed with "A photo depicts ", images centre-cropped and LANCZOS-
resized to 256 first (~0.3 scale). torchmetrics reports 100 * max(cosine, 0) instead (~30 scale).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from onestep.errors import UserError

from .sources import center_crop_resize

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_PRETRAINED = "laion2b_s12b_b42k"
DEFAULT_PREFIX = "A photo depicts "
SCALES = ("raw", "100")


@dataclass
class OpenClip:
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    model_name: str
    pretrained: str
    weights_sha256: str
    device: object

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, crop_size: int | None = None, normalize: bool = True) -> torch.Tensor:
        x = torch.stack([self.preprocess(center_crop_resize(im, crop_size)) for im in images]).to(self.device)
        emb = self.model.encode_image(x).float()
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        # open_clip's tokenizer truncates to the context length and keeps the end-of-text token last.
        tokens = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_open_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device="cpu",
    flags: tuple[str, str] = ("--model", "--pretrained"),
) -> OpenClip:
    """`model`: an open_clip name or a JSON model config file; `pretrained`: a tag, a local checkpoint
    file, or "none" (random weights: only for tests, the score then means nothing). flags: the command's
    options that set model and pretrained, named in the error messages (clip: --model/--pretrained;
    fid, kid, stats: --clip-model/--clip-pretrained)."""
    model_flag, pretrained_flag = flags
    import open_clip

    name = model
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise UserError(f"The open_clip model config {model} does not exist.")
        open_clip.add_model_config(model)
        name = os.path.splitext(os.path.basename(model))[0]
    if name not in open_clip.list_models():
        raise UserError(
            f"Unknown open_clip model {name!r}; pass {model_flag} with a name from open_clip.list_models() or a JSON config file."
        )
    tag = None if pretrained in (None, "", "none") else pretrained
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
    except Exception as err:  # open_clip raises RuntimeError/OSError/HF errors for missing weights
        reason = f"{err.__class__.__name__}: {str(err).splitlines()[0][:160]}" if str(err) else err.__class__.__name__
        if tag is None:
            raise UserError(f"Cannot build the open_clip model {name} ({reason}).") from None
        raise UserError(
            f"Cannot load open_clip weights {tag!r} for {name} ({reason}); they download on first use, "
            f"or pass {pretrained_flag} with a local checkpoint file."
        ) from None
    net.eval().requires_grad_(False)
    return OpenClip(
        net, preprocess, open_clip.get_tokenizer(name), name, tag or "none (random init)", _state_sha256(net), device
    )


def clip_scores(
    clip: OpenClip, images: np.ndarray, captions: list[str], prefix: str = DEFAULT_PREFIX, crop_size: int | None = 256
) -> np.ndarray:
    """Raw cosine per (image, caption) pair."""
    if len(images) != len(captions):
        raise UserError(f"{len(images)} images but {len(captions)} captions; they must pair one to one.")
    img = clip.encode_images(images, crop_size)
    txt = clip.encode_texts([prefix + c for c in captions])
    return (img * txt).sum(-1).double().cpu().numpy()


def scale_scores(cosines: np.ndarray, scale: str) -> np.ndarray:
    if scale == "raw":
        return cosines
    if scale == "100":
        return 100.0 * np.maximum(cosines, 0.0)
    raise UserError(f"Unknown CLIP score scale {scale!r}; choose raw or 100.")
