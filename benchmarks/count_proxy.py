"""A counting (and optionally delaying) HTTP proxy in front of Girder: Girder requests
per file, and a remote Girder on the local stack.

The consumers are black boxes (OpenMSIStream's in particular), so the only way to
count the requests each one sends is to put something between it and Girder. The
proxy forwards every request unchanged to Girder over one keep-alive connection per
client connection and counts it by method and route (ids replaced by ``:id``).

With ``delay`` (seconds) it holds every request that long before forwarding it, as a
network round trip to a distant Girder would (requests on different connections wait
side by side, as they would on a real link): scenario 7 of ``make bench``. Without it,
it still adds some latency of its own (a fraction of a millisecond per request on an
idle machine), so the counting pass of scenario 1 is untimed; the timed runs there
talk to Girder directly.

Both of its sockets (the client's and the one to Girder) have ``TCP_NODELAY`` set and
every answer leaves in one write: with Nagle's algorithm on, a response sent as
headers then body waits for the peer's delayed ACK (up to 40 ms on Linux), a stall a
real link between ``TCP_NODELAY`` endpoints (urllib3, cheroot) does not have, and one
that would weigh on clients by how their requests happen to be written.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["CountingProxy"]

_ID = re.compile(r"/[0-9a-f]{24}(?=/|$)")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade"}


def route_of(method: str, path: str) -> str:
    """``POST /api/v1/file/chunk?...`` -> ``POST file/chunk``; ids become ``:id``."""
    route = _ID.sub("/:id", urlsplit(path).path)
    route = route.split("/api/v1/", 1)[-1]
    return f"{method} {route}"


class _UpstreamConnection(http.client.HTTPConnection):
    """The connection to Girder, with ``TCP_NODELAY`` on its socket (Nagle's algorithm
    off: small writes leave at once)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class CountingProxy:
    """``with CountingProxy(girder_api_url) as proxy:`` point clients at ``proxy.url``;
    ``proxy.counts`` holds ``{"METHOD route": n}`` and ``proxy.total`` the sum,
    ``proxy.statuses`` the answers by HTTP status, ``proxy.max_in_flight`` the most
    requests it held at once and ``proxy.latencies`` each request's seconds in it.
    ``delay``: seconds every request waits before it is forwarded (0: none);
    ``fail_every``: every n-th request is answered 503 without reaching Girder (0: none),
    a failing Girder."""

    def __init__(self, target_api_url: str, delay: float = 0.0, fail_every: int = 0) -> None:
        self.delay = delay
        self.fail_every = fail_every
        self._seen = 0
        target = urlsplit(target_api_url)
        self.target_host = target.hostname
        self.target_port = target.port or 80
        self.api_path = target.path
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.latencies: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="girder-count-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.api_path}"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.statuses.clear()
            self.latencies.clear()
            self.max_in_flight = self.in_flight

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _count(self, method: str, path: str) -> bool:
        """Count the request; True if it is to be refused (``fail_every``)."""
        with self._lock:
            self.counts[route_of(method, path)] += 1
            self._seen += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return bool(self.fail_every) and self._seen % self.fail_every == 0

    def _done(self, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.statuses[status] += 1
            self.latencies.append(seconds)

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # TCP_NODELAY on the client's socket
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Host"] = f"{proxy.target_host}:{proxy.target_port}"
                started = time.monotonic()
                if proxy._count(self.command, self.path):
                    if proxy.delay > 0:
                        time.sleep(proxy.delay)
                    self._refuse()
                    proxy._done(503, time.monotonic() - started)
                    return
                try:
                    response, data = self._upstream(body, headers)
                except BaseException:
                    proxy._done(0, time.monotonic() - started)  # 0: no answer
                    raise
                self._answer(response, data)
                proxy._done(response.status, time.monotonic() - started)

            def _upstream(self, body: bytes | None, headers: dict[str, str]
                          ) -> tuple[http.client.HTTPResponse, bytes]:
                """Wait ``delay``, then Girder's answer (a second try on a new connection
                if the kept-alive one was closed)."""
                if proxy.delay > 0:
                    time.sleep(proxy.delay)
                for attempt in (1, 2):
                    if self.upstream is None:
                        self.upstream = _UpstreamConnection(
                            proxy.target_host, proxy.target_port, timeout=600)
                    try:
                        self.upstream.request(self.command, self.path, body=body,
                                              headers=headers)
                        response = self.upstream.getresponse()
                        return response, response.read()
                    except (http.client.HTTPException, OSError):
                        self.upstream.close()
                        self.upstream = None
                        if attempt == 2:
                            raise
                raise AssertionError("unreachable")  # the loop returns or raises

            def _refuse(self) -> None:
                body = b'{"message": "refused by the proxy (fail_every)", "type": "rest"}'
                self.wfile.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                self.wfile.flush()

            def _answer(self, response: http.client.HTTPResponse, data: bytes) -> None:
                """Status line, headers and body in one write (see the module's text)."""
                lines = [f"HTTP/1.1 {response.status} {response.reason}"]
                lines += [f"{key}: {value}" for key, value in response.getheaders()
                          if key.lower() not in _HOP and key.lower() != "content-length"]
                lines.append(f"Content-Length: {len(data)}")
                head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                self.wfile.write(head + (data if self.command != "HEAD" else b""))
                self.wfile.flush()
                self.log_request(response.status, len(data))

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        return Handler
