"""The SR scripts end to end at a tiny size (train/sr_teacher.py -> train/tadsr.py, and train/oftsr.py --preset
full-cpu: the flow teacher, then its student, from one command), their exports as SuperResolutionPipeline folders: loaded in a fresh process with diffusers alone,
the same images for the same seed, tiles that blend seamlessly, and bad input refused in one sentence."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from onestep.context import TeacherContext
from tests.helpers import PY, check_model_card, run

TINY = ["--resolution", "16", "--block_out_channels", "8,16", "--train_batch_size", "2", "--max_train_steps", "2"]
LOOP = ["--validation_steps", "1000", "--checkpointing_steps", "1000", "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    data = root / "hr"
    data.mkdir()
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rng.randint(0, 256, (24, 28, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = {k: str(root / k) for k in ("resshift", "tadsr", "oftsr")}
    out["flow"] = os.path.join(out["oftsr"], "teacher")  # the recipe's teacher stage
    out["data"] = str(data)
    common = ["--train_data_dir", str(data), *LOOP]
    steps = [
        ["train/sr_teacher.py", *TINY, "--num_timesteps", "5", "--output_dir", out["resshift"]],
        ["train/tadsr.py", "--pretrained_model_name_or_path", out["resshift"], "--output_dir", out["tadsr"]]
        + ["--train_batch_size", "2", "--max_train_steps", "2", "--disc_embed_dim", "16"],
        ["train/oftsr.py", "--preset", "full-cpu", *TINY, "--output_dir", out["oftsr"], "--teacher_sample_steps", "3"],
    ]
    import importlib

    for script, *args in steps:  # in-process: the scripts' main(argv), as accelerate launch would call it
        module = importlib.import_module(script.replace("/", ".").removesuffix(".py"))
        result = module.main([*args, *common])
        assert not result["interrupted"]
    return out


def _lr(size=(6, 5), mode="RGB"):
    rng = np.random.RandomState(1)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


FRESH = """
import json, sys, numpy as np, torch
from PIL import Image
from diffusers import DiffusionPipeline
lr = Image.open(sys.argv[1])
for folder, kw, path in json.loads(sys.argv[2]):
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    np.save(path, pipe(image=lr, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images)
    print(type(pipe).__name__)
"""
CALLS = {"tadsr": {}, "oftsr": {"t": 0.5}, "resshift": {"num_inference_steps": 3}, "flow": {}}


def test_exports_load_in_a_fresh_process_and_reproduce(runs, tmp_path):
    """One fresh process with diffusers alone (the folders' own pipeline file) loads every export; the installed
    class gives the same images for the same seed."""
    from onestep.pipelines import SuperResolutionPipeline

    lr = _lr()
    lr.save(tmp_path / "lr.png")
    jobs = [(runs[name], kw, str(tmp_path / f"{name}.npy")) for name, kw in CALLS.items()]
    env = {"PYTHONPATH": ""}  # not the checkout: the pipeline class must come from the folder
    r = run([PY, "-c", FRESH, str(tmp_path / "lr.png"), json.dumps(jobs)], env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["SuperResolutionPipeline"] * len(jobs)
    for folder, kw, path in jobs:
        assert json.load(open(os.path.join(folder, "model_index.json")))["_class_name"][0] == "super_resolution"
        pipe = SuperResolutionPipeline.from_pretrained(folder)  # the installed class, no remote code
        mine = pipe(image=lr, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images
        assert mine.shape == (1, 20, 24, 3)  # x4
        np.testing.assert_allclose(mine, np.load(path), atol=1e-6)


def test_teacher_folders_load_as_teachers(runs):
    from onestep.loading import load_teacher

    assert load_teacher(runs["resshift"]).denoiser.schedule.kind == "resshift"
    flow = load_teacher(runs["flow"]).denoiser
    assert flow.schedule.kind == "conditional_flow" and flow.prediction_type == "flow"


def test_a_stage_sets_its_own_augmentation(runs):
    """full-cpu's teacher stage trains with flips (rotations and rescaling made worse teachers), its student stage
    with the student preset's full augmentation."""

    def augmentation(folder):
        with open(os.path.join(folder, "training_config.json")) as f:
            return json.load(f)["data"]["augmentation"]

    assert augmentation(runs["flow"]) == "flips"
    assert augmentation(os.path.join(runs["oftsr"], "distill")) == "full"
    assert augmentation(runs["resshift"]) == "flips"


def test_seed_reproduces_and_t_changes_the_output(runs):
    from onestep.pipelines import SuperResolutionPipeline

    pipe = SuperResolutionPipeline.from_pretrained(runs["oftsr"])
    call = lambda seed, t: (
        pipe(image=_lr(), generator=torch.Generator().manual_seed(seed), t=t, output_type="pt").images
    )  # noqa: E731
    assert torch.equal(call(0, 1.0), call(0, 1.0))
    assert not torch.equal(call(0, 1.0), call(1, 1.0)) and not torch.equal(call(0, 0.0), call(0, 1.0))


def test_tiles_of_an_image_two_and_a_half_times_the_training_size_blend_seamlessly(runs):
    """A 40x40 output from 16x16 tiles (overlap 2): against the whole image in one UNet call, with the same noise,
    the tiled result is closer than another noise draw's whole image (a tiny network's receptive field spans most
    of a 16-pixel tile, so that is the scale to judge it by), and it jumps no more across the tile seams than
    elsewhere. A pointwise network
    (no receptive field) must give the whole-image result exactly: that checks the blending weights and offsets."""
    from onestep.pipelines import SuperResolutionPipeline

    pipe = SuperResolutionPipeline.from_pretrained(runs["tadsr"])
    assert pipe.config.tile_size == 16
    lr = _lr((10, 10))
    tiled = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.register_to_config(tile_size=64)
    whole = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert tiled.shape == whole.shape == (1, 3, 40, 40)
    other = pipe(image=lr, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert float((tiled - whole).abs().mean()) < float((other - whole).abs().mean())
    seams = [13, 14, 15, 16, 23, 24, 29, 30]  # tiles [0, 16), [14, 30), [24, 40): the blends' edges
    jump = (tiled[..., 1:] - tiled[..., :-1]).abs().mean((0, 1, 2))
    assert float(jump[seams].max()) < 2 * float(jump.mean()) + 0.02
    pipe.register_to_config(tile_size=16)
    pipe._net = lambda x, time, u: torch.tanh(3 * x + u)  # pointwise
    tiled = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.register_to_config(tile_size=64)
    whole = pipe(image=lr, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(tiled, whole, atol=1e-6)


def test_bad_input_is_one_sentence(runs):
    from onestep.pipelines import SuperResolutionPipeline

    student = SuperResolutionPipeline.from_pretrained(runs["oftsr"])
    tadsr = SuperResolutionPipeline.from_pretrained(runs["tadsr"])
    with pytest.raises(ValueError, match="grayscale"):
        student(image=_lr(mode="L"))
    with pytest.raises(ValueError, match="RGBA"):
        student(image=_lr(mode="RGBA"))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        student(image=_lr(), t=1.5)
    with pytest.raises(ValueError, match="no t knob"):
        tadsr(image=_lr(), t=0.5)
    with pytest.raises(ValueError, match="cannot be taken"):
        tadsr.register_to_config(upscale_factor=1)  # 3x3 -> 3x3, under a tile and not a multiple of 2
        tadsr(image=_lr((3, 3)))
    with pytest.raises(ValueError, match="C = 3"):
        student(image=torch.rand(1, 4, 5, 5))


def test_scripts_refuse_a_teacher_without_low_resolution_input(tmp_path):
    from tests.helpers import save_tiny_teacher

    teacher = save_tiny_teacher(str(tmp_path / "pixel"))
    r = run([PY, "train/tadsr.py", "--pretrained_model_name_or_path", teacher, "--output_dir", str(tmp_path / "o")])
    assert r.returncode == 2 and "TAD-SR distils super-resolution" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "o").exists()


def test_onestep_eval_sr_runs_the_pipeline_with_its_knob(runs, tmp_path):
    from onestep.eval.commands import super_resolution

    for sub in ("hr", "lr"):
        (tmp_path / sub).mkdir()
    rng = np.random.RandomState(2)
    hr = rng.randint(0, 256, (24, 28, 3), dtype=np.uint8)
    Image.fromarray(hr).save(tmp_path / "hr" / "a.png")
    Image.fromarray(hr[::4, ::4]).save(tmp_path / "lr" / "a.png")
    common = dict(pipeline=runs["oftsr"], lr=str(tmp_path / "lr"))
    at0 = super_resolution(str(tmp_path / "hr"), str(tmp_path / "t0.json"), t=0.0, **common)
    at1 = super_resolution(str(tmp_path / "hr"), str(tmp_path / "t1.json"), t=1.0, **common)
    assert at0["t"] == 0.0 and at0["images_per_second"] > 0 and at0["psnr_rgb"] != at1["psnr_rgb"]


def test_sr_crops_pair_by_name_follow_the_seed_and_refuse_mismatched_sizes(tmp_path):
    from onestep.data import upsample
    from onestep.errors import UserError
    from onestep.sr_data import EVAL_IMAGES, TRAIN_IMAGES, SRCrops

    assert not set(TRAIN_IMAGES) & set(EVAL_IMAGES)  # whole images held out
    (tmp_path / "hr").mkdir(), (tmp_path / "lr").mkdir()
    hr = np.random.RandomState(4).randint(0, 256, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(hr).save(tmp_path / "hr" / "x.png")
    Image.fromarray(hr[::4, ::4]).save(tmp_path / "lr" / "x.png")  # an LR whose pixels sit at known HR places
    folders = (str(tmp_path / "hr"), str(tmp_path / "lr"))
    crops = SRCrops.from_folders(*folders, resolution=16, scale=4, batch_size=3, hflip=0, vflip=0)
    a, b = crops.batch(5, 0, 0, "cpu"), crops.batch(5, 0, 0, "cpu")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, crops.batch(6, 0, 0, "cpu").images)
    assert torch.allclose(upsample(a.images[..., ::4, ::4], 4), a.cond.image)  # the LR crop matches the HR crop
    assert torch.equal(a.low_res, a.images[..., ::4, ::4])  # and is carried as it is (latent SR teachers read it)
    Image.fromarray(hr[::4, ::5]).save(tmp_path / "lr" / "x.png")
    with pytest.raises(UserError, match="x4 that gives"):
        SRCrops.from_folders(str(tmp_path / "hr"), str(tmp_path / "lr"), resolution=16, scale=4, batch_size=1)


def _lr_tensor_and_eps(pipe, lr, seed):
    """u and eps exactly as the pipeline builds them (bicubic x scale of the [-1, 1] LR; the seed's noise)."""
    import torch.nn.functional as F

    low = torch.from_numpy(np.asarray(lr, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    u = F.interpolate(low, scale_factor=pipe.config.upscale_factor, mode="bicubic", align_corners=False)
    return u, torch.randn(u.shape, generator=torch.Generator().manual_seed(seed))


def test_exports_compute_what_the_methods_sample(runs):
    """The exported pipelines equal the methods' own one-step samplers on the trained weights: TAD-SR (also with the
    student called at another timestep than the start state's) and OFTSR at t = 0.5."""
    from diffusers import UNet2DModel

    from onestep.denoiser import Cond, Denoiser
    from onestep.loading import load_teacher
    from onestep.methods.oftsr import OFTSR, FlowVelocity, OFTSRConfig
    from onestep.methods.tadsr import TADSR, TADSRConfig
    from onestep.pipelines import SuperResolutionPipeline

    lr = _lr((4, 4))  # 16x16 out: one tile, so the network sees the whole image as the method's sampler does
    for student_t in (None, 2):
        pipe = SuperResolutionPipeline.from_pretrained(runs["tadsr"])
        teacher = load_teacher(runs["resshift"]).denoiser
        method = TADSR(TeacherContext(teacher, (3, 16, 16)), TADSRConfig(gan=False, student_timestep=student_t))
        pipe.register_to_config(timestep=method.student_t)
        student = Denoiser(UNet2DModel.from_pretrained(runs["tadsr"], subfolder="unet"), teacher.schedule, "sample")
        u, eps = _lr_tensor_and_eps(pipe, lr, 3)
        mine = method.sample(student, Cond(image=u), eps).clamp(-1, 1) / 2 + 0.5
        theirs = pipe(image=lr, generator=torch.Generator().manual_seed(3), output_type="pt").images
        assert torch.allclose(mine, theirs, atol=1e-5)
    pipe = SuperResolutionPipeline.from_pretrained(runs["oftsr"])
    flow = load_teacher(runs["flow"]).denoiser
    method = OFTSR(TeacherContext(flow, (3, 16, 16)), OFTSRConfig())
    student = FlowVelocity(
        Denoiser(UNet2DModel.from_pretrained(runs["oftsr"], subfolder="unet"), flow.schedule, "flow")
    )
    u, eps = _lr_tensor_and_eps(pipe, lr, 4)
    mine = method.sample(student, u, eps, 0.5).clamp(-1, 1) / 2 + 0.5
    theirs = pipe(image=lr, generator=torch.Generator().manual_seed(4), t=0.5, output_type="pt").images
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_velocity_mode_tiles_blend_exactly_for_a_pointwise_network(runs):
    from onestep.pipelines import SuperResolutionPipeline

    pipe = SuperResolutionPipeline.from_pretrained(runs["oftsr"])
    pipe._net = lambda x, time, u: torch.tanh(2 * x - u) * (1 + time / 999)  # pointwise, reads t
    lr, outputs = _lr((10, 10)), []
    for tile in (16, 64):
        pipe.register_to_config(tile_size=tile)
        outputs.append(pipe(image=lr, generator=torch.Generator().manual_seed(0), t=0.5, output_type="pt").images)
    assert outputs[0].shape == (1, 3, 40, 40) and torch.allclose(*outputs, atol=1e-6)


def test_onestep_eval_sr_refuses_a_bad_knob_in_one_sentence(runs, tmp_path):
    from onestep.errors import UserError
    from onestep.eval.cli import main

    (tmp_path / "hr").mkdir(), (tmp_path / "lr").mkdir()
    hr = np.random.RandomState(2).randint(0, 256, (24, 28, 3), dtype=np.uint8)
    Image.fromarray(hr).save(tmp_path / "hr" / "a.png")
    Image.fromarray(hr[::4, ::4]).save(tmp_path / "lr" / "a.png")
    base = ["sr", "--hr", str(tmp_path / "hr"), "--lr", str(tmp_path / "lr")]
    for pipeline, t, message in ((runs["oftsr"], "1.5", "in [0, 1]"), (runs["tadsr"], "0.5", "no t knob")):
        out = tmp_path / f"{t}.json"
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            main([*base, "--pipeline", pipeline, "--t", t, "--output", str(out)])
        assert not out.exists()


def test_sr_scripts_refuse_bad_flags_in_one_sentence(runs, tmp_path):
    """In-process (the scripts' main); run_main turns the UserError into one line and exit status 2."""
    import importlib

    from onestep.errors import UserError

    data = ["--train_data_dir", runs["data"]]
    cases = [
        (["train/oftsr.py", "--preset", "teacher-cpu", "--sigma_p", "1.5"], r"sigma_p must lie in \(0, 1\]"),
        (["train/sr_teacher.py", "--num_timesteps", "1"], "num_timesteps >= 2"),
        (
            ["train/oftsr.py", "--preset", "teacher-cpu", "--pretrained_model_name_or_path", runs["flow"]],
            "from scratch",
        ),
        (
            ["train/tadsr.py", "--pretrained_model_name_or_path", runs["resshift"], "--upscale_factor", "2", *data],
            "x4",
        ),
        (
            ["train/tadsr.py", "--pretrained_model_name_or_path", runs["resshift"], "--dataset_name", "x/y", *data],
            "SR",
        ),
        (["train/tadsr.py", "--pretrained_model_name_or_path", runs["resshift"]], "pass --train_data_dir"),
    ]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / str(i)
        module = importlib.import_module(argv[0].replace("/", ".").removesuffix(".py"))
        with pytest.raises(UserError, match=message):
            module.main([*argv[1:], "--output_dir", str(out)])
        assert not out.exists()


def test_model_cards_are_hub_ready(runs):
    check_model_card(runs["tadsr"], "tad-sr", "image-to-image", rows=("teacher", "student timestep", "metrics"))
    check_model_card(runs["oftsr"], "oftsr", "image-to-image", rows=("teacher", "default t", "metrics"))
    for teacher in ("resshift", "flow"):
        header, _ = check_model_card(runs[teacher], pipeline_tag="image-to-image", rows=("training steps",))
        assert "teacher" in header["tags"]
