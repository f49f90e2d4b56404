"""The JSON record written beside every figure: the number and everything needed to reproduce it."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
from dataclasses import dataclass, field

from onestep.errors import UserError


def library_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("onestep", "torch", "diffusers", "clean-fid", "open_clip_torch", "numpy", "scipy", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class CommandLine:
    """How a record was asked for, stored in it: the command line as typed (argv, after `onestep-eval`)
    and the values its options were parsed to (name -> value)."""

    argv: list[str] = field(default_factory=list)
    arguments: dict = field(default_factory=dict)


def new_record(metric: str, device, num_processes: int = 1, command_line: CommandLine | None = None) -> dict:
    command_line = command_line or CommandLine()
    return {
        "metric": metric,
        "command": shlex.join(["onestep-eval", *command_line.argv]),
        "arguments": dict(command_line.arguments),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "num_processes": num_processes,
        "versions": library_versions(),
    }


def check_output(path: str | None, example: str, flag: str = "--output") -> None:
    """Refuse, before any work, an output path that is an existing folder: the file could not replace it at
    the very end (and PATH.tmp would be left behind). example: a file name to suggest inside that folder."""
    if path and os.path.isdir(path):
        raise UserError(
            f"{flag} {path} is a folder; give the path of a file to write, e.g. {os.path.join(path, example)}."
        )


def write_record(path: str, record: dict) -> None:
    """Atomic: a reader never sees half a file, and an earlier result is replaced only by a complete one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(record), f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def json_safe(x):
    """JSON has no Infinity/NaN: write them as strings (PSNR of identical images is "inf")."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
