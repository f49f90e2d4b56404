"""BOOT distillation (Gu et al. 2023): a one-step student from a diffusers teacher, without any data.

    accelerate launch train/boot.py                      # the bundled digits default, reading no digits at all

`--help` lists every option and preset; docs/methods/boot.md explains the method and its recipes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.eval.intraining import build_evaluator
    from onestep.presets.boot import ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(ENTRY, argv, build_evaluator)


if __name__ == "__main__":
    run_main(main)
