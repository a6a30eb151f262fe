"""Start-up messages in one line: librdkafka's own lines routed and rate-limited, Girder's
HTML pages named rather than quoted, an absent Prefect API named. No stack needed."""

from __future__ import annotations

import logging
import socket

import pytest

from girder_upload_stream.cli.prefect_mode import PrefectUnreachableError, check_prefect_api
from girder_upload_stream.girder.errors import NOT_THE_API, _server_message
from girder_upload_stream.kafka.rdkafka_log import RdkafkaLog, with_log
from tests.unit.fakes import Clock

FMT = "%s [%s] %s"


class Recorder(logging.Logger):
    def __init__(self) -> None:
        super().__init__("test.librdkafka", logging.DEBUG)
        self.records: list[tuple[int, str]] = []

    def log(self, level, msg, *args, **kwargs):  # noqa: D401 - a recording logger
        self.records.append((level, msg % args))

    def debug(self, msg, *args, **kwargs):
        self.log(logging.DEBUG, msg, *args)


def test_routine_librdkafka_lines_are_debug_only() -> None:
    target = Recorder()
    log = RdkafkaLog(target, repeat=30, clock=Clock())
    for _ in range(500):
        log.log(logging.ERROR, FMT, "FAIL", "rdkafka#consumer-1", "Connect failed: refused")
    log.log(logging.WARNING, FMT, "TERMINATE", "rdkafka#producer-1", "1 message in queue")
    assert {level for level, _ in target.records} == {logging.DEBUG}
    assert len(target.records) == 501


def test_other_lines_show_once_per_facility_and_interval_with_a_count() -> None:
    target, clock = Recorder(), Clock()
    log = RdkafkaLog(target, repeat=30, clock=clock)
    for _ in range(10):
        log.log(logging.ERROR, FMT, "SSL", "rdkafka#consumer-1", "handshake failed")
        clock.now += 1
    clock.now += 30
    log.log(logging.ERROR, FMT, "SSL", "rdkafka#consumer-1", "handshake failed")
    shown = [text for level, text in target.records if level == logging.ERROR]
    assert shown == ["librdkafka: SSL [rdkafka#consumer-1] handshake failed",
                     "librdkafka: SSL [rdkafka#consumer-1] handshake failed (9 similar "
                     "line(s) in the last 30 s)"]


def test_with_log_keeps_a_callers_logger_and_does_not_touch_the_settings() -> None:
    settings = {"bootstrap.servers": "b:9092"}
    routed = with_log(settings)
    assert isinstance(routed["logger"], RdkafkaLog) and "logger" not in settings
    own = {"logger": object()}
    assert with_log(own) is own


@pytest.mark.parametrize("page", [
    "<h2>405 Method Not Allowed</h2>\n<p>Specified method is invalid</p>",
    "<!DOCTYPE html>\n<html><head><title>Girder</title></head><body></body></html>",
])
def test_an_html_answer_is_named_not_quoted(page: str) -> None:
    assert _server_message(page) == NOT_THE_API


def test_a_json_answer_keeps_its_message_and_text_becomes_one_line() -> None:
    assert _server_message('{"message": "Invalid API key.", "type": "rest"}') == \
        "Invalid API key."
    assert _server_message("bad\n  gateway\n") == "bad gateway"


def test_an_absent_prefect_api_is_one_error_naming_it(monkeypatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with pytest.raises(PrefectUnreachableError) as caught:
        check_prefect_api(url, timeout=5)
    assert str(caught.value).startswith(f"cannot start: no Prefect API answers at {url} (")
    assert "unset PREFECT_API_URL" in str(caught.value)


class StuckProducer:
    """A confluent-kafka Producer whose broker never acknowledges: flush() keeps 3 back."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def flush(self, timeout: float) -> int:
        self.waits.append(timeout)
        return 3


def test_a_flush_the_broker_does_not_answer_waits_in_slices_and_says_so_once(
        monkeypatch, caplog) -> None:
    from girder_upload_stream.kafka import chunk_producer
    from girder_upload_stream.kafka.chunk_producer import ChunkProducer
    monkeypatch.setattr(chunk_producer, "QUIET_FLUSH_SECONDS", 0.0)
    monkeypatch.setattr(chunk_producer, "SLICE_SECONDS", 0.01)
    producer = ChunkProducer({"bootstrap.servers": "127.0.0.1:1"}, "t")
    producer._producer = StuckProducer()
    with caplog.at_level(logging.WARNING, logger="girder_upload_stream.kafka.chunk_producer"):
        report = producer.flush(timeout=0.2)
    assert report.failures == ["3 message(s) still queued after 0s"]
    # Short waits (a SIGINT gets through between them), never one long one.
    assert max(producer._producer.waits) <= 0.01
    assert len(producer._producer.waits) > 5
    said = [r.getMessage() for r in caplog.records]
    assert said == ["waiting for the broker to acknowledge 3 message(s), for 0 s at most "
                    "(Ctrl-C stops)"]
