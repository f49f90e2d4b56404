"""Where evaluated images come from: a pipeline folder, a teacher sampled with DDIM, or an image folder.

Seeds never depend on the number of processes or the batch size: image i is drawn from its own
torch.Generator seeded with sha256(seed, "sample", i), and its class label is fixed by i as well. The
work is split into batches of fixed content; with P processes, batch b runs on process b mod P and the
features are gathered back in batch order, so 1 and 2 processes give identical numbers.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from onestep.data import IMAGE_EXTENSIONS
from onestep.errors import UserError
from onestep.images import image_size, open_image
from onestep.utils import file_sha256, seed_for, to_uint8

SEED_SCHEME = "image i uses torch.Generator('cpu').manual_seed(sha256-seed(seed, 'sample', i)); independent of batch size and process count"


@dataclass
class SamplePlan:
    num_samples: int
    batch_size: int
    seed: int = 0
    class_sampling: str = "uniform"  # uniform: label i mod C (equal counts); random: i.i.d. from the seed
    num_classes: int | None = None

    def labels(self) -> np.ndarray | None:
        if not self.num_classes:
            return None
        if self.class_sampling == "uniform":
            return np.arange(self.num_samples) % self.num_classes
        if self.class_sampling == "random":
            return np.random.RandomState(seed_for(self.seed, "labels") % (2**32)).randint(
                0, self.num_classes, self.num_samples
            )
        raise UserError(f"Unknown class sampling {self.class_sampling!r}; choose uniform or random.")

    def batches(self) -> list[range]:
        return [
            range(s, min(s + self.batch_size, self.num_samples)) for s in range(0, self.num_samples, self.batch_size)
        ]

    def describe(self) -> dict:
        return {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "seed_scheme": SEED_SCHEME,
            "class_sampling": self.class_sampling if self.num_classes else "unconditional",
            "num_classes": self.num_classes,
        }


def generators(seed: int, indices) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_for(seed, "sample", int(i))) for i in indices]


def weights_sha256(folder: str) -> str:
    """One hash over every weight file in a model folder (relative path + content)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, folder).encode())
                h.update(file_sha256(path).encode())
    return h.hexdigest()


# --- pipeline folders ---------------------------------------------------------------------------------

GENERATION = "generation"
SUPER_RESOLUTION = "super-resolution"
# Pipeline classes whose kind is known from model_index.json alone (custom classes: from their call signature).
SUPER_RESOLUTION_CLASSES = {
    "SuperResolutionPipeline",
    "LatentSuperResolutionPipeline",
    "LDMSuperResolutionPipeline",
    "StableDiffusionUpscalePipeline",
    "StableDiffusionLatentUpscalePipeline",
}
GENERATION_CLASSES = {
    "OneStepPipeline",
    "MultiStudentPipeline",
    "BootPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "DDPMPipeline",
    "DDIMPipeline",
    "DiTPipeline",
    "LDMPipeline",
}


def _class_name(index: dict) -> str | None:
    name = index.get("_class_name")
    name = name[-1] if isinstance(name, list) and name else name
    return name if isinstance(name, str) else None


def kind_of_class(name: str | None) -> str | None:
    if name in SUPER_RESOLUTION_CLASSES:
        return SUPER_RESOLUTION
    if name in GENERATION_CLASSES:
        return GENERATION
    return None


def pipeline_kind(pipe) -> str:
    """super-resolution (the call takes a low-resolution image) or generation (noise, labels or prompts)."""
    known = kind_of_class(type(pipe).__name__)
    if known:
        return known
    params = inspect.signature(pipe.__call__).parameters
    conditioned = any(k in params for k in ("prompt", "class_labels", "batch_size", "num_images_per_prompt"))
    return SUPER_RESOLUTION if "image" in params and not conditioned else GENERATION


def wrong_kind(path: str, class_name: str, kind: str, command: str, flag: str = "--pipeline") -> UserError:
    """The one-sentence refusal of a pipeline of the other kind than `command` measures."""
    if kind == SUPER_RESOLUTION:
        return UserError(
            f"{flag} {path} is a super-resolution pipeline ({class_name}), which {command} cannot sample from noise; "
            f"measure it with onestep-eval sr (--pipeline with --lr and --hr) or time it with onestep-eval bench."
        )
    return UserError(
        f"{flag} {path} is a generation pipeline ({class_name}), not a super-resolution one; {command} upscales "
        f"low-resolution images, so measure this one with onestep-eval fid, kid or clip."
    )


def check_kind(path: str | None, expect: str, command: str, flag: str = "--pipeline") -> None:
    """Before anything loads: refuse a folder whose model_index.json names a pipeline class of the other kind
    (a custom class is checked by PipelineSampler once loaded)."""
    index_path = os.path.join(path or "", "model_index.json")
    if not path or not os.path.isfile(index_path):
        return  # load_pipeline says what is wrong with the folder
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError):
        return
    name = _class_name(index) if isinstance(index, dict) else None
    kind = kind_of_class(name)
    if kind and kind != expect:
        raise wrong_kind(path, name, kind, command, flag)


def resolve_sr_pipeline(name: str) -> str:
    """A bundled super-resolution teacher's name (sr-flow, sr-resshift) -> its folder; anything else as given."""
    from onestep.loading import BUNDLED_TEACHERS

    if name and not os.path.exists(name) and name.startswith("sr-") and name in BUNDLED_TEACHERS:
        return BUNDLED_TEACHERS[name]
    return name


def load_pipeline(path: str, device, dtype=None, trust_remote_code: bool = False):
    """Any folder DiffusionPipeline.from_pretrained loads. Our own OneStepPipeline, MultiStudentPipeline,
    SuperResolutionPipeline, LatentSuperResolutionPipeline and BootPipeline folders load with the installed class,
    so they need no --trust-remote-code."""
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise UserError(f"No pipeline folder at {path}.")
    if not os.path.isfile(index_path):
        raise UserError(f"{path} is not a diffusers pipeline folder (it has no model_index.json).")
    with open(index_path) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError:
            raise UserError(f"{index_path} is not valid JSON.") from None
    if not isinstance(index, dict):
        raise UserError(f"{index_path} is not a JSON object; is this a diffusers pipeline folder?")
    check_pipeline_folder(path, index)
    class_name = index.get("_class_name")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        if class_name == ["one_step", "OneStepPipeline"]:
            from onestep.pipelines import OneStepPipeline

            pipe = OneStepPipeline.from_pretrained(path, **kwargs)
        elif class_name == ["msd", "MultiStudentPipeline"]:
            from onestep.pipelines import MultiStudentPipeline

            pipe = MultiStudentPipeline.from_pretrained(path, **kwargs)
        elif class_name == ["super_resolution", "SuperResolutionPipeline"]:
            from onestep.pipelines import SuperResolutionPipeline

            pipe = SuperResolutionPipeline.from_pretrained(path, **kwargs)
        elif class_name == ["latent_super_resolution", "LatentSuperResolutionPipeline"]:
            from onestep.pipelines import LatentSuperResolutionPipeline

            pipe = LatentSuperResolutionPipeline.from_pretrained(path, **kwargs)
        elif class_name == ["boot", "BootPipeline"]:
            from onestep.pipelines.boot import BootPipeline

            pipe = BootPipeline.from_pretrained(path, **kwargs)
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as err:
        hint = (
            " (its pipeline class is custom code: pass --trust-remote-code if you trust it)"
            if isinstance(class_name, list) and not trust_remote_code
            else ""
        )
        raise UserError(f"Cannot load the pipeline at {path}{hint}: {str(err).splitlines()[0][:200]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_pipeline_folder(path: str, index: dict) -> None:
    """Before loading: every component folder model_index.json names is there, and so is the .py file of a
    custom pipeline class ([file, class]); what is missing is named in one sentence (diffusers' own errors
    name the root folder, or fail with a TypeError)."""
    missing = []
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2):
            continue
        if value[0] is not None and value[1] is not None and not os.path.isdir(os.path.join(path, name)):
            missing.append(f"{name}/ (the {value[1]} component model_index.json names)")
    class_name = index.get("_class_name")
    if isinstance(class_name, list) and len(class_name) == 2 and isinstance(class_name[0], str):
        module = class_name[0] if class_name[0].endswith(".py") else class_name[0] + ".py"
        if not os.path.isfile(os.path.join(path, module)):
            missing.append(f"{module} (the file of its pipeline class {class_name[1]})")
    if missing:
        raise UserError(
            f"The pipeline folder {path} is incomplete: it has no {' and no '.join(missing)}; "
            f"re-export the folder or restore what is missing."
        )


class PipelineSampler:
    """Calls a diffusers pipeline with per-image generators and whatever conditioning it takes."""

    def __init__(
        self,
        path: str,
        device,
        steps: int | None = None,
        guidance_scale: float | None = None,
        dtype=None,
        trust_remote_code: bool = False,
        expect: str | None = None,
        command: str = "this command",
        flag: str = "--pipeline",
    ):
        """expect: the kind `command` measures (GENERATION or SUPER_RESOLUTION); a pipeline of the other kind is
        refused in one sentence naming `flag`."""
        self.path, self.steps, self.guidance_scale = path, steps, guidance_scale
        if expect:
            check_kind(path, expect, command, flag)
        self.pipe = load_pipeline(path, device, dtype, trust_remote_code)
        self.kind = pipeline_kind(self.pipe)
        if expect and self.kind != expect:
            raise wrong_kind(path, type(self.pipe).__name__, self.kind, command, flag)
        self.params = inspect.signature(self.pipe.__call__).parameters
        cfg = self.pipe.config
        self.num_classes = cfg.get("num_classes") if "class_labels" in self.params else None
        if self.num_classes is None and "class_labels" in self.params and hasattr(self.pipe, "transformer"):
            self.num_classes = getattr(self.pipe.transformer.config, "num_embeds_ada_norm", None)  # DiT
        self.takes_prompt = "prompt" in self.params

    def describe(self) -> dict:
        return {
            "kind": "pipeline",
            "path": os.path.abspath(self.path),
            "class": type(self.pipe).__name__,
            "dtype": str(self.pipe.dtype),
            "weights_sha256": weights_sha256(self.path),
            "num_inference_steps": self.steps or "pipeline default",
            "guidance_scale": self.guidance_scale,
        }

    def __call__(self, indices, seed: int, labels=None, prompts=None) -> np.ndarray:
        kwargs = {"generator": generators(seed, indices), "output_type": "np"}
        if prompts is not None:
            if not self.takes_prompt:
                raise UserError(
                    f"The pipeline {type(self.pipe).__name__} takes no prompt; --prompts needs a text-to-image pipeline."
                )
            kwargs["prompt"] = list(prompts)
        elif labels is not None:
            kwargs["class_labels"] = [int(c) for c in labels]
        elif "batch_size" in self.params:
            kwargs["batch_size"] = len(indices)
        elif "num_images_per_prompt" in self.params:
            raise UserError(f"{type(self.pipe).__name__} is a text-to-image pipeline; pass --prompts FILE.")
        if self.steps is not None:
            kwargs["num_inference_steps"] = self.steps
        if self.guidance_scale is not None and "guidance_scale" in self.params:
            kwargs["guidance_scale"] = self.guidance_scale
        return to_uint8(self.pipe(**kwargs).images, (0, 1), "auto")  # np/pt in [0, 1], NHWC or NCHW, or PIL


class TeacherSampler:
    """A teacher folder (or "digits") sampled with deterministic DDIM, trailing spacing.

    A class-conditional teacher's class layout comes from its onestep.json (teachers made here), or from
    num_classes / null_class (--num-classes / --null-class), which take precedence; a UNet with class
    embeddings and neither is refused rather than guessed."""

    def __init__(
        self,
        name: str,
        steps: int,
        device,
        guidance_scale: float = 1.0,
        num_classes: int | None = None,
        null_class: int | None = None,
    ):
        from onestep.loading import load_teacher, read_class_info

        self.name, self.steps, self.guidance_scale, self.device = name, steps, guidance_scale, device
        refuse_super_resolution_teacher(name)
        self.teacher = load_teacher(name)
        if self.teacher.unet_class != "UNet2DModel":
            raise UserError(
                "Teacher sampling here covers pixel-space UNet2DModel teachers; export text-to-image teachers as a pipeline and pass --pipeline."
            )
        self.info, self.class_info_from = self._class_info(
            read_class_info(name, self.teacher.unet_config), num_classes, null_class
        )
        self.num_classes = self.info.get("num_classes")
        if self.num_classes and self.guidance_scale != 1.0 and self.info.get("null_class") is None:
            raise UserError(
                "This teacher has no null class, so it cannot be sampled with guidance; pass --null-class if it has one, or use --guidance-scale 1."
            )
        self.teacher.denoiser.to(device)

    def _class_info(self, recorded: dict, num_classes: int | None, null_class: int | None) -> tuple[dict, str | None]:
        embeds = self.teacher.unet_config.get("num_class_embeds")
        given = num_classes is not None or null_class is not None
        if not embeds:
            if given:
                raise UserError(
                    f"The teacher {self.name} is unconditional (its UNet has no class embeddings); drop --num-classes and --null-class."
                )
            return {}, None
        info = dict(recorded)
        if num_classes is not None:
            info["num_classes"] = num_classes
        if null_class is not None:
            info["null_class"] = null_class
        if not info.get("num_classes"):
            raise UserError(
                f"The teacher {self.name} is class-conditional (its UNet embeds {embeds} classes) but has no "
                f"onestep.json saying how many are real classes; pass --num-classes (and --null-class for guidance)."
            )
        n, null = int(info["num_classes"]), info.get("null_class")
        if n > embeds:
            raise UserError(f"--num-classes {n} is more than the {embeds} classes the teacher's UNet embeds.")
        if null is not None and not 0 <= int(null) < embeds:
            raise UserError(
                f"--null-class {null} is not one of the teacher's {embeds} class embeddings (0..{embeds - 1})."
            )
        return info, ("--num-classes/--null-class" if given else "onestep.json")

    def describe(self) -> dict:
        from onestep.loading import resolve_teacher_path

        path = resolve_teacher_path(self.name)
        out = {
            "kind": "teacher",
            "path": os.path.abspath(path),
            "weights_sha256": weights_sha256(path),
            "sampler": "DDIM eta=0, trailing spacing",
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.num_classes:
            out.update(
                num_classes=self.num_classes,
                null_class=self.info.get("null_class"),
                class_layout_from=self.class_info_from,
            )
        return out

    @torch.no_grad()
    def __call__(self, indices, seed: int, labels=None, prompts=None) -> np.ndarray:
        from onestep.denoiser import Cond
        from onestep.sampling import ddim_sample

        cfg = self.teacher.unet_config
        size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
        z = torch.cat(
            [torch.randn(1, cfg["in_channels"], size, size, generator=g) for g in generators(seed, indices)]
        ).to(self.device)
        cond = uncond = None
        if labels is not None:
            cond = Cond(class_labels=torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device))
            null = self.info.get("null_class")
            if self.guidance_scale != 1.0:  # null is set: checked in __init__
                uncond = Cond(class_labels=torch.full((len(indices),), null, dtype=torch.long, device=self.device))
        x0 = ddim_sample(self.teacher.denoiser, z, cond, self.steps, self.guidance_scale, uncond)
        return to_uint8(x0)


def refuse_super_resolution_teacher(name: str) -> None:
    """An SR teacher folder loads as a UNet2DModel teacher too, but sampling it from noise alone means nothing."""
    from onestep.loading import resolve_teacher_path

    index_path = os.path.join(resolve_teacher_path(name), "model_index.json")
    if not os.path.isfile(index_path):
        return
    try:
        with open(index_path) as f:
            class_name = _class_name(json.load(f))
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    if kind_of_class(class_name) == SUPER_RESOLUTION:
        raise UserError(
            f"--teacher {name} is a super-resolution teacher ({class_name}), which cannot be sampled from noise; "
            f"measure it with onestep-eval sr --pipeline {name}, or time it with onestep-eval bench beside an SR student."
        )


# --- super-resolution calls -----------------------------------------------------------------------------------

CROP_SCHEME = (
    "crop k of an image: top/left drawn by numpy RandomState(sha256-seed(seed, 'crop', image name)) on the LR grid "
    "(multiples of the scale); pipeline noise of image i, crop k: generator index i * crops_per_image + k"
)


def input_channels(pipe) -> int:
    """The channels a super-resolution pipeline reads: 1 (grey) or 3. Ours say it in the UNet's input width
    ([x, u] on the channels); other pipelines are taken as colour."""
    if type(pipe).__name__ == "SuperResolutionPipeline":
        return 1 if pipe.unet.config.in_channels // 2 == 1 else 3
    return 3


def sr_input_size(pipe) -> int | None:
    """The low-resolution side a super-resolution pipeline takes in one tile (its training size over the
    scale), or None when the pipeline does not say."""
    cfg = pipe.config
    tile, scale = cfg.get("tile_size"), cfg.get("upscale_factor")
    if not tile or not scale:
        return None
    if type(pipe).__name__ == "LatentSuperResolutionPipeline":
        tile = tile * pipe.latent_factor  # tiles are latent pixels there
    return max(int(tile) // int(scale), 2)


def sr_default_steps(pipe) -> int | None:
    """How many network passes an SR pipeline takes when called without num_inference_steps (None: unknown)."""
    cfg = pipe.config
    if type(pipe).__name__ != "SuperResolutionPipeline":
        return None
    if cfg.get("mode") != "sampler":
        return 1
    return cfg.get("num_inference_steps") or len(pipe._tables()[0])


class SuperResolutionRunner:
    """Calls a super-resolution pipeline on uint8 low-resolution images with the per-image seed scheme (image i
    of seed s: generator index i), at `steps` (None: its default) and its knob `t` (None: its default)."""

    def __init__(self, sampler: PipelineSampler, steps: int | None = None, t: float | None = None, cache=None):
        self.sampler, self.steps, self.t = sampler, steps, t
        self.channels = input_channels(sampler.pipe)
        self.cache = cache  # a dict shared between runs (recipes): the same call is computed once (output, seconds)
        self.seconds, self.images = 0.0, 0

    def describe(self) -> dict:
        return {**self.sampler.describe(), "num_inference_steps": self.steps or "pipeline default", "t": self.t}

    def _key(self, low: np.ndarray, seed: int, index: int):
        digest = hashlib.sha256(low.tobytes() + repr(low.shape).encode()).hexdigest()
        return (os.path.abspath(self.sampler.path), self.steps, self.t, seed, index, digest)

    def __call__(self, lows: list[np.ndarray], seed: int, indices, what: str = "its input") -> np.ndarray:
        """uint8 (N, H, W, C) outputs of uint8 (h, w, C) inputs; `what` names the input in a refusal."""
        import time

        keys = [self._key(low, seed, i) for low, i in zip(lows, indices)] if self.cache is not None else None
        if keys and all(k in self.cache for k in keys):
            # A cached output counts the time it took when it was made, so images/s stays the pipeline's own.
            self.seconds += sum(self.cache[k][1] for k in keys)
            self.images += len(keys)
            return np.stack([self.cache[k][0] for k in keys])
        images = [Image.fromarray(low[..., 0] if low.shape[-1] == 1 else low) for low in lows]
        images = [im.convert("L" if self.channels == 1 else "RGB") for im in images]
        gens = generators(seed, indices)
        kwargs = {
            "image": images[0] if len(images) == 1 else images,
            "generator": gens[0] if len(gens) == 1 else gens,
            "output_type": "np",
        }
        if self.steps:
            kwargs["num_inference_steps"] = self.steps
        if self.t is not None:
            kwargs["t"] = self.t
        start = time.perf_counter()
        try:
            out = to_uint8(self.sampler.pipe(**kwargs).images, (0, 1), "auto")  # pipeline output: [0, 1]
        except ValueError as err:  # the pipeline refuses the input or the knob in one sentence
            raise UserError(f"{self.sampler.path} refused {what}: {err}") from None
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.images += len(lows)
        if keys:
            self.cache.update((k, (o, seconds / len(keys))) for k, o in zip(keys, out))
        return out


def image_channels(path: str) -> int:
    """1 for a grey file (L, LA, 1, I, I;16, F), 3 otherwise; from the header only."""
    image_size(path)  # an unreadable file: the reader's one-sentence error
    with Image.open(path) as img:
        mode = img.mode
    return 1 if mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16") else 3


def crop_boxes(name: str, size: tuple[int, int], crop: int, count: int, seed: int, align: int = 1) -> list:
    """`count` (top, left) corners of crop x crop windows inside an image of size (width, height), on multiples of
    `align` (the LR grid), fixed by (seed, image name) alone (CROP_SCHEME)."""
    w, h = size
    rng = np.random.RandomState(seed_for(seed, "crop", name) % (2**32))
    tops = rng.randint(0, (h - crop) // align + 1, count) * align
    lefts = rng.randint(0, (w - crop) // align + 1, count) * align
    return [(int(t), int(left)) for t, left in zip(tops, lefts)]


def bundled_low_resolution(side: int, scale: int, channels: int = 3) -> tuple[np.ndarray, dict]:
    """A held-out bundled photograph's centre crop of side * scale pixels, degraded to side x side by the training
    degradation (bicubic, antialiased) and rounded to 8 bits; with how it was made."""
    from onestep.data import degrade
    from onestep.sr_data import EVAL_IMAGES, natural_image

    name = EVAL_IMAGES[0]
    photo = natural_image(name)
    h, w = photo.shape[:2]
    hr_side = min(side * scale, h // scale * scale, w // scale * scale)
    top, left = (h - hr_side) // 2, (w - hr_side) // 2
    hr = torch.from_numpy(np.ascontiguousarray(photo[top : top + hr_side, left : left + hr_side])).float()
    lr = degrade(hr.permute(2, 0, 1)[None] / 127.5 - 1, scale)[0]
    low = ((lr.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    if channels == 1:
        low = np.asarray(Image.fromarray(low).convert("L"))[..., None]
    return low, {
        "kind": "bundled held-out photograph",
        "name": name,
        "hr_crop": f"centre {hr_side}x{hr_side}",
        "degradation": f"bicubic antialiased /{scale}, rounded to 8 bits",
        "size": f"{low.shape[1]}x{low.shape[0]}",
    }


# --- image folders ------------------------------------------------------------------------------------


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"The image folder {folder} does not exist.")
    files = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise UserError(f"The image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) through onestep.images.open_image, the reader training uses too: fully decoded,
    16-bit images scaled by their full range, transparency composited over white."""
    return np.asarray(open_image(path, 3))


def read_images(files: list[str], crop_size: int = 0) -> np.ndarray:
    """Decoded images stacked (N, H, W, 3). Without crop_size callers check sizes up front with
    check_same_size; with it every image is centre-cropped and LANCZOS-resized to crop_size first."""
    if crop_size:
        return np.stack([np.asarray(center_crop_resize(read_image(p), crop_size)) for p in files])
    return np.stack([read_image(p) for p in files])


def center_crop_resize(image: np.ndarray, size: int | None) -> Image.Image:
    """uint8 (H, W, 3) -> PIL, centre-cropped to a square and LANCZOS-resized to size (None: as is)."""
    pil = Image.fromarray(image)
    if size:
        w, h = pil.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        pil = pil.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)
    return pil


def check_same_size(files: list[str]) -> None:
    """Every image the same size, read from the headers only (before any batch is decoded)."""
    first = None
    for path in files:
        size = image_size(path)
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise UserError(
                f"The images have mixed sizes ({first[0]} is {first[1][0]}x{first[1][1]}, {path} is "
                f"{size[0]}x{size[1]}); resize them to one size first."
            )


def digits_reference_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits at 16x16 as uint8 (N, 16, 16, 1), the bundled default's training set."""
    from onestep.data import load_digits_images

    x, y = load_digits_images(16)
    return to_uint8(x), y.numpy()  # x: float32 in [-1, 1]


# --- processes ----------------------------------------------------------------------------------------


def run_sharded(plan_batches: list, work, state=None) -> list:
    """work(batch) for the batches of this process (b mod P); every process gets all results in order."""
    if state is None or state.num_processes == 1:
        return [work(b) for b in plan_batches]
    from accelerate.utils import gather_object

    mine = [(i, work(b)) for i, b in enumerate(plan_batches) if i % state.num_processes == state.process_index]
    gathered = gather_object([mine])
    results = dict(pair for part in gathered for pair in part)
    return [results[i] for i in range(len(plan_batches))]
