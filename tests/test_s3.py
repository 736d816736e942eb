"""Pair stores and teacher directories at s3:// URLs, against a loopback S3 server (moto).

Credentials and the endpoint reach s3fs / botocore only through the standard environment variables.
"""
import io

import numpy as np
import pytest

import s3fs  # noqa: E402,F401  (a dependency: a missing one is an error, not a skip)
import moto.server  # noqa: E402,F401  (installed by make test)

import zarr  # noqa: E402

from pipeline.storage import artifacts
from pipeline.pairs import generate
from pipeline.pairs import importer
from pipeline import presets
from pipeline.teachers import flow_matching as teacher
from pipeline.pairs import filter as filt
from pipeline.errors import ArtifactMissing
from pipeline.storage.pairstore import PairStore  # noqa: E402
from s3_server import commit_order, listing, moto_s3, object_writes  # noqa: E402
from storage_schemas import (FilterConfig, PairsGenerateConfig, PairsImportConfig, SamplerSettings,  # noqa: E402
                             SeedRange)

BUCKET = "kdm-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points s3fs at it."""
    with moto_s3(BUCKET) as fs:
        yield fs


def url(*parts: str) -> str:
    return "/".join([f"s3://{BUCKET}", *parts])


def raw_group(u: str) -> zarr.Group:
    return zarr.open_group(zarr.storage.FsspecStore.from_url(u, read_only=True), mode="r", zarr_format=3)


@pytest.fixture(scope="module")
def traj(s3, tmp_path_factory):
    """(local path, s3 URL) of the same float32 (T=3, N=600, D=2) trajectories, with near duplicates."""
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(3, 600, 2)).astype(np.float32)
    arr[:, 1::50] = arr[:, ::50] + 1e-5          # 12 near duplicates of x_0
    buf = io.BytesIO()
    np.save(buf, arr)
    local = tmp_path_factory.mktemp("src") / "traj.npy"
    local.write_bytes(buf.getvalue())
    s3.pipe(f"{BUCKET}/src/traj.npy", buf.getvalue())
    return str(local), url("src", "traj.npy")


IMPORT = PairsImportConfig(holdout_fraction=0.2, split_seed=0, chunk_size=200)


def test_import_to_s3_matches_local(traj, tmp_path, s3):
    local_src, s3_src = traj
    v_s3 = importer.import_pairs(s3_src, IMPORT, url("pairs", "a"))
    v_local = importer.import_pairs(local_src, IMPORT, str(tmp_path / "a"))
    assert v_s3 == v_local
    assert not s3.exists(f"{BUCKET}/pairs/a.partial")
    g = raw_group(url("pairs", "a"))          # plain zarr, no kdm code
    local = zarr.open_group(str(tmp_path / "a"), mode="r")
    assert g.attrs["kdm"]["content_hash"] == local.attrs["kdm"]["content_hash"]
    assert sorted(g.array_keys()) == sorted(local.array_keys())
    for name in g.array_keys():
        assert np.array_equal(g[name][:], local[name][:])
    held = raw_group(url("pairs", "a", "heldout"))
    assert held.attrs["kdm"]["count"] == 120 and held.attrs["kdm"]["split"] == "heldout"
    store = PairStore.open(url("pairs", "a"))
    store.verify()
    store.heldout().verify()
    assert importer.import_pairs(s3_src, IMPORT, url("pairs", "a")) == v_s3      # no-op


def test_filter_s3_to_s3(traj, tmp_path):
    _, s3_src = traj
    importer.import_pairs(s3_src, IMPORT, url("pairs", "a"))
    cfg = FilterConfig(near_duplicate_radius=0.001, blocklist_radius=0.0)
    with object_writes(BUCKET) as keys:
        v, counts = filt.filter_pairs(url("pairs", "a"), cfg, url("pairs", "a-filtered"))
    assert_markers_last(commit_order(keys, "pairs/a-filtered"), "zarr.json")
    out = PairStore.open(url("pairs", "a-filtered"))
    out.verify()
    src = PairStore.open(url("pairs", "a"))
    # the near duplicates: source rows 50k + 1 (x_0 moved by 1e-5) of 50k; where both went to the train
    # split the later train row of the two is dropped, and nothing else
    seeds = [int(x) for x in src.group["seed"][:]]
    row = {sd: i for i, sd in enumerate(seeds)}
    dropped = sorted(max(row[k], row[k + 1]) for k in range(0, 600, 50) if k in row and k + 1 in row)
    assert 0 < len(dropped) < 12                   # both cases occur: pairs split across train and held-out
    assert out.version == v and counts == {"nonfinite": 0, "duplicate_seed": 0, "blocklist": 0,
                                           "near_duplicate": len(dropped), "kept": len(src) - len(dropped)}
    assert out.group["source_index"][:].tolist() == [i for i in range(len(src)) if i not in dropped]
    assert np.array_equal(out.group["x_0"][:], src.group["x_0"][:][out.group["source_index"][:]])
    assert len(out.heldout()) == len(src.heldout())
    assert filt.filter_pairs(url("pairs", "a"), cfg, url("pairs", "a-filtered"))[0] == v   # no-op


def test_teacher_and_generate_on_s3(s3, tmp_path):
    t = url("teachers", "t")
    m = teacher.train_teacher(presets.load("teacher", "smoke"), t, progress=False)
    assert artifacts.committed(t) and not s3.exists(f"{BUCKET}/teachers/t.partial")
    assert teacher.read_teacher_manifest(t).id == m.id
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=300), heldout_seeds=SeedRange(start=1000, stop=1100),
                              sampler=SamplerSettings(method="euler", steps=3), chunk_size=100)
    out = url("pairs", "gen")
    v = generate.generate_pairs(t, cfg, out, progress=False)
    store = PairStore.open(out)
    store.verify()
    assert len(store) == 300 and len(store.heldout()) == 100
    assert not s3.exists(f"{BUCKET}/pairs/gen.partial")
    assert not any(generate.PROGRESS_DIR in p for p in s3.find(f"{BUCKET}/pairs/gen"))
    before = sorted(s3.find(f"{BUCKET}/pairs/gen", detail=True).items())
    assert generate.generate_pairs(t, cfg, out, progress=False) == v                    # no-op
    s3.invalidate_cache()
    assert sorted(s3.find(f"{BUCKET}/pairs/gen", detail=True).items()) == before
    local_t = str(tmp_path / "t")
    teacher.train_teacher(presets.load("teacher", "smoke"), local_t, progress=False)
    assert generate.generate_pairs(local_t, cfg, str(tmp_path / "gen"), progress=False) == v
    assert PairStore.open(str(tmp_path / "gen")).manifest.content_hash == store.manifest.content_hash


def test_open_missing_s3_store(s3):
    with pytest.raises(ArtifactMissing):
        PairStore.open(url("pairs", "nope"))
    assert not artifacts.exists(url("pairs", "nope"))


def test_partial_is_not_a_store(s3):
    g = zarr.open_group(zarr.storage.FsspecStore.from_url(url("pairs", "x.partial")), mode="w", zarr_format=3)
    g.create_array("x_0", shape=(4, 2), dtype="float32")[:] = 1.0
    assert artifacts.exists(url("pairs", "x.partial"))
    with pytest.raises(ArtifactMissing):
        PairStore.open(url("pairs", "x"))
    with pytest.raises(ArtifactMissing):        # a group, but without the kdm manifest
        PairStore.open(url("pairs", "x.partial"))
    assert not artifacts.committed(url("pairs", "x"))


def test_commit_copies_the_root_manifest_last(traj, s3):
    """The server stores every chunk of the committed store before any Zarr metadata, the metadata deepest
    first and the root's (which holds the kdm manifest) at the very end."""
    _, s3_src = traj
    with object_writes(BUCKET) as keys:
        importer.import_pairs(s3_src, IMPORT, url("pairs", "ordered"))
    rels = commit_order(keys, "pairs/ordered")
    files = {p.removeprefix(f"{BUCKET}/pairs/ordered/") for p in listing(s3, BUCKET, "pairs/ordered")}
    assert sorted(rels) == sorted(files)                         # each committed object written once
    markers = [i for i, r in enumerate(rels) if r.endswith("zarr.json")]
    data = [i for i, r in enumerate(rels) if not r.endswith("zarr.json")]
    assert data and all("/c/" in f"/{rels[i]}" for i in data)     # the data: chunks of the arrays
    assert max(data) < min(markers), rels                         # every chunk before every marker
    depths = [rels[i].count("/") for i in markers]
    assert depths == sorted(depths, reverse=True), [rels[i] for i in markers]
    assert rels[-1] == "zarr.json" and {"heldout/zarr.json", "x_0/zarr.json"} <= set(rels)
    assert PairStore.open(url("pairs", "ordered")).manifest.content_hash


# --- commit order of every artifact kind, as the server stored the objects --------------------------

def assert_markers_last(rels: list[str], last: str) -> None:
    """``rels`` (write order): every object once, each data object before every marker, ``last`` at the end."""
    from pipeline.storage.artifacts import MANIFEST
    marker = {MANIFEST, "zarr.json", "report.json"}
    kinds = [r.rsplit("/", 1)[-1] in marker for r in rels]
    assert len(rels) == len(set(rels)) and rels[-1] == last, rels
    assert kinds == sorted(kinds), rels                           # data, data, ..., marker, marker


def test_teacher_student_and_evaluation_commit_their_data_before_the_manifest_or_report(s3, tmp_path):
    from pipeline import stages
    from pipeline.recipes.checkerboard import Evaluation2D
    from pipeline.storage.checkpoints import STATE_FILE
    from pipeline.training import train2d
    from storage_schemas import Eval2DConfig
    t, student = url("teachers", "order"), url("students", "order")
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=200), heldout_seeds=SeedRange(start=1000, stop=1050),
                              sampler=SamplerSettings(method="euler", steps=2), chunk_size=100)
    with object_writes(BUCKET) as keys:
        teacher.train_teacher(presets.load("teacher", "smoke"), t, progress=False)
        generate.generate_pairs(t, cfg, url("pairs", "order"), progress=False)
        train2d.train_student(url("pairs", "order"), presets.load("student", "smoke", sets=[
            "train.steps=30", "train.checkpoint_every=10", "train.keep_checkpoints=2", "train.threads=1"]),
            student, progress=False)
        cfg2d = presets.load("distill", "smoke", sets=[f"root={url('root')}"]).model_copy(
            update={"evaluation": Eval2DConfig(num_samples=50, swd_projections=8, plots=True)})
        ev = stages.run_stage(Evaluation2D(), cfg2d, {"student": student, "filter": url("pairs", "order")},
                              stages.StageContext(progress_bars=False))

    rels = commit_order(keys, "teachers/order")
    assert "weights.safetensors" in rels
    assert_markers_last(rels, "manifest.json")
    assert_markers_last(commit_order(keys, "pairs/order"), "zarr.json")

    # the student's run mirror: each checkpoint's state.json after its other files, the metrics log before
    # the checkpoint it reaches; the weights before the manifest
    partial = commit_order(keys, "students/order.partial")
    for step in (10, 20, 30):
        ck = f"checkpoints/step-{step:08d}/"
        files = [i for i, r in enumerate(partial) if r.startswith(ck)]
        assert [partial[i] for i in files][-1] == ck + STATE_FILE and len(files) == 5, partial
        assert "metrics.jsonl" in partial[:files[0]]
    assert partial.index("student.safetensors") < partial.index("manifest.json") == len(partial) - 1
    rels = commit_order(keys, "students/order")
    assert {"student.safetensors", "checkpoints/step-00000030/state.json"} <= set(rels)
    assert_markers_last(rels, "manifest.json")
    assert not any(p.startswith("checkpoints/step-00000010/") for p in rels)     # pruned, keep_checkpoints=2

    # the evaluation: plots first, report.json (what marks it done) last
    rels = commit_order(keys, ev["uri"].removeprefix(f"s3://{BUCKET}/"))
    assert any(r.endswith(".png") for r in rels)
    assert_markers_last(rels, "report.json")
    assert ev["report"] == ev["uri"] + "/report.json" and ev["skipped"] is False


def assert_checkpoints_end_with_state(partial: list[str], steps: list[int], files: int) -> None:
    """Each mirrored checkpoint: ``files`` objects, ``state.json`` the last of them."""
    for step in steps:
        ck = f"checkpoints/step-{step:08d}/"
        mine = [r for r in partial if r.startswith(ck)]
        assert len(mine) == files and mine[-1] == ck + "state.json", partial


def test_image_artifacts_commit_their_data_before_the_manifest(s3, tmp_path):
    from image_fixtures import image_folder, write_archive
    from pipeline.data.datasets import prepare_image_dataset
    from pipeline.teachers.bootstrap import load_edm_teacher_config, train_edm_teacher
    from pipeline.training.image_data import write_synthetic_store
    from pipeline.training.image_train import train_image_student
    from storage_schemas.kdm_image import ImageTrainConfig, KDMImageConfig, SongUNetConfig
    members, _ = image_folder(np.random.default_rng(0), per_class={"train": 4, "test": 1})
    archive = write_archive(tmp_path / "a.tgz", members)
    tcfg = load_edm_teacher_config("cifar10-mini", sets=[
        "unet.model_channels=8", "unet.channel_mult=[1]", "unet.num_blocks=1", "unet.attn_resolutions=[]",
        "batch_size=4", "steps=4", "checkpoint_every=2", "preview_samples=1", "device=cpu"])
    pairs = write_synthetic_store(str(tmp_path / "pairs"), 16, (3, 16, 16), chunk_size=8, seed=1).url
    mcfg = KDMImageConfig(img_resolution=16, distance="mse", adv_weight=0.0,
                          unet=SongUNetConfig(model_channels=8, channel_mult=(1,), num_blocks=1, attn_resolutions=()))
    scfg = ImageTrainConfig(device="cpu", precision="fp32", batch_size=4, threads=1, steps=4, checkpoint_every=2,
                            keep_checkpoints=1)
    from pipeline.evaluation import features
    from pipeline.evaluation.image_metrics import reference_stats
    from storage_schemas.protocol import ExtractorTrainConfig
    x = np.random.default_rng(2).integers(0, 256, (24, 3, 8, 8), dtype=np.uint8)
    with object_writes(BUCKET) as keys:
        features.train_extractor(x, np.arange(24) % 3, ExtractorTrainConfig(
            width=4, num_classes=3, epochs=1, batch_size=8, precision="fp32"), url("extractors", "fx"), progress=False)
        ref = reference_stats(x, dataset_id="toy", split="train", extractor=features.load_extractor(
            url("extractors", "fx")), root=url("root"))
        prepare_image_dataset(str(archive), url("datasets", "img"), chunk_size=4, progress=False)
        train_edm_teacher(url("datasets", "img"), tcfg, url("teachers", "edm"), progress=False)
        train_image_student(pairs, mcfg, scfg, url("students", "img"), progress=False)

    rels = commit_order(keys, "extractors/fx")
    assert len(rels) == 3 and rels[:-1] != []
    assert_markers_last(rels, "manifest.json")
    rels = commit_order(keys, ref.url.removeprefix(f"s3://{BUCKET}/"))
    assert len(rels) == 3
    assert_markers_last(rels, "manifest.json")
    assert_markers_last(commit_order(keys, "datasets/img"), "zarr.json")
    partial = commit_order(keys, "teachers/edm.partial")
    assert_checkpoints_end_with_state(partial, [2, 4], files=4)
    rels = commit_order(keys, "teachers/edm")
    assert {"weights.safetensors", "preview.png"} <= set(rels) and not any("checkpoints/" in r for r in rels)
    assert_markers_last(rels, "manifest.json")
    partial = commit_order(keys, "students/img.partial")
    assert_checkpoints_end_with_state(partial, [2, 4], files=5)
    assert partial[-2:] == ["student.safetensors", "manifest.json"]
    rels = commit_order(keys, "students/img")
    assert "checkpoints/step-00000004/state.json" in rels and "student.safetensors" in rels
    assert_markers_last(rels, "manifest.json")
