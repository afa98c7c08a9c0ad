"""An HTTP proxy between the service and the moto server: records requests, injects faults.

The service reaches AWS through boto3 with ``AWS_ENDPOINT_URL_<SERVICE>``
pointing here; every request is recorded (method, path, headers, body) and
forwarded to moto unchanged, unless a fault rule answers it first. That is how
tests see what the service really sent (the ExternalId of an AssumeRole) and
how they make S3 answer 500/503/SlowDown for a share of requests, without
patching boto3.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def form(self) -> dict[str, str]:
        """The query-protocol parameters (STS, IAM, SQS query): Action, RoleArn, ExternalId…"""
        parsed = parse_qs(self.body.decode("utf-8", "replace")) if self.body else {}
        parsed.update(parse_qs(urlsplit(self.path).query))
        return {name: values[0] for name, values in parsed.items()}

    @property
    def action(self) -> str | None:
        return self.form.get("Action")


@dataclass(frozen=True)
class Fault:
    """What a rule answers instead of forwarding: an HTTP status and an AWS error body."""

    status: int
    code: str
    message: str = "injected by the test proxy"

    def body(self) -> bytes:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><ErrorResponse><Error><Type>Sender</Type>'
            f"<Code>{self.code}</Code><Message>{self.message}</Message></Error>"
            f"<RequestId>proxy</RequestId></ErrorResponse>"
        ).encode()


Rule = Callable[[Recorded], Fault | None]


@dataclass
class AwsProxy:
    """A running proxy; ``url`` goes into ``AWS_ENDPOINT_URL*``."""

    upstream: str
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: Recorded) -> Fault | None:
        with self.lock:
            self.requests.append(request)
            for rule in self.rules:
                fault = rule(request)
                if fault is not None:
                    return fault
        return None

    def actions(self, name: str) -> list[Recorded]:
        """Recorded requests of one query-protocol action (``AssumeRole``)."""
        with self.lock:
            return [r for r in self.requests if r.action == name]


def _handler(proxy: AwsProxy) -> type[BaseHTTPRequestHandler]:
    upstream = urlsplit(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:  # quiet
            return

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items()}
            fault = proxy.record(Recorded(self.command, self.path, headers, body))
            if fault is not None:
                payload = fault.body()
                self.send_response(fault.status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            try:
                forwarded = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=forwarded)
                answer = conn.getresponse()
                payload = answer.read()
                self.send_response(answer.status)
                head = self.command == "HEAD"  # HEAD keeps the object's Content-Length
                dropped = HOP_HEADERS if head else HOP_HEADERS | {"content-length"}
                for name, value in answer.getheaders():
                    if name.lower() not in dropped:
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _relay

    return Handler


@contextmanager
def aws_proxy(upstream: str) -> Iterator[AwsProxy]:
    """Run a proxy to ``upstream`` on a free loopback port for the block."""
    proxy = AwsProxy(upstream)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="aws-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
