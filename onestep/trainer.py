"""The one accelerate training loop. It knows nothing about any method: a Method declares its models,
optimisers and update schedule, and computes one loss at a time; the trainer does everything else
(prepare, mixed precision, accumulation, clipping, EMA, checkpoints, resume, trackers, grids, NaN
guard, signals, timing, export). `fit` is three parts: `_setup` (prepare and resume), `_loop` (the
iterations) and `_finish` (final checkpoint, evaluation, export)."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from tqdm.auto import tqdm

from .checkpoints import (
    check_output_dir,
    check_writable,
    check_writer,
    earlier_checkpoint_hint,
    list_checkpoints,
    load_model_weights,
    save_checkpoint,
    verify_checkpoint,
)
from .config import CONFIG_FILE, TrainerConfig, differences
from .ema import EMA
from .errors import UserError
from .methods.base import Collective, Method, StepInfo
from .run_logs import flat, plot_history, read_history, write_history
from .sharding import as_local_scalar, check_sharding_supported, gather_for_export, is_sharded, prepare_models
from .timing import PhaseTimer, format_summary
from .utils import save_image_grid, seed_for

__all__ = ["Trainer", "TrainerConfig", "RunState", "list_checkpoints", "load_model_weights"]


def user_thread_setting() -> int | None:
    """The thread count the user asked for (OMP_NUM_THREADS, or accelerate's --num_cpu_threads_per_process), or
    None. accelerate's launcher sets OMP_NUM_THREADS=1 for its children whenever the user set nothing, so under
    the launcher its own environment (the user's, Linux's /proc) tells the two apart."""
    value = os.environ.get("OMP_NUM_THREADS")
    if os.environ.get("ONESTEP_KEEP_THREADS") == "1":
        return torch.get_num_threads()
    if value is None:
        return None
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # a child of `accelerate launch`
        try:
            with open(f"/proc/{os.getppid()}/environ", "rb") as f:
                parent = f.read().split(b"\0")
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                launcher = f.read()
        except OSError:
            return int(value) if value.isdigit() else None
        user_set = any(v.startswith(b"OMP_NUM_THREADS=") for v in parent)
        if b"accelerate" in launcher and not user_set and b"--num_cpu_threads_per_process" not in launcher:
            return None
    return int(value) if value.isdigit() else None


class _CutShort(Exception):
    """Raised by the signal handler inside a sample grid or an evaluation (Trainer._optional)."""


class RunState:
    """The loop's counters: the one piece of run state the trainer checkpoints (with accelerate)."""

    def __init__(self):
        self.step = 0  # optimisation iterations completed
        self.nonfinite = 0  # iterations in a row whose losses or gradients were not finite
        self.seconds = 0.0  # wall-clock seconds of the iterations so far (no grids, evaluations or checkpoints)

    def state_dict(self):
        return {"step": self.step, "nonfinite": self.nonfinite, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.step, self.nonfinite = int(state["step"]), int(state["nonfinite"])
        self.seconds = float(state.get("seconds", 0.0))


class _MethodState:
    """A method's own state (DisBack's target index, MSD's router, ...) as accelerate checkpoints it."""

    def __init__(self, method: Method):
        self.method = method

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, state):
        self.method.load_state_dict(state)


@dataclass
class _Run:
    """Everything one fit() holds while it runs (not checkpointed: rebuilt by _setup)."""

    method: Method
    data: object
    models: dict
    optimizers: dict
    schedulers: dict
    emas: dict
    skeletons: dict  # weightless copies to gather exported models into (FSDP)
    state: RunState
    history: list  # rows of logs/losses.csv
    resumed_from: str | None
    finished_before: bool  # resumed a run that had already reached max_train_steps
    latest: dict = field(default_factory=dict)  # last value of every logged quantity (G losses appear every R-th step)
    interrupted: bool = False


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


class Trainer:
    def __init__(self, config: TrainerConfig):
        if config.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"Unknown --mixed_precision {config.mixed_precision!r}; use no, fp16 or bf16.")
        if config.max_train_steps < 1:
            raise UserError("--max_train_steps must be at least 1.")
        if config.report_to == "wandb":
            try:
                import wandb  # noqa: F401  (the optional extra onestep[wandb])
            except ImportError:
                raise UserError("--report_to wandb needs the wandb package: pip install 'onestep[wandb]'.") from None
        check_output_dir(config.output_dir, config.resume_from_checkpoint, config.folder_flag)  # before any writes
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
            project_config=ProjectConfiguration(
                project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
            ),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.distributed_timeout_s))],
        )
        self.device = self.accelerator.device
        if self.device.type == "cpu" and user_thread_setting() is None:
            # `accelerate launch` pins CPU jobs to one thread (OMP_NUM_THREADS=1) unless told otherwise; when the
            # user set no thread count, share the cores among the processes instead.
            share = max(1, (os.cpu_count() or 1) // self.accelerator.num_processes)
            if torch.get_num_threads() < share:
                torch.set_num_threads(share)
        self.is_main = self.accelerator.is_main_process
        if config.mixed_precision == "fp16" and self.device.type == "cpu":
            raise UserError(
                "--mixed_precision fp16 needs a GPU (on the CPU it would train in fp32 without a word); "
                "use --mixed_precision no, or bf16."
            )
        self.accelerator.wait_for_everyone()  # every rank has checked the folder; now the main process may write
        if self.is_main:
            check_writable(config.output_dir)
        torch.manual_seed(config.seed)  # identical model construction (e.g. a fresh GAN head) on every rank
        self.timer = PhaseTimer(synchronize=self.device.type == "cuda")
        self._stop_signal = None
        self.sharded = False  # set by fit() when accelerate shards the models (FSDP)

    @property
    def method_key(self) -> str | None:
        """The method this run trains, as training_config.json and each checkpoint record it."""
        return self.config.resolved_config.get("onestep_method")

    @property
    def export_dir(self) -> str:
        """Where the student is exported: the run's folder (a stage of several writes into the run's, or its own)."""
        return self.config.export_dir or self.config.output_dir

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
            raise UserError(
                f"--resume_from_checkpoint {value} is not a folder; pass 'latest' or an existing checkpoint-<step> folder."
            )
        return value

    def save_checkpoint(self, step: int) -> str:
        run = self._run
        path = save_checkpoint(
            self.accelerator,
            self.config.output_dir,
            step,
            list(run.models),
            self.config.checkpoints_total_limit,
            method=self.method_key,
        )
        if self.is_main:
            write_history(self._log_path, run.history)  # the CSV always reaches the newest checkpoint
        return path

    # -- signals -----------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, frame):
            # The same signal again, a second or more after the first (Ctrl-C twice): stop now, without a
            # checkpoint. Anything else changes nothing: another signal after the first (the launcher's death
            # after a Ctrl-C, see cli.follow_the_launcher), or a copy of the first within a second (a dying
            # accelerate launcher was measured to deliver SIGTERM twice, 0.16 s apart, on a loaded machine).
            now = time.monotonic()
            if self._stop_signal == signum and now - self._stop_time > 1.0:
                raise KeyboardInterrupt
            if self._stop_signal is not None:
                return
            self._stop_signal, self._stop_time = signum, now
            self.log(f"Signal {signum}: finishing this step, then writing a checkpoint (repeat to abort at once).")
            if self._optional_phase:  # a sample grid or an evaluation: cut it short, the checkpoint comes first
                raise _CutShort

        self._optional_phase = False
        self._previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _optional(self, work) -> None:
        """Sample grids and in-training evaluations give way to a stop signal: `accelerate launch` forwards SIGTERM
        and kills the training process 5 seconds later, so the checkpoint must not wait for an evaluation."""
        if self._stop_signal is not None:
            return
        self._optional_phase = True
        try:
            work()
        except _CutShort:
            self.log("The sample grid or evaluation was cut short by the signal.")
        finally:
            self._optional_phase = False

    def _restore_signal_handlers(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _any_rank(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # -- fit = set-up, loop, finish ----------------------------------------------------------------
    def fit(self, method: Method, data=None, evaluator=None) -> dict:
        """evaluator(sample_fn) -> {name: value}, called every eval_steps iterations and at the end with
        the EMA weights, sample_fn(n, seed) giving n student samples in [-1, 1] (e.g. onestep.eval's FID)."""
        self._evaluator = evaluator
        run = self._run = self._setup(method, data)
        if run.finished_before and (
            not self.config.export or os.path.isfile(os.path.join(self.export_dir, "model_index.json"))
        ):
            self.accelerator.end_training()  # the run's export, timing and logs stay as they are
            return {"step": run.state.step, "interrupted": False, "signal": None, "already_finished": True}
        start, start_step = time.perf_counter(), run.state.step
        self._loop(run)
        summary = self.timer.summary(time.perf_counter() - start, run.state.step - start_step)
        summary["train_seconds"] = run.state.seconds  # the iterations' wall-clock time, resumed runs included
        if self.device.type == "cpu":
            summary["cpu_threads"] = torch.get_num_threads()  # the user's OMP_NUM_THREADS, or a share of the cores
        return self._finish(run, summary)

    def _setup(self, method: Method, data) -> _Run:
        """Checks, preparation of the method's models with accelerate, resume."""
        cfg, acc = self.config, self.accelerator
        if method.needs_data and data is None:
            raise UserError("This method needs real training data; pass --train_data_dir.")
        if acc.distributed_type.name not in (
            "NO",
            "MULTI_CPU",
            "MULTI_GPU",
            "MULTI_XPU",
            "MULTI_NPU",
            "MULTI_MLU",
            "FSDP",
        ):
            raise UserError(
                f"Distributed type {acc.distributed_type.name} is not supported; use DDP (accelerate launch "
                f"--multi_gpu) or FSDP2 (accelerate launch --config_file train/fsdp_sdxl.yaml)."
            )
        check_sharding_supported(acc, cfg.ema_decay)
        self.sharded = is_sharded(acc)
        os.makedirs(cfg.output_dir, exist_ok=True)
        resume = self._resolve_resume()
        if cfg.init_from_checkpoint and not resume:  # a resumed run already holds its own weights
            absent = load_model_weights(
                cfg.init_from_checkpoint, method.models(), method.new_in_stage, method.fresh_in_stage, self.method_key
            )
            fresh = f" ({', '.join(absent)} not in it: started afresh)" if absent else ""
            self.log(f"Started the models from {cfg.init_from_checkpoint}{fresh}")
        method.timer = self.timer
        method.collective = _ProcessGroup(self)
        method.to(self.device)

        models, optimizers = method.models(), method.optimizers()
        # Schedulers stay outside prepare(): accelerate would step them once per process per call,
        # and warm-up here counts iterations whatever the number of processes.
        schedulers = {
            n: torch.optim.lr_scheduler.LambdaLR(
                o,
                _lr_lambda(
                    cfg.lr_scheduler, 0 if n in method.no_lr_warmup else cfg.lr_warmup_steps, cfg.max_train_steps
                ),
            )
            for n, o in optimizers.items()
        }
        skeletons = prepare_models(acc, models, optimizers, method.exported_models or tuple(models))
        state = RunState()
        acc.register_for_checkpointing(state)
        for sched in schedulers.values():
            acc.register_for_checkpointing(sched)
        method.attach(models, acc.unwrap_model)
        emas = {}
        if cfg.ema_decay:
            for n in method.ema_models:
                emas[n] = EMA(acc.unwrap_model(models[n]), cfg.ema_decay, cfg.ema_warmup)
                acc.register_for_checkpointing(emas[n])
        acc.register_for_checkpointing(_MethodState(method))

        if resume:
            check_writer(resume, self.method_key)
            self._report_config_changes()
            self.log(f"Resuming from {resume}")
            verify_checkpoint(resume, len(models), len(acc._custom_objects), acc.num_processes)
            try:
                acc.load_state(resume)
            except (OSError, RuntimeError, KeyError, ValueError, EOFError) as err:
                first = str(err).splitlines()[0][:200] if str(err) else ""
                raise UserError(
                    f"Cannot resume from {resume} ({err.__class__.__name__}: {first}): either a file in it is damaged, "
                    f"or it is a checkpoint of another configuration (method options, --ema_decay on/off); "
                    f"{earlier_checkpoint_hint(resume)}"
                ) from None
        finished_before = bool(resume) and state.step >= cfg.max_train_steps
        if not finished_before:
            self._write_config()  # only once the resume has worked: a failed start leaves the folder as it was
        if finished_before:
            self.log(
                f"{resume} is the end of this run ({state.step} of {cfg.max_train_steps} iterations): nothing left "
                f"to train. Pass a larger --max_train_steps to train further."
            )
        elif self.is_main and cfg.report_to != "none":
            tracked = {
                f"{g}.{k}": v for g, d in cfg.resolved_config.items() if isinstance(d, dict) for k, v in d.items()
            }
            acc.init_trackers(cfg.tracker_project_name, config=flat(tracked or cfg.run_config))

        self._log_path = os.path.join(cfg.output_dir, "logs", "losses.csv")
        eval_path = os.path.join(cfg.output_dir, "logs", "eval.csv")
        self._evals = (eval_path, read_history(eval_path, state.step) if self.is_main else [])
        history = read_history(self._log_path, state.step) if self.is_main else []
        return _Run(
            method, data, models, optimizers, schedulers, emas, skeletons, state, history, resume, finished_before
        )

    def _report_config_changes(self) -> None:
        """On resume: say which settings differ from those the run was started with."""
        path = os.path.join(self.config.output_dir, CONFIG_FILE)
        if not (self.is_main and self.config.resolved_config and os.path.isfile(path)):
            return
        with open(path) as f:
            earlier = json.load(f)
        writer, mine = earlier.get("onestep_method"), self.method_key
        if writer and mine and writer != mine:
            raise UserError(
                f"{path} was written by a {writer} run, not {mine}: {self.config.output_dir} holds another method's "
                f"run; resume it with train/{writer}.py, or choose another --output_dir."
            )
        changed = differences(earlier, json.loads(json.dumps(self.config.resolved_config, default=str)))
        if changed:
            self.log(
                f"Resuming with {len(changed)} setting(s) changed since {CONFIG_FILE} was written: "
                + "; ".join(changed)
            )

    def _write_config(self) -> None:
        """The resolved configuration of the run, written before the first iteration (and again on resume)."""
        if not (self.is_main and self.config.resolved_config):
            return
        path = os.path.join(self.config.output_dir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.config.resolved_config, f, indent=2, default=str)
        os.replace(path + ".tmp", path)

    def _loop(self, run: _Run) -> None:
        """The iterations, until max_train_steps or a stop signal."""
        cfg, acc, method, state, models = self.config, self.accelerator, run.method, run.state, run.models
        model_of = {u.name: u.model for u in method.updates}
        trained = list(models.values())
        self._install_signal_handlers()
        progress = tqdm(total=cfg.max_train_steps, initial=state.step, disable=not self.is_main, desc="train")
        if state.step == 0:
            self._optional(lambda: (self._validate(run, 0), self._evaluate(run, 0)))
        try:
            while state.step < cfg.max_train_steps:
                started = time.perf_counter()
                step = self._step_for_log = state.step
                # 1. Which updates run now (e.g. DMD2: the generator every R-th iteration, the critic every one).
                due = tuple(u.name for u in method.updates if step % u.every == 0)
                finite = True
                for micro in range(cfg.gradient_accumulation_steps):
                    # 2. Every random draw of this micro-step follows from (seed, rank, step, micro), so a
                    #    resumed run replays exactly what an uninterrupted one would have done.
                    shared = torch.Generator().manual_seed(seed_for(cfg.seed, "shared", step))
                    info = StepInfo(step=step, due=due, shared_generator=shared, device=self.device)
                    torch.manual_seed(seed_for(cfg.seed, acc.process_index, step, micro))
                    with acc.accumulate(*trained), acc.autocast():
                        # 3. The batch for (step, micro, rank), and the method's shared work (DMD2: x = G(z)).
                        with self.timer.phase("data"):
                            batch = (
                                run.data.batch(step, micro, acc.process_index, self.device)
                                if (run.data is not None and method.needs_data)
                                else None
                            )
                        it = method.start_iteration(batch, info)
                        # 4. One loss -> backward -> clip -> step per due update, skipped if not finite.
                        for name in due:
                            with self.timer.phase(name):
                                ok, out = self._update(
                                    name, it, method, models[model_of[name]], run.optimizers[model_of[name]]
                                )
                            finite, _ = finite and ok, run.latest.update(out)
                # 5. NaN guard, then the counters, learning rates and weight EMAs move on.
                state.nonfinite = 0 if finite else state.nonfinite + 1
                if state.nonfinite >= cfg.nan_patience:
                    raise UserError(
                        f"{state.nonfinite} iterations in a row had non-finite losses or gradients; stopping. "
                        f"Lower the learning rate or use bf16 instead of fp16, and resume from the last checkpoint."
                    )
                method.end_iteration(info)
                state.step += 1
                for sched in run.schedulers.values():
                    sched.step()
                for n, ema in run.emas.items():
                    if any(model_of[u] == n for u in due):  # average the model's updates, not idle iterations
                        ema.update(acc.unwrap_model(models[n]))
                state.seconds += time.perf_counter() - started
                progress.update(1)
                # 6. Logs, sample grids, in-training evaluation.
                self._log_row(run, progress)
                if (
                    cfg.validation_steps
                    and state.step % cfg.validation_steps == 0
                    and state.step < cfg.max_train_steps
                ):
                    self._optional(lambda: self._validate(run, state.step))
                if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < cfg.max_train_steps:
                    self._optional(lambda: self._evaluate(run, state.step))
                # 7. Checkpoint at the interval or on a stop signal (any rank's), then stop if signalled.
                stop = self._any_rank(self._stop_signal is not None)
                at_interval = cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0
                if (at_interval or stop) and state.step < cfg.max_train_steps:
                    with self.timer.phase("checkpoint"):
                        path = self.save_checkpoint(state.step)
                    self.log(f"Saved {path}")
                if stop and state.step < cfg.max_train_steps:
                    run.interrupted = True
                    break
        finally:
            progress.close()
            self._restore_signal_handlers()

    def _log_row(self, run: _Run, progress) -> None:
        cfg, step = self.config, run.state.step
        if not self.is_main or (step % cfg.log_every and step != cfg.max_train_steps):
            return
        logs = dict(run.latest, lr=next(iter(run.schedulers.values())).get_last_lr()[0] if run.schedulers else 0.0)
        run.history.append({"step": step, **logs})
        progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "lr"})
        if cfg.report_to != "none":
            self.accelerator.log(logs, step=step)

    def _finish(self, run: _Run, summary: dict) -> dict:
        """Records, then (unless interrupted) the final checkpoint, grids, evaluation and the export."""
        cfg, acc, state, models = self.config, self.accelerator, run.state, run.models
        result = {"step": state.step, "interrupted": run.interrupted, "signal": self._stop_signal, "timing": summary}
        if self.is_main and not run.finished_before:  # a finished run resumed only to export keeps its own records
            write_history(self._log_path, run.history)
            plot_history(run.history, os.path.join(cfg.output_dir, "loss_curves.png"))
            with open(os.path.join(cfg.output_dir, "timing.json"), "w") as f:
                json.dump(summary, f, indent=2)
        if run.interrupted:
            self.log(
                f"Stopped by signal {self._stop_signal} at step {state.step}; resume with --resume_from_checkpoint latest."
            )
            acc.end_training()
            return result
        if cfg.final_checkpoint and not run.finished_before:
            path = self.save_checkpoint(state.step)
            self.log(f"Saved {path}")
        if not self.sharded:  # DDP replicas must agree; FSDP ranks hold different shards by design
            self._write_weight_digests(models)
        self._validate(run, state.step)
        result["eval"] = self._evaluate(run, state.step)
        if cfg.export:
            acc.wait_for_everyone()
            full = gather_for_export(acc, models, run.skeletons) if self.sharded else None
            if self.is_main:
                card = {
                    "training_steps": state.step,
                    "ema_decay": cfg.ema_decay,
                    "eval": result["eval"],
                    **cfg.run_config,
                }
                if full is not None:
                    run.method.export(full, self.export_dir, card)
                else:
                    with _ema_weights(run.emas, acc, models):
                        run.method.export({n: acc.unwrap_model(m) for n, m in models.items()}, self.export_dir, card)
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

    def _evaluate(self, run: _Run, step: int) -> dict:
        """In-training metrics on the main process (other ranks go on and wait at the next reduction)."""
        if self._evaluator is None or not self.is_main:
            return {}
        if self.sharded:  # the evaluator samples on the main process only, and every FSDP forward is collective
            self.log(
                f"step {step}: in-training evaluation is not available with FSDP; evaluate the export with onestep-eval."
            )
            return {}
        try:
            with self.timer.phase("evaluation"), _sampling_models(run.emas, self.accelerator, run.models) as unwrapped:
                values = self._evaluator(lambda n, seed: run.method.sample_grid(unwrapped, n, seed, self.device))
        except UserError as err:  # e.g. a singular covariance early in training: report it, keep training
            self.log(f"step {step}: evaluation skipped: {err}")
            return {}
        path, rows = self._evals
        row = {"step": step, **values, "train_seconds": round(run.state.seconds, 3)}
        rows[:] = [r for r in rows if r["step"] != step] + [row]
        write_history(path, rows)
        plot_history(rows, os.path.join(os.path.dirname(path), "eval.png"))
        if self.config.report_to != "none":
            self.accelerator.log(values, step=step)
        self.log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values

    def _validate(self, run: _Run, step: int) -> None:
        # Under FSDP every rank samples (each forward gathers weights from all of them); one saves.
        if not (self.is_main or self.sharded) or self.config.num_validation_images <= 0:
            return
        with self.timer.phase("validation"), _sampling_models(run.emas, self.accelerator, run.models) as unwrapped:
            images = run.method.sample_grid(
                unwrapped, self.config.num_validation_images, self.config.seed, self.device
            )
            if self.is_main:
                path = os.path.join(self.config.output_dir, "samples", f"step-{step:06d}.png")
                save_image_grid(images, path, min_width=512)


class _ProcessGroup(Collective):
    """The collectives a method may ask for, on the trainer's accelerator (Method.collective)."""

    def __init__(self, trainer: Trainer):
        self.accelerator = trainer.accelerator
        self.is_main = trainer.is_main

    def mean(self, values: list[float]) -> list[float]:
        if self.accelerator.num_processes == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="mean").tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


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
