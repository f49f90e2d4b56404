"""SD3 and Flux teachers built in code: the adapters, prompt encoders and schedules against diffusers' own
pipelines, the stock-pipeline export reloaded in a fresh process, LoRA export, and the token GAN head."""

import json
import os

import numpy as np
import pytest
import torch

from onestep import flow_export as fe
from onestep import flow_teachers as ft
from onestep.denoiser import (
    Cond,
    Denoiser,
    FluxTransformerAdapter,
    SD3TransformerAdapter,
    adapt,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from onestep.errors import UserError
from tests.helpers import PY, run

PROMPTS = ["a red car on the street", "two dogs"]
RES = 16  # pixels: 8x8 latents, 16 tokens of 2x2 patches


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from onestep.testing.tiny_flow import save_tiny_flux, save_tiny_sd3

    root = tmp_path_factory.mktemp("flow")
    return {"sd3": save_tiny_sd3(str(root / "sd3")), "flux": save_tiny_flux(str(root / "flux")), "root": root}


@pytest.fixture(scope="module")
def pipes(teachers):
    from diffusers import DiffusionPipeline

    return {kind: DiffusionPipeline.from_pretrained(teachers[kind]) for kind in ("sd3", "flux")}


def _record_calls(transformer):
    """Every call of the transformer: (keyword inputs, output)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((dict(kwargs), output[0]))

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


def _transformer_copy(path, kind):
    import diffusers

    cls = getattr(diffusers, "SD3Transformer2DModel" if kind == "sd3" else "FluxTransformer2DModel")
    return cls.from_pretrained(path, subfolder="transformer")


# -- (a) adapters -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sd3_adapter_and_denoiser_are_the_pipelines_transformer_call(pipes, teachers):
    pipe = pipes["sd3"]
    states, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    cond = Cond(encoder_hidden_states=states, text_embeds=pooled)
    z = torch.randn(2, 16, 8, 8)
    calls, handle = _record_calls(pipe.transformer)
    try:
        kw = dict(prompt_embeds=states, pooled_prompt_embeds=pooled, guidance_scale=1.0, output_type="latent")
        pipe(latents=z, num_inference_steps=2, **kw)
    finally:
        handle.remove()
    adapter = adapt(pipe.transformer)
    assert isinstance(adapter, SD3TransformerAdapter)
    for kwargs, out in calls:
        assert torch.equal(adapter(kwargs["hidden_states"], kwargs["timestep"], cond), out)
    # The plain call starts at sigma = 1: the teacher's index 999 on its static-shift schedule.
    teacher = ft.load_flow_teacher(teachers["sd3"])
    assert teacher.kind == "sd3" and teacher.transformer_class == "SD3Transformer2DModel"
    assert not any(p.requires_grad for p in teacher.denoiser.parameters())
    t = torch.full((2,), 999)
    assert torch.equal(teacher.denoiser.raw(z, t, cond), calls[0][1])
    x0 = teacher.denoiser(z, t, cond)
    torch.testing.assert_close(x0, z - calls[0][1])  # flow: x0 = x_t - sigma v at sigma = 1


@torch.no_grad()
def test_flux_adapter_packs_latents_ids_and_guidance_as_the_pipeline(pipes, teachers):
    from diffusers import FluxPipeline

    pipe = pipes["flux"]
    states, pooled, text_ids = pipe.encode_prompt(PROMPTS, None)
    z = torch.randn(2, 16, 8, 8)
    packed = FluxPipeline._pack_latents(z, 2, 16, 8, 8)
    assert torch.equal(pack_latents(z), packed)
    assert torch.equal(unpack_latents(packed, 8, 8), FluxPipeline._unpack_latents(packed, RES, RES, 2))
    calls, handle = _record_calls(pipe.transformer)
    try:
        kw = dict(prompt_embeds=states, pooled_prompt_embeds=pooled, height=RES, width=RES, guidance_scale=2.5)
        pipe(latents=packed, num_inference_steps=2, output_type="latent", **kw)
    finally:
        handle.remove()
    cond = Cond(encoder_hidden_states=states, text_embeds=pooled, guidance=torch.full((2,), 2.5))
    adapter = adapt(pipe.transformer)
    assert isinstance(adapter, FluxTransformerAdapter)
    for (kwargs, out), t in zip(calls, pipe.scheduler.timesteps):
        assert torch.equal(kwargs["img_ids"], latent_image_ids(8, 8)) and torch.equal(kwargs["txt_ids"], text_ids)
        x = unpack_latents(kwargs["hidden_states"], 8, 8)
        assert torch.equal(pack_latents(adapter(x, t.expand(2), cond)), out)
    with pytest.raises(ValueError, match="guidance"):
        adapter(z, torch.full((2,), 1000.0), Cond(encoder_hidden_states=states, text_embeds=pooled))
    # At its training resolution the teacher's index 999 is the plain call's first step.
    teacher = ft.load_flow_teacher(teachers["flux"], resolution=RES)
    raw = teacher.denoiser.raw(z, torch.full((2,), 999), cond)
    assert torch.equal(pack_latents(raw), calls[0][1])


# -- (b) prompt encoders ------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sd3_prompt_encoder_is_encode_prompt_with_the_empty_negative_prompt(pipes, teachers):
    enc = ft.SD3PromptEncoder.from_pretrained(teachers["sd3"])
    states, neg_states, pooled, neg_pooled = pipes["sd3"].encode_prompt(PROMPTS, None, None)
    cond = enc.encode(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 77 + 256, 24)
    assert torch.equal(cond.encoder_hidden_states, states) and torch.equal(cond.text_embeds, pooled)
    null = enc.uncond(cond)  # encoded once, not per row: equal up to the batch size's float rounding
    torch.testing.assert_close(null.encoder_hidden_states, neg_states, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(null.text_embeds, neg_pooled, atol=1e-6, rtol=1e-6)
    assert enc.classifier_free_guidance


@torch.no_grad()
def test_flux_prompt_encoder_is_encode_prompt_and_has_no_unconditional_input(pipes, teachers):
    enc = ft.FluxPromptEncoder.from_pretrained(teachers["flux"], guidance_scale=4.0)
    states, pooled, _ = pipes["flux"].encode_prompt(PROMPTS, None)
    cond = enc.encode(PROMPTS)
    assert cond.encoder_hidden_states.shape == (2, 512, 24)
    assert torch.equal(cond.encoder_hidden_states, states) and torch.equal(cond.text_embeds, pooled)
    assert torch.equal(cond.guidance, torch.full((2,), 4.0))
    assert not enc.classifier_free_guidance
    with pytest.raises(UserError, match="guidance-distilled"):
        enc.uncond(cond)


# -- (c) schedules ------------------------------------------------------------------------------------------------


def test_schedule_sigmas_are_the_schedulers_for_static_and_resolution_dependent_shift(teachers):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    static = ft.FlowMatchSchedule(1000, shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(static.sigmas, reference.sigmas.flip(0).double(), atol=1e-6, rtol=0)
    t = torch.tensor([0, 249, 499, 999])
    torch.testing.assert_close(static.model_time(t), (static.sigmas[t] * 1000).float())

    cfg = json.load(open(f"{teachers['flux']}/scheduler/scheduler_config.json"))
    spec = ft.flow_schedule_from_scheduler_config(cfg, resolution=1024)  # 4096 tokens: Flux's max_shift
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    assert spec.prediction_type == "flow" and spec.schedule.mu == pytest.approx(mu)
    dynamic = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    idx = [999, 749, 499, 249, 0]
    dynamic.set_timesteps(sigmas=[(i + 1) / 1000 for i in idx], mu=mu)
    torch.testing.assert_close(spec.schedule.sigmas[idx], dynamic.sigmas[:-1].double(), atol=1e-6, rtol=0)

    teacher = ft.load_flow_teacher(teachers["flux"], resolution=RES)  # 16 tokens at autoencoder factor 2
    assert teacher.vae_scale_factor == 2
    assert teacher.denoiser.schedule.mu == pytest.approx(calculate_shift(16, 256, 4096, 0.5, 1.15))
    with pytest.raises(UserError, match="resolution"):
        ft.load_flow_teacher(teachers["flux"])
    assert ft.load_flow_teacher(teachers["sd3"]).denoiser.schedule.flow_shift == 3.0


def test_teacher_kind_is_read_from_the_folder(teachers, tmp_path):
    assert ft.flow_teacher_kind(teachers["sd3"]) == "sd3" and ft.flow_teacher_kind(teachers["flux"]) == "flux"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert ft.flow_teacher_kind(str(tmp_path)) is None
    with pytest.raises(UserError, match="not a Stable Diffusion 3 or Flux"):
        ft.load_flow_teacher(str(tmp_path))


# -- (d) export ---------------------------------------------------------------------------------------------------

# (kind, trained indices, LoRA student): one step at sigma = 1 (the teacher's own config), one step below it
# (exponential sigmas), four evenly spaced steps (a resolution-independent shift plus shift_terminal).
CASES = [("sd3", [749], True), ("sd3", [999, 749, 499, 249], False), ("flux", [999], False)]
CASES += [("flux", [999, 749, 499, 249], True)]


@pytest.fixture(scope="module")
def exports(teachers, tmp_path_factory):
    """Each case exported from a copy of the teacher transformer (a LoRA one with a trained-looking adapter):
    {case index: (folder, trained sigmas, student)}."""
    from onestep.lora import add_lora

    root, out = tmp_path_factory.mktemp("exports"), {}
    for i, (kind, timesteps, lora) in enumerate(CASES):
        student, config = _transformer_copy(teachers[kind], kind), None
        if lora:
            config = add_lora(student, rank=4, alpha=4, targets=ft.TRANSFORMER_LORA_TARGETS)
            with torch.no_grad():
                for name, p in student.named_parameters():
                    if "lora_B" in name:  # B is no longer zero after training
                        p.normal_(std=0.2)
        folder = root / f"{kind}-{len(timesteps)}-{timesteps[0]}"
        fe.export_flow_pipeline(student, teachers[kind], kind, timesteps, str(folder), {}, lora=config, resolution=RES)
        cfg = json.load(open(f"{teachers[kind]}/scheduler/scheduler_config.json"))
        schedule = ft.flow_schedule_from_scheduler_config(cfg, RES, vae_scale_factor=2).schedule
        out[i] = (str(folder), [float(schedule.sigmas[t]) for t in timesteps], student)
    return out


FRESH = r"""
import sys, json, torch
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
out = {}
for folder, sigmas in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder)
    flux = type(pipe).__name__ == "FluxPipeline"
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    kw = dict(height=16, width=16, guidance_scale=3.5) if flux else dict(guidance_scale=1.0)
    kw.update(output_type="np", num_inference_steps=len(sigmas))
    torch.manual_seed(1)
    plain = pipe("a red car", generator=torch.Generator().manual_seed(0), **kw).images
    # The same call at explicit sigmas, through a scheduler that leaves them unshifted (mu = 0 / shift 1).
    stochastic = len(sigmas) > 1
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.0, max_shift=0.0,
        stochastic_sampling=stochastic) if flux else FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic)
    torch.manual_seed(1)
    kw.pop("num_inference_steps")
    explicit = pipe("a red car", generator=torch.Generator().manual_seed(0), sigmas=sigmas, **kw).images
    times = [t * 1000 for t in seen] if flux else seen
    out[folder] = {"class": type(pipe).__name__, "plain": times[: len(sigmas)], "explicit": times[len(sigmas):],
                   "diff": float(abs(plain - explicit).max()), "std": float(plain.std())}
assert 'onestep' not in sys.modules
print(json.dumps(out))
"""


def test_export_is_a_stock_pipeline_whose_plain_call_runs_the_trained_timesteps(exports, tmp_path):
    jobs = [exports[i][:2] for i in range(len(CASES))]
    r = run([PY, "-c", FRESH, json.dumps(jobs)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for (kind, timesteps, _), (folder, sigmas) in zip(CASES, jobs):
        got = results[folder]
        assert got["class"] == ft.FLOW_PIPELINES[kind]
        np.testing.assert_allclose(got["plain"], np.array(sigmas) * 1000, atol=fe.TIMESTEP_TOLERANCE, rtol=0)
        np.testing.assert_allclose(got["explicit"], got["plain"], atol=fe.TIMESTEP_TOLERANCE, rtol=0)
        assert got["diff"] <= 1e-5 and got["std"] > 0, (folder, got)
        card = open(f"{folder}/README.md").read()
        assert ft.FLOW_PIPELINES[kind] in card and f"num_inference_steps={len(timesteps)}" in card
        assert not any(name.startswith(".export-") for name in os.listdir(folder))


def test_export_refuses_timesteps_no_stock_config_reaches(teachers, tmp_path):
    student = _transformer_copy(teachers["sd3"], "sd3")
    with pytest.raises(UserError, match=r"closest: \[1000\.0, 818\.8"):
        fe.export_flow_pipeline(student, teachers["sd3"], "sd3", [999, 600, 300, 100], str(tmp_path), {})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", [i for i, c in enumerate(CASES) if c[2]], ids=lambda i: CASES[i][0])
@torch.no_grad()
def test_lora_export_loads_with_load_lora_weights_and_is_fused_in_the_folder(teachers, exports, case):
    from diffusers import DiffusionPipeline

    kind = CASES[case][0]
    folder, _, student = exports[case]
    teacher = DiffusionPipeline.from_pretrained(teachers[kind])
    x, t = torch.randn(1, 16, 8, 8), torch.full((1,), 900.0)
    pooled = torch.randn(1, 20 if kind == "sd3" else 8)
    cond = Cond(encoder_hidden_states=torch.randn(1, 5, 24), text_embeds=pooled, guidance=torch.full((1,), 3.5))
    before = adapt(teacher.transformer)(x, t, cond)
    teacher.load_lora_weights(os.path.join(folder, "lora"))
    with_adapter = adapt(teacher.transformer)(x, t, cond)
    fused = adapt(DiffusionPipeline.from_pretrained(folder).transformer)(x, t, cond)
    expected = adapt(student)(x, t, cond)
    assert (with_adapter - before).abs().max() > 1e-3
    torch.testing.assert_close(with_adapter, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


# -- (e) GAN head on transformer tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_token_head_reads_the_bottleneck_tokens_and_passes_gradients(teachers, kind):
    from onestep.critic import Critic
    from onestep.discriminator import TokenHead

    net = _transformer_copy(teachers[kind], kind)
    critic = Critic(Denoiser(net, ft.FlowMatchSchedule(1000, shift=3.0), "flow"))
    pooled = torch.randn(2, 20 if kind == "sd3" else 8)
    cond = Cond(encoder_hidden_states=torch.randn(2, 5, 24), text_embeds=pooled, guidance=torch.full((2,), 3.5))
    shape = critic.feature_shape((16, 8, 8), cond)
    assert shape == (16, 16)  # 8x8 latents in 2x2 patches, width 16
    critic.head = TokenHead(shape)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    logits = critic.logits(x, torch.tensor([100, 900]), cond)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.head.parameters())
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="token features"):
        TokenHead((16, 4, 4))
