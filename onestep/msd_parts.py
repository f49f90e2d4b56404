"""What MSD's students share out (docs/methods/msd.md): the condition space of the teacher (its classes or its
prompts), the run's router, each student's part (its conditions, and the real data filtered to them), the stages of
one student and the smaller student network. The recipe that runs them is in onestep/presets/msd.py."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, replace

import torch

from .config import RunConfig
from .data import CaptionedLatentBatches, DatasetBatches, TensorBatches, read_prompts
from .denoiser import Cond
from .errors import UserError
from .loading import check_converted_teacher, read_class_info, resolve_teacher_path
from .methods.msd import MSDConfig
from .router import (
    ROUTER_FILE,
    check_router_fits,
    check_text_fit,
    class_parts,
    fit_class_range,
    fit_prompt_router,
    load_router,
    route_prompts,
)


@dataclass
class ConditionSpace:
    """What the students share out: a class-conditional teacher's classes or a text teacher's prompts."""

    kind: str  # "class" or "text"
    teacher_path: str
    num_classes: int | None = None
    prompts: list[str] | None = None
    text_dim: int | None = None
    sdxl: bool = False


def condition_space(config: RunConfig) -> ConditionSpace:
    """Read from the teacher's config files only (nothing loaded or written yet)."""
    tc = config.teacher
    check_converted_teacher(tc.pretrained_model_name_or_path)
    path = resolve_teacher_path(tc.pretrained_model_name_or_path)
    if not os.path.isdir(path):
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise UserError(f"Teacher {path} is neither an existing diffusers folder nor a hub id (owner/name).")
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=tc.revision)
    unet_cfg = read_json(os.path.join(path, "unet", "config.json"), f"{path} is not a diffusers teacher folder")
    _check_sampleable(path)
    if unet_cfg.get("_class_name") == "UNet2DConditionModel":
        if not tc.prompt_file:
            raise UserError("Text-to-image teachers need --prompt_file (the prompts the students share out).")
        enc = read_json(os.path.join(path, "text_encoder", "config.json"), f"{path} has no text_encoder/")
        sdxl = unet_cfg.get("addition_embed_type") == "text_time"
        return ConditionSpace(
            "text", path, prompts=read_prompts(tc.prompt_file), text_dim=enc["hidden_size"], sdxl=sdxl
        )
    num_classes = tc.num_classes or read_class_info(path, unet_cfg, tc.revision).get("num_classes")
    if not unet_cfg.get("num_class_embeds") or not num_classes:
        raise UserError(
            "MSD shares out the classes of a class-conditional teacher or the prompts of a text-to-image one; this "
            "teacher has neither (pass --num_classes for a class-conditional teacher without onestep.json)."
        )
    return ConditionSpace("class", path, num_classes=num_classes)


def _check_sampleable(path: str) -> None:
    """The assembled pipeline samples discrete VP students (eps, v or x0) and EDM-preconditioned ones: refuse other
    teachers before training, not at the end."""
    from .schedules import schedule_from_scheduler_config

    config = read_json(os.path.join(path, "scheduler", "scheduler_config.json"), f"{path} has no scheduler")
    try:
        spec = schedule_from_scheduler_config(config)
    except ValueError as err:
        raise UserError(f"The teacher's scheduler config is not usable: {str(err).splitlines()[0]}") from None
    kind, prediction = spec.schedule.kind, spec.prediction_type
    if not ((kind == "vp" and prediction in ("epsilon", "v_prediction", "sample")) or prediction == "edm"):
        raise UserError(
            f"MSD's pipeline samples discrete VP students (eps, v or x0 prediction) and EDM-preconditioned ones; this "
            f"teacher is {kind}/{prediction}."
        )


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{what} (cannot read {path}).") from None


def resolve_router(
    config: RunConfig, space: ConditionSpace, embedder, student_index: int | None = None, fit: bool = True
) -> dict | None:
    """The run's router: the one saved in the run folder (resume, or another machine's student), else
    --router_file, else a new fit. Checked against the teacher before anything is written. A text router is fitted
    only where `fit` is set (the main process; the others get None and read the file it writes), and never for
    one student of several runs (--student_index): each run would fit its own, so it must exist already."""
    c, out = config.method, config.trainer.output_dir
    saved_path = os.path.join(out, ROUTER_FILE)
    found = {}
    for path in (saved_path, c.router_file):
        if path and os.path.isfile(path):
            router = load_router(path)
            check_router_fits(router, path, space.num_classes, space.text_dim)
            found[path] = router
        elif path and path == c.router_file:
            raise UserError(f"The router file {path} does not exist.")
    if len(found) == 2 and found[saved_path] != found[c.router_file]:
        raise UserError(
            f"--router_file {c.router_file} differs from the router this run was started with ({saved_path})."
        )
    router = next(iter(found.values()), None)
    if router is None:
        partition = c.partition or ("class_range" if space.kind == "class" else "kmeans_balanced")
        if (partition == "class_range") != (space.kind == "class"):
            wanted = "class_range" if space.kind == "class" else "kmeans_balanced, kmeans or pca_quadrant"
            raise UserError(f"--partition {partition} does not fit a {space.kind} teacher; use {wanted}.")
        if space.kind == "class":
            return fit_class_range(c.num_students, space.num_classes)
        if student_index is not None:
            raise UserError(
                f"Text students trained one per run (--student_index) must share one router, and "
                f"{os.path.join(out, ROUTER_FILE)} does not exist: fit it once first (the same command with "
                f"--fit_router instead of --student_index) or pass --router_file."
            )
        check_text_fit(partition, c.num_students, min(len(space.prompts), c.router_max_prompts))
        if not fit:
            return None
        return fit_prompt_router(
            space.prompts,
            embedder(),
            c.num_students,
            partition,
            c.router_seed,
            c.router_max_prompts,
            c.router_pooling,
            c.router_normalisation,
        )
    if "num_students" in config.explicit and c.num_students != router["num_students"]:
        raise UserError(
            f"--num_students {c.num_students} differs from the {router['num_students']} students of the router in use."
        )
    if c.partition and c.partition != router["kind"]:
        raise UserError(f"--partition {c.partition} differs from the router in use ({router['kind']}).")
    return router


class Parts:
    """Which conditions each student owns: class ids, or indices into the prompt file."""

    def __init__(self, router: dict, space: ConditionSpace, embedder):
        self.router, self.space, self._embedder = router, space, embedder
        if space.kind == "class":
            self.members = class_parts(router)
        else:
            routes = route_prompts(space.prompts, embedder(), router)
            self.members = [torch.nonzero(routes == k).flatten().tolist() for k in range(router["num_students"])]
        for k, members in enumerate(self.members):
            if not members:
                raise UserError(
                    f"Student {k} gets no training prompts from the router; use fewer students or more prompts."
                )

    def describe(self, k: int) -> str:
        m = self.members[k]
        if self.space.kind == "class":
            return f"classes {m[0]}-{m[-1]}" if m == list(range(m[0], m[-1] + 1)) else f"classes {m}"
        return f"{len(m)} of {len(self.space.prompts)} prompts"

    def cond_sampler(self, k: int, context):
        """Conditions drawn uniformly from V_k (the same global-RNG draws the teacher's sampler makes)."""
        if self.space.kind == "class":
            allowed = torch.tensor(self.members[k])
            return lambda n, device: Cond(class_labels=allowed[torch.randint(len(allowed), (n,))].to(device))
        prompts, allowed = context.prompts, self.members[k]
        return lambda n, device: context.prompt_encoder.encode(
            [prompts[allowed[int(i)]] for i in torch.randint(len(allowed), (n,))]
        ).to(device)

    def restrict_data(self, data, k: int):
        """Real data filtered to V_k (labels or captions that route to k), for the GAN and TSM."""
        if isinstance(data, TensorBatches):
            keep = self._keep_labels(data.labels, k)
            return TensorBatches(data.images[keep], data.labels[keep], data.batch_size, seed=data.seed)
        if isinstance(data, DatasetBatches):
            part = _Part(data.dataset, torch.nonzero(self._keep_labels(data.dataset.labels, k)).flatten().tolist(), k)
            return DatasetBatches(part, data.batch_size, data.seed, data.num_workers, data.micro_steps)
        if isinstance(data, CaptionedLatentBatches):
            routes = route_prompts(data.dataset.captions, self._embedder(), self.router)
            idx = torch.nonzero(routes == k).flatten()
            new = copy.copy(data)
            new.dataset = _Part(data.dataset, idx.tolist(), k)
            new.latents = data.latents[idx] if data.latents is not None else None
            return new
        raise UserError(f"MSD cannot filter real data of type {type(data).__name__} to a student's part.")

    def _keep_labels(self, labels, k: int) -> torch.Tensor:
        if labels is None:
            raise UserError("MSD filters real images by class: the data folder needs one sub-folder per class.")
        keep = torch.isin(labels, torch.tensor(self.members[k]))
        if not keep.any():
            raise UserError(f"The real data hold no image of student {k}'s {self.describe(k)}.")
        return keep


class _Part(torch.utils.data.Dataset):
    """The items of a dataset that route to one student (labels, captions and cache key follow)."""

    def __init__(self, dataset, indices: list[int], k: int):
        if not indices:
            raise UserError(f"The real data hold no image whose caption routes to student {k}.")
        self.dataset, self.indices = dataset, indices
        self.resolution = dataset.resolution
        labels = getattr(dataset, "labels", None)
        self.labels = labels[indices] if labels is not None else None
        captions = getattr(dataset, "captions", None)
        self.captions = [captions[i] for i in indices] if captions is not None else None
        self.cache_identity = (dataset.cache_identity, tuple(indices))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def stage_config(c: MSDConfig, stage: str) -> MSDConfig:
    """One stage's settings: stage 2 (adm) adds DMD2's GAN and trains at adm_learning_rate when set (G and the
    critic both, as DMD2's SD1.5 stage 2); stages 0 and 1 at the configured rates."""
    if stage != "adm":
        return replace(c, gan=False)
    if c.adm_learning_rate is None:
        return replace(c, gan=True)
    lr = c.adm_learning_rate
    return replace(c, gan=True, learning_rate=lr, generator_learning_rate=None, critic_learning_rate=None)


def stage_plan(c: MSDConfig, max_train_steps: int) -> list[tuple[str, int]]:
    """(stage, iterations) of every student: TSM for a smaller student, DM, then DM + GAN."""
    dm = max_train_steps if not c.gan else min(c.dm_steps, max_train_steps)
    plan = [("tsm", c.tsm_steps)] if c.student_config and c.tsm_steps > 0 else []
    plan += [("dm", dm)] if dm > 0 else []
    plan += [("adm", max_train_steps - dm)] if max_train_steps - dm > 0 else []
    return plan


def build_student_unet(path: str, teacher_net):
    """A smaller student of the teacher's class from a UNet config (JSON); what must match the teacher is checked."""
    cfg = read_json(path, f"--student_config {path} is not a UNet config JSON")
    cls = type(teacher_net)
    if cfg.get("_class_name", cls.__name__) != cls.__name__:
        raise UserError(f"--student_config {path} is a {cfg['_class_name']}; the teacher is a {cls.__name__}.")
    same = ("in_channels", "out_channels", "num_class_embeds", "cross_attention_dim", "addition_embed_type")
    for key in same:
        if key in teacher_net.config and cfg.get(key, teacher_net.config[key]) != teacher_net.config[key]:
            raise UserError(
                f"--student_config {path} has {key} = {cfg.get(key)}, but the teacher has {teacher_net.config[key]}; "
                f"a student reads and writes what the teacher does."
            )
    try:
        return cls.from_config({**cfg, **{k: teacher_net.config[k] for k in same if k in teacher_net.config}})
    except (TypeError, ValueError) as err:
        raise UserError(
            f"--student_config {path} does not build a {cls.__name__}: {str(err).splitlines()[0][:160]}"
        ) from None
