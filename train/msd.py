"""MSD, multi-student distillation (Song et al. 2025): K one-step students, each on its own part of the classes or
prompts, and one pipeline that routes every item to its student.

    accelerate launch train/msd.py                       # 2 students on the bundled digits teacher, on a CPU
    accelerate launch train/msd.py --student_index 1 ... # one student per machine, then --assemble

`--help` lists every option and preset; docs/methods/msd.md explains the method and its stages.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.presets.msd import ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(ENTRY, argv)


if __name__ == "__main__":
    run_main(main)
