"""MSD's router (docs/methods/msd.md): the partition rules, balance, determinism, the saved file, and
one-sentence refusals of a router or K that does not fit the teacher."""

import pytest
import torch

import onestep.pipelines.msd as pipeline_module
from onestep import router as R
from onestep.errors import UserError


def test_class_ranges_are_contiguous_and_equal_within_one():
    assert R.class_parts(R.fit_class_range(4, 1000))[1][:2] == [250, 251]  # ImageNet K = 4: 250-499 is student 1
    assert R.class_parts(R.fit_class_range(2, 10)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    for classes, k in [(10, 3), (16, 8), (7, 7), (11, 4)]:
        parts = R.class_parts(R.fit_class_range(k, classes))
        sizes = [len(p) for p in parts]
        assert sum(parts, []) == list(range(classes)) and max(sizes) - min(sizes) <= 1
        for c in range(classes):  # floor(c K / C)
            assert c in parts[c * k // classes]


def test_more_students_than_classes_or_slots_is_refused():
    with pytest.raises(UserError, match="larger than the number of classes"):
        R.fit_class_range(11, 10)
    with pytest.raises(UserError, match="1 to 8 students"):
        R.fit_class_range(9, 100)


def _embeddings(n=400, dim=16, seed=0):
    """Unit vectors from 4 clusters of very different sizes (plain k-means gives uneven parts)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, dim, generator=g)
    sizes = [n * 5 // 10, n * 3 // 10, n * 15 // 100, n - n * 95 // 100]
    x = torch.cat([c + 0.4 * torch.randn(s, dim, generator=g) for c, s in zip(centres, sizes)])
    return torch.nn.functional.normalize(x, dim=1)


def test_balanced_kmeans_is_balanced_within_one_percent_deterministic_and_round_trips(tmp_path):
    x = _embeddings()
    plain = R.fit_text_router(x, 4, "kmeans", seed=3)
    balanced = R.fit_text_router(x, 4, "kmeans_balanced", seed=3)
    counts = torch.bincount(pipeline_module.route_embeddings(x, balanced), minlength=4)
    assert (counts - 100).abs().max() <= 1 and balanced["fit"]["imbalance"] <= 0.01
    assert plain["fit"]["imbalance"] > 0.2  # the paper's remark: unbalanced k-means gives uneven parts
    assert R.fit_text_router(x, 4, "kmeans_balanced", seed=3) == balanced  # same data and seed: the same router
    # Offsets move only boundaries: most points keep their plain cluster.
    same = (pipeline_module.route_embeddings(x, plain) == pipeline_module.route_embeddings(x, balanced)).double()
    assert same.mean() > 0.6
    path = str(tmp_path / "router.json")
    R.save_router(balanced, path)
    loaded = R.load_router(path)
    assert torch.equal(pipeline_module.route_embeddings(x, loaded), pipeline_module.route_embeddings(x, balanced))
    assert {"centroids", "offsets", "encoder", "pooling", "normalisation", "dtype"} <= set(loaded)


def test_pca_quadrants_split_each_principal_axis_at_its_median():
    x = _embeddings(n=402)
    router = R.fit_text_router(x, 4, "pca_quadrant")
    routes = pipeline_module.route_embeddings(x, router)
    assert torch.bincount(routes // 2, minlength=2).tolist() == [201, 201]  # pc1 above or below its median
    assert torch.bincount(routes % 2, minlength=2).tolist() == [201, 201]
    with pytest.raises(UserError, match="4 quadrants"):
        R.fit_text_router(x, 2, "pca_quadrant")


def test_training_and_inference_route_with_the_same_code():
    assert R.route_embeddings is pipeline_module.route_embeddings and R.route_classes is pipeline_module.route_classes


def test_a_router_that_does_not_fit_the_teacher_is_refused(tmp_path):
    classes = R.fit_class_range(4, 16)
    with pytest.raises(UserError, match="partitions 16 classes, but the teacher has 10"):
        R.check_router_fits(classes, "r.json", num_classes=10, text_dim=None)
    with pytest.raises(UserError, match="takes no text"):
        R.check_router_fits(R.fit_text_router(_embeddings(), 2, "kmeans"), "r.json", num_classes=10, text_dim=None)
    with pytest.raises(UserError, match="16-wide text embeddings"):
        R.check_router_fits(R.fit_text_router(_embeddings(), 2, "kmeans"), "r.json", num_classes=None, text_dim=768)
    (tmp_path / "bad.json").write_text('{"kind": "voronoi"}')
    with pytest.raises(UserError, match="not a usable MSD router file: it needs a kind among"):
        R.load_router(str(tmp_path / "bad.json"))


def _broken(router: dict, **change) -> dict:
    out = {**router, **change}
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"centroids": "drop_one"}, "centroids must be 3 rows of 16 numbers"),
        ({"offsets": "drop_one"}, "offsets must be 3 numbers"),
        ({"offsets": None}, "a kmeans_balanced router needs offsets"),
        ({"centroids": None, "pooling": None}, "a kmeans_balanced router needs pooling, centroids"),
        ({"dim": 8}, "centroids must be 3 rows of 8 numbers"),
        ({"num_students": "3"}, "num_students, a positive integer"),
        ({"normalisation": "max"}, "its pooling must be one of"),
    ],
)
def test_a_router_file_with_missing_keys_or_wrong_counts_is_refused_in_one_sentence(tmp_path, change, problem):
    import json

    router = R.fit_text_router(_embeddings(), 3, "kmeans_balanced")
    change = {k: (router[k][:-1] if v == "drop_one" else v) for k, v in change.items()}
    path = tmp_path / "router.json"
    path.write_text(json.dumps(_broken(router, **change)))
    with pytest.raises(UserError) as err:
        R.load_router(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} is not a usable MSD router file: ") and problem in message
    assert "\n" not in message and message.count(". ") == 0
    R.save_router(router, str(path))  # the unbroken file loads
    assert R.load_router(str(path)) == json.loads(path.read_text())


def test_pca_and_class_router_files_are_checked_too(tmp_path):
    import json

    pca = R.fit_text_router(_embeddings(), 4, "pca_quadrant")
    for change, problem in [
        ({"medians": [0.0]}, "medians must be 2 numbers"),
        ({"components": pca["components"][:1]}, "components must be 2 rows of 16 numbers"),
        ({"num_students": 3}, "a pca_quadrant router has 4 students"),
    ]:
        (tmp_path / "r.json").write_text(json.dumps({**pca, **change}))
        with pytest.raises(UserError, match=problem):
            R.load_router(str(tmp_path / "r.json"))
    (tmp_path / "r.json").write_text(json.dumps({"kind": "class_range", "num_students": 2}))
    with pytest.raises(UserError, match="it needs num_classes"):
        R.load_router(str(tmp_path / "r.json"))


def test_the_router_hash_survives_the_file_and_tells_routers_apart(tmp_path):
    balanced = R.fit_text_router(_embeddings(), 3, "kmeans_balanced")
    R.save_router(balanced, str(tmp_path / "r.json"))
    assert R.router_hash(R.load_router(str(tmp_path / "r.json"))) == R.router_hash(balanced)
    other = R.fit_text_router(_embeddings(), 3, "kmeans_balanced", seed=1)
    assert R.router_hash(other) != R.router_hash(balanced)
    assert R.router_hash(R.fit_class_range(2, 10)) != R.router_hash(R.fit_class_range(2, 11))


def test_each_student_gets_only_its_own_classes_and_real_images():
    """Parts of the digits split (K = 2: classes 0-4 and 5-9): the conditions each student trains on and the real
    images its GAN (and TSM, with --tsm_conditions part) sees are its part's, all of them and nothing else."""
    from onestep.data import DatasetBatches, TensorBatches
    from onestep.msd_parts import ConditionSpace, Parts

    router = R.fit_class_range(2, 10)
    parts = Parts(router, ConditionSpace("class", "digits", num_classes=10), embedder=None)
    labels = torch.arange(10).repeat_interleave(7)  # 7 images of every class
    images = labels.float().reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()  # each image shows its own label

    class Folder(torch.utils.data.Dataset):  # an ImageFolder with class sub-folders, in memory
        resolution, cache_identity = 4, ("folder",)

        def __init__(self):
            self.labels = labels

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    for k, own in ((0, set(range(5))), (1, set(range(5, 10)))):
        assert parts.members[k] == sorted(own)
        torch.manual_seed(k)
        drawn = parts.cond_sampler(k, context=None)(4000, torch.device("cpu")).class_labels
        assert set(drawn.tolist()) == own  # every class of the part is drawn, no other one
        counts = torch.bincount(drawn, minlength=10)[sorted(own)].double()
        assert (counts / 800 - 1).abs().max() < 0.15  # uniformly
        tensors = parts.restrict_data(TensorBatches(images, labels, batch_size=8, seed=3), k)
        assert set(tensors.labels.tolist()) == own and len(tensors) == 35
        assert torch.equal(tensors.images[:, 0, 0, 0].long(), tensors.labels)  # images travel with their labels
        batch = tensors.batch(0, 0, 0, torch.device("cpu"))
        assert set(batch.cond.class_labels.tolist()) <= own
        folder = parts.restrict_data(DatasetBatches(Folder(), batch_size=8, seed=3), k)
        assert len(folder.dataset) == 35 and set(folder.dataset.labels.tolist()) == own
        assert {folder.dataset[i][1] for i in range(35)} == own
        batch = folder.batch(0, 0, 0, torch.device("cpu"))
        assert set(batch.cond.class_labels.tolist()) <= own
        assert torch.equal(batch.images[:, 0, 0, 0].long(), batch.cond.class_labels)
    with pytest.raises(UserError, match="hold no image of student 1's classes 5-9"):
        parts.restrict_data(TensorBatches(images[:35], labels[:35], batch_size=8), 1)


def test_only_the_main_process_fits_a_text_router_and_one_student_runs_need_a_fitted_one(tmp_path):
    """resolve_router: with fit off (every process but the main one) nothing is embedded and None comes back (the
    process then reads the main one's file); --student_index without a saved router or --router_file is refused."""
    from dataclasses import replace

    from onestep.msd_parts import ConditionSpace, resolve_router
    from onestep.presets.msd import PRESETS

    base = PRESETS["sd15"].config
    config = replace(base, trainer=replace(base.trainer, output_dir=str(tmp_path / "run")))
    space = ConditionSpace("text", "teacher", prompts=[f"prompt {i}" for i in range(8)], text_dim=16)

    def embedder():
        raise AssertionError("no embedding may be made here")

    assert resolve_router(config, space, embedder, fit=False) is None
    with pytest.raises(UserError, match="--fit_router instead of --student_index"):
        resolve_router(config, space, embedder, student_index=1, fit=True)
    with pytest.raises(UserError, match="larger than the number of training prompts"):  # checked on every process
        resolve_router(replace(config, method=replace(config.method, num_students=9)), space, embedder, fit=False)
    router = R.fit_text_router(_embeddings(dim=16), 4, "kmeans_balanced")
    R.save_router(router, str(tmp_path / "run" / "router.json"))
    assert resolve_router(config, space, embedder, student_index=1, fit=False) == router  # the saved one


def test_the_pipeline_refuses_a_route_beyond_its_students():
    """A router whose classes do not match the pipeline's (here 5 classes routed, 10 accepted) would send class 7 to a
    student 2 the pipeline does not hold: it stops instead of returning an unwritten image."""
    from diffusers import DDPMScheduler

    from tests.helpers import tiny_unet

    unets = {f"unet_{k}": tiny_unet(num_class_embeds=10) for k in range(2)}
    router = {"kind": "class_range", "num_students": 2, "num_classes": 5}
    pipe = pipeline_module.MultiStudentPipeline(scheduler=DDPMScheduler(), **unets, router=router, num_classes=10)
    assert pipe(class_labels=[1, 4], output_type="pt").images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="sent an item to student 2, but this pipeline holds 2 students"):
        pipe(class_labels=[1, 7], output_type="pt")
