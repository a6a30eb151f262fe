"""The consumer's command line: ``GirderUploadStreamProcessor`` (a drop-in for
OpenMSIStream's command, every argument and default kept) and ``girder-upload-stream run``
(the same options; its ``--config`` defaults to the bundled ``local`` config).

Both run the Prefect flow in-process. SIGINT, SIGTERM and ``q`` stop it gracefully:
stop fetching, finish or record in-flight uploads, commit what is safe, write the
registries, exit 0. Before the flow starts they log in to Girder and resolve the root
folder: a refused key, an unreachable Girder or a root folder that does not resolve
ends the command with one line on standard error and exit status 2, before anything
is consumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from girder_upload_stream.settings import DEFAULT_COLLECTION_NAME

__all__ = ["add_run_arguments", "positive_int", "run_from_args", "processor_main"]

UNSUPPORTED = {
    "log_topic_name": "log messages to a Kafka topic",
    "log_program_id": "log messages to a Kafka topic",
    "log_interval_secs": "log messages to a Kafka topic",
    "treat_undecryptable_as_plaintext": "KafkaCrypto encryption",
    "max_wait_per_decrypt": "KafkaCrypto encryption",
    "max_initial_wait_per_decrypt": "KafkaCrypto encryption",
}
LEVELS = ["debug", "info", "warning", "error", "critical"]


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"lab\": \"x\"}'")
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


def _add_girder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("girder_api_url", help="Girder REST API URL, e.g. http://host/api/v1")
    parser.add_argument("girder_api_key", nargs="?", default=None,
                        help="Girder API key (default: $GIRDER_API_KEY, which keeps it out "
                             "of the process list)")
    parser.add_argument("--girder_root_folder_id", help="id of the root folder to upload below")
    parser.add_argument("--collection_name", default=DEFAULT_COLLECTION_NAME,
                        help="collection of the root folder when no id is given "
                             "(default: %(default)s)")
    parser.add_argument("--girder_root_folder_path",
                        help="root folder path below the collection, every part a folder "
                             "(default: '{collection_name}/{topic_name}', i.e. "
                             "/collection/C/C/TOPIC, as OpenMSIStream 1.8.8); created if "
                             "missing")
    parser.add_argument("--metadata", type=_json_object,
                        help="JSON object added to every item's and folder's metadata")
    parser.add_argument("--replace_existing", action="store_true",
                        help="replace an item's contents when a different file of the same "
                             "name is already there (default: skip with a warning)")


def _add_kafka(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config,
                        help="config file path, or a bundled config name (default: %(default)s)")
    parser.add_argument("--topic_name", default="test", help="topic (default: %(default)s)")
    parser.add_argument("--n_threads", type=positive_int, default=2,
                        help="consumers in the group, and uploads at once (default: %(default)s)")
    parser.add_argument("--consumer_group_id", default="create_new",
                        help="consumer group; 'create_new' makes a fresh one (default)")
    parser.add_argument("--download_regex",
                        help="only files whose relative path matches are uploaded")
    parser.add_argument("--heartbeat_topic_name", help="topic for heartbeat messages")
    parser.add_argument("--heartbeat_program_id", help="heartbeat key prefix")
    parser.add_argument("--heartbeat_interval_secs", type=float, default=30,
                        help="seconds between heartbeats (default: %(default)s)")
    for name in UNSUPPORTED:
        parser.add_argument(f"--{name}", default=None, nargs="?", const=True,
                            help=argparse.SUPPRESS)


def add_run_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    """Every option of OpenMSIStream's GirderUploadStreamProcessor, plus ours."""
    _add_girder(parser)
    _add_kafka(parser, default_config)
    parser.add_argument("--output_dir", type=Path,
                        default=Path("GirderUploadStreamProcessor_output"),
                        help="registries, logs and (disk mode) files (default: %(default)s)")
    parser.add_argument("--mode", choices=["memory", "disk", "both"], default="memory",
                        help="where files are rebuilt (default: %(default)s)")
    parser.add_argument("--logger_stream_level", choices=LEVELS, default="info")
    parser.add_argument("--logger_file_level", choices=LEVELS, default="info")
    parser.add_argument("--logger_file_path", type=Path,
                        help="folder of the log file and registries (default: OUTPUT_DIR/LOGS)")
    parser.add_argument("--update_seconds", type=float, default=300,
                        help="seconds between the '.' alive lines (default: %(default)s)")
    parser.add_argument("--max_idle_seconds", type=float,
                        help="stop after this long with no new message and nothing in flight")
    parser.add_argument("--max_runtime_seconds", type=float, help="stop after this long")
    parser.add_argument("--stale_partial_seconds", type=float, default=3600,
                        help="a file missing chunks for this long stops holding back offset "
                             "commits and is registered as failed; 0 = never "
                             "(default: %(default)s)")
    parser.add_argument("--memory_budget_mb", type=positive_int, default=1024,
                        help="pause fetching while files held in RAM exceed this "
                             "(default: %(default)s)")


def _setup_logging(args: argparse.Namespace) -> None:
    logs_dir = args.logger_file_path or args.output_dir / "LOGS"
    logs_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("girder_upload_stream")
    root.setLevel(logging.DEBUG)
    # Our handlers own the console and file output; no second copy via the root logger.
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler, level in ((logging.StreamHandler(sys.stderr), args.logger_stream_level),
                           (logging.FileHandler(logs_dir / "GirderUploadStreamProcessor.log",
                                                encoding="utf-8"), args.logger_file_level)):
        handler.setLevel(level.upper())
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _install_signal_handlers() -> None:
    from girder_upload_stream.runner import request_stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: request_stop(signal.Signals(signum).name))


def _check_girder(args: argparse.Namespace, api_key: str) -> None:
    """Log in and resolve the root folder before Prefect starts, so that a wrong key
    fails fast with one line (raised as GirderStartupError) and no flow-run traceback.
    The flow checks again; the store it shares with this check has the answer cached."""
    from girder_upload_stream.assemble import girder_settings
    from girder_upload_stream.girder_io import store_for
    settings = girder_settings(
        args.girder_api_url, api_key, root_folder_id=args.girder_root_folder_id,
        collection_name=args.collection_name, root_folder_path=args.girder_root_folder_path,
        metadata=args.metadata or {}, replace_existing=args.replace_existing)
    store_for(settings, args.topic_name).check()


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate, then run the flow until it stops; 0 on a graceful stop."""
    given = [f"--{name}" for name in UNSUPPORTED if getattr(args, name) is not None]
    if given:
        parser.error(f"{', '.join(given)}: not supported by girder-upload-stream "
                     f"({UNSUPPORTED[given[0][2:]]} is not implemented)")
    api_key = args.girder_api_key or os.environ.get("GIRDER_API_KEY")
    if not api_key:
        parser.error("no Girder API key: pass it or set GIRDER_API_KEY")
    _setup_logging(args)
    _install_signal_handlers()
    _check_girder(args, api_key)
    # The key travels by environment, never as a flow parameter (Prefect stores those).
    os.environ["GIRDER_API_KEY"] = api_key
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary (ephemeral) server can take >20 s to start on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from girder_upload_stream.flows.upload_stream import upload_stream
    summary = upload_stream(
        topic_name=args.topic_name, config=args.config, girder_api_url=args.girder_api_url,
        girder_root_folder_id=args.girder_root_folder_id,
        collection_name=args.collection_name, girder_root_folder_path=args.girder_root_folder_path,
        metadata=args.metadata, replace_existing=args.replace_existing, n_threads=args.n_threads,
        consumer_group_id=args.consumer_group_id, download_regex=args.download_regex,
        output_dir=str(args.output_dir), mode=args.mode, update_seconds=args.update_seconds,
        max_idle_seconds=args.max_idle_seconds, max_runtime_seconds=args.max_runtime_seconds,
        heartbeat_topic_name=args.heartbeat_topic_name,
        heartbeat_program_id=args.heartbeat_program_id,
        heartbeat_interval_secs=args.heartbeat_interval_secs,
        memory_budget_mb=args.memory_budget_mb, interactive=True,
        stale_partial_seconds=args.stale_partial_seconds or None,
        logs_dir=str(args.logger_file_path) if args.logger_file_path else None)
    print(f"stopped ({summary['stopped_because']}): {summary['messages_read']} messages read, "
          f"{summary['files_uploaded']} files uploaded, {summary['files_skipped']} already in "
          f"Girder, {summary['files_failed']} failed, {summary['files_found_in_girder']} "
          f"re-read and found in Girder", flush=True)
    return 0


def processor_main(argv: list[str] | None = None) -> int:
    """Entry point of the ``GirderUploadStreamProcessor`` command."""
    parser = argparse.ArgumentParser(
        prog="GirderUploadStreamProcessor",
        description="Read OpenMSIStream chunk messages from a topic, rebuild the files and "
                    "upload them to Girder (girder-upload-stream's drop-in for OpenMSIStream's "
                    "command). Type 'c' to check progress, 'q' to quit.")
    add_run_arguments(parser, default_config="test")
    from girder_upload_stream.cli import run_guarded
    return run_guarded(lambda: run_from_args(parser.parse_args(argv), parser))
