"""The stack's MongoDB-wire-protocol server: mongo-java-server on its H2 backend.

No MongoDB binary can be installed here, so Girder talks to mongo-java-server
(``de.bwaldvogel:mongo-java-server``), a Java implementation of the MongoDB wire
protocol, run by a main class of our own (``stack/mongo-java-server/``). Maven
compiles it and copies its runtime jars into ``.stack/mongo/build/``; it listens on
127.0.0.1:27117 (``GUS_MONGO_PORT``) and keeps every database in one H2 MVStore
file, ``.stack/mongo/data.mv``, which survives restarts. It logs to
``.stack/logs/mongo.log`` (Maven's output goes to ``mongo-install.log``).

mongo-java-server reports MongoDB wire version 8 (MongoDB 4.2), and pymongo 4.14 and
later require 9, so ``girder.py`` pins Girder's pymongo to 4.13.2. It builds no
non-unique indexes (only ``_id`` and unique ones; its log lists the ones it ignores),
so most queries scan their collection, though through H2's page cache: Girder's createItem took
10-20 ms both on an empty database and after 5,000 items.

What was tried before: FerretDB 1.24.2 on its SQLite backend. ``go install`` of its
command panics at start-up (the published module lacks ``build/version/version.txt``);
a small Go wrapper around its embeddable package worked with Girder given two
workarounds (a pre-created unique index on ``setting.key``, because ``$group`` has no
``$first``; ``GIRDER_MAX_CURSOR_TIMEOUT_MS``, because ``find`` rejects
``noCursorTimeout``), and without ``$text`` or TTL indexes. But FerretDB cannot push
ObjectId equality filters down to SQLite, so every query scanned, and Girder's
createItem took 20 ms on an empty database, 157 ms after 500 items and about 1 s
after a few thousand. mongomock is no server at all (and fails inside Girder with
"does not handle custom tzinfo"). None of this is for production: a production
Girder runs on a real MongoDB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import common
from .common import HOST, ComponentError

__all__ = ["NAME", "install", "start", "stop", "status", "env", "port", "uri", "ping",
           "data_file", "server_version"]

NAME = "mongo"
DEFAULT_PORT = 27117
START_TIMEOUT = 60.0

# Our main class and its Maven project (pom.xml pins mongo-java-server and plugins).
SOURCE_DIR = Path(__file__).resolve().parent / "mongo-java-server"
_POM = SOURCE_DIR / "pom.xml"
_MAIN_CLASS = "local.gus.mongo.Main"
_MARKER = ".sources.sha256"
_JVM_FLAGS = (
    # Girder's metadata is small: a modest heap, and the serial collector, which
    # keeps the resident size low on a 2-core machine.
    "-Xms32m", "-Xmx256m", "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
)


def port() -> int:
    """The port of the running server, else the one it will use (GUS_MONGO_PORT)."""
    return common.recorded_port(NAME, "GUS_MONGO_PORT", DEFAULT_PORT)


def uri(database: str = "") -> str:
    """MongoDB URI of the server, optionally naming a database."""
    return f"mongodb://{HOST}:{port()}/{database}"


def _home() -> Path:
    return common.component_dir(NAME)


def _build_dir() -> Path:
    return _home() / "build"


def data_file() -> Path:
    """The H2 MVStore file holding every database of the server."""
    return _home() / "data.mv"


def server_version() -> str:
    """The mongo-java-server version pinned in the pom."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(_POM).find("m:properties/m:mongo-java-server.version", ns)
    return node.text.strip() if node is not None and node.text else "unknown"


# --- install ------------------------------------------------------------------

def _source_digest() -> str:
    """Checksum of the pom and every source file: a change means a rebuild."""
    digest = hashlib.sha256()
    for path in [_POM, *sorted((SOURCE_DIR / "src").rglob("*"))]:
        if path.is_file():
            digest.update(str(path.relative_to(SOURCE_DIR)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _installed_digest() -> str | None:
    try:
        return (_build_dir() / _MARKER).read_text().strip()
    except FileNotFoundError:
        return None


def install() -> None:
    """Compile our main class and copy its jars into ``.stack/mongo/build`` (once)."""
    digest = _source_digest()
    if _installed_digest() == digest:
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ComponentError("mongo: `mvn` (Maven 3.8+) is needed to build mongo-java-server")
    # Build into a fresh folder and swap it in, so a failed or changed build never
    # leaves a mix of two versions on the class path.
    staging = _home() / "build.new"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"[stack] {NAME}: building mongo-java-server {server_version()} with Maven ...",
          flush=True)
    _run_logged([mvn, "-B", "-q", "-f", str(_POM), "compile", "dependency:copy-dependencies",
                 f"-Dgus.build.dir={staging}"])
    (staging / _MARKER).write_text(digest + "\n")
    shutil.rmtree(_build_dir(), ignore_errors=True)
    staging.rename(_build_dir())


def _run_logged(argv: list[str]) -> None:
    log = common.log_path(f"{NAME}-install")
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise ComponentError(f"mongo: the Maven build failed; see its log: {log}")


# --- start / stop / status -----------------------------------------------------

def _java_argv(listen: int) -> list[str]:
    class_path = os.pathsep.join([str(_build_dir() / "classes"), str(_build_dir() / "libs" / "*")])
    return [common.java_executable(), *_JVM_FLAGS, "-cp", class_path, _MAIN_CLASS,
            HOST, str(listen), str(data_file())]


def start() -> None:
    """Start the server unless it runs already; return once it answers a ping."""
    if common.read_pid(NAME) is not None:
        return
    listen = port()
    if common.port_open(listen):
        raise ComponentError(
            f"mongo: {HOST}:{listen} is taken by a process the stack did not start "
            "(set GUS_MONGO_PORT to use another port)")
    install()
    common.record_port(NAME, listen)
    pid = common.spawn(NAME, _java_argv(listen), cwd=_home())
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
    """SIGTERM runs the server's shutdown hook, which closes the H2 store cleanly."""
    common.stop_pid(NAME)


def status() -> str:
    pid = common.read_pid(NAME)
    if pid is None:
        return "stopped"
    rss_mib = common.rss_kib(pid) / 1024
    return (f"running pid={pid} port={port()} rss={rss_mib:.1f}MiB "
            f"(mongo-java-server {server_version()}, H2)")


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
    return _reply_ok(reply)


def _reply_ok(reply: bytes) -> bool:
    # The reply is flagBits, a kind-0 section byte, then a document holding "ok".
    # Servers differ in its BSON type, so accept a double or an int32 of 1.
    for type_byte, size, fmt in ((b"\x01", 8, "<d"), (b"\x10", 4, "<i")):
        marker = reply.find(type_byte + b"ok\x00")
        if marker >= 0:
            return struct.unpack(fmt, reply[marker + 4:marker + 4 + size])[0] == 1
    return False
