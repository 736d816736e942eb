"""Image datasets: ImageFolder tar.gz -> versioned Zarr group (order, manifest, errors, integrity)."""
from pathlib import Path

import numpy as np
import pytest
import zarr

from image_fixtures import image_folder, png_bytes, random_image, write_archive
from pipeline.storage import artifacts
from pipeline.data.datasets import open_image_dataset, prepare_image_dataset
from pipeline.errors import ArtifactMissing, KDMError
from shared_data import require, shared_data
from storage_schemas import DatasetManifest

CIFAR = shared_data("cifar10-jpeg.tar.gz")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    members, pixels = image_folder(np.random.default_rng(0))
    archive = write_archive(root / "tiny.tar.gz", members)
    out = str(root / "tiny-ds")
    manifest = prepare_image_dataset(str(archive), out, chunk_size=4, progress=False)
    return archive, out, manifest, pixels


def test_order_labels_and_pixels(tiny):
    archive, out, m, pixels = tiny
    assert m.class_names == ("ant", "bee", "cat")            # sorted, whatever the archive order
    ds = open_image_dataset(out)
    for split, per in (("train", 5), ("test", 2)):
        images, labels = ds.load(split)
        assert images.dtype == np.uint8 and images.shape == (3 * per, 3, 8, 8)
        assert labels.dtype == np.int32 and labels.tolist() == sorted([0, 1, 2] * per)
        names = [f"{split}/{c}/{i:04d}.png" for c in m.class_names for i in range(per)]   # sorted files
        for k, name in enumerate(names):
            assert np.array_equal(images[k], pixels[name].transpose(2, 0, 1)), name


def test_manifest_and_layout(tiny):
    archive, out, m, _ = tiny
    g = zarr.open_group(out, mode="r")
    assert set(g.group_keys()) == {"train", "test"}
    assert g["train"]["images"].chunks == (4, 3, 8, 8) and g["train"]["label"].chunks == (4,)
    raw = g.attrs["kdm"]
    assert DatasetManifest.model_validate(raw) == m
    assert m.format == "kdm-dataset" and m.version.startswith("ds-")
    assert m.image_shape == (3, 8, 8) and m.num_classes == 3
    assert m.splits["train"].count == 15 and m.splits["test"].count == 6
    assert m.splits["train"].label_histogram == (5, 5, 5) and m.splits["test"].label_histogram == (2, 2, 2)
    assert m.source_sha256 == artifacts.sha256_file(str(archive))
    assert len(m.content_hash) == 64 and m.code_version and m.created
    assert "kdm_status" not in g.attrs
    assert not Path(artifacts.partial_url(out)).exists()
    open_image_dataset(out).verify()


def test_prepare_is_idempotent_and_content_addressed(tiny, tmp_path):
    archive, out, m, _ = tiny
    meta = Path(out) / "zarr.json"
    before = meta.stat().st_mtime_ns
    assert prepare_image_dataset(str(archive), out, chunk_size=4, progress=False) == m
    assert meta.stat().st_mtime_ns == before
    again = prepare_image_dataset(str(archive), str(tmp_path / "again"), chunk_size=4, progress=False)
    assert again.version == m.version and again.content_hash == m.content_hash
    other = prepare_image_dataset(str(archive), str(tmp_path / "chunk5"), chunk_size=5, progress=False)
    assert other.content_hash == m.content_hash and other.version != m.version


def test_verify_detects_tampering(tiny, tmp_path):
    import shutil
    _, out, _, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    g = zarr.open_group(str(copy), mode="r+")
    g["test"]["images"][1, 0, 0, 0] = (int(g["test"]["images"][1, 0, 0, 0]) + 1) % 256
    with pytest.raises(KDMError, match="content hash mismatch"):
        open_image_dataset(str(copy)).verify()


def test_missing_or_incomplete_dataset(tmp_path):
    with pytest.raises(ArtifactMissing, match="no dataset"):
        open_image_dataset(str(tmp_path / "none"))
    zarr.open_group(str(tmp_path / "bare"), mode="w")
    with pytest.raises(ArtifactMissing, match="incomplete"):
        open_image_dataset(str(tmp_path / "bare"))


def test_jpeg_train_only_archive(tmp_path):
    rng = np.random.default_rng(1)
    members = {f"train/{c}/{i}.jpg": png_bytes(random_image(rng, 16), "JPEG") for c in ("x", "y") for i in range(3)}
    m = prepare_image_dataset(str(write_archive(tmp_path / "a.tgz", members, dirs=False)), str(tmp_path / "ds"),
                              progress=False)
    assert list(m.splits) == ["train"] and m.image_shape == (3, 16, 16)
    assert m.splits["train"].label_histogram == (3, 3)


# --- bad archives ------------------------------------------------------------------------------------

def _prepare(tmp_path, members):
    archive = write_archive(tmp_path / "bad.tar.gz", members)
    out = tmp_path / "out"
    with pytest.raises(KDMError) as e:
        prepare_image_dataset(str(archive), str(out), progress=False)
    assert not out.exists()
    return str(e.value)


@pytest.mark.parametrize("bad", ["train/stray.png", "valid/cat/0.png", "train/cat/sub/0.png"])
def test_wrong_layout_names_the_path(tmp_path, bad):
    rng = np.random.default_rng(2)
    members = {"train/cat/0.png": png_bytes(random_image(rng)), bad: png_bytes(random_image(rng))}
    msg = _prepare(tmp_path, members)
    assert bad in msg and "train" in msg and "<class>" in msg


def test_corrupt_image_names_the_file(tmp_path):
    rng = np.random.default_rng(3)
    good = png_bytes(random_image(rng))
    members = {"train/cat/0.png": good, "train/cat/1.png": good[: len(good) // 2], "train/dog/0.png": good}
    msg = _prepare(tmp_path, members)
    assert "train/cat/1.png" in msg and "cannot decode" in msg


def test_mixed_sizes_name_both_sizes_and_a_file(tmp_path):
    rng = np.random.default_rng(4)
    members = {"train/cat/0.png": png_bytes(random_image(rng, 8)), "train/dog/0.png": png_bytes(random_image(rng, 8, 12))}
    msg = _prepare(tmp_path, members)
    assert "train/dog/0.png" in msg and "8x8" in msg and "12x8" in msg and "mixed image sizes" in msg


def test_split_missing_a_class_is_an_error(tmp_path):
    rng = np.random.default_rng(5)
    members = {"train/cat/0.png": png_bytes(random_image(rng)), "train/dog/0.png": png_bytes(random_image(rng)),
               "test/cat/0.png": png_bytes(random_image(rng))}
    msg = _prepare(tmp_path, members)
    assert "'test'" in msg and "dog" in msg


def test_not_an_archive(tmp_path):
    p = tmp_path / "x.tar.gz"
    p.write_bytes(b"this is not a tar file at all" * 20)
    with pytest.raises(KDMError, match="not a"):
        prepare_image_dataset(str(p), str(tmp_path / "o"), progress=False)
    with pytest.raises(KDMError, match="does not exist"):
        prepare_image_dataset(str(tmp_path / "missing.tgz"), str(tmp_path / "o"), progress=False)


@pytest.mark.slow
def test_real_cifar10(tmp_path):
    require(CIFAR)
    m = prepare_image_dataset(str(CIFAR), str(tmp_path / "cifar10"), progress=False)
    assert m.splits["train"].count == 50_000 and m.splits["test"].count == 10_000
    assert m.num_classes == 10 and m.class_names[0] == "airplane" and m.image_shape == (3, 32, 32)
    assert m.splits["train"].label_histogram == (5000,) * 10
    # the manifest says which published file it is, and that its pixels are not the official release's
    assert (m.source.id, m.source.file, m.source.format, m.source.url) == (
        "cifar10-jpeg-mirror", "cifar10-jpeg.tar.gz", "image-folder", None)
    assert m.source.checksum == "sha256:d877bdec11f54282b92da36e9f045bd305d663b1223e3822baff39ca9ff6690a"
    assert "pixels differ from the official release" in m.source.note
    print(f"CIFAR-10 prepared in {m.prepare_seconds:.1f} s")
