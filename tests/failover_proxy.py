"""A small TCP load balancer for tests, in front of several Prefect API servers: it listens on a free
127.0.0.1 port and hands each new client connection to the next backend in turn (round robin), skipping a
backend that refuses the connection (a dead server), and pipes the bytes both ways (HTTP, websockets).
When a backend dies, the client connections it held are closed, as a real load balancer's are.

It counts per backend the connections it opened, those open now and the refused attempts, so a test can
show which server carried what."""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass

from s3_server import free_port


@dataclass
class BackendStats:
    opened: int = 0
    active: int = 0
    refused: int = 0
    opened_since_mark: int = 0


class FailoverProxy:
    def __init__(self, backends: list[tuple[str, int]], connect_timeout: float = 5.0):
        self.backends = list(backends)
        self.stats = [BackendStats() for _ in self.backends]
        self.port = free_port()
        self.connect_timeout = connect_timeout
        self._next = itertools.cycle(range(len(self.backends)))
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="failover-proxy", daemon=True)
        self._server = None
        self._tasks: set = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FailoverProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        async def close():
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def mark(self) -> None:
        """Start counting ``opened_since_mark`` afresh (e.g. at the moment a backend is killed)."""
        with self._lock:
            for s in self.stats:
                s.opened_since_mark = 0

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [dict(opened=s.opened, active=s.active, refused=s.refused, opened_since_mark=s.opened_since_mark)
                    for s in self.stats]

    async def _connect(self):
        with self._lock:
            first = next(self._next)
        n = len(self.backends)
        for i in ((first + k) % n for k in range(n)):       # each backend once, from this connection's turn
            host, port = self.backends[i]
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
            except (OSError, asyncio.TimeoutError):
                with self._lock:
                    self.stats[i].refused += 1
                continue
            return i, reader, writer
        return None

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            picked = await self._connect()
            if picked is None:                       # every backend is down: the client sees a closed connection
                return
            i, reader, writer = picked
            with self._lock:
                st = self.stats[i]
                st.opened += 1
                st.opened_since_mark += 1
                st.active += 1
            try:
                pipes = [asyncio.ensure_future(self._pipe(client_reader, writer)),
                         asyncio.ensure_future(self._pipe(reader, client_writer))]
                # either side closing (or a backend dying) ends the pair: close both ends
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                for p in pipes:
                    p.cancel()
            finally:
                writer.close()
                with self._lock:
                    st.active -= 1
        finally:
            client_writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
