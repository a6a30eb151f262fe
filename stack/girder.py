"""Girder 5 REST API for the local stack, on mongo-java-server (see ``mongo.py``).

Girder lives in its own virtualenv, ``.stack/girder/venv``, so its pins never
meet the project's. It is served by ``girder serve --mode production`` (uvicorn
in one process; any other mode turns on uvicorn's auto-reloader and a child
process) on 127.0.0.1:28080 (``GUS_GIRDER_PORT``), with its database given as
``--database mongodb://127.0.0.1:27117/girder``. The REST API is at ``/api/v1``;
the web client, which the Girder 5 wheel ships built, is served at ``/``.

After start-up it is bootstrapped through its REST API, idempotently: the
``admin`` user (the first user registered becomes site admin), a filesystem
assetstore in ``.stack/girder/assetstore`` made current, and a full-access API
key, all saved in ``.stack/girder/credentials.json`` and reused on restart.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from . import common, mongo
from .common import HOST, ComponentError

__all__ = ["NAME", "GIRDER_VERSION", "install", "start", "stop", "status", "env",
           "port", "api_url", "credentials"]

NAME = "girder"
GIRDER_VERSION = "5.0.21"
DEFAULT_PORT = 28080
DATABASE = "girder"
START_TIMEOUT = 90.0

# girder-hashsum-download exposes the sha512 that the filesystem assetstore
# computes on upload (core Girder stores it but filters it out of REST file
# documents). The web-server stack is pinned because it decides how uploads
# stream. pymongo stays at 4.13: mongo-java-server reports wire version 8, and
# pymongo 4.14 and later refuse servers below wire version 9.
REQUIREMENTS = (
    f"girder=={GIRDER_VERSION}",
    f"girder-hashsum-download=={GIRDER_VERSION}",
    "pymongo==4.13.2",
    "CherryPy==18.10.0",
    "cheroot==11.1.2",
    "uvicorn[standard]==0.54.0",
    "starlette==1.10.0",
)

ADMIN_LOGIN = "admin"
ADMIN_EMAIL = "admin@example.com"
API_KEY_NAME = "girder-upload-stream"
ASSETSTORE_NAME = "gus-filesystem"
ASSETSTORE_TYPE_FILESYSTEM = 0

def port() -> int:
    """The port of the running server, else the one it will use (GUS_GIRDER_PORT)."""
    return common.recorded_port(NAME, "GUS_GIRDER_PORT", DEFAULT_PORT)


def api_url() -> str:
    return f"http://{HOST}:{port()}/api/v1"


def _home() -> Path:
    return common.component_dir("girder")


def _venv() -> Path:
    return _home() / "venv"


def _assetstore_root() -> Path:
    return _home() / "assetstore"


def _credentials_path() -> Path:
    return _home() / "credentials.json"


# --- install ------------------------------------------------------------------

def install() -> None:
    """Create the Girder virtualenv and install the pinned packages (once)."""
    marker = _venv() / ".gus-requirements"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return
    if not (_venv() / "bin" / "python").exists():
        _run_logged("creating the virtualenv", [sys.executable, "-m", "venv", str(_venv())])
    _run_logged("pip install", [str(_venv() / "bin" / "pip"), "install",
                                "--disable-pip-version-check", "--no-input", *REQUIREMENTS])
    marker.write_text(wanted)


def _run_logged(what: str, argv: list[str], timeout: float = 1800) -> None:
    log = common.log_path(f"{NAME}-install")
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ComponentError(f"girder: {what} timed out; see its log: {log}") from None
    if result.returncode != 0:
        raise ComponentError(f"girder: {what} failed; see its log: {log}")


# --- start / stop / status -----------------------------------------------------

def start() -> None:
    """Start Girder (and its database) unless running; wait for the API; bootstrap."""
    if common.read_pid(NAME) is not None:
        return
    listen = port()
    if common.port_open(listen):
        raise ComponentError(
            f"girder: {HOST}:{listen} is taken by a process the stack did not start "
            "(set GUS_GIRDER_PORT to use another port)")
    install()
    mongo.start()
    _assetstore_root().mkdir(parents=True, exist_ok=True)
    common.record_port(NAME, listen)
    pid = common.spawn(NAME, _serve_argv(listen), env=_serve_env(), cwd=_home())
    try:
        common.wait_for_port(NAME, listen, START_TIMEOUT, pid=pid)
        _wait_api_ready(START_TIMEOUT, pid)
        _bootstrap()
    except ComponentError:
        common.stop_pid(NAME)
        raise
    except (OSError, ValueError, KeyError) as exc:
        common.stop_pid(NAME)
        raise ComponentError(
            f"girder: bootstrap failed ({exc!r}); see its log: {common.log_path(NAME)}") from exc


def _serve_argv(listen: int) -> list[str]:
    return [str(_venv() / "bin" / "girder"), "serve", "--mode", "production",
            "--database", mongo.uri(DATABASE), "--host", HOST, "--port", str(listen)]


def _serve_env() -> dict[str, str]:
    return {
        # Deleting a collection or folder runs as a Celery task on a "local" worker;
        # eager mode runs it in-process, so no RabbitMQ and no worker process are needed.
        "GIRDER_WORKER_TASK_ALWAYS_EAGER": "true",
        # Keep the venv first on PATH without activating it.
        "PATH": f"{_venv() / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _wait_api_ready(timeout: float, pid: int) -> None:
    # The port opens before every route is mounted; wait for a real answer.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not common.pid_alive(pid):
            break
        try:
            code, _ = _request("GET", "system/version")
        except OSError:
            code = 0
        if code == 200:
            return
        time.sleep(0.25)
    raise ComponentError(f"girder: GET /api/v1/system/version did not answer 200; "
                         f"see its log: {common.log_path(NAME)}")


def stop() -> None:
    common.stop_pid(NAME)


def status() -> str:
    pid = common.read_pid(NAME)
    if pid is None:
        return "stopped"
    rss_mib = common.rss_kib(pid) / 1024
    return f"running pid={pid} port={port()} rss={rss_mib:.1f}MiB (Girder {GIRDER_VERSION})"


def credentials() -> dict[str, str]:
    """The saved bootstrap credentials (empty before the first start)."""
    try:
        return json.loads(_credentials_path().read_text())
    except (FileNotFoundError, ValueError):
        return {}


def env() -> dict[str, str]:
    """GIRDER_API_URL, and GIRDER_API_KEY once the first start has bootstrapped it."""
    values = {"GIRDER_API_URL": api_url()}
    key = credentials().get("api_key")
    if key:
        values["GIRDER_API_KEY"] = key
    return values


# --- REST bootstrap -----------------------------------------------------------

def _request(method: str, path: str, params: dict[str, str] | None = None, *,
             token: str | None = None, basic: tuple[str, str] | None = None,
             ) -> tuple[int, object]:
    """One Girder REST call; returns (status, decoded JSON) for any HTTP status."""
    url = f"{api_url()}/{path}"
    if params:
        # Girder reads form parameters from the query string for every method.
        url += "?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    if token:
        req.add_header("Girder-Token", token)
    if basic:
        pair = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, body.decode(errors="replace")


def _expect(code: int, body: object, what: str) -> None:
    if code != 200:
        raise ComponentError(
            f"girder: {what} failed with HTTP {code}: {body}; see its log: {common.log_path(NAME)}")


def _save_credentials(creds: dict[str, str]) -> None:
    # Written before the user exists too, so a crash mid-bootstrap never loses
    # the password of an admin that was already created.
    path = _credentials_path()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(creds, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def _bootstrap() -> None:
    creds = credentials()
    token = _token_from_api_key(creds.get("api_key"))
    if token is None:
        token = _admin_token(creds)
        creds["api_key"] = _ensure_api_key(token)
        _save_credentials(creds)
    creds["assetstore_id"] = _ensure_assetstore(token)
    creds["api_url"] = api_url()
    _save_credentials(creds)


def _token_from_api_key(key: str | None) -> str | None:
    if not key:
        return None
    code, body = _request("POST", "api_key/token", {"key": key})
    return body["authToken"]["token"] if code == 200 else None


def _start_afresh_hint() -> str:
    return (f"to start afresh, stop the stack and delete {mongo.data_file()}, "
            f"{_assetstore_root()} and {_credentials_path()}")


def _admin_token(creds: dict[str, str]) -> str:
    """Log in as admin, registering it first on a fresh database."""
    creds.setdefault("login", ADMIN_LOGIN)
    creds.setdefault("password", secrets.token_urlsafe(24))
    _save_credentials(creds)
    code, body = _request("GET", "user/authentication", basic=(creds["login"], creds["password"]))
    if code == 200:
        return body["authToken"]["token"]
    code, body = _request("POST", "user", {
        "login": creds["login"], "email": ADMIN_EMAIL, "firstName": "Stack",
        "lastName": "Admin", "password": creds["password"]})
    if code != 200:
        raise ComponentError(
            f"girder: cannot log in as {creds['login']!r} nor create it (HTTP {code}: {body}). "
            f"The database holds an admin whose password is not in {_credentials_path()}; "
            + _start_afresh_hint())
    if not body.get("admin"):
        raise ComponentError(
            f"girder: {creds['login']!r} was created but is not a site admin, so the database "
            "already had users; " + _start_afresh_hint())
    return body["authToken"]["token"]


def _ensure_api_key(token: str) -> str:
    """Reuse our named API key or create it; no scope means full access."""
    code, keys = _request("GET", "api_key", {"limit": "0"}, token=token)
    _expect(code, keys, "listing API keys")
    for key in keys:
        if key["name"] == API_KEY_NAME and key["active"] and key["scope"] is None:
            return key["key"]
    code, key = _request("POST", "api_key", {"name": API_KEY_NAME, "active": "true"}, token=token)
    _expect(code, key, "creating the API key")
    return key["key"]


def _ensure_assetstore(token: str) -> str:
    """Our filesystem assetstore, at today's path and current; returns its id."""
    root = str(_assetstore_root())
    code, stores = _request("GET", "assetstore", {"limit": "0"}, token=token)
    _expect(code, stores, "listing assetstores")
    store = next((s for s in stores if s["name"] == ASSETSTORE_NAME), None)
    if store is None:
        code, store = _request("POST", "assetstore", {
            "name": ASSETSTORE_NAME, "type": str(ASSETSTORE_TYPE_FILESYSTEM), "root": root},
            token=token)
        _expect(code, store, "creating the filesystem assetstore")
    if store.get("root") != root or not store.get("current"):
        # The repository may have moved since the assetstore was made.
        code, store = _request("PUT", f"assetstore/{store['_id']}", {
            "name": ASSETSTORE_NAME, "root": root, "current": "true"}, token=token)
        _expect(code, store, "making the filesystem assetstore current")
    return store["_id"]
