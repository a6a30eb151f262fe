"""How many Girder requests the current thread has made: the adaptive upload limit
divides an upload's time by the requests it made (loop/concurrency.py).

Why a leaf module: the Girder module counts (:func:`note_request`, one call per
request) and the upload loop reads (:func:`requests_made`), and neither imports the
other. No import beyond the standard library.
"""

from __future__ import annotations

import threading

__all__ = ["note_request", "requests_made"]

_local = threading.local()


def note_request() -> None:
    """Count one Girder request made by this thread."""
    _local.count = getattr(_local, "count", 0) + 1


def requests_made() -> int:
    """Girder requests this thread has made so far (a running count: take differences)."""
    return getattr(_local, "count", 0)
