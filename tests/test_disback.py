"""DisBack's path and walk (docs/methods/disback.md) on the Gaussian-mixture MLP, through the real
Trainer: snapshots on disk, each switch changes the target, the walk ends at the teacher, the position on the
path resumes exactly across a switch, the converged rule, the guidance policies and the VSD weighting."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

from onestep.context import TeacherContext
from onestep.denoiser import Cond, Denoiser
from onestep.errors import UserError
from onestep.methods.disback import (
    DisBack,
    load_snapshot,
    read_path,
    resolve_for_run,
    save_snapshot,
    snapshot_dir,
)
from onestep.testing.disback_toy import base_config, record_path
from onestep.testing.gmm import GaussianMixture, MLPDenoiserNet
from onestep.testing.toy import GMMBatches, fit_teacher_net, sd_schedule
from onestep.trainer import Trainer, TrainerConfig

N = 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A teacher-net and a recorded 3-snapshot path (S' fine-tuned on G0 = the teacher-net at t = 399)."""
    torch.manual_seed(0)
    gmm = GaussianMixture.circle()
    net = fit_teacher_net(gmm, sd_schedule(), steps=150, lr=3e-3, batch=256)
    config = base_config(train_batch_size=64, num_snapshots=N, path_steps=6, switch_every=3).resolved(20)
    path_dir = str(tmp_path_factory.mktemp("path") / "path")
    stage1 = record_path(net, config, path_dir, gmm)
    return gmm, net, config, path_dir, stage1


def _probe(den, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return den(torch.randn(64, 2, generator=g), torch.randint(0, 1000, (64,), generator=g))


def test_stage_one_saves_n_snapshots_that_drift_from_the_teacher(toy):
    gmm, net, config, path_dir, stage1 = toy
    info = read_path(path_dir, [399])
    assert info["complete"] and info["num_snapshots"] == N and info["interval"] == 2
    assert len(stage1.losses) == 6  # one loss per update, kept for the plateau report
    outputs = _snapshot_outputs(net, path_dir, N)
    # S'_0 (the teacher) .. S'_N: every snapshot differs from the one before, and S'_N from the teacher most.
    steps = [float((b - a).abs().mean()) for a, b in zip(outputs, outputs[1:])]
    assert all(s > 0 for s in steps)
    assert float((outputs[-1] - outputs[0]).abs().mean()) > max(steps)


def _snapshot_outputs(net, path_dir, n):
    """The probe outputs of S'_0 (the teacher) .. S'_n, each loaded from disk into a fresh network."""
    outputs = [_probe(net)]
    for i in range(1, n + 1):
        copy = Denoiser(MLPDenoiserNet(), net.schedule, "epsilon")
        load_snapshot(path_dir, i, copy.net)
        outputs.append(_probe(copy))
    return outputs


def test_each_switch_changes_the_target_and_the_walk_ends_at_the_teacher(toy):
    gmm, net, config, path_dir, _ = toy
    method = DisBack(TeacherContext(net, (2,)), config, path_dir)
    expected = _snapshot_outputs(net, path_dir, N)  # S'_0 .. S'_N
    # Stage 2 starts from S'_N in the critic and S'_{N-1} in the real-score slot.
    assert torch.equal(_probe(method.critic.denoiser), expected[N])
    seen = [_probe(method.real_score)]
    for iteration in (3, 6):
        method.switch(iteration)
        seen.append(_probe(method.real_score))
    assert method.target_index == 0 and method.real_score is method.teacher
    # The targets in order are exactly S'_{N-1}, ..., S'_1, S'_0 (the teacher), each differing from the last.
    assert all(torch.equal(got, expected[N - 1 - k]) for k, got in enumerate(seen)), "targets out of order"
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
    assert method.switches == [[3, 1], [6, 0]]


def test_a_switch_that_changes_nothing_is_an_error(toy, tmp_path):
    gmm, net, config, path_dir, _ = toy
    broken = str(tmp_path / "path")
    shutil.copytree(path_dir, broken)
    method = DisBack(TeacherContext(net, (2,)), config, broken)
    shutil.rmtree(snapshot_dir(broken, 1))  # replaced after the start-of-stage check: S'_1 == S'_2
    shutil.copytree(snapshot_dir(broken, 2), snapshot_dir(broken, 1))
    with pytest.raises(RuntimeError, match="left the real score unchanged"):
        method.switch(3)


def test_a_path_with_identical_consecutive_snapshots_is_refused_at_the_start(toy, tmp_path):
    """E.g. stage 1 at learning rate 0: refused before training, not by an error at some switch."""
    gmm, net, config, path_dir, _ = toy
    broken = str(tmp_path / "path")
    shutil.copytree(path_dir, broken)
    shutil.rmtree(snapshot_dir(broken, 1))
    shutil.copytree(snapshot_dir(broken, 2), snapshot_dir(broken, 1))
    with pytest.raises(UserError, match="S'_2 of the path in .* is identical to S'_1, so the walk"):
        DisBack(TeacherContext(net, (2,)), config, broken)
    save_snapshot(net.net, broken, 1)  # S'_1 == the teacher
    with pytest.raises(UserError, match="S'_1 of the path in .* is identical to the teacher"):
        DisBack(TeacherContext(net, (2,)), config, broken)
    with pytest.raises(UserError, match="--path_learning_rate must be positive"):
        replace(config, path_learning_rate=0.0).resolved(20)


def test_sharded_unet_snapshots_are_read_by_stage_two(tmp_path):
    """save_pretrained shards a UNet above max_shard_size (10 GB: an fp32 SDXL UNet); stage 2 reads the shards
    through their index, and a missing shard is a missing snapshot."""
    from tests.helpers import tiny_unet

    torch.manual_seed(0)
    teacher = Denoiser(tiny_unet(), sd_schedule(), "epsilon").eval().requires_grad_(False)
    path_dir = str(tmp_path / "path")
    snapshots = {}
    for i in (1, 2):
        unet = tiny_unet()
        unet.load_state_dict({k: v + 0.01 * i * torch.randn_like(v) for k, v in teacher.net.state_dict().items()})
        save_snapshot(unet, path_dir, i, max_shard_size="20KB")
        snapshots[i] = unet.state_dict()
    assert os.path.isfile(
        os.path.join(snapshot_dir(path_dir, 2), "unet", "diffusion_pytorch_model.safetensors.index.json")
    )
    info = {"complete": True, "num_snapshots": 2, "path_steps": 2, "conditioning_timesteps": [399]}
    info.update(initial_generator="the teacher copy", uncond_prob=0.0)
    with open(os.path.join(path_dir, "path.json"), "w") as f:
        json.dump(info, f)
    config = base_config(train_batch_size=2, num_snapshots=2, path_steps=2).resolved(4)
    method = DisBack(TeacherContext(teacher, (1, 8, 8)), config, path_dir)
    equal = lambda net, state: all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # noqa: E731
    assert equal(method.critic.denoiser.net, snapshots[2]) and equal(method.real_score.net, snapshots[1])
    unet_dir = os.path.join(snapshot_dir(path_dir, 2), "unet")
    shards = sorted(f for f in os.listdir(unet_dir) if f.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(os.path.join(unet_dir, shards[0]))
    with pytest.raises(UserError, match="lacks snapshot-002"):
        DisBack(TeacherContext(teacher, (1, 8, 8)), config, path_dir)


def test_derived_defaults_and_n_taken_from_the_path(toy):
    """resolved(): stage 1 = 5% of stage 2 rounded up to a multiple of N, M = stage 2 / (4 N), phases M/2..2M;
    a run of stage 2 takes N from its path before deriving them, and DisBack refuses an N other than the path's."""
    gmm, net, config, path_dir, _ = toy
    c = base_config(num_snapshots=10).resolved(1100)
    assert (c.path_steps, c.switch_every, c.switch_min_steps, c.switch_max_steps) == (60, 27, 13, 54)
    c = base_config(num_snapshots=4, path_steps=8, switch_every=5, switch_min_steps=1).resolved(1000)
    assert (c.path_steps, c.switch_every, c.switch_min_steps, c.switch_max_steps) == (8, 5, 1, 10)
    assert base_config(num_snapshots=10).resolved(10).path_steps == 10  # at least one update per snapshot
    with pytest.raises(UserError, match="must be a multiple of --num_snapshots"):
        base_config(num_snapshots=4, path_steps=6).resolved(100)
    # Stage 2 from a 3-snapshot path with --num_snapshots 10 (the preset's): N = 3, so M = 120 / 12.
    run = resolve_for_run(replace(base_config(), num_snapshots=10), 120, path_dir, reads_path=True)
    assert (run.num_snapshots, run.switch_every, run.switch_min_steps, run.switch_max_steps) == (N, 10, 5, 20)
    assert run.path_dir == path_dir
    # A path stage that has not run yet: N stays the flag's.
    assert resolve_for_run(replace(base_config(), num_snapshots=10), 120, "out/run/path", False).num_snapshots == 10
    with pytest.raises(UserError, match=f"has {N} snapshots, not --num_snapshots 10"):
        DisBack(TeacherContext(net, (2,)), replace(config, num_snapshots=10), path_dir)


def test_converged_rule_records_the_mean_over_processes_and_skips_non_finite_values(toy):
    """Every rank (and rank 0's checkpoint) holds the same phase history: mean|x0_fake - x0_target| is
    averaged over the processes through the trainer's collective before it is kept (here a second rank is
    simulated); a NaN or inf is left out."""
    gmm, net, config, path_dir, _ = toy
    from onestep.methods.base import Collective

    other_rank = [3.0]

    class TwoRanks(Collective):
        def mean(self, values):
            return [(v + other_rank[0]) / 2 for v in values]

    method = DisBack(TeacherContext(net, (2,)), replace(config, switch_rule="converged"), path_dir)
    method.collective = TwoRanks()
    method._record_dm_grad(1.0)
    other_rank[0] = float("nan")
    method._record_dm_grad(1.0)
    method._record_dm_grad(float("inf"))
    assert method.phase_grads == [2.0]


def test_a_path_with_a_missing_snapshot_or_unfinished_is_refused_in_one_sentence(toy, tmp_path):
    gmm, net, config, path_dir, _ = toy
    broken = str(tmp_path / "path")
    shutil.copytree(path_dir, broken)
    shutil.rmtree(snapshot_dir(broken, 2))
    with pytest.raises(UserError, match="lacks snapshot-002"):
        DisBack(TeacherContext(net, (2,)), config, broken)
    with pytest.raises(UserError, match="holds no degradation path"):
        read_path(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="recorded for a generator at timesteps"):
        read_path(path_dir, [999])


def _train(net, config, path_dir, gmm, out, steps, resume=False):
    method = DisBack(TeacherContext(net, (2,)), config, path_dir)
    trainer = Trainer(
        TrainerConfig(
            output_dir=str(out),
            max_train_steps=steps,
            checkpointing_steps=4,
            num_validation_images=0,
            export=False,
            resume_from_checkpoint="latest" if resume else None,
        )
    )
    trainer.fit(method, GMMBatches(gmm, config.train_batch_size))
    return method


def test_resume_across_a_target_switch_is_exact(toy, tmp_path):
    gmm, net, config, path_dir, _ = toy  # M = 3: switches after iterations 3 and 6
    straight = _train(net, config, path_dir, gmm, tmp_path / "a", 8)
    _train(net, config, path_dir, gmm, tmp_path / "b", 4)  # checkpoint-4: target S'_1 since iteration 3
    resumed = _train(net, config, path_dir, gmm, tmp_path / "b", 8, resume=True)
    assert straight.switches == [[3, 1], [6, 0]] and resumed.state_dict() == straight.state_dict()
    a, b = straight.generator.state_dict(), resumed.generator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.real_score is resumed.teacher


def test_converged_rule_waits_for_the_gradient_to_fall_within_the_phase_bounds(toy):
    gmm, net, config, path_dir, _ = toy
    c = replace(config, switch_rule="converged", switch_window=2, switch_min_steps=4, switch_max_steps=50)
    method = DisBack(TeacherContext(net, (2,)), c, path_dir)
    method.phase_grads = [1.0, 1.0, 0.9, 0.8]
    assert not method._switch_due(10)  # 0.85 > 0.5 x 1.0
    method.phase_grads += [0.4, 0.4]
    assert method._switch_due(10) and not method._switch_due(3)  # fell below rho, but the phase is too short
    method.phase_grads = [1.0]
    assert method._switch_due(50)  # the longest phase ends it anyway


def test_guidance_policy_and_condition_dropout_on_a_class_conditional_teacher(tmp_path):
    """With CFG, stage 1 trains S' with the null class (so cfg_all is the default); cfg_teacher_only guides only
    the teacher; the null condition replaces exactly the dropped samples."""
    torch.manual_seed(0)
    gmm = GaussianMixture.circle()
    net = Denoiser(MLPDenoiserNet(num_classes=3), sd_schedule(), "epsilon").eval().requires_grad_(False)
    labels = lambda n, device: Cond(class_labels=torch.randint(0, 2, (n,), device=device))  # noqa: E731
    null = lambda c: Cond(class_labels=torch.full_like(c.class_labels, 2))  # noqa: E731
    config = base_config(train_batch_size=32, num_snapshots=2, path_steps=2, guidance_scale=2.0).resolved(8)
    from onestep.methods.disback import DegradationPath
    from onestep.testing.toy import fit_on_gmm

    path_dir = str(tmp_path / "path")
    stage1 = DegradationPath(TeacherContext(net, (2,), cond_sampler=labels, uncond=null), config, path_dir)
    assert stage1.uncond_prob == 0.1
    fit_on_gmm(stage1, gmm, 2, 32, export=True)
    guided = TeacherContext(net, (2,), cond_sampler=labels, uncond=null)
    method = DisBack(guided, config, path_dir)
    assert method.target_guidance == "cfg_all" and method._real_guidance_scale() == 2.0
    only = DisBack(guided, replace(config, target_guidance="cfg_teacher_only"), path_dir)
    assert only._real_guidance_scale() == 1.0
    only.switch(1)
    assert only.target_index == 0 and only._real_guidance_scale() == 2.0
    mask = torch.tensor([True, False, True])
    mixed = Cond(class_labels=torch.tensor([0, 1, 1])).where(mask, Cond(class_labels=torch.full((3,), 2)))
    assert mixed.class_labels.tolist() == [2, 1, 2]
    # A path recorded without dropout cannot be guided everywhere unless one asks for the released code's way.
    plain = str(tmp_path / "plain")
    fit_on_gmm(
        DegradationPath(guided, replace(config, path_uncond_prob=0.0), plain),
        gmm,
        2,
        32,
        export=True,
    )
    with pytest.raises(UserError, match="cfg_all needs a path recorded with condition dropout"):
        DisBack(guided, replace(config, target_guidance="cfg_all"), plain)
    assert DisBack(guided, config, plain).target_guidance == "cfg_teacher_only"
    raw = DisBack(guided, replace(config, target_guidance="cfg_all_raw"), plain)
    assert raw._real_guidance_scale() == 2.0


def test_vsd_weighting_is_alpha_sigma_times_the_score_difference(toy):
    gmm, net, config, path_dir, _ = toy
    method = DisBack(TeacherContext(net, (2,)), replace(config, dm_weighting="vsd"), path_dir)
    x, real, fake, t = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 300, 600, 999])
    a, s = net.schedule.coefficients(t)
    expected = (a * s).float().view(-1, 1) * (fake - real)
    assert torch.allclose(method._dm_gradient(x, real, fake, t), expected)


def test_snapshots_are_diffusers_folders_for_unets(tmp_path):
    from diffusers import UNet2DModel

    from onestep.methods.disback import save_snapshot
    from tests.helpers import tiny_unet

    unet = tiny_unet()
    save_snapshot(unet, str(tmp_path), 4)
    again = UNet2DModel.from_pretrained(os.path.join(snapshot_dir(str(tmp_path), 4), "unet"))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))


def test_multi_step_student_and_a_g0_that_differs_from_the_paths(toy, tmp_path):
    """Backward simulation runs in both stages (G0 is queried exactly as DMD2 queries G); stage 2 refuses a G0
    other than the one stage 1 sampled."""
    gmm, net, _, _, _ = toy
    from onestep.testing.toy import fit_on_gmm

    config = base_config(train_batch_size=32, num_snapshots=2, path_steps=2, conditioning_timesteps=[999, 499])
    config = config.resolved(4)
    path_dir = str(tmp_path / "path")
    record_path(net, config, path_dir, gmm)
    method = DisBack(TeacherContext(net, (2,)), config, path_dir)
    before = [p.detach().clone() for p in method.generator.parameters()]
    fit_on_gmm(method, gmm, 4, 32)
    assert method.switches == [[config.switch_every, 0]]
    assert any(not torch.equal(a, b) for a, b in zip(before, method.generator.parameters()))
    with pytest.raises(UserError, match="stage 2 must start from the generator stage 1 sampled"):
        DisBack(TeacherContext(net, (2,)), config, path_dir, generator_init=net)


def test_the_first_target_is_close_to_the_warm_critic(toy):
    """A unit check that holds on the mixture (eval/recipes/disback_gmm.py: 9x and 17x): at the start of
    stage 2 the DM gradient against S'_{N-1} is much smaller than against the teacher with the same critic S'_N
    (arm B, which is where plain DMD2's gradient goes once its critic has learnt G0; arm A's starts at 0)."""
    gmm, net, config, path_dir, _ = toy
    from onestep.testing.disback_toy import build_arm, initial_dm_gradient

    grads = {arm: initial_dm_gradient(build_arm(arm, net, config, gmm, path_dir)) for arm in "ABC"}
    assert grads["A"] == 0.0 and grads["C"] < 0.5 * grads["B"], grads
