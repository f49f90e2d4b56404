"""DMD2 distillation (Yin et al. 2024): one-step or few-step students from a diffusers teacher.

    accelerate launch train/dmd2.py                      # the bundled digits default, on a CPU
    accelerate launch train/dmd2.py --preset sd15 --pretrained_model_name_or_path ... --train_data_dir ...

`--help` lists every option and preset; docs/methods/dmd2.md explains the method and its recipes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from onestep.cli import run_main  # noqa: E402


def main(argv=None):
    from onestep.eval.intraining import build_evaluator
    from onestep.presets.dmd2 import ENTRY
    from onestep.stages import main as run_recipe

    return run_recipe(ENTRY, argv, build_evaluator)


if __name__ == "__main__":
    run_main(main)
