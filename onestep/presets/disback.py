"""Named, typed DisBack recipes: DMD2's (the base loop, onestep.presets.dmd2) plus the path and its walk.

Defaults that the spec leaves open (shared/methods/disback.md section 7, unverified): N = 10 snapshots,
stage 1 = 5% of the stage-2 iterations, M = stage-2 iterations / (4 N). `--max_train_steps` counts stage 2's
iterations (critic updates, as in DMD2); stage 1 adds `path_steps` updates of the degradation copy.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from ..config import Preset
from ..methods.disback import DisBackConfig
from .dmd2 import PRESETS as DMD2_PRESETS

DEFAULT_PRESET = "digits-cpu"
OUTPUT_DIR = "outputs/disback-digits"


def _from_dmd2(
    dmd2_name: str,
    name: str,
    description: str,
    notes: str = "",
    method: dict | None = None,
    trainer: dict | None = None,
) -> Preset:
    """DMD2's preset `dmd2_name` as the base loop, with DisBack's own settings on top."""
    base = DMD2_PRESETS[dmd2_name].config
    fields = {**asdict(base.method), "stage": "both", **(method or {})}  # DMD2's `stage` is another option
    output_dir = OUTPUT_DIR if name == DEFAULT_PRESET else f"outputs/disback-{name}"
    config = replace(
        base,
        method=DisBackConfig(**fields),
        trainer=replace(base.trainer, output_dir=output_dir, **(trainer or {})),
    )
    return Preset(name, description, config, notes)


_DIGITS_LR = DMD2_PRESETS["digits-cpu"].config.method.learning_rate  # stage 1 and 2 (DMD2's digits rate)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _from_dmd2(
            "digits-cpu",
            "digits-cpu",
            "Bundled default: both stages on the digits teacher (16x16), one step at t=399, GAN on, 2 CPU cores.",
            f"Stage 1: 100 updates at DMD2's digits learning rate {_DIGITS_LR:g}, as stage 2 (10 snapshots, one "
            "every 10; at DMD2's earlier 2e-4 the copy's samples turned to noise rather than to G0's); stage 2: "
            "DMD2's digits settings for 1,100 iterations, the target stepping back every 27 (M = 1100 / 40), so the "
            "teacher is the target from iteration 243 on. The 100 critic-only updates of stage 1 and the 1,100 "
            "iterations of stage 2 stand in for DMD2's 1,200 iterations.",
            method={"path_steps": 100},
            trainer={"max_train_steps": 1100},
        ),
        _from_dmd2(
            "imagenet64-edm",
            "imagenet64-edm",
            "ImageNet 64x64, EDM teacher, one step (paper: FID 1.38; its N, interval and budgets are not published).",
        ),
        _from_dmd2("sd15", "sd15", "Stable Diffusion 1.5, one step at t=999, DMD2's stage-1 settings, CFG 1.75."),
        _from_dmd2("sdxl-4step", "sdxl-4step", "SDXL base, four steps with backward simulation, CFG 8, GAN."),
        _from_dmd2(
            "sdxl-1step",
            "sdxl-1step",
            "The released SDXL run: one step at t=399, CFG 8, GAN, lr 5e-7, batch 1; stage 1 1,000 updates with a "
            "snapshot every 100; stage 2 100k iterations, a switch every 1,000.",
            "The released run started from a DMD2 SDXL one-step checkpoint (24k iterations): pass it with "
            "--initial_generator <dmd2 run>/checkpoint-24000.",
            method={"train_batch_size": 1, "path_steps": 1000, "switch_every": 1000},
            trainer={"max_train_steps": 100_000},
        ),
        _from_dmd2("sdxl-lora", "sdxl-lora", "SDXL base, four steps, LoRA on the generator (rank 64), lr 5e-5."),
    ]
}
