"""TAD-SR distillation (He et al. 2024): a one-step x4 super-resolution student from an SR diffusion teacher.

    accelerate launch train/tadsr.py                     # the bundled pixel ResShift teacher, on a CPU

`--help` lists every option and preset; docs/methods/tadsr.md explains the method, docs/super-resolution.md the
teachers (pixel, LDM-SR, the SD x4 upscaler) and data.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.eval.intraining import build_evaluator
    from onestep.presets.tadsr import ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(ENTRY, argv, build_evaluator)


if __name__ == "__main__":
    run_main(main)
