"""Checkpoint folders of a run: listing them, writing one safely, and starting a new stage from one.

accelerate names a checkpoint's weight files model.safetensors, model_1.safetensors, ... in the order
the models were prepared; the trainer writes `models.json` beside them with the method's name for each
file, so a later stage finds its models by name whatever order it prepares them in.
"""

from __future__ import annotations

import json
import os
import shutil

from .errors import UserError

CHECKPOINT_PREFIX = "checkpoint-"
MODEL_NAMES_FILE = "models.json"
WRITER_FILE = "onestep.json"  # the method that wrote a checkpoint: {"method": "dmd2"}


def written_by(checkpoint: str) -> str | None:
    """The method recorded in a checkpoint (None for one made before methods were recorded)."""
    path = os.path.join(checkpoint, WRITER_FILE)
    try:
        with open(path) as f:
            return json.load(f).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def check_writer(checkpoint: str, method: str | None) -> None:
    """One sentence when a checkpoint was written by another method than the one about to read it."""
    writer = written_by(checkpoint)
    if method and writer and writer != method:
        raise UserError(
            f"{checkpoint} was written by a {writer} run, not {method}; resume it with train/{writer}.py, or pass a "
            f"checkpoint of a {method} run."
        )


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoints, oldest first (temporary '.tmp' folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        n for n in os.listdir(output_dir) if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX) :]))]


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, flag: str = "--output_dir") -> None:
    """The rule behind every run's folder: a run writes only into its own output folder. A new run needs a new
    or empty folder; a folder with anything in it is only written into to resume the run whose checkpoints
    it holds (the teacher's and the data's folders are checked by the run setup, which knows them). `flag`: the
    option that named the folder, for the sentence."""
    if not os.path.isdir(output_dir):
        if os.path.exists(output_dir):
            raise UserError(f"{flag} {output_dir} is a file; pass a folder (new or empty) for the run.")
        return
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not resume_from_checkpoint:
        raise UserError(
            f"{flag} {output_dir} already holds checkpoints of an earlier run; pass --resume_from_checkpoint "
            f"latest to continue it, or choose another {flag}."
        )
    contents = sorted(os.listdir(output_dir))
    resumes_here = (
        bool(checkpoints)
        and resume_from_checkpoint not in (None, "latest")
        and os.path.realpath(resume_from_checkpoint).startswith(os.path.realpath(output_dir) + os.sep)
    )
    if contents and not (checkpoints and resume_from_checkpoint == "latest") and not resumes_here:
        shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
        why = "holds no checkpoint to resume" if not checkpoints else "is not the folder of the checkpoint resumed"
        raise UserError(
            f"{flag} {output_dir} is not empty ({shown}) and {why}; a run writes only into a new or empty folder, or "
            f"the folder of the run it resumes, so that nothing there is overwritten: choose another {flag}."
        )


def check_writable(output_dir: str) -> None:
    """Create the run's folder and prove it takes files, so a read-only place fails now, in one sentence."""
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(
            f"Cannot write into --output_dir {output_dir} ({err.__class__.__name__}); choose a folder you can write to."
        ) from None


def weight_file(index: int) -> str:
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def save_checkpoint(
    accelerator, output_dir: str, step: int, model_names: list[str], limit: int | None, method: str | None = None
) -> str:
    """Write to checkpoint-<step>.tmp and rename, so an interrupted save never replaces a good one. Collective."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = final + ".tmp"
    main = accelerator.is_main_process
    if main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if main:
        with open(os.path.join(tmp, MODEL_NAMES_FILE), "w") as f:
            json.dump({weight_file(i): name for i, name in enumerate(model_names)}, f, indent=2)
        with open(os.path.join(tmp, WRITER_FILE), "w") as f:
            json.dump({"method": method, "step": step}, f)
        # Move any previous copy aside before the rename, so a good checkpoint exists at every moment.
        old = final + ".old"
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        if os.path.exists(old):
            shutil.rmtree(old)
        if limit:  # the oldest go; never the one just written (a resume from an older step sorts it mid-list)
            others = [c for c in list_checkpoints(output_dir) if os.path.realpath(c) != os.path.realpath(final)]
            for stale in others[: max(len(others) - (limit - 1), 0)]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(checkpoint: str, num_models: int, num_custom: int, num_processes: int) -> None:
    """Before resuming: every file accelerate will read is there, and each weight file's header is whole.
    A damaged or missing file is named, with an earlier checkpoint to try instead."""
    expected = [weight_file(i) for i in range(num_models)]
    expected += ["optimizer.bin" if i == 0 else f"optimizer_{i}.bin" for i in range(num_models)]
    expected += [f"custom_checkpoint_{i}.pkl" for i in range(num_custom)]
    expected += [f"random_states_{i}.pkl" for i in range(num_processes)]
    for name in expected:
        path = os.path.join(checkpoint, name)
        problem = None
        if not os.path.isfile(path):
            problem = "missing"
        elif os.path.getsize(path) == 0:
            problem = "empty"
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)  # reads the header and checks every tensor's byte range is in the file
            except Exception as err:  # safetensors raises its own error types for truncated files
                problem = f"damaged ({err.__class__.__name__})"
        if problem:
            raise UserError(f"{path} is {problem}; {earlier_checkpoint_hint(checkpoint)}")


def earlier_checkpoint_hint(checkpoint: str) -> str:
    """An earlier checkpoint of the same run (the same method) to resume from instead, if there is one."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    name = os.path.basename(os.path.abspath(checkpoint))[len(CHECKPOINT_PREFIX) :]
    step = int(name) if name.isdigit() else float("inf")
    method = written_by(checkpoint)
    earlier = [
        c
        for c in list_checkpoints(parent)
        if int(os.path.basename(c)[len(CHECKPOINT_PREFIX) :]) < step and written_by(c) in (method, None)
    ]
    if earlier:
        return f"resume from an earlier checkpoint instead: --resume_from_checkpoint {earlier[-1]}."
    return "this run has no earlier checkpoint to resume from."


def load_model_weights(
    checkpoint: str,
    models: dict,
    may_be_new: dict[str, tuple[str, ...]] | None = None,
    may_be_absent=(),
    method: str | None = None,
) -> list[str]:
    """Start `models` from the weights in an accelerate checkpoint of an earlier run (not its optimiser,
    step or random state): DMD2's stage 2 continues stage 1 with the GAN head added. Models are matched
    by name through the checkpoint's models.json (by position in checkpoints without one). Parameters whose
    names start with a prefix in `may_be_new[model]` may be missing (new in this stage). A wrapper's key
    prefix, where one was saved (torch.compile's `_orig_mod.`, DDP's `module.`), is dropped. Models named in
    `may_be_absent` that the checkpoint does not hold keep their initialisation; returns their names."""
    from .loading import read_weights

    if not os.path.isdir(checkpoint):
        raise UserError(
            f"--init_from_checkpoint {checkpoint} is not a folder; pass a checkpoint-<step> folder of an earlier run."
        )
    if method is not None:
        check_writer(checkpoint, method)
    names_path = os.path.join(checkpoint, MODEL_NAMES_FILE)
    if os.path.isfile(names_path):
        with open(names_path) as f:
            file_of = {name: file for file, name in json.load(f).items()}
    else:
        file_of = {name: weight_file(i) for i, name in enumerate(models)}
    may_be_new = may_be_new or {}
    absent = [name for name in models if name not in file_of and name in may_be_absent]
    for name, model in models.items():
        if name in absent:
            continue
        if name not in file_of:
            raise UserError(
                f"{checkpoint} holds no {name} (it holds {', '.join(sorted(file_of))}); it is from another method."
            )
        path = os.path.join(checkpoint, file_of[name])
        if not os.path.isfile(path):
            raise UserError(
                f"{checkpoint} has no {file_of[name]} (the {name}); only single-process and DDP "
                f"checkpoints can start a new stage (FSDP ones are stored in another format)."
            )
        weights = read_weights(path, "start from another checkpoint, or train the earlier stage again")
        state = {_strip_wrapper_prefix(k): v for k, v in weights.items()}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError:  # a shape mismatch
            missing, unexpected = ["(tensor shapes differ)"], []
        missing = [k for k in missing if not k.startswith(may_be_new.get(name, ()))]
        if missing or unexpected:
            raise UserError(
                f"{path} does not fit the {name} of this run (missing {missing[:2]}, unexpected {unexpected[:2]}): "
                f"it holds another architecture or LoRA setting."
            )
    return absent


def _strip_wrapper_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key
