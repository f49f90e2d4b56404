"""Teacher ODE pairs for the regression warm start (DMD2's SDXL one-step recipe; DMD1's regression loss).

Pair j is a fixed noise z_j, a condition c_j and the teacher's deterministic sampler output
y_j = DDIM(z_j, c_j) (trailing spacing, N steps, CFG w). Everything about pair j is drawn from seeds
derived from (seed, j), so the pairs do not depend on the chunking or the number of processes, and the
condition is redrawn from the same seed during training instead of being stored (prompt embeddings of
10k SDXL pairs would take gigabytes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoiser import Cond, Denoiser
from .sampling import ddim_sample
from .utils import seed_for

CondSampler = Callable[[int, torch.device], Cond | None]


def pair_conditions(cond_sampler: CondSampler, indices, seed: int, device) -> Cond | None:
    """The conditions of pairs `indices`: each drawn from the global RNG seeded for its pair, with the
    caller's RNG state left as it was (the trainer seeds it per step)."""
    conds = []
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for j in indices:
            torch.manual_seed(seed_for(seed, "ode-pair-cond", int(j)))
            conds.append(cond_sampler(1, device))
    if conds[0] is None:
        return None
    out = conds[0]
    for c in conds[1:]:
        out = out.cat(c)
    return out


def pair_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, "ode-pair-z", int(j))))
            for j in indices
        ]
    )


@dataclass
class OdePairs:
    noise: torch.Tensor  # (K, *shape), unit variance (the generator scales it to its first timestep)
    target: torch.Tensor  # (K, *shape), the teacher's sampler output
    seed: int

    def __len__(self):
        return self.noise.shape[0]


def make_ode_pairs(
    teacher: Denoiser,
    cond_sampler: CondSampler,
    uncond: Callable[[Cond], Cond] | None,
    shape: tuple[int, ...],
    num_pairs: int,
    num_steps: int,
    guidance_scale: float,
    seed: int,
    cache_dir: str,
    identity: str,
    device,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    chunk: int = 256,
    progress: Callable[[str], None] = print,
) -> OdePairs:
    """Generate (or read back) the pairs. Chunk k is made by rank k mod world_size and saved under
    `cache_dir` (named by a hash of everything that determines it), so a rerun or a resumed run reuses
    them and a run killed while generating continues where it stopped."""
    from safetensors.torch import save_file

    from .loading import read_weights

    key = repr((identity, tuple(shape), num_pairs, num_steps, guidance_scale, seed))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    paths = []
    starts = list(range(0, num_pairs, chunk))
    for k, start in enumerate(starts):
        path = os.path.join(cache_dir, f"ode-pairs-{digest}-{k:05d}.safetensors")
        paths.append(path)
        if k % world_size != rank or os.path.exists(path):
            continue
        if rank == 0:
            progress(f"Teacher ODE pairs: chunk {k + 1}/{len(starts)} ({num_steps} DDIM steps, CFG {guidance_scale})")
        idx = range(start, min(start + chunk, num_pairs))
        z = pair_noise(idx, shape, seed).to(device)
        cond = pair_conditions(cond_sampler, idx, seed, device)
        guided = guidance_scale > 1 and uncond is not None
        with torch.no_grad():
            y = ddim_sample(
                teacher, z, cond, num_steps, guidance_scale, uncond(cond) if guided and cond is not None else None
            )
        save_file({"noise": z.cpu().contiguous(), "target": y.float().cpu().contiguous()}, f"{path}.{rank}.tmp")
        os.replace(f"{path}.{rank}.tmp", path)
    (barrier or (lambda: None))()
    parts = [read_weights(p, "delete it and run again: the pairs are made anew") for p in paths]
    return OdePairs(torch.cat([p["noise"] for p in parts]), torch.cat([p["target"] for p in parts]), seed)
