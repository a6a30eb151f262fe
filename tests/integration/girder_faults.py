"""A fault-injecting HTTP proxy in front of the real Girder, for integration tests.

The consumer under test is a subprocess (the real CLI, or OpenMSIStream's), so the only
place to make Girder misbehave is on the wire. :class:`FaultProxy` forwards every
request unchanged to the real Girder and answers from its :class:`Fault` rules instead
when one matches: "answer 503 to the first 2 ``POST item``", "answer 400 to every
``POST file`` named ``x.bin`` while armed", "drop the connection of the first
``POST file/chunk``". Rules are added, armed and disarmed while a test runs.

Requests are named by their route, as ``METHOD path`` below ``/api/v1/`` with ids
replaced by ``:id`` (``PUT item/:id/metadata``). A rule's ``name`` filter matches the
request's ``name`` parameter (query string or form body) or, for requests that carry
none, the name of the Girder document the request is about: the proxy learns the names
of documents (items, folders, files, uploads) from the JSON answers it forwards, so that
``PUT item/:id/metadata`` and ``POST file/chunk?uploadId=...`` can be matched by the
file's name too.

Every request is recorded (route, name, the status answered, whether it was injected),
so a test can also check what a consumer did *not* send.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["Fault", "FaultProxy", "Seen", "route_of"]

_ID = re.compile(r"/([0-9a-f]{24})(?=/|$)")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
        "upgrade", "content-length"}
#: Stands for "no HTTP answer at all": the proxy closes the client's connection.
DROP = None


def route_of(method: str, path: str) -> str:
    """``POST /api/v1/file/chunk?offset=0`` -> ``POST file/chunk``; ids become ``:id``."""
    route = _ID.sub("/:id", urlsplit(path).path).split("/api/v1/", 1)[-1]
    return f"{method} {route.strip('/')}"


@dataclass
class Fault:
    """One rule: answer ``status`` (``None``: drop the connection) to requests of
    ``route`` (and, if given, of that ``name``) while armed, ``times`` times (``None``:
    every one) -- then pass them through again."""

    route: str
    status: int | None
    times: int | None = None
    name: str | None = None
    armed: bool = True
    hits: int = 0

    def matches(self, route: str, name: str | None) -> bool:
        if not self.armed or route != self.route:
            return False
        if self.name is not None and name != self.name:
            return False
        return self.times is None or self.hits < self.times

    def disarm(self) -> None:
        self.armed = False

    def arm(self) -> None:
        self.armed = True


@dataclass(frozen=True)
class Seen:
    """One request the proxy handled, and what it answered."""

    route: str
    name: str | None
    status: int | None
    injected: bool
    at: float = field(default_factory=time.monotonic)


class FaultProxy:
    """``with FaultProxy(girder_api_url) as proxy:`` point the consumer at ``proxy.url``;
    add rules with :meth:`fail`; read :attr:`seen` or :meth:`count` afterwards."""

    def __init__(self, target_api_url: str) -> None:
        target = urlsplit(target_api_url)
        self.target_host = target.hostname
        self.target_port = target.port or 80
        self.api_path = target.path
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self._names: dict[str, str] = {}  # Girder id -> name, learnt from answers
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="girder-fault-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.api_path}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- rules -----------------------------------------------------------------------
    def fail(self, route: str, status: int | None, *, times: int | None = None,
             name: str | None = None) -> Fault:
        """Add an armed rule (see :class:`Fault`) and return it."""
        fault = Fault(route, status, times, name)
        with self._lock:
            self.faults.append(fault)
        return fault

    def disarm_all(self) -> None:
        with self._lock:
            for fault in self.faults:
                fault.disarm()

    def _take_fault(self, route: str, name: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(route, name):
                    fault.hits += 1
                    return fault
        return None

    # -- records ---------------------------------------------------------------------
    def count(self, route: str | None = None, name: str | None = None, *,
              injected: bool | None = None) -> int:
        """How many requests of ``route`` (any: None) named ``name`` (any: None) were
        handled; ``injected`` restricts to answers from a rule (True) or Girder (False)."""
        with self._lock:
            return sum(1 for s in self.seen
                       if (route is None or s.route == route)
                       and (name is None or s.name == name)
                       and (injected is None or s.injected == injected))

    def routes(self) -> list[str]:
        with self._lock:
            return [f"{s.route} [{s.name}] -> {s.status}{' (injected)' if s.injected else ''}"
                    for s in self.seen]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _name_of(self, path: str, body: bytes | None, content_type: str) -> str | None:
        """The request's ``name`` parameter, else the known name of the document its path
        or its ``uploadId`` names."""
        query = parse_qs(urlsplit(path).query)
        if "name" in query:
            return query["name"][0]
        if body and content_type.startswith("application/x-www-form-urlencoded"):
            form = parse_qs(body.decode("utf-8", "replace"))
            if "name" in form:
                return form["name"][0]
        with self._lock:
            for doc_id in _ID.findall(urlsplit(path).path):
                if doc_id in self._names:
                    return self._names[doc_id]
            upload = query.get("uploadId", [None])[0]
            return self._names.get(upload) if upload else None

    def _learn(self, data: bytes) -> None:
        """Remember ``_id -> name`` of the documents in a JSON answer (uploads included:
        their ``_id`` is the ``uploadId`` of the chunks that follow)."""
        try:
            answer = json.loads(data)
        except ValueError:
            return
        docs = answer if isinstance(answer, list) else [answer]
        with self._lock:
            for doc in docs:
                if isinstance(doc, dict) and isinstance(doc.get("_id"), str) \
                        and isinstance(doc.get("name"), str):
                    self._names[doc["_id"]] = doc["name"]

    # -- serving ---------------------------------------------------------------------
    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                route = route_of(self.command, self.path)
                name = proxy._name_of(self.path, body,
                                      self.headers.get("Content-Type") or "")
                fault = proxy._take_fault(route, name)
                if fault is not None:
                    proxy._record(Seen(route, name, fault.status, True))
                    self._answer_fault(fault.status)
                    return
                status, reason, headers, data = self._forward(body)
                proxy._record(Seen(route, name, status, False))
                proxy._learn(data)
                self.send_response(status, reason)
                for key, value in headers:
                    if key.lower() not in _HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _answer_fault(self, status: int | None) -> None:
                if status is DROP:  # a connection error for the client
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                data = json.dumps({"message": f"injected by the test proxy: HTTP {status}",
                                   "type": "rest"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self, body: bytes | None):
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Host"] = f"{proxy.target_host}:{proxy.target_port}"
                for attempt in (1, 2):  # a kept-alive upstream connection may have closed
                    if self.upstream is None:
                        self.upstream = http.client.HTTPConnection(
                            proxy.target_host, proxy.target_port, timeout=300)
                    try:
                        self.upstream.request(self.command, self.path, body=body,
                                              headers=headers)
                        response = self.upstream.getresponse()
                        return (response.status, response.reason, response.getheaders(),
                                response.read())
                    except (http.client.HTTPException, OSError):
                        self.upstream.close()
                        self.upstream = None
                        if attempt == 2:
                            raise
                raise AssertionError("unreachable")

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        return Handler

