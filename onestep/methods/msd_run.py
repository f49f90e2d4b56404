"""MSD's run (shared/methods/msd.md 4-6): the router fitted once, the K students trained one after another (or one
of them, --student_index, so that K machines can each train one), each through its stages, then the pipeline.

A run folder (--output_dir):
  router.json              the partition, fitted once (or --router_file); training and the pipeline route with it
  training_config.json     the resolved configuration (rerun with --config)
  student-<k>/<stage>/     every stage of every student is an ordinary run folder (checkpoints, samples, logs,
                           timing); when finished it holds unet/ and student.json. Stages: tsm, dm, adm.
  ode_pairs/               the teacher pairs of --stabiliser regression, shared by every student
  model_index.json unet_<k>/ scheduler/ msd.py README.md   the assembled MultiStudentPipeline

A text router is fitted by the main process only (the others read router.json); training one student per run
(--student_index) needs it fitted before (--fit_router, or --router_file). Every student records the router's hash in
its student.json, and --assemble refuses a student trained with another router.

--resume_from_checkpoint latest skips finished stages and continues an unfinished one from its newest checkpoint;
each stage's random streams follow from (seed, student, stage), so the result does not depend on whether the
students ran in one process, in several runs, or on several machines.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, replace

import torch

from ..checkpoints import check_output_dir, list_checkpoints
from ..config import CONFIG_FILE, RunConfig, resolved_record
from ..data import CaptionedLatentBatches, DatasetBatches, TensorBatches, read_prompts
from ..denoiser import Cond, Denoiser
from ..errors import UserError
from ..export import STUDENT_INFO_FILE
from ..generator import OneStepGenerator
from ..loading import check_converted_teacher, read_class_info, resolve_teacher_path
from ..router import (
    ROUTER_FILE,
    TextEmbedder,
    check_router_fits,
    check_text_fit,
    class_parts,
    fit_class_range,
    fit_prompt_router,
    load_router,
    route_prompts,
    router_hash,
    save_router,
)
from ..utils import seed_for
from .msd import MSDConfig, RegressionTerm, StudentDMD2, TeacherScoreMatching, check_msd_config

STAGES = ("tsm", "dm", "adm")


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
    unet_cfg = _read_json(os.path.join(path, "unet", "config.json"), f"{path} is not a diffusers teacher folder")
    _check_sampleable(path)
    if unet_cfg.get("_class_name") == "UNet2DConditionModel":
        if not tc.prompt_file:
            raise UserError("Text-to-image teachers need --prompt_file (the prompts the students share out).")
        enc = _read_json(os.path.join(path, "text_encoder", "config.json"), f"{path} has no text_encoder/")
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
    from ..schedules import schedule_from_scheduler_config

    config = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"), f"{path} has no scheduler")
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


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{what} (cannot read {path}).") from None


# -- the router -----------------------------------------------------------------------------------------


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

    def cond_sampler(self, k: int, setup):
        """Conditions drawn uniformly from V_k (the same global-RNG draws the teacher's sampler makes)."""
        if self.space.kind == "class":
            allowed = torch.tensor(self.members[k])
            return lambda n, device: Cond(class_labels=allowed[torch.randint(len(allowed), (n,))].to(device))
        prompts, allowed = setup.prompts, self.members[k]
        return lambda n, device: setup.prompt_encoder.encode(
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


# -- students and their stages ----------------------------------------------------------------------------


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


def stage_dir(out: str, k: int, stage: str) -> str:
    return os.path.join(out, f"student-{k}", stage)


def stage_done(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STUDENT_INFO_FILE))


def build_student_unet(path: str, teacher_net):
    """A smaller student of the teacher's class from a UNet config (JSON); what must match the teacher is checked."""
    cfg = _read_json(path, f"--student_config {path} is not a UNet config JSON")
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


class MSDRun:
    def __init__(self, config: RunConfig, preset: str):
        from .. import run_setup

        self.config, self.preset, self.c = config, preset, config.method
        self.out = config.trainer.output_dir
        check_msd_config(self.c)
        if config.memory.lora_rank:
            raise UserError("MSD students are trained in full; --lora_rank is not available for them.")
        if config.trainer.resume_from_checkpoint not in (None, "latest"):
            raise UserError(
                "MSD resumes with --resume_from_checkpoint latest (every student continues from its newest checkpoint)."
            )
        if config.trainer.init_from_checkpoint:
            raise UserError(
                "--init_from_checkpoint is not available for MSD: each student's stages start one another."
            )
        run_setup._check_output_is_not_an_input(config)
        self.space = condition_space(config)
        self._embedder = None
        self.router = None

    def embedder(self) -> TextEmbedder:
        """e(c) from the teacher's first text encoder (loaded once, when a text router needs it)."""
        if self._embedder is None:
            from accelerate import PartialState
            from transformers import CLIPTextModel, CLIPTokenizer

            path = self.space.teacher_path
            encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval().requires_grad_(False)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            self._embedder = TextEmbedder(
                tokenizer, encoder.to(PartialState().device), self.config.teacher.pretrained_model_name_or_path
            )
        return self._embedder

    # -- the run folder -----------------------------------------------------------------------------
    def check_folder(self, student_index: int | None, assemble_only: bool) -> None:
        """A new run needs a new or empty folder; an MSD run folder (router.json) is written into only to resume
        it, to train another of its students (--student_index) or to assemble it."""
        out, resume = self.out, self.config.trainer.resume_from_checkpoint
        is_run = os.path.isfile(os.path.join(out, ROUTER_FILE))
        if assemble_only:
            if not is_run:
                raise UserError(f"{out} holds no MSD run (no {ROUTER_FILE}) to assemble.")
            return
        if not os.path.isdir(out) or not os.listdir(out):
            return check_output_dir(out, None)
        if not is_run:
            check_output_dir(out, None)  # names what is there and refuses
        if not (resume == "latest" or student_index is not None):
            raise UserError(
                f"{out} already holds an MSD run; pass --resume_from_checkpoint latest to continue it, or choose "
                f"another --output_dir."
            )
        if student_index is not None and resume is None:
            folder = os.path.join(out, f"student-{student_index}")
            if os.path.isdir(folder) and os.listdir(folder):
                raise UserError(
                    f"Student {student_index} of {out} was started already; pass --resume_from_checkpoint latest to continue it."
                )

    def run(self, student_index: int | None = None, assemble_only: bool = False, fit_router: bool = False) -> dict:
        """Train the students (all, or --student_index's), then assemble; `assemble_only`: only assemble;
        `fit_router`: only fit and save the router (before one-student-per-run training of text students)."""
        from accelerate import PartialState

        state = PartialState()
        self.check_folder(student_index, assemble_only)
        # A text router is fitted by the main process only; the others read the file it writes.
        router = resolve_router(self.config, self.space, self.embedder, student_index, fit=state.is_main_process)
        if router is not None:
            self._use_router(router, student_index)
        saved = os.path.join(self.out, ROUTER_FILE)
        if state.is_main_process and not assemble_only:  # from here on the run folder is written
            save_router(self.router, saved)
            with open(os.path.join(self.out, CONFIG_FILE), "w") as f:
                json.dump(resolved_record(self.config, self.preset, "MSD"), f, indent=2, default=str)
        state.wait_for_everyone()
        if router is None:
            self._use_router(load_router(saved), student_index)
        if fit_router:
            if state.is_main_process:
                print(
                    f"Router fitted and saved: {saved} ({self.router['kind']}, {self.router['num_students']} students). "
                    f"Now train each student with the same command and --student_index k instead of --fit_router."
                )
            return {"interrupted": False, "assembled": False}
        plan, k_total = stage_plan(self.c, self.config.trainer.max_train_steps), self.router["num_students"]
        if not assemble_only:
            for k in [student_index] if student_index is not None else range(k_total):
                for stage, steps in plan:
                    if stage_done(stage_dir(self.out, k, stage)):
                        if state.is_main_process:
                            print(f"Student {k}, stage {stage}: already trained ({stage_dir(self.out, k, stage)}).")
                        continue
                    result = self.train_stage(k, stage, steps, plan)
                    if result["interrupted"]:
                        return result
        missing = [k for k in range(k_total) if not stage_done(stage_dir(self.out, k, plan[-1][0]))]
        if missing:
            if assemble_only:
                raise UserError(
                    f"Students {missing} of {self.out} are not trained yet; train them (--student_index k) first."
                )
            if state.is_main_process:
                print(
                    f"Student {student_index} is trained. Once every student is, assemble the pipeline with the same "
                    f"arguments and --assemble instead of --student_index (still to train: {missing})."
                )
            return {"interrupted": False, "assembled": False}
        self.check_students_router(plan)
        if state.is_main_process:
            self.assemble(plan)
        state.wait_for_everyone()
        return {"interrupted": False, "assembled": True}

    def _use_router(self, router: dict, student_index: int | None) -> None:
        k_total = router["num_students"]
        if student_index is not None and not 0 <= student_index < k_total:
            raise UserError(f"--student_index {student_index} must lie in 0..{k_total - 1} ({k_total} students).")
        self.router = router
        self.parts = Parts(router, self.space, self.embedder)

    def check_students_router(self, plan: list) -> None:
        """Every trained student was trained with this run's router (its hash in student.json), so the pipeline
        routes each condition to the student that learnt it (students trained on other machines included)."""
        want = router_hash(self.router)
        for k in range(self.router["num_students"]):
            path = os.path.join(stage_dir(self.out, k, plan[-1][0]), STUDENT_INFO_FILE)
            got = _read_json(path, f"Student {k} has no readable {STUDENT_INFO_FILE}").get("router_hash")
            if got != want:
                raise UserError(
                    f"Student {k} ({path}) was trained with another router (hash {got}) than "
                    f"{os.path.join(self.out, ROUTER_FILE)} (hash {want}); train it again with this router, or "
                    f"assemble it in the folder of the router it was trained with."
                )

    # -- one stage of one student ----------------------------------------------------------------------
    def train_stage(self, k: int, stage: str, steps: int, plan: list) -> dict:
        from accelerate import PartialState

        from .. import run_setup

        folder = stage_dir(self.out, k, stage)
        has_checkpoints = bool(list_checkpoints(folder))
        state = PartialState()
        if state.is_main_process and not has_checkpoints and os.path.isdir(folder):
            shutil.rmtree(folder)  # this run's own stage, killed before its first checkpoint: start it again
        state.wait_for_everyone()
        names = [s for s, _ in plan]
        previous = names[names.index(stage) - 1] if names.index(stage) > 0 else None
        seed = seed_for(self.config.trainer.seed, "msd-student", k, stage)
        init = None
        if stage == "adm" and previous == "dm":  # stage 2 continues stage 1 (DMD2's two-stage mechanism)
            init = list_checkpoints(stage_dir(self.out, k, "dm"))[-1]
        method_config = stage_config(self.c, stage)
        trainer_config = replace(
            self.config.trainer,
            output_dir=folder,
            max_train_steps=steps,
            seed=seed,
            resume_from_checkpoint="latest" if has_checkpoints else None,
            init_from_checkpoint=init,
            eval_steps=None,
        )
        config = replace(self.config, method=method_config, trainer=trainer_config)
        real = stage == "adm" or (stage == "tsm" and self.c.tsm_data == "real")
        setup = run_setup.prepare(config, self.preset, f"MSD student {k} ({stage})", needs_real_data=real)
        if setup.trainer.is_main:
            print(
                f"MSD student {k} of {self.router['num_students']} ({self.parts.describe(k)}), stage {stage}: {steps} iterations."
            )
        own_part = stage != "tsm" or self.c.tsm_conditions == "part"
        cond_sampler = self.parts.cond_sampler(k, setup) if own_part else setup.cond_sampler
        data = self.parts.restrict_data(setup.data, k) if (real and own_part) else setup.data
        teacher = setup.teacher.denoiser
        info = {
            "student": k,
            "stage": stage,
            "part": self.parts.describe(k),
            "router_hash": router_hash(self.router),
            "teacher": setup.export_info.get("teacher"),
        }
        grid = self.parts.members[k] if self.space.kind == "class" else None
        torch.manual_seed(seed)  # as Trainer.__init__: fresh layers start alike whatever ran before in this process
        small = None
        if self.c.student_config:
            small = self._small_student(k, teacher, names)
        if stage == "tsm":
            method = TeacherScoreMatching(
                teacher,
                Denoiser(small, teacher.schedule, teacher.prediction_type),
                method_config,
                setup.sample_shape,
                cond_sampler,
                setup.uncond,
                grid_classes=grid if own_part else None,
                decode=setup.decode,
                export_info=info,
            )
        else:
            method = StudentDMD2(
                teacher,
                method_config.dmd2(),
                sample_shape=setup.sample_shape,
                cond_sampler=cond_sampler,
                uncond=setup.uncond,
                decode=setup.decode,
                export_info=info,
                grid_classes=grid,
                regression=self._regression(setup) if self.c.stabiliser == "regression" else None,
            )
            if small is not None:  # G is the smaller network; F a teacher copy (msd.md section 2) or G's size
                self._use_small_networks(method, small, teacher, setup.sample_shape, cond_sampler)
        run_setup.apply_memory_options(
            [*method.memory_networks(), teacher.net], self.config.memory, setup.trainer.device
        )
        return setup.trainer.fit(method, data, None)

    def _use_small_networks(self, method: StudentDMD2, small, teacher: Denoiser, sample_shape, cond_sampler) -> None:
        from ..critic import Critic
        from ..discriminator import DMD2Head

        den = Denoiser(small, teacher.schedule, teacher.prediction_type).train().requires_grad_(True)
        method.generator = OneStepGenerator(den, self.c.conditioning_timesteps)
        if self.c.student_critic == "student":
            method.critic = Critic(copy.deepcopy(den), feature_module=self.c.gan_feature_module)
            if method.config.gan:
                example = cond_sampler(1, torch.device("cpu"))
                method.critic.head = DMD2Head(method.critic.feature_shape(sample_shape, example))

    def _small_student(self, k: int, teacher: Denoiser, names: list[str]):
        """The smaller student's network: TSM's result when stage 0 ran, else fresh (random) weights."""
        net = build_student_unet(self.c.student_config, teacher.net)
        if "tsm" in names and stage_done(stage_dir(self.out, k, "tsm")):
            net = type(net).from_pretrained(os.path.join(stage_dir(self.out, k, "tsm"), "unet"))
        return net

    def _regression(self, setup) -> RegressionTerm:
        """The teacher ODE pairs (made once, in the run folder, from all conditions) and the distance."""
        from ..ode_pairs import make_ode_pairs
        from .regression import lpips_loss_or_reason

        c, acc = self.c, setup.trainer.accelerator
        module, reason = (None, "--regression_loss mse") if c.regression_loss == "mse" else lpips_loss_or_reason()
        if module is None and c.regression_loss == "lpips":
            raise UserError(f"--regression_loss lpips is not available here: {reason}; use --regression_loss mse.")
        pairs = make_ode_pairs(
            setup.teacher.denoiser,
            setup.cond_sampler,
            setup.uncond,
            setup.sample_shape,
            c.regression_pairs,
            c.regression_teacher_steps,
            c.guidance_scale,
            self.config.trainer.seed,
            c.regression_pairs_dir or os.path.join(self.out, "ode_pairs"),
            identity=repr((setup.export_info.get("teacher"), setup.teacher.denoiser.prediction_type)),
            device=acc.device,
            rank=acc.process_index,
            world_size=acc.num_processes,
            barrier=acc.wait_for_everyone,
        )
        return RegressionTerm(pairs, setup.cond_sampler, c.regression_weight, module)

    # -- the pipeline ---------------------------------------------------------------------------------
    def assemble(self, plan: list) -> None:
        import diffusers

        from ..export import export_multi_student

        last = plan[-1][0]
        space, c, k_total = self.space, self.c, self.router["num_students"]
        folders = [stage_dir(self.out, k, last) for k in range(k_total)]
        unet_cls = getattr(diffusers, "UNet2DConditionModel" if space.kind == "text" else "UNet2DModel")
        unets = [unet_cls.from_pretrained(os.path.join(f, "unet")) for f in folders]
        infos = [json.load(open(os.path.join(f, STUDENT_INFO_FILE))) for f in folders]
        scheduler_config = _read_json(
            os.path.join(space.teacher_path, "scheduler", "scheduler_config.json"), "The teacher has no scheduler"
        )
        gan = f"{c.gan_generator_weight} / {c.gan_discriminator_weight}" if c.gan else "off"
        card = {
            "method": "MSD (Song et al. 2025, arXiv 2410.23274): K one-step students trained with DMD2 on their part",
            "teacher": self.config.teacher.pretrained_model_name_or_path,
            "preset": self.preset,
            "stages per student": ", ".join(f"{s} {n}" for s, n in plan),
            "parts": "; ".join(f"student {k}: {self.parts.describe(k)}" for k in range(k_total)),
            "trained steps per student": ", ".join(str(i.get("training_steps")) for i in infos),
            "total compute": f"{k_total} x one student's iterations",
            "real-score guidance scale": c.guidance_scale,
            "TTUR ratio": c.ttur_ratio,
            "GAN (G / D weight)": gan,
            "stabiliser": c.stabiliser,
            "learning rate": c.learning_rate
            if c.adm_learning_rate is None or not any(s == "adm" for s, _ in plan)
            else f"{c.learning_rate} (stage 2: {c.adm_learning_rate})",
            "batch per process": c.train_batch_size,
            "student network": c.student_config or "teacher-sized",
            "weight EMA (exported)": self.config.trainer.ema_decay or "off",
            "metrics": "measure with onestep-eval fid --pipeline <this folder> (README of the onestep checkout)",
            "full configuration": "training_config.json in the training output folder (rerun with --config)",
        }
        export_multi_student(
            unets,
            self.router,
            scheduler_config,
            c.conditioning_timesteps,
            self.out,
            card,
            num_classes=space.num_classes,
            teacher_path=space.teacher_path if space.kind == "text" else None,
            sdxl=space.sdxl,
        )
        seconds = {}
        for k in range(k_total):
            for stage, _ in plan:
                path = os.path.join(stage_dir(self.out, k, stage), "timing.json")
                if os.path.isfile(path):
                    seconds[f"student-{k}/{stage}"] = round(json.load(open(path))["total_seconds"], 1)
        with open(os.path.join(self.out, "timing.json"), "w") as f:
            json.dump(
                {"training_seconds": seconds, "total_training_seconds": round(sum(seconds.values()), 1)}, f, indent=2
            )
        out = os.path.abspath(self.out)
        print(
            f"\nDone ({time.strftime('%H:%M:%S')}). Everything is under {out}:\n"
            f"  MSD pipeline      {out} (model_index.json, unet_0..unet_{k_total - 1}/, scheduler/, msd.py, README.md)\n"
            f"  router            {out}/{ROUTER_FILE} (also in model_index.json)\n"
            f"  configuration     {out}/{CONFIG_FILE} (rerun with --config)\n"
            f"  students' runs    {out}/student-<k>/<stage>/ (checkpoints, samples, logs, timing)\n"
            f"Load it: DiffusionPipeline.from_pretrained({self.out!r}, trust_remote_code=True)"
            f"({'prompt=[...]' if space.kind == 'text' else 'class_labels=[3, 7]'}).images"
        )
