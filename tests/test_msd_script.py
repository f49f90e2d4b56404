"""End-to-end runs of train/msd.py on the bundled digits teacher: the assembled pipeline (fresh process, per-item
routing and noise), exact resume across students after SIGKILL, one student per run then --assemble, a smaller
student through TSM, stage 2's own learning rate, the router hash check at --assemble, EDM students, text students
(router fitted once, routing embeddings in float32 whatever the pipeline's dtype), and one-sentence refusals."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from onestep.cli import run_main
from tests.helpers import PY, ROOT, check_model_card, run

# Two students (classes 0-4, 5-9), 2 DM + 2 DM-and-GAN iterations each, a checkpoint every iteration; stage 2 at
# its own learning rate.
SMALL = ["--max_train_steps", "4", "--dm_steps", "2", "--train_batch_size", "4", "--checkpointing_steps", "1"]
SMALL += ["--validation_steps", "1000", "--adm_learning_rate", "2e-5"]


def _script():
    spec = importlib.util.spec_from_file_location("train_msd", os.path.join(ROOT, "train", "msd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MSD = _script()


def train(out, *extra):
    return MSD.main(["--output_dir", str(out), *SMALL, *extra])


def students(folder):
    return [load_file(os.path.join(folder, f"unet_{k}", "diffusion_pytorch_model.safetensors")) for k in range(2)]


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("msd") / "ref"
    result = train(out)
    assert result["assembled"]
    return out


FRESH = r"""
import sys, json, torch
sys.path = [p for p in sys.path if p not in ('', '.')]
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
g = lambda s: torch.Generator().manual_seed(s)
batch = pipe(class_labels=[3, 7, 0], generator=[g(1), g(2), g(3)], output_type="pt").images
alone = [pipe(class_labels=[c], generator=[g(s)], output_type="pt").images[0] for c, s in ((3, 1), (7, 2), (0, 3))]
other = pipe(class_labels=[9, 3], generator=[g(5), g(1)], output_type="pt").images  # item 3/seed 1 in another batch
torch.save({"batch": batch, "alone": torch.stack(alone), "other": other}, sys.argv[2])
print(json.dumps({"class": type(pipe).__name__, "routes": pipe.route(torch.arange(10)).tolist(),
                  "onestep": 'onestep' in sys.modules, "pil": pipe(class_labels=[1]).images[0].size}))
"""


def test_the_pipeline_loads_in_a_fresh_process_and_routes_each_item_with_its_own_noise(reference, tmp_path):
    r = run([PY, "-c", FRESH, str(reference), str(tmp_path / "out.pt")], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info == {"class": "MultiStudentPipeline", "routes": [0] * 5 + [1] * 5, "onestep": False, "pil": [16, 16]}
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    # An item's image depends on its own generator and label only (batched convolutions: equal to rounding).
    assert torch.allclose(got["batch"], got["alone"], atol=1e-5) and torch.allclose(
        got["other"][1], got["batch"][0], atol=1e-5
    )
    # Each image is its student's x0 at t = 399 from that item's noise: student 0 for class 3, student 1 for 7.
    from diffusers import DDPMScheduler, UNet2DModel

    abar = DDPMScheduler.from_pretrained(reference, subfolder="scheduler").alphas_cumprod.double()[399]
    for item, (label, seed, k) in enumerate(((3, 1, 0), (7, 2, 1))):
        z = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        unet = UNet2DModel.from_pretrained(reference / f"unet_{k}")
        with torch.no_grad():
            eps = unet(z, torch.tensor([399]), class_labels=torch.tensor([label])).sample.double()
        x0 = (z.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
        assert torch.allclose(got["batch"][item], (x0[0].float() / 2 + 0.5).clamp(0, 1), atol=1e-5)
    # The two students differ, and the folder records the router and where each student came from.
    a, b = students(reference)
    assert not same(a, b)
    index = json.loads((reference / "model_index.json").read_text())
    assert index["router"] == {"kind": "class_range", "num_students": 2, "num_classes": 10}
    assert index["router"] == json.loads((reference / "router.json").read_text())
    _, card = check_model_card(reference, "msd", rows=("teacher", "parts", "metrics"))
    assert "classes 0-4" in card and "classes 5-9" in card and "dm 2, adm 2" in card


def test_a_run_killed_during_the_second_student_resumes_without_retraining_the_first(reference, tmp_path):
    cut = tmp_path / "cut"
    cmd = [PY, "train/msd.py", "--output_dir", str(cut), *SMALL]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    mark = cut / "student-1" / "dm" / "checkpoint-1"
    deadline = time.time() + 300
    while not mark.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark.exists() and not (cut / "student-1" / "adm" / "student.json").exists()
    first = cut / "student-0" / "adm" / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = first.stat().st_mtime_ns
    result = train(cut, "--resume_from_checkpoint", "latest")
    assert result["assembled"] and first.stat().st_mtime_ns == stamp  # student 0 was not trained again
    assert all(
        same(x, y) for x, y in zip(students(cut), students(reference))
    )  # bit-identical to the uninterrupted run


def test_one_student_per_run_then_assemble_gives_the_same_pipeline(reference, tmp_path):
    out = tmp_path / "split"
    assert not train(out, "--student_index", "1")["assembled"]
    assert not (out / "model_index.json").exists()
    train(out, "--student_index", "0")
    assert train(out, "--assemble")["assembled"]
    assert all(same(x, y) for x, y in zip(students(out), students(reference)))


def test_stage_two_trains_at_its_own_learning_rate(reference):
    """--adm_learning_rate: G's and the critic's optimizers of stage 2 (adm) run at it, stage 1's at --learning_rate
    (DMD2's SD1.5 recipe: stage 2 at 5e-7 after 1e-5, which the sd15 preset sets)."""
    from onestep.presets.dmd2 import PRESETS as DMD2_PRESETS
    from onestep.presets.msd import DEFAULT_PRESET, PRESETS

    def rates(k, stage):
        last = sorted((reference / f"student-{k}" / stage).glob("checkpoint-*"))[-1]
        return [
            torch.load(last / name, weights_only=True)["param_groups"][0]["lr"]
            for name in ("optimizer.bin", "optimizer_1.bin")  # G, critic
        ]

    stage1 = PRESETS[DEFAULT_PRESET].config.method.learning_rate
    for k in range(2):
        assert rates(k, "dm") == [stage1, stage1] and rates(k, "adm") == [2e-5, 2e-5]
    assert f"{stage1} (stage 2: 2e-05)" in (reference / "README.md").read_text()
    sd15 = PRESETS["sd15"].config.method
    assert (sd15.learning_rate, sd15.adm_learning_rate) == (1e-5, 5e-7)
    assert sd15.adm_learning_rate == DMD2_PRESETS["sd15"].stages[-1].method["learning_rate"]  # DMD2's GAN stage


def test_the_imagenet_preset_uses_the_regression_stabiliser_instead_of_ttur():
    """The DM stage's stabiliser is ttur (DMD2) or regression (DMD1, what the ImageNet DM stage used):
    alternatives, so no TTUR."""
    from onestep.presets.msd import PRESETS

    method = PRESETS["imagenet64-edm"].config.method
    assert (method.stabiliser, method.ttur_ratio) == ("regression", 1)
    assert PRESETS["sd15"].config.method.stabiliser == "ttur"


def test_assemble_refuses_a_student_trained_with_another_router(reference, tmp_path, capsys):
    from onestep.router import router_hash

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    info_path = out / "student-1" / "adm" / "student.json"
    info = json.loads(info_path.read_text())
    assert info["router_hash"] == router_hash(json.loads((out / "router.json").read_text()))
    info_path.write_text(json.dumps({**info, "router_hash": router_hash({"kind": "class_range", "num_students": 3})}))
    before = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: train(out, "--assemble"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "Student 1" in err[0] and "another router" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before  # nothing written


EDM_SCHEDULER = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}


def test_edm_students_assemble_into_a_pipeline_whose_call_is_each_students_own_sample(tmp_path):
    """An EDM-preconditioned teacher (as imagenet64-edm's): the pipeline scales each item's noise to sigma_max and
    applies EDM's preconditioning, so every image equals its student's own one-step sample x0 = D(80 z; 80, c)."""
    from diffusers import UNet2DModel

    from onestep.denoiser import Cond, Denoiser
    from onestep.export import save_teacher
    from onestep.generator import OneStepGenerator
    from onestep.loading import load_teacher
    from onestep.pipelines import MultiStudentPipeline
    from tests.helpers import tiny_unet

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    unet = tiny_unet(num_class_embeds=10, sample_size=8, channels=3)
    save_teacher(unet, EDM_SCHEDULER, str(teacher), {"note": "test"}, {"num_classes": 10})
    out = tmp_path / "edm"
    args = ["--pretrained_model_name_or_path", str(teacher), "--conditioning_timesteps", "999", "--no-gan"]
    args += ["--max_train_steps", "2", "--ttur_ratio", "1", "--train_batch_size", "2", "--learning_rate", "1e-3"]
    args += ["--ema_decay", "0"]
    assert MSD.main(["--output_dir", str(out), *args, "--validation_steps", "1000"])["assembled"]
    pipe = MultiStudentPipeline.from_pretrained(str(out))
    labels, seeds = [3, 7, 0, 9], [1, 2, 3, 4]
    got = pipe(
        class_labels=labels, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt"
    ).images
    schedule = load_teacher(str(teacher)).denoiser.schedule
    gens = [
        OneStepGenerator(Denoiser(UNet2DModel.from_pretrained(out / f"unet_{k}"), schedule, "edm"), [999])
        for k in range(2)
    ]
    for item, (label, seed) in enumerate(zip(labels, seeds)):
        z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        own = [(g.sample(z, Cond(class_labels=torch.tensor([label])))[0] / 2 + 0.5).clamp(0, 1) for g in gens]
        k = label // 5
        assert torch.allclose(got[item], own[k], atol=1e-5, rtol=0)
        assert (got[item] - own[1 - k]).abs().max() > 1e-3  # the other student's sample differs: routing matters
    assert 0.05 < got.std()
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EDMEulerScheduler" and scheduler["num_train_timesteps"] == 1000
    assert "timestep 999 is sigma 80.0" in (out / "README.md").read_text()


def test_a_smaller_student_starts_from_teacher_score_matching(tmp_path):
    """TSM on teacher samples, then DM with the regression stabiliser and a critic of the student's size."""
    from diffusers import UNet2DModel

    teacher = UNet2DModel.load_config(os.path.join(ROOT, "onestep", "assets", "digits-teacher", "unet"))
    small = {**teacher, "block_out_channels": [16, 32, 32], "norm_num_groups": 8}
    (tmp_path / "small.json").write_text(json.dumps(small))
    out = tmp_path / "small"
    extra = ["--student_config", str(tmp_path / "small.json"), "--tsm_steps", "2", "--tsm_learning_rate", "1e-3"]
    extra += ["--tsm_data", "teacher", "--tsm_teacher_steps", "2", "--student_critic", "student"]
    extra += ["--stabiliser", "regression", "--regression_pairs", "8", "--regression_teacher_steps", "2"]
    extra += ["--regression_loss", "mse", "--ttur_ratio", "1"]
    # Learning rate 0 after TSM and no EMA: the exported students are exactly the TSM networks.
    # No GAN stage, so none of SMALL's second-stage flags (which are refused without it).
    no_gan = ["--train_batch_size", "4", "--checkpointing_steps", "1", "--validation_steps", "1000", "--no-gan"]
    MSD.main(
        ["--output_dir", str(out), *no_gan, *extra, "--learning_rate", "0", "--ema_decay", "0"]
        + ["--max_train_steps", "1"]
    )
    for k in range(2):
        tsm = load_file(out / f"student-{k}" / "tsm" / "unet" / "diffusion_pytorch_model.safetensors")
        assert same(tsm, students(out)[k])
        assert "loss_tsm" in (out / f"student-{k}" / "tsm" / "logs" / "losses.csv").read_text()
        assert "loss_reg" in (out / f"student-{k}" / "dm" / "logs" / "losses.csv").read_text()
        critic = load_file(out / f"student-{k}" / "dm" / "checkpoint-1" / "model_1.safetensors")
        assert sum(v.numel() for v in critic.values()) == sum(v.numel() for v in tsm.values())  # F: the student's size
    assert UNet2DModel.load_config(out / "unet_0")["block_out_channels"] == [16, 32, 32]
    assert len(list((out / "ode_pairs").glob("*.safetensors"))) == 1  # one pair set for both students
    bad = {**small, "in_channels": 3}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: train(tmp_path / "bad", "--student_config", str(tmp_path / "bad.json")))
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_students", "11"], "--num_students 11 is larger than the number of classes (10)"),
        (["--router_file", "{router16}"], "partitions 16 classes, but the teacher has 10"),
        (["--router_file", "{missing}"], "does not exist"),
        (["--partition", "kmeans_balanced"], "does not fit a class teacher"),
        (["--conditioning_timesteps", "999,499"], "one-step generators (NFE 1)"),
        (["--assemble"], "holds no MSD run"),
    ],
)
def test_bad_input_gives_one_sentence_and_exit_2_before_writing(tmp_path, capsys, args, message):
    from onestep.router import fit_class_range, save_router

    save_router(fit_class_range(4, 16), str(tmp_path / "router16.json"))
    args = [a.format(router16=tmp_path / "router16.json", missing=tmp_path / "none.json") for a in args]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: train(out, *args))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


PROMPTS = ["a cat", "a black cat on a sofa", "two dogs on grass", "a dog running", "a red car", "a blue truck"]
PROMPTS += ["a bowl of soup", "fresh bread on a table"]


def test_text_students_share_out_the_prompts_and_the_pipeline_routes_them_as_training_did(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from onestep.pipelines import MultiStudentPipeline
    from onestep.pipelines.msd import pooled_text_embedding
    from onestep.router import TextEmbedder, route_prompts
    from onestep.testing.tiny_sd import save_tiny_sd15
    from onestep.text import PromptEncoder

    teacher = save_tiny_sd15(str(tmp_path / "sd15"))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    data = tmp_path / "data"  # captioned real images for the GAN: each student gets those its router sends it
    data.mkdir()
    for i in range(len(PROMPTS)):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": p}) for i, p in enumerate(PROMPTS))
    )
    out = tmp_path / "t2i"
    args = ["--pretrained_model_name_or_path", teacher, "--prompt_file", str(tmp_path / "prompts.txt")]
    args += ["--train_data_dir", str(data), "--cache_latents", "--dm_steps", "0"]
    args += ["--max_train_steps", "1", "--train_batch_size", "2"]
    # One student per run needs the router fitted once before (else every run would fit its own).
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: MSD.main(["--output_dir", str(out), *args, "--student_index", "0"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--fit_router" in err[0] and not out.exists(), err
    MSD.main(["--output_dir", str(out), *args, "--fit_router"])
    assert sorted(p.name for p in out.iterdir()) == ["router.json", "training_config.json"]
    fitted = (out / "router.json").read_text()
    MSD.main(["--output_dir", str(out), *args, "--resume_from_checkpoint", "latest"])
    assert (out / "router.json").read_text() == fitted  # the students trained with the router fitted before
    assert "loss_d" in (out / "student-1" / "adm" / "logs" / "losses.csv").read_text()  # the GAN ran on its part
    router = json.loads((out / "router.json").read_text())
    assert router["kind"] == "kmeans_balanced" and router["fit"]["counts"] == [4, 4] and router["dim"] == 12
    pipe = MultiStudentPipeline.from_pretrained(str(out))
    embed = TextEmbedder(pipe.tokenizer, pipe.text_encoder, teacher)
    assert torch.equal(pipe.route(prompts=PROMPTS), route_prompts(PROMPTS, embed, router))  # training's routing
    # The students are conditioned exactly as in training (the teacher's own prompt encoding).
    trained = PromptEncoder.from_pretrained(teacher, False, 16).encode(PROMPTS[:3]).encoder_hidden_states
    assert torch.equal(pipe._encode_prompts(PROMPTS[:3], torch.device("cpu"))["encoder_hidden_states"], trained)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    both = pipe(prompt=PROMPTS[:2], generator=[g(0), g(1)], output_type="np").images
    alone = pipe(prompt=[PROMPTS[1]], generator=[g(1)], output_type="np").images
    assert both.shape == (2, 16, 16, 3) and abs(both[1] - alone[0]).max() < 1e-5
    # A half-precision pipeline routes with float32 embeddings of the folder's float32 encoder weights: exactly as
    # training (the router was fitted on float32 embeddings), not with bfloat16 ones.
    half = MultiStudentPipeline.from_pretrained(str(out), torch_dtype=torch.bfloat16)
    assert half.text_encoder.dtype == torch.bfloat16 and half.students[0].dtype == torch.bfloat16
    assert torch.equal(half.routing_embeddings(PROMPTS), pipe.routing_embeddings(PROMPTS))
    assert torch.equal(half.route(prompts=PROMPTS), pipe.route(prompts=PROMPTS))
    del half._routing_encoder  # built as a pipeline of half-precision parts: a float32 copy of those weights
    upcast = pooled_text_embedding(half.tokenizer, half.text_encoder.float(), PROMPTS).clone()
    half.text_encoder.to(torch.bfloat16)
    assert torch.equal(half.routing_embeddings(PROMPTS), upcast) and half.text_encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="made in float32"):
        pooled_text_embedding(half.tokenizer, half.text_encoder, PROMPTS)
    assert half(prompt=PROMPTS[:2], generator=[g(0), g(1)], output_type="np").images.shape == (2, 16, 16, 3)


def test_the_pipeline_encodes_sdxl_prompts_as_training_does(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from onestep.pipelines import MultiStudentPipeline
    from onestep.router import fit_text_router
    from onestep.testing.tiny_sd import save_tiny_sdxl
    from onestep.text import PromptEncoder

    path = save_tiny_sdxl(str(tmp_path / "sdxl"))
    sdxl = StableDiffusionXLPipeline.from_pretrained(path)
    router = fit_text_router(torch.nn.functional.normalize(torch.randn(8, 8), dim=1), 2, "kmeans")
    parts = {
        n: getattr(sdxl, n) for n in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    }
    pipe = MultiStudentPipeline(unet_0=sdxl.unet, unet_1=sdxl.unet, **parts, router=router, timesteps=[399])
    got = pipe._encode_prompts(PROMPTS[:2], torch.device("cpu"))
    want = PromptEncoder.from_pretrained(path, True, 16).encode(PROMPTS[:2])
    assert torch.equal(got["encoder_hidden_states"], want.encoder_hidden_states)
    assert torch.equal(got["added_cond_kwargs"]["text_embeds"], want.text_embeds)
    assert torch.equal(got["added_cond_kwargs"]["time_ids"], want.time_ids)
    assert pipe(prompt=PROMPTS[:3], output_type="np").images.shape == (3, 16, 16, 3)
