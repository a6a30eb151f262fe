"""The quick start as a person sees it, in a real headless Chromium (Debian's, see
``tests/integration/browser.py``).

``make demo``'s own code runs on the session's stack: it registers the ``stream`` and
``drain`` deployments, starts their worker and uploads a sample tree with a run of
``stream``. The browser then opens the addresses the demo printed, as a newcomer
would: the Prefect UI's Deployments page (both deployments listed), the demo's flow
run (Completed, of the deployment ``stream``, with its four artifacts) and, without
logging in, Girder's web client at the demo folder and at an uploaded item (its
``checksum.sha256`` and ``KafkaTopic``). A screenshot of each page is kept under the
test's tmp_path (the paths are printed).

The same readers run once more after breaking what they look at (the ``drain``
deployment deleted, the item's metadata removed), and must then see it missing, so
that the checks above cannot pass on a page that does not show what they look for.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.browser import Pages, start_chromium
from tests.integration.programs import stackctl

pytestmark = [pytest.mark.integration, pytest.mark.prefect,
              pytest.mark.xdist_group("prefect-deployments")]

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACT_SUFFIXES = ("-summary", "-in-progress", "-progress", "-recent-uploads")


@pytest.fixture
def pages(tmp_path):
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        yield Pages(driver, tmp_path)
    finally:
        driver.quit()


@pytest.fixture
def worker_left_as_found(prefect_env):
    """Stop the stack's worker after the test if the test (the demo) started it."""
    running = subprocess.run([sys.executable, "-m", "stack.stackctl", "status", "worker"],
                             cwd=REPO_ROOT, capture_output=True).returncode == 0
    yield
    if not running:
        stackctl("down", "worker")


def _run_demo(tmp_path: Path, stack_env: dict, prefect_env: dict) -> str:
    env = {**os.environ, **stack_env, **prefect_env, "GUS_DEMO_DIR": str(tmp_path / "demo"),
           "PREFECT_LOGGING_EXTRA_LOGGERS": "girder_upload_stream"}
    done = subprocess.run([sys.executable, "-m", "girder_upload_stream.cli.demo"],
                          cwd=REPO_ROOT, env=env, text=True, capture_output=True,
                          timeout=400, stdin=subprocess.DEVNULL)
    print(done.stdout, flush=True)
    assert done.returncode == 0, f"the demo failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    assert stack_env["GIRDER_API_KEY"] not in done.stdout + done.stderr
    return done.stdout


def _printed(output: str, label: str) -> str:
    """The first address on the demo's line that starts with ``label``."""
    found = re.search(rf"^\[demo\] {re.escape(label)}: (\S+)", output, re.MULTILINE)
    assert found, f"the demo printed no {label!r} line:\n{output}"
    return found[1]


@pytest.mark.timeout(420)
def test_the_demo_in_a_browser(pages, worker_left_as_found, stack_env, prefect_env,
                               girder_client, kafka_admin, tmp_path):
    output = _run_demo(tmp_path, stack_env, prefect_env)
    topic = re.search(r"waiting in the topic (\S+):", output)[1]
    ui = _printed(output, "Prefect UI, the deployments").removesuffix("/deployments")
    run_url = _printed(output, "Prefect UI, this run and its artifacts")
    folder_url = _printed(output, "Girder's web client, the demo folder")
    try:
        assert {"stream", "drain"} <= set(pages.deployments(ui))
        pages.shot("prefect-deployments")

        assert pages.flow_run(run_url) == ("Completed", "stream")
        pages.shot("prefect-flow-run")
        artifacts = pages.run_artifacts()
        base = next(key for key in artifacts if key.endswith("-summary")).removesuffix("-summary")
        assert sorted(artifacts) == sorted(base + suffix for suffix in ARTIFACT_SUFFIXES)
        pages.shot("prefect-flow-run-artifacts")

        # No log-in: the collection is public. run-003 is waiting in the topic (unless a
        # scheduled drain ran in the meantime).
        folders, items = pages.girder_folder(folder_url)
        assert {"run-001", "run-002"} <= set(folders) and items == ["README.txt"], (folders, items)
        pages.shot("girder-demo-folder")

        item = girder_client.resourceLookup(f"/collection/Demo/Demo/{topic}/README.txt")
        item_url = f"{folder_url.split('#')[0]}#item/{item['_id']}"
        sha256 = hashlib.sha256((tmp_path / "demo" / "source" / "README.txt").read_bytes())
        name, meta = pages.girder_item(item_url)
        assert name == "README.txt"
        assert meta["checksum"] == {"sha256": sha256.hexdigest()}
        assert meta["KafkaTopic"] == topic
        pages.shot("girder-item")

        _break_and_look_again(pages, ui, item_url, item, girder_client)
    finally:
        _clean_up(girder_client, kafka_admin, topic)


def _break_and_look_again(pages: Pages, ui: str, item_url: str, item: dict,
                          girder_client) -> None:
    """The same readers, on pages that lack what they look for, must say so."""
    from prefect import get_client
    with get_client(sync_client=True) as client:
        drain = client.read_deployment_by_name("girder-upload-stream/drain")
        client.delete_deployment(drain.id)
    names = pages.deployments(ui)
    assert "drain" not in names and "stream" in names, names
    girder_client.sendRestRequest("DELETE", f"item/{item['_id']}/metadata",
                                  json=["checksum", "KafkaTopic"])
    _, meta = pages.girder_item(item_url)
    assert "checksum" not in meta and "KafkaTopic" not in meta, meta
    assert "OpenMSIStreamVersion" in meta, meta
    pages.shot("broken-girder-item-without-metadata")


def _clean_up(girder_client, kafka_admin, topic: str) -> None:
    try:
        folder = girder_client.resourceLookup(f"/collection/Demo/Demo/{topic}")
        girder_client.delete(f"folder/{folder['_id']}")
    except Exception:  # noqa: BLE001 - best effort
        pass
    for future in kafka_admin.delete_topics([topic], operation_timeout=30).values():
        try:
            future.result(timeout=60)
        except Exception:  # noqa: BLE001 - best effort
            pass
