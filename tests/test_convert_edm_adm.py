"""EDM ADM -> diffusers converter: outputs equal to a reference forward, safe reading of EDM pickles, refusals."""

import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from onestep.convert.edm_adm import convert, main
from onestep.denoiser import Cond
from onestep.errors import UserError
from onestep.loading import load_teacher, read_class_info
from onestep.testing.adm_reference import EDMPrecond, write_edm_pickle
from tests.helpers import PY, run

NUM_CLASSES = 5
# A tiny network of the ImageNet layout: a first level without attention, deeper levels with it, 2 blocks a level.
TINY = dict(label_dim=NUM_CLASSES, model_channels=16, channel_mult=(1, 2, 2), attn_resolutions=(8, 4))
STATE_DICT_FLAGS = ["--channels_per_head", "8", "--norm_groups", "4"]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return EDMPrecond(sigma_data=0.5, num_groups=4, channels_per_head=8, **TINY).eval()


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("adm")
    write_edm_pickle(reference, str(root / "net.pkl"))
    main([str(root / "net.pkl"), str(root / "teacher"), "--trust-pickle"])
    return root


def test_converted_teacher_denoises_as_the_reference(reference, converted):
    teacher = load_teacher(str(converted / "teacher"))
    den, sched = teacher.denoiser, teacher.denoiser.schedule
    assert den.prediction_type == "edm" and sched.sigma_data == reference.sigma_data
    assert teacher.unet_config["dropout"] == 0.0  # DMD2 copies the teacher into trained networks without dropout
    assert read_class_info(str(converted / "teacher"), teacher.unet_config)["num_classes"] == NUM_CLASSES
    g = torch.Generator().manual_seed(1)
    index = torch.tensor([0, 250, 500, 750, 999]).repeat_interleave(2)  # sigma 0.002 .. 80, per sample
    labels = torch.randint(0, NUM_CLASSES, (len(index),), generator=g)
    sigma = sched.sigmas[index]
    x = torch.randn(len(index), 3, 16, 16, generator=g) * (sigma.float().reshape(-1, 1, 1, 1) ** 2 + 0.25).sqrt()
    with torch.no_grad():
        ours, theirs = den(x, index, Cond(class_labels=labels)), reference(x, sigma, labels)
        # the network alone, where D's skip term cannot hide an error (small sigma: D is almost x)
        c_in, c_noise = 1 / (sigma**2 + 0.25).sqrt(), (sigma.log() / 4).float()
        net_in = (x * c_in.float().reshape(-1, 1, 1, 1)).float()
        f_ours = den.net(net_in, c_noise, class_labels=labels).sample
        f_theirs = reference.model(net_in, c_noise, F.one_hot(labels, NUM_CLASSES).float())
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().amax(dim=(1, 2, 3))
    f_error = (f_ours - f_theirs).abs().amax(dim=(1, 2, 3)) / f_theirs.abs().amax(dim=(1, 2, 3))
    assert f_error.max() <= 1e-5, f_error
    # labels matter: the class embedding was mapped, not dropped
    with torch.no_grad():
        a = den.net(net_in, c_noise, class_labels=torch.zeros_like(labels)).sample
        b = den.net(net_in, c_noise, class_labels=torch.full_like(labels, NUM_CLASSES - 1)).sample
    assert (a - b).abs().max() > 1e-3


def test_state_dicts_convert_to_the_same_weights(reference, converted):
    from diffusers import UNet2DModel

    want = UNet2DModel.from_pretrained(str(converted / "teacher"), subfolder="unet").state_dict()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}  # EDMPrecond keys: model.enc...
    save_file(state, str(converted / "net.safetensors"))
    torch.save({k[len("model.") :]: v for k, v in state.items()}, str(converted / "net.pt"))
    for name in ("net.safetensors", "net.pt"):
        main([str(converted / name), str(converted / f"from-{name}"), *STATE_DICT_FLAGS])
        got = UNet2DModel.from_pretrained(str(converted / f"from-{name}"), subfolder="unet").state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_pickle_is_refused_without_trust_pickle(converted, tmp_path):
    out = tmp_path / "teacher"
    r = run([PY, "-m", "onestep.convert.edm_adm", str(converted / "net.pkl"), str(out)])
    assert r.returncode == 2, r.stderr[-2000:]
    message = r.stderr.strip()
    assert message.startswith("error:") and "--trust-pickle" in message and len(message.splitlines()) == 1
    assert not out.exists()


class _Payload:
    """What a hostile pickle does: call a function of its choosing while being read."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_trusted_pickle_still_runs_no_foreign_code(tmp_path):
    target = tmp_path / "created-by-the-pickle"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"ema": _Payload(str(target))}, f)
    with pytest.raises(UserError, match="mkdir"):
        convert(str(tmp_path / "evil.pkl"), str(tmp_path / "out"), trust_pickle=True)
    assert not target.exists() and not (tmp_path / "out").exists()


def test_layouts_unet2dmodel_cannot_express_are_refused(tmp_path):
    torch.manual_seed(0)
    # EDM's default group rule min(32, channels // 4) gives 4 groups at 16 channels and 8 at 32: UNet2DModel has one count
    net = EDMPrecond(channels_per_head=8, **TINY).eval()
    write_edm_pickle(net, str(tmp_path / "mixed.pkl"))
    with pytest.raises(UserError, match="group counts"):
        convert(str(tmp_path / "mixed.pkl"), str(tmp_path / "out"), trust_pickle=True)
    assert not (tmp_path / "out").exists()
