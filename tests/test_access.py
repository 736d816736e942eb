"""pipeline.access: the worker's allowed artifact roots, and triggered runs verified against the registry."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
from pydantic import BaseModel

from pipeline import access
from pipeline.errors import KDMError
from pipeline.storage import artifacts
from pipeline.teachers import registry
from storage_schemas.registry import record_path
from test_registry import edm_pickle, kdm_teacher  # noqa: F401  (edm_pickle is a fixture)


def env(value: Optional[str] = None, **extra) -> dict:
    out = dict(extra)
    if value is not None:
        out[access.ENV] = value
    return out


@pytest.fixture(autouse=True)
def _no_worker_settings(monkeypatch):
    monkeypatch.delenv(access.ENV, raising=False)
    monkeypatch.delenv(access.AUTH_ENV, raising=False)
    monkeypatch.setattr(access, "_warned", False)


# ----------------------------------------------------------------------------- normalising

def test_local_paths_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = str((tmp_path / "real").resolve())
    assert access.normalize_location("real") == real
    assert access.normalize_location("real/../real/") == real
    assert access.normalize_location("link/x") == real + "/x"
    assert access.normalize_location(f"file://{tmp_path}/link") == real
    assert access.normalize_location(f"local://{tmp_path}/link") == real      # fsspec's other local protocol
    monkeypatch.setenv("HOME", str(tmp_path))
    assert access.normalize_location("~/real") == real


def test_urls_are_normalised_or_refused():
    n = access.normalize_location
    assert n("S3://kdm-artifacts/kdm/") == "s3://kdm-artifacts/kdm"
    assert n("gs://b/x//") == "gs://b/x"
    for bad, why in [("s3://b/kdm/../other", r"'\.' or '\.\.' segment"), ("s3://b/./x", "segment"),
                     ("s3://b/kdm/%2e%2e/other", "segment"), ("s3://b/kdm/%2E%2E%2Fother", "segment"),
                     ("s3://b/kdm\\..\\x", "backslash"), ("simplecache::s3://b/kdm", "chained"),
                     ("s3://b/kdm/x::file:///etc", "chained"), ("data:text/plain,hi", "data: URL"),
                     ("", "empty"), ("   ", "empty"), ("s3://", "no bucket"), ("1x://b", "no valid URL scheme")]:
        with pytest.raises(KDMError, match=why):
            n(bad, "root")


# ----------------------------------------------------------------------------- KDM_ALLOWED_ROOTS

def test_allowed_roots_parsing(tmp_path):
    assert access.allowed_roots({}) is None
    assert access.allowed_roots(env("")) == [] and access.allowed_roots(env(" , ")) == []
    assert access.allowed_roots(env("*")) == ["*"] and access.allowed_roots(env("/x, *")) == ["*"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert access.allowed_roots(env(f"s3://kdm-artifacts/, {a},\n{b}")) == ["s3://kdm-artifacts", str(a), str(b)]
    assert access.allowed_roots(env(f"{a}{os.pathsep}{b}")) == [str(a), str(b)]
    assert access.allowed_roots(env(f"s3://x/kdm,{a}{os.pathsep}{b}")) == ["s3://x/kdm", str(a), str(b)]
    with pytest.raises(KDMError, match="KDM_ALLOWED_ROOTS entry .*separate several locations with commas"):
        access.allowed_roots(env(f"{a}{os.pathsep}s3://x"))
    with pytest.raises(KDMError, match="KDM_ALLOWED_ROOTS entry .*segment"):
        access.allowed_roots(env("s3://x/../y"))


def test_local_roots(tmp_path, monkeypatch):
    root = tmp_path / "data" / "kdm"
    (root / "teachers").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret")
    e = env(f"{root},/nonexistent/other")
    check = access.check_root_allowed
    check(str(root), "root", e)
    check(str(root) + "/", "root", e)
    check(str(root / "teachers" / "t"), "teacher_uri", e)
    check(f"file://{root}/new/dir", "root", e)
    check("/nonexistent/other/x", "root", e)
    monkeypatch.chdir(root)
    check("teachers", "root", e)                                  # relative: to the current directory
    for bad in [str(tmp_path / "data" / "kdm2"),                   # sibling sharing the prefix
                str(tmp_path / "data"),                            # the parent
                str(root / ".." / "kdm2"), f"{root}/teachers/../../kdm2",   # '..' escapes
                str(root / "escape"), str(root / "escape" / "x"),  # a symlink inside pointing outside
                f"local://{tmp_path}/secret", "/etc/passwd", "..", "s3://kdm/x"]:
        with pytest.raises(KDMError, match=r"root .* is outside the artifact roots this worker may use "
                                           r"\(KDM_ALLOWED_ROOTS: .*\); .*add it to KDM_ALLOWED_ROOTS"):
            check(bad, "root", e)
    with pytest.raises(KDMError, match="resolves to " + str(tmp_path / "secret")):
        check(str(root / "escape"), "root", e)


def test_url_roots_match_on_slash_boundaries():
    e = env("s3://kdm-artifacts/kdm, gs://other")
    check = access.check_root_allowed
    for ok in ["s3://kdm-artifacts/kdm", "s3://kdm-artifacts/kdm/", "s3://kdm-artifacts/kdm/teachers/t",
               "S3://kdm-artifacts/kdm/x", "gs://other/anything"]:
        check(ok, "root", e)
    for bad in ["s3://kdm-artifacts/kdm2", "s3://kdm-artifacts/kdm-evil/x", "s3://kdm-artifacts",
                "s3://kdm-artifacts/other", "s3://evil/kdm", "s3a://kdm-artifacts/kdm/x",
                "gs://other-bucket/x", "gs://other@evil/x", "http://kdm-artifacts/kdm/x", "/tmp/kdm"]:
        with pytest.raises(KDMError, match="is outside the artifact roots"):
            check(bad, "teacher_uri", e)
    for bad in ["s3://kdm-artifacts/kdm/../other", "s3://kdm-artifacts/kdm/%2e%2e/other",
                "s3://kdm-artifacts/kdm/x::s3://evil/y"]:
        with pytest.raises(KDMError, match="segment|chained"):
            check(bad, "teacher_uri", e)


def test_unset_set_empty_and_everything(tmp_path, caplog):
    check = access.check_root_allowed
    with caplog.at_level(logging.WARNING, logger="kdm.access"):
        check(str(tmp_path), "root", {})                          # development machine: allowed, warned once
        check("s3://anything/x", "root", {})
    warnings = [r for r in caplog.records if r.name == "kdm.access"]
    assert len(warnings) == 1 and "KDM_ALLOWED_ROOTS is not set" in warnings[0].getMessage()
    with pytest.raises(KDMError, match="KDM_ALLOWED_ROOTS is not set on this worker, which talks to an "
                                       "authenticated Prefect API .*refusing to use root s3://anything/x"):
        check("s3://anything/x", "root", {access.AUTH_ENV: "admin:pw"})
    check("s3://anything/x", "root", env("*", **{access.AUTH_ENV: "admin:pw"}))
    with pytest.raises(KDMError, match=r"KDM_ALLOWED_ROOTS: none \(it is set but empty\)"):
        check(str(tmp_path), "root", env(""))
    with pytest.raises(KDMError, match="chained"):              # malformed locations fail even when unrestricted
        check("simplecache::/etc", "root", {})


def test_the_process_environment_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv(access.ENV, str(tmp_path / "ok"))
    access.check_root_allowed(str(tmp_path / "ok" / "x"), "root")
    with pytest.raises(KDMError, match="outside"):
        access.check_root_allowed(str(tmp_path / "no"), "root")


class _Dataset(BaseModel):
    archive: str
    chunk_size: int = 4


class _Config(BaseModel):
    root: str
    teacher_uri: Optional[str] = None
    dataset: _Dataset
    note: str = "../../etc"            # not a location field: ignored
    inputs: list[dict] = []


def test_every_location_field_of_a_config_is_checked(tmp_path):
    ok = tmp_path / "ok"
    cfg = _Config(root=str(ok / "root"), teacher_uri=str(ok / "t"), dataset=_Dataset(archive=str(ok / "a.tar")),
                  inputs=[{"pairs_uri": str(ok / "p")}])
    assert access.location_fields(cfg) == {"root": str(ok / "root"), "teacher_uri": str(ok / "t"),
                                           "dataset.archive": str(ok / "a.tar"), "inputs.0.pairs_uri": str(ok / "p")}
    assert access.check_locations_allowed(cfg, env(str(ok)))["root"] == str(ok / "root")
    access.check_locations_allowed(cfg.model_copy(update={"teacher_uri": None}), env(str(ok)))
    for update, name in [({"dataset": _Dataset(archive="/etc/shadow")}, "dataset.archive"),
                         ({"teacher_uri": "s3://evil/t"}, "teacher_uri"), ({"root": str(tmp_path)}, "root"),
                         ({"inputs": [{"pairs_uri": str(ok / ".." / "x")}]}, "inputs.0.pairs_uri")]:
        with pytest.raises(KDMError, match=f"^{name} .* is outside"):
            access.check_locations_allowed(cfg.model_copy(update=update), env(str(ok)))
    with pytest.raises(KDMError, match="^root .* is outside"):
        access.check_locations_allowed({"root": "/elsewhere", "steps": 3}, env(str(ok)))


def test_the_image_distillation_config_fields_are_found():
    from storage_schemas.distill_image import DistillImageConfig
    fields = access.location_fields(DistillImageConfig(teacher_uri="/t", dataset={"archive": "/a.tar"}))
    assert {"root", "teacher_uri", "dataset.archive"} <= set(fields)
    # the dataset by name (the default) has no location: it is the worker's own KDM_DATA_DIR
    assert "dataset.archive" not in access.location_fields(DistillImageConfig())


# ----------------------------------------------------------------------------- triggered runs

@pytest.fixture
def registered(tmp_path):
    """A kdm teacher registered under root/; returns (root, record)."""
    root = tmp_path / "root"
    t = kdm_teacher(root / "teachers" / "uncond", seed=7)
    return root, registry.register_teacher(str(root), str(t)).record


def test_a_registered_teacher_is_verified(registered, tmp_path):
    root, rec = registered
    e = env(str(tmp_path))
    assert access.verify_trigger_teacher(str(root), rec.teacher_uri, environ=e) == rec
    assert access.verify_trigger_teacher(f"{root}/", rec.teacher_uri + "/", expected_root=str(root),
                                         sha256=rec.sha256.upper(), teacher_id=rec.teacher_id, environ=e) == rec
    assert access.verify_trigger_teacher(f"file://{root}", rec.teacher_uri, environ={}) == rec


def test_a_forged_event_distills_nothing(registered, tmp_path):
    root, rec = registered
    e = env(str(tmp_path))
    verify = access.verify_trigger_teacher
    # an unregistered teacher (a valid artifact the registry does not know)
    other = kdm_teacher(root / "teachers" / "unregistered", seed=8)
    with pytest.raises(KDMError, match=rf"teacher_uri {other} is not registered under root {root} .*the registry is "
                                       rf"the truth: nothing is distilled; register it with `kdm teacher register"):
        verify(str(root), str(other), environ=e)
    # a copy of the registered teacher at another path: same bytes, not the registered URI
    copy = root / "teachers" / "copy"
    shutil.copytree(rec.teacher_uri, copy)
    with pytest.raises(KDMError, match=f"does not match its registration {rec.id}.*the record names teacher_uri "
                                       f"{rec.teacher_uri}, not {copy}"):
        verify(str(root), str(copy), environ=e)
    # a foreign root: registered there by the attacker, but not the deployment's root
    foreign = tmp_path / "foreign"
    registry.register_teacher(str(foreign), str(other))
    assert verify(str(foreign), str(other), environ=e).teacher_uri == str(other)
    with pytest.raises(KDMError, match=f"root {foreign} is not this deployment's artifact root {root}"):
        verify(str(foreign), str(other), expected_root=str(root), environ=e)
    # a root or teacher outside the worker's allowed roots fails before anything is read
    with pytest.raises(KDMError, match="^root /nonexistent/evil is outside"):
        verify("/nonexistent/evil", rec.teacher_uri, environ=e)
    with pytest.raises(KDMError, match="^teacher_uri s3://evil/t is outside"):
        verify(str(root), "s3://evil/t", environ=e)
    with pytest.raises(KDMError, match="outside"):
        verify(str(root), rec.teacher_uri, environ=env(str(tmp_path / "elsewhere")))
    # payload fields that disagree with the record
    with pytest.raises(KDMError, match="the event's sha256 0+ is not the record's"):
        verify(str(root), rec.teacher_uri, sha256="0" * 64, environ=e)
    with pytest.raises(KDMError, match="the event's teacher_id x is not the record's"):
        verify(str(root), rec.teacher_uri, teacher_id="x", environ=e)
    # no teacher at all, or nothing there
    with pytest.raises(KDMError, match="needs teacher_uri"):
        verify(str(root), None, environ=e)
    with pytest.raises(KDMError, match="is not a readable kdm teacher artifact"):
        verify(str(root), str(root / "teachers" / "missing"), environ=e)


def test_a_teacher_modified_after_registration_is_refused(registered, tmp_path):
    root, rec = registered
    w = Path(rec.teacher_uri) / "weights.safetensors"
    w.write_bytes(b"tampered" + w.read_bytes()[8:])
    with pytest.raises(KDMError, match="does not match its manifest .*modified after registration"):
        access.verify_trigger_teacher(str(root), rec.teacher_uri, environ=env(str(tmp_path)))
    # weights and manifest both replaced consistently: then it is a different teacher, not registered
    m = (Path(rec.teacher_uri) / "manifest.json")
    m.write_text(m.read_text().replace(rec.sha256, artifacts.sha256_file(str(w))))
    with pytest.raises(KDMError, match="is not registered under root"):
        access.verify_trigger_teacher(str(root), rec.teacher_uri, environ=env(str(tmp_path)))


def test_a_tampered_record_is_refused(registered, tmp_path):
    root, rec = registered
    path = Path(record_path(str(root), rec.id))
    path.chmod(0o644)
    path.write_text(path.read_text().replace(rec.teacher_id, "edm-other"))
    with pytest.raises(KDMError, match="the record's teacher_id is edm-other, the artifact's manifest id"):
        access.verify_trigger_teacher(str(root), rec.teacher_uri, environ={})
    path.write_text("{not json")
    with pytest.raises(KDMError, match="is unreadable"):
        access.verify_trigger_teacher(str(root), rec.teacher_uri, environ={})


def test_an_imported_edm_pickle_and_a_flow_matching_teacher_verify(edm_pickle, tmp_path):  # noqa: F811
    root = tmp_path / "root"
    rec = registry.register_teacher(str(root), str(edm_pickle), sha256=artifacts.sha256_file(str(edm_pickle))).record
    assert rec.kind == "edm-pkl"
    assert access.verify_trigger_teacher(str(root), rec.teacher_uri, sha256=rec.sha256, environ={}) == rec
    fm = registry.register_teacher(str(root), str(kdm_teacher(tmp_path / "fm", 3, flow_matching=True))).record
    assert access.verify_trigger_teacher(str(root), fm.teacher_uri, environ={}) == fm


def test_verify_at_s3_urls(tmp_path):
    from s3_server import moto_s3
    local = kdm_teacher(tmp_path / "t", seed=9)
    with moto_s3("kdm-access") as fs:
        fs.put(str(local), "kdm-access/kdm/teachers/t", recursive=True)
        fs.put(str(local), "kdm-access/kdm/teachers/u", recursive=True)
        root, uri = "s3://kdm-access/kdm", "s3://kdm-access/kdm/teachers/t"
        rec = registry.register_teacher(root, uri).record
        e = env("s3://kdm-access/kdm")
        assert access.verify_trigger_teacher(root, uri, expected_root=root + "/", environ=e) == rec
        with pytest.raises(KDMError, match="the record names teacher_uri"):
            access.verify_trigger_teacher(root, "s3://kdm-access/kdm/teachers/u", environ=e)
        with pytest.raises(KDMError, match="outside"):
            access.verify_trigger_teacher("s3://kdm-access/kdm2", uri, environ=e)


# ----------------------------------------------------------------------------- inside a flow

def test_triggered_by_automation():
    auto = SimpleNamespace(created_by=SimpleNamespace(type="AUTOMATION", id="x"), idempotency_key=None)
    assert access.triggered_by_automation(auto)
    assert access.triggered_by_automation(SimpleNamespace(created_by=None,
                                                          idempotency_key="automation 1, action 0, invocation 2"))
    assert not access.triggered_by_automation(SimpleNamespace(created_by=None, idempotency_key="edm-1-v3-full"))
    assert not access.triggered_by_automation(SimpleNamespace(created_by=SimpleNamespace(type="USER"),
                                                              idempotency_key=None))
    assert access.triggered_by_automation() is False           # outside a flow run


def test_deployment_root():
    assert access.deployment_root("artifacts", {}) == "artifacts"
    assert access.deployment_root("artifacts", {"config": {"root": "s3://b/kdm"}}) == "s3://b/kdm"
    assert access.deployment_root("artifacts", {"root": "/r", "config": {"root": "/c"}}) == "/r"
    assert access.deployment_root("artifacts") == "artifacts"    # outside a deployment run


def test_guard_run(registered, tmp_path):
    root, rec = registered
    e = env(str(tmp_path))
    logged: list[str] = []
    cfg = {"root": str(root), "teacher_uri": rec.teacher_uri, "dataset": {"archive": str(tmp_path / "a.tar")}}
    assert access.guard_run(cfg, triggered=False, environ=e, log=logged.append) is None
    assert access.guard_run(cfg, default_root=str(root), triggered=True, environ=e, log=logged.append) == rec
    assert access.guard_run(cfg, default_root="root", resolve=lambda p: str(tmp_path / p), triggered=True,
                            environ=e) == rec
    assert not logged
    forged = dict(cfg, teacher_uri=str(kdm_teacher(root / "teachers" / "forged", seed=11)))
    with pytest.raises(KDMError, match="is not registered"):
        access.guard_run(forged, default_root=str(root), triggered=True, environ=e, log=logged.append)
    assert access.guard_run(forged, triggered=False, environ=e) is None   # a user's own run: only the roots
    with pytest.raises(KDMError, match="not this deployment's artifact root"):
        access.guard_run(cfg, default_root=str(tmp_path / "other"), triggered=True, environ=e, log=logged.append)
    with pytest.raises(KDMError, match="^dataset.archive /etc/x is outside"):
        access.guard_run(dict(cfg, dataset={"archive": "/etc/x"}), triggered=False, environ=e, log=logged.append)
    assert len(logged) == 3 and all(m.startswith("refused before any work: ") for m in logged)


def test_redistill_refuses_a_root_outside_the_allowed_roots(harness, tmp_path, monkeypatch):
    from flows.redistill import redistill
    root = tmp_path / "root"
    registry.register_teacher(str(root), str(kdm_teacher(tmp_path / "t", seed=5)))
    monkeypatch.setenv(access.ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(KDMError, match=f"^root {root} is outside the artifact roots"):
        redistill(root=str(root), deployment="no/such-deployment", conditional_deployment=None)
