"""No secret in any output, after the failures that used to print one.

Each test runs the real CLI with a secret it can recognise, makes it fail, then greps
every output: standard output and error, the log file, every registry CSV and sidecar,
every other file of the output folder, and -- when the flow ran -- what the Prefect
server keeps of the run (its logs, flow and task run states, artifacts).

1. Girder unreachable at start-up (a closed local port): girder-client's own log-in
   would put the key in the URL of the connection error.
2. Girder going away after start-up (a TCP proxy in front of the stack's Girder, closed
   while files arrive, opened again later): the upload workers' log-ins and uploads fail
   for a while, the failures reach the registries, artifacts and logs; then all land.
3. A config file whose ``sasl.password`` cannot be used (a '$' value that is no variable
   name, a line without '=').
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.girder_checks import (assert_exactly_once, complete_in_girder, default_root_path, folder_by_path, root_folder_or_none)
from tests.integration.local_files import in_progress_rows, write_tree
from tests.integration.programs import OUR_CLI, Program, finish, produce_ours, stop_line, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

FLOW_RUN_NAME = re.compile(r"Flow run '([^']+)'")


# ----------------------------------------------------------------------------- helpers

class TcpProxy:
    """Forwards a local port to ``target``; :meth:`close` refuses new connections and
    cuts the open ones (Girder 'goes away'), :meth:`open` serves again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            sockets, self._sockets = self._sockets, []
        for sock in ([server] if server else []) + sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(stack_env, extra: dict[str, str], key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GIRDER_API_KEY"}
    env.update(extra)
    env.update(KAFKA_BOOTSTRAP_SERVERS=stack_env["KAFKA_BOOTSTRAP_SERVERS"],
               GIRDER_API_KEY=key, PYTHONIOENCODING="utf-8")
    return env


def _files_below(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (log file, registries, sidecars, rebuilt files)."""
    return {str(p): p.read_bytes().decode("utf-8", errors="replace")
            for p in folder.rglob("*") if p.is_file()}


def _prefect_record(output: str) -> dict[str, str]:
    """What the Prefect server keeps of the flow runs named in ``output``: their logs,
    flow and task run states, and artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                FlowRunFilter, FlowRunFilterId,
                                                FlowRunFilterName, LogFilter,
                                                LogFilterFlowRunId)
    names = sorted(set(FLOW_RUN_NAME.findall(output)))
    assert names, f"no flow run named in the output:\n{output[-3000:]}"
    record: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=names)))
        assert runs, f"flow runs {names} not found on the Prefect server"
        ids = [run.id for run in runs]
        for run in runs:
            record[f"flow run {run.name}"] = f"{run.state!r} {run.state.message or ''}"
        for task in client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids))):
            record[f"task run {task.name}"] = f"{task.state!r} {task.state.message or ''}"
        offset = 0
        while logs := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)),
                                       limit=200, offset=offset):
            record[f"logs {offset}"] = "\n".join(log.message for log in logs)
            offset += len(logs)
        for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=ids))):
            record[f"artifact {artifact.key}"] = f"{artifact.data} {artifact.description}"
    assert any(k.startswith("logs") for k in record), "no run logs on the Prefect server"
    return record


def _in_progress_artifacts(topic: str, group: str) -> str:
    """Every version of the in-progress table artifact of ``topic``/``group``, as text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from girder_upload_stream.registry.artifact_content import artifact_keys
    key = artifact_keys(topic, group).in_progress
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))
    return "\n".join(str(artifact.data) for artifact in found)


def _assert_nowhere(secrets: list[str], texts: dict[str, str]) -> None:
    found = [(secret, where) for secret in secrets for where, text in texts.items()
             if secret in text]
    assert not found, f"secret found in: {sorted({where for _, where in found})}"


# ----------------------------------------------------------------------------- 1.

@pytest.mark.timeout(120)
def test_no_key_anywhere_when_girder_is_unreachable_at_start_up(tmp_path, stack_env,
                                                                make_topic):
    key = f"gus-Recognisable-Key-{uuid.uuid4().hex}"
    topic, out = make_topic(partitions=1), tmp_path / "out"
    api_url = f"http://127.0.0.1:{_closed_port()}/api/v1"
    run = subprocess.run(
        [str(OUR_CLI), "run", api_url, "--topic_name", topic, "--output_dir", str(out),
         "--logger_stream_level", "debug", "--logger_file_level", "debug"],
        cwd=tmp_path, env=_env(stack_env, {}, key), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=90)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot start: Girder at {api_url}: log in: Girder unreachable"), run.stderr
    assert "Traceback" not in run.stderr
    _assert_nowhere([key], {"stdout": run.stdout, "stderr": run.stderr, **_files_below(out)})


# ----------------------------------------------------------------------------- 2.

@pytest.mark.timeout(480)
def test_no_key_anywhere_when_girder_goes_away_after_start_up(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, new_api_key, programs):
    _, key = new_api_key
    target = urlsplit(stack_env["GIRDER_API_URL"])
    proxy = TcpProxy((target.hostname, target.port))
    proxy.open()
    topic, group, collection = make_topic(partitions=2), make_group(), make_collection()
    out = tmp_path / "out"
    program = Program(
        [OUR_CLI, "run", f"http://127.0.0.1:{proxy.port}{target.path}", "--topic_name", topic,
         "--collection_name", collection["name"], "--consumer_group_id", group,
         "--output_dir", out, "--max_idle_seconds", "20", "--update_seconds", "5",
         "--logger_stream_level", "debug", "--logger_file_level", "debug"],
        tmp_path / "run.out", cwd=tmp_path, env=_env(stack_env, prefect_env, key))
    programs.append(program)
    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    root_path = default_root_path(collection["name"], topic)
    try:
        # Both start-up checks (the command's, then the flow run's) are over once the
        # flow says where it uploads: only then may Girder go away.
        wait_for(lambda: root_folder_or_none(girder_client, root_path) is not None
                 and "below folder" in program.output(),
                 "the start-up checks (root folder made, the flow consuming)", program,
                 log_file, timeout=120)
        proxy.close()
        files = write_tree(tmp_path / "tree", {"a.txt": b"while Girder is away\n",
                                               "sub/b.bin": bytes(range(256)) * 400})
        finish(produce_ours(tmp_path / "tree", topic, stack_env["KAFKA_BOOTSTRAP_SERVERS"],
                            tmp_path), "our produce")
        # The first failed attempt of each file reaches the registry (retry_policy.py).
        wait_for(lambda: any("unreachable" in str((row.extra or {}).get("reason", ""))
                             for row in in_progress_rows(out / "LOGS", topic, group)),
                 "a transient failure in the in-progress registry", program, log_file,
                 timeout=150)
        registry_while_away = _files_below(out / "LOGS")
        # The artifact is replaced as the table changes: its text is kept from now.
        wait_for(lambda: "unreachable" in _in_progress_artifacts(topic, group),
                 "the failure in the in-progress artifact", program, log_file, timeout=90)
        artifact_while_away = _in_progress_artifacts(topic, group)
    finally:
        proxy.close()
        proxy.open()
    root = folder_by_path(girder_client, root_path)
    wait_for(lambda: complete_in_girder(girder_client, root["_id"], files) == set(files),
             "the files in Girder once it is back", program, log_file, timeout=120)
    assert program.wait(timeout=120) == 0, program.describe(log_file)
    proxy.close()
    output = program.output()
    assert "Girder unreachable" in output, program.describe(log_file)
    assert stop_line(output)["failed"] == 0
    assert_exactly_once(girder_client, root["_id"], files, topic, root_path=root_path)
    texts = {"output": output, **_files_below(out),
             **{f"while away: {k}": v for k, v in registry_while_away.items()},
             "while away: in-progress artifact": artifact_while_away,
             **_prefect_record(output)}
    _assert_nowhere([key], texts)


# ----------------------------------------------------------------------------- 3.

@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["not a variable name", "line without '='"])
def test_no_sasl_password_anywhere_when_the_config_is_invalid(
        how, tmp_path, stack_env, prefect_env, make_topic):
    password = f"3cret-Passw0rd-{uuid.uuid4().hex}"
    line = (f"sasl.password = ${password}" if how == "not a variable name"
            else f"sasl.password {password}")
    config = tmp_path / "sasl.config"
    config.write_text("[broker]\nbootstrap.servers = $KAFKA_BOOTSTRAP_SERVERS\n"
                      "security.protocol = SASL_PLAINTEXT\nsasl.mechanism = PLAIN\n"
                      f"sasl.username = lab\n{line}\n\n[consumer]\ngroup.id = create_new\n"
                      "enable.auto.commit = False\n")
    topic, out = make_topic(partitions=1), tmp_path / "out"
    run = subprocess.run(
        [str(OUR_CLI), "run", stack_env["GIRDER_API_URL"], "--config", str(config),
         "--topic_name", topic, "--output_dir", str(out), "--max_idle_seconds", "3",
         "--logger_stream_level", "debug", "--logger_file_level", "debug"],
        cwd=tmp_path, env=_env(stack_env, prefect_env, stack_env["GIRDER_API_KEY"]),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    errors = [text for text in run.stderr.splitlines() if text.startswith("error: ")]
    assert len(errors) == 1, output
    problem = ("option='sasl.password'" if how == "not a variable name"
               else "line(s) 6 are not 'option = value'")
    assert problem in errors[0] and str(config) in errors[0], errors
    # The config file is read before Prefect starts (the consumer subscribes before the
    # flow run is made): no flow run exists, so the Prefect server holds nothing of it.
    assert not FLOW_RUN_NAME.findall(output) and "running as a flow run" not in output, output
    _assert_nowhere([password, password[:12]], {"output": output, **_files_below(out)})
