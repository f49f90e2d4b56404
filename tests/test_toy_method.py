"""A sixth method in one file, to show the method API is enough: a toy with state of its own (a target
index it moves between iterations, and a running count), trained by the unchanged Trainer, killed with
SIGKILL after a checkpoint, resumed, and compared with an uninterrupted run.

Run as a script (what the test does): python tests/test_toy_method.py OUTPUT_DIR MAX_STEPS [--resume]
"""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onestep.methods.base import Method, Update  # noqa: E402

TARGETS = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.0]])


class WalkingTarget(Method):
    """Regress a linear map onto a target that moves to the next entry of TARGETS every 4 iterations."""

    needs_data = False

    def __init__(self):
        super().__init__()
        self.updates = [Update("fit", "net")]
        self.net = nn.Linear(2, 2)
        self.target_index = 0  # the method's own state, as DisBack's position on its path
        self.updates_seen = 0

    def models(self):
        return {"net": self.net}

    def optimizers(self):
        return {"net": torch.optim.Adam(self.net.parameters(), lr=0.05)}

    def start_iteration(self, batch, info):
        if os.environ.get("TOY_SLOW"):
            time.sleep(0.05)  # the run to be killed: slow enough to be stopped between checkpoints 6 and 9
        return torch.randn(8, 2)  # drawn from the trainer's per-(seed, rank, step) stream

    def loss(self, name, x):
        loss = (self.prepared["net"](x) - TARGETS[self.target_index]).square().mean()
        return loss, {"loss": loss.detach()}

    def end_iteration(self, info):
        self.updates_seen += 1
        if (info.step + 1) % 4 == 0:
            self.target_index = (self.target_index + 1) % len(TARGETS)

    def state_dict(self):
        return {"target_index": self.target_index, "updates_seen": self.updates_seen}

    def load_state_dict(self, state):
        self.target_index, self.updates_seen = state["target_index"], state["updates_seen"]

    def sample_grid(self, models, num, seed, device):
        return torch.zeros(num, 1, 2, 2)

    def export(self, models, output_dir, extra_card):
        with open(os.path.join(output_dir, "toy.json"), "w") as f:
            json.dump({"weights": [v.tolist() for v in models["net"].state_dict().values()], **self.state_dict()}, f)


def main(output_dir, max_steps, resume):
    from onestep.trainer import Trainer, TrainerConfig

    config = TrainerConfig(
        output_dir=output_dir,
        max_train_steps=max_steps,
        checkpointing_steps=3,
        num_validation_images=0,
        resume_from_checkpoint="latest" if resume else None,
        seed=7,
    )
    Trainer(config).fit(WalkingTarget())


def test_toy_method_state_resumes_exactly_after_sigkill(tmp_path):
    script, env = os.path.abspath(__file__), dict(os.environ, HF_HUB_OFFLINE="1")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert subprocess.run([sys.executable, script, str(ref), "10"], env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, script, str(cut), "100000"],
        env=dict(env, TOY_SLOW="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (cut / "checkpoint-6").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoint-6").exists() and not (cut / "checkpoint-12").exists() and not (cut / "toy.json").exists()
    r = subprocess.run([sys.executable, script, str(cut), "10", "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = json.loads((ref / "toy.json").read_text()), json.loads((cut / "toy.json").read_text())
    assert a == b  # weights bit for bit, and the method's own state
    assert a["updates_seen"] == 10 and a["target_index"] == 10 // 4 % 3  # state moved across the kill and the switches


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv[3:])
