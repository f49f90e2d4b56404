"""The --help formatter and the scripts' error handling (one sentence, exit 2); the argument validators (onestep/flags.py)
are re-exported for the command-line tools."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError
from .flags import int_list, non_negative_float, non_negative_int, positive_float, positive_int

__all__ = ["int_list", "non_negative_float", "non_negative_int", "positive_float", "positive_int", "run_main"]


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
