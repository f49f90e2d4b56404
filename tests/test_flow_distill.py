"""DMD2 and BOOT on SD3 and Flux teachers built in code: train with the real scripts, export to the stock
StableDiffusion3Pipeline / FluxPipeline, reload in a fresh process and check that the plain call samples what the
student itself samples from the same noise; the GAN on transformer tokens, LoRA, and what is refused."""

import json
import os
import subprocess

import pytest
import torch

from onestep.errors import UserError
from tests.helpers import PY, ROOT, run

RES = 16  # pixels: 8x8 latents (autoencoder factor 2), 16 tokens of 2x2 patches
PROMPT = "a red car on the street"
FAST = ["--resolution", str(RES), "--max_train_steps", "2", "--train_batch_size", "2", "--mixed_precision", "no"]
FAST += ["--validation_steps", "1000"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from onestep.testing.tiny_flow import save_tiny_flux, save_tiny_sd3
    from tests.test_text_to_image import _captioned_folder

    root = tmp_path_factory.mktemp("flow-distill")
    (root / "prompts.txt").write_text("a cat\na red car on the street\ntwo dogs on grass\n")
    return {
        "sd3": save_tiny_sd3(str(root / "sd3")),
        "flux": save_tiny_flux(str(root / "flux")),
        "prompts": str(root / "prompts.txt"),
        "data": _captioned_folder(root / "data"),
        "root": root,
    }


def _command(script, teacher, teachers, out, *extra):
    args = [PY, script, "--pretrained_model_name_or_path", teachers[teacher], "--prompt_file", teachers["prompts"]]
    return [*args, "--output_dir", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def students(teachers):
    """sd3: DMD2's sd3-1step recipe (the regression warm start, then DMD2 with the GAN on real captioned images);
    flux: the flux-4step preset with the GAN and a LoRA student; boot: BOOT's flux preset (no data). The runs go
    side by side: tiny models leave each process waiting on its single Python thread most of the time."""
    root = teachers["root"]
    commands = {
        "sd3": _command(
            "train/dmd2.py", "sd3", teachers, root / "sd3-out", "--preset", "sd3-1step",
            "--train_data_dir", teachers["data"], "--regression_pairs", "4", "--regression_teacher_steps", "2",
            "--ttur_ratio", "1",
        ),
        "flux": _command(
            "train/dmd2.py", "flux", teachers, root / "flux-out", "--preset", "flux-4step",
            "--train_data_dir", teachers["data"], "--lora_rank", "4", "--lora_alpha", "2",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--ttur_ratio", "1",
        ),
        "boot": _command("train/boot.py", "flux", teachers, root / "boot-out", "--preset", "flux"),
    }  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    logs = {name: open(root / f"{name}.log", "w+") for name in commands}
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[name], stderr=subprocess.STDOUT)
             for name, cmd in commands.items()}  # fmt: skip
    for name, proc in procs.items():
        rc = proc.wait(timeout=600)
        logs[name].seek(0)
        text = logs[name].read()
        logs[name].close()
        assert rc == 0, text[-3000:]
    return {name: root / f"{name}-out" for name in commands}


# The plain call of each export, from fixed unit noise z, in a process that never imports onestep. Flux reads its
# latents packed into 2x2 patch tokens; the 4-step student re-noises from torch's global generator (seed 7).
FRESH = r"""
import sys, json, torch
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
jobs, out_file = json.loads(sys.argv[1]), sys.argv[2]
z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
info, latents = {}, {}
for name, folder, steps, remote in jobs:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=remote)
    flux = type(pipe).__name__ == "FluxPipeline"
    kw = dict(num_inference_steps=steps, height=16, width=16, output_type="latent", guidance_scale=1.0, latents=z)
    if flux:
        kw.update(guidance_scale=3.5, latents=pipe._pack_latents(z, 1, 16, 8, 8))
    torch.manual_seed(7)
    lat = pipe("a red car on the street", **kw).images
    latents[name] = (pipe._unpack_latents(lat, 16, 16, 2) if flux else lat).contiguous()
    info[name] = {"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__}
    if remote:  # BOOT samples in one step, whatever the pipeline asks for
        try:
            pipe("a cat", num_inference_steps=4, height=16, width=16, output_type="latent")
        except ValueError as err:
            info[name]["four_steps"] = str(err)
save_file(latents, out_file)
assert 'onestep' not in sys.modules
print(json.dumps(info))
"""


@pytest.fixture(scope="module")
def fresh(students, tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("fresh") / "latents.safetensors"
    jobs = [("sd3", str(students["sd3"]), 1, False), ("flux", str(students["flux"]), 4, False)]
    jobs.append(("boot", str(students["boot"]), 1, True))
    r = run([PY, "-c", FRESH, json.dumps(jobs), str(out)], cwd=str(out.parent))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), load_file(str(out))


def _unit_noise():
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def _student(folder, teacher_path, kind):
    """The exported transformer on the teacher's training schedule (the flow schedule at RES), as onestep runs it."""
    import diffusers

    from onestep.denoiser import Denoiser
    from onestep.flow_teachers import load_flow_teacher

    cls = getattr(diffusers, "SD3Transformer2DModel" if kind == "sd3" else "FluxTransformer2DModel")
    schedule = load_flow_teacher(teacher_path, resolution=RES).denoiser.schedule
    return Denoiser(cls.from_pretrained(str(folder), subfolder="transformer"), schedule, "flow").eval()


def _cond(kind, teacher_path):
    from onestep.flow_teachers import FluxPromptEncoder, SD3PromptEncoder

    encoder = SD3PromptEncoder if kind == "sd3" else FluxPromptEncoder
    return encoder.from_pretrained(teacher_path).encode([PROMPT])


@torch.no_grad()
def test_sd3_one_step_recipe_runs_both_stages_and_its_stock_export_is_the_students_sample(teachers, students, fresh):
    from onestep.generator import OneStepGenerator

    out = students["sd3"]
    regression = (out / "regression" / "logs" / "losses.csv").read_text().splitlines()[0].split(",")
    distill = (out / "distill" / "logs" / "losses.csv").read_text().splitlines()[0].split(",")
    assert "loss_mse" in regression or "loss_lpips" in regression
    assert {"loss_d", "loss_g_gan", "d_real"} <= set(distill)  # the GAN on the critic's tokens, real images
    info, latents = fresh
    assert info["sd3"] == {"class": "StableDiffusion3Pipeline", "scheduler": "FlowMatchEulerDiscreteScheduler"}
    generator = OneStepGenerator(_student(out, teachers["sd3"], "sd3"), [999])
    own = generator.sample(_unit_noise(), _cond("sd3", teachers["sd3"]))
    torch.testing.assert_close(latents["sd3"], own, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline" in card and "guidance_scale=1.0" in card


@torch.no_grad()
def test_flux_four_step_lora_student_is_its_stock_export_and_loads_into_the_teacher(teachers, students, fresh):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from onestep.denoiser import pack_latents, unpack_latents
    from onestep.generator import OneStepGenerator

    out = students["flux"]
    assert "loss_d" in (out / "logs" / "losses.csv").read_text().splitlines()[0]
    info, latents = fresh
    assert info["flux"] == {"class": "FluxPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler"}
    generator = OneStepGenerator(_student(out, teachers["flux"], "flux"), [999, 749, 499, 249])
    cond = _cond("flux", teachers["flux"])
    assert torch.equal(cond.guidance, torch.tensor([3.5]))  # FluxPipeline's default, the preset's guidance input
    torch.manual_seed(7)  # the pipeline's re-noising draws packed tokens from the global generator
    own = generator.sample(_unit_noise(), cond, noise_fn=lambda like: unpack_latents(torch.randn(1, 16, 64), 8, 8))
    torch.testing.assert_close(latents["flux"], own, atol=1e-5, rtol=1e-5)
    # The adapter alone in the teacher's pipeline, with the export's scheduler: alpha / rank kept, same images.
    teacher = DiffusionPipeline.from_pretrained(teachers["flux"])
    kw = dict(num_inference_steps=4, height=RES, width=RES, guidance_scale=3.5, output_type="latent")
    kw["latents"] = pack_latents(_unit_noise())
    torch.manual_seed(7)
    before = teacher(PROMPT, **kw).images
    teacher.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    teacher.load_lora_weights(str(out / "lora"))
    scales = {v for m in teacher.transformer.modules() if hasattr(m, "scaling") for v in m.scaling.values()}
    assert scales == {0.5}
    torch.manual_seed(7)
    with_adapter = unpack_latents(teacher(PROMPT, **kw).images, 8, 8)
    torch.testing.assert_close(with_adapter, own, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unpack_latents(before, 8, 8), own, atol=1e-4)  # the adapter trained


@torch.no_grad()
def test_boot_flux_student_is_the_stock_pipeline_with_its_shipped_scheduler(teachers, students, fresh):
    from onestep.generator import CLEAN, SignalGenerator

    out = students["boot"]
    info, latents = fresh
    assert info["boot"]["class"] == "FluxPipeline" and info["boot"]["scheduler"] == "BootScheduler"
    assert "one step" in info["boot"]["four_steps"]
    assert (out / "scheduler" / "boot.py").is_file()
    student = SignalGenerator(_student(out, teachers["flux"], "flux"), param_timestep=999)
    own = student(_unit_noise(), torch.full((1,), CLEAN), _cond("flux", teachers["flux"]))
    torch.testing.assert_close(latents["boot"], own, atol=1e-5, rtol=1e-5)
    assert "trust_remote_code=True" in (out / "README.md").read_text()


@torch.no_grad()
def test_boot_scheduler_in_the_sd3_pipeline_is_the_signal_generators_sample(teachers):
    """SD3's pipeline passes no sigmas or mu and never scales the noise: BOOT's contract for a flow teacher (the
    conversion at sigma 1) gives, through it, the time-conditioned student's sample (here the teacher's weights)."""
    from diffusers import DiffusionPipeline

    from onestep.generator import CLEAN, SignalGenerator
    from onestep.methods.boot import check_flow_contract
    from onestep.pipelines.boot import BootScheduler

    student = SignalGenerator(_student(teachers["sd3"], teachers["sd3"], "sd3"), param_timestep=999)
    contract = student.conversion()
    check_flow_contract(contract)
    pipe = DiffusionPipeline.from_pretrained(teachers["sd3"])
    pipe.scheduler = BootScheduler(**contract)
    kw = dict(num_inference_steps=1, guidance_scale=1.0, latents=_unit_noise(), output_type="latent")
    own = student(_unit_noise(), torch.full((1,), CLEAN), _cond("sd3", teachers["sd3"]))
    torch.testing.assert_close(pipe(PROMPT, **kw).images, own, atol=1e-5, rtol=1e-5)


def test_real_score_cfg_on_flux_is_refused_in_one_sentence(teachers, tmp_path):
    args = ["train/dmd2.py", "--pretrained_model_name_or_path", teachers["flux"], "--prompt_file", teachers["prompts"]]
    r = run([PY, *args, "--preset", "flux-4step", "--guidance_scale", "2", "--output_dir", str(tmp_path / "o")])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Flux is guidance-distilled" in last and "--guidance_embedding" in last, r.stderr
    assert not (tmp_path / "o").exists()


# -- in-process checks ----------------------------------------------------------------------------------------


def test_flow_teacher_checks_before_training(teachers):
    from dataclasses import replace

    from onestep.context import ExportTarget
    from onestep.presets.dmd2 import ENTRY, PRESETS
    from onestep.run_setup import check_teacher_and_data, flow_resolution
    from onestep.text_export import check_exportable_timesteps

    cfg = json.load(open(f"{teachers['sd3']}/scheduler/scheduler_config.json"))
    target = ExportTarget("sd3", cfg, teacher_path=teachers["sd3"], resolution=RES)
    check_exportable_timesteps(target, [999, 749, 499, 249])
    with pytest.raises(UserError, match="No stock FlowMatchEulerDiscreteScheduler config"):
        check_exportable_timesteps(target, [999, 600, 300, 100])
    assert flow_resolution(teachers["sd3"], "sd3", None) == 16  # sample_size 8 x autoencoder factor 2
    assert flow_resolution(teachers["flux"], "flux", None) == 1024  # Flux records no sample size
    with pytest.raises(UserError, match="multiple of 4"):
        flow_resolution(teachers["flux"], "flux", 18)
    with pytest.raises(UserError, match="positional embeddings"):
        flow_resolution(teachers["sd3"], "sd3", 68)
    base = PRESETS["sd3-4step"].config
    config = replace(base, teacher=replace(base.teacher, pretrained_model_name_or_path=teachers["sd3"]))
    check_teacher_and_data(config, "DMD2", False, ENTRY.kinds)
    with pytest.raises(UserError, match="is a Stable Diffusion 3"):
        check_teacher_and_data(config, "MSD", False)  # a method that does not take the kind
    with pytest.raises(UserError, match="real images with captions"):
        check_teacher_and_data(config, "DMD2", True, ENTRY.kinds)
    flux_guidance = replace(config, teacher=replace(config.teacher, guidance_embedding=2.0))
    with pytest.raises(UserError, match="--guidance_embedding is for Flux"):
        check_teacher_and_data(flux_guidance, "DMD2", False, ENTRY.kinds)


def _fsdp_units(model) -> set[str]:
    """The classes accelerate's FSDP2 wrap policy makes shard units of, with the unit list onestep declares."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from onestep.sharding import fsdp_unit_names

    model._no_split_modules = fsdp_unit_names(model)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return {type(m).__name__ for m in model.modules() if policy(m)}


def test_shipped_flux_fsdp_config_is_fsdp2_without_a_class_list():
    import yaml

    cfg = yaml.safe_load(open(os.path.join(ROOT, "train", "fsdp_flux.yaml")))
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    assert "fsdp_transformer_layer_cls_to_wrap" not in cfg["fsdp_config"]  # each model declares its own units


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_token_head_lora_targets_and_fsdp_units_of_a_transformer_critic(teachers, kind):
    """The head is chosen by the features' shape; LoRA defaults to the transformer list; FSDP2 shards the
    transformer, each of its block classes and the head as units of their own (no class list in the config:
    accelerate would apply one list to every model)."""
    import diffusers

    from onestep.context import LoraRequest
    from onestep.critic import Critic
    from onestep.denoiser import Cond, Denoiser
    from onestep.discriminator import DMD2Head, TokenHead, gan_head
    from onestep.flow_teachers import TRANSFORMER_LORA_TARGETS, FlowMatchSchedule
    from onestep.lora import apply_lora

    name = "SD3Transformer2DModel" if kind == "sd3" else "FluxTransformer2DModel"
    net = getattr(diffusers, name).from_pretrained(teachers[kind], subfolder="transformer")
    critic = Critic(Denoiser(net, FlowMatchSchedule(1000, shift=3.0), "flow"))
    pooled = torch.randn(1, 20 if kind == "sd3" else 8)
    cond = Cond(encoder_hidden_states=torch.randn(1, 5, 24), text_embeds=pooled, guidance=torch.full((1,), 3.5))
    critic.head = gan_head(critic.feature_shape((16, 8, 8), cond))
    assert isinstance(critic.head, TokenHead) and isinstance(gan_head((8, 4, 4)), DMD2Head)
    blocks = {"JointTransformerBlock"} if kind == "sd3" else {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert _fsdp_units(critic) == {name, *blocks, "TokenHead"}
    lora = apply_lora(net, LoraRequest(rank=4, alpha=4))
    assert set(lora["target_modules"]) == set(TRANSFORMER_LORA_TARGETS)


def test_boot_scheduler_takes_the_flow_pipelines_sigmas_and_mu_as_one_step():
    from onestep.pipelines.boot import BootScheduler

    s = BootScheduler(skip=1.0, output_scale=-1.0)
    s.set_timesteps(sigmas=[1.0], mu=0.7)  # FluxPipeline's one-step call
    s.set_begin_index(0)
    assert s.timesteps.tolist() == [0.0]
    with pytest.raises(ValueError, match="one step"):
        s.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.7)
