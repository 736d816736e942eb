"""Typed configs and manifests: parsing, validation messages, presets."""
import pytest
from pydantic import ValidationError

from pipeline import presets
from pipeline.errors import KDMError
from storage_schemas import (DistillCheckerboardConfig, KDM2DConfig, PairsGenerateConfig, SeedRange,
                             StudentRunConfig, format_validation_error, stable_hash)


# --- SeedRange ---------------------------------------------------------------------------------------

def test_seed_range_parse_is_inclusive():
    r = SeedRange.parse("0-49999")
    assert (r.start, r.stop) == (0, 50000)
    assert len(r) == 50000
    assert r.text() == "0-49999"


def test_seed_range_parse_tolerates_spaces_and_single_seed():
    assert SeedRange.parse(" 3 - 7 ") == SeedRange(start=3, stop=8)
    single = SeedRange.parse("5-5")
    assert (single.start, single.stop, len(single)) == (5, 6, 1)


@pytest.mark.parametrize("text", ["abc", "5", "", "1-2-3", "-3-4", "0..9", "a-b"])
def test_seed_range_parse_rejects_malformed_text(text):
    with pytest.raises(ValueError) as e:
        SeedRange.parse(text)
    msg = str(e.value)
    assert repr(text) in msg
    assert "START-END" in msg and "0-49999" in msg   # says what the form is, with an example


def test_seed_range_parse_rejects_reversed_range():
    with pytest.raises(ValueError, match=r"END must be >= START"):
        SeedRange.parse("10-5")


def test_seed_range_validation_and_overlap():
    with pytest.raises(ValidationError, match="seed range is empty"):
        SeedRange(start=4, stop=4)
    with pytest.raises(ValidationError, match="start must be >= 0"):
        SeedRange(start=-1, stop=4)
    a, b, c = SeedRange(start=0, stop=10), SeedRange(start=9, stop=12), SeedRange(start=10, stop=12)
    assert a.overlaps(b) and b.overlaps(a)
    assert not a.overlaps(c) and not c.overlaps(a)   # half-open: stop is exclusive


def test_schemas_are_frozen_and_strict():
    r = SeedRange(start=0, stop=3)
    with pytest.raises(ValidationError):
        r.start = 1
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SeedRange(start=0, stop=3, step=1)


def test_stable_hash_is_order_independent_for_dict_keys_and_model_aware():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash(SeedRange(start=0, stop=3)) == stable_hash({"start": 0, "stop": 3})
    assert stable_hash(SeedRange(start=0, stop=3)) != stable_hash(SeedRange(start=0, stop=4))
    assert len(stable_hash("x")) == 16 and len(stable_hash("x", length=40)) == 40


# --- validation messages -----------------------------------------------------------------------------

def test_invalid_student_config_names_every_field_path():
    with pytest.raises(ValidationError) as e:
        StudentRunConfig.model_validate({"train": {"lr": -1}, "model": {"bogus": 1}})
    text = format_validation_error(e.value, "run.yaml")
    lines = text.splitlines()
    assert lines[0] == "invalid StudentRunConfig in run.yaml:"
    lr_line = next(ln for ln in lines if "train.lr" in ln)
    assert "greater than 0" in lr_line and "-1" in lr_line
    bogus_line = next(ln for ln in lines if "model.bogus" in ln)
    assert "unknown field" in bogus_line
    assert len(lines) == 3   # one header + one line per problem


def test_missing_field_is_reported_as_required():
    with pytest.raises(ValidationError) as e:
        SeedRange.model_validate({"start": 0})
    assert format_validation_error(e.value) == "invalid SeedRange: stop: field required"
    with pytest.raises(ValidationError) as e:
        SeedRange.model_validate({})
    assert format_validation_error(e.value, "x.yaml").splitlines() == [
        "invalid SeedRange in x.yaml:", "  - start: field required", "  - stop: field required"]


def test_overlapping_heldout_seeds_name_both_ranges():
    with pytest.raises(ValidationError) as e:
        PairsGenerateConfig(seeds=SeedRange(start=0, stop=10), heldout_seeds=SeedRange(start=5, stop=20))
    msg = str(e.value)
    assert "heldout_seeds 5-19" in msg and "seeds 0-9" in msg and "overlap" in msg


def test_disjoint_or_absent_heldout_seeds_are_fine():
    cfg = PairsGenerateConfig(seeds=SeedRange(start=0, stop=10), heldout_seeds=SeedRange(start=10, stop=20))
    assert cfg.heldout_seeds.start == 10
    assert PairsGenerateConfig(heldout_seeds=None).heldout_seeds is None


def test_spectral_loss_requires_factorized_operator():
    with pytest.raises(ValidationError, match="spectral_loss requires operator='factorized'"):
        KDM2DConfig(spectral_loss="inverse")
    ok = KDM2DConfig(operator="factorized", spectral_loss="unit-disk-uniform")
    assert ok.spectral_loss == "unit-disk-uniform"


def test_import_source_needs_uri():
    with pytest.raises(ValidationError, match="needs import_uri"):
        DistillCheckerboardConfig(source="import")


# --- presets -----------------------------------------------------------------------------------------

def test_student_preset_with_set_override():
    cfg = presets.load("student", "checkerboard", sets=["train.steps=7"])
    assert isinstance(cfg, StudentRunConfig)
    assert cfg.train.steps == 7
    assert cfg.preset == "checkerboard"
    assert cfg.model.hidden == 128 and cfg.train.lr == 0.003   # the rest comes from the YAML


def test_set_values_are_parsed_as_yaml():
    cfg = presets.load("student", "smoke", sets=["model.use_pred_loss=false", "train.lr=1e-4"])
    assert cfg.model.use_pred_loss is False
    assert cfg.train.lr == pytest.approx(1e-4)


def test_official_student_preset_matches_official_sizes():
    cfg = presets.load("student", "checkerboard-official")
    m = cfg.model
    assert (m.hidden, m.latent_dim, m.encoder_layers, m.decoder_layers, m.operator) == (256, 256, 5, 5, "linear")
    assert m.use_pred_loss is False


def test_distill_preset_merges_sub_presets():
    cfg = presets.load("distill", "smoke")
    assert isinstance(cfg, DistillCheckerboardConfig)
    assert cfg.teacher.model.hidden == 32 and cfg.teacher.preset == "smoke"
    assert cfg.student.model.latent_dim == 16 and cfg.student.preset == "smoke"
    assert len(cfg.pairs.seeds) == 2000 and len(cfg.pairs.heldout_seeds) == 400


def test_distill_defaults_are_the_checkerboard_presets():
    """A deployment run without parameters is the documented `checkerboard` demo."""
    defaults = DistillCheckerboardConfig()
    assert defaults.teacher == presets.load("teacher", "checkerboard")
    assert defaults.student == presets.load("student", "checkerboard")
    assert defaults == presets.load("distill", "checkerboard")


def test_unknown_preset_lists_available_ones():
    with pytest.raises(KDMError) as e:
        presets.load("student", "no-such-preset")
    msg = str(e.value)
    assert "unknown student preset 'no-such-preset'" in msg
    for name in presets.available("student"):
        assert name in msg
    assert {"smoke", "checkerboard"} <= set(presets.available("student"))


def test_invalid_set_is_a_kdm_error_naming_the_field():
    with pytest.raises(KDMError) as e:
        presets.load("student", "smoke", sets=["train.lr=-1"])
    assert "train.lr" in str(e.value) and "--set train.lr=-1" in str(e.value)
    with pytest.raises(KDMError, match="expected key=value"):
        presets.load("student", "smoke", sets=["train.steps"])


def test_preset_and_config_are_exclusive(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {steps: 3}\n")
    with pytest.raises(KDMError, match="either --preset or --config"):
        presets.load("student", "smoke", str(f))
    assert presets.load("student", config_file=str(f)).train.steps == 3
    with pytest.raises(KDMError, match="does not exist"):
        presets.load("student", config_file=str(tmp_path / "missing.yaml"))
