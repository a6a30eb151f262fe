"""``girder-upload-stream``: the project's command line.

Sub-commands: ``run`` (consume chunk messages and upload the files to Girder, as the
Prefect flow) and ``produce`` (send files as OpenMSIStream chunk messages).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from girder_upload_stream import __version__
from girder_upload_stream.wire.codec import DEFAULT_CHUNK_SIZE
from girder_upload_stream.wire.config import load_config
from girder_upload_stream.cli.run import add_run_arguments, run_from_args, run_guarded
from girder_upload_stream.wire.config_files import resolve_config_path
from girder_upload_stream.options import log_level, non_negative_float, positive_int
from girder_upload_stream.wire.producer import DEFAULT_UPLOAD_REGEX, ProduceSummary, produce_path

__all__ = ["build_parser", "main"]


def _regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a valid regular expression: {exc}") from None


def _add_produce(sub: argparse._SubParsersAction) -> None:
    produce = sub.add_parser(
        "produce", help="produce a file or a directory tree as chunk messages",
        description="Cut each file into OpenMSIStream chunk messages and produce them to a "
                    "topic. Sub-folders are kept relative to PATH. Empty files are skipped "
                    "(OpenMSIStream never sends them). Exits 1 if any chunk was not "
                    "acknowledged by the broker or any file could not be read.")
    produce.add_argument("path", type=Path, metavar="PATH", help="a file or a directory")
    produce.add_argument("--config", default="local",
                         help="config file path, or the name of a bundled config "
                              "(default: %(default)s, which reads $KAFKA_BOOTSTRAP_SERVERS)")
    produce.add_argument("--topic_name", default="test", help="topic (default: %(default)s)")
    produce.add_argument("--chunk_size", type=positive_int, default=DEFAULT_CHUNK_SIZE,
                         help="bytes per chunk message (default: %(default)s)")
    produce.add_argument("--upload_regex", type=_regex, default=DEFAULT_UPLOAD_REGEX,
                         help="only files whose path relative to PATH matches this regular "
                              "expression from its start (Python re.match) are produced "
                              "(default: everything except names starting with '.' or "
                              "ending in '.log')")
    produce.add_argument("--quiet", action="store_true",
                         help="no progress lines (default: off, a line every 2 s)")
    produce.add_argument("--serve_keys_seconds", type=non_negative_float, default=30.0,
                         help="encrypted topics only: seconds to keep answering consumers' "
                              "key requests once every chunk is acknowledged "
                              "(default: %(default)s)")
    produce.set_defaults(handler=_run_produce)


def _open_encryption(file_config, topic: str):
    """The KafkaCrypto node of an encrypted topic's producer, with the topic's
    key-exchange topics created first (the broker does not create topics itself)."""
    from girder_upload_stream.kafka.crypto import (ensure_key_exchange_topics, node_dirs,
                                                   open_node)
    broker = file_config.section("broker")
    store = file_config.kafkacrypto_node_config(node_dirs())
    ensure_key_exchange_topics(broker, topic)
    return open_node(store, broker)


def _serve_keys(node, seconds: float, quiet: bool) -> None:
    """Keep the node running so that consumers that ask for this run's keys get them;
    its keys are saved in its store either way, so a later run of this node can answer
    requests made meanwhile. Ctrl-C ends the wait early."""
    if seconds > 0 and not quiet:
        print(f"answering key requests for {seconds:g}s (Ctrl-C to stop)", flush=True)
    try:
        node.wait_keys_saved(timeout=max(seconds, 10.0))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass


def _run_produce(args: argparse.Namespace) -> int:
    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    file_config = load_config(resolve_config_path(args.config))
    settings = file_config.producer_settings()
    node = _open_encryption(file_config, args.topic_name) if file_config.uses_kafkacrypto \
        else None
    try:
        summary = _produce(args, settings, node)
        for failure in summary.failed_files + summary.delivery_failures[:20]:
            print(f"error: {failure}", file=sys.stderr)
        print(summary.describe(), flush=True)
        if node is not None:
            _serve_keys(node, args.serve_keys_seconds, args.quiet)
    finally:
        if node is not None:
            node.close()
    return 0 if summary.ok else 1


def _produce(args: argparse.Namespace, settings: dict, node) -> ProduceSummary:
    last = [time.monotonic()]

    def progress(summary: ProduceSummary) -> None:
        if not args.quiet and time.monotonic() - last[0] > 2.0:
            last[0] = time.monotonic()
            print(f"... {summary.files} file(s), {summary.chunks} chunk(s) queued, "
                  f"{summary.acked} acknowledged", flush=True)

    return produce_path(args.path, settings, args.topic_name, chunk_size=args.chunk_size,
                        upload_regex=args.upload_regex, progress=progress,
                        encrypt=node.encrypt if node is not None else None)


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run", help="consume chunk messages and upload the rebuilt files to Girder",
        description="Read chunk messages from a topic, rebuild the files and upload them to "
                    "Girder, as the Prefect flow 'girder-upload-stream'. The options are "
                    "those of OpenMSIStream's GirderUploadStreamProcessor. Type 'c' to check "
                    "progress, 'q' to quit; SIGINT/SIGTERM stop gracefully.")
    add_run_arguments(run, default_config="local")
    run.set_defaults(handler=lambda args: run_from_args(args, run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="girder-upload-stream",
        description="Stream instrument data files through Kafka into Girder.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log_level", default="INFO", type=log_level,
                        help="console log level of produce: a name in any case or a number "
                             "(default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_produce(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "produce":
        logging.basicConfig(level=args.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_guarded(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
