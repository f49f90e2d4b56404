"""What can be checked of the FSDP path without GPUs (accelerate runs FSDP only on accelerators): the
shard units the models declare exist where accelerate looks for them, the weightless copy that export
rebuilds from gathered weights, the critic's full-pass features, and the refusals."""

from types import SimpleNamespace

import pytest
import torch

from onestep.critic import Critic
from onestep.denoiser import Cond, Denoiser
from onestep.discriminator import DMD2Head
from onestep.errors import UserError
from onestep.generator import OneStepGenerator
from onestep.lora import add_lora
from onestep.schedules import schedule_from_scheduler_config
from onestep.sharding import check_sharding_supported, fill_from_state_dict, fsdp_unit_names, weightless_copy
from tests.helpers import sd_scheduler_config, tiny_cond_unet


def _denoiser(sdxl=False):
    spec = schedule_from_scheduler_config(sd_scheduler_config())
    return Denoiser(tiny_cond_unet(sdxl), spec.schedule, spec.prediction_type)


def _cond(n=2):
    return Cond(encoder_hidden_states=torch.randn(n, 5, 12))


def _critic_with_head():
    """A critic with DMD2's head, as the method builds it."""
    critic = Critic(_denoiser())
    critic.head = DMD2Head(critic.feature_shape((4, 8, 8), _cond(1)))
    return critic


def test_declared_shard_units_resolve_with_accelerates_lookup():
    from accelerate.utils.dataclasses import get_module_class_from_name

    torch.manual_seed(0)
    gen = OneStepGenerator(_denoiser(), [999])
    critic = _critic_with_head()
    units = {"gen": fsdp_unit_names(gen), "critic": fsdp_unit_names(critic)}
    for model, names in ((gen, units["gen"]), (critic, units["critic"])):
        assert "UNet2DConditionModel" in names
        for name in names:  # accelerate raises on a name the model lacks
            assert get_module_class_from_name(model, name) is not None, name
    assert "DMD2Head" in units["critic"] and "DMD2Head" not in units["gen"]


def test_weightless_copy_takes_gathered_weights_and_keeps_lora_structure():
    torch.manual_seed(0)
    gen = OneStepGenerator(_denoiser(), [999])
    add_lora(gen.denoiser.net, rank=2, alpha=2)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.01 * torch.randn_like(p))  # LoRA B starts at zero: make every weight matter
    skeleton = weightless_copy(gen)
    assert all(p.is_meta for p in skeleton.parameters())
    assert sum(p.numel() for p in skeleton.parameters()) == sum(p.numel() for p in gen.parameters())
    full = fill_from_state_dict(skeleton, {k: v.clone() for k, v in gen.state_dict().items()})
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), _cond()
    with torch.no_grad():
        assert torch.equal(full(x, t, c), gen(x, t, c))
    with pytest.raises(RuntimeError, match="does not match"):
        fill_from_state_dict(weightless_copy(gen), {"nonsense": torch.zeros(1)})


def test_critic_full_pass_features_equal_the_early_exit_ones():
    torch.manual_seed(0)
    critic = _critic_with_head()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), _cond()
    with torch.no_grad():
        early = critic.logits(x, t, c)
        critic.early_exit = False
        full = critic.logits(x, t, c)
    assert torch.equal(early, full)


def _fake_accelerator(kind, version=2):
    return SimpleNamespace(
        distributed_type=SimpleNamespace(name=kind),
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)),
    )


def test_fsdp1_and_ema_under_fsdp_are_refused_with_one_sentence():
    check_sharding_supported(_fake_accelerator("MULTI_GPU", 1), ema_decay=0.99)  # DDP: nothing to check
    check_sharding_supported(_fake_accelerator("FSDP", 2), ema_decay=0.0)
    with pytest.raises(UserError, match="fsdp_version: 2"):
        check_sharding_supported(_fake_accelerator("FSDP", 1), ema_decay=0.0)
    with pytest.raises(UserError, match="--ema_decay is not supported with FSDP"):
        check_sharding_supported(_fake_accelerator("FSDP", 2), ema_decay=0.99)


def test_shipped_fsdp_config_is_fsdp2_without_a_class_list():
    import yaml

    cfg = yaml.safe_load(open("train/fsdp_sdxl.yaml"))
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2
    assert "fsdp_transformer_layer_cls_to_wrap" not in cfg["fsdp_config"]


def test_each_model_gets_its_own_wrap_units_from_accelerates_policy():
    """accelerate keeps the first model's wrap classes; without the reset the critic's GAN head would not be
    a shard unit of its own (and a direct call into it would meet sharded weights)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from onestep.sharding import WrapPolicyPerModel

    torch.manual_seed(0)
    gen = OneStepGenerator(_denoiser(), [999])
    critic = _critic_with_head()

    for model in (gen, critic):  # what onestep.sharding.prepare_models declares before accelerate's prepare
        model._no_split_modules = fsdp_unit_names(model)

    def units(plugin, model):  # what accelerate's fsdp2_prepare_model would wrap
        plugin.set_auto_wrap_policy(model)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        return {type(m).__name__ for m in model.modules() if policy(m)}

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    accelerator = SimpleNamespace(
        distributed_type=SimpleNamespace(name="FSDP"), state=SimpleNamespace(fsdp_plugin=plugin)
    )
    reset = WrapPolicyPerModel(accelerator)
    reset.reset()
    assert units(plugin, gen) == {
        "UNet2DConditionModel",
        "ResnetBlock2D",
        "BasicTransformerBlock",
        "CrossAttnUpBlock2D",
        "UpBlock2D",
    }
    reset.reset()
    assert "DMD2Head" in units(plugin, critic)
    stale = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    units(stale, gen)
    assert "DMD2Head" not in units(stale, critic)  # accelerate alone: the head is left in the root group


def test_fsdp_keeps_fp32_weights_and_reductions_under_bf16():
    from accelerate.utils import FullyShardedDataParallelPlugin

    from onestep.sharding import keep_fp32_weights

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16  # accelerate's default
    keep_fp32_weights(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    policy = plugin.mixed_precision_policy
    assert policy.param_dtype is None and policy.reduce_dtype == torch.float32 and policy.output_dtype is None
