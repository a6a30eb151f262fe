"""Every option of a consumer run, defined once.

The command lines (``GirderUploadStreamProcessor`` and ``girder-upload-stream run``) get
their arguments from :data:`OPTIONS`, and the Prefect flow's parameters take their
defaults from :data:`DEFAULTS`, so a default lives in one place (a unit test checks that
the flow's signature agrees). Also the argparse value checks the options use.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from girder_upload_stream.wire.codec import DEFAULT_MAX_FILE_BYTES, MAX_POSSIBLE_FILE_BYTES
from girder_upload_stream.settings import DEFAULT_COLLECTION_NAME

__all__ = ["Option", "OPTIONS", "DEFAULTS", "LEVELS", "DEFAULT_TOPIC", "positive_int",
           "positive_float", "non_negative_float", "json_object", "file_size_mb", "log_level",
           "add_options", "flow_arguments", "consumed_topic"]

LEVELS = ["notset", "debug", "info", "warning", "error", "critical"]

#: The default of --topic_name, --consumer_topic_name and --producer_topic_name.
DEFAULT_TOPIC = "test"


def log_level(text: str) -> int:
    """argparse type of the --logger_*_level options, as OpenMSIStream 1.8.8 reads them:
    a level name in any case (``info``, ``WARNING``) or a number >= 0 (``20``)."""
    name = text.strip().lower()
    if name in LEVELS:
        return 0 if name == "notset" else 10 * LEVELS.index(name)
    try:
        value = int(name)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a log level: {text!r} (one of {', '.join(LEVELS)}, any case, or a "
            "number >= 0)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a log level is 0 or more, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a usage error (exit 2) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _number(text: str, ok: Callable[[float], bool], rule: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(rule)
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (OpenMSIStream's type of the interval options)."""
    return _number(text, lambda value: value > 0, "must be a positive number")


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (seconds that may be none)."""
    return _number(text, lambda value: value >= 0, "must be zero or more")


def json_object(text: str) -> dict[str, Any]:
    """argparse type of --metadata: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"lab\": \"x\"}'")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0, with a usage error (exit 2) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def file_size_mb(text: str) -> int:
    """argparse type of --max_file_size_mb: 1 MiB up to what a file offset holds."""
    value = positive_int(text)
    if value > MAX_POSSIBLE_FILE_BYTES >> 20:
        raise argparse.ArgumentTypeError(f"at most {MAX_POSSIBLE_FILE_BYTES >> 20} "
                                         "(2**63 bytes: no file can be larger)")
    return value


@dataclass(frozen=True)
class Option:
    """One option: ``name`` is the flow parameter and the flag (``--name``) unless
    ``flag`` says otherwise; ``flow``/``cli`` say where it exists; ``parse`` checks and
    converts the command-line text; ``to_flow`` converts the parsed value for the flow."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without value (store_true)
    flag: str | None = None
    flow: bool = True
    cli: bool = True
    to_flow: Callable[[Any], Any] | None = None

    @property
    def flag_name(self) -> str:
        return f"--{self.flag or self.name}"


def _path_or_none(value: Path | None) -> str | None:
    return None if value is None else str(value)


OPTIONS: tuple[Option, ...] = (
    # -- Girder
    Option("girder_root_folder_id", None, "id of the root folder to upload below; when "
           "given, --collection_name and --girder_root_folder_path are not used (default: "
           "none)"),
    Option("collection_name", DEFAULT_COLLECTION_NAME,
           "collection of the root folder when no id is given (default: %(default)s)"),
    Option("girder_root_folder_path", None,
           "root folder path below the collection, every part a folder (default: "
           "'{collection_name}/{topic_name}', i.e. /collection/C/C/TOPIC, as OpenMSIStream "
           "1.8.8); created if missing"),
    Option("metadata", None, "JSON object added to every item's and folder's metadata "
           "(default: none)", parse=json_object),
    Option("replace_existing", False, "replace an item's contents when a different file "
           "of the same name is already there (default: skip with a warning)", switch=True),
    # -- Kafka
    Option("topic_name", DEFAULT_TOPIC, "topic (default: %(default)s)"),
    Option("n_threads", 2, "uploads running at once (default: %(default)s)", parse=positive_int),
    Option("consumer_group_id", "create_new",
           "consumer group; 'create_new' makes a fresh one at every start (default: "
           "%(default)s)"),
    Option("download_regex", None, "only files whose path relative to the producer's "
           "folder matches this regular expression from its start (Python re.match, as "
           "OpenMSIStream 1.8.8) are uploaded; others are counted as skipped (default: "
           "every file)"),
    Option("heartbeat_topic_name", None, "topic for heartbeat messages (default: none, no "
           "heartbeats)"),
    Option("heartbeat_program_id", None, "heartbeat key prefix (default: "
           "girder-upload-stream-{group id})"),
    Option("heartbeat_interval_secs", 900, "seconds between heartbeats (default: "
           "%(default)s, as OpenMSIStream 1.8.8)", parse=positive_float),
    Option("log_topic_name", None, "topic for log messages (the program's log lines; "
           "default: none, no log messages)"),
    Option("log_program_id", None, "log message key prefix (default: "
           "girder-upload-stream-{group id})"),
    Option("log_interval_secs", 60, "seconds between log messages (default: %(default)s)",
           parse=positive_float),
    Option("treat_undecryptable_as_plaintext", False, "KafkaCrypto: read messages that are "
           "not KafkaCrypto messages at all as plaintext (default: register them as failed)",
           switch=True),
    Option("max_wait_per_decrypt", 5.0, "KafkaCrypto: seconds a message waits for its "
           "decryption key, once a first message had to be given up (default: %(default)s)",
           parse=positive_float),
    Option("max_initial_wait_per_decrypt", 60.0, "KafkaCrypto: seconds a message waits for "
           "its decryption key until then (default: %(default)s)", parse=positive_float),
    # -- the run
    Option("output_dir", "GirderUploadStreamProcessor_output",
           "registries, logs and (disk mode) files being rebuilt (default: %(default)s)",
           parse=Path, to_flow=str),
    Option("mode", "memory", "where files are rebuilt (default: %(default)s)",
           choices=("memory", "disk", "both")),
    Option("logger_stream_level", "info", "console log level: a name (debug, info, "
           "warning, error, critical; any case) or a number (default: %(default)s)",
           parse=log_level, flow=False),
    Option("logger_file_level", "warning", "log file level, as --logger_stream_level "
           "(default: %(default)s, as OpenMSIStream 1.8.8)", parse=log_level, flow=False),
    Option("logs_dir", None, "folder of the log file and registries (default: LOGS in "
           "the --output_dir folder)",
           parse=Path, flag="logger_file_path", to_flow=_path_or_none),
    Option("update_seconds", 300, "seconds between the '.' alive lines (default: %(default)s)",
           parse=float),
    Option("progress_seconds", 30, "seconds between the progress lines on standard error "
           "(files and bytes done, lag, rate); 0 = none (default: %(default)s)",
           parse=non_negative_float),
    Option("upload_linger_seconds", 5.0, "seconds completed files may wait for more to share "
           "their upload unit (one Prefect task run) unless they fill one; only while units "
           "are task runs of a flow run (without one a unit costs nothing and files never "
           "wait); 0 = none (default: %(default)s)", parse=non_negative_float),
    Option("max_idle_seconds", None,
           "stop after this long with no new message and nothing in flight (default: none, "
           "run until stopped)", parse=float),
    Option("max_runtime_seconds", None, "stop after this long (default: none, run until "
           "stopped)", parse=float),
    Option("stale_partial_seconds", 3600,
           "a file missing chunks for this long stops holding back offset commits and is "
           "registered as failed; 0 = never (default: %(default)s)", parse=float),
    Option("memory_budget_mb", 1024, "MiB of RAM for files: Kafka's prefetch, the poll batch "
           "and the upload blocks are sized from it, and file bytes (being rebuilt, waiting "
           "for or in an upload) get the rest; past that, files being rebuilt are spilled "
           "to the staging folder and fetching pauses while uploads free memory (default: "
           "%(default)s)",
           parse=positive_int),
    Option("stream_min_mb", 64, "files of at least this many MiB stream into Girder while "
           "they arrive (from their last chunk on: Girder needs the size); 0 = never "
           "(default: %(default)s)", parse=non_negative_int),
    Option("max_file_size_mb", DEFAULT_MAX_FILE_BYTES >> 20,
           "largest file accepted, in MiB; a chunk that cannot belong to a file this size "
           "is rejected at once (default: %(default)s = 1 TiB)", parse=file_size_mb),
    Option("max_files_in_progress", 1000, "files being rebuilt at once, at most (each may "
           "hold a staging file in disk mode until it completes or is stale); a chunk that "
           "would begin one more waits, uncommitted, and is read again once files complete "
           "(default: %(default)s)", parse=positive_int),
    Option("max_parallel_uploads", 16, "most small files (up to 4 MiB) uploading to Girder "
           "at once: from --n_threads the number grows while Girder keeps up and shrinks, "
           "down to 1, when its latency grows or it refuses uploads (default: "
           "%(default)s)", parse=positive_int),
    Option("dead_letter_topic", None, "existing topic that receives every rejected message "
           "unchanged, with the reason, source topic, partition and offset in its headers; "
           "source offsets are committed only once the broker acknowledged them (default: "
           "the config file's [dead_letter] topic, else none)"),
    Option("rekey_by_file", False, "re-key chunks by file on Kafka, so that several consumers "
           "of one group rebuild files of several chunks: the group re-produces the topic to "
           "an internal topic keyed by file (named after the topic and group, ending in "
           "by-file), which a second group reads (default: off, unless the config file's [rekey_by_file] "
           "says enabled = true; refused with KafkaCrypto configs)", switch=True),
    # -- accepted for OpenMSIStream 1.8.8's command lines
    Option("consumer_topic_name", DEFAULT_TOPIC, "topic to consume, as OpenMSIStream 1.8.8: "
           "when given (and not 'test') it is used instead of --topic_name "
           "(default: %(default)s)", flow=False),
    Option("producer_topic_name", DEFAULT_TOPIC, "accepted and ignored, as OpenMSIStream "
           "1.8.8's GirderUploadStreamProcessor ignores it: nothing is produced but "
           "heartbeats and log messages (default: %(default)s)", flow=False),
)

#: ``DEFAULTS.name``: the one default of each option (the flow's signature uses them).
DEFAULTS = SimpleNamespace(**{option.name: option.default for option in OPTIONS})


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                names: set[str] | None = None) -> None:
    """Add the command-line options (all, or those in ``names``) to ``parser``."""
    for option in OPTIONS:
        if not option.cli or (names is not None and option.name not in names):
            continue
        if option.switch:
            parser.add_argument(option.flag_name, dest=option.name, action="store_true",
                                help=option.help)
            continue
        parser.add_argument(option.flag_name, dest=option.name, default=option.default,
                            type=option.parse, choices=option.choices, help=option.help,
                            # named after the flag, never the internal name (logs_dir)
                            metavar=None if option.choices else
                            (option.flag or option.name).upper())


def consumed_topic(args: argparse.Namespace) -> str:
    """The topic a command line consumes, by OpenMSIStream 1.8.8's rule:
    ``--consumer_topic_name`` unless it is left at its default, else ``--topic_name``."""
    consumer_topic = getattr(args, "consumer_topic_name", None)
    if consumer_topic and consumer_topic != DEFAULT_TOPIC:
        return consumer_topic
    return args.topic_name


def flow_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's keyword arguments from parsed command-line options."""
    values = {}
    for option in OPTIONS:
        if option.flow and option.cli:
            value = getattr(args, option.name)
            values[option.name] = option.to_flow(value) if option.to_flow else value
    values["topic_name"] = consumed_topic(args)
    return values
