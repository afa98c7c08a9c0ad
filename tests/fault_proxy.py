"""A small threaded TCP proxy that injects network faults between a client and a server.

``tcp_proxy(host, port)`` listens on a free loopback port and forwards every
connection to ``host:port`` with a thread per direction. Controls:

- ``drop()`` closes every open connection now, both sides (the client sees
  its connection reset or closed, the server sees its client vanish);
- ``refuse(True)`` closes new connections as soon as they are accepted,
  ``refuse(False)`` lets them through again;
- ``stall(True)`` stops forwarding bytes (connections stay open, bytes wait),
  ``stall(False)`` resumes;
- counters: ``accepted``, ``refused``, ``dropped``, ``held`` (chunks that had
  to wait for a stall to end), ``active`` (connections open now).

The proxy never interprets what it forwards.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

_CHUNK = 65536
_TICK = 0.05  # how often blocked threads look at the closing flags (not a sleep: a wait bound)


def _reset(sock: socket.socket, *, abrupt: bool = True) -> None:
    """Close a socket, waking blocked readers; ``abrupt`` sends RST like a dead peer."""
    if abrupt:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    """One proxied connection: the client's socket and ours to the upstream server."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def close(self, *, abrupt: bool) -> bool:
        """Close both sides once; True for the call that actually closed them."""
        with self._lock:
            if self.closed.is_set():
                return False
            self.closed.set()
        _reset(self.client, abrupt=abrupt)
        _reset(self.upstream, abrupt=abrupt)
        return True


class FaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(_TICK)
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        self.accepted = 0
        self.refused = 0
        self.dropped = 0
        self.held = 0
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="proxy-accept", daemon=True
        )
        self._acceptor.start()

    # ------------------------------------------------------------ controls

    def drop(self) -> int:
        """Close every open connection now (both sides); return how many were closed."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        closed = sum(1 for pair in pairs if pair.close(abrupt=True))
        with self._lock:
            self.dropped += closed
        return closed

    def refuse(self, refusing: bool) -> None:
        """Close new connections at once (True) or forward them again (False)."""
        with self._lock:
            self._refusing = refusing

    def stall(self, stalled: bool) -> None:
        """Stop forwarding bytes (True), connections staying open; resume (False)."""
        if stalled:
            self._flowing.clear()
        else:
            self._flowing.set()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closing.set()
        self._flowing.set()
        self._acceptor.join(timeout=5)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop()
        for thread in list(self._threads):
            thread.join(timeout=5)

    # ------------------------------------------------------------ plumbing

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                refusing = self._refusing
                if refusing:
                    self.refused += 1
                else:
                    self.accepted += 1
            if refusing:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self._threads = [t for t in self._threads if t.is_alive()]
                for source, sink in ((client, upstream), (upstream, client)):
                    thread = threading.Thread(
                        target=self._pump, args=(pair, source, sink), daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not pair.closed.is_set():
                data = source.recv(_CHUNK)
                if not data:
                    break
                if not self._flowing.is_set():
                    with self._lock:
                        self.held += 1
                while not self._flowing.wait(_TICK):  # stalled: hold the bytes
                    if pair.closed.is_set():
                        return
                if pair.closed.is_set():
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # One side ended or failed: the connection is over for both (a FIN, not a fault).
            with self._lock:
                self._pairs.discard(pair)
            pair.close(abrupt=False)


@contextlib.contextmanager
def tcp_proxy(host: str, port: int) -> Iterator[FaultProxy]:
    """A fault-injecting proxy on a free loopback port in front of ``host:port``."""
    proxy = FaultProxy(host, port)
    try:
        yield proxy
    finally:
        proxy.close()
