"""Registering the deployments of ``deployments/prefect.yaml`` on a Prefect server, and
the Prefect UI's addresses of what they make. Used by ``make demo`` and by the tests
that run deployments through workers.

The deployments are registered by Prefect's own ``prefect deploy --all`` (the command
docs/usage.md tells people to run), in a subprocess started with :func:`start_deploy`,
so that the caller can do other work while it imports the flow. Prefect is imported
only inside the functions that need it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["WORK_POOL", "FLOW_NAME", "DEPLOYMENTS", "PREFECT_FILE", "ensure_process_pool",
           "start_deploy", "finish_deploy", "set_parameter_defaults", "ui_base_url",
           "deployment_url", "flow_run_url"]

#: The process work pool that ``deployments/prefect.yaml`` names.
WORK_POOL = "girder-upload-stream"
FLOW_NAME = "girder-upload-stream"
#: The deployments ``prefect.yaml`` declares.
DEPLOYMENTS = ("stream", "drain")
PREFECT_FILE = Path("deployments") / "prefect.yaml"
DEPLOY_TIMEOUT = 300.0


def ensure_process_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool ``name`` with Prefect's default job template,
    unless it exists (``prefect deploy`` refuses a pool that does not)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return
        except ObjectNotFound:
            pass
        template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                   base_job_template=template))
        except ObjectAlreadyExists:  # made at the same moment by someone else
            pass


def start_deploy(repo_root: Path, prefect_file: Path = PREFECT_FILE,
                 env: dict[str, str] | None = None, log: Path | None = None,
                 names: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``prefect --no-prompt deploy --all --prefect-file FILE`` in ``repo_root``
    (``--name N`` for each of ``names`` instead of ``--all`` when given).

    ``prefect.yaml`` reads ``$PWD`` (where workers run the flow from),
    ``$GIRDER_API_URL`` and ``$KAFKA_BOOTSTRAP_SERVERS`` when it is deployed, so they
    come from ``env`` (default: this process's environment), with ``PWD`` set to
    ``repo_root``. Its output goes to ``log`` (default: discarded with the process)."""
    prefect = Path(sys.executable).with_name("prefect")
    full_env = {**(os.environ if env is None else env), "PWD": str(repo_root)}
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    which = [arg for name in names for arg in ("--name", name)] or ["--all"]
    try:
        return subprocess.Popen(
            [str(prefect), "--no-prompt", "deploy", *which, "--prefect-file", str(prefect_file)],
            cwd=repo_root, env=full_env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()


def finish_deploy(proc: subprocess.Popen, log: Path | None = None,
                  timeout: float = DEPLOY_TIMEOUT) -> None:
    """Wait for :func:`start_deploy`'s command; raise with the end of its log if it failed."""
    code = proc.wait(timeout=timeout)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
        raise RuntimeError(f"prefect deploy exited with {code}:\n{tail}")


def set_parameter_defaults(deployment: str, overrides: dict[str, Any]) -> Any:
    """Change some parameter defaults of ``flow/deployment`` (what a run started from
    the UI gets); returns the deployment's id."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        parameters = {**(found.parameters or {}), **overrides}
        client.update_deployment(found.id, DeploymentUpdate(parameters=parameters))
    return found.id


def ui_base_url() -> str:
    """The Prefect UI's address, from ``PREFECT_API_URL`` (``.../api``)."""
    from prefect.settings import PREFECT_API_URL
    return str(PREFECT_API_URL.value() or "").removesuffix("/").removesuffix("/api")


def deployment_url(deployment_id: Any) -> str:
    return f"{ui_base_url()}/deployments/deployment/{deployment_id}"


def flow_run_url(flow_run_id: Any) -> str:
    return f"{ui_base_url()}/runs/flow-run/{flow_run_id}"
