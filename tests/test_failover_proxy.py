"""The test load balancer (tests/failover_proxy.py) on its own: round robin over live backends, every new
connection served while one backend is down (even many at once), and a dead backend's connections closed."""
from __future__ import annotations

import socket
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor

from failover_proxy import FailoverProxy


class Named(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    conns: list

    def kill(self) -> None:
        """As a killed process: the port refuses and every open connection is cut."""
        self.shutdown()
        self.server_close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def backend(name: bytes) -> Named:
    """A server that answers each line with its name and the line, until the client closes."""
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            server.conns.append(self.connection)
            for line in self.rfile:
                self.wfile.write(name + b":" + line)
    server = Named(("127.0.0.1", 0), Handler)
    server.conns = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def ask(port: int, line: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line)
        return s.makefile("rb").readline()


def test_round_robin_and_failover_when_a_backend_dies():
    a, b = backend(b"a"), backend(b"b")
    with FailoverProxy([a.server_address, b.server_address]) as proxy:
        assert sorted(ask(proxy.port) for _ in range(4)) == [b"a:ping\n"] * 2 + [b"b:ping\n"] * 2
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)      # goes to a (its turn)
        held.sendall(b"x\n")
        assert held.makefile("rb").readline() == b"a:x\n"
        assert proxy.snapshot()[0]["active"] == 1

        a.kill()
        assert held.makefile("rb").readline() == b""          # the connection through the proxy is closed too
        proxy.mark()
        with ThreadPoolExecutor(16) as pool:      # many new connections at once: every one reaches b
            answers = list(pool.map(lambda i: ask(proxy.port, b"%d\n" % i), range(40)))
        assert answers == [b"b:%d\n" % i for i in range(40)]
        after = proxy.snapshot()
        assert after[0]["opened_since_mark"] == 0 and after[1]["opened_since_mark"] == 40
        assert after[0]["refused"] >= 20          # a was its turn for half of them
        held.close()
    b.kill()
