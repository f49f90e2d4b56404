"""MSD's recipes (DMD2's, for every student, plus MSD's own) and its stages: the router, each student's stages
(TSM for a smaller student, DM, then DM + GAN), and the assembly of the students into one pipeline.

`--max_train_steps` counts each student's iterations (critic updates, as in DMD2): the first `dm_steps` are
stage 1 (DM only), the rest stage 2 (DM + GAN); a smaller student's TSM stage adds `tsm_steps`. The paper's
per-student hyperparameters were not recovered (docs/methods/msd.md): they are DMD2's. Each student's stages
draw from their own seed, so the result does not depend on whether the students ran in one process, in several
runs or on several machines (--student_index k, then --assemble).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace

import torch

from ..config import CONFIG_FILE, Preset, RunConfig, Stage
from ..errors import UserError
from ..flags import DATA, LOOP, MEMORY, OPTIMISATION, TEACHER
from ..methods.msd import MSDConfig, StudentDMD2, TeacherScoreMatching, check_msd_config
from ..stages import Builder, MethodEntry, StageRun
from ..utils import seed_for
from .dmd2 import PRESETS as DMD2_PRESETS

DEFAULT_PRESET = "digits-cpu"
OUTPUT_DIR = "outputs/msd-digits"


def _from_dmd2(
    dmd2_name: str,
    name: str,
    description: str,
    notes: str = "",
    method: dict | None = None,
    trainer: dict | None = None,
) -> Preset:
    """DMD2's preset `dmd2_name` for every student, with MSD's settings on top; in-training FID off (a student
    covers part of the classes, the reference all of them: the assembled pipeline is measured instead)."""
    base = DMD2_PRESETS[dmd2_name].config
    fields = {**asdict(base.method), **(method or {})}
    output_dir = OUTPUT_DIR if name == DEFAULT_PRESET else f"outputs/msd-{name}"
    config = replace(
        base,
        method=MSDConfig(**fields),
        trainer=replace(base.trainer, output_dir=output_dir, eval_steps=None, **(trainer or {})),
    )
    return Preset(name, description, config, notes)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _from_dmd2(
            "digits-cpu",
            "digits-cpu",
            "Bundled default: 2 students on the digits teacher (classes 0-4 and 5-9), DMD2's digits settings, "
            "600 iterations each (300 DM, then 300 DM + GAN): DMD2's default budget in all, 2 CPU cores.",
            "Equal total compute with DMD2's default (1,200 iterations); the documented per-student budget (each student as "
            "many iterations as the single student) is preset digits-cpu-per-student.",
            method={"num_students": 2, "dm_steps": 300, "regression_pairs": 1024},
            trainer={"max_train_steps": 600, "checkpointing_steps": 300},
        ),
        _from_dmd2(
            "digits-cpu",
            "digits-cpu-per-student",
            "As digits-cpu with the per-student budget: every student trains as long as DMD2's default (1,200 iterations, "
            "600 DM then 600 DM + GAN), twice the total compute.",
            method={"num_students": 2, "dm_steps": 600, "regression_pairs": 1024},
            trainer={"max_train_steps": 1200, "checkpointing_steps": 600},
        ),
        _from_dmd2(
            "imagenet64-edm",
            "imagenet64-edm",
            "ImageNet 64x64, EDM teacher, 4 students on 250-class ranges; stage 1 DM with DMD1's regression on the "
            "full pair set, stage 2 adds DMD2's GAN (paper: FID 1.20).",
            "Per-student learning rate, batch and iterations: DMD2's ImageNet recipe (the paper's were not "
            "recovered); stage 1 length 20k (the paper's DM-only ablation), unverified. TTUR ratio 1 (G and critic "
            "every iteration): the paper offers the regression stabiliser as the alternative to DMD2's TTUR and "
            "names regression for the ImageNet DM stage (msd.md 4.3).",
            method={"num_students": 4, "dm_steps": 20_000, "stabiliser": "regression", "ttur_ratio": 1},
        ),
        _from_dmd2(
            "sd15",
            "sd15",
            "Stable Diffusion 1.5, 4 students on balanced k-means clusters of the prompts' pooled CLIP embeddings; "
            "one step at t=999, CFG 1.75, DMD2's SD1.5 stage-1 settings (lr 1e-5), then +5k iterations with the GAN at "
            "DMD2's stage-2 learning rate 5e-7.",
            "Paper: COCO FID 8.20 (ADM); its prompt split (pooled-embedding quadrants) is --partition pca_quadrant. "
            "Several machines: fit the router once with --fit_router, then --student_index k on each.",
            method={
                "num_students": 4,
                "dm_steps": 40_000,
                "gan": True,
                "gan_generator_weight": 1e-3,
                "adm_learning_rate": 5e-7,  # DMD2's SD1.5 GAN stage
            },
            trainer={"max_train_steps": 45_000},
        ),
    ]
}


# -- the stages --------------------------------------------------------------------------------------------------


def _student_stages(c: MSDConfig, max_train_steps: int, seed: int, k: int) -> list[Stage]:
    from ..msd_parts import stage_config, stage_plan

    plan = stage_plan(c, max_train_steps)
    stages, previous = [], None
    for name, steps in plan:
        settings = {
            f: getattr(stage_config(c, name), f)
            for f in ("gan", "learning_rate", "generator_learning_rate", "critic_learning_rate")
        }
        stages.append(
            Stage(
                f"student-{k}/{name}",
                build=name,
                method=settings,
                trainer={"max_train_steps": steps, "eval_steps": None},
                init_from=f"student-{k}/dm" if name == "adm" and previous == "dm" else None,
                seed=seed_for(seed, "msd-student", k, name),
                keeps_product=True,  # unet/ and student.json: the next stage or the assembly reads them
            )
        )
        previous = name
    return stages


def _stages(config: RunConfig, preset: Preset) -> tuple[Stage, ...]:
    c = config.method
    if c.gan and c.dm_steps >= config.trainer.max_train_steps and {"dm_steps", "max_train_steps"} & config.explicit:
        raise UserError(
            f"--dm_steps {c.dm_steps} leaves none of the {config.trainer.max_train_steps} iterations per student "
            f"(--max_train_steps) to the GAN stage; pass a smaller --dm_steps, or --no-gan for distribution matching "
            f"only."
        )
    students = [
        s
        for k in range(c.num_students)
        for s in _student_stages(c, config.trainer.max_train_steps, config.trainer.seed, k)
    ]
    return (Stage("router", build="router"), *students, Stage("assemble", build="assemble"))


def _resolve(config: RunConfig, preset: Preset, args) -> RunConfig:
    if config.trainer.init_from_checkpoint:
        raise UserError("--init_from_checkpoint is not available for MSD: each student's stages start one another.")
    check_msd_config(config.method)
    return config


def _select(args, stages):
    """--fit_router, --student_index k and --assemble: the router alone, the router and student k's stages, or
    the assembly alone."""
    if args.fit_router:
        return stages[:1]
    if args.assemble:
        return stages[-1:]
    if args.student_index is not None:  # then the assembly, once every student is trained
        k = args.student_index
        mine = tuple(s for s in stages if s.name.startswith(f"student-{k}/"))
        if not mine:
            students = len({s.name.split("/")[0] for s in stages if s.name.startswith("student-")})
            raise UserError(f"--student_index {k} must lie in 0..{students - 1} ({students} students).")
        return (stages[0], *mine, stages[-1])
    return None


def _add_arguments(parser) -> None:
    run = parser.add_argument_group("MSD's runs").add_mutually_exclusive_group()
    run.add_argument("--student_index", type=int, help="Train only student k (0-based), e.g. one per machine.")
    run.add_argument("--assemble", action="store_true", help="Only assemble the trained students into the pipeline.")
    run.add_argument(
        "--fit_router",
        action="store_true",
        help="Only fit and save the router (text teachers: do this once before training one student per run).",
    )


def _space(run: StageRun):
    """The condition space, the text embedder (loaded once, when a text router needs it) and the router."""
    from ..msd_parts import condition_space

    if "space" not in run.cache:
        c = run.config.method
        check_msd_config(c)
        if run.config.memory.lora_rank:
            raise UserError("MSD students are trained in full; --lora_rank is not available for them.")
        run.cache["space"] = condition_space(run.config)
    return run.cache["space"]


def _embedder(run: StageRun):
    if "embedder" not in run.cache:
        from accelerate import PartialState
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..router import TextEmbedder

        path = _space(run).teacher_path
        encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        teacher = run.config.teacher.pretrained_model_name_or_path
        run.cache["embedder"] = TextEmbedder(tokenizer, encoder.to(PartialState().device), teacher)
    return run.cache["embedder"]


def _router(run: StageRun):
    """The run's router: the run folder's, --router_file, or a new fit (text: on the main process only)."""
    from accelerate import PartialState

    from ..msd_parts import Parts, resolve_router
    from ..router import ROUTER_FILE, load_router, save_router

    state, space = PartialState(), _space(run)
    k = getattr(run.args, "student_index", None)
    router = resolve_router(run.config, space, lambda: _embedder(run), k, fit=state.is_main_process)
    saved = os.path.join(run.run_dir, ROUTER_FILE)
    if state.is_main_process:
        save_router(router, saved)
    state.wait_for_everyone()
    router = router or load_router(saved)
    if k is not None and not 0 <= k < router["num_students"]:
        raise UserError(f"--student_index {k} must lie in 0..{router['num_students'] - 1}.")
    run.cache["router"], run.cache["parts"] = router, Parts(router, space, lambda: _embedder(run))
    if getattr(run.args, "fit_router", False) and state.is_main_process:
        print(
            f"Router fitted and saved: {saved} ({router['kind']}, {router['num_students']} students). Now train "
            f"each student with the same command and --student_index k instead of --fit_router."
        )


def _student(run: StageRun):
    """One stage of one student: DMD2 (or TSM) on the student's part of the conditions and of the real data."""
    from ..denoiser import Denoiser
    from ..router import router_hash

    c, stage = run.config.method, run.stage.build
    k = int(run.stage.name.split("/")[0].removeprefix("student-"))
    parts, router = run.cache["parts"], run.cache["router"]
    real = stage == "adm" or (stage == "tsm" and c.tsm_data == "real")
    setup = run.prepare(needs_real_data=real)
    if setup.trainer.is_main:
        print(f"MSD student {k} of {router['num_students']} ({parts.describe(k)}), stage {stage}.")
    own_part = stage != "tsm" or c.tsm_conditions == "part"
    context = setup.context
    if own_part:
        context = replace(context, cond_sampler=parts.cond_sampler(k, context))
    if real and own_part:
        setup.data = parts.restrict_data(setup.data, k)
    info = {
        "student": k,
        "stage": stage,
        "part": parts.describe(k),
        "router_hash": router_hash(router),
        "teacher": context.source,
    }
    grid = parts.members[k] if _space(run).kind == "class" else None
    torch.manual_seed(run.config.trainer.seed)  # as Trainer.__init__: fresh layers start alike whatever ran before
    small = _small_student(run, k, context.denoiser) if c.student_config else None
    if stage == "tsm":
        student = Denoiser(small, context.denoiser.schedule, context.denoiser.prediction_type)
        return TeacherScoreMatching(context, student, c, grid if own_part else None, info), setup
    regression = _regression(run, setup) if c.stabiliser == "regression" else None
    init = critic = None
    if small is not None:  # G is the smaller network; F a teacher copy (the paper) or G's size
        init = Denoiser(small, context.denoiser.schedule, context.denoiser.prediction_type)
        critic = init if c.student_critic == "student" else context.denoiser
    method = StudentDMD2(
        context,
        c.dmd2(),
        student_init=init,
        critic_init=critic,
        grid_classes=grid,
        regression=regression,
        student_info=info,
    )
    return method, setup


def _small_student(run: StageRun, k: int, teacher):
    """The smaller student's network: its TSM stage's result when that ran, else fresh (random) weights."""
    from ..msd_parts import build_student_unet

    net = build_student_unet(run.config.method.student_config, teacher.net)
    tsm = f"student-{k}/tsm"
    if any(s.name == tsm for s in run.stages) and os.path.isfile(
        os.path.join(run.folder_of(tsm), "unet", "config.json")
    ):
        from ..loading import load_pretrained

        net = load_pretrained(type(net), os.path.join(run.folder_of(tsm), "unet"), f"train stage {tsm} again")
    return net


def _regression(run: StageRun, setup):
    """The teacher ODE pairs of the regression stabiliser (made once, in the run folder, from all conditions)."""
    from ..methods.msd import RegressionTerm
    from ..methods.regression import lpips_loss_or_reason
    from ..ode_pairs import make_ode_pairs

    c, acc, context = run.config.method, setup.trainer.accelerator, setup.context
    module, reason = (None, "--regression_loss mse") if c.regression_loss == "mse" else lpips_loss_or_reason()
    if module is None and c.regression_loss == "lpips":
        raise UserError(f"--regression_loss lpips is not available here: {reason}; use --regression_loss mse.")
    pairs = make_ode_pairs(
        context.denoiser,
        context.cond_sampler,
        context.uncond,
        context.sample_shape,
        c.regression_pairs,
        c.regression_teacher_steps,
        c.guidance_scale,
        run.run_seed,  # the run's, not the stage's: every student reads the same pairs
        c.regression_pairs_dir or os.path.join(run.run_dir, "ode_pairs"),
        identity=repr((context.source, context.denoiser.prediction_type)),
        device=acc.device,
        rank=acc.process_index,
        world_size=acc.num_processes,
        barrier=acc.wait_for_everyone,
    )
    return RegressionTerm(pairs, context.cond_sampler, c.regression_weight, module)


def _assemble(run: StageRun):
    """The trained students and the router as one MultiStudentPipeline in --output_dir."""
    from accelerate import PartialState

    from ..export import STUDENT_INFO_FILE
    from ..msd_parts import read_json
    from ..router import ROUTER_FILE, load_router, router_hash

    state, space = PartialState(), _space(run)
    saved = os.path.join(run.run_dir, ROUTER_FILE)
    if "router" not in run.cache and not os.path.isfile(saved):
        raise UserError(f"{run.run_dir} holds no MSD run (no {ROUTER_FILE}) to assemble.")
    router = run.cache.get("router") or load_router(saved)
    lasts = {s.name.split("/")[0]: s for s in run.stages if s.name.startswith("student-")}  # each student's last stage
    missing = [
        k
        for k in range(router["num_students"])
        if not os.path.isfile(os.path.join(run.folder_of(lasts[f"student-{k}"].name), "stage.json"))
    ]
    if missing:
        if getattr(run.args, "assemble", False):
            raise UserError(
                f"Students {missing} of {run.run_dir} are not trained yet; train them (--student_index k) first."
            )
        if state.is_main_process:
            print(
                f"Once every student is trained, assemble the pipeline with the same arguments and --assemble "
                f"(still to train: {missing})."
            )
        return {"interrupted": False, "assembled": False}
    want = router_hash(router)
    folders = [run.folder_of(lasts[f"student-{k}"].name) for k in range(router["num_students"])]
    infos = [
        read_json(os.path.join(f, STUDENT_INFO_FILE), f"Student {k} has no readable {STUDENT_INFO_FILE}")
        for k, f in enumerate(folders)
    ]
    for k, (folder, info) in enumerate(zip(folders, infos)):
        if info.get("router_hash") != want:
            raise UserError(
                f"Student {k} ({folder}) was trained with another router (hash {info.get('router_hash')}) than "
                f"{os.path.join(run.run_dir, ROUTER_FILE)} (hash {want}); train it again with this router, or "
                f"assemble it in the folder of the router it was trained with."
            )
    if state.is_main_process:
        _write_pipeline(run, router, folders, infos, space)
    state.wait_for_everyone()
    return {"interrupted": False, "assembled": True}


def _write_pipeline(run: StageRun, router: dict, folders: list[str], infos: list[dict], space) -> None:
    import diffusers

    from ..export import Card, export_multi_student, hub_id
    from ..msd_parts import read_json, stage_plan
    from ..router import ROUTER_FILE

    c, k_total, out = run.config.method, router["num_students"], run.run_dir
    plan = stage_plan(c, run.config.trainer.max_train_steps)
    unet_cls = getattr(diffusers, "UNet2DConditionModel" if space.kind == "text" else "UNet2DModel")
    from ..loading import load_pretrained

    again = "train that student again (--student_index k with --resume_from_checkpoint latest)"
    unets = [load_pretrained(unet_cls, os.path.join(f, "unet"), again) for f in folders]
    scheduler_config = read_json(
        os.path.join(space.teacher_path, "scheduler", "scheduler_config.json"), "The teacher has no scheduler"
    )
    gan = f"{c.gan_generator_weight} / {c.gan_discriminator_weight}" if c.gan else "off"
    adm = c.adm_learning_rate is not None and any(s == "adm" for s, _ in plan)
    rows = {
        "method": "MSD (Song et al. 2025, arXiv 2410.23274): K one-step students trained with DMD2 on their part",
        "teacher": run.config.teacher.pretrained_model_name_or_path,
        "preset": run.preset,
        "stages per student": ", ".join(f"{s} {n}" for s, n in plan),
        "parts": "; ".join(f"student {k}: {info.get('part')}" for k, info in enumerate(infos)),
        "trained steps per student": ", ".join(str(i.get("training_steps")) for i in infos),
        "total compute": f"{k_total} x one student's iterations",
        "real-score guidance scale": c.guidance_scale,
        "TTUR ratio": c.ttur_ratio,
        "GAN (G / D weight)": gan,
        "stabiliser": c.stabiliser,
        "learning rate": f"{c.learning_rate} (stage 2: {c.adm_learning_rate})" if adm else c.learning_rate,
        "batch per process": c.train_batch_size,
        "student network": c.student_config or "teacher-sized",
        "weight EMA (exported)": run.config.trainer.ema_decay or "off",
        "sampling steps": len(c.conditioning_timesteps),
        "conditioning timesteps": list(c.conditioning_timesteps),
        "metrics": "measure with onestep-eval fid --pipeline <this folder>",
        "full configuration": "training_config.json in the training output folder (rerun with --config)",
    }
    card = Card("Multi-student one-step generator (MSD)", rows, method="msd", steps=len(c.conditioning_timesteps))
    card.base_model = hub_id(run.config.teacher.pretrained_model_name_or_path)
    export_multi_student(
        unets,
        router,
        scheduler_config,
        c.conditioning_timesteps,
        out,
        card,
        num_classes=space.num_classes,
        teacher_path=space.teacher_path if space.kind == "text" else None,
        sdxl=space.sdxl,
    )
    seconds = {}
    for s in run.stages:
        path = os.path.join(run.folder_of(s.name), "timing.json")
        if s.name.startswith("student-") and os.path.isfile(path):
            with open(path) as f:
                seconds[s.name] = round(json.load(f)["total_seconds"], 1)
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump(
            {"training_seconds": seconds, "total_training_seconds": round(sum(seconds.values()), 1)}, f, indent=2
        )
    out = os.path.abspath(out)
    print(
        f"\nDone ({time.strftime('%H:%M:%S')}). Everything is under {out}:\n"
        f"  MSD pipeline      {out} (model_index.json, unet_0..unet_{k_total - 1}/, scheduler/, msd.py, README.md)\n"
        f"  router            {out}/{ROUTER_FILE} (also in model_index.json)\n"
        f"  configuration     {out}/{CONFIG_FILE} (rerun with --config)\n"
        f"  students' runs    {out}/student-<k>/<stage>/ (checkpoints, samples, logs, timing)\n"
        f"Load it: DiffusionPipeline.from_pretrained({run.run_dir!r}, trust_remote_code=True)"
        f"({'prompt=[...]' if space.kind == 'text' else 'class_labels=[3, 7]'}).images"
    )


ENTRY = MethodEntry(
    name="MSD",
    key="msd",
    config_class=MSDConfig,
    presets=PRESETS,
    default_preset=DEFAULT_PRESET,
    builders={
        "router": Builder(_router, action=True),
        "tsm": Builder(_student, needs_real_data=lambda config: config.method.tsm_data == "real"),
        "dm": Builder(_student),
        "adm": Builder(_student, needs_real_data=lambda config: True),
        "assemble": Builder(_assemble, action=True),
    },
    stages=_stages,
    resolve=_resolve,
    run_groups=(TEACHER, DATA, OPTIMISATION, LOOP, MEMORY),
    add_arguments=_add_arguments,
    select=_select,
    description="""MSD, multi-student distillation (Song et al. 2025): K one-step students, each a DMD2 student trained
on its own part of the classes or prompts, and one pipeline that routes every item to its student (NFE 1).

With no arguments it distils the bundled digits teacher into 2 students (classes 0-4 and 5-9) on the CPU:

    accelerate launch train/msd.py

By default the students train one after another in this process. To spread them over K machines, run
`--student_index k` on machine k (same --output_dir on a shared disk, or copy the student-<k>/ folders together
afterwards), then the same command with --assemble instead; text teachers first fit the router once, with
--fit_router, so that every run uses the same one. Every option left out comes from --preset (listed at the end)
or from --config. Documentation: docs/methods/msd.md.""",
)
