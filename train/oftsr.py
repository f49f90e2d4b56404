"""OFTSR (Zhu et al. 2024): a one-step x4 super-resolution student with a fidelity-realism knob t in [0, 1].

    accelerate launch train/oftsr.py                          # distil the bundled flow teacher, on a CPU
    accelerate launch train/oftsr.py --preset full-cpu        # train the flow teacher, then distil it

`--help` lists every option and preset; docs/methods/oftsr.md explains the method and its recipes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.eval.intraining import build_evaluator
    from onestep.presets.oftsr import ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(ENTRY, argv, build_evaluator)


if __name__ == "__main__":
    run_main(main)
