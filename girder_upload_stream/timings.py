"""Every delay, limit and grace period of a consumer run, in one typed configuration.

The defaults are the production values. Each one can be set from outside the process
by an environment variable ``GUS_TIMING_<FIELD NAME IN CAPITALS>`` (seconds; the upload
retry delays as a comma-separated list), e.g. ``GUS_TIMING_SHUTDOWN_GRACE_SECONDS=3``.
They are not command-line options: an operator has no reason to change them, but tests
(and a deployment with unusual needs) can without touching the code. docs/configuration.md
("Timing settings") lists them; a unit test keeps that table equal to :data:`FIELDS`.

The modules that wait read :func:`current` where they use a value (at the start of a
run, or when a retry policy is built), so a test sets a variable for the program it
starts, or wraps an in-process run in :func:`overridden`. Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = ["Timings", "FIELDS", "ENV_PREFIX", "current", "from_env", "overridden", "env_name"]

ENV_PREFIX = "GUS_TIMING_"


@dataclass(frozen=True)
class Timings:
    """The run's timings (seconds). Metadata ``doc`` is the text of the docs table."""

    upload_retry_delays: tuple[float, ...] = field(default=(2.0, 10.0, 30.0), metadata={
        "doc": "waits before the first retries of a file whose upload met a transient error "
               "(Girder unreachable, 429, 5xx, a refused token); each later wait is twice "
               "the one before (retry_policy.py)"})
    upload_retry_max_seconds: float = field(default=300.0, metadata={
        "doc": "the cap of those waits: a file that keeps failing transiently is tried "
               "again at least this often while the run lasts, its messages uncommitted"})
    ledger_retry_seconds: float = field(default=15.0, metadata={
        "doc": "wait before a re-read file that Girder could not be asked about (restart "
               "check) is looked up again"})
    stuck_group_seconds: float = field(default=60.0, metadata={
        "doc": "a consumer group unsettled this long counts as stuck; its consumer is "
               "replaced once the broker answers (a broker restart settles within about "
               "15 s; a join may wait for the slowest member's rebalance callback)"})
    stuck_check_seconds: float = field(default=10.0, metadata={
        "doc": "while the group is stuck, how often the broker is asked whether it answers"})
    close_stuck_seconds: float = field(default=20.0, metadata={
        "doc": "how long a stuck consumer may take to close before it is left behind"})
    shutdown_grace_seconds: float = field(default=20.0, metadata={
        "doc": "at shutdown, how long running uploads may take to finish"})
    commit_patience_seconds: float = field(default=30.0, metadata={
        "doc": "a commit with no answer for this long is sent again"})
    rekey_purge_seconds: float = field(default=30.0, metadata={
        "doc": "with --rekey_by_file, how often at most the internal topic's records below "
               "the second hop's accepted commits are deleted (delete_records; the first time "
               "this long after the start)"})
    rekey_topic_visible_seconds: float = field(default=10.0, metadata={
        "doc": "with --rekey_by_file, how long the internal topic's partitions may take to "
               "appear in the broker's metadata after the topic is created, asked again "
               "every 0.2 s, before the run stops with an error"})
    flow_run_start_seconds: float = field(default=120.0, metadata={
        "doc": "a command-line run with a Prefect API consumes while its flow run is "
               "created; a run that ends first waits this long for it (to record its end)"})

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(not isinstance(v, (int, float)) or v < 0 for v in values):
                raise ValueError(f"timing {item.name} must be zero or more seconds, "
                                 f"not {value!r}")


#: The fields, in the order of the docs table.
FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(Timings)


def env_name(name: str) -> str:
    """The environment variable of the field ``name``."""
    return ENV_PREFIX + name.upper()


def _parse(item: dataclasses.Field, text: str) -> float | tuple[float, ...]:
    """One variable's value; a ValueError names the variable."""
    many = item.name == "upload_retry_delays"
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or (not many and len(values) > 1) or min(values) < 0:
        what = "comma-separated seconds" if many else "seconds"
        raise ValueError(f"{env_name(item.name)}={text!r}: expected {what}, zero or more")
    return values if many else values[0]


def from_env(env: Mapping[str, str]) -> Timings:
    """The timings with every ``GUS_TIMING_*`` variable of ``env`` applied."""
    values = {item.name: _parse(item, env[env_name(item.name)])
              for item in FIELDS if env.get(env_name(item.name), "").strip()}
    return Timings(**values)


_override: Timings | None = None
_from_env: Timings | None = None


def current() -> Timings:
    """The timings in force: an :func:`overridden` block's, else the environment's (read
    once per process: its variables are set before the program starts)."""
    global _from_env
    if _override is not None:
        return _override
    if _from_env is None:
        _from_env = from_env(os.environ)
    return _from_env


@contextlib.contextmanager
def overridden(**values: float | tuple[float, ...]) -> Iterator[Timings]:
    """Run the ``with`` block (in this process) with some timings changed."""
    global _override
    previous = _override
    _override = dataclasses.replace(current(), **values)
    try:
        yield _override
    finally:
        _override = previous
