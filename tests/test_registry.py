"""Teacher registry, the kdm.teacher.registered event, the redistill flow and the prefect.yaml triggers.

Teacher artifacts here are manifests over a few random bytes of "weights" (the registry hashes files,
it never loads networks); the edm-pkl case imports a tiny EDM-format pickle. The distillation is a
stand-in: a flow/deployment named ``distill-cifar10-standin-*`` on the Prefect test server, the config
model ``StandinConfig`` and the planner ``standin_plan`` below (a student 'exists' when its marker file does).
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import yaml
from pydantic import BaseModel

from pipeline.storage import artifacts
from pipeline.teachers import registry
from pipeline.cli import main
from pipeline.errors import KDMError
from storage_schemas import (CheckerboardSpec, EDMNetConfig, FlowMatchingMLPConfig, TeacherManifest,
                             recipe_version, utc_now)
from storage_schemas.kdm_image import SongUNetConfig
from storage_schemas.registry import RegisteredTeacher, record_path

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = SongUNetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())


def kdm_teacher(path: Path, seed: int = 0, label_dim: int = 0, resolution: int = 32,
                flow_matching: bool = False) -> Path:
    """A committed kdm teacher artifact whose weights file is ``seed``-dependent random bytes."""
    weights = np.random.default_rng(seed).bytes(512)
    if flow_matching:
        model, kind, extra = FlowMatchingMLPConfig(hidden=8, layers=1), "flow-matching-mlp", {"data": CheckerboardSpec()}
    else:
        model, kind, extra = EDMNetConfig(img_resolution=resolution, label_dim=label_dim, unet=TINY_UNET), "edm", {}
    m = TeacherManifest(id=f"{kind}-test{seed}", kind=kind, model=model, weights_sha256=artifacts.sha256_bytes(weights),
                        origin=f"test fixture {seed}", code_version="test", created=utc_now(), **extra)
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(weights)
    (path / "config.json").write_text(model.model_dump_json())
    (path / "manifest.json").write_text(m.model_dump_json())
    return path


# ------------------------------------------------------------------ stand-in distillation (planner, config)

class StandinConfig(BaseModel):
    preset: Literal["full", "mini", "smoke"]
    conditional: bool = False
    root: str
    teacher_uri: Optional[str] = None
    steps: int = 1


def standin_student(cfg: StandinConfig) -> Path:
    return Path(cfg.root) / "students" / f"{Path(cfg.teacher_uri).name}-{cfg.preset}"


def standin_plan(cfg: StandinConfig) -> dict:
    out = standin_student(cfg)
    return {"teacher": {"uri": cfg.teacher_uri, "version": "t", "exists": True},
            "student": {"uri": str(out), "version": out.name, "exists": (out / "manifest.json").exists()}}


def finish(cfg: StandinConfig) -> None:
    out = standin_student(cfg)
    out.mkdir(parents=True)
    (out / "manifest.json").write_text("{}")


# ------------------------------------------------------------------ registration

def test_register_kdm_teacher_writes_one_record_and_reregistering_is_a_noop(tmp_path):
    t = kdm_teacher(tmp_path / "teachers" / "a")
    root = tmp_path / "root"
    reg = registry.register_teacher(str(root), str(t))
    r = reg.record
    assert reg.created is True
    assert r.kind == "kdm" and r.model_kind == "edm" and r.sha256_of == "weights"
    assert r.sha256 == artifacts.sha256_file(str(t / "weights.safetensors"))
    assert r.id == registry.registry_id("kdm", r.sha256) and r.id.startswith("kdm-")
    assert r.uri == r.teacher_uri == str(t.resolve()) and r.teacher_id == "edm-test0"
    assert (r.img_resolution, r.img_channels, r.label_dim, r.conditional) == (32, 3, 0, False)
    path = root / "registry" / "teachers" / f"{r.id}.json"
    assert record_path(str(root.resolve()), r.id) == str(path)
    assert RegisteredTeacher.model_validate_json(path.read_text()) == r
    before = path.read_bytes()

    again = registry.register_teacher(str(root), str(t), kind="kdm", sha256=r.sha256.upper())
    assert again.created is False and again.record == r
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary files left
    assert registry.list_teachers(str(root)) == [r]


def test_register_refuses_what_it_cannot_verify(tmp_path):
    root = str(tmp_path / "root")
    t = kdm_teacher(tmp_path / "t")
    sha = artifacts.sha256_file(str(t / "weights.safetensors"))
    with pytest.raises(KDMError, match=f"sha256 mismatch for .*you pinned {'0' * 64}, but its weights "
                                       f"\\(weights.safetensors\\) have sha256 {sha}"):
        registry.register_teacher(root, str(t), sha256="0" * 64)
    with pytest.raises(KDMError, match="is not a sha256 digest"):
        registry.register_teacher(root, str(t), sha256="abc")
    with pytest.raises(KDMError, match="does not exist"):
        registry.register_teacher(root, str(tmp_path / "missing"))
    with pytest.raises(KDMError, match="is a edm teacher.*--kind kdm"):
        registry.register_teacher(root, str(t), kind="flow-matching")
    with pytest.raises(KDMError, match="unknown teacher kind 'onnx'"):
        registry.register_teacher(root, str(t), kind="onnx")
    fm = kdm_teacher(tmp_path / "fm", seed=1, flow_matching=True)
    with pytest.raises(KDMError, match="flow-matching-mlp teacher.*--kind flow-matching"):
        registry.register_teacher(root, str(fm), kind="kdm")
    assert registry.register_teacher(root, str(fm)).record.kind == "flow-matching"   # detected
    (t / "weights.safetensors").write_bytes(b"tampered")
    with pytest.raises(KDMError, match="does not match its manifest .*corrupt or were modified"):
        registry.register_teacher(root, str(t))
    not_a_teacher = tmp_path / "plain"
    not_a_teacher.mkdir()
    with pytest.raises(KDMError, match="cannot tell what .* pass --kind"):
        registry.register_teacher(root, str(not_a_teacher))
    with pytest.raises(KDMError, match="is not a kdm teacher artifact"):
        registry.register_teacher(root, str(not_a_teacher), kind="kdm")
    assert [r.kind for r in registry.list_teachers(root)] == ["flow-matching"]


@pytest.fixture(scope="module")
def edm_pickle(tmp_path_factory):
    from edm_persistence import make_pickles, write_fake_edm
    code = write_fake_edm(tmp_path_factory.mktemp("edm-code"))
    out = tmp_path_factory.mktemp("pkl") / "edm-tiny-cond.pkl"
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=3, use_fp16=False, model_type="SongUNet",
                  model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    return make_pickles(code, [(out, kwargs, "EDMPrecond")])[0]


def test_edm_pickle_needs_its_sha256_pinned_and_is_imported_once(edm_pickle, tmp_path):
    root = tmp_path / "root"
    sha = artifacts.sha256_file(str(edm_pickle))
    with pytest.raises(KDMError, match=f"needs its sha256 pinned \\(--sha256 HEX\\).*its sha256 is {sha}"):
        registry.register_teacher(str(root), str(edm_pickle))
    with pytest.raises(KDMError, match=f"sha256 mismatch .*you pinned {'1' * 64}, the file has {sha}"):
        registry.register_teacher(str(root), str(edm_pickle), kind="edm-pkl", sha256="1" * 64)
    assert not (root / "teachers").exists()        # nothing parsed before the pin matched

    reg = registry.register_teacher(str(root), str(edm_pickle), sha256=sha)
    r = reg.record
    assert reg.created and r.kind == "edm-pkl" and r.sha256 == sha and r.sha256_of == "pickle"
    from pipeline.teachers.edm_pickle import edm_teacher_id
    assert r.teacher_uri == str(root.resolve() / "teachers" / edm_teacher_id(sha, "ema"))
    m = TeacherManifest.model_validate_json((Path(r.teacher_uri) / "manifest.json").read_text())
    assert m.source.sha256 == sha and r.teacher_id == m.id
    assert (r.model_kind, r.img_resolution, r.label_dim, r.conditional) == ("edm", 8, 3, True)
    again = registry.register_teacher(str(root), str(edm_pickle), sha256=sha)
    assert again.created is False and again.record == r


def test_register_at_s3_urls(tmp_path):
    from s3_server import moto_s3
    local = kdm_teacher(tmp_path / "t", seed=5)
    with moto_s3("kdm-registry") as fs:
        fs.put(str(local), "kdm-registry/teachers/t", recursive=True)
        root, uri = "s3://kdm-registry/kdm", "s3://kdm-registry/teachers/t"
        with pytest.raises(KDMError, match="s3://kdm-registry/teachers/missing does not exist"):
            registry.register_teacher(root, "s3://kdm-registry/teachers/missing")
        reg = registry.register_teacher(root, uri)
        r = reg.record
        assert reg.created and r.uri == r.teacher_uri == uri
        assert r.sha256 == artifacts.sha256_file(str(local / "weights.safetensors"))
        stored = fs.cat(f"kdm-registry/kdm/registry/teachers/{r.id}.json")
        assert RegisteredTeacher.model_validate_json(stored) == r
        again = registry.register_teacher(root, uri + "/")
        assert again.created is False and again.record == r
        assert fs.cat(f"kdm-registry/kdm/registry/teachers/{r.id}.json") == stored
        assert registry.list_teachers(root) == [r]
        fs.pipe("kdm-registry/teachers/t/weights.safetensors", b"tampered")
        fs.rm(f"kdm-registry/kdm/registry/teachers/{r.id}.json")
        with pytest.raises(KDMError, match="does not match its manifest"):
            registry.register_teacher(root, uri)


# ------------------------------------------------------------------ pending

def test_pending_teachers_are_cifar10_shaped_registrations_without_a_finished_student(tmp_path):
    root = str(tmp_path / "root")
    a = registry.register_teacher(root, str(kdm_teacher(tmp_path / "a", 0))).record
    b = registry.register_teacher(root, str(kdm_teacher(tmp_path / "b", 1))).record
    c = registry.register_teacher(root, str(kdm_teacher(tmp_path / "c", 2, label_dim=10))).record
    registry.register_teacher(root, str(kdm_teacher(tmp_path / "d", 3, resolution=64)))
    registry.register_teacher(root, str(kdm_teacher(tmp_path / "e", 4, flow_matching=True)))
    assert len(registry.list_teachers(root)) == 5

    def pending(**kw):
        return registry.pending_teachers(root, "smoke", config_model=StandinConfig, planner=standin_plan, **kw)

    assert {p.record.id for p in pending()} == {a.id, b.id, c.id}     # 64 px and 2-D teachers are not CIFAR-10
    first = {p.record.id: p for p in pending(base_config={"steps": 7, "preset": "full"})}
    cfg = first[c.id].config
    assert (cfg.preset, cfg.steps, cfg.conditional, cfg.teacher_uri) == ("smoke", 7, True, c.teacher_uri)
    assert cfg.root == str(Path(root).resolve()) and first[a.id].missing == ("student",)
    finish(first[b.id].config)
    assert {p.record.id for p in pending()} == {a.id, c.id}
    assert [p.record.id for p in registry.pending_teachers(root, "mini", config_model=StandinConfig,
                                                           planner=standin_plan, select=None)
            ] == [r.id for r in registry.list_teachers(root)]           # another preset: nothing finished
    with pytest.raises(KDMError, match="(?s)distillation config of teacher .*preset: Input should be"):
        registry.pending_teachers(root, "huge", config_model=StandinConfig, planner=standin_plan)
    with pytest.raises(KDMError, match="plan is not of the form"):
        registry.pending_teachers(root, "smoke", config_model=StandinConfig, planner=lambda cfg: {"student": 1})


def test_pending_with_the_image_pipeline_planner_and_a_broken_registration(tmp_path):
    from storage_schemas.distill_image import DistillImageConfig
    root = str(tmp_path / "root")
    archive = tmp_path / "cifar10.tar.gz"
    archive.write_bytes(b"not read by the plan, only hashed")
    good = registry.register_teacher(root, str(kdm_teacher(tmp_path / "a", label_dim=10))).record
    broken = registry.register_teacher(root, str(kdm_teacher(tmp_path / "b", 1))).record
    (Path(broken.teacher_uri) / "manifest.json").unlink()
    base = {"dataset": {"archive": str(archive)}}
    with pytest.raises(KDMError, match=f"teacher {broken.teacher_uri} is not a readable teacher artifact"):
        registry.pending_teachers(root, "mini", base_config=base)
    errors = []
    [p] = registry.pending_teachers(root, "mini", base_config=base, on_error=lambda r, e: errors.append((r.id, str(e))))
    assert isinstance(p.config, DistillImageConfig) and p.record == good
    assert (p.config.preset, p.config.conditional, p.config.teacher_uri) == ("mini", True, good.teacher_uri)
    assert p.config.dataset.archive == str(archive)
    assert "student" in p.missing and "teacher" not in p.missing     # the registered teacher is given
    assert [e[0] for e in errors] == [broken.id] and "not a readable teacher artifact" in errors[0][1]


# ------------------------------------------------------------------ CLI (no Prefect API configured)

def test_cli_register_and_list_without_a_prefect_api(tmp_path, capsys, edm_pickle):
    t = kdm_teacher(tmp_path / "t")
    root = str(tmp_path / "root")
    assert main(["teacher", "register", str(t), "--root", root]) == 0
    out = capsys.readouterr().out
    rec = registry.list_teachers(root)[0]
    assert f"registered teacher {rec.id} (kdm: edm 3x32x32, unconditional)" in out
    assert "event kdm.teacher.registered not emitted: no Prefect API configured (set PREFECT_API_URL" in out
    assert main(["teacher", "register", str(t), "--root", root]) == 0
    assert "nothing changed; event kdm.teacher.registered not emitted (already registered" in capsys.readouterr().out
    assert main(["teacher", "register", str(edm_pickle), "--root", root, "--no-event"]) == 1
    assert "needs its sha256 pinned" in capsys.readouterr().err
    assert main(["teacher", "list", "--root", root]) == 0
    out = capsys.readouterr().out
    assert f"{rec.id}  kdm" in out and "1 registered teacher(s)" in out
    assert main(["teacher", "list", "--root", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.rsplit("\n1 registered", 1)[0])
    assert [RegisteredTeacher.model_validate(x) for x in listed] == [rec]


def test_cli_register_fails_loudly_when_the_configured_api_is_unreachable(tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from s3_server import free_port
    t = kdm_teacher(tmp_path / "t", seed=7)
    root = str(tmp_path / "root")
    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        assert main(["teacher", "register", str(t), "--root", root]) == 1
    out, err = capsys.readouterr()
    rec = registry.list_teachers(root)[0]
    assert f"registered teacher {rec.id}" in out                       # recorded all the same
    assert f"event kdm.teacher.registered not emitted: the Prefect API at {url} is not reachable" in err
    assert "the scheduled redistill deployment will pick it up, or run this command again with --emit-again" in err


# ------------------------------------------------------------------ against a Prefect server

@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A Prefect server configured as docker/compose.yaml's (PostgreSQL, auth string, CSRF protection) that
    this process's Prefect client uses: the events, automations and runs below take the production path."""
    from prefect_server import production_harness
    with production_harness(tmp_path_factory.mktemp("prefect-registry")) as srv:
        yield srv


def _read_events(resource_id: str, timeout: float = 30.0) -> list:
    """Events of ``resource_id`` on the server (the server persists events in batches: poll)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    flt = EventFilter(event=EventNameFilter(name=["kdm.teacher.registered"]),
                      resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=flt, limit=50).events   # the server caps limit at 50
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_registering_emits_the_event_to_the_configured_api(harness, tmp_path, capsys):
    t = kdm_teacher(tmp_path / "t", seed=11, label_dim=10)
    root = tmp_path / "root"
    assert main(["teacher", "register", str(t), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    rec = registry.list_teachers(str(root))[0]
    assert f"event kdm.teacher.registered emitted to " in out and f"resource kdm.teacher.{rec.id}" in out
    [ev] = _read_events(f"kdm.teacher.{rec.id}")
    assert ev.event == "kdm.teacher.registered"
    assert ev.resource["kdm.teacher.conditional"] == "true" and ev.resource["kdm.teacher.resolution"] == "32"
    assert ev.payload["uri"] == rec.uri and ev.payload["kind"] == "kdm" and ev.payload["sha256"] == rec.sha256
    assert ev.payload["root"] == str(root.resolve()) and ev.payload["teacher_uri"] == rec.teacher_uri

    assert main(["teacher", "register", str(t), "--root", str(root), "--no-event"]) == 0
    assert "not emitted (--no-event)" in capsys.readouterr().out
    t2 = kdm_teacher(tmp_path / "t2", seed=12)
    assert main(["teacher", "register", str(t2), "--root", str(root), "--no-event"]) == 0
    assert "not emitted (--no-event)" in capsys.readouterr().out
    rec2 = next(r for r in registry.list_teachers(str(root)) if r.uri == str(t2.resolve()))
    assert _read_events(f"kdm.teacher.{rec2.id}", timeout=3.0) == []


@pytest.fixture
def standin_deployments(harness):
    """Deployments '<flow>/uncond' and '<flow>/cond' of a stand-in distillation flow (no worker: runs stay
    scheduled), with a default config parameter like prefect.yaml's."""
    from prefect.client.orchestration import get_client
    flow_name = f"distill-cifar10-standin-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow_name)
        for name, cond in (("uncond", False), ("cond", True)):
            client.create_deployment(flow_id=flow_id, name=name,
                                     parameters={"config": {"conditional": cond, "steps": 7}, "preset": "full"})
    return flow_name


def _flow_runs(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def test_redistill_starts_one_run_per_pending_teacher_and_a_second_tick_starts_nothing(standin_deployments,
                                                                                      tmp_path):
    from flows.redistill import idempotency_key, redistill
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    flow_name = standin_deployments
    root = str(tmp_path / "root")
    a = registry.register_teacher(root, str(kdm_teacher(tmp_path / "a", 21))).record
    b = registry.register_teacher(root, str(kdm_teacher(tmp_path / "b", 22))).record
    c = registry.register_teacher(root, str(kdm_teacher(tmp_path / "c", 23, label_dim=10))).record
    registry.register_teacher(root, str(kdm_teacher(tmp_path / "fm", 24, flow_matching=True)))
    finish(registry.distill_config(b, str(Path(root).resolve()), "smoke", StandinConfig))
    kw = dict(root=root, preset="smoke", deployment=f"{flow_name}/uncond",
              conditional_deployment=f"{flow_name}/cond", planner="test_registry:standin_plan",
              config_model="test_registry:StandinConfig")

    first = redistill(**kw)
    assert {(r["teacher"], r["deployment"], r["status"]) for r in first} == {
        (a.id, f"{flow_name}/uncond", "started"), (c.id, f"{flow_name}/cond", "started")}
    runs = {r.idempotency_key: r for r in _flow_runs(flow_name)}
    assert set(runs) == {idempotency_key(a.id, "smoke"), idempotency_key(c.id, "smoke")}
    assert idempotency_key(a.id, "smoke") == f"{a.id}-{recipe_version()}-smoke"
    run_c = runs[idempotency_key(c.id, "smoke")]
    assert run_c.parameters == {"config": {"preset": "smoke", "conditional": True, "steps": 7, "root": str(
        Path(root).resolve()), "teacher_uri": c.teacher_uri}, "preset": "smoke"}   # top-level agrees with config

    second = redistill(**kw)
    assert sorted((r["teacher"], r["status"], r["flow_run_id"]) for r in second) == sorted(
        (r["teacher"], "already started", r["flow_run_id"]) for r in first)
    assert len(_flow_runs(flow_name)) == 2

    # Prefect itself: the same idempotency key gives back the same flow run.
    again = run_deployment(f"{flow_name}/uncond", parameters={"config": {"preset": "smoke"}}, timeout=0,
                           idempotency_key=idempotency_key(a.id, "smoke"), as_subflow=False)
    assert again.id == runs[idempotency_key(a.id, "smoke")].id

    # A run for a teacher started elsewhere (e.g. by the registration trigger) is left alone.
    d = registry.register_teacher(root, str(kdm_teacher(tmp_path / "d", 25))).record
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"{flow_name}/uncond")
        other = client.create_flow_run_from_deployment(
            dep.id, parameters={"config": {"preset": "full", "teacher_uri": d.teacher_uri}})
    third = {r["teacher"]: r for r in redistill(**kw)}
    assert third[d.id]["status"] == "in flight (other run)" and third[d.id]["flow_run"] == other.name
    assert len(_flow_runs(flow_name)) == 3        # a's, c's and the one started elsewhere

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["redistill"])))
    rows = [json.loads(t.data) if isinstance(t.data, str) else t.data for t in tables if t.type == "table"]
    assert any({r["teacher"] for r in tab} == {a.id, c.id} and {r["status"] for r in tab} == {"started"}
               for tab in rows)


def test_the_yaml_trigger_starts_the_deployment_with_the_registered_teacher(standin_deployments, tmp_path, capsys):
    """End to end on the test server: prefect.yaml's trigger as an automation of the stand-in deployment,
    `kdm teacher register` emits the event, the server starts a run with the templated parameters."""
    from prefect.cli.deploy._triggers import DeploymentTriggerAdapter
    from prefect.client.orchestration import get_client
    flow_name = standin_deployments
    spec = json.loads(json.dumps(_prefect_yaml()["definitions"]["triggers"]["teacher_registered_uncond"]))
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(f"{flow_name}/uncond")
        trig = DeploymentTriggerAdapter.validate_python(spec)
        trig.set_deployment_id(dep.id)
        client.create_automation(trig.as_automation())
    root = tmp_path / "root"
    cond = kdm_teacher(tmp_path / "cond", 41, label_dim=10)
    uncond = kdm_teacher(tmp_path / "uncond", 42)
    for t in (cond, uncond):
        assert main(["teacher", "register", str(t), "--root", str(root)]) == 0
        assert "event kdm.teacher.registered emitted to" in capsys.readouterr().out
    rec = next(r for r in registry.list_teachers(str(root)) if r.uri == str(uncond.resolve()))
    deadline = time.monotonic() + 60
    while not _flow_runs(flow_name) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.0)
    [run] = _flow_runs(flow_name)             # the conditional teacher's event does not match this trigger
    assert run.parameters == {"config": {"conditional": False, "steps": 7}, "preset": "full",
                              "teacher_uri": rec.teacher_uri, "root": str(root.resolve())}


def test_redistill_names_a_missing_deployment(harness, tmp_path):
    from flows.redistill import redistill
    root = str(tmp_path / "root")
    registry.register_teacher(root, str(kdm_teacher(tmp_path / "a", 31)))
    with pytest.raises(ValueError, match="deployment 'no-such/flow' does not exist on the Prefect server"):
        redistill(root=root, preset="smoke", deployment="no-such/flow", conditional_deployment=None,
                  planner="test_registry:standin_plan", config_model="test_registry:StandinConfig")


# ------------------------------------------------------------------ prefect.yaml

def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _registration_event(rec_fields: dict):
    from prefect.server.events.schemas.events import ReceivedEvent
    from pipeline.teachers.events import event_fields
    rec = RegisteredTeacher(**{
        "id": "kdm-0123456789abcdef", "uri": "/data/t", "kind": "kdm", "sha256": "a" * 64, "sha256_of": "weights",
        "teacher_uri": "/data/t", "teacher_id": "edm-x", "model_kind": "edm", "img_resolution": 32,
        "img_channels": 3, "source": "test", "registered_at": utc_now(), "code_version": "test", **rec_fields})
    f = event_fields(rec, "/data/root")
    return rec, ReceivedEvent(id=uuid.uuid4(), event=f["event"], resource=f["resource"], payload=f["payload"],
                              occurred=utc_now())


def test_prefect_yaml_triggers_parse_match_registrations_and_template_the_teacher(tmp_path):
    from prefect.cli.deploy._triggers import DeploymentTriggerAdapter
    from prefect.events import DeploymentEventTrigger
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.automations import Automation
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate
    doc = _prefect_yaml()
    specs = dict(doc["definitions"]["triggers"])
    for dep in doc["deployments"]:                       # entries that carry a trigger: validated too
        for i, spec in enumerate(dep.get("triggers") or []):
            specs[f"{dep['name']}[{i}]"] = spec
    seen = set()
    for where, spec in specs.items():
        trig = DeploymentTriggerAdapter.validate_python(json.loads(json.dumps(spec)))
        assert isinstance(trig, DeploymentEventTrigger), where
        assert trig.expect == {"kdm.teacher.registered"}, where          # prefect.yaml's only triggers
        trig.set_deployment_id(uuid.uuid4())
        server_trigger = Automation.model_validate(trig.as_automation().model_dump(mode="json")).trigger
        params = trig.parameters
        cond = {"true": True, "false": False}[trig.match.root["kdm.teacher.conditional"]]
        seen.add(cond)
        for label_dim, fires in ((10, cond), (0, not cond)):
            rec, ev = _registration_event({"label_dim": label_dim})
            assert server_trigger.covers(ev) is fires, (where, label_dim)
        _, ev64 = _registration_event({"img_resolution": 64, "label_dim": 10 if cond else 0})
        assert server_trigger.covers(ev64) is False
        rec, ev = _registration_event({"label_dim": 10 if cond else 0})
        rendered = json.loads(json.dumps(params))
        RunDeployment._upgrade_v1_templates(rendered)
        rendered = hydrate(rendered, HydrationContext(render_jinja=True, jinja_context={"event": ev},
                                                      raise_on_error=True))
        assert rendered == {"teacher_uri": rec.teacher_uri, "root": "/data/root"}
        from pipeline.recipes import build_config
        # Prefect merges the trigger's parameters onto the deployment's (here: preset mini, conditional).
        cfg = build_config(None, **{"recipe": "cifar10", "preset": "mini", "conditional": cond, **rendered})
        assert (cfg.teacher_uri, cfg.root, cfg.conditional, cfg.preset) == (rec.teacher_uri, "/data/root", cond, "mini")
    assert seen == {False, True}
    by_name = {d["name"]: d for d in doc["deployments"]}
    for name, cond in (("distill-cifar10", False), ("distill-cifar10-cond", True)):
        assert name in by_name, f"prefect.yaml has no deployment {name!r}"
        assert by_name[name]["entrypoint"] == "flows/kdm.py:kdm" and by_name[name]["parameters"]["recipe"] == "cifar10"
        [t] = [t for t in by_name[name].get("triggers") or [] if "kdm.teacher.registered" in t["expect"]]
        assert t["match"]["kdm.teacher.conditional"] == str(cond).lower(), name
        assert (by_name[name].get("parameters") or {}).get("conditional", False) is cond, name


def test_prefect_yaml_redistill_deployment_is_scheduled_on_the_cpu_pool():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint
    doc = _prefect_yaml()
    PrefectYamlModel.model_validate(doc)
    [dep] = [d for d in doc["deployments"] if d["name"] == "redistill"]
    assert dep["work_pool"]["name"] == "kdm-cpu"
    [sched] = dep["schedules"]
    assert sched["active"] is True
    CronSchedule(cron=sched["cron"], timezone=sched["timezone"])
    flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
    assert flow.name == "redistill" and set(dep["parameters"]) <= set(flow.parameters.properties)
