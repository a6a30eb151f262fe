"""Fixtures for integration tests: one run-wide real stack, fresh Kafka topics and
consumer groups per test, and an authenticated Girder client.

The stack is reused when ``make stack-up`` already started it; otherwise the run starts
what is missing (one process at a time, under a lock: with ``pytest -n N`` the first
worker that needs a component starts it) and stops it again when the whole run ends
(tests/conftest.py). Kafka-only tests (``kafka_bootstrap``) need just the ``kafka``
component, so they run while Girder is down.

Parallel runs (pytest-xdist, ``--dist loadgroup``): topics, groups, collections and
folders are unique per test. Tests that use fixed names share an ``xdist_group`` (one
worker runs them one after the other); tests marked ``serial`` stop or restart a shared
component and run with no other integration test beside them (:func:`_stack_share`).
"""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import started_file
from tests.integration import stack_share
from tests.integration.own_stack import parse_exports

REPO_ROOT = Path(__file__).resolve().parents[2]

# Tests stop programs with SIGINT, as Ctrl-C would. A shell without job control starts
# background commands with SIGINT ignored, every child inherits that, and Python then
# installs no KeyboardInterrupt handler: run that way (`make test &` in a script), the
# programs would ignore the tests' SIGINT. A handler here is reset to the default in
# every child at exec, so each program gets the disposition an interactive run has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

STACK_KEYS = ("KAFKA_BOOTSTRAP_SERVERS", "GIRDER_API_URL", "GIRDER_API_KEY")


def _stackctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stack.stackctl", *args], cwd=REPO_ROOT,
                          text=True, capture_output=True, check=check)


def _session_stack(components: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Start the components that are not running (one worker at a time) and yield the
    stack's env. The run stops the components it started when it ends (tests/conftest.py):
    a stack someone else runs is left alone."""
    with stack_share.flock("stack.lock", fcntl.LOCK_EX):
        started = [c for c in components
                   if _stackctl("status", c, check=False).returncode != 0]
        if started:
            with open(started_file(), "a") as record:  # before up: a failed up half-starts
                record.write("".join(f"{name}\n" for name in started))
            up = _stackctl("up", *started, check=False)
            if up.returncode != 0:
                pytest.fail(f"could not start {' '.join(started)}:\n{up.stdout}\n{up.stderr}")
    yield parse_exports(_stackctl("env", *components).stdout)


@pytest.fixture(autouse=True)
def _stack_share(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every integration test shares the stack; a test marked ``serial`` (it stops or
    restarts a component) has it alone (tests/integration/stack_share.py). Set up before
    and torn down after the test's other function fixtures."""
    serial = request.node.get_closest_marker("serial") is not None
    with stack_share.alone() if serial else stack_share.shared():
        yield


@pytest.fixture(scope="session")
def kafka_stack() -> Iterator[dict[str, str]]:
    """Connection settings of a running Kafka broker alone (no Girder needed)."""
    yield from _session_stack(("kafka",))


@pytest.fixture(scope="session")
def stack_env(kafka_stack: dict[str, str]) -> Iterator[dict[str, str]]:
    """Connection settings of the whole local stack (Kafka, MongoDB-protocol server, Girder)."""
    for env in _session_stack(("mongo", "girder")):
        env = {**kafka_stack, **env}
        missing = [key for key in STACK_KEYS if not env.get(key)]
        assert not missing, f"stack env lacks {missing}"
        yield env


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_stack: dict[str, str]) -> str:
    return kafka_stack["KAFKA_BOOTSTRAP_SERVERS"]


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str):
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


def unique_name(prefix: str, request: pytest.FixtureRequest) -> str:
    """A name no other test (or earlier run) uses: test name plus a random suffix."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"{prefix}-{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_topic(kafka_admin, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """Factory: ``make_topic(partitions=4)`` creates a fresh topic and returns its name."""
    from confluent_kafka.admin import NewTopic
    created: list[str] = []

    def factory(partitions: int = 4, name: str | None = None) -> str:
        topic = name or unique_name("t", request)
        futures = kafka_admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)],
            operation_timeout=30)
        futures[topic].result(timeout=60)
        created.append(topic)
        return topic

    yield factory
    if created:
        for future in kafka_admin.delete_topics(created, operation_timeout=30).values():
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001 - cleanup is best effort
                pass


@pytest.fixture
def make_group(request: pytest.FixtureRequest) -> Callable[[], str]:
    """Factory: a fresh consumer group id per call."""
    return lambda: unique_name("g", request)


@pytest.fixture(scope="session")
def girder_client(stack_env: dict[str, str]):
    """A girder_client.GirderClient authenticated with the stack's admin API key."""
    from girder_client import GirderClient
    client = GirderClient(apiUrl=stack_env["GIRDER_API_URL"])
    client.authenticate(apiKey=stack_env["GIRDER_API_KEY"])
    return client


@pytest.fixture
def make_collection(girder_client, request: pytest.FixtureRequest) -> Iterator[Callable[[], dict]]:
    """Factory: a fresh Girder collection, deleted after the test."""
    created: list[dict] = []

    def factory() -> dict:
        collection = girder_client.createCollection(unique_name("c", request), public=False)
        created.append(collection)
        return collection

    yield factory
    for collection in created:
        girder_client.delete(f"collection/{collection['_id']}")


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """A local Prefect server (SQLite) for the session, shared by in-process flow runs
    and CLI subprocesses (one server start instead of one ephemeral server per run)."""
    for env in _session_stack(("prefect",)):
        yield env["PREFECT_API_URL"]
        from prefect.logging.handlers import APILogHandler
        APILogHandler().flush()  # send buffered run logs before the server stops


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that calls the flow in-process (a ``run_flow`` fixture) is marked
    ``prefect`` whether or not it says so: without a Prefect API, Prefect starts an
    ephemeral server in the test's process, which timed out under the suite's load
    (test_streaming in a clean-clone run)."""
    for item in items:
        if "run_flow" in getattr(item, "fixturenames", ()) \
                and item.get_closest_marker("prefect") is None:
            item.add_marker(pytest.mark.prefect)


@pytest.fixture
def prefect_env(request: pytest.FixtureRequest,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The Prefect part of the environment of this test and of the programs it starts.

    Only tests marked ``prefect`` (they check what Prefect records: flow runs, task runs,
    artifacts, deployments, secrets, or they call the flow in-process) get the session's
    Prefect server; every other test runs its programs without a Prefect API, as a
    command-line user without Prefect does (start-up ~3.5 s instead of ~12 s,
    docs/benchmarks.md scenario 8), and gets ``{}``."""
    if request.node.get_closest_marker("prefect") is None:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        yield {}
        return
    prefect_api_url = request.getfixturevalue("prefect_api_url")
    from prefect.settings import PREFECT_API_URL, temporary_settings
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with temporary_settings({PREFECT_API_URL: prefect_api_url}):
        yield {"PREFECT_API_URL": prefect_api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture
def programs() -> Iterator[list]:
    """Programs (``helpers.Program``) a test starts; each is stopped by its PID, even
    if the test fails."""
    started: list = []
    yield started
    for program in started:
        program.stop(timeout=15)


@pytest.fixture
def new_api_key(girder_client, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A fresh API key of the stack's admin, ``(id, key)``, deleted after the test: a
    secret a test can revoke, or look for in outputs without meeting other tests' use
    of the stack's key."""
    doc = girder_client.post("api_key", parameters={"name": unique_name("key", request),
                                                    "active": True})
    yield doc["_id"], doc["key"]
    girder_client.delete(f"api_key/{doc['_id']}")
