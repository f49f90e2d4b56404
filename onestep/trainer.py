"""The one accelerate training loop. It knows nothing about any method: a Method declares its models,
optimisers and update schedule, and computes one loss at a time; the trainer does everything else
(prepare, mixed precision, accumulation, clipping, EMA, checkpoints, resume, trackers, grids, NaN
guard, signals, timing, export)."""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from .ema import EMA
from .errors import UserError
from .methods.base import Method, StepInfo
from .sharding import as_local_scalar, check_sharding_supported, gather_for_export, is_sharded, prepare_models
from .timing import PhaseTimer, format_summary
from .utils import save_image_grid, seed_for

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainerConfig:
    output_dir: str = "outputs/run"
    max_train_steps: int = 1000              # optimisation iterations (DMD2: critic steps)
    gradient_accumulation_steps: int = 1     # micro-batches per iteration
    mixed_precision: str = "no"              # no | fp16 | bf16
    max_grad_norm: float | None = 10.0       # per-model gradient-norm clip; None = off
    lr_scheduler: str = "constant"           # constant | linear | cosine (after warm-up)
    lr_warmup_steps: int = 0                 # iterations
    ema_decay: float | None = None           # weight EMA of the method's ema_models; None = off
    checkpointing_steps: int | None = None   # iterations between checkpoints; None = only at the end
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    init_from_checkpoint: str | None = None    # start the models from an earlier run's weights (a new stage)
    report_to: str = "none"                  # none | tensorboard | wandb | all
    tracker_project_name: str = "onestep"
    validation_steps: int | None = None      # iterations between sample grids; None = start and end only
    num_validation_images: int = 16
    eval_steps: int | None = None            # iterations between in-training evaluations (needs an evaluator)
    log_every: int = 10                      # iterations between tracker/CSV log rows
    seed: int = 0
    nan_patience: int = 20                   # consecutive non-finite losses before the run stops
    export: bool = True
    distributed_timeout_s: int = 7200         # collectives' timeout: rank 0 may download or encode data while others wait
    final_checkpoint: bool = True            # benchmarks turn it off (an SD-size state is tens of GB)
    run_config: dict = field(default_factory=dict)  # recorded in the model card and trackers


class _TrainState:
    """Checkpointed loop counters (registered with accelerate)."""

    def __init__(self):
        self.step = 0
        self.nonfinite = 0

    def state_dict(self):
        return {"step": self.step, "nonfinite": self.nonfinite}

    def load_state_dict(self, state):
        self.step, self.nonfinite = int(state["step"]), int(state["nonfinite"])


def _lr_lambda(kind: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        raise UserError(f"Unknown --lr_scheduler {kind!r}; use constant, linear or cosine.")
    return fn


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoints, oldest first (temporary '.tmp' folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX):]))]


def load_model_weights(checkpoint: str, models: dict, may_be_new: tuple[str, ...] = ("head.",)) -> None:
    """Start `models` from the weights in an accelerate checkpoint of an earlier run (not its optimiser,
    step or random state): DMD2's stage 2 continues stage 1 with the GAN head added. accelerate names
    the files model.safetensors, model_1.safetensors, ... in the order the models were prepared; a
    wrapper's key prefix, where one was saved (torch.compile's `_orig_mod.`, DDP's `module.`), is dropped."""
    from safetensors.torch import load_file
    if not os.path.isdir(checkpoint):
        raise UserError(f"--init_from_checkpoint {checkpoint} is not a folder; pass a checkpoint-<step> folder of an earlier run.")
    for i, (name, model) in enumerate(models.items()):
        path = os.path.join(checkpoint, "model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not os.path.isfile(path):
            raise UserError(f"{checkpoint} has no {os.path.basename(path)} (the {name}); only single-process and DDP "
                            f"checkpoints can start a new stage (FSDP ones are stored in another format).")
        state = {_strip_wrapper_prefix(k): v for k, v in load_file(path).items()}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError:  # a shape mismatch
            missing, unexpected = ["(tensor shapes differ)"], []
        missing = [k for k in missing if not k.startswith(may_be_new)]
        if missing or unexpected:
            raise UserError(f"{path} does not fit the {name} of this run (missing {missing[:2]}, unexpected {unexpected[:2]}): "
                            f"it holds another architecture or LoRA setting.")


def _strip_wrapper_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


class Trainer:
    def __init__(self, config: TrainerConfig):
        if config.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"Unknown --mixed_precision {config.mixed_precision!r}; use no, fp16 or bf16.")
        if config.max_train_steps < 1:
            raise UserError("--max_train_steps must be at least 1.")
        self.config = config
        report_to = None if config.report_to == "none" else config.report_to
        # accelerate keeps its settings in a process-wide singleton; a second Trainer in the same
        # process (tests, notebooks, sweeps) may ask for another precision. The process group stays.
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.distributed_timeout_s))],
        )
        self.device = self.accelerator.device
        if self.device.type == "cpu":
            # `accelerate launch` pins CPU jobs to one thread (OMP_NUM_THREADS=1) unless told
            # --num_cpu_threads_per_process; share the cores among the processes instead.
            share = max(1, (os.cpu_count() or 1) // self.accelerator.num_processes)
            if torch.get_num_threads() < share and os.environ.get("ONESTEP_KEEP_THREADS") != "1":
                torch.set_num_threads(share)
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(config.seed)  # identical model construction (e.g. a fresh GAN head) on every rank
        self.timer = PhaseTimer(synchronize=self.device.type == "cuda")
        self._stop_signal = None
        self.sharded = False  # set by fit() when accelerate shards the models (FSDP)

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    # -- checkpoints -------------------------------------------------------------------------------
    def _resolve_resume(self) -> str | None:
        value = self.config.resume_from_checkpoint
        if not value:
            return None
        if value == "latest":
            found = list_checkpoints(self.config.output_dir)
            if not found:
                self.log(f"No checkpoint in {self.config.output_dir}; starting a new run.")
                return None
            return found[-1]
        if not os.path.isdir(value):
            raise UserError(f"--resume_from_checkpoint {value} is not a folder; pass 'latest' or an existing checkpoint-<step> folder.")
        return value

    def save_checkpoint(self, step: int) -> str:
        """Write to checkpoint-<step>.tmp and rename, so an interrupted save never replaces a good one."""
        acc, out = self.accelerator, self.config.output_dir
        final = os.path.join(out, f"{CHECKPOINT_PREFIX}{step}")
        tmp = final + ".tmp"
        if self.is_main and os.path.exists(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        acc.wait_for_everyone()
        if self.is_main:
            # Move any previous copy aside before the rename, so a good checkpoint exists at every moment.
            old = final + ".old"
            if os.path.exists(final):
                os.replace(final, old)
            os.replace(tmp, final)
            if os.path.exists(old):
                shutil.rmtree(old)
            if getattr(self, "_history", None):
                _write_history(*self._history)
            limit = self.config.checkpoints_total_limit
            if limit:
                for old in list_checkpoints(out)[:-limit]:
                    shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    # -- signals -----------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now, without a checkpoint
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.log(f"Signal {signum}: finishing this step, then writing a checkpoint (repeat to abort at once).")
        self._previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _restore_signal_handlers(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _any_rank(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, method: Method, data=None, evaluator=None) -> dict:
        """evaluator(sample_fn) -> {name: value}, called every eval_steps iterations and at the end with
        the EMA weights, sample_fn(n, seed) giving n student samples in [-1, 1] (e.g. onestep.eval's FID)."""
        cfg, acc = self.config, self.accelerator
        if list_checkpoints(cfg.output_dir) and not cfg.resume_from_checkpoint:
            raise UserError(f"{cfg.output_dir} already holds checkpoints of an earlier run; pass --resume_from_checkpoint "
                            f"latest to continue it, or choose another --output_dir.")
        if method.needs_data and data is None:
            raise UserError("This method needs real training data; pass --train_data_dir.")
        if acc.distributed_type.name not in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "FSDP"):
            raise UserError(f"Distributed type {acc.distributed_type.name} is not supported; use DDP (accelerate launch "
                            f"--multi_gpu) or FSDP2 (accelerate launch --config_file train/fsdp_sdxl.yaml).")
        check_sharding_supported(acc, cfg.ema_decay)
        self.sharded = is_sharded(acc)
        os.makedirs(cfg.output_dir, exist_ok=True)
        resume = self._resolve_resume()
        if cfg.init_from_checkpoint and not resume:  # a resumed run already holds its own weights
            load_model_weights(cfg.init_from_checkpoint, method.models())
            self.log(f"Started the models from {cfg.init_from_checkpoint}")
        method.timer = self.timer
        method.to(self.device)

        names = list(method.models())
        models = method.models()
        optimizers = method.optimizers()
        schedulers = {n: torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps))
                      for n, o in optimizers.items()}
        # Schedulers stay outside prepare(): accelerate would step them once per process per call,
        # and warm-up here counts iterations whatever the number of processes.
        skeletons = prepare_models(acc, models, optimizers, method.exported_models or tuple(names))
        state = _TrainState()
        acc.register_for_checkpointing(state)
        for sched in schedulers.values():
            acc.register_for_checkpointing(sched)
        method.attach(models, acc.unwrap_model, sharded=self.sharded)

        emas = {}
        if cfg.ema_decay:
            for n in method.ema_models:
                emas[n] = EMA(acc.unwrap_model(models[n]), cfg.ema_decay)
                acc.register_for_checkpointing(emas[n])

        if resume:
            self.log(f"Resuming from {resume}")
            try:
                acc.load_state(resume)
            except (OSError, RuntimeError, KeyError, ValueError) as err:
                raise UserError(f"Cannot resume from {resume} ({err.__class__.__name__}): it is not a checkpoint of this "
                                f"configuration (same method options, --ema_decay on/off).") from None
        if self.is_main and cfg.report_to != "none":
            acc.init_trackers(cfg.tracker_project_name, config=_flat(cfg.run_config))

        log_path = os.path.join(cfg.output_dir, "logs", "losses.csv")
        history = _read_history(log_path, state.step) if self.is_main else []
        self._history = (log_path, history)
        eval_path = os.path.join(cfg.output_dir, "logs", "eval.csv")
        self._evals = (eval_path, _read_history(eval_path, state.step) if self.is_main else [])
        self._evaluator = evaluator
        latest: dict[str, float] = {}  # last value of every logged quantity (G losses appear every R-th step)
        grids_dir = os.path.join(cfg.output_dir, "samples")
        trained = [models[n] for n in names]
        model_of = {u.name: u.model for u in method.updates}

        self._install_signal_handlers()
        progress = tqdm(total=cfg.max_train_steps, initial=state.step, disable=not self.is_main, desc="train")
        start, start_step = time.perf_counter(), state.step
        interrupted = False
        if state.step == 0:
            self._validate(method, models, emas, grids_dir, 0)
            self._evaluate(method, models, emas, 0)
        try:
            while state.step < cfg.max_train_steps:
                step = self._step_for_log = state.step
                due = tuple(u.name for u in method.updates if step % u.every == 0)
                finite = True
                for micro in range(cfg.gradient_accumulation_steps):
                    shared = torch.Generator().manual_seed(seed_for(cfg.seed, "shared", step))
                    info = StepInfo(step=step, due=due, shared_generator=shared, device=self.device)
                    # Every random draw of this micro-step follows from (seed, rank, step, micro), so a
                    # resumed run replays exactly what an uninterrupted one would have done.
                    torch.manual_seed(seed_for(cfg.seed, acc.process_index, step, micro))
                    with acc.accumulate(*trained), acc.autocast():
                        with self.timer.phase("data"):
                            batch = data.batch(step, micro, acc.process_index, self.device) if (data is not None and method.needs_data) else None
                        it = method.start_iteration(batch, info)
                        for name in due:
                            with self.timer.phase(name):
                                ok, out = self._update(name, it, method, models[model_of[name]], optimizers[model_of[name]])
                            finite, _ = finite and ok, latest.update(out)
                state.nonfinite = 0 if finite else state.nonfinite + 1
                if state.nonfinite >= cfg.nan_patience:
                    raise UserError(f"{state.nonfinite} iterations in a row had non-finite losses or gradients; stopping. "
                                    f"Lower the learning rate or use bf16 instead of fp16, and resume from the last checkpoint.")
                state.step += 1
                for sched in schedulers.values():
                    sched.step()
                for n, ema in emas.items():
                    if any(model_of[u] == n for u in due):  # average the model's updates, not idle iterations
                        ema.update(acc.unwrap_model(models[n]))
                progress.update(1)
                if self.is_main and (state.step % cfg.log_every == 0 or state.step == cfg.max_train_steps):
                    logs = dict(latest, lr=next(iter(schedulers.values())).get_last_lr()[0] if schedulers else 0.0)
                    history.append({"step": state.step, **logs})
                    progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "lr"})
                    if cfg.report_to != "none":
                        acc.log(logs, step=state.step)
                if cfg.validation_steps and state.step % cfg.validation_steps == 0 and state.step < cfg.max_train_steps:
                    self._validate(method, models, emas, grids_dir, state.step)
                if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < cfg.max_train_steps:
                    self._evaluate(method, models, emas, state.step)
                stop = self._any_rank(self._stop_signal is not None)
                at_interval = cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0
                if (at_interval or stop) and state.step < cfg.max_train_steps:
                    with self.timer.phase("checkpoint"):
                        path = self.save_checkpoint(state.step)
                    self.log(f"Saved {path}")
                if stop and state.step < cfg.max_train_steps:
                    interrupted = True
                    break
        finally:
            progress.close()
            self._restore_signal_handlers()

        elapsed = time.perf_counter() - start
        summary = self.timer.summary(elapsed, state.step - start_step)
        result = {"step": state.step, "interrupted": interrupted, "signal": self._stop_signal, "timing": summary}
        if self.is_main:
            _write_history(*self._history)
            _plot_history(history, os.path.join(cfg.output_dir, "loss_curves.png"))
            with open(os.path.join(cfg.output_dir, "timing.json"), "w") as f:
                json.dump(summary, f, indent=2)
        if interrupted:
            self.log(f"Stopped by signal {self._stop_signal} at step {state.step}; resume with --resume_from_checkpoint latest.")
            acc.end_training()
            return result
        if cfg.final_checkpoint:
            path = self.save_checkpoint(state.step)
            self.log(f"Saved {path}")
        if not self.sharded:  # DDP replicas must agree; FSDP ranks hold different shards by design
            self._write_weight_digests(models)
        self._validate(method, models, emas, grids_dir, state.step)
        result["eval"] = self._evaluate(method, models, emas, state.step)
        if cfg.export:
            acc.wait_for_everyone()
            full = gather_for_export(acc, models, skeletons) if self.sharded else None
            if self.is_main:
                card = {"training_steps": state.step, "ema_decay": cfg.ema_decay, "eval": result["eval"], **cfg.run_config}
                if full is not None:
                    method.export(full, cfg.output_dir, card)
                else:
                    with _ema_weights(emas, acc, models):
                        method.export({n: acc.unwrap_model(m) for n, m in models.items()}, cfg.output_dir, card)
            acc.wait_for_everyone()
        self.log(format_summary(summary))
        acc.end_training()
        return result

    def _update(self, name, it, method, model, optimizer) -> tuple[bool, dict[str, float]]:
        """One loss -> backward -> clip -> step, skipped on every rank if any rank's loss or gradient
        is not finite. With clipping on, the gradient norm is the one check (a non-finite loss gives a
        non-finite norm), so an update costs a single cross-rank reduction."""
        cfg, acc = self.config, self.accelerator
        loss, logs = method.loss(name, it)
        clip = acc.sync_gradients and cfg.max_grad_norm
        if not clip and self._any_rank(not bool(torch.isfinite(loss.detach()))):
            self.log(f"Non-finite {name} loss at step {self._step_for_log}; update skipped.")
            optimizer.zero_grad(set_to_none=True)
            return False, {}
        acc.backward(loss)
        if clip:
            norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if self._any_rank(not bool(torch.isfinite(as_local_scalar(norm)))):
                self.log(f"Non-finite {name} loss or gradient at step {self._step_for_log}; update skipped.")
                optimizer.zero_grad(set_to_none=True)
                return False, {}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True, {k: float(v) for k, v in logs.items()}

    def _write_weight_digests(self, models) -> None:
        """Each rank records a hash of its trained weights: replicas must agree after a DDP run."""
        import hashlib
        digests = {}
        for name, model in models.items():
            h = hashlib.sha256()
            for key, tensor in sorted(self.accelerator.unwrap_model(model).state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().float().cpu().numpy().tobytes())
            digests[name] = h.hexdigest()
        path = os.path.join(self.config.output_dir, "logs", f"weights-rank{self.accelerator.process_index}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(digests, f, indent=2)

    def _evaluate(self, method, models, emas, step) -> dict:
        """In-training metrics on the main process (other ranks go on and wait at the next reduction)."""
        if self._evaluator is None or not self.is_main:
            return {}
        if self.sharded:  # the evaluator samples on the main process only, and every FSDP forward is collective
            self.log(f"step {step}: in-training evaluation is not available with FSDP; evaluate the export with onestep-eval.")
            return {}
        try:
            with self.timer.phase("evaluation"), _sampling_models(emas, self.accelerator, models) as unwrapped:
                values = self._evaluator(lambda n, seed: method.sample_grid(unwrapped, n, seed, self.device))
        except UserError as err:  # e.g. a singular covariance early in training: report it, keep training
            self.log(f"step {step}: evaluation skipped: {err}")
            return {}
        path, rows = self._evals
        rows[:] = [r for r in rows if r["step"] != step] + [{"step": step, **values}]
        _write_history(path, rows)
        _plot_history(rows, os.path.join(os.path.dirname(path), "eval.png"))
        if self.config.report_to != "none":
            self.accelerator.log(values, step=step)
        self.log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values

    def _validate(self, method, models, emas, grids_dir, step):
        # Under FSDP every rank samples (each forward gathers weights from all of them); one saves.
        if not (self.is_main or self.sharded) or self.config.num_validation_images <= 0:
            return
        with self.timer.phase("validation"), _sampling_models(emas, self.accelerator, models) as unwrapped:
            images = method.sample_grid(unwrapped, self.config.num_validation_images, self.config.seed, self.device)
            if self.is_main:
                save_image_grid(images, os.path.join(grids_dir, f"step-{step:06d}.png"))


@contextlib.contextmanager
def _sampling_models(emas, acc, models):
    """The unwrapped models with EMA weights swapped in and in eval mode; everything restored after."""
    with _ema_weights(emas, acc, models):
        unwrapped = {n: acc.unwrap_model(m) for n, m in models.items()}
        modes = {n: m.training for n, m in unwrapped.items()}
        for m in unwrapped.values():
            m.eval()
        try:
            yield unwrapped
        finally:
            for n, m in unwrapped.items():
                m.train(modes[n])


class _ema_weights:
    """Context: swap EMA weights into the live models (validation, export), then swap back."""

    def __init__(self, emas, acc, models):
        self.pairs = [(ema, acc.unwrap_model(models[n])) for n, ema in emas.items()]

    def __enter__(self):
        for ema, model in self.pairs:
            ema.swap(model)

    def __exit__(self, *exc):
        for ema, model in self.pairs:
            ema.swap(model)


def _flat(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


def _read_history(path: str, upto: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    import csv
    with open(path) as f:
        rows = [{k: (int(float(v)) if k == "step" else float(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= upto]


def _write_history(path: str, history: list[dict]) -> None:
    import csv
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys = sorted({k for r in history for k in r} - {"step"})
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", *keys])
        w.writeheader()
        w.writerows(history)
    os.replace(path + ".tmp", path)


def _plot_history(history: list[dict], path: str) -> None:
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({k for r in history for k in r} - {"step", "lr"})
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2 * max(len(keys), 1)), squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_ylabel(key, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
