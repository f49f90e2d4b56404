"""Argument validators, the --help formatter, and the scripts' error handling (one sentence, exit 2)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError


def _int_at_least(value: str, low: int, kind: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value!r}")
    return v


def positive_int(value: str) -> int:
    return _int_at_least(value, 1, "positive")


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0, "non-negative")


def _finite_float(value: str, allow_zero: bool) -> float:
    import math

    kind = "non-negative" if allow_zero else "positive"
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"expected a {kind} number, got {value!r}")
    return v


def positive_float(value: str) -> float:
    """A finite number above zero (clipping norms, LoRA alpha): NaN, inf, zero and negatives are refused."""
    return _finite_float(value, allow_zero=False)


def non_negative_float(value: str) -> float:
    """A finite number, zero or above (learning rates: 0 freezes a model)."""
    return _finite_float(value, allow_zero=True)


def int_list(value: str) -> list[int]:
    """Comma-separated integers, e.g. 999,749,499,249."""
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def help_formatter(defaults):
    """--help that shows every default: a flag whose name is a field of `defaults` (the default preset's
    RunConfig) shows that preset's value; the epilog lists the other presets' values."""
    groups = defaults.field_groups()

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):
            text = action.help or ""
            if not action.option_strings or action.default is argparse.SUPPRESS or "%(default)" in text:
                return text
            if action.dest in groups:
                return f"{text} (default: {defaults.get(action.dest)})"
            if action.default is not None and action.default is not False:
                return text + " (default: %(default)s)"
            return text

    return Formatter


def follow_the_launcher() -> None:
    """Under `accelerate launch` (one process) the training process is a child of the launcher, which neither
    forwards SIGTERM nor outlives it: ask the kernel (Linux) to send this process SIGTERM when the launcher
    dies, so `kill <launcher>` (what a scheduler or a user does to the command they started) finishes the
    iteration and writes a checkpoint, as a SIGTERM sent to the training process itself does. Only under the
    launcher: a process started by hand must survive its shell (nohup)."""
    if (
        not sys.platform.startswith("linux")
        or "ACCELERATE_MIXED_PRECISION" not in os.environ
        or "LOCAL_RANK" in os.environ
    ):
        return  # not accelerate's single-process launcher (torchrun's agent forwards signals itself)
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"accelerate" not in f.read():
                return
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except OSError:
        return


def run_main(main) -> None:
    """Run a script's main; bad input ends as one sentence on stderr and exit status 2. A run stopped by
    SIGTERM/SIGINT (after writing its checkpoint) exits with 128 + the signal number."""
    follow_the_launcher()
    try:
        result = main()
        if isinstance(result, dict) and result.get("interrupted"):
            sys.exit(128 + int(result.get("signal", 15)))
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
