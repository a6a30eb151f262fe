"""Run every shell example of the documentation that is marked as runnable.

A block is runnable when the line before its opening fence is exactly
``<!-- doc-test -->`` and the fence's language is ``bash``. Each block runs on its own,
with ``bash`` and ``set -euo pipefail``, from the repository root, with the local
stack's environment, ``PREFECT_API_URL`` of the session's Prefect server and
``.venv/bin`` first on ``PATH``. It must exit with 0.

The examples make their own topics (``docs-...``) and upload into the Girder
collection ``Docs examples``; the test deletes the topics and the collection it saw
appear, so repeated runs leave nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.prefect,  # usage.md reads artifacts
              pytest.mark.xdist_group("docs-collection")]

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = sorted((REPO_ROOT / "docs").glob("*.md")) + [REPO_ROOT / "README.md"]
MARKER = "<!-- doc-test -->"
TIMEOUT = 180.0
DOCS_COLLECTION = "Docs examples"
TOPIC_PREFIX = "docs-"


@dataclass(frozen=True)
class Example:
    path: Path
    line: int  # 1-based line of the opening fence
    script: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def extract_examples(path: Path) -> list[Example]:
    """The ``bash`` blocks preceded by the marker line; a marker that is not followed
    by a ``bash`` fence is an error (a typo must not silently skip an example)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    examples = []
    for index, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[index + 1] if index + 1 < len(lines) else ""
        if fence.strip() != "```bash":
            raise ValueError(f"{path}:{index + 2}: {MARKER} must be followed by a ```bash fence")
        body = []
        for end in range(index + 2, len(lines)):
            if lines[end].strip() == "```":
                break
            body.append(lines[end])
        else:
            raise ValueError(f"{path}:{index + 2}: unterminated code block")
        examples.append(Example(path, index + 2, "\n".join(body) + "\n"))
    return examples


EXAMPLES = [example for path in DOC_FILES for example in extract_examples(path)]


def test_the_docs_have_runnable_examples() -> None:
    files = {example.path.name for example in EXAMPLES}
    assert {"usage.md", "configuration.md", "migration.md", "stack.md"} <= files, files
    scripts = "\n".join(example.script for example in EXAMPLES)
    for needed in ("--help", "girder-upload-stream produce", "--max_idle_seconds 3",
                   "read_processed", "pd.read_csv", "$LAB_KAFKA"):
        assert needed in scripts, f"no runnable example uses {needed!r}"


def _topics(kafka_admin) -> set[str]:
    return set(kafka_admin.list_topics(timeout=30).topics)


def _docs_collection_id(girder_client) -> str | None:
    try:
        return girder_client.resourceLookup(f"/collection/{DOCS_COLLECTION}")["_id"]
    except Exception:  # noqa: BLE001 - Girder answers 400 for a missing path
        return None


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_doc_example_runs(example: Example, stack_env, prefect_env, kafka_admin,
                          girder_client, tmp_path) -> None:
    topics_before = _topics(kafka_admin)
    collection_before = _docs_collection_id(girder_client)
    env = {**os.environ, **stack_env, **prefect_env,
           "PATH": f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "TMPDIR": str(tmp_path)}
    script = "set -euo pipefail\n" + example.script
    started = time.monotonic()
    try:
        result = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, text=True,
                                capture_output=True, stdin=subprocess.DEVNULL,
                                timeout=TIMEOUT)
    finally:
        _clean_up(kafka_admin, topics_before, girder_client, collection_before)
    seconds = time.monotonic() - started
    assert result.returncode == 0, (
        f"{example.id} exited with {result.returncode} after {seconds:.1f}s\n"
        f"--- script ---\n{example.script}--- stdout ---\n{result.stdout}"
        f"--- stderr ---\n{result.stderr}")


def _clean_up(kafka_admin, topics_before: set[str], girder_client,
              collection_before: str | None) -> None:
    """Delete the example's topics, and the docs collection if the example made it."""
    new = sorted(t for t in _topics(kafka_admin) - topics_before if t.startswith(TOPIC_PREFIX))
    if new:
        # The admin client must outlive the futures (the session fixture does).
        futures = kafka_admin.delete_topics(new, operation_timeout=30)
        for future in futures.values():
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001 - cleanup is best effort
                pass
    collection = _docs_collection_id(girder_client)
    if collection is not None and collection_before is None:
        girder_client.delete(f"collection/{collection}")
