"""DisBack: distribution backtracking (Zhang et al., ICLR 2025, arXiv 2408.15991), on DMD2's update.

Documented in docs/methods/disback.md. Stage 1 (`DegradationPath`): a copy S' of the teacher learns
the teacher's own denoising loss on samples of the frozen initial generator G0, and S'_i is saved after
i K updates as a diffusers UNet folder (S'_0 is the teacher itself). Stage 2 (`DisBack`):
DMD2's loop with the critic started from S'_N and the real score walking back S'_{N-1}, ..., S'_1, then the
teacher, one step back every M iterations (or when the DM gradient has converged); the position on the path
is the method's own state, so it is checkpointed and resumes exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..context import TeacherContext
from ..denoiser import Denoiser
from ..errors import UserError
from ..flags import option, positive_float, positive_int, probability
from ..loading import open_weights, read_weights
from .base import Update
from .dmd2 import DMD2, DMD2Config

PATH_FILE = "path.json"
SWITCH_RULES = ("fixed", "converged")
TARGET_GUIDANCE = ("cfg_all", "cfg_teacher_only", "cfg_all_raw")
CRITIC_INITS = ("path", "teacher", "dmd2_critic")


@dataclass
class DisBackConfig(DMD2Config):
    """DMD2's options (the base loop) plus the path and the walk back along it."""

    flag_group = "DisBack (docs/methods/disback.md)"
    not_flags = ("regression_pairs", "regression_teacher_steps", "regression_loss", "regression_pairs_dir")
    _CONVERGED = ("switch_rule", lambda rule: rule == "converged", "--switch_rule converged")
    flag_requires = {
        **DMD2Config.flag_requires,
        "switch_rho": _CONVERGED,
        "switch_min_steps": _CONVERGED,
        "switch_max_steps": _CONVERGED,
        "switch_window": _CONVERGED,
        "path_uncond_prob": ("guidance_scale", lambda w: w > 1, "real-score guidance (--guidance_scale above 1)"),
    }

    path_dir: str | None = option(
        None,
        "The degradation path's folder, for the distill stage alone (None: the run's own path stage).",
    )
    num_snapshots: int = option(
        10,
        "N: snapshots S'_1..S'_N of the path (S'_0: the teacher; the distill stage: the path's).",
        parse=positive_int,
    )
    path_steps: int | None = option(
        None, "Path-stage updates, a multiple of N (None: 5% of --max_train_steps).", parse=positive_int
    )
    path_learning_rate: float | None = option(
        None, "Path-stage learning rate (None: --learning_rate).", parse=positive_float
    )
    path_uncond_prob: float = option(
        0.1, "Null-condition dropout on the copy in the path stage when the real score uses CFG.", parse=probability
    )
    path_gan: bool = option(False, "Also train the GAN head in the path stage (the released code; the paper: no).")
    initial_generator: str | None = option(
        None, "G0 from an earlier run's checkpoint-<step> (None: the teacher copy)."
    )
    critic_init: str = option(
        "path", "Distill-stage critic start: S'_N, the teacher, or G0's critic.", choices=CRITIC_INITS
    )
    switch_rule: str = option(
        "fixed", "Target switch: every M iterations, or when the DM gradient fell.", choices=SWITCH_RULES
    )
    switch_every: int | None = option(
        None, "M: iterations per target (None: --max_train_steps / (4 N)).", parse=positive_int
    )
    switch_rho: float = option(
        0.5,
        "converged: switch when the DM gradient is below rho x its phase-start value (0 < rho < 1).",
        parse=positive_float,
    )
    switch_min_steps: int | None = option(None, "converged: shortest phase (None: M / 2).", parse=positive_int)
    switch_max_steps: int | None = option(None, "converged: longest phase (None: 2 M).", parse=positive_int)
    switch_window: int = option(5, "converged: generator updates averaged per value.", parse=positive_int)
    target_guidance: str | None = option(
        None,
        "CFG on the path's targets (None: cfg_all if the path saw the null condition, else cfg_teacher_only).",
        choices=TARGET_GUIDANCE,
    )
    dm_weighting: str = option(
        "dmd2", "omega of the generator gradient: DMD2's normaliser or VSD's alpha sigma.", choices=("dmd2", "vsd")
    )

    def resolved(self, stage2_steps: int) -> DisBackConfig:
        """A copy with every derived default filled in (recorded in training_config.json), after checks."""
        for name, value, allowed in (
            ("switch_rule", self.switch_rule, SWITCH_RULES),
            ("critic_init", self.critic_init, CRITIC_INITS),
            ("dm_weighting", self.dm_weighting, ("dmd2", "vsd")),
        ):
            if value not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}.")
        if self.target_guidance is not None and self.target_guidance not in TARGET_GUIDANCE:
            raise UserError(f"--target_guidance must be one of {', '.join(TARGET_GUIDANCE)}.")
        if self.num_snapshots < 1:
            raise UserError("--num_snapshots must be at least 1.")
        if self.path_learning_rate is not None and not self.path_learning_rate > 0:
            raise UserError(
                f"--path_learning_rate must be positive, got {self.path_learning_rate} (at 0 every snapshot is the teacher)."
            )
        if not 0 <= self.path_uncond_prob < 1:
            raise UserError(f"--path_uncond_prob {self.path_uncond_prob} must lie in [0, 1).")
        if not 0 < self.switch_rho < 1:
            raise UserError(
                f"--switch_rho {self.switch_rho} must lie in (0, 1): the converged rule switches when the DM gradient "
                f"has fallen below rho times its value at the phase start."
            )
        if self.critic_init == "dmd2_critic" and not self.initial_generator:
            raise UserError("--critic_init dmd2_critic takes the critic of --initial_generator's checkpoint: pass it.")
        n = self.num_snapshots
        path_steps = self.path_steps or n * max(1, -(-stage2_steps // (20 * n)))  # 5%, rounded up to a multiple of N
        if path_steps % n:
            raise UserError(
                f"--path_steps {path_steps} must be a multiple of --num_snapshots {n} (one snapshot per K)."
            )
        every = self.switch_every or max(1, stage2_steps // (4 * n))
        return replace(
            self,
            path_steps=path_steps,
            switch_every=every,
            switch_min_steps=self.switch_min_steps or max(1, every // 2),
            switch_max_steps=self.switch_max_steps or 2 * every,
        )


# -- the path folder: path.json and snapshot-<i>/ (a diffusers UNet folder, or model.safetensors) -------------


def snapshot_dir(path_dir: str, index: int) -> str:
    return os.path.join(path_dir, f"snapshot-{index:03d}")


_UNET_WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


def _weight_files(folder: str) -> list[str] | None:
    """A snapshot's safetensors files: one, or the shards its index lists (save_pretrained shards a UNet above
    its max_shard_size, 10 GB by default, which an fp32 SDXL UNet exceeds); None when any is missing."""
    index = os.path.join(folder, _UNET_WEIGHTS + ".index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        files = [os.path.join(folder, "unet", name) for name in names]
        return files if files and all(os.path.isfile(p) for p in files) else None
    for name in (_UNET_WEIGHTS, "model.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    return None


def save_snapshot(net: nn.Module, path_dir: str, index: int, max_shard_size: int | str = "10GB") -> None:
    """Written to a temporary name, then renamed: a folder named snapshot-<i> is always whole. A diffusers UNet
    larger than max_shard_size is written in shards with an index (load_snapshot reads both forms)."""
    from safetensors.torch import save_file

    final = snapshot_dir(path_dir, index)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(net, "save_pretrained"):  # diffusers: stage 2 (or anyone) loads it with from_pretrained
        net.save_pretrained(os.path.join(tmp, "unet"), max_shard_size=max_shard_size)
    else:
        os.makedirs(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, f"{tmp}/model.safetensors")
    shutil.rmtree(final, ignore_errors=True)  # a resumed run rewrites a snapshot of the killed one identically
    os.replace(tmp, final)


AGAIN = "record the path again (--stage path into a new folder)"


def load_snapshot(path_dir: str, index: int, net: nn.Module) -> None:
    folder = snapshot_dir(path_dir, index)
    files = _weight_files(folder)
    if files is None:
        raise UserError(f"{folder} holds no weights; {AGAIN}.")
    state = {}
    for path in files:
        state.update(read_weights(path, AGAIN))
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise UserError(
            f"The weights in {folder} do not fit the teacher's network; the path was recorded for another teacher."
        ) from None


class _SnapshotTensors:
    """A snapshot's tensors by name, read one at a time (no whole-UNet load to compare two snapshots)."""

    def __init__(self, files: list[str]):
        self.where = {}
        for path in files:
            handle = open_weights(path, AGAIN)
            self.where.update({key: handle for key in handle.keys()})

    def keys(self):
        return self.where.keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def _same_weights(a, b) -> bool:
    """Every tensor equal (compared in the wider of the two dtypes); stops at the first difference, which for
    a trained snapshot is the first tensor, so a real path costs one tensor read per snapshot."""
    if set(a.keys()) != set(b.keys()):
        return False
    for key in a.keys():
        x, y = a[key], b[key]
        dtype = torch.promote_types(x.dtype, y.dtype)
        if not torch.equal(x.to(dtype), y.to(x.device, dtype)):
            return False
    return True


def first_unchanged_snapshot(path_dir: str, num_snapshots: int, teacher_net: nn.Module) -> int | None:
    """The first i in 1..N whose S'_i equals S'_{i-1} (S'_0: the teacher's weights), or None."""
    previous = {k: v.detach() for k, v in teacher_net.state_dict().items()}
    for i in range(1, num_snapshots + 1):
        current = _SnapshotTensors(_weight_files(snapshot_dir(path_dir, i)))
        if _same_weights(previous, current):
            return i
        previous = current
    return None


def read_path(path_dir: str, conditioning_timesteps: list[int] | None = None) -> dict:
    """The manifest of a finished path whose snapshots are all there, or one sentence saying what is missing."""
    manifest = os.path.join(path_dir, PATH_FILE)
    if not os.path.isfile(manifest):
        raise UserError(
            f"--path_dir {path_dir} holds no degradation path ({PATH_FILE} is missing): record one with --stage path, "
            f"or pass --path_dir the folder a path stage wrote."
        )
    with open(manifest) as f:
        info = json.load(f)
    if not info.get("complete"):
        raise UserError(
            f"The degradation path in {path_dir} is unfinished ({len(info.get('snapshots', []))} of "
            f"{info['num_snapshots']} snapshots); resume it with --stage path --resume_from_checkpoint latest."
        )
    missing = [i for i in range(1, info["num_snapshots"] + 1) if _weight_files(snapshot_dir(path_dir, i)) is None]
    if missing:
        raise UserError(
            f"{path_dir} lacks {os.path.basename(snapshot_dir(path_dir, missing[0]))} ({len(missing)} of its "
            f"{info['num_snapshots']} snapshots missing); record the path again with --stage path."
        )
    if conditioning_timesteps is not None and list(conditioning_timesteps) != info["conditioning_timesteps"]:
        raise UserError(
            f"The path in {path_dir} was recorded for a generator at timesteps {info['conditioning_timesteps']}, "
            f"not {list(conditioning_timesteps)}; stage 2 must start from the generator stage 1 sampled."
        )
    return info


def resolve_for_run(config: DisBackConfig, stage2_steps: int, path_dir: str, reads_path: bool) -> DisBackConfig:
    """What a DisBack run trains with: its path folder, N taken from the path when the distill stage reads a
    finished one (`reads_path`, or a resumed run whose path stage has finished: so M and the recorded
    training_config.json follow the path, not --num_snapshots), then the derived defaults (`resolved`)."""
    config = replace(config, path_dir=path_dir)
    manifest = os.path.join(path_dir, PATH_FILE)
    if reads_path:
        n = read_path(path_dir, config.conditioning_timesteps)["num_snapshots"]
        config = replace(config, num_snapshots=n)
    elif os.path.isfile(manifest):
        with open(manifest) as f:
            info = json.load(f)
        if info.get("complete"):
            config = replace(config, num_snapshots=info["num_snapshots"])
    return config.resolved(stage2_steps)


def _g0_name(config: DisBackConfig, generator_init: Denoiser | None) -> str:
    """What G0 is, as the path records it and stage 2 checks it."""
    if config.initial_generator:
        return os.path.abspath(config.initial_generator)
    return "a network given in code" if generator_init is not None else "the teacher copy"


def _start_generator(method: DMD2, generator_init: Denoiser | None) -> None:
    """G0: the teacher copy DMD2 made, or another network's weights (the toy's off-centre blob)."""
    if generator_init is not None:
        method.generator.denoiser.load_state_dict(generator_init.state_dict())


def load_initial_generator(method: DMD2, checkpoint: str, with_critic: bool = False) -> None:
    """G0 (and, for critic_init dmd2_critic, F) from an earlier run's checkpoint-<step> (e.g. a DMD2 run), as the
    released code starts from a distilled checkpoint. Call after LoRA is added, so a LoRA checkpoint fits."""
    from ..checkpoints import load_model_weights

    load_model_weights(checkpoint, {"generator": method.generator})
    if with_critic:
        load_model_weights(checkpoint, {"critic": method.critic}, {"critic": ("head.",)})


# -- stage 1 -------------------------------------------------------------------------------------------------


class DegradationPath(DMD2):
    """Stage 1: the critic-only DMD2 loop with G frozen at G0 and no GAN (unless path_gan); the
    trained network S' starts as the teacher and is saved every K = path_steps / N updates."""

    ema_models = ()
    exported_models = ("degradation",)
    new_in_stage = {}

    def __init__(
        self,
        context: TeacherContext,
        config: DisBackConfig,
        path_dir: str,
        generator_init: Denoiser | None = None,
        **dmd2_kwargs,
    ):
        lr = config.path_learning_rate if config.path_learning_rate is not None else config.learning_rate
        super().__init__(context, replace(config, gan=config.path_gan, critic_learning_rate=lr), **dmd2_kwargs)
        self.path_dir, self.num_snapshots = path_dir, config.num_snapshots
        self.interval = config.path_steps // config.num_snapshots  # K
        self.updates = [Update("critic", "degradation", every=1)]
        _start_generator(self, generator_init)
        self.generator.requires_grad_(False)  # G0 is frozen in stage 1
        # Condition dropout only where the walk will query the targets' unconditional branch.
        uses_cfg = config.guidance_scale > 1 and self.uncond is not None
        self.uncond_prob = config.path_uncond_prob if uses_cfg else 0.0
        self.losses: list[float] = []  # the stage-1 loss per update, for the plateau report
        self.card_info = {"initial_generator": _g0_name(config, generator_init)}

    def models(self):
        return {"degradation": self.critic}

    def optimizers(self):
        c = self.config  # critic_learning_rate is the path's (set in __init__)
        params = [p for p in self.critic.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(
            params, lr=c.critic_learning_rate, betas=c.adam_betas, weight_decay=c.adam_weight_decay
        )
        return {"degradation": adamw}

    def attach(self, prepared, unwrap):
        # DMD2's code reads the critic slot; G0 is not trained, so it is not prepared (nor checkpointed).
        super().attach({"critic": prepared["degradation"], "generator": self.generator}, unwrap)

    def to(self, device):
        super().to(device)
        self.generator.to(device)
        return self

    def loss(self, name, s):
        cond = s["cond"]
        if self.uncond_prob > 0:
            drop = torch.rand(len(cond), device=s["x"].device) < self.uncond_prob
            cond = cond.where(drop, self.uncond(cond))
        loss, logs = self._critic_loss(dict(s, cond=cond))  # the DMD2 critic loss with G frozen
        self.losses.append(float(logs["loss_fake"]))
        return loss, logs

    def end_iteration(self, info):
        done = info.step + 1
        if done % self.interval == 0 and done // self.interval <= self.num_snapshots:
            index = done // self.interval
            if self.collective.is_main:
                save_snapshot(self.unwrap(self.prepared["critic"]).denoiser.net, self.path_dir, index)
                self._write_manifest(index)
                tqdm.write(f"DisBack path: saved S'_{index} after {done} updates")

    def plateau(self) -> int | None:
        """The paper's stage-1 stopping rule, reported rather than obeyed (the run has a fixed length): the first update
        after which the mean loss of the last 10% of the run moved by less than 1% against the 10% before."""
        w = max(1, self.interval * self.num_snapshots // 10)
        for end in range(2 * w, len(self.losses) + 1):
            now, before = sum(self.losses[end - w : end]) / w, sum(self.losses[end - 2 * w : end - w]) / w
            if abs(now - before) < 0.01 * abs(before):
                return end
        return None

    def _write_manifest(self, written: int, complete: bool = False) -> None:
        c = self.config
        info = {
            "method": "DisBack stage 1 (degradation path)",
            "num_snapshots": self.num_snapshots,
            "interval": self.interval,
            "path_steps": self.interval * self.num_snapshots,
            "snapshots": [os.path.basename(snapshot_dir(self.path_dir, i)) for i in range(1, written + 1)],
            "snapshot_0": "the teacher",
            "complete": complete,
            "conditioning_timesteps": list(c.conditioning_timesteps),
            "uncond_prob": self.uncond_prob,
            "learning_rate": c.critic_learning_rate,
            "gan": c.gan,
            "teacher": self.context.source,
            **self.card_info,
            "loss_plateau_at_update": self.plateau(),
        }
        os.makedirs(self.path_dir, exist_ok=True)
        tmp = os.path.join(self.path_dir, PATH_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(self.path_dir, PATH_FILE))

    def state_dict(self):
        return {"losses": list(self.losses)}

    def load_state_dict(self, state):
        self.losses = list(state["losses"])

    @torch.no_grad()
    def sample_grid(self, models, num, seed, device):
        """S' sampled with 20 DDIM steps on fixed noise: the teacher at update 0, drifting towards G0 after."""
        from ..sampling import ddim_sample

        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num, *self.sample_shape, generator=g).to(device)
        cond = self.context.grid_conditions(num, device)
        x = ddim_sample(models["degradation"].denoiser, z, cond, num_steps=20)
        return (self.decode(x) if self.decode is not None else x).clamp(-1, 1)

    def export(self, models, output_dir, extra_card):
        """The path is its snapshots (written as they were taken); the end marks it complete."""
        from ..export import Card

        self._write_manifest(self.num_snapshots, complete=True)
        rows = {
            "teacher": self.context.source,
            "preset": extra_card.get("preset", "-"),
            "snapshots": f"{self.num_snapshots}, one every {self.interval} updates",
            "learning rate": self.config.critic_learning_rate,
            **self.card_info,
            "next": "the distillation stage reads this folder (--path_dir)",
        }
        loading = (
            "## Loading\n\nEach `snapshot-NNN/unet` is a diffusers model folder of the teacher's network class, e.g. "
            '`UNet2DModel.from_pretrained("<folder>/snapshot-001/unet")` (`UNet2DConditionModel` for a '
            f"conditional teacher). The distillation stage reads the whole folder: `{self.usage('<folder>')}`.\n"
        )
        card = Card("DisBack degradation path (stage 1)", rows, method="disback", loading=loading)
        with open(os.path.join(self.path_dir, "README.md"), "w") as f:
            f.write(card.text())

    def usage(self, folder):
        return f"the distillation stage reads it: python train/disback.py --stage distill --path_dir {folder}"


# -- stage 2 -------------------------------------------------------------------------------------------------


class DisBack(DMD2):
    method_tag = "disback"
    """Stage 2: DMD2's update with the real-score slot on S'_i, i = N-1 ... 1, then the teacher."""

    def __init__(
        self,
        context: TeacherContext,
        config: DisBackConfig,
        path_dir: str,
        generator_init: Denoiser | None = None,
        **dmd2_kwargs,
    ):
        teacher = context.denoiser
        self.path = read_path(path_dir, config.conditioning_timesteps)
        n = self.path["num_snapshots"]
        if config.num_snapshots != n:  # M and the phase bounds were derived from N (train/disback.py takes the path's)
            raise UserError(
                f"The path in {path_dir} has {n} snapshots, not --num_snapshots {config.num_snapshots}; stage 2's N "
                f"(and the defaults derived from it) must be the path's."
            )
        if self.path["initial_generator"] != _g0_name(config, generator_init):
            raise UserError(
                f"The path in {path_dir} was recorded from G0 = {self.path['initial_generator']}, but this run starts "
                f"from {_g0_name(config, generator_init)}; stage 2 must start from the generator stage 1 sampled."
            )
        same = first_unchanged_snapshot(path_dir, n, teacher.net)
        if same is not None:  # a switch onto it would change nothing: refuse before any training
            before = "the teacher" if same == 1 else f"S'_{same - 1}"
            raise UserError(
                f"S'_{same} of the path in {path_dir} is identical to {before}, so the walk would not change its "
                f"target; record the path again with a positive --path_learning_rate."
            )
        super().__init__(context, config, **dmd2_kwargs)
        self.path_dir, self.num_snapshots = path_dir, n
        _start_generator(self, generator_init)  # G <- G0
        if config.critic_init == "path":  # F <- S'_N
            load_snapshot(path_dir, self.num_snapshots, self.critic.denoiser.net)
        policy = config.target_guidance or ("cfg_all" if self.path["uncond_prob"] > 0 else "cfg_teacher_only")
        if policy == "cfg_all" and config.guidance_scale > 1 and not self.path["uncond_prob"] > 0:
            raise UserError(
                "--target_guidance cfg_all needs a path recorded with condition dropout (--path_uncond_prob > 0 and "
                "CFG); use cfg_teacher_only, or cfg_all_raw to guide targets whose null branch was never trained."
            )
        self.target_guidance = policy
        # One frozen copy of the teacher's network takes each snapshot's weights in turn (index 0: the teacher).
        self.target = copy.deepcopy(teacher).eval().requires_grad_(False) if self.num_snapshots > 1 else None
        self.target_index = self.num_snapshots - 1
        self.phase_start = 0  # iteration at which the current target became active
        self.phase_grads: list[float] = []  # mean|x0_fake - x0_target| per generator update of the phase
        self.switches: list[list[int]] = []  # [iteration, new index] per switch
        with torch.random.fork_rng(devices=[]):  # a fixed probe input that leaves the run's random stream alone
            torch.manual_seed(0)
            t = torch.full((2,), teacher.schedule.num_timesteps // 2)
            self._probe = (torch.randn(2, *self.sample_shape), t, self.cond_sampler(2, "cpu"))
        self._point_at(self.target_index)

    def _point_at(self, index: int) -> None:
        if index > 0:
            load_snapshot(self.path_dir, index, self.target.net)
        self.real_score = self.target if index > 0 else self.teacher

    def to(self, device):
        super().to(device)
        if self.target is not None:
            self.target.to(device)
        return self

    # -- the walk ---------------------------------------------------------------------------
    def loss(self, name, s):
        loss, logs = super().loss(name, s)
        if "dm_grad_abs" in logs and self.config.switch_rule == "converged":
            self._record_dm_grad(float(logs["dm_grad_abs"]))
        logs["target_index"] = float(self.target_index)
        return loss, logs

    def _record_dm_grad(self, value: float) -> None:
        """The phase's DM-gradient magnitude, averaged over the processes so that every rank holds (and rank 0
        checkpoints) the same history and all switch together; a non-finite value is left out."""
        value = self.collective.mean([value])[0]
        if math.isfinite(value):
            self.phase_grads.append(value)

    def end_iteration(self, info):
        if self.target_index > 0 and self._switch_due(info.step + 1 - self.phase_start):
            self.switch(info.step + 1)

    def _switch_due(self, length: int) -> bool:
        c = self.config
        if c.switch_rule == "fixed":
            return length >= c.switch_every
        if length < c.switch_min_steps:
            return False
        if length >= c.switch_max_steps:
            return True
        w = c.switch_window
        if len(self.phase_grads) < 2 * w:
            return False
        start, now = sum(self.phase_grads[:w]) / w, sum(self.phase_grads[-w:]) / w  # the same on every rank
        return now < c.switch_rho * start

    @torch.no_grad()
    def _probe_output(self) -> torch.Tensor:
        x, t, cond = self._probe
        device = next(self.teacher.parameters()).device
        return self.real_score(x.to(device), t.to(device), cond.to(device) if cond is not None else None)

    def switch(self, iteration: int) -> None:
        """One step back along the path; the critic, generator, head and optimisers are kept."""
        before = self._probe_output()
        self.target_index -= 1
        self._point_at(self.target_index)
        if torch.equal(before, self._probe_output()):  # the target must actually have changed
            raise RuntimeError(f"DisBack: the switch to target {self.target_index} left the real score unchanged.")
        self.phase_start, self.phase_grads = iteration, []
        self.switches.append([iteration, self.target_index])
        name = f"S'_{self.target_index}" if self.target_index else "the teacher"
        if self.collective.is_main:
            tqdm.write(f"DisBack: iteration {iteration}: target -> {name}")

    def state_dict(self):
        return {
            "target_index": self.target_index,
            "phase_start": self.phase_start,
            "phase_grads": list(self.phase_grads),
            "switches": [list(s) for s in self.switches],
        }

    def load_state_dict(self, state):
        self.phase_start, self.phase_grads = int(state["phase_start"]), list(state["phase_grads"])
        self.switches = [list(s) for s in state["switches"]]
        self.target_index = int(state["target_index"])
        self._point_at(self.target_index)

    # -- hooks into DMD2's generator loss ------------------------------------------------------------------
    def _real_guidance_scale(self) -> float:
        if self.target_guidance == "cfg_teacher_only" and self.target_index > 0:
            return 1.0
        return self.config.guidance_scale

    def _dm_gradient(self, x, x0_real, x0_fake, t):
        if self.config.dm_weighting == "dmd2":
            return super()._dm_gradient(x, x0_real, x0_fake, t)
        # VSD / Diff-Instruct form (unverified): w(t) = sigma_t^2 on eps, i.e. omega = alpha_t sigma_t.
        a, s = self.teacher.schedule.coefficients(t, x.device)
        omega = (a * s).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return omega * (x0_fake - x0_real)

    def _card(self, extra_card):
        c = self.config
        return {
            **super()._card(extra_card),
            "method": "DisBack (Zhang et al. 2025, arXiv 2408.15991) on DMD2",
            "degradation path": f"{self.path_dir} (N = {self.num_snapshots}, {self.path['path_steps']} updates)",
            "switch rule": f"{c.switch_rule} (M = {c.switch_every})",
            "critic start": c.critic_init,
            "target guidance": self.target_guidance,
        }
