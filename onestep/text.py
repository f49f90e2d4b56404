"""Prompt encoding for Stable Diffusion teachers: SD1.5 (one CLIP text encoder) and SDXL (two, pooled
embeddings and added time ids), loaded from the teacher's diffusers folder.

The unconditional input follows DMD2's released code: SD1.5 encodes the empty prompt; SDXL uses zeros for both
the token embeddings and the pooled embedding (diffusers' `force_zeros_for_empty_prompt`).
"""

from __future__ import annotations

import os

import torch

from .denoiser import Cond
from .errors import UserError


class PromptEncoder:
    def __init__(self, tokenizers: list, encoders: list, sdxl: bool, resolution: int):
        self.tokenizers, self.encoders, self.sdxl, self.resolution = tokenizers, encoders, sdxl, resolution
        for enc in encoders:
            enc.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str, sdxl: bool, resolution: int, revision: str | None = None) -> PromptEncoder:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        names = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if sdxl else [])
        tokenizers, encoders = [], []
        for tok_name, enc_name in names:
            for sub in (tok_name, enc_name):
                if os.path.isdir(path) and not os.path.isdir(os.path.join(path, sub)):
                    raise UserError(
                        f"The teacher folder {path} has no {sub}/; a text-to-image teacher needs its tokenizer(s) and text encoder(s)."
                    )
            enc_cls = CLIPTextModelWithProjection if enc_name == "text_encoder_2" else CLIPTextModel
            try:
                tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder=tok_name, revision=revision))
                encoders.append(enc_cls.from_pretrained(path, subfolder=enc_name, revision=revision))
            except (OSError, ValueError) as err:
                raise UserError(
                    f"Cannot load {tok_name}/{enc_name} from {path}: {str(err).splitlines()[0][:160]}"
                ) from None
        return cls(tokenizers, encoders, sdxl, resolution)

    def to(self, device):
        for enc in self.encoders:
            enc.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        device = self.encoders[0].device
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            out = enc(ids.to(device), output_hidden_states=True)
            if self.sdxl:
                hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both
                pooled = out[0]  # text_embeds of the projection encoder (the last one)
            else:
                hidden.append(out.last_hidden_state)
        states = torch.cat(hidden, dim=-1)
        if not self.sdxl:
            return Cond(encoder_hidden_states=states)
        return Cond(encoder_hidden_states=states, text_embeds=pooled, time_ids=self.time_ids(len(prompts), device))

    def time_ids(self, n: int, device) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop top-left (0, 0), target size."""
        r = self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=device).expand(n, -1)

    def uncond(self, cond: Cond) -> Cond:
        n = cond.encoder_hidden_states.shape[0]
        if self.sdxl:
            return Cond(
                encoder_hidden_states=torch.zeros_like(cond.encoder_hidden_states),
                text_embeds=torch.zeros_like(cond.text_embeds),
                time_ids=cond.time_ids,
            )
        empty = self.encode([""])
        return Cond(encoder_hidden_states=empty.encoder_hidden_states.expand(n, -1, -1))
