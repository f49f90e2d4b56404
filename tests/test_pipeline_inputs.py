"""Every onestep pipeline class checks its call's arguments (one sentence per refusal), the SR pipelines take PIL,
numpy and tensor images (uint8 converted, other float ranges refused) and show a progress bar over tiles, every class
loads only folders of its own class (without running their pipeline file), and the latent SR pipeline encodes, runs
and decodes a 1024x1024 output in tiles within a memory bound. Tiny random models built in code, no training."""

import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import PY, ROOT, run, sd_scheduler_config, tiny_unet


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and do not fight the other test processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _alphas():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sd_scheduler_config()).alphas_cumprod.tolist()


def _latent_sr(vq_size: int | None = None, **config):
    """The tiny LDM-SR-shaped student of tests/test_latent_sr.py (its VQ autoencoder trained at vq_size pixels)."""
    from onestep.pipelines import LatentSuperResolutionPipeline
    from tests.test_latent_sr import _vq

    torch.manual_seed(0)
    vq, unet = _vq(), tiny_unet(sample_size=8, channels=3, in_channels=6)
    if vq_size:
        vq.register_to_config(sample_size=vq_size)
    return LatentSuperResolutionPipeline(
        unet=unet, vqvae=vq, schedule={"kind": "vp", "alphas_cumprod": _alphas()}, timestep=999, **config
    )


@pytest.fixture(scope="module")
def pipes():
    from diffusers import DDPMScheduler

    from onestep.pipelines import MultiStudentPipeline, OneStepPipeline, SuperResolutionPipeline
    from onestep.pipelines.boot import BootPipeline, BootScheduler

    torch.manual_seed(0)
    scheduler = DDPMScheduler.from_config(sd_scheduler_config())
    sr_unet = tiny_unet(sample_size=16, channels=3, in_channels=6)
    router = {"kind": "class_range", "num_students": 2, "num_classes": 3}
    pipes = {
        "one_step": OneStepPipeline(tiny_unet(num_class_embeds=4), scheduler, timesteps=[999, 499], num_classes=3),
        "boot": BootPipeline(tiny_unet(num_class_embeds=4), BootScheduler(), num_classes=3),
        "msd": MultiStudentPipeline(
            scheduler, tiny_unet(num_class_embeds=4), tiny_unet(num_class_embeds=4), router=router, num_classes=3
        ),
        "oftsr": SuperResolutionPipeline(sr_unet, mode="velocity", prediction_type="flow"),
        "resshift": SuperResolutionPipeline(
            sr_unet, {"kind": "resshift", "etas": [0.01, 0.1, 0.3, 0.6, 0.99], "kappa": 2.0}, mode="sampler"
        ),
        "latent": _latent_sr(),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


CLASS = ["one_step", "boot", "msd"]
SR = ["oftsr", "resshift", "latent"]


def _lr(size=(4, 4), seed=1):
    return np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _good(name, **kwargs):
    """A call that works: two class labels, or one low-resolution image (one tile)."""
    base = (
        {"class_labels": [0, 2]}
        if name in CLASS
        else {"image": Image.fromarray(_lr((8, 8) if name == "latent" else (4, 4)))}
    )
    return {**base, "output_type": "pt", **kwargs}


def _refused(pipe, error, match, **kwargs):
    with pytest.raises(error, match=match) as err:
        pipe(**kwargs)
    message = str(err.value)
    assert "\n" not in message and message.endswith(".") and message.replace("e.g. ", "").count(". ") == 0, message
    return message


@pytest.mark.parametrize("name", CLASS)
@pytest.mark.parametrize("labels", [3.5, "3", [0, 2.5], torch.tensor([1.0]), np.array([0.0]), [True]])
def test_class_labels_that_are_not_integers_are_refused(pipes, name, labels):
    _refused(pipes[name], TypeError, "class_labels must be integers", **_good(name, class_labels=labels))


@pytest.mark.parametrize("name", CLASS)
@pytest.mark.parametrize("labels", [3, [0, -1], torch.tensor([2, 7])])
def test_class_labels_out_of_range_are_refused(pipes, name, labels):
    _refused(pipes[name], ValueError, r"class_labels must lie in 0\.\.2", **_good(name, class_labels=labels))


@pytest.mark.parametrize("name", CLASS)
def test_integer_labels_of_any_kind_are_taken(pipes, name):
    for labels in (2, [0, 2], (0, 2), torch.tensor([0, 2]), np.array([0, 2]), [np.int64(0), 2]):
        images = pipes[name](**_good(name, class_labels=labels)).images
        assert images.shape[0] == (1 if isinstance(labels, int) else 2)


BATCH_SIZES = [(0, ValueError, "at least 1; got 0"), (-2, ValueError, "at least 1"), (2.0, TypeError, "an integer"),
               ("2", TypeError, "an integer")]  # fmt: skip


@pytest.mark.parametrize("name", CLASS)
@pytest.mark.parametrize("batch_size,error,match", BATCH_SIZES)
def test_a_batch_size_below_one_or_not_an_integer_is_refused(pipes, name, batch_size, error, match):
    _refused(pipes[name], error, f"batch_size must be {match}", batch_size=batch_size, output_type="pt")
    _refused(pipes[name], ValueError, "does not match the 2 class labels", **_good(name, batch_size=3))


@pytest.mark.parametrize("name", CLASS + SR)
def test_a_list_of_generators_must_have_one_per_image(pipes, name):
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    if name in CLASS:
        _refused(pipes[name], ValueError, "list of 3 generators for 2 images", **_good(name, generator=g))
        _refused(pipes[name], ValueError, "list of 1 generators for 2 images", **_good(name, generator=g[:1]))
        assert pipes[name](**_good(name, generator=g[:2])).images.shape[0] == 2
    else:
        image = [_good(name)["image"]] * 2
        _refused(pipes[name], ValueError, "list of 3 generators for 2 images", **_good(name, image=image, generator=g))
        assert pipes[name](**_good(name, image=image, generator=g[:2])).images.shape[0] == 2
    _refused(pipes[name], TypeError, "generator must be a torch.Generator", **_good(name, generator=0))


@pytest.mark.parametrize("name", CLASS)
def test_latents_of_the_wrong_shape_are_refused(pipes, name):
    _refused(
        pipes[name],
        ValueError,
        r"latents must have shape \(2, 1, 8, 8\)",
        **_good(name, latents=torch.randn(3, 1, 8, 8)),
    )
    _refused(pipes[name], ValueError, r"\(1, 1, 8, 8\)", batch_size=1, latents=torch.randn(1, 1, 16, 16))
    _refused(pipes[name], TypeError, "float torch.Tensor", **_good(name, latents=np.zeros((2, 1, 8, 8))))
    z, g = torch.randn(2, 1, 8, 8), lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = [pipes[name](**_good(name, latents=z, generator=g())).images for _ in range(2)]
    assert torch.equal(*images)


KNOBS = [("0.5", TypeError, "one number"), ([0.5], TypeError, "one number"), (True, TypeError, "one number"),
         (1.5, ValueError, "lie in"), (-0.1, ValueError, "lie in"), (math.nan, ValueError, "lie in")]  # fmt: skip


@pytest.mark.parametrize("t,error,match", KNOBS)
def test_oftsr_t_must_be_one_number_in_0_1(pipes, t, error, match):
    _refused(pipes["oftsr"], error, r"t must (be|lie) .*\[0, 1\]", **_good("oftsr", t=t))
    _refused(pipes["oftsr"], error, match, **_good("oftsr", t=t))
    assert pipes["oftsr"](**_good("oftsr", t=np.float32(0.25))).images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("name", CLASS + SR)
@pytest.mark.parametrize("steps", [0, -1])
def test_zero_or_negative_steps_are_refused_not_read_as_the_default(pipes, name, steps):
    _refused(
        pipes[name], ValueError, "num_inference_steps must be between 1 and", **_good(name, num_inference_steps=steps)
    )
    _refused(pipes[name], TypeError, "num_inference_steps must be an integer", **_good(name, num_inference_steps=1.0))


def test_the_sampler_takes_any_count_of_its_schedule_steps(pipes):
    pipe = pipes["resshift"]
    three = pipe(**_good("resshift", num_inference_steps=3)).images
    assert not torch.equal(three, pipe(**_good("resshift", num_inference_steps=5)).images)
    _refused(
        pipe,
        ValueError,
        r"between 1 and 5 \(the 5 steps of the schedule\); got 6",
        **_good("resshift", num_inference_steps=6),
    )


@pytest.mark.parametrize("name", CLASS + SR)
@pytest.mark.parametrize("output_type", ["numpy", "PIL", "tensor", None])
def test_an_unknown_output_type_is_refused(pipes, name, output_type):
    _refused(
        pipes[name],
        ValueError,
        r"output_type must be one of 'pil', 'np', 'pt'",
        **_good(name, output_type=output_type),
    )


@pytest.mark.parametrize("name", CLASS + SR)
def test_the_three_output_types(pipes, name):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pt = pipes[name](**_good(name, generator=g())).images
    np_images = pipes[name](**_good(name, generator=g(), output_type="np")).images
    pil = pipes[name](**_good(name, generator=g(), output_type="pil")).images
    assert isinstance(np_images, np.ndarray) and np.allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert isinstance(pil[0], Image.Image) and len(pil) == pt.shape[0]


# -- super-resolution images -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SR)
def test_sr_images_as_pil_numpy_or_tensors_give_the_same_result(pipes, name):
    """uint8 (a torchvision.io.read_image tensor, a numpy array) is divided by 255; float in [0, 1] is taken as is."""
    pixels = _lr((8, 8) if name == "latent" else (4, 4))
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    forms = [Image.fromarray(pixels), pixels, pixels / 255.0, pixels.astype(np.float32) / 255, chw, chw[None],
             chw.float() / 255, chw.double() / 255, [pixels]]  # fmt: skip
    want = pipes[name](**_good(name, image=forms[0], generator=torch.Generator().manual_seed(0))).images
    for form in forms[1:]:
        got = pipes[name](**_good(name, image=form, generator=torch.Generator().manual_seed(0))).images
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SR)
def test_sr_images_in_another_range_or_type_are_refused(pipes, name):
    pixels = torch.from_numpy(_lr((8, 8) if name == "latent" else (4, 4))).permute(2, 0, 1).float() / 255
    message = _refused(
        pipes[name], ValueError, r"must lie in \[0, 1\] \(or be uint8", **_good(name, image=pixels * 2 - 1)
    )
    assert "[-1, 1]" in message
    _refused(pipes[name], ValueError, r"x / 255 for \[0, 255\]", **_good(name, image=pixels * 255))
    _refused(
        pipes[name], ValueError, "NaN or infinite", **_good(name, image=torch.where(pixels > 0.5, math.nan, pixels))
    )
    _refused(pipes[name], ValueError, "numpy image", **_good(name, image=(pixels.numpy() * 2 - 1).transpose(1, 2, 0)))
    _refused(pipes[name], TypeError, "uint8 .* got torch.int64", **_good(name, image=(pixels * 255).long()))
    _refused(
        pipes[name],
        TypeError,
        "uint8 .* got int64",
        **_good(name, image=(pixels.numpy() * 255).astype(np.int64).transpose(1, 2, 0)),
    )
    _refused(pipes[name], TypeError, "got str", **_good(name, image="lr.png"))
    _refused(pipes[name], ValueError, "C = 3", **_good(name, image=pixels[:2]))
    _refused(pipes[name], ValueError, "same size", **_good(name, image=[pixels, pixels[:, :-2]]))


@pytest.mark.parametrize("name", SR)
def test_a_progress_bar_over_tiles_when_an_image_takes_more_than_one(pipes, name):
    pipe = pipes[name]
    bar = io.StringIO()
    pipe.set_progress_bar_config(file=bar, disable=False)
    try:
        pipe(**_good(name))  # one tile: no bar
        assert bar.getvalue() == ""
        pipe(**_good(name, image=Image.fromarray(_lr((20, 12)))))  # 80x48 pixels: tiles
        # SR: 16-pixel tiles every 14 (6 x 4), once per step; latent: 20x12 latent pixels in windows of 8 every 6
        # (3 x 2) for the encoder, the student and the decoder.
        want = {"oftsr": 6 * 4, "resshift": 6 * 4 * 5, "latent": 3 * (3 * 2)}[name]
        assert f"{want}/{want}" in bar.getvalue(), bar.getvalue()
        pipe.set_progress_bar_config(file=bar, disable=True)
        bar.truncate(0)
        bar.seek(0)
        pipe(**_good(name, image=Image.fromarray(_lr((20, 12)))))
        assert bar.getvalue() == ""
    finally:
        pipe.set_progress_bar_config(disable=True)


# -- latent SR tiles ----------------------------------------------------------------------------------------


def test_the_autoencoder_runs_in_windows_that_land_where_they_were_cut_and_blend_without_seams():
    """Through encode and decode: a blockwise encoder (2x2 mean per latent pixel) and a nearest decoder come back
    exactly as on the whole canvas; a local operator (a 3x3 blur) differs from the whole only a little, within the
    overlap, far less than windows butted together without blending."""
    import torch.nn.functional as F

    pipe = _latent_sr()
    assert pipe.latent_factor == 4 and pipe.autoencoder_tiles() == (8, 2)
    g = torch.Generator().manual_seed(0)
    pixels, latents = torch.rand(1, 3, 72, 104, generator=g), torch.rand(1, 3, 18, 26, generator=g)
    pipe._encode = lambda x: F.avg_pool2d(x, 4)
    pipe._decode = lambda z: F.interpolate(z, scale_factor=4, mode="nearest")
    torch.testing.assert_close(pipe.encode(pixels), F.avg_pool2d(pixels, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(pipe.decode(latents), pipe._decode(latents), atol=1e-6, rtol=0)
    blur = torch.full((3, 1, 3, 3), 1 / 9)
    pipe._decode = lambda z: F.conv2d(F.interpolate(z, scale_factor=4, mode="bilinear"), blur, padding=1, groups=3)
    tiled, whole = pipe.decode(latents), pipe._decode(latents)
    butted = torch.cat([pipe._decode(latents[..., k : k + 8]) for k in (0, 8, 16, 24)], -1)  # cut, not blended
    assert float((tiled - whole).abs().max()) < 0.25 * float((butted - whole).abs().max())


def test_a_1024_pixel_output_runs_in_tiles_within_a_memory_bound():
    """A 256x256 image upscaled x4 on the tiny latent SR models (128-pixel tiles) in a fresh process: the encoder,
    student and decoder each run in windows, and the call's peak resident memory stays within 150 MB (measured about
    55 MB; the whole image in one piece takes about 350 MB)."""
    script = f"""
import json, resource, sys
import numpy as np, torch
sys.path.insert(0, {ROOT!r})
torch.set_num_threads(1)
from tests.test_pipeline_inputs import _latent_sr
pipe = _latent_sr(vq_size=128, tile_size=32)
vq = pipe.vqvae
pipe.set_progress_bar_config(disable=True)
calls = {{"encode": 0, "decode": 0, "unet": 0}}
for name, part in (("encode", vq.encoder), ("decode", vq.decoder), ("unet", pipe.unet)):
    part.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
lr = np.random.RandomState(0).randint(0, 256, (256, 256, 3), dtype=np.uint8)
pipe(image=lr[:8, :8])
for k in calls:
    calls[k] = 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = pipe(image=lr, generator=torch.Generator().manual_seed(0)).images[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"size": list(image.size), "peak_mb": peak / 1024, **calls}}))
"""
    r = run([PY, "-c", script], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["size"] == [1024, 1024]
    assert out["encode"] == out["decode"] == out["unet"] == 11 * 11  # 256 latent pixels: 32-wide tiles every 24
    assert out["peak_mb"] < 150, out


# -- loading ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A OneStepPipeline export whose shipped one_step.py would fail if it ran."""
    from onestep.export import export_one_step

    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    export_one_step(
        tiny_unet(num_class_embeds=4), sd_scheduler_config(), [999], str(folder), {"t": "x"}, num_classes=3
    )
    (folder / "one_step.py").write_text("raise RuntimeError('the shipped file ran')\n")
    return folder


@pytest.mark.parametrize(
    "other", ["MultiStudentPipeline", "SuperResolutionPipeline", "LatentSuperResolutionPipeline", "boot.BootPipeline"]
)
def test_another_class_refuses_the_folder_and_names_the_one_it_needs(exported, other):
    import importlib

    module, _, name = f"onestep.pipelines.{other}".rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ValueError) as err:
        cls.from_pretrained(str(exported))
    assert str(err.value) == (
        f"{exported} holds a OneStepPipeline, not a {name}; load it with onestep.pipelines.OneStepPipeline."
        "from_pretrained(folder) or DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)."
    )


def test_the_own_class_loads_without_running_the_shipped_file_or_after_it_was_deleted(exported, tmp_path):
    import shutil

    from onestep.pipelines import OneStepPipeline

    pipe = OneStepPipeline.from_pretrained(exported, torch_dtype=torch.bfloat16, trust_remote_code=True)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.name_or_path == str(exported)
    assert pipe(class_labels=[1], output_type="np").images.shape == (1, 8, 8, 1)
    folder = tmp_path / "no-file"
    shutil.copytree(exported, folder)
    os.remove(folder / "one_step.py")
    again = OneStepPipeline.from_pretrained(str(folder), timesteps=[999, 499])  # a config entry replaced
    assert again.unet.dtype == torch.float32 and list(again.config.timesteps) == [999, 499]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["one_step", "OneStepPipeline"]
    with pytest.raises(TypeError, match="unexpected keyword argument.*device_map"):
        OneStepPipeline.from_pretrained(str(folder), device_map="cpu")
    assert "cannot intercept" in OneStepPipeline.__doc__ and "deleted" in OneStepPipeline.from_pretrained.__doc__


@pytest.mark.parametrize(
    "index,message",
    [
        ({"_class_name": "StableDiffusionPipeline", "scheduler": ["boot", "BootScheduler"]}, "StableDiffusionPipeline, not a BootPipeline; load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)."),
        ({"_class_name": "LDMSuperResolutionPipeline", "vqvae": ["diffusers", "VQModel"]}, "LDMSuperResolutionPipeline, not a BootPipeline; load it with DiffusionPipeline.from_pretrained(folder)."),
        ({"_class_name": ["mine", "MyPipeline"]}, "MyPipeline, not a BootPipeline; load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) if you trust its mine.py."),
        ({"_class_name": ["boot", "BootPipeline"], "scheduler": ["mine", "MyScheduler"]}, "names its scheduler as mine.MyScheduler, which only code shipped in the folder defines"),
    ],
)  # fmt: skip
def test_folders_of_stock_or_foreign_classes_are_refused_without_running_their_code(tmp_path, index, message):
    from onestep.pipelines.boot import BootPipeline

    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        BootPipeline.from_pretrained(str(tmp_path))
    assert message in str(err.value) and str(err.value).count(". ") == 0
