"""Train a small diffusion teacher from scratch (the bundled digits teacher was made so).

    accelerate launch train/teacher.py --output_dir outputs/digits-teacher

`--help` lists every option; docs/bundled-teachers.md says how the bundled teacher was made.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.eval.intraining import build_evaluator
    from onestep.presets.teacher import ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(ENTRY, argv, build_evaluator)


if __name__ == "__main__":
    run_main(main)
