import math
import os

import pytest
import torch
from torch import nn

from onestep.methods.base import Method, Update
from onestep.trainer import Trainer, TrainerConfig, list_checkpoints


class Counting(Method):
    """Two linear 'models' on a quadratic loss; records which updates ran at which step."""

    needs_data = False

    def __init__(self, ratio=3, nan_at=()):
        super().__init__()
        self.updates = [Update("generator", "generator", every=ratio), Update("critic", "critic", every=1)]
        self.gen, self.crit = nn.Linear(2, 2), nn.Linear(2, 2)
        self.calls, self.nan_at = [], set(nan_at)

    def models(self):
        return {"generator": self.gen, "critic": self.crit}

    def optimizers(self):
        return {
            "generator": torch.optim.SGD(self.gen.parameters(), lr=0.1),
            "critic": torch.optim.SGD(self.crit.parameters(), lr=0.1),
        }

    def start_iteration(self, batch, info):
        self.step = info.step
        return torch.randn(4, 2)

    def loss(self, name, x):
        self.calls.append((self.step, name))
        model = self.prepared[name]
        loss = model(x).square().mean()
        if (self.step, name) in self.nan_at:
            loss = loss * float("nan")
        return loss, {f"loss_{name}": loss.detach()}

    def sample_grid(self, models, num, seed, device):
        return torch.zeros(num, 1, 2, 2)

    def export(self, models, output_dir, extra_card):
        pass


def test_update_ratio_one_generator_step_per_r_critic_steps(tmp_path):
    m = Counting(ratio=5)
    Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=23, num_validation_images=0)).fit(m)
    gen_steps = [s for s, n in m.calls if n == "generator"]
    crit_steps = [s for s, n in m.calls if n == "critic"]
    assert crit_steps == list(range(23))
    assert gen_steps == [0, 5, 10, 15, 20] and len(gen_steps) == math.ceil(23 / 5)
    # Within an iteration the generator update runs before the critic's, as in DMD2's training loop.
    assert m.calls[:2] == [(0, "generator"), (0, "critic")]


def test_gradient_accumulation_counts_iterations_not_micro_batches(tmp_path):
    m = Counting(ratio=2)
    Trainer(
        TrainerConfig(
            output_dir=str(tmp_path), max_train_steps=4, gradient_accumulation_steps=3, num_validation_images=0
        )
    ).fit(m)
    assert [s for s, n in m.calls if n == "generator"] == [0, 0, 0, 2, 2, 2]
    assert len([1 for s, n in m.calls if n == "critic"]) == 12


def test_nan_guard_skips_the_update_and_keeps_weights_finite(tmp_path):
    m = Counting(ratio=1, nan_at={(2, "critic")})
    Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=5, num_validation_images=0)).fit(m)
    assert all(torch.isfinite(p).all() for p in m.crit.parameters())
    assert (2, "critic") in m.calls and [s for s, n in m.calls if n == "critic"] == list(range(5))


def test_nan_guard_stops_after_patience(tmp_path):
    m = Counting(ratio=1, nan_at={(s, "critic") for s in range(100)})
    from onestep.errors import UserError

    with pytest.raises(UserError, match="non-finite"):
        Trainer(
            TrainerConfig(output_dir=str(tmp_path), max_train_steps=50, nan_patience=3, num_validation_images=0)
        ).fit(m)


def test_checkpoints_total_limit_and_no_temporary_leftovers(tmp_path):
    m = Counting()
    Trainer(
        TrainerConfig(
            output_dir=str(tmp_path),
            max_train_steps=10,
            checkpointing_steps=2,
            checkpoints_total_limit=2,
            num_validation_images=0,
        )
    ).fit(m)
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint-8", "checkpoint-10"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_ema_is_checkpointed_and_swapped_for_export(tmp_path):
    exported = {}

    class Exporting(Counting):
        ema_models = ("generator",)

        def export(self, models, output_dir, extra_card):
            exported["w"] = models["generator"].weight.detach().clone()

    m = Exporting()
    Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=6, ema_decay=0.5, num_validation_images=0)).fit(m)
    assert not torch.allclose(exported["w"], m.gen.weight)  # export saw the EMA weights ...
    ckpt = list_checkpoints(str(tmp_path))[-1]
    assert os.path.exists(os.path.join(ckpt, "custom_checkpoint_0.pkl"))  # ... and the EMA is in the checkpoint


def test_timing_summary_names_every_phase(tmp_path):
    m = Counting()
    result = Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=4, num_validation_images=0)).fit(m)
    phases = result["timing"]["phases"]
    assert {"generator", "critic", "data", "other"} <= set(phases)
    assert os.path.exists(tmp_path / "timing.json") and os.path.exists(tmp_path / "loss_curves.png")


def test_a_fresh_run_refuses_to_overwrite_an_earlier_runs_checkpoints(tmp_path):
    from onestep.errors import UserError

    Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=2, num_validation_images=0)).fit(Counting())
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match="already holds checkpoints"):
        Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=2, num_validation_images=0)).fit(Counting())
    assert sorted(os.listdir(tmp_path)) == before


def test_generator_losses_are_logged_although_they_appear_every_r_steps(tmp_path):
    import csv

    Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=20, log_every=10, num_validation_images=0)).fit(
        Counting(ratio=5)
    )
    rows = list(csv.DictReader(open(tmp_path / "logs" / "losses.csv")))
    assert len(rows) == 2 and all(r["loss_generator"] and r["loss_critic"] for r in rows)


def test_init_from_checkpoint_takes_weights_strips_wrapper_prefixes_and_refuses_misfits(tmp_path):
    from safetensors.torch import save_file
    from torch import nn

    from onestep.errors import UserError
    from onestep.trainer import load_model_weights

    torch.manual_seed(0)
    earlier = {"generator": nn.Linear(3, 2), "critic": nn.Linear(3, 3)}
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    save_file(
        {f"module.{k}": v for k, v in earlier["generator"].state_dict().items()}, str(ckpt / "model.safetensors")
    )
    save_file(dict(earlier["critic"].state_dict()), str(ckpt / "model_1.safetensors"))
    critic = nn.Module()
    critic.weight, critic.bias = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3))
    critic.head = nn.Linear(3, 1)  # new in this stage: allowed to be missing
    now = {"generator": nn.Linear(3, 2), "critic": critic}
    load_model_weights(str(ckpt), now, may_be_new={"critic": ("head.",)})
    assert torch.equal(now["generator"].weight, earlier["generator"].weight) and torch.equal(
        critic.weight, earlier["critic"].weight
    )
    with pytest.raises(UserError, match="does not fit the critic"):
        load_model_weights(str(ckpt), now)  # the head may be missing only when the method says it is new
    with pytest.raises(UserError, match="does not fit the generator"):
        load_model_weights(str(ckpt), {"generator": nn.Linear(4, 2), "critic": critic}, {"critic": ("head.",)})
    # With the models.json the trainer writes, models are found by name, whatever order this run lists them in.
    (ckpt / "models.json").write_text('{"model.safetensors": "generator", "model_1.safetensors": "critic"}')
    fresh = {"critic": nn.Linear(3, 3), "generator": nn.Linear(3, 2)}
    load_model_weights(str(ckpt), fresh)
    assert torch.equal(fresh["critic"].weight, earlier["critic"].weight)
    with pytest.raises(UserError, match="holds no fake_score"):
        load_model_weights(str(ckpt), {"fake_score": nn.Linear(3, 3)})
    # A model the method declares fresh in a stage (DMD2's critic after the regression warm start) keeps its init.
    kept = nn.Linear(3, 3)
    before = kept.weight.clone()
    assert load_model_weights(str(ckpt), {"fake_score": kept}, may_be_absent=("fake_score",)) == ["fake_score"]
    assert torch.equal(kept.weight, before)
    with pytest.raises(UserError, match="has no model_1.safetensors"):
        (ckpt / "model_1.safetensors").unlink()
        load_model_weights(str(ckpt), now, {"critic": ("head.",)})


def test_resuming_a_finished_run_says_so_and_keeps_its_records(tmp_path, capsys):
    Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=4, num_validation_images=0)).fit(Counting())
    (tmp_path / "model_index.json").write_text("{}")  # what an export leaves behind
    kept = {name: (tmp_path / name).read_bytes() for name in ("timing.json", "logs/losses.csv")}
    checkpoint = list_checkpoints(str(tmp_path))[-1]
    mtime = os.path.getmtime(os.path.join(checkpoint, "model.safetensors"))
    result = Trainer(
        TrainerConfig(
            output_dir=str(tmp_path), max_train_steps=4, resume_from_checkpoint="latest", num_validation_images=0
        )
    ).fit(Counting())
    assert result["already_finished"] and result["step"] == 4
    assert "nothing left to train" in capsys.readouterr().out
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept  # the real run's timing survives
    assert os.path.getmtime(os.path.join(checkpoint, "model.safetensors")) == mtime  # not re-saved


def test_sample_grids_are_enlarged_to_be_seen(tmp_path):
    from PIL import Image

    from onestep.utils import save_image_grid

    save_image_grid(torch.zeros(16, 1, 16, 16), str(tmp_path / "g.png"), min_width=512)
    width = Image.open(tmp_path / "g.png").width
    assert 512 <= width < 512 + 69 and width % 69 == 0  # whole-number nearest-neighbour factor of the 69-px grid


def test_a_damaged_checkpoint_is_named_with_an_earlier_one_to_try(tmp_path):
    from onestep.errors import UserError

    Trainer(
        TrainerConfig(output_dir=str(tmp_path), max_train_steps=4, checkpointing_steps=2, num_validation_images=0)
    ).fit(Counting())
    weights = tmp_path / "checkpoint-4" / "model_1.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a save cut short by a full disk

    def resume(steps=6):
        config = TrainerConfig(
            output_dir=str(tmp_path), max_train_steps=steps, resume_from_checkpoint="latest", num_validation_images=0
        )
        Trainer(config).fit(Counting())

    with pytest.raises(UserError, match=r"model_1\.safetensors is damaged .*--resume_from_checkpoint .*checkpoint-2"):
        resume()
    weights.unlink()
    with pytest.raises(UserError, match=r"model_1\.safetensors is missing"):
        resume()
    (tmp_path / "checkpoint-4" / "custom_checkpoint_0.pkl").write_bytes(b"")
    (tmp_path / "checkpoint-4" / "model_1.safetensors").write_bytes(
        (tmp_path / "checkpoint-2" / "model_1.safetensors").read_bytes()
    )
    with pytest.raises(UserError, match=r"custom_checkpoint_0\.pkl is empty"):
        resume()


def test_fp16_on_the_cpu_is_refused_instead_of_silently_training_in_fp32(tmp_path):
    from onestep.errors import UserError

    with pytest.raises(UserError, match="fp16 needs a GPU"):
        Trainer(TrainerConfig(output_dir=str(tmp_path / "run"), max_train_steps=1, mixed_precision="fp16"))
    assert not (tmp_path / "run").exists()


def test_resuming_an_older_checkpoint_keeps_the_one_it_writes_and_other_folders_are_refused(tmp_path):
    from onestep.errors import UserError

    def fit(steps, **kw):
        config = TrainerConfig(output_dir=str(tmp_path / "run"), max_train_steps=steps, num_validation_images=0, **kw)
        Trainer(config).fit(Counting())

    fit(6, checkpointing_steps=2)  # checkpoints 2, 4, 6
    # Back to step 2 with a limit of 1: the checkpoint written at 3 must survive (it sorted before 4 and 6).
    fit(3, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"), checkpoints_total_limit=1)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run"))] == ["checkpoint-3"]
    # A checkpoint of another folder does not open a non-empty folder for writing.
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text("{}")
    config = TrainerConfig(
        output_dir=str(other), max_train_steps=4, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3")
    )
    with pytest.raises(UserError, match="is not empty"):
        Trainer(config)
    assert os.listdir(other) == ["model_index.json"]


def test_ema_warmup_follows_the_n_over_n_plus_10_ramp_and_survives_a_checkpoint():
    from onestep.ema import EMA

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, 0.999, warmup=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # update 0: decay min(0.999, 1 / 10) keeps a tenth of the old weight
    assert float(ema.shadow["weight"]) == pytest.approx(0.9)
    restored = EMA(model, 0.999, warmup=True)
    restored.load_state_dict(ema.state_dict())
    assert restored.current_decay() == pytest.approx(2 / 11)  # update 1 continues the ramp after a resume
    assert EMA(model, 0.999).current_decay() == 0.999  # off by default: the other methods' runs are unchanged


def test_optimizers_a_method_names_skip_the_learning_rate_warmup(tmp_path):
    class ColdCritic(Counting):
        no_lr_warmup = ("critic",)

        def optimizers(self):
            self.opts = super().optimizers()
            return self.opts

        def loss(self, name, x):
            self.lrs = getattr(self, "lrs", []) + [(name, self.opts[name].param_groups[0]["lr"])]
            return super().loss(name, x)

    m = ColdCritic(ratio=1)
    config = TrainerConfig(output_dir=str(tmp_path), max_train_steps=2, lr_warmup_steps=10, num_validation_images=0)
    Trainer(config).fit(m)
    assert all(lr == pytest.approx(0.1) for name, lr in m.lrs if name == "critic")
    assert all(lr < 0.05 for name, lr in m.lrs if name == "generator")
