"""Static checks of docker/ (no Docker engine needed): compose structure, secrets, Dockerfile hygiene, pins."""
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
PYPROJECT = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())
PINS = dict(re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", d).groups()
            for d in PYPROJECT["project"]["dependencies"])
WORKERS = {"worker-cpu": ("worker-cpu.Dockerfile", "kdm-cpu"), "worker-gpu": ("worker-gpu.Dockerfile", "kdm-gpu")}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|AUTH_STRING|_USER$", re.I)
SUBST = re.compile(r"\$\{[A-Z0-9_]+:\?[^}]*\}")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _env(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (DOCKER / name).read_text().splitlines() if not ln.lstrip().startswith("#")]
    out = []
    for ln in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if ln.strip():
            op, _, args = ln.strip().partition(" ")
            out.append((op.upper(), args.strip()))
    return out


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    return bool(tag) and tag != "latest" and not tag.startswith("$")


def test_images_pinned(compose):
    for name, svc in compose["services"].items():
        assert "image" in svc or "build" in svc, name
        if "image" in svc:
            assert _pinned(svc["image"]), f"{name}: image {svc['image']!r} is not pinned"
    assert _pinned("postgres:16.6") and not _pinned("postgres") and not _pinned("minio/minio:latest")
    assert not _pinned("localhost:5000/x")


def test_prefect_server_matches_pyproject(compose):
    srv = compose["services"]["prefect-server"]
    assert srv["image"].startswith(f"prefecthq/prefect:{PINS['prefect']}-python3.1")
    assert srv["command"][:3] == ["prefect", "server", "start"] and "0.0.0.0" in srv["command"]
    url = _env(srv)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect")
    assert any(str(p).startswith("4200:") for p in srv["ports"])
    assert srv["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_healthchecks_and_volumes(compose):
    s = compose["services"]
    for name in ("postgres", "minio", "prefect-server"):
        assert s[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ("postgres", "minio"):
        vols = [v.split(":")[0] for v in s[name]["volumes"]]
        assert any(v in compose["volumes"] for v in vols), f"{name} has no named volume"
    init = s["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "local/kdm-artifacts" in " ".join(init["command"])


def test_workers(compose):
    s = compose["services"]
    for name, (dockerfile, _) in WORKERS.items():
        w = s[name]
        assert w["build"]["dockerfile"] == f"docker/{dockerfile}"
        assert w["depends_on"]["prefect-server"]["condition"] == "service_healthy"
        assert w["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        env = _env(w)
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["KDM_ROOT"] == "s3://kdm-artifacts/kdm"
        assert w["image"].endswith(f":{PYPROJECT['project']['version']}")
    devices = s["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in s["worker-cpu"]
    # the dataset stage runs on the CPU worker: its data directory (named datasets) outlives the container
    data_dir = _env(s["worker-cpu"])["KDM_DATA_DIR"]
    assert f"kdm-data:{data_dir}" in s["worker-cpu"]["volumes"] and "kdm-data" in compose["volumes"]
    assert f"mkdir -p {data_dir} && chown kdm:kdm {data_dir}" in (DOCKER / "worker-cpu.Dockerfile").read_text()


def test_no_literal_secrets(compose):
    checked = 0
    for name, svc in compose["services"].items():
        for key, val in _env(svc).items():
            if SECRET_KEY.search(key):
                assert isinstance(val, str) and SUBST.fullmatch(val), f"{name}.{key} must be ${{VAR:?...}}"
                checked += 1
            elif isinstance(val, str) and "://" in val and "@" in val:   # credentials inside a URL
                userinfo = val.split("://", 1)[1].rsplit("@", 1)[0]
                assert SUBST.sub("", userinfo) == ":", f"{name}.{key} embeds literal credentials"
    assert checked >= 6
    example = (DOCKER / ".env.example").read_text()
    values = " ".join(str(v) for svc in compose["services"].values() for v in _env(svc).values())
    needed = set(re.findall(r"\$\{([A-Z0-9_]+):\?", values))
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "KDM_S3_SECRET_KEY", "PREFECT_AUTH_STRING"} <= needed
    assert needed <= set(re.findall(r"^([A-Z0-9_]+)=", example, re.M)), "every required var in .env.example"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


@pytest.mark.parametrize("service", sorted(WORKERS))
def test_worker_dockerfile(service):
    dockerfile, pool = WORKERS[service]
    ins = _instructions(dockerfile)
    froms = [a for op, a in ins if op == "FROM"]
    assert froms and all(_pinned(f.split()[0]) for f in froms), froms
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must end as a non-root USER"
    assert any(op == "RUN" and "10001" in a and "useradd" in a for op, a in ins)
    assert ("WORKDIR", "/opt/kdm") in ins
    assert any(op == "COPY" and "pyproject.toml" in a for op, a in ins)
    # Every pip install installs the copied project (whose pyproject pins everything), or exact pins.
    installs = [m for op, a in ins if op == "RUN" for m in re.findall(r"pip install ([^&;|]+)", a)]
    assert installs
    for args in installs:
        targets = [t for t in shlex.split(args) if not t.startswith("-")]
        assert targets and all(re.fullmatch(r"\.(\[[a-z,]+\])?", t) or "==" in t for t in targets), args
    assert any(re.fullmatch(r"\.\[.*metrics.*\]", t) for a in installs for t in shlex.split(a))
    entry = [a for op, a in ins if op == "ENTRYPOINT"][-1]
    assert json.loads(entry) == ["prefect", "worker", "start", "--pool", pool, "--type", "process"]
    text = (DOCKER / dockerfile).read_text()
    assert not re.search(r"\bpip install\b.*\b(torch|prefect)\b(?!==)", text)
    if service == "worker-gpu":
        assert froms[0].startswith("nvidia/cuda:") and "cudnn-runtime" in froms[0]
        assert "python3.12" in text or "python3.11" in text
    else:
        assert froms[0].startswith("python:3.11")
    ignore = [ln.strip() for ln in (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and "!pyproject.toml" in ignore   # allow-list: .venv/artifacts never sent


# ----------------------------------------------------------------------------- access (issue: authenticated API)

def test_prefect_api_requires_the_auth_string_and_csrf(compose):
    s = compose["services"]
    srv = _env(s["prefect-server"])
    auth = srv["PREFECT_SERVER_API_AUTH_STRING"]
    assert SUBST.fullmatch(auth) and auth.startswith("${PREFECT_AUTH_STRING:?")    # no default: refuses to start
    assert str(srv["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"]).lower() == "true"
    for name in WORKERS:
        env = _env(s[name])
        assert env["PREFECT_API_AUTH_STRING"] == auth, f"{name} must send the server's auth string"
        assert str(env.get("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "true")).lower() == "true"
    # the server healthcheck probes /api/health, which the auth middleware leaves open
    assert "/api/health" in " ".join(s["prefect-server"]["healthcheck"]["test"])
    example = (DOCKER / ".env.example").read_text()
    assert re.search(r"^PREFECT_AUTH_STRING=$", example, re.M), "no usable default in the example"
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "KDM_S3_SECRET_KEY"):
        assert re.search(rf"^{secret}=$", example, re.M), f"{secret} must be empty in .env.example"


def test_workers_only_use_their_allowed_roots(compose):
    from pipeline import access
    for name in WORKERS:
        env = _env(compose["services"][name])
        roots = access.allowed_roots({access.ENV: env["KDM_ALLOWED_ROOTS"]})
        assert roots and access.EVERYTHING not in roots and all(r.startswith("s3://kdm-artifacts") for r in roots)
        access.check_root_allowed(env["KDM_ROOT"], "KDM_ROOT", {access.ENV: env["KDM_ALLOWED_ROOTS"]})


def test_bucket_private_and_worker_key_limited_to_it(compose):
    init = compose["services"]["minio-init"]
    script = " ".join(init["command"])
    mount = next(v for v in init["volumes"] if "kdm-artifacts-rw.json" in v)
    host, target = mount.split(":")[:2]
    policy = json.loads((DOCKER / host).read_text())
    assert f"mc admin policy create local kdm-artifacts-rw {target}" in script
    assert "mc admin policy attach local kdm-artifacts-rw --user" in script
    assert "mc anonymous set none local/kdm-artifacts" in script
    assert "attach local readwrite" not in script and "policy detach local readwrite" in script
    resources, actions = set(), set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        resources |= set(st["Resource"])
        actions |= set(st["Action"])
    assert resources == {"arn:aws:s3:::kdm-artifacts", "arn:aws:s3:::kdm-artifacts/*"}
    assert all(a.startswith("s3:") and "*" not in a for a in actions)
    assert not {"s3:PutBucketPolicy", "s3:DeleteBucket", "s3:CreateBucket"} & actions
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
