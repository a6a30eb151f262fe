"""Girder's answers as the project's errors, and the names Girder stores.

girder-client raises ``requests`` exceptions whose texts quote the request's URL, and
``HttpError`` with Girder's answer. :func:`translate` turns them into
:class:`GirderTransientError` (retry: connection errors, 429, 5xx),
:class:`GirderAuthError` (a transient one: the key or its token was refused) or
:class:`GirderTerminalError` (record and move on: other 4xx), built from texts with the
secrets masked (:func:`~girder_upload_stream.redact.redact`); the library's exception
is never kept in them.
"""

from __future__ import annotations

import json
import re

from girder_upload_stream.errors import (FatalError, GirderUploadStreamError, TerminalError,
                                         TransientError)
from girder_upload_stream.redact import redact

__all__ = ["LOGIN", "GirderTransientError", "GirderTerminalError", "GirderAuthError",
           "GirderStartupError", "GirderRootFolderGone", "girder_name", "translate"]

#: The ``what`` of the log-in request: a 400/403 answer to it means a refused key.
LOGIN = "log in"


class GirderTransientError(TransientError):
    """Girder could not be reached or answered 429/5xx: retry later."""


class GirderTerminalError(TerminalError):
    """Girder refused the request for a reason a retry will not fix."""


class GirderAuthError(GirderTransientError):
    """Girder did not accept the API key at log-in (Girder 5 answers 400), or no longer
    accepts the token it gave (401: expired, or revoked with its key). Transient on
    purpose: a file never fails for good because of it; it waits, its messages stay
    uncommitted, and the thread's client logs in again at its next request."""


class GirderStartupError(GirderUploadStreamError):
    """The consumer cannot start: Girder refused the key, could not be reached, or the
    root folder does not resolve. Raised before anything is consumed."""


class GirderRootFolderGone(FatalError):
    """The root folder given by id is no longer in Girder (deleted, or no longer readable
    with the key) while the consumer runs: nothing can be uploaded, and a folder the
    operator named by id is not for the consumer to make again. Neither transient nor
    terminal: the run stops with this error (exit status 2); the file whose upload met
    it stays uncommitted, for the next run."""


def girder_name(name: str, kind: str = "item") -> str:
    """The name Girder stores for ``name``: it strips leading and trailing white space
    (Python's ``str.strip``) of item, folder and collection names, but looks them up by
    the exact name given. A name that is empty once stripped cannot be stored."""
    stored = name.strip()
    if not stored:
        raise GirderTerminalError(f"the {kind} name {name!r} is empty once Girder strips "
                                  f"its leading and trailing spaces")
    return stored


#: What an HTML answer means: the URL is not the REST API's (``.../api`` without ``/v1``).
NOT_THE_API = ("an HTML page, not an answer of Girder's REST API: is the URL the REST "
               "API's, ending in /api/v1?")


def _server_message(text: str) -> str:
    """Girder's ``{"message": ..., "type": ...}`` answer as its message alone, on one
    line; an HTML page is named as such (:data:`NOT_THE_API`), never quoted."""
    try:
        answer = json.loads(text)
    except ValueError:
        if re.search(r"<\s*(!doctype|html|head|body|h[1-6]|p)\b", text, re.IGNORECASE):
            return NOT_THE_API
        return " ".join(text.split())
    return str(answer.get("message", text)) if isinstance(answer, dict) else text


def translate(exc: Exception, what: str, rel_path: str | None,
              secrets: tuple[str, ...]) -> GirderUploadStreamError | None:
    """Our error for a library exception (None: not a request error), built from texts
    with the secrets masked; the library's exception itself is never kept."""
    import requests
    from girder_client import HttpError
    if isinstance(exc, HttpError):
        status = exc.status
        text = redact(_server_message(exc.responseText or ""), secrets)[:300]
        if status == 401 or (what == LOGIN and status in (400, 403)):
            cls: type[GirderUploadStreamError] = GirderAuthError
        elif status == 429 or status >= 500:
            cls = GirderTransientError
        else:
            cls = GirderTerminalError
        return cls(f"{what}: HTTP {status}: {text}", rel_path=rel_path)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return GirderTransientError(f"{what}: Girder unreachable: {redact(exc, secrets)}",
                                    rel_path=rel_path)
    if isinstance(exc, requests.RequestException):
        return GirderTransientError(f"{what}: {redact(exc, secrets)}", rel_path=rel_path)
    return None
