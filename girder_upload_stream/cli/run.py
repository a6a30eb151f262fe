"""The consumer's command line: ``GirderUploadStreamProcessor`` (a drop-in for
OpenMSIStream's command, every argument and default kept) and ``girder-upload-stream run``
(the same options; its ``--config`` defaults to the bundled ``local`` config).

With a Prefect API configured (``PREFECT_API_URL``, or a Prefect profile) both run the
Prefect flow in-process, recorded as a flow run: the run consumes at once while a
background thread imports Prefect and creates the flow run, which then records it
(:mod:`girder_upload_stream.prefect_glue.late_flow_run`); without one they run the same
steps without Prefect (:mod:`girder_upload_stream.loop.session`): no Prefect import, no
temporary API server, nothing left running if the command is killed. The first log
lines say which. SIGINT, SIGTERM and ``q`` stop it gracefully:
stop fetching, finish or record in-flight uploads, commit what is safe, write the
registries, exit 0. Before anything else they log in to Girder and resolve the root
folder, once: a refused key, an unreachable Girder or a
root folder that does not resolve ends the command with one line on standard error
and exit status 2, before anything is consumed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from girder_upload_stream import startup
from girder_upload_stream.errors import GirderUploadStreamError
from girder_upload_stream.options import OPTIONS, add_options, flow_arguments

__all__ = ["add_run_arguments", "run_from_args", "processor_main", "run_guarded"]

logger = logging.getLogger("girder_upload_stream.run")

def add_run_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    """Every option of OpenMSIStream's GirderUploadStreamProcessor, plus ours (defined
    once, in :mod:`girder_upload_stream.options`)."""
    parser.add_argument("girder_api_url", help="Girder REST API URL, e.g. http://host/api/v1")
    parser.add_argument("girder_api_key", nargs="?", default=None,
                        help="Girder API key (default: $GIRDER_API_KEY, which keeps it out "
                             "of the process list)")
    parser.add_argument("--config", default=default_config,
                        help="config file path, or a bundled config name (default: %(default)s)")
    add_options(parser)


def _setup_logging(args: argparse.Namespace) -> None:
    logs_dir = args.logs_dir or args.output_dir / "LOGS"
    logs_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("girder_upload_stream")
    root.setLevel(logging.DEBUG)
    # Our handlers own the console and file output; no second copy via the root logger.
    root.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler, level in ((logging.StreamHandler(sys.stderr), args.logger_stream_level),
                           (logging.FileHandler(logs_dir / "GirderUploadStreamProcessor.log",
                                                encoding="utf-8"), args.logger_file_level)):
        handler.setLevel(level)  # a number: options.log_level read the name or number
        handler.setFormatter(fmt)
        root.addHandler(handler)


def _run_parameters(args: argparse.Namespace) -> dict:
    """The flow's parameters from the command line (the flow's defaults for the rest)."""
    params = {option.name: option.default for option in OPTIONS if option.flow}
    params.update(flow_arguments(args))
    params.update(config=args.config, girder_api_url=args.girder_api_url, interactive=True)
    return params


def _run(params: dict, girder, prepared) -> dict:
    """Run the consumer: recorded as a flow run when a Prefect API is configured,
    otherwise the same steps without Prefect (see the module's docstring)."""
    from girder_upload_stream.cli.prefect_mode import prefect_api_url
    api = prefect_api_url()
    if api is None:
        logger.info("no Prefect API configured (PREFECT_API_URL): running without Prefect, "
                    "no flow run is recorded (set PREFECT_API_URL to record runs)")
        from girder_upload_stream.loop.session import plain_hooks, run_session
        return run_session(params, girder, plain_hooks(), prepared)
    logger.info("Prefect API at %s: running as a flow run of girder-upload-stream (consuming "
                "now; the flow run records the run once Prefect has created it)", api)
    from girder_upload_stream.prefect_glue.late_flow_run import run_with_late_flow_run
    return run_with_late_flow_run(params, girder, prepared, load_flow=_load_flow, api_url=api)


def _load_flow():
    """The flow ``girder-upload-stream``. Imported here, when called: importing it imports
    Prefect (seconds), which the late flow run does in its own thread while the run
    already consumes."""
    from girder_upload_stream.flows.upload_stream import upload_stream
    return upload_stream


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate, then run until it stops: 0 on a graceful stop, 1 if the last save of
    the registries failed (the offsets it guarded stayed uncommitted), 2 if the run
    could not go on (``fatal_error``: the root folder given by id is gone)."""
    api_key = args.girder_api_key or os.environ.get("GIRDER_API_KEY")
    if not api_key:
        parser.error("no Girder API key: pass it or set GIRDER_API_KEY")
    startup.mark("command line read")
    _setup_logging(args)
    from girder_upload_stream.cli.prefect_mode import check_prefect_api, prefect_api_url
    api = prefect_api_url()
    if api is not None:  # a Prefect API that is not there: one line, before anything else
        check_prefect_api(api)
    params = _run_parameters(args)
    from girder_upload_stream.loop.session import girder_settings_from, prepare
    girder = girder_settings_from(params, api_key)
    # Girder first, before Prefect starts, so that a wrong key fails fast with one line
    # (raised as GirderStartupError) and no flow-run traceback; the run uses this check.
    # Then the consumer subscribes: the group's join starts at once.
    prepared = prepare(params, girder)
    # The key travels by environment, never as a flow parameter (Prefect stores those).
    os.environ["GIRDER_API_KEY"] = api_key
    try:
        summary = _run(params, girder, prepared)
    finally:
        prepared.close()  # only if the run never took the group
    print(f"stopped ({summary['stopped_because']}): {summary['messages_read']} messages read, "
          f"{summary['files_uploaded']} files uploaded, {summary['files_skipped']} already in "
          f"Girder, {summary['files_failed']} failed, {summary['files_found_in_girder']} "
          f"re-read and found in Girder, {summary.get('files_skipped_different', 0)} skipped as a "
          f"different file of that name is in Girder, {summary.get('files_skipped_by_regex', 0)} "
          f"skipped by --download_regex", flush=True)
    if summary.get("chunks_waiting_at_bound"):  # offsets rule 10: back-pressure, not loss
        print(f"{summary['chunks_waiting_at_bound']} chunk(s) of files beyond "
              f"--max_files_in_progress were left waiting, uncommitted: the next run of "
              f"this consumer group reads them again", flush=True)
    if summary.get("messages_not_decrypted"):
        print(f"{summary['messages_not_decrypted']} message(s) could not be decrypted and were "
              f"left uncommitted: the next run of this consumer group reads them again",
              flush=True)
    if summary.get("fatal_error"):  # e.g. the root folder given by id is gone
        print(f"error: {summary['fatal_error']}", file=sys.stderr, flush=True)
        return 2
    if summary.get("registry_save_error"):
        print(f"error: the last save of the registries failed "
              f"({summary['registry_save_error']}); the offsets of files processed since "
              f"the last good save were not committed and are read again on restart",
              file=sys.stderr, flush=True)
        return 1
    return 0


def run_guarded(action) -> int:
    """Run a command; our own errors become one clear line and exit status 2."""
    try:
        return action()
    except GirderUploadStreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def processor_main(argv: list[str] | None = None) -> int:
    """Entry point of the ``GirderUploadStreamProcessor`` command."""
    parser = argparse.ArgumentParser(
        prog="GirderUploadStreamProcessor",
        description="Read OpenMSIStream chunk messages from a topic, rebuild the files and "
                    "upload them to Girder (girder-upload-stream's drop-in for OpenMSIStream's "
                    "command). Type 'c' to check progress, 'q' to quit.")
    add_run_arguments(parser, default_config="test")
    return run_guarded(lambda: run_from_args(parser.parse_args(argv), parser))
