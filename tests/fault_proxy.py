"""A fault-injecting HTTP proxy between s3fs and a loopback moto server, for the storage fault tests.

Every request is forwarded to moto unchanged unless a fault matches it. Faults are switched on per request
(method, and a substring of the object path) and for a number of requests (``times``; None: until removed):

  slowdown    answer 503 with an S3 ``SlowDown`` error body (moto never sees the request)
  error500    answer 500 with an S3 ``InternalError`` error body
  latency     wait ``seconds`` before forwarding
  reset       forward, send the status line, the headers and half of the body, then reset the connection
  truncate    a PUT: forward only the first half of its body (its checksum headers dropped, as a client that
              sends no payload checksum) and answer with moto's 200, so the store keeps a short object
  call        call ``fn()`` (e.g. SIGKILL the writing process), then answer 500 without forwarding

``moto_behind_proxy(bucket)`` starts both and points the standard AWS environment at the proxy.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Optional

from s3_server import moto_s3

ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              '<RequestId>fault</RequestId></Error>')
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Fault:
    action: str                       # slowdown | error500 | latency | reset | truncate
    method: Optional[str] = None      # e.g. "PUT"; None: any
    key: str = ""                     # a substring of the request's object path ("" matches every request)
    times: Optional[int] = 1          # how many matching requests it hits; None: every one until removed
    copy: Optional[bool] = None       # True: only server-side copies (x-amz-copy-source); False: no copies
    seconds: float = 0.0              # latency
    fn: Optional[Callable[[], None]] = None   # call
    hits: int = 0
    hit_paths: list = field(default_factory=list)

    def matches(self, method: str, path: str, copy: bool) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return ((self.method is None or self.method == method) and self.key in path
                and (self.copy is None or self.copy == copy))


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []     # (method, path) of every request, in arrival order
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, action: str, **kw) -> Fault:
        f = Fault(action, **kw)
        with self.lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take(self, method: str, path: str, copy: bool = False) -> Optional[Fault]:
        with self.lock:
            self.requests.append((method, path))
            for f in self.faults:
                if f.matches(method, path, copy):
                    f.hits += 1
                    f.hit_paths.append(path)
                    return f
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        fault = self._take(h.command, path, "x-amz-copy-source" in {k.lower() for k in h.headers.keys()})
        action = fault.action if fault else None
        if action == "call":
            fault.fn()
            action = "error500"
        if action in ("slowdown", "error500"):
            code, status, msg = (("SlowDown", 503, "Please reduce your request rate.") if action == "slowdown"
                                 else ("InternalError", 500, "We encountered an internal error. Please try again."))
            return self._reply(h, status, {"Content-Type": "application/xml"},
                               ERROR_BODY.format(code=code, message=msg).encode())
        if action == "latency":
            time.sleep(fault.seconds)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP}
        if action == "truncate" and h.command == "PUT" and body:
            body = body[:len(body) // 2]
            headers = {k: v for k, v in headers.items()
                       if not k.lower().startswith(("x-amz-checksum", "content-md5", "x-amz-sdk-checksum"))}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in HOP}
        finally:
            conn.close()
        if action == "reset" and len(data) > 1:
            out["Content-Length"] = str(len(data))
            h.send_response(resp.status)
            for k, v in out.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        self._reply(h, resp.status, out, data, head=h.command == "HEAD")

    @staticmethod
    def _reply(h, status: int, headers: dict, data: bytes, head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            if k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(data))) if head else str(len(data)))
        h.end_headers()
        if not head:
            h.wfile.write(data)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def moto_behind_proxy(bucket: str) -> Iterator[tuple]:
    """Yields (s3fs file system through the proxy, the proxy): a fresh moto server holding ``bucket``, the
    proxy in front of it, and AWS_ENDPOINT_URL pointing at the proxy (restored afterwards)."""
    import s3fs
    with moto_s3(bucket) as _direct:
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        host, port = urllib.parse.urlsplit(endpoint).hostname, urllib.parse.urlsplit(endpoint).port
        with FaultProxy((host, port)) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            s3fs.S3FileSystem.clear_instance_cache()
            try:
                from pipeline.storage import artifacts
                fs, _ = artifacts.url_to_fs(f"s3://{bucket}")
                yield fs, proxy
            finally:
                from s3_server import close_async_clients
                close_async_clients(s3fs.S3FileSystem)
                s3fs.S3FileSystem.clear_instance_cache()
                os.environ["AWS_ENDPOINT_URL"] = endpoint

