"""DisBack distillation (Zhang et al. 2025): DMD2 whose target score walks back a degradation path.

    accelerate launch train/disback.py                   # both stages on the bundled digits teacher, on a CPU

`--help` lists every option and preset; docs/methods/disback.md explains the method and its stages.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.eval.intraining import build_evaluator
    from onestep.presets.disback import ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(ENTRY, argv, build_evaluator)


if __name__ == "__main__":
    run_main(main)
