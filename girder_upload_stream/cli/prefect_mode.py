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
import urllib.error
import urllib.request
from pathlib import Path

from girder_upload_stream.errors import TerminalError

__all__ = ["prefect_api_url", "check_prefect_api", "PrefectUnreachableError",
           "PREFECT_CHECK_SECONDS"]

#: How long the start waits for the Prefect API's first answer.
PREFECT_CHECK_SECONDS = 10.0


class PrefectUnreachableError(TerminalError):
    """The configured Prefect API does not answer: the run would fail after joining the
    group, with Prefect's tracebacks; the command stops before, with one line."""


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


def check_prefect_api(url: str, timeout: float = PREFECT_CHECK_SECONDS) -> None:
    """Raise :class:`PrefectUnreachableError` when nothing answers HTTP at ``url``. Any
    HTTP answer (even 401 or 404: a server is there) passes; Prefect itself then says
    what is wrong."""
    source = "PREFECT_API_URL" if os.environ.get("PREFECT_API_URL") else \
        "PREFECT_API_URL of the Prefect profile"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrefectUnreachableError(
            f"cannot start: no Prefect API answers at {url} ({reason}); start the Prefect "
            f"server (make prefect-up), or unset {source} to run without Prefect") from None
