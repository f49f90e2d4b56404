"""Typed options of the onestep-eval commands, one dataclass per argument group of cli.py.

The functions in commands.py take these (and plain keyword arguments for the rest); only cli.py sees the
parsed command line, and turns it into them. The defaults are the command line's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .clip import DEFAULT_MODEL, DEFAULT_PREFIX, DEFAULT_PRETRAINED


@dataclass
class SourceOptions:
    """What is evaluated: one of pipeline, teacher, images (fid and kid: or stats)."""

    pipeline: str | None = None  # a folder DiffusionPipeline.from_pretrained loads (ours included)
    teacher: str | None = None  # a teacher folder or "digits", sampled with DDIM (trailing spacing)
    images: str | None = None  # an image folder, evaluated as it is ("digits" for stats: the bundled set)
    stats: str | None = None  # a statistics .npz saved earlier (fid, kid)
    prompts: str | None = None  # text-to-image pipelines: a prompt file (.txt or .jsonl)
    # A class-conditional teacher without onestep.json (trained elsewhere): its class layout.
    num_classes: int | None = None  # the real classes (labels 0..num_classes-1 are sampled)
    null_class: int | None = None  # the unconditional class embedding, used for guidance


@dataclass
class SamplingOptions:
    """How generated images are drawn (see sources.py for the seed scheme)."""

    steps: int | None = None  # num_inference_steps (teacher: DDIM steps)
    guidance_scale: float | None = None
    num_samples: int | None = None
    batch_size: int = 64
    seed: int = 0
    class_sampling: str = "uniform"  # uniform: label i mod C; random: i.i.d. from the seed
    device: str | None = None  # None: the accelerate process's device, else cuda if available, else cpu
    dtype: str = "fp32"  # fp32, fp16 or bf16 (pipelines)
    trust_remote_code: bool = False  # allow a pipeline folder's own code to run


@dataclass
class FeatureOptions:
    """The feature extractor of fid, kid and stats."""

    features: str = "inception"  # inception, clip or digits
    mode: str = "clean"  # clean-fid's resize/weights mode (Inception)
    inception_weights: str | None = None
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    crop_size: int | None = None  # centre-crop and LANCZOS-resize every image to this size first; None or 0: off


@dataclass
class ReferenceOptions:
    """What fid and kid compare against: ref, or clean-fid's named statistics (ref_name)."""

    ref: str | None = None  # an image folder, a statistics .npz, or "digits"
    ref_name: str | None = None
    ref_split: str = "train"
    ref_res: int | None = None


@dataclass
class ClipOptions:
    """The CLIP model and scoring of clip."""

    model: str = DEFAULT_MODEL  # an open_clip model name or a JSON model config file
    pretrained: str = DEFAULT_PRETRAINED
    prefix: str = DEFAULT_PREFIX  # prepended to every caption
    scale: str = "raw"  # raw cosine, or "100": 100 * max(cos, 0)
    crop_size: int | None = 256  # centre-crop + LANCZOS resize before CLIP's preprocess; None or 0: off
