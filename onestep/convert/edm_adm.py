"""EDM's ADM network (NVlabs/edm: `DhariwalUNet` inside `EDMPrecond`, the published
edm-imagenet-64x64-cond-adm.pkl) -> a diffusers teacher folder: a UNet2DModel, with EDM preconditioning
declared by an EDMEulerScheduler config (sigma_data from the checkpoint), which `load_teacher` reads.

    python -m onestep.convert.edm_adm edm-imagenet-64x64-cond-adm.pkl teachers/edm-imagenet64 --trust-pickle

Layer map, EDM -> diffusers (level l of L, R = img_resolution >> l):
    map_noise: [cos, sin](ln(sigma)/4 * 10000^(-i/C))   time_proj: Timesteps(flip_sin_to_cos, freq_shift 0)
    map_layer0 / map_layer1                             time_embedding.linear_1 / linear_2
    map_label: bias-free linear on one-hot labels       class_embedding: nn.Embedding (transposed weight)
    enc.RxR_conv                                        conv_in
    enc.RxR_block{i}                                    down_blocks.l.resnets.i (+ attentions.i)
    enc.(R/2)x(R/2)_down                                down_blocks.l.downsamplers.0 (resnet; 2x2 average)
    dec.RxR_in0, dec.RxR_in1 (deepest level)            mid_block.resnets.0 + attentions.0, resnets.1
    dec.RxR_block{i}                                    up_blocks.(L-1-l).resnets.i (+ attentions.i)
    dec.(2R)x(2R)_up                                    up_blocks.(L-1-l).upsamplers.0 (resnet; nearest)
    out_norm / out_conv                                 conv_norm_out / conv_out
Within a block: norm0 / conv0 / affine / norm1 / conv1 / skip -> norm1 / conv1 / time_emb_proj / norm2 / conv2 /
conv_shortcut (adaptive GroupNorm x * (1 + scale) + shift, scale first: resnet_time_scale_shift="scale_shift");
attention: norm2 -> group_norm, qkv (output channels ordered head, channel, q/k/v) -> to_q / to_k / to_v,
proj -> to_out.0. The forward is then the same function (tests/test_convert_edm_adm.py checks it against
onestep/testing/adm_reference.py). Not carried over: `map_augment` (EDM's augmentation labels, which sampling
never passes) and EDM's fp16 execution (use_fp16: the folder holds float32 weights; run it in bf16/fp32).
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import asdict

import torch

from ..cli import non_negative_float, positive_float, positive_int, run_main
from ..errors import UserError
from .adm_layout import ADMArchitecture, build_unet, infer_architecture, single_setting
from .edm_pickle import PickledObject, flatten_modules, read_pickle

# EDM's sampler range (Karras et al. 2022, Table 1), which the DMD2 ImageNet run also uses.
EDM_SIGMAS = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


# -- reading ------------------------------------------------------------------------------------------------
def read_checkpoint(path: str, trust_pickle: bool) -> tuple[dict, dict]:
    """(the DhariwalUNet's state dict, what the file itself records: sigma_data, groups, heads)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass EDM's .pkl snapshot or a .safetensors / .pt state dict.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return _unet_keys(load_file(path)), {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on the pickle protocol of files it then refuses
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # anything but a weights-only file, whatever torch's exception type for it
        if not trust_pickle:
            raise UserError(
                f"{path} is not a weights-only state dict, and unpickling it would run code the file chooses; "
                "pass --trust-pickle if you trust its source (it is then read by a restricted unpickler that "
                "executes none of the code EDM's pickles embed), or give a .safetensors / .pt state dict."
            ) from None
        return _from_pickle(read_pickle(path), path)
    return _unet_keys(_tensor_dict(obj, path)), {}


def _tensor_dict(obj, path: str) -> dict:
    if isinstance(obj, dict):
        for key in ("ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError(f"{path} holds no state dict of tensors (expected EDM's DhariwalUNet parameters).")


def _unet_keys(state: dict) -> dict:
    """EDMPrecond's state dict prefixes the UNet's keys with 'model.'."""
    if state and all(k.startswith("model.") for k in state):
        return {k[len("model.") :]: v for k, v in state.items()}
    return dict(state)


def _from_pickle(root, path: str) -> tuple[dict, dict]:
    net = root.get("ema") if type(root) is dict else root
    if not isinstance(net, PickledObject):
        raise UserError(f"{path} holds no EDM network (expected {{'ema': EDMPrecond(...)}}).")
    facts = {}
    if net.class_name in ("VPPrecond", "VEPrecond", "iDDPMPrecond"):
        raise UserError(f"{path} holds a {net.class_name}; only EDMPrecond converts (the 'edm' prediction type).")
    if net.class_name == "EDMPrecond":
        facts["sigma_data"] = float(net.state.get("sigma_data", 0.5))
        net = (net.state.get("_modules") or {}).get("model")
    if not isinstance(net, PickledObject) or net.class_name != "DhariwalUNet":
        name = getattr(net, "class_name", type(net).__name__)
        raise UserError(f"{path} holds a {name}; only EDM's ADM network (DhariwalUNet) converts to UNet2DModel.")
    tensors, modules = flatten_modules(net)
    facts.update(_recorded_settings(modules, path))
    return tensors, facts


def _recorded_settings(modules: dict, path: str) -> dict:
    """Groups and head width as the pickle records them; refuse settings UNet2DModel cannot express."""
    groups, head_dims = set(), set()
    for name, (cls, attrs) in modules.items():
        if cls == "GroupNorm":
            groups.add(attrs.get("num_groups"))
        elif cls == "UNetBlock":
            if attrs.get("num_heads"):
                head_dims.add(attrs["out_channels"] // attrs["num_heads"])
            if not attrs.get("adaptive_scale", True) or attrs.get("skip_scale", 1) != 1:
                raise UserError(f"{path}: block {name} is not ADM's (adaptive_scale off or skip_scale != 1).")
        elif cls == "PositionalEmbedding" and (
            attrs.get("endpoint", False) or attrs.get("max_positions", 10000) != 10000
        ):
            raise UserError(f"{path}: the noise embedding is not ADM's (endpoint or max_positions changed).")
        elif cls == "Conv2d" and attrs.get("fused_resample") and attrs.get("down"):
            raise UserError(
                f"{path}: {name} convolves before downsampling (fused_resample), which diffusers does not."
            )
    facts = {}
    if groups:
        facts["num_groups"] = single_setting(groups, "GroupNorm group counts", path)
    if head_dims:
        facts["channels_per_head"] = single_setting(head_dims, "attention head widths", path)
    return facts


def convert(
    src: str,
    output_dir: str,
    trust_pickle: bool = False,
    channels_per_head: int = 64,
    norm_groups: int = 32,
    dropout: float = 0.0,
    sigma_data: float | None = None,
) -> ADMArchitecture:
    """Write a teacher folder (unet/, scheduler/, onestep.json, README.md) converted from an EDM ADM checkpoint.
    A pickle's own record of groups, heads and sigma_data wins over the arguments. `dropout` is what the UNet
    applies in training mode (students and critics start as copies of the teacher): DMD2 rebuilds EDM's network
    with dropout 0, although EDM trained it with 0.1."""
    from ..export import save_teacher

    sd, facts = read_checkpoint(src, trust_pickle)
    arch = infer_architecture(
        sd,
        facts.get("channels_per_head", channels_per_head),
        facts.get("num_groups", norm_groups),
        dropout,
        src,
    )
    unet = build_unet(sd, arch, src)
    sd_value = facts.get("sigma_data", sigma_data if sigma_data is not None else 0.5)
    scheduler = {"_class_name": "EDMEulerScheduler", "sigma_data": sd_value, "num_train_timesteps": 1000, **EDM_SIGMAS}
    card = {
        "converted from": os.path.basename(src),
        "architecture": "EDM ADM (DhariwalUNet) in EDMPrecond -> UNet2DModel",
        "preconditioning": f"EDM (Karras et al. 2022, Table 1), sigma_data {sd_value}",
        "classes": arch.label_dim or "unconditional",
        "converter": "python -m onestep.convert.edm_adm",
        "hyperparameters": ", ".join(f"{k}={v}" for k, v in asdict(arch).items()),
    }
    class_info = {"num_classes": arch.label_dim, "null_class": None} if arch.label_dim else None
    save_teacher(unet, scheduler, output_dir, card, class_info)
    return arch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m onestep.convert.edm_adm",
        description="Convert EDM's ADM checkpoint (e.g. edm-imagenet-64x64-cond-adm.pkl) to a diffusers teacher folder.",
    )
    p.add_argument("src", help="EDM network snapshot (.pkl), or the UNet's state dict (.safetensors / .pt).")
    p.add_argument(
        "output_dir", help="Teacher folder to write (unet/ + scheduler/), for --pretrained_model_name_or_path."
    )
    p.add_argument(
        "--trust-pickle",
        "--trust_pickle",
        dest="trust_pickle",
        action="store_true",
        help="Read a pickle (EDM's .pkl). Without it only safetensors and torch.load(weights_only=True) are tried.",
    )
    p.add_argument(
        "--dropout",
        type=non_negative_float,
        default=0.0,
        help="Dropout of the residual blocks in training mode, i.e. in students and critics copied from the teacher "
        "(default: 0, as DMD2; EDM trained ImageNet-64 with 0.1).",
    )
    g = p.add_argument_group("state-dict inputs (an EDM pickle records these itself)")
    g.add_argument(
        "--channels_per_head", type=positive_int, default=64, help="Attention head width (default: %(default)s)."
    )
    g.add_argument("--norm_groups", type=positive_int, default=32, help="GroupNorm groups (default: %(default)s).")
    g.add_argument("--sigma_data", type=positive_float, default=None, help="EDM's sigma_data (default: 0.5).")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.dropout >= 1:
        raise UserError(f"--dropout must lie in [0, 1), got {args.dropout}.")
    arch = convert(
        args.src,
        args.output_dir,
        args.trust_pickle,
        args.channels_per_head,
        args.norm_groups,
        args.dropout,
        args.sigma_data,
    )
    classes = f"{arch.label_dim} classes" if arch.label_dim else "unconditional"
    print(f"Wrote {args.output_dir}: ADM {arch.img_resolution}x{arch.img_resolution}, {classes}, EDM preconditioning.")


if __name__ == "__main__":
    run_main(main)
