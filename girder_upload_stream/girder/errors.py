"""Girder's answers as the project's errors, and the names Girder stores.

girder-client raises ``requests`` exceptions whose texts quote the request's URL, and
``HttpError`` with Girder's answer. :func:`translate` turns them into
:class:`GirderTransientError` (retry: 429, 5xx), :class:`GirderUnreachableError` (a
transient one: no answer at all), :class:`GirderAuthError` (a transient one: the key or
its token was refused) or :class:`GirderTerminalError` (record and move on: other 4xx),
built from texts with the secrets masked (:func:`~girder_upload_stream.redact.redact`);
the library's exception is never kept in them. Every HTTP answer's error keeps its
``status``; the two 400 answers the store acts on get their own class here, the one
place that reads Girder's answer: :class:`GirderUnknownIdError` ("Invalid folder id")
and :class:`GirderNameTakenError` ("A folder with that name already exists here").
Callers decide by class and ``status``, never by an error's text.
"""

from __future__ import annotations

import json
import re

from girder_upload_stream.errors import (AuthenticationError, FatalError,
                                         GirderUploadStreamError, TerminalError, TransientError,
                                         UnreachableError)
from girder_upload_stream.redact import redact

__all__ = ["LOGIN", "GirderTransientError", "GirderTerminalError", "GirderAuthError",
           "GirderUnreachableError", "GirderUnknownIdError", "GirderNameTakenError",
           "GirderStartupError", "GirderRootFolderGone", "girder_name", "translate"]

#: The ``what`` of the log-in request: a 400/403 answer to it means a refused key.
LOGIN = "log in"


class GirderTransientError(TransientError):
    """Girder could not be reached or answered 429/5xx: retry later. ``status``: the
    HTTP status of its answer (None: no answer)."""

    status: int | None = None


class GirderUnreachableError(GirderTransientError, UnreachableError):
    """No answer from Girder (connection refused or reset, a timeout)."""


class GirderTerminalError(TerminalError):
    """Girder refused the request for a reason a retry will not fix. ``status``: the
    HTTP status of its answer (None: refused before any request)."""

    status: int | None = None


class GirderUnknownIdError(GirderTerminalError):
    """Girder answered 400 "Invalid <model> id": it does not know that document (deleted
    since, or never readable with this key). ``model``: "folder", "item"..."""

    model: str = ""


class GirderNameTakenError(GirderTerminalError):
    """Girder refused to create a document whose name is taken in its parent (400 "A
    folder with that name already exists here."). ``taken_by``: what holds the name
    ("folder", "item", "collection"...)."""

    taken_by: str = ""


class GirderAuthError(GirderTransientError, AuthenticationError):
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


#: Girder's texts for the 400 answers that get a class of their own (Girder 3-5: a
#: ``RestException`` of ``describe.py``'s model loading, a ``ValidationException`` of the
#: models' name checks); the group names the model.
_UNKNOWN_ID = re.compile(r"Invalid (\w+) id \(")
_NAME_TAKEN = re.compile(r"An? (\w+) with that name already exists")


def _answer_class(what: str, status: int, message: str
                  ) -> tuple[type[GirderUploadStreamError], dict[str, str]]:
    """The class of our error for Girder's answer ``status`` with ``message`` (the text
    of its JSON answer), and the attributes it gets."""
    if status == 401 or (what == LOGIN and status in (400, 403)):
        return GirderAuthError, {}
    if status == 429 or status >= 500:
        return GirderTransientError, {}
    if status == 400:
        found = _UNKNOWN_ID.match(message)
        if found:
            return GirderUnknownIdError, {"model": found.group(1).lower()}
        found = _NAME_TAKEN.match(message)
        if found:
            return GirderNameTakenError, {"taken_by": found.group(1).lower()}
    return GirderTerminalError, {}


def translate(exc: Exception, what: str, rel_path: str | None,
              secrets: tuple[str, ...]) -> GirderUploadStreamError | None:
    """Our error for a library exception (None: not a request error), built from texts
    with the secrets masked; the library's exception itself is never kept."""
    import requests
    from girder_client import HttpError
    if isinstance(exc, HttpError):
        status = exc.status
        message = _server_message(exc.responseText or "")
        cls, attributes = _answer_class(what, status, message)
        error = cls(f"{what}: HTTP {status}: {redact(message, secrets)[:300]}",
                    rel_path=rel_path)
        error.status = status  # type: ignore[attr-defined] - every class here has it
        for name, value in attributes.items():
            setattr(error, name, value)
        return error
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return GirderUnreachableError(f"{what}: Girder unreachable: {redact(exc, secrets)}",
                                      rel_path=rel_path)
    if isinstance(exc, requests.RequestException):
        return GirderTransientError(f"{what}: {redact(exc, secrets)}", rel_path=rel_path)
    return None
