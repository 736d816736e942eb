import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as plain `pytest`

from storage_schemas import SeedRange  # noqa: E402
from storage_schemas.protocol import (  # noqa: E402
    INCEPTION_ID,
    EvalProtocol,
    ExtractorRef,
    ImageMetric,
    ImageMetricReport,
    ProtocolMismatch,
    Quantization,
    ReferenceRef,
    check_comparable,
    protocol_differences,
)

SHA_A, SHA_B = "a" * 64, "b" * 64


def fx(id_="resnet9w64-0123456789ab", sha=SHA_A):
    return ExtractorRef(id=id_, sha256=sha, feature_dim=512, input_resize="none")


def ref(id_="ref-1", sha=SHA_A):
    return ReferenceRef(id=id_, sha256=sha, dataset_id="cifar10-abc", num_images=50_000)


def proto(**kw):
    base = dict(reference=ref(), feature_extractor=fx())
    base.update(kw)
    return EvalProtocol(**base)


def test_defaults_follow_edm():
    p = proto()
    assert p.num_samples == 50_000
    assert p.seeds == SeedRange(start=0, stop=50_000)
    q = p.quantization
    assert (q.kind, q.scale, q.offset, q.low, q.high) == ("edm-uint8", 127.5, 128.0, 0, 255)
    assert p.image_space == "uint8" and p.split == "train"
    assert proto(num_samples=1000).seeds == SeedRange(start=0, stop=1000)


def test_seeds_must_match_num_samples():
    with pytest.raises(ValidationError, match="one seed per sample"):
        proto(num_samples=100, seeds=SeedRange(start=0, stop=50))
    assert proto(num_samples=50, seeds=SeedRange(start=50_000, stop=50_050)).seeds.start == 50_000


def test_distribution_needs_reference_and_extractor():
    with pytest.raises(ValidationError, match="reference statistics and a feature extractor"):
        EvalProtocol(feature_extractor=fx())
    with pytest.raises(ValidationError, match="heldout"):
        EvalProtocol(kind="paired", num_samples=10, split="train")
    p = EvalProtocol(kind="paired", num_samples=10, split="heldout", image_space="float")
    assert p.reference is None


def test_check_comparable_accepts_equal_protocols():
    a = proto(num_samples=1000)
    b = EvalProtocol.model_validate_json(proto(num_samples=1000).model_dump_json())   # built apart, via JSON
    assert a is not b and protocol_differences(a, b) == []
    assert check_comparable(a, b) is None
    # the same pair one field apart is refused, naming only that field: the acceptance above is not vacuous
    with pytest.raises(ProtocolMismatch, match=r"differing fields:\n  - split: 'train' != 'test'$"):
        check_comparable(a, proto(num_samples=1000, split="test"))


def test_check_comparable_lists_every_differing_field():
    a = proto(num_samples=10_000)
    b = proto(num_samples=10_000, feature_extractor=fx(sha=SHA_B), reference=ref(id_="ref-2"), split="test")
    with pytest.raises(ProtocolMismatch) as e:
        check_comparable(a, b)
    msg = str(e.value)
    for field in ("feature_extractor.sha256", "reference.id", "split"):
        assert field in msg
    assert SHA_A in msg and SHA_B in msg
    assert "num_samples" not in msg


def test_check_comparable_seeds_and_quantisation():
    a = proto(num_samples=100)
    b = proto(num_samples=100, seeds=SeedRange(start=100, stop=200))
    with pytest.raises(ProtocolMismatch, match=r"seeds\.start"):
        check_comparable(a, b)
    c = proto(num_samples=100, quantization=Quantization(offset=127.5))
    with pytest.raises(ProtocolMismatch, match=r"quantization\.offset"):
        check_comparable(a, c)


def test_metric_level_comparison_ignores_irrelevant_knobs():
    name = "FD-resnet9w64-0123456789ab"
    a = ImageMetric(name=name, value=1.0, subject="teacher", protocol=proto(kid_subsets=100))
    b = ImageMetric(name=name, value=2.0, subject="student", protocol=proto(kid_subsets=10))
    check_comparable(a, b)   # KID subsets cannot change an FD
    ka = ImageMetric(name="KID-resnet9w64-0123456789ab", value=1.0, subject="t", protocol=proto(kid_subsets=100))
    kb = ImageMetric(name="KID-resnet9w64-0123456789ab", value=1.0, subject="s", protocol=proto(kid_subsets=10))
    with pytest.raises(ProtocolMismatch, match="kid_subsets"):
        check_comparable(ka, kb)
    with pytest.raises(ProtocolMismatch, match="name"):
        check_comparable(a, ka)
    with pytest.raises(TypeError):
        check_comparable(a, proto())


def test_fid_name_reserved_for_inception():
    with pytest.raises(ValidationError, match="reserved for the Inception"):
        ImageMetric(name="FID", value=1.0, subject="s", protocol=proto())
    inc = ExtractorRef(id=INCEPTION_ID, sha256=SHA_A, feature_dim=2048, input_resize="clean-pil-bicubic-299")
    ImageMetric(name="FID", value=1.0, subject="s", protocol=proto(feature_extractor=inc))
    with pytest.raises(ValidationError, match="reported as FID"):
        ImageMetric(name=f"FD-{INCEPTION_ID}", value=1.0, subject="s", protocol=proto(feature_extractor=inc))
    with pytest.raises(ValidationError, match="names extractor"):
        ImageMetric(name="FD-other", value=1.0, subject="s", protocol=proto())
    with pytest.raises(ValidationError, match="must not contain 'fid'"):
        fx(id_="my-fid-net")
    with pytest.raises(ValidationError, match="unknown metric name"):
        ImageMetric(name="fid", value=1.0, subject="s", protocol=proto())


def test_paired_metric_names():
    p = EvalProtocol(kind="paired", num_samples=10, split="heldout", image_space="float")
    ImageMetric(name="MSE", value=0.01, subject="student", protocol=p)
    with pytest.raises(ValidationError, match="paired protocol"):
        ImageMetric(name="MSE", value=0.01, subject="student", protocol=proto())
    with pytest.raises(ValidationError, match="LPIPS backbone"):
        ImageMetric(name="LPIPS-vgg", value=0.1, subject="student", protocol=p)
    lp = EvalProtocol(kind="paired", num_samples=10, split="heldout", image_space="float",
                      feature_extractor=ExtractorRef(id="lpips-vgg-0.1", sha256=SHA_A, input_resize="none"))
    ImageMetric(name="LPIPS-vgg", value=0.1, subject="student", protocol=lp)


def test_report_round_trip_and_lookup():
    m = ImageMetric(name="FD-resnet9w64-0123456789ab", value=3.5, subject="student", protocol=proto())
    r = ImageMetricReport(metrics=[m], code_version="x", created="now")
    r2 = ImageMetricReport.model_validate_json(r.model_dump_json())
    assert r2 == r
    assert r2.get("FD-resnet9w64-0123456789ab", "student").value == 3.5
    with pytest.raises(KeyError, match="have: FD-"):
        r2.get("FID", "student")
    with pytest.raises(ValidationError, match="appears twice"):
        ImageMetricReport(metrics=[m, m], code_version="x", created="now")
