"""The stack's MongoDB-wire-protocol server: FerretDB 1.24 on its SQLite backend.

No MongoDB binary can be installed here, so Girder talks to FerretDB, which
speaks the MongoDB wire protocol and keeps its data in SQLite files under
``.stack/ferretdb/data/``. It listens on 127.0.0.1:37017 (``GUS_MONGO_PORT``).

FerretDB is built from the Go module proxy, but not with
``go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2``: the module
ships without the generated ``build/version/version.txt``, so that binary
panics at start-up ("Invalid build/version/version.txt file content"). Its
version check only runs when FerretDB's own module is the main module, so we
build a few lines of our own Go ``main`` around FerretDB's embeddable package
(``github.com/FerretDB/FerretDB/ferretdb``) instead.

Known FerretDB 1.24 gaps that matter to Girder (worked around in ``girder.py``):
``$group``'s ``$first`` accumulator, ``noCursorTimeout: true`` on ``find``,
text indexes and ``$text`` queries, TTL indexes (``expireAfterSeconds``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

from . import common
from .common import HOST, STACK_DIR, ComponentError

__all__ = ["NAME", "FERRETDB_VERSION", "install", "start", "stop", "status", "env",
           "port", "uri", "ping"]

NAME = "mongo"
FERRETDB_VERSION = "v1.24.2"
DEFAULT_PORT = 37017
START_TIMEOUT = 30.0

BINARY = STACK_DIR / "bin" / "gus-ferretdb"

# Our own Go wrapper around FerretDB's embeddable package, committed with its go.sum
# (stack/ferretdb/), so the build is pinned and reproducible from the module proxy.
SOURCE_DIR = Path(__file__).resolve().parent / "ferretdb"


def port() -> int:
    """The port of the running server, else the one it will use (GUS_MONGO_PORT)."""
    if common.read_pid(NAME) is not None:
        try:
            return int(_port_file().read_text())
        except (FileNotFoundError, ValueError):
            pass
    return int(os.environ.get("GUS_MONGO_PORT", DEFAULT_PORT))


def _port_file() -> Path:
    # Remembered at start, so a changed GUS_MONGO_PORT cannot misdirect clients.
    return common.component_dir("pids") / f"{NAME}.port"


def uri(database: str = "") -> str:
    """MongoDB URI of the server, optionally naming a database."""
    return f"mongodb://{HOST}:{port()}/{database}"


def _home() -> Path:
    return common.component_dir("ferretdb")


def _data_dir() -> Path:
    return _home() / "data"


def _install_stamp() -> str:
    # Rebuild when the pinned version or the wrapper source changes.
    sources = b"".join((SOURCE_DIR / n).read_bytes() for n in ("go.mod", "go.sum", "main.go"))
    digest = hashlib.sha256(sources).hexdigest()[:16]
    return f"ferretdb {FERRETDB_VERSION} wrapper {digest}\n"


def _marker() -> Path:
    return _home() / "installed"


def install() -> None:
    """Build the FerretDB wrapper into ``.stack/bin/`` (skipped when up to date)."""
    if BINARY.exists() and _marker().exists() and _marker().read_text() == _install_stamp():
        return
    go = shutil.which("go")
    if go is None:
        raise ComponentError("mongo: `go` is not on PATH; FerretDB is built with Go >= 1.24")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    # GOTOOLCHAIN=local: fail clearly rather than try to download another Go.
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    _run_logged([go, "build", "-trimpath", "-o", str(BINARY), "."], SOURCE_DIR, env)
    _marker().write_text(_install_stamp())


def _run_logged(argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    log = common.log_path(f"{NAME}-install")
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise ComponentError(f"mongo: `{' '.join(argv[:3])}` failed; see its log: {log}")


def start() -> None:
    """Start FerretDB unless it runs already; return once it answers a ping."""
    if common.read_pid(NAME) is not None:
        return
    listen = port()
    if common.port_open(listen):
        raise ComponentError(
            f"mongo: {HOST}:{listen} is taken by a process the stack did not start "
            "(set GUS_MONGO_PORT to use another port)")
    install()
    data = _data_dir()
    data.mkdir(parents=True, exist_ok=True)
    _port_file().write_text(str(listen))
    argv = [str(BINARY), "-listen-addr", f"{HOST}:{listen}", "-sqlite-url", f"file:{data}/"]
    pid = common.spawn(NAME, argv, cwd=_home())
    try:
        common.wait_for_port(NAME, listen, START_TIMEOUT, pid=pid)
        _wait_ready(START_TIMEOUT)
    except ComponentError:
        common.stop_pid(NAME)
        raise


def _wait_ready(timeout: float) -> None:
    # An open port is not enough: wait until a MongoDB command gets ok: 1.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping():
            return
        time.sleep(0.25)
    raise ComponentError(
        f"mongo: no answer to ping within {timeout:.0f}s; see its log: {common.log_path(NAME)}")


def stop() -> None:
    common.stop_pid(NAME)


def status() -> str:
    pid = common.read_pid(NAME)
    if pid is None:
        return "stopped"
    rss_mib = common.rss_kib(pid) / 1024
    return (f"running pid={pid} port={port()} rss={rss_mib:.1f}MiB "
            f"(FerretDB {FERRETDB_VERSION}, sqlite)")


def env() -> dict[str, str]:
    return {"GUS_MONGO_URI": uri()}


# --- a stdlib-only MongoDB ping (OP_MSG), used as the readiness check --------

_OP_MSG = 2013


def _bson_doc(fields: dict[str, int | str]) -> bytes:
    """Encode a flat document of int32 and string values (all a ping needs)."""
    body = b""
    for key, value in fields.items():
        name = key.encode() + b"\x00"
        if isinstance(value, int):
            body += b"\x10" + name + struct.pack("<i", value)
        else:
            raw = value.encode() + b"\x00"
            body += b"\x02" + name + struct.pack("<i", len(raw)) + raw
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        data += chunk
    return data


def ping(timeout: float = 2.0) -> bool:
    """True if the server answers ``{ping: 1}`` with ``ok: 1``."""
    payload = struct.pack("<I", 0) + b"\x00" + _bson_doc({"ping": 1, "$db": "admin"})
    message = struct.pack("<iiii", 16 + len(payload), 1, 0, _OP_MSG) + payload
    try:
        with socket.create_connection((HOST, port()), timeout=timeout) as sock:
            sock.sendall(message)
            length = struct.unpack("<i", _recv_exact(sock, 16)[:4])[0]
            reply = _recv_exact(sock, length - 16)
    except OSError:
        return False
    # The reply is flagBits, a kind-0 section byte, then {ok: 1.0}; the server
    # may add fields, so look the "ok" double up by its element header.
    marker = reply.find(b"\x01ok\x00")
    if marker < 0:
        return False
    return struct.unpack("<d", reply[marker + 4:marker + 12])[0] == 1.0
