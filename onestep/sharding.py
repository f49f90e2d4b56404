"""What the trainer does differently when accelerate shards the models with FSDP (SDXL-size teachers).

Only FSDP2 (`fsdp_version: 2`, `torch.distributed.fsdp.fully_shard`) is supported: it shards the
modules in place, so the methods' direct calls into the unwrapped critic still gather their weights,
which FSDP1's flat parameters would not. Every forward is a collective under FSDP, so sample grids are
computed on all ranks, and the student is exported from a full state dict gathered onto rank 0 and
loaded into a weightless copy made before sharding.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .errors import UserError


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def check_sharding_supported(accelerator, ema_decay) -> None:
    if not is_sharded(accelerator):
        return
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise UserError(
            f"FSDP version {version} is not supported; set fsdp_version: 2 in the accelerate config "
            f"(train/fsdp_sdxl.yaml is one)."
        )
    if ema_decay:
        raise UserError(
            "--ema_decay is not supported with FSDP (the EMA would hold only this rank's shard); "
            "the SD presets train without EMA, as published."
        )


def fsdp_unit_names(model: nn.Module) -> list[str]:
    """Class names accelerate's FSDP2 wrap policy turns into their own shard units (it reads the prepared
    model's `_no_split_modules` when the config names none): the network of every Denoiser inside the model,
    so that direct calls into it (the fake score, backward simulation) gather its weights; that network's
    blocks, so that only one block's weights are whole at a time; and every other direct child of the model
    with parameters outside those networks (a GAN head), so that a direct call into it gathers them."""
    from .denoiser import Denoiser

    names: list[str] = []
    networks = [m.net for m in model.modules() if isinstance(m, Denoiser)]
    for net in networks:
        present = {type(m).__name__ for m in net.modules()}
        blocks = [
            n for n in getattr(net, "_no_split_modules", None) or [] if n in present
        ]  # accelerate refuses absent names
        names += [type(net).__name__, *blocks]
    in_networks = {id(p) for net in networks for p in net.parameters()}
    for child in model.children():
        if any(id(p) not in in_networks for p in child.parameters()):
            names.append(type(child).__name__)
    return list(dict.fromkeys(names))


def keep_fp32_weights(accelerator) -> None:
    """accelerate's FSDP2 default for --mixed_precision bf16 casts the gathered weights, the gradient
    reduction and the outputs to bf16. DMD2 runs its fake-score query in fp32 on purpose and DDP keeps
    fp32 weights under autocast; keep the same numbers under FSDP: fp32 weights and reductions, with
    accelerate's autocast (which it applies to every prepared forward either way) doing the bf16 compute."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)


class WrapPolicyPerModel:
    """accelerate resolves the FSDP wrap classes from the first model it prepares and reuses them for
    every later one; the critic's GAN head would then stay in the root's shard group, whose weights are
    gathered only by a call through the critic's own forward. Before each prepare(), this restores the
    policy to what the config said, so each model's `_no_split_modules` is read afresh (a class list
    given in the config is kept as it is)."""

    def __init__(self, accelerator):
        self.plugin = accelerator.state.fsdp_plugin if is_sharded(accelerator) else None
        if self.plugin is not None:
            self.policy, self.names = self.plugin.auto_wrap_policy, self.plugin.transformer_cls_names_to_wrap

    def reset(self) -> None:
        if self.plugin is None:
            return
        policy = self.policy.func if isinstance(self.policy, functools.partial) else self.policy
        self.plugin.auto_wrap_policy, self.plugin.transformer_cls_names_to_wrap = policy, self.names


def mark_roots(models) -> None:
    """FSDP2 takes as root whichever unit runs forward first; DMD2 first calls the critic's UNet directly
    (the fake score), which would make it a root and forbid the later calls through the critic itself.
    Initialise each prepared model as the root of its units now (torch has no public call for this)."""
    for model in models:
        state = model._get_fsdp_state() if hasattr(model, "_get_fsdp_state") else None
        if state is not None:
            state._lazy_init()


def weightless_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters live on the meta device: same structure and names (LoRA
    layers included), no memory. Buffers (small) are real copies. Filled by `fill_from_state_dict`."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def fill_from_state_dict(skeleton: nn.Module, state: dict) -> nn.Module:
    """Give the skeleton real CPU parameters (tied ones stay tied) and load the gathered state."""
    real = {}
    for mod in skeleton.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in real:
                    real[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                mod._parameters[name] = real[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = b.cpu()
    missing, unexpected = skeleton.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"Gathered state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    return skeleton


def gather_for_export(
    accelerator, models: dict[str, nn.Module], skeletons: dict[str, nn.Module]
) -> dict[str, nn.Module]:
    """Collective: every rank must call it. Returns full CPU copies on the main process, {} elsewhere."""
    full = {}
    for name, skeleton in skeletons.items():
        state = accelerator.get_state_dict(models[name])  # full weights on rank 0 only
        if accelerator.is_main_process:
            full[name] = fill_from_state_dict(skeleton, state)
    return full


def prepare_models(accelerator, models: dict, optimizers: dict, exported: tuple[str, ...]) -> dict[str, nn.Module]:
    """accelerator.prepare() each model with its optimiser, in place in both dicts. One pair per call: FSDP2
    accepts no more, and accelerate registers them (hence names checkpoint files) in the same order as one
    call for all. Under FSDP it also returns weightless copies of the `exported` models to gather into."""
    sharded = is_sharded(accelerator)
    skeletons = {n: weightless_copy(models[n]) for n in exported} if sharded else {}
    wrap_policy = WrapPolicyPerModel(accelerator)
    if sharded:
        keep_fp32_weights(accelerator)
    for n in models:
        wrap_policy.reset()
        if sharded:
            models[n]._no_split_modules = fsdp_unit_names(models[n])
        models[n], optimizers[n] = accelerator.prepare(models[n], optimizers[n])
    if sharded:
        mark_roots(models.values())
    return skeletons


def as_local_scalar(value) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2's clip returns a replicated DTensor)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else torch.as_tensor(value)
