"""Multi-student one-step sampling (MSD, Song et al. 2025, arXiv 2410.23274).

K one-step student UNets, each responsible for one part of the condition space, and the router that sends
every item to exactly one of them: class ids by contiguous ranges, prompts by their pooled text embedding.
One call draws every item's noise first, before routing (so with one generator per item, an item's image
depends on its own generator and condition only, not on the rest of the batch), routes each item, runs each
student once on its group, and puts the results back in order: NFE 1, the latency of one student.

An EDM scheduler config (EDMEulerScheduler, ...) marks EDM-preconditioned students (Karras et al. 2022, Table 1),
as in one_step.py: timestep t indexes the ascending Karras grid of num_train_timesteps sigmas, the input is
sigma_t z, and x0 = c_skip x + c_out F(c_in x, ln(sigma) / 4).

Self-contained (torch, diffusers, numpy and PIL only; the code shared with the other pipeline files is copied from
onestep/pipelines/common.py, each copy marked `# Copied from`): the export copies this file into the folder, so
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works where onestep is not installed. The
routing functions here are also the ones training uses (onestep.router imports them), so a condition is routed
identically when the students are trained and when they are sampled."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

# diffusers reads a pipeline's components from its __init__ signature, so the students have fixed slots.
MAX_STUDENTS = 8
STUDENT_SLOTS = tuple(f"unet_{k}" for k in range(MAX_STUDENTS))
TEXT_KINDS = ("kmeans_balanced", "kmeans", "pca_quadrant")


# -- routing (shared with training) -------------------------------------------------------------------


def route_classes(labels: torch.Tensor, router: dict) -> torch.Tensor:
    """class_range: route(c) = floor(c K / C), contiguous ranges whose sizes differ by at most 1."""
    return (labels.long().cpu() * int(router["num_students"])) // int(router["num_classes"])


def route_embeddings(embeddings: torch.Tensor, router: dict) -> torch.Tensor:
    """Text routers on pooled embeddings (N, D), in float64 on the CPU so every device routes alike.
    k-means: argmin_k |e - mu_k|^2 - b_k (ties to the lowest k); pca_quadrant: 2 [pc1 > m1] + [pc2 > m2]."""
    e = embeddings.detach().double().cpu()
    if router["kind"] in ("kmeans_balanced", "kmeans"):
        mu = torch.tensor(router["centroids"], dtype=torch.float64)
        b = torch.tensor(router["offsets"], dtype=torch.float64)
        return (torch.cdist(e, mu) ** 2 - b).argmin(dim=1)
    if router["kind"] == "pca_quadrant":
        scores = pca_scores(e, router)
        m = torch.tensor(router["medians"], dtype=torch.float64)
        return 2 * (scores[:, 0] > m[0]).long() + (scores[:, 1] > m[1]).long()
    raise ValueError(f"Unknown router kind {router['kind']!r}.")


def pca_scores(e: torch.Tensor, router: dict) -> torch.Tensor:
    """pca_quadrant: the first two principal-component scores (N, 2), float64."""
    mean = torch.tensor(router["mean"], dtype=torch.float64)
    return (e.double().cpu() - mean) @ torch.tensor(router["components"], dtype=torch.float64).T


@torch.no_grad()
def pooled_text_embedding(
    tokenizer, text_encoder, prompts: list[str], pooling: str = "masked_mean", normalisation: str = "l2"
) -> torch.Tensor:
    """e(c), the routing embedding: the text encoder's last hidden state averaged over the non-padding tokens (BOS and
    EOS included; pooling "mean": over all positions) in float32, then L2-normalised (normalisation "none": not).
    (N, D) on the CPU. The router file records both choices. The encoder must be float32 and runs with autocast
    off, whatever precision the rest of a pipeline or a training run uses: the router was fitted on float32
    embeddings (MultiStudentPipeline.route passes a float32 encoder)."""
    if pooling not in ("masked_mean", "mean"):
        raise ValueError(f"Unknown pooling {pooling!r}; expected masked_mean or mean.")
    if text_encoder.dtype != torch.float32:
        raise ValueError(f"Routing embeddings are made in float32; the text encoder given is {text_encoder.dtype}.")
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = text_encoder.device
    with torch.autocast(device_type=device.type, enabled=False):
        hidden = text_encoder(tokens.input_ids.to(device)).last_hidden_state.float().cpu()
    mask = (
        tokens.attention_mask.float().unsqueeze(-1) if pooling == "masked_mean" else torch.ones_like(hidden[..., :1])
    )
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1) if normalisation == "l2" else pooled


# -- the pipeline ---------------------------------------------------------------------------------------


class MultiStudentPipeline(DiffusionPipeline):
    """K one-step students (unet_0 .. unet_{K-1}) and a router; class-conditional pixel students or text-to-image
    latent students (with the teacher's VAE, tokenizer(s) and text encoder(s)).

    `MultiStudentPipeline.from_pretrained(folder)` loads an export without running its msd.py, and still loads it
    when that file was deleted; `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` then fails inside
    diffusers' loader, an error this class cannot intercept (from_pretrained says more)."""

    _optional_components = [*STUDENT_SLOTS[1:], "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]

    def __init__(
        self,
        scheduler,
        unet_0,
        unet_1=None,
        unet_2=None,
        unet_3=None,
        unet_4=None,
        unet_5=None,
        unet_6=None,
        unet_7=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        router: dict | None = None,
        timesteps: list[int] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        students = [unet_0, unet_1, unet_2, unet_3, unet_4, unet_5, unet_6, unet_7]
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            **dict(zip(STUDENT_SLOTS, students)),
        )
        if router is None:
            raise ValueError("A MultiStudentPipeline needs its router (the partition the students were trained on).")
        k = int(router["num_students"])
        if not 1 <= k <= MAX_STUDENTS or any(s is None for s in students[:k]) or any(students[k:]):
            raise ValueError(f"The router names {k} students; pass exactly unet_0 .. unet_{k - 1}.")
        self.register_to_config(
            router=dict(router),
            timesteps=list(timesteps) if timesteps is not None else [scheduler.config.num_train_timesteps - 1],
            num_classes=num_classes,
        )

    @property
    def students(self) -> list:
        return [getattr(self, name) for name in STUDENT_SLOTS[: int(self.config.router["num_students"])]]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder this class saved (onestep's MSD export) with this installed class, without running the
        msd.py the folder ships: no trust_remote_code is needed. The rules are those of every onestep pipeline class
        (OneStepPipeline.from_pretrained says them): `torch_dtype` and the other weight options apply to the students,
        the VAE and the text encoders; a folder saved by another pipeline class is refused with the class to load it
        with; a folder whose msd.py was deleted still loads here, while `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` then fails inside diffusers' loader, where this class cannot catch the error.

        With a half-precision text encoder, routing still reads float32 embeddings: a float32 copy of the folder's
        text encoder is loaded beside the components (see routing_embeddings)."""
        pipe = cls._load_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), "text_encoder")
        encoder = pipe.text_encoder
        if encoder is not None and encoder.dtype != torch.float32 and "text_encoder" not in kwargs:
            if os.path.isdir(folder):  # routing reads the float32 weights (route)
                fp32 = type(encoder).from_pretrained(folder, torch_dtype=torch.float32)
                pipe._routing_encoder = (id(encoder), fp32.eval())
        return pipe

    # Copied from onestep.pipelines.common.SharedPipelineMethods._load_pretrained
    @classmethod
    def _load_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """from_pretrained's work (see there), for classes that add a step after loading."""
        folder = os.fspath(pretrained_model_name_or_path)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        with open(index_path) as f:
            index = json.load(f)
        _refuse_other_pipeline(index, cls, folder)
        torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        dtype = dtype if torch_dtype is None else torch_dtype
        options = ("variant", "use_safetensors", "low_cpu_mem_usage")
        weights = {"torch_dtype": dtype, **{k: kwargs.pop(k, None) for k in options}}
        weights = {k: v for k, v in weights.items() if v is not None}
        hub = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "trust_remote_code")
        for option in hub:  # nothing to fetch: the folder is local
            kwargs.pop(option, None)
        params = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got the unexpected keyword argument(s) {', '.join(unknown)}; it "
                f"takes the pipeline's components and config entries ({', '.join(params)}) and torch_dtype, "
                f"{', '.join(options)}."
            )
        init = {}
        for name in params:
            value = kwargs[name] if name in kwargs else index.get(name, inspect.Parameter.empty)
            if name not in kwargs and _is_component(value):
                value = _load_component(folder, name, value, weights)
            if value is not inspect.Parameter.empty:
                init[name] = value
        pipe = cls(**init)
        pipe.register_to_config(_name_or_path=folder)  # as diffusers' from_pretrained records it
        return pipe

    # -- routing ----------------------------------------------------------------------------------------
    def route(self, class_labels: torch.Tensor | None = None, prompts: list[str] | None = None) -> torch.Tensor:
        """The student index of every item (what training used to choose each student's conditions)."""
        router = self.config.router
        if router["kind"] == "class_range":
            return route_classes(class_labels, router)
        return route_embeddings(self.routing_embeddings(prompts), router)

    def routing_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """The pooled prompt embeddings the router reads, always made in float32 (the router was fitted on float32
        embeddings): with a half-precision pipeline, by a float32 copy of the first text encoder (from_pretrained:
        the folder's float32 weights; otherwise the pipeline's weights upcast), kept outside the components."""
        router, encoder = self.config.router, self.text_encoder
        if encoder.dtype != torch.float32:
            cached = getattr(self, "_routing_encoder", None)
            if cached is None or cached[0] != id(encoder):
                cached = (id(encoder), copy.deepcopy(encoder).float())
                self._routing_encoder = cached
            encoder = cached[1].to(self.text_encoder.device)
        return pooled_text_embedding(self.tokenizer, encoder, prompts, router["pooling"], router["normalisation"])

    # -- one student's step -----------------------------------------------------------------------------
    # Copied from onestep.pipelines.common.SharedPipelineMethods._edm
    @property
    def _edm(self) -> bool:
        """An EDM scheduler config (EDMEulerScheduler, ...) marks EDM-preconditioned students."""
        return type(self.scheduler).__name__.startswith("EDM")

    # Copied from onestep.pipelines.common.SharedPipelineMethods._edm_sigma
    def _edm_sigma(self, t: int) -> torch.Tensor:
        """sigma at index t of the ascending Karras grid the students were trained on (float64; T-1 is sigma_max)."""
        c = self.scheduler.config
        i = torch.arange(c.num_train_timesteps, dtype=torch.float64) / (c.num_train_timesteps - 1)
        top, bottom = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
        return ((top + i * (bottom - top)) ** c.rho).flip(0)[t]

    def _edm_x0(self, student, x: torch.Tensor, t: int, **kw) -> torch.Tensor:
        """D(x; sigma_t) = c_skip x + c_out F(c_in x, c_noise), EDM's preconditioning in float64."""
        sigma, sd = self._edm_sigma(t), self.scheduler.config.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = (sigma.log() / 4).float().repeat(x.shape[0]).to(x.device)
        out = student((c_in * x.double()).float().to(student.dtype), c_noise, **kw).sample
        return (c_skip * x.double() + c_out * out[:, : x.shape[1]].float().double()).float()

    def _to_x0(self, out: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        # float64: at t = 999 of SD's schedule alpha is ~0.068 and the conversion divides by it.
        abar = self.scheduler.alphas_cumprod.double()[t]
        a, s = abar.sqrt(), (1 - abar).sqrt()
        kind = self.scheduler.config.prediction_type
        out, x = out.double(), x.double()
        if kind == "epsilon":
            return ((x - s * out) / a).float()
        if kind == "v_prediction":
            return (a * x - s * out).float()
        if kind == "sample":
            return out.float()
        raise ValueError(f"Unsupported prediction_type {kind!r} in the scheduler config.")

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str], device) -> dict:
        """The UNet's text conditioning, as SD1.5 (last hidden state) or SDXL (both encoders' penultimate hidden
        states, the second one's pooled projection, and the time ids) teachers were distilled with."""
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        hidden, pooled = [], None
        for tok, enc in pairs:
            ids = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            if self.text_encoder_2 is None:
                hidden.append(out.last_hidden_state)
            else:
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
        kwargs = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if pooled is not None:
            r = self.vae_scale_factor * self.students[0].config.sample_size
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=pooled.dtype, device=device).expand(len(prompts), -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate one image per class label (class-conditional students) or per prompt (text students).
        Without class labels, `batch_size` labels are drawn at random. `generator` may be a list with one
        generator per item: then each item's image depends on its own generator and condition only. `output_type`:
        "pil", "np", "pt", or "latent" (the students' x0 as it is, before any decoding)."""
        router = self.config.router
        _check_output_type(output_type, ("pil", "np", "pt", "latent"))
        _check_num_inference_steps(num_inference_steps, 1, "MSD students are one-step generators")
        text = router["kind"] in TEXT_KINDS
        if text:
            if prompt is None or class_labels is not None:
                raise ValueError("These students are text-to-image: pass prompt= (a string or a list of strings).")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise TypeError(
                    f"These students are text-to-image: prompt must be a string or a list of strings; got "
                    f"{type(prompt).__name__}."
                )
            if not prompts:
                raise ValueError("prompt is an empty list; give at least one prompt.")
            prompts, labels = list(prompts), None
            n = _check_batch_size(batch_size, len(prompts), "prompts")
        else:
            if prompt is not None:
                raise ValueError("These students are class-conditional: pass class_labels=, not a prompt.")
            num_classes = self.config.num_classes if self.config.num_classes is not None else router["num_classes"]
            labels = None if class_labels is None else _check_class_labels(class_labels, num_classes)
            n = _check_batch_size(batch_size, None if labels is None else len(labels))
        generator = _check_generator(generator, n)
        if not text and labels is None:
            single = generator if isinstance(generator, torch.Generator) else None
            labels = torch.randint(0, num_classes, (n,), generator=single)
        first = self.students[0]
        size = first.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        device = self._execution_device
        # 1. Every item's noise, drawn before routing.
        shape = (n, first.config.in_channels, *size)
        latents = _check_latents(latents, shape)
        x = (
            latents.to(device, torch.float32)
            if latents is not None
            else randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        )
        t = int(self.config.timesteps[0])
        if self._edm:  # unit noise (latents too) scaled to the first noise level, as the students were trained
            x = x * float(self._edm_sigma(t))
        # 2. Route, then 3. run each student once on its items and put the results back in order.
        routes = self.route(labels, prompts if text else None)
        k_total = len(self.students)
        if routes.min() < 0 or routes.max() >= k_total:
            raise ValueError(
                f"The router sent an item to student {int(routes.max())}, but this pipeline holds {k_total} students "
                f"(unet_0 .. unet_{k_total - 1}); the router in model_index.json does not match the students."
            )
        cond = self._encode_prompts(prompts, device) if text else None
        x0 = torch.empty(shape, dtype=torch.float32, device=device)  # every item is written: each has a student
        for k, student in enumerate(self.students):
            idx = (routes == k).nonzero().flatten()
            if idx.numel() == 0:
                continue
            idx_dev = idx.to(device)
            tt = torch.full((idx.numel(),), t, device=device, dtype=torch.long)
            if text:
                kw = {"encoder_hidden_states": cond["encoder_hidden_states"][idx_dev]}
                if "added_cond_kwargs" in cond:
                    kw["added_cond_kwargs"] = {k2: v[idx_dev] for k2, v in cond["added_cond_kwargs"].items()}
            else:
                kw = {"class_labels": labels[idx].to(device)}
            if self._edm:
                x0[idx_dev] = self._edm_x0(student, x[idx_dev], t, **kw)
                continue
            out = student(x[idx_dev].to(student.dtype), tt, **kw).sample.float()
            x0[idx_dev] = self._to_x0(out[:, : x.shape[1]], x[idx_dev], t)
        if output_type == "latent":
            return ImagePipelineOutput(images=x0) if return_dict else (x0,)
        if text:
            x0 = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()
        return _images_output((x0 / 2 + 0.5).clamp(0, 1), output_type, return_dict)


# Copied from onestep.pipelines.common._refuse_other_pipeline
def _refuse_other_pipeline(index: dict, cls, folder: str) -> None:
    """A folder saved by another pipeline class is refused in one sentence that names the class to load it with."""
    named = index.get("_class_name")
    module, name = named if isinstance(named, list) and len(named) == 2 else (None, named)
    if not isinstance(name, str) or name in {k.__name__ for k in cls.__mro__}:
        return
    ours = {
        "OneStepPipeline": "onestep.pipelines.OneStepPipeline",
        "MultiStudentPipeline": "onestep.pipelines.MultiStudentPipeline",
        "SuperResolutionPipeline": "onestep.pipelines.SuperResolutionPipeline",
        "LatentSuperResolutionPipeline": "onestep.pipelines.LatentSuperResolutionPipeline",
        "BootPipeline": "onestep.pipelines.boot.BootPipeline",
    }
    if name in ours:
        remote = "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
        how = f"{ours[name]}.from_pretrained(folder) or {remote}"
    elif module is None:  # a stock diffusers class, maybe with a shipped component (BOOT's scheduler)
        custom = [v for k, v in index.items() if not k.startswith("_") and _is_component(v)]
        custom = any(library not in (None, "diffusers", "transformers") for library, _ in custom)
        how = f"DiffusionPipeline.from_pretrained(folder{', trust_remote_code=True' if custom else ''})"
    else:
        how = f"DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) if you trust its {module}.py"
    raise ValueError(f"{folder} holds a {name}, not a {cls.__name__}; load it with {how}.")


# Copied from onestep.pipelines.common._is_component
def _is_component(value) -> bool:
    """model_index.json's [library, class] entries (null, null: an optional component left out)."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


# Copied from onestep.pipelines.common._load_component
def _load_component(folder: str, name: str, entry: list, weights: dict):
    """One component from its sub-folder. Classes come from diffusers, transformers or this very file (a scheduler
    such as BootScheduler): never from code in the folder."""
    library, class_name = entry
    if library is None:
        return None
    if library in ("diffusers", "transformers"):
        klass = getattr(importlib.import_module(library), class_name)
    elif library == __name__.rsplit(".", 1)[-1] and isinstance(globals().get(class_name), type):
        klass = globals()[class_name]
    else:
        raise ValueError(
            f"{folder}/model_index.json names its {name} as {library}.{class_name}, which only code shipped in the "
            f"folder defines; load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) if you "
            f"trust that code."
        )
    return klass.from_pretrained(os.path.join(folder, name), **(weights if hasattr(klass, "dtype") else {}))


# Copied from onestep.pipelines.common._is_integer
def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# Copied from onestep.pipelines.common._check_output_type
def _check_output_type(output_type, allowed: tuple[str, ...] = ("pil", "np", "pt")) -> None:
    if not isinstance(output_type, str) or output_type not in allowed:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, allowed))}; got {output_type!r}.")


# Copied from onestep.pipelines.common._check_batch_size
def _check_batch_size(batch_size, given: int | None = None, what: str = "class labels") -> int:
    """The number of images: one per given condition (`given` of them), else batch_size (default 1)."""
    if batch_size is None:
        return 1 if given is None else given
    if not _is_integer(batch_size):
        raise TypeError(f"batch_size must be an integer; got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    if given is not None and batch_size != given:
        raise ValueError(f"batch_size={batch_size} does not match the {given} {what} given; leave batch_size out.")
    return int(batch_size)


# Copied from onestep.pipelines.common._check_class_labels
def _check_class_labels(class_labels, num_classes: int) -> torch.Tensor:
    """An integer, a list of them, or an integer array or tensor -> a 1-D long tensor of labels in 0..num_classes-1
    (a float such as 3.5 is refused, not rounded)."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"class_labels must be integers; got a {labels.dtype} {type(class_labels).__name__}: convert it with "
                f".long() (or .astype(int)) after checking its values."
            )
        if labels.ndim > 1:
            raise ValueError(f"class_labels must be one label per image (1-D); got shape {tuple(labels.shape)}.")
        labels = labels.long().reshape(-1)
    else:
        items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
        bad = [c for c in items if not _is_integer(c)]
        if bad:
            raise TypeError(f"class_labels must be integers (an int or a list of ints); got {bad[0]!r}.")
        labels = torch.tensor([int(c) for c in items], dtype=torch.long)
    if labels.numel() == 0:
        raise ValueError(
            "class_labels is empty; give one label per image, or leave it out (random labels, batch_size images)."
        )
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        raise ValueError(f"class_labels must lie in 0..{num_classes - 1}; got {int(outside[0])}.")
    return labels


# Copied from onestep.pipelines.common._check_generator
def _check_generator(generator, count: int):
    """None, one torch.Generator, or a list of exactly one per image (returned as a list, as randn_tensor takes)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != count:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {count} images; give one per image, or "
                f"a single generator."
            )
        return list(generator)
    raise TypeError(
        f"generator must be a torch.Generator or a list of them, one per image; got {type(generator).__name__}."
    )


# Copied from onestep.pipelines.common._check_latents
def _check_latents(latents, shape: tuple[int, ...]):
    """None, or a float tensor of exactly `shape` (the unit noise of every image)."""
    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        what = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise TypeError(f"latents must be a float torch.Tensor of shape {tuple(shape)}; got {what}.")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(
            f"latents must have shape {tuple(shape)}, one {'x'.join(map(str, shape[1:]))} noise per image; got "
            f"{tuple(latents.shape)}."
        )
    return latents


# Copied from onestep.pipelines.common._check_num_inference_steps
def _check_num_inference_steps(num_inference_steps, maximum: int, why: str) -> int | None:
    """None (the pipeline's default) or an integer in 1..maximum; `why` says where the maximum comes from. 0 or a
    negative count is refused, not read as "the default"."""
    if num_inference_steps is None:
        return None
    if not _is_integer(num_inference_steps):
        raise TypeError(f"num_inference_steps must be an integer; got {num_inference_steps!r}.")
    if not 1 <= num_inference_steps <= maximum:
        raise ValueError(f"num_inference_steps must be between 1 and {maximum} ({why}); got {num_inference_steps}.")
    return int(num_inference_steps)


# Copied from onestep.pipelines.common._images_output
def _images_output(images: torch.Tensor, output_type: str, return_dict: bool):
    """[0, 1] images (B, C, H, W) as output_type asks: "pt" as they are, "np" (B, H, W, C) float32 arrays, "pil"
    a list of PIL images."""
    if output_type != "pt":
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            images = DiffusionPipeline.numpy_to_pil(images)
    return ImagePipelineOutput(images=images) if return_dict else (images,)
