"""Train the ResShift-style pixel x4 super-resolution teacher that TAD-SR distils (the bundled one was made so).

    accelerate launch train/sr_teacher.py                # outputs/sr-resshift-teacher

`--help` lists every option; docs/bundled-teachers.md says how the bundled teacher was made.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.presets.tadsr import TEACHER_ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(TEACHER_ENTRY, argv)


if __name__ == "__main__":
    run_main(main)
