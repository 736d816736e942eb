"""A moto S3 server on 127.0.0.1 for tests; the standard AWS environment variables point s3fs at it."""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator, Optional

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_async_clients(cls) -> None:
    """Close the clients of the asynchronous instances Zarr created (the synchronous ones close on gc)."""
    from zarr.core.sync import sync
    for fs in list(cls._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if fs.asynchronous and creator is not None:
            sync(creator.__aexit__(None, None, None))
            fs._s3 = fs._s3creator = None


@contextlib.contextmanager
def moto_s3(bucket: str, secret: Optional[str] = None) -> Iterator:
    """Yields the s3fs file system of a fresh loopback server holding ``bucket``; the environment (and
    ``AWS_SECRET_ACCESS_KEY`` = ``secret`` when given) is restored afterwards."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from pipeline.storage import artifacts
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(ENV, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    if secret is not None:
        env["AWS_SECRET_ACCESS_KEY"] = secret
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
    os.environ.update(env)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(k, None)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs, _ = artifacts.url_to_fs(f"s3://{bucket}")
        fs.mkdir(bucket)
        yield fs
    finally:
        close_async_clients(s3fs.S3FileSystem)
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def listing(s3, bucket: str, prefix: str) -> dict:
    """Every object under ``bucket/prefix`` with its details, bypassing s3fs's listing cache."""
    s3.invalidate_cache()
    return s3.find(f"{bucket}/{prefix}", detail=True)


def committed_files(s3, bucket: str, root: str, results: dict, kinds: dict[str, str]):
    """Check that each stage of ``results`` (stage -> {"uri", "skipped", ...}) committed a fresh artifact
    under ``root/<kind>/`` and that no ``.partial`` object is left; returns (the object paths relative to
    ``root``, rel(stage, name) -> the path of a file of that stage's artifact)."""
    for stage, kind in kinds.items():
        assert results[stage]["uri"].startswith(f"{root}/{kind}/"), stage
        assert results[stage]["skipped"] is False, stage
    prefix = root.removeprefix(f"s3://{bucket}/")
    files = {p.removeprefix(f"{bucket}/{prefix}/") for p in listing(s3, bucket, prefix)}
    assert not any(".partial" in p for p in files), sorted(p for p in files if ".partial" in p)
    return files, lambda stage, name: f"{results[stage]['uri'].removeprefix(root + '/')}/{name}"


@contextlib.contextmanager
def object_writes(bucket: str) -> Iterator[list[str]]:
    """Yields the list that receives, in the order the (in-process) moto server stored them, the keys of
    every object written to ``bucket``: a PUT, the end of a multipart upload or a server-side copy."""
    import threading

    from moto.s3.models import S3Backend
    keys: list[str] = []
    lock = threading.Lock()
    real = S3Backend.put_object

    def put_object(self, bucket_name, key_name, *args, **kwargs):
        key = real(self, bucket_name, key_name, *args, **kwargs)
        if bucket_name == bucket:
            with lock:
                keys.append(key_name)
        return key

    S3Backend.put_object = put_object
    try:
        yield keys
    finally:
        S3Backend.put_object = real


def commit_order(keys: list[str], prefix: str) -> list[str]:
    """The keys written under ``prefix/`` (the committed artifact, not its ``.partial``), relative to it,
    in write order."""
    p = prefix.rstrip("/") + "/"
    return [k[len(p):] for k in keys if k.startswith(p)]
