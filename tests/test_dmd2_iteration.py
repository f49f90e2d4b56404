"""One DMD2 iteration, checked for where each loss's gradient goes:
the generator's DM and GAN terms reach only the generator; the critic's denoising loss only the critic's
trunk; the discriminator loss the critic's trunk and head, never the generator; requires_grad flags are
restored; and the frozen teacher never changes."""

import pytest
import torch

from onestep.context import ExportTarget, TeacherContext
from onestep.data import Batch
from onestep.denoiser import Cond, Denoiser
from onestep.methods.base import StepInfo
from onestep.methods.dmd2 import DMD2, DMD2Config
from onestep.schedules import schedule_from_scheduler_config
from tests.helpers import sd_scheduler_config, tiny_unet

B = 4


def _unet(width=64, size=8):
    """A tiny class-conditional UNet with a `width`-channel bottleneck of size / 2 (DMD2's head reads it)."""
    return tiny_unet(num_class_embeds=4, sample_size=size, widths=(16, width), norm_num_groups=8)


def _method(width=64, size=8, **overrides):
    torch.manual_seed(0)
    spec = schedule_from_scheduler_config(sd_scheduler_config())
    teacher = Denoiser(_unet(width, size), spec.schedule, spec.prediction_type).eval().requires_grad_(False)
    config = DMD2Config(train_batch_size=B, conditioning_timesteps=[399], gan=True, **overrides)
    sampler = lambda n, device: Cond(class_labels=torch.randint(0, 3, (n,), device=device))  # noqa: E731
    method = DMD2(TeacherContext(teacher, (1, size, size), cond_sampler=sampler), config)
    with torch.no_grad():  # at initialisation F equals the teacher and the DM gradient is exactly 0: move F a little
        for p in method.critic.denoiser.parameters():
            p.add_(0.01 * torch.randn_like(p))
    method.attach(method.models(), unwrap=lambda m: m)
    return method


def _grads(method, name):
    """Run the iteration's shared part and one loss backward from a fixed seed; return every parameter's grad."""
    torch.manual_seed(1)
    size = method.sample_shape[-1]
    real = Batch(torch.rand(B, 1, size, size) * 2 - 1, Cond(class_labels=torch.tensor([0, 1, 2, 0])))
    info = StepInfo(
        step=0,
        due=("generator", "critic"),
        shared_generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    it = method.start_iteration(real, info)
    loss, _ = method.loss(name, it)
    loss.backward()
    parts = {
        "generator": method.generator,
        "trunk": method.critic.denoiser,
        "head": method.critic.head,
        "teacher": method.teacher,
    }
    return {part: [p.grad for p in module.parameters()] for part, module in parts.items()}


def _reached(grads):
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "term,overrides", [("DM", {"gan_generator_weight": 0.0}), ("GAN", {"dm_weight": 0.0}), ("both", {})]
)
def test_generator_terms_reach_only_the_generator(term, overrides):
    method = _method(**overrides)
    flags = [p.requires_grad for p in method.critic.parameters()]
    grads = _grads(method, "generator")
    assert _reached(grads["generator"]), term
    assert all(g is None for part in ("trunk", "head", "teacher") for g in grads[part]), term
    assert [p.requires_grad for p in method.critic.parameters()] == flags  # the critic is trainable again


def test_critic_losses_reach_only_the_critic():
    denoise_only = _grads(_method(gan_discriminator_weight=0.0), "critic")
    full = _grads(_method(), "critic")
    # The denoising loss trains the trunk, not the head; nothing reaches the generator or the teacher.
    assert _reached(denoise_only["trunk"]) and not _reached(denoise_only["head"])
    assert all(g is None for part in ("generator", "teacher") for g in denoise_only[part] + full[part])
    # The discriminator loss (full minus denoising-only, same draws) reaches the head and the trunk.
    d_only = {
        part: [a - b for a, b in zip(full[part], denoise_only[part]) if a is not None] for part in ("trunk", "head")
    }
    assert _reached(d_only["head"]) and _reached(d_only["trunk"])


def test_the_teacher_never_changes_over_a_trained_iteration(tmp_path):
    from onestep.trainer import Trainer, TrainerConfig

    method = _method()
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    real = torch.rand(16, 1, 8, 8) * 2 - 1
    from onestep.data import TensorBatches

    data = TensorBatches(real, torch.arange(16) % 3, B)
    Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=2, num_validation_images=0, export=False)).fit(
        method, data
    )
    after = method.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in method.teacher.parameters())
    gen_before = _method().generator.state_dict()
    assert any(
        not torch.equal(gen_before[k], v) for k, v in method.generator.state_dict().items()
    )  # training did happen


def test_the_export_samples_at_the_resolution_the_student_was_trained_at(tmp_path):
    """A student trained at 16x16 from an 8x8 teacher must not export a pipeline that samples 8x8."""
    from onestep.pipelines import OneStepPipeline
    from tests.helpers import sd_scheduler_config

    spec = schedule_from_scheduler_config(sd_scheduler_config())
    teacher = Denoiser(_unet(), spec.schedule, spec.prediction_type).eval().requires_grad_(False)
    config = DMD2Config(train_batch_size=2, conditioning_timesteps=[399], gan=False)
    context = TeacherContext(
        teacher,
        (1, 16, 16),
        cond_sampler=lambda n, device: Cond(class_labels=torch.zeros(n, dtype=torch.long)),
        num_classes=3,
        export=ExportTarget("one_step", sd_scheduler_config(), num_classes=3),
    )
    method = DMD2(context, config)
    method.export(method.models(), str(tmp_path), {"training_steps": 1})
    pipe = OneStepPipeline.from_pretrained(str(tmp_path))
    assert pipe.unet.config.sample_size == 16
    assert pipe(class_labels=[1], output_type="np").images.shape == (1, 16, 16, 1)
    assert teacher.net.config.sample_size == 8  # the teacher is untouched
    assert (
        method.usage("out")
        == "DiffusionPipeline.from_pretrained('out', trust_remote_code=True)(class_labels=[3, 7]).images"
    )


def test_empty_conditioning_timesteps_are_refused_by_the_parser(capsys):
    from onestep.presets.dmd2 import ENTRY
    from onestep.stages import build_parser

    with pytest.raises(SystemExit) as stop:
        build_parser(ENTRY).parse_args(["--conditioning_timesteps", ""])
    assert stop.value.code == 2 and "expected comma-separated integers" in capsys.readouterr().err


def test_official_gan_options():
    """Options from DMD2's official code: D's maximum noise level, GAN without the DM
    loss, separate learning rates, and the module the head reads."""
    from onestep.errors import UserError

    # gan_max_timestep: every input D sees (generator and discriminator side) is noised at t <= the maximum.
    method = _method(gan_max_timestep=0)
    highs = []
    draw = method._noised
    method._noised = lambda x, low, high: highs.append(high) or draw(x, low, high)
    _grads(method, "critic")
    _grads(method, "generator")
    assert highs[:2] == [0, 0]  # the critic's real and fake inputs for D
    assert highs[2] == 980 and highs[3] == 0  # the DM loss keeps its own range; the generator's GAN term uses 0
    # gan_alone: no DM query of the teacher at all, and the loss is the weighted GAN term.
    method = _method(gan_alone=True, gan_generator_weight=0.5)
    method.real_score.guided = lambda *a, **k: pytest.fail("gan_alone must not query the real score")
    grads = _grads(method, "generator")
    assert _reached(grads["generator"]) and all(g is None for g in grads["trunk"] + grads["head"])
    # Separate learning rates, each falling back to learning_rate.
    opts = _method(learning_rate=1e-4, critic_learning_rate=3e-4).optimizers()
    assert opts["generator"].param_groups[0]["lr"] == 1e-4 and opts["critic"].param_groups[0]["lr"] == 3e-4
    # The module the head reads (the official EDM head reads the encoder output, not the mid block).
    method = _method(gan_feature_module="down_blocks.1")
    assert method.critic.feature_module == "down_blocks.1"
    with pytest.raises(UserError, match="no submodule 'nowhere'"):
        _method(gan_feature_module="nowhere")
    with pytest.raises(UserError, match="--gan_alone .* needs --gan"):
        DMD2(TeacherContext(method.teacher, (1, 8, 8)), DMD2Config(gan=False, gan_alone=True))
    with pytest.raises(UserError, match="--guidance_scale 0.5 must be at least 1"):
        DMD2(TeacherContext(method.teacher, (1, 8, 8)), DMD2Config(guidance_scale=0.5))
    with pytest.raises(UserError, match="--gan_max_timestep 1000"):
        DMD2(TeacherContext(method.teacher, (1, 8, 8)), DMD2Config(gan_max_timestep=1000))
