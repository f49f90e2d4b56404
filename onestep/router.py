"""MSD's partition of the condition space (docs/methods/msd.md): fitted once, saved as JSON, and used
identically to choose each student's training conditions and to route at inference.

Kinds: `class_range` (class-conditional teachers: contiguous equal ranges, route(c) = floor(c K / C)),
`kmeans_balanced` (text: k-means on pooled prompt embeddings, then additive offsets that balance the
clusters), `kmeans` (the same without balancing) and `pca_quadrant` (K = 4: the signs of the first two
principal components around their medians). Routing itself lives in the self-contained pipeline file
(onestep.pipelines.msd), which this module imports, so training and sampling share one implementation.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .errors import UserError
from .pipelines.msd import (
    MAX_STUDENTS,
    TEXT_KINDS,
    pca_scores,
    pooled_text_embedding,
    route_classes,
    route_embeddings,
)

KINDS = ("class_range", *TEXT_KINDS)
ROUTER_FILE = "router.json"
POOLINGS, NORMALISATIONS = ("masked_mean", "mean"), ("l2", "none")


def check_num_students(k: int, available: int, what: str) -> None:
    if k > available:
        raise UserError(
            f"--num_students {k} is larger than the number of {what} ({available}); use at most {available}."
        )
    if not 1 <= k <= MAX_STUDENTS:
        raise UserError(f"--num_students {k} is not possible: an MSD pipeline holds 1 to {MAX_STUDENTS} students.")


def fit_class_range(num_students: int, num_classes: int) -> dict:
    check_num_students(num_students, num_classes, "classes")
    return {"kind": "class_range", "num_students": num_students, "num_classes": num_classes}


def class_parts(router: dict) -> list[list[int]]:
    """The classes of each student, in order."""
    routes = route_classes(torch.arange(router["num_classes"]), router)
    return [torch.nonzero(routes == k).flatten().tolist() for k in range(router["num_students"])]


# -- text routers ---------------------------------------------------------------------------------------


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance."""
    centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres.append(x[torch.multinomial(probs, 1, generator=g)].squeeze(0))
    return torch.stack(centres)


def _lloyd(x: torch.Tensor, mu: torch.Tensor, max_iter: int = 100, tol: float = 1e-4) -> tuple[torch.Tensor, int]:
    """Lloyd iterations until fewer than tol of the assignments change (at most max_iter)."""
    assign = torch.cdist(x, mu).argmin(dim=1)
    for it in range(1, max_iter + 1):
        for k in range(len(mu)):
            members = x[assign == k]
            if len(members):  # an empty cluster keeps its centre
                mu[k] = members.mean(dim=0)
        new = torch.cdist(x, mu).argmin(dim=1)
        changed = (new != assign).double().mean().item()
        assign = new
        if changed < tol:
            return mu, it
    return mu, max_iter


def _balance(x: torch.Tensor, mu: torch.Tensor, max_rounds: int = 1000, tolerance: float = 0.01) -> tuple:
    """Additive offsets b (a semi-discrete transport / auction step): assign = argmin |e - mu|^2 - b, and
    b_k += step (M/K - n_k) / (M/K), halving the step whenever a cluster's imbalance changes sign, until
    every cluster holds M/K within 1%. Returns the offsets with the smallest imbalance seen.

    A sign change counts when the cluster was outside the tolerance on both sides of it (an overshoot): clusters
    already balanced flip between +1 and -1 point from round to round, and halving on those froze the step long
    before the far-off clusters were balanced (halving on every sign change left 10% imbalance after 1000 rounds)."""
    m, k = len(x), len(mu)
    target = m / k
    outside = tolerance * target
    d2 = torch.cdist(x, mu) ** 2
    step = 0.1 * d2.min(dim=1).values.mean().item()
    b = torch.zeros(k, dtype=torch.float64)
    best, best_b, previous, rounds = float("inf"), b.clone(), None, 0
    while rounds < max_rounds:
        rounds += 1
        counts = torch.bincount((d2 - b).argmin(dim=1), minlength=k).double()
        gap = target - counts
        imbalance = gap.abs().max().item() / target
        if imbalance < best:
            best, best_b = imbalance, b.clone()
        if imbalance <= tolerance:
            break
        if previous is not None:
            overshoot = ((gap > 0) != (previous > 0)) & (gap.abs() > outside) & (previous.abs() > outside)
            if bool(overshoot.any()):
                step /= 2
        b = b + step * gap / target
        previous = gap
    return best_b, best, rounds


def check_text_fit(kind: str, num_students: int, num_prompts: int) -> None:
    """What fit_text_router refuses, checked before any embedding is made (and on every process of a run)."""
    if kind not in TEXT_KINDS:
        raise UserError(f"Unknown text partition {kind!r}; choose one of {', '.join(TEXT_KINDS)}.")
    check_num_students(num_students, num_prompts, "training prompts")
    if kind == "pca_quadrant" and num_students != 4:
        raise UserError("The pca_quadrant partition splits prompts into 4 quadrants: use --num_students 4.")


def fit_text_router(
    embeddings: torch.Tensor,
    num_students: int,
    kind: str,
    seed: int = 0,
    encoder: str = "",
    pooling: str = "masked_mean",
    normalisation: str = "l2",
) -> dict:
    """A text router fitted on pooled prompt embeddings (M, D): deterministic for a given seed. `pooling` and
    `normalisation` record how the embeddings were made (the pipeline makes them the same way)."""
    x = embeddings.double().cpu()
    check_text_fit(kind, num_students, len(x))
    meta = {
        "num_students": num_students,
        "dim": x.shape[1],
        "encoder": encoder,
        "pooling": pooling,
        "normalisation": normalisation,
        "dtype": "float32 embedding, float64 routing",
    }
    if kind == "pca_quadrant":
        mean = x.mean(dim=0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comps = vh[:2]
        # A principal axis has no sign of its own; fix it (largest entry positive) so refits agree.
        signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
        comps = comps * signs
        router = {"kind": kind, **meta, "mean": mean.tolist(), "components": comps.tolist()}
        # Scored exactly as routing scores them; the median halfway between the middle two values (even M), so
        # each axis splits the fit set in halves.
        router["medians"] = pca_scores(x, router).quantile(0.5, dim=0).tolist()
    else:
        g = torch.Generator().manual_seed(seed)
        mu, iterations = _lloyd(x, _kmeans_pp(x, num_students, g))
        offsets, imbalance, rounds = torch.zeros(num_students, dtype=torch.float64), None, 0
        if kind == "kmeans_balanced":
            offsets, imbalance, rounds = _balance(x, mu)
        router = {
            "kind": kind,
            **meta,
            "centroids": mu.tolist(),
            "offsets": offsets.tolist(),
            "fit": {"seed": seed, "lloyd_iterations": iterations, "balance_rounds": rounds},
        }
    counts = torch.bincount(route_embeddings(x, router), minlength=num_students)
    router.setdefault("fit", {}).update(
        num_prompts=len(x),
        counts=counts.tolist(),
        imbalance=float((counts.double() - len(x) / num_students).abs().max() / (len(x) / num_students)),
    )
    return router


class TextEmbedder:
    """e(c) for routing, from the teacher's (first) tokenizer and text encoder."""

    def __init__(self, tokenizer, text_encoder, encoder_id: str, batch_size: int = 256):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.encoder_id, self.batch_size = encoder_id, batch_size

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def __call__(self, prompts: list[str], pooling: str = "masked_mean", normalisation: str = "l2") -> torch.Tensor:
        parts = [
            pooled_text_embedding(
                self.tokenizer, self.text_encoder, prompts[i : i + self.batch_size], pooling, normalisation
            )
            for i in range(0, len(prompts), self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)


def fit_prompt_router(
    prompts: list[str],
    embed: TextEmbedder,
    num_students: int,
    kind: str,
    seed: int,
    max_prompts: int,
    pooling: str = "masked_mean",
    normalisation: str = "l2",
) -> dict:
    """Fit on the training prompts, or on a fixed, seeded subsample of at most max_prompts of them."""
    check_num_students(num_students, len(prompts), "training prompts")
    if pooling not in POOLINGS or normalisation not in NORMALISATIONS:
        raise UserError(
            f"Text routers pool with {' or '.join(POOLINGS)} and normalise with {' or '.join(NORMALISATIONS)}; "
            f"got {pooling!r} and {normalisation!r}."
        )
    if len(prompts) > max_prompts:
        keep = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:max_prompts]
        prompts = [prompts[int(i)] for i in keep.sort().values]
    embeddings = embed(prompts, pooling, normalisation)
    return fit_text_router(embeddings, num_students, kind, seed, embed.encoder_id, pooling, normalisation)


def route_prompts(prompts: list[str], embed: TextEmbedder, router: dict) -> torch.Tensor:
    """Training's routing of prompts: the embedding made as the router records, then the pipeline's rule."""
    return route_embeddings(embed(prompts, router["pooling"], router["normalisation"]), router)


# -- files ----------------------------------------------------------------------------------------------


def save_router(router: dict, path: str) -> None:
    """Atomic: K machines fitting the same deterministic router may write it at the same time."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(router, f, indent=1)
    os.replace(tmp, path)


def router_hash(router: dict) -> str:
    """A fingerprint of a router (its JSON, keys sorted), recorded with every trained student and checked when the
    students are assembled, so a pipeline never routes with another partition than its students were trained on."""
    text = json.dumps(json.loads(json.dumps(router)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _router_problem(router) -> str | None:
    """What makes a parsed router file unusable (None: nothing): its kind, keys and the lengths of its arrays."""
    if not isinstance(router, dict) or router.get("kind") not in KINDS:
        return f"it needs a kind among {', '.join(KINDS)}"
    k = router.get("num_students")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return "it needs num_students, a positive integer"
    if router["kind"] == "class_range":
        n = router.get("num_classes")
        return None if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else "it needs num_classes"
    keys = ("dim", "pooling", "normalisation") + (
        ("mean", "components", "medians") if router["kind"] == "pca_quadrant" else ("centroids", "offsets")
    )
    missing = [key for key in keys if key not in router]
    if missing:
        return f"a {router['kind']} router needs {', '.join(missing)}"
    d = router["dim"]
    if router["pooling"] not in POOLINGS or router["normalisation"] not in NORMALISATIONS:
        return f"its pooling must be one of {', '.join(POOLINGS)} and its normalisation one of {', '.join(NORMALISATIONS)}"

    def matrix(name, rows):
        value = router[name]
        ok = isinstance(value, list) and len(value) == rows
        ok = ok and all(isinstance(r, list) and len(r) == d and all(_number(v) for v in r) for r in value)
        return None if ok else f"{name} must be {rows} rows of {d} numbers"

    def vector(name, length):
        value = router[name]
        ok = isinstance(value, list) and len(value) == length and all(_number(v) for v in value)
        return None if ok else f"{name} must be {length} numbers"

    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        return "its dim must be a positive integer"
    if router["kind"] == "pca_quadrant":
        if k != 4:
            return "a pca_quadrant router has 4 students"
        return vector("mean", d) or matrix("components", 2) or vector("medians", 2)
    return matrix("centroids", k) or vector("offsets", k)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_router(path: str) -> dict:
    try:
        with open(path) as f:
            router = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"Cannot read the router file {path} ({err.__class__.__name__}); pass a router.json an MSD run wrote."
        ) from None
    problem = _router_problem(router)
    if problem is not None:
        raise UserError(f"{path} is not a usable MSD router file: {problem}.")
    return router


def check_router_fits(router: dict, path: str, num_classes: int | None, text_dim: int | None) -> None:
    """The router must partition this teacher's condition space: its classes, or its text encoder's width."""
    k = router["num_students"]
    if not 1 <= k <= MAX_STUDENTS:
        raise UserError(f"The router file {path} names {k} students; an MSD pipeline holds 1 to {MAX_STUDENTS}.")
    if router["kind"] == "class_range":
        if num_classes is None:
            raise UserError(
                f"The router file {path} partitions class labels, but the teacher is not class-conditional."
            )
        if router.get("num_classes") != num_classes:
            raise UserError(
                f"The router file {path} partitions {router.get('num_classes')} classes, but the teacher has {num_classes}."
            )
        check_num_students(k, num_classes, "classes")
        return
    if text_dim is None:
        raise UserError(f"The router file {path} routes prompts ({router['kind']}), but the teacher takes no text.")
    if router.get("dim") != text_dim:
        raise UserError(
            f"The router file {path} was fitted on {router.get('dim')}-wide text embeddings, but the teacher's text "
            f"encoder gives {text_dim}."
        )
