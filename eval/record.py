"""The JSON record written beside every figure: the number and everything needed to reproduce it."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys


def library_versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("onestep", "torch", "diffusers", "clean-fid", "open_clip_torch", "numpy", "scipy", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def new_record(metric: str, device, num_processes: int = 1) -> dict:
    return {
        "metric": metric,
        "command": "onestep-eval " + " ".join(sys.argv[1:]) if os.path.basename(sys.argv[0]).startswith("onestep-eval") else " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "num_processes": num_processes,
        "versions": library_versions(),
    }


def write_record(path: str, record: dict) -> None:
    """Atomic: a reader never sees half a file, and an earlier result is replaced only by a complete one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
