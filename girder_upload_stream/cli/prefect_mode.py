"""Which way the commands run: as a Prefect flow run, when a Prefect API is configured,
or without Prefect otherwise.

Without an API Prefect would start a temporary API server in a child process (about
10 s on an idle two-core machine, ~200 MB, left running for ever if the command is
killed with SIGKILL) and record the run in a database nobody looks at; so the
commands then run the same steps without Prefect (:mod:`girder_upload_stream.loop.session`).

Finding out must not cost Prefect's import (seconds): ``PREFECT_API_URL`` in the
environment answers at once; only when a Prefect settings source that could name an
API exists (a profile, ``.env``, ``prefect.toml`` or ``pyproject.toml`` in the working
folder) are Prefect's own settings asked.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["prefect_api_url"]


def _mentions(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _settings_may_name_an_api() -> bool:
    """True when a Prefect settings source besides the environment could set the API
    URL (cheap file checks; False means Prefect's settings would say there is none)."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    cwd = Path.cwd()
    return (_mentions(profiles.expanduser(), "PREFECT_API_URL")
            or _mentions(cwd / ".env", "PREFECT_API_URL")
            or (cwd / "prefect.toml").is_file()
            or _mentions(cwd / "pyproject.toml", "tool.prefect"))


def prefect_api_url() -> str | None:
    """The Prefect API URL this process's flow runs would report to, or None when no
    API is configured (Prefect would start a temporary server)."""
    url = os.environ.get("PREFECT_API_URL")
    if url is not None:
        return url.strip() or None
    if not _settings_may_name_an_api():
        return None
    from prefect.settings import Settings
    return Settings().api.url or None  # read from its sources now, as a new process would
