"""A real TCP proxy that a test puts between a `pacs` process and a shared server (PostgreSQL, Redis)
to take that server away from it, and give it back, without touching the server other tests use.

``cut()`` closes the listening socket and every open connection (the stack sees connections reset and
then refused, as when the server's host goes down); ``restore()`` listens again on the same port.
Plain threads: two pump threads per connection, one accept thread per listening period.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from tests.support.net import free_port, port_open, wait_until


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; :meth:`cut` and :meth:`restore` as often as needed."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.cuts = 0  # how many times it was cut (for the drills' report)

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def url_host_port(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def start(self) -> FaultProxy:
        self.restore()
        return self

    def restore(self) -> None:
        """Listen again (same port); new connections reach the target."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name=f"fault-proxy-{self.port}",
                         daemon=True).start()
        wait_until(lambda: port_open(self.port), timeout=10, what=f"fault proxy on port {self.port}")

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until :meth:`restore`."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            if listener is not None:
                self.cuts += 1
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        for conn in conns:
            _reset(conn)

    def stop(self) -> None:
        self.cut()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while we were connecting
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns.update((client, upstream))
            open_directions = [2]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, open_directions), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, open_directions: list[int]) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            open_directions[0] -= 1
            over = open_directions[0] == 0  # the other direction ended too
            if over:
                self._conns.difference_update((src, dst))
        if over:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), so the peer sees a reset at once; the shutdown wakes our own pump
    thread blocked in ``recv`` on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
