"""Typed presets, flags resolved over them, the resolved training_config.json and --config reruns."""

import dataclasses
import json
import os

import pytest

from onestep.config import RunConfig, differences, resolve, resolved_record
from onestep.errors import UserError
from onestep.methods.dmd2 import DMD2Config
from onestep.presets.dmd2 import DEFAULT_PRESET, PRESETS


def _flags(**set_flags):
    """What argparse gives train/dmd2.py: every shared and DMD2 flag, None where not given."""
    from onestep.presets.dmd2 import ENTRY
    from onestep.stages import build_parser

    return {**vars(build_parser(ENTRY).parse_args([])), **set_flags}


def test_every_flag_is_a_config_field_and_every_field_a_flag():
    flags = set(_flags()) - {"preset", "config", "stage"}
    fields = set(PRESETS[DEFAULT_PRESET].config.field_groups())
    # adam_betas, dm_weight, fake_score*, and the loop's internals have no flag (yet): say which.
    internal = {
        "adam_betas",
        "dm_weight",
        "fake_score",
        "fake_score_fp32",
        "tracker_project_name",
        "num_validation_images",
        "nan_patience",
        "export",
        "distributed_timeout_s",
        "final_checkpoint",
    }
    assert flags == fields - internal


def test_flags_override_the_preset_and_unset_flags_keep_it():
    preset_lr = PRESETS[DEFAULT_PRESET].config.method.learning_rate
    config, name = resolve(
        _flags(learning_rate=1e-3, max_train_steps=7, gan=False), PRESETS, DEFAULT_PRESET, DMD2Config
    )
    base = PRESETS[DEFAULT_PRESET].config
    assert name == DEFAULT_PRESET
    assert (config.method.learning_rate, config.trainer.max_train_steps, config.method.gan) == (1e-3, 7, False)
    assert config.method.ttur_ratio == base.method.ttur_ratio and config.trainer.ema_decay == base.trainer.ema_decay
    assert base.method.learning_rate == preset_lr != 1e-3  # the preset itself is untouched
    with pytest.raises(UserError, match="Unknown preset"):
        resolve(_flags(preset="nope"), PRESETS, DEFAULT_PRESET, DMD2Config)


def test_variants_are_built_from_their_base_and_published_recipes_are_stages():
    a, b = PRESETS["sdxl-4step"].config, PRESETS["sdxl-lora"].config
    changed = differences(a.to_dict(), b.to_dict())
    assert sorted(c.split(":")[0] for c in changed) == ["memory.lora_rank", "method.learning_rate"]
    # SD1.5 as published: distribution matching, then the GAN stage from its weights at a lower learning rate.
    dm, gan = PRESETS["sd15"].stages
    assert (dm.name, dm.method, dm.trainer) == ("dm", {"gan": False}, {"max_train_steps": 40_000})
    assert gan.init_from == "dm" and gan.method == {"gan": True, "learning_rate": 5e-7}
    regression, distill = PRESETS["sdxl-1step"].stages
    assert regression.build == "regression" and distill.init_from == "regression"


def test_config_file_round_trip_and_rerun_with_overrides(tmp_path):
    config, name = resolve(_flags(preset="sdxl-4step", seed=5), PRESETS, DEFAULT_PRESET, DMD2Config)
    record = resolved_record(config, name, "DMD2")
    assert record["versions"]["torch"] and "git_commit" in record and record["preset"] == "sdxl-4step"
    path = tmp_path / "training_config.json"
    path.write_text(json.dumps(record))
    again, again_name = resolve(_flags(config=str(path)), PRESETS, DEFAULT_PRESET, DMD2Config)
    assert again == config and again_name == "sdxl-4step"
    assert isinstance(again.method.adam_betas, tuple)  # JSON lists come back as the tuples the defaults are
    resumed = {**record, "trainer": {**record["trainer"], "resume_from_checkpoint": "elsewhere/checkpoint-600"}}
    path.write_text(json.dumps(resumed))
    rerun, _ = resolve(_flags(config=str(path)), PRESETS, DEFAULT_PRESET, DMD2Config)
    assert rerun.trainer.resume_from_checkpoint is None  # a rerun starts afresh; it does not resume that run
    path.write_text(json.dumps(record))
    changed, _ = resolve(_flags(config=str(path), max_train_steps=3), PRESETS, DEFAULT_PRESET, DMD2Config)
    assert changed.trainer.max_train_steps == 3 and changed.trainer.seed == 5
    with pytest.raises(UserError, match="not both"):
        resolve(_flags(config=str(path), preset="sd15"), PRESETS, DEFAULT_PRESET, DMD2Config)
    path.write_text(json.dumps({**record, "method": {**record["method"], "no_such_field": 1}}))
    with pytest.raises(UserError, match="no_such_field"):
        resolve(_flags(config=str(path)), PRESETS, DEFAULT_PRESET, DMD2Config)
    (tmp_path / "junk.json").write_text("[1, 2")
    with pytest.raises(UserError, match="Cannot read the config file"):
        resolve(_flags(config=str(tmp_path / "junk.json")), PRESETS, DEFAULT_PRESET, DMD2Config)


def test_field_names_are_unique_across_groups():
    @dataclasses.dataclass
    class Clashing:
        seed: int = 0  # also a trainer field

    with pytest.raises(TypeError, match="seed"):
        RunConfig(method=Clashing()).field_groups()


def test_the_trainer_writes_the_config_and_says_what_changed_on_resume(tmp_path, capsys):
    from onestep.trainer import Trainer, TrainerConfig
    from tests.test_trainer import Counting

    record = {"method": {"lr": 0.1}, "trainer": {"max_train_steps": 2}}
    Trainer(
        TrainerConfig(output_dir=str(tmp_path), max_train_steps=2, num_validation_images=0, resolved_config=record)
    ).fit(Counting())
    assert json.loads((tmp_path / "training_config.json").read_text()) == record
    new = {"method": {"lr": 0.2}, "trainer": {"max_train_steps": 4}}
    Trainer(
        TrainerConfig(
            output_dir=str(tmp_path),
            max_train_steps=4,
            num_validation_images=0,
            resolved_config=new,
            resume_from_checkpoint="latest",
        )
    ).fit(Counting())
    out = capsys.readouterr().out
    assert (
        "2 setting(s) changed" in out and "method.lr: 0.1 -> 0.2" in out and "trainer.max_train_steps: 2 -> 4" in out
    )
    assert json.loads((tmp_path / "training_config.json").read_text()) == new
    assert os.path.exists(tmp_path / "checkpoint-4")
