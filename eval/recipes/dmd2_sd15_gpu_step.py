"""DMD2 step time and peak GPU memory at Stable Diffusion 1.5 size (random weights, no download).

The SD1.5 UNet built from its published config (860M parameters), batch 8 of 64x64 latents, bf16
autocast, SDPA attention (xformers if installed and asked for), the `sd15` preset's DMD2 settings
(one step at t = 999, real-score CFG 1.75, TTUR 10, no GAN), random text embeddings in place of CLIP's.
Runs the real Trainer for --steps iterations, with and without gradient checkpointing.

    python -m onestep.eval.recipes.dmd2_sd15_gpu_step --steps 20 --output sd15_step.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from onestep.context import TeacherContext

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)


def one_run(steps: int, batch: int, gradient_checkpointing: bool, xformers: bool) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from onestep.denoiser import Cond, Denoiser
    from onestep.methods.dmd2 import DMD2, DMD2Config
    from onestep.schedules import schedule_from_scheduler_config
    from onestep.trainer import Trainer, TrainerConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    spec = schedule_from_scheduler_config(dict(sched.config, _class_name="DDPMScheduler"))
    teacher = Denoiser(unet, spec.schedule, spec.prediction_type)
    empty = torch.randn(1, 77, 768)

    def cond_sampler(n, device):
        return Cond(encoder_hidden_states=torch.randn(n, 77, 768, device=device))

    def uncond(c):
        return Cond(
            encoder_hidden_states=empty.to(c.encoder_hidden_states.device).expand(len(c.encoder_hidden_states), -1, -1)
        )

    config = DMD2Config(
        learning_rate=1e-5,
        train_batch_size=batch,
        ttur_ratio=10,
        guidance_scale=1.75,
        conditioning_timesteps=[999],
        gan=False,
    )
    method = DMD2(TeacherContext(teacher, (4, 64, 64), cond_sampler=cond_sampler, uncond=uncond), config)
    nets = [method.generator.denoiser.net, method.critic.denoiser.net, teacher.net]
    if gradient_checkpointing:
        for net in nets[:2]:
            net.enable_gradient_checkpointing()
    if xformers:
        for net in nets:
            net.enable_xformers_memory_efficient_attention()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            TrainerConfig(
                output_dir=out,
                max_train_steps=steps,
                mixed_precision="bf16",
                export=False,
                final_checkpoint=False,
                num_validation_images=0,
                log_every=10,
            )
        )
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = trainer.fit(method)
        wall = time.perf_counter() - start
    timing = result["timing"]
    return {
        "gradient_checkpointing": gradient_checkpointing,
        "attention": "xformers" if xformers else "sdpa",
        "iterations": steps,
        "generator_updates": -(-steps // config.ttur_ratio),
        "batch": batch,
        "seconds_per_iteration": timing["seconds_per_step"],
        "fit_wall_seconds": wall,
        "phases": {k: round(v["seconds"], 3) for k, v in timing["phases"].items()},
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "unet_parameters_millions": sum(p.numel() for p in unet.parameters()) / 1e6,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--xformers", action="store_true")
    p.add_argument("--output", default="sd15_step.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU.")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    try:
        import xformers  # noqa: F401

        report["xformers"] = xformers.__version__
    except ImportError:
        report["xformers"] = None
    # A first short run pays for CUDA context, cuBLAS/cuDNN heuristics and the allocator's growth, which
    # would otherwise be charged to whichever configuration runs first.
    report["warmup"] = one_run(4, args.batch, False, False)
    torch.cuda.empty_cache()
    for gc in (False, True):
        report["runs"].append(one_run(args.steps, args.batch, gc, args.xformers and report["xformers"] is not None))
        torch.cuda.empty_cache()
        print(json.dumps(report["runs"][-1]), flush=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
