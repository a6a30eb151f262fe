"""The log topic (girder_upload_stream.loop.log_topic, kafka_side.LogProducer, the wiring in
assemble) and OpenMSIStream's console lines (loop/console.py). Nothing runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from girder_upload_stream.loop import wiring as assemble
from girder_upload_stream.cli.run import add_run_arguments
from girder_upload_stream.loop.console import Console, start_lines
from girder_upload_stream.errors import ConfigError
from girder_upload_stream.kafka.side_producers import LogProducer
from girder_upload_stream.loop.log_topic import (DEFAULT_MAX_LINES, LogBuffer, LogMessages,
                                            log_value, split_log_section)
from girder_upload_stream.ledger.processor import Counters
from girder_upload_stream.assembly.reassembly import Reassembler

SECRET = "gk-Sup3rS3cretKey/+="


def record(message: str, *args, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("girder_upload_stream.x", level, __file__, 1, message, args,
                             exc_info)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed = False

    def send(self, value: str) -> None:
        self.sent.append(value)

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- the value and buffer


def test_log_value_is_openmsistreams_json_object() -> None:
    value = json.loads(log_value(["a", "b é"], now=1796159738.25))
    assert value == {"timestamp": 1796159738.25, "messages": ["a", "b é"]}
    assert isinstance(json.loads(log_value([]))["timestamp"], float)


def test_buffer_keeps_the_message_text_and_traceback_only() -> None:
    buffer = LogBuffer()
    buffer.handle(record("Listening to the %s topic", "lab"))
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        buffer.handle(record("upload failed", level=logging.ERROR, exc_info=sys.exc_info()))
    lines = buffer.take()
    assert lines[0] == "Listening to the lab topic"
    assert lines[1].startswith("upload failed\nTraceback") and "ValueError: boom" in lines[1]
    assert buffer.take() == []  # each line is sent once


def test_buffer_drops_the_oldest_lines_and_says_how_many() -> None:
    buffer = LogBuffer(max_lines=3)
    for i in range(10):
        buffer.handle(record("line %d", i))
    assert buffer.take() == [
        "[7 older log line(s) dropped: more were logged since the previous log message "
        "than one message holds]", "line 7", "line 8", "line 9"]
    buffer.handle(record("next"))
    assert buffer.take() == ["next"]  # the count starts again


def test_buffer_bounds_the_bytes_of_one_message() -> None:
    buffer = LogBuffer(max_bytes=10_000)
    for i in range(200):
        buffer.handle(record("x" * 400 + str(i)))
    lines = buffer.take()
    assert len(log_value(lines).encode()) < 10_000 + 200
    assert lines[0].startswith("[") and lines[-1].endswith("199")
    buffer.handle(record("y" * 100_000))  # one huge line is cut, not dropped
    [line] = buffer.take()
    assert len(line) < 1_300 and line.endswith("characters cut]")
    big = LogBuffer()
    big.handle(record("y" * 100_000))
    [line] = big.take()
    assert 16_000 < len(line) < 17_000 and line.endswith("83616 characters cut]")


def test_buffer_masks_secrets_also_url_encoded() -> None:
    buffer = LogBuffer(secrets=[SECRET, "", "ab"])
    buffer.handle(record("GET /api/v1/api_key/token?key=%s failed", SECRET))
    buffer.handle(record("url http://g/api?key=gk-Sup3rS3cretKey%2F%2B%3D"))
    buffer.handle(record("about a cab"))  # too short to mask: "ab" stays
    lines = buffer.take()
    assert all(SECRET not in line and "Sup3r" not in line for line in lines[:2])
    assert lines[0].endswith("key=*** failed") and lines[2] == "about a cab"


def test_buffer_level_filters_lines() -> None:
    logger = logging.getLogger("girder_upload_stream.test_level")
    logger.setLevel(logging.DEBUG)
    buffer = LogBuffer(level=logging.WARNING)
    logger.addHandler(buffer)
    try:
        logger.info("info")
        logger.warning("warn")
    finally:
        logger.removeHandler(buffer)
    assert buffer.take() == ["warn"]


# ---------------------------------------------------------------- the side job


def test_log_messages_send_at_start_every_interval_and_at_shutdown() -> None:
    logger = logging.getLogger("girder_upload_stream.test_log_topic")
    logger.setLevel(logging.DEBUG)
    clock, producer = Clock(), FakeProducer()
    job = LogMessages(producer, 60.0, LogBuffer(), logger_name=logger.name, clock=clock)
    logger.info("start line")
    job.tick(None)  # the first round sends at once, with the start lines
    logger.info("a")
    clock.now += 30
    job.tick(None)
    clock.now += 31
    logger.debug("b")
    job.tick(None)
    job.tick(None)  # not due
    logger.info("shutdown line")
    job.tick(None, final=True)
    logger.info("after the end")
    sent = [json.loads(v) for v in producer.sent]
    assert [m["messages"] for m in sent] == [["start line"], ["a", "b"], ["shutdown line"]]
    assert producer.closed and job.buffer not in logger.handlers


def test_log_messages_send_even_without_new_lines() -> None:
    producer = FakeProducer()
    job = LogMessages(producer, 1.0, LogBuffer(), logger_name="girder_upload_stream.empty")
    job.tick(None, final=True)
    assert json.loads(producer.sent[0])["messages"] == []


class DeliveryError:
    def str(self) -> str:
        return "Local: Message timed out"


def test_log_producer_reports_failed_deliveries_once_per_streak(caplog) -> None:
    producer = LogProducer({"bootstrap.servers": "127.0.0.1:1"}, "logs", "prog")
    assert producer.key == "prog_log"
    with caplog.at_level(logging.INFO, logger="girder_upload_stream.kafka.side_producers"):
        for _ in range(4):
            producer._delivered(DeliveryError(), None)
        producer._delivered(None, None)
        producer._delivered(DeliveryError(), None)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("not delivered" in line for line in lines) == 2
    assert sum("delivered to logs again" in line for line in lines) == 1


def test_log_producer_send_never_raises(caplog) -> None:
    producer = LogProducer({"bootstrap.servers": "127.0.0.1:1", "no.such.setting": "1"},
                           "logs", "prog")
    with caplog.at_level(logging.WARNING, logger="girder_upload_stream.kafka.side_producers"):
        producer.send(log_value(["x"]))
    assert any("log message not sent to logs" in r.getMessage() for r in caplog.records)
    producer.close()


# ---------------------------------------------------------------- settings


def test_log_section_keys_of_openmsistream_are_not_librdkafka_settings() -> None:
    settings, max_lines, level = split_log_section(
        {"bootstrap.servers": "b:9092", "max.logs.per.message": "100", "log.level": "info",
         "linger.ms": "5"})
    assert settings == {"bootstrap.servers": "b:9092", "linger.ms": "5"}
    assert (max_lines, level) == (100, logging.INFO)
    assert split_log_section({})[1:] == (DEFAULT_MAX_LINES, logging.NOTSET)
    for bad in ({"max.logs.per.message": "0"}, {"max.logs.per.message": "many"},
                {"log.level": "loud"}):
        with pytest.raises(ConfigError):
            split_log_section(bad, "x.config")


def test_log_topic_settings_from_a_config_file(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "lab.config"
    config.write_text("[broker]\nbootstrap.servers = main:9092\nsasl.password = $PW\n"
                      "[log]\nlinger.ms = 50\nmax.logs.per.message = 500\nlog.level = WARNING\n")
    monkeypatch.setenv("PW", "hunter2-secret")
    assert assemble.log_topic_settings(str(config), None, None, 60, "g") is None
    log = assemble.log_topic_settings(str(config), "lab-logs", None, 15, "grp")
    assert (log.topic, log.program_id, log.key, log.interval_secs) == (
        "lab-logs", "girder-upload-stream-grp", "girder-upload-stream-grp_log", 15.0)
    assert (log.max_lines, log.level) == (500, logging.WARNING)
    assert log.producer == {"bootstrap.servers": "main:9092", "sasl.password": "hunter2-secret",
                            "linger.ms": "50"}
    assert "hunter2" not in repr(log)
    assert assemble._secret_values(log.producer) == ["hunter2-secret"]
    assert assemble.log_topic_settings(str(config), "t", "lab-1", 1, "g").program_id == "lab-1"


def test_log_options_on_the_command_line() -> None:
    import argparse
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, default_config="test")
    args = parser.parse_args(["http://g/api/v1", "--log_topic_name", "logs",
                              "--log_program_id", "lab", "--log_interval_secs", "2.5"])
    assert (args.log_topic_name, args.log_program_id, args.log_interval_secs) == (
        "logs", "lab", 2.5)
    assert parser.parse_args(["http://g/api/v1"]).log_interval_secs == 60
    with pytest.raises(SystemExit):
        parser.parse_args(["http://g/api/v1", "--log_interval_secs", "0"])


# ---------------------------------------------------------------- console lines


def test_start_lines_have_openmsistreams_wording() -> None:
    assert start_lines("lab", 2, Path("/data/out"), "http://g/api/v1", ("hb", 900),
                       ("logs", 60)) == [
        "Heartbeat messages will be produced to the 'hb' topic every 900.0 seconds",
        "log messages will be produced to the 'logs' topic every 60.0 seconds",
        "Log files and output will be in /data/out",
        "Listening to the lab topic for files to upload to Girder using the API at "
        "http://g/api/v1",
        "Will process files from messages in the lab topic using 2 threads"]
    assert start_lines("lab", 1, Path("/o"), None)[-1] == (
        "Will process files from messages in the lab topic using 1 thread")


def test_console_logs_openmsistreams_check_and_shutdown_lines(caplog) -> None:
    import io
    counters = Counters(messages_read=7, messages_processed=5, files_uploaded=2,
                        files_skipped=1, files_found_in_girder=1)
    runner = SimpleNamespace(processor=SimpleNamespace(counters=counters,
                                                       reassembler=Reassembler()))
    out = io.StringIO()
    console = Console(1e9, interactive=False, stdout=out, output_dir=Path("/data/out"))
    with caplog.at_level(logging.INFO, logger="girder_upload_stream.console"):
        console._check_requested.set()
        console.tick(runner)
        console.tick(runner, final=True)
    assert [r.getMessage() for r in caplog.records] == [
        "7 messages read, 5 messages processed, 4 files completely processed so far",
        "Girder upload stream processor writing to /data/out shut down",
        "7 total messages were consumed, 5 messages were successfully processed, and 4 "
        "files were uploaded to Girder"]
    assert out.getvalue().count("7 messages read (7 bytes)") == 0  # our own line is kept
    assert out.getvalue().count("7 messages read (0 bytes), 2 files uploaded") == 2


def _kafka_settings(tmp_path: Path):
    from girder_upload_stream.settings import KafkaSettings
    return KafkaSettings(topic="lab", group_id="grp", n_threads=1,
                         consumer={"bootstrap.servers": "127.0.0.1:1", "group.id": "grp",
                                   "sasl.password": "kafka-pass-123"})


def test_build_runner_sends_the_start_and_registry_lines_first(tmp_path: Path) -> None:
    from girder_upload_stream.loop.log_topic import LogTopic
    from girder_upload_stream.settings import RunSettings
    run = RunSettings(output_dir=tmp_path / "out", interactive=False)
    level = logging.getLogger("girder_upload_stream").level
    runner = assemble.build_runner(
        run, _kafka_settings(tmp_path), submit=None, registry_fallback=lambda: set(),
        log_topic=LogTopic("logs", "prog", 5.0, {"bootstrap.servers": "127.0.0.1:1"}),
        secrets=[SECRET], girder_api_url="http://g/api/v1")
    [job] = [j for j in runner.side_jobs if isinstance(j, LogMessages)]
    job.producer = FakeProducer()
    logging.getLogger("girder_upload_stream.x").warning("token %s and kafka-pass-123", SECRET)
    job.tick(runner, final=True)
    [value] = [json.loads(v) for v in job.producer.sent]
    lines = value["messages"]
    assert any(line.startswith("no local registry of lab/grp") for line in lines)
    assert "Listening to the lab topic for files to upload to Girder using the API at " \
           "http://g/api/v1" in lines
    assert lines[-1] == "token *** and ***"
    package = logging.getLogger("girder_upload_stream")
    assert job.buffer not in package.handlers and package.level == level


def test_build_runner_detaches_the_log_buffer_when_building_fails(tmp_path: Path,
                                                                  monkeypatch) -> None:
    from girder_upload_stream.loop.log_topic import LogTopic
    from girder_upload_stream.settings import RunSettings
    package = logging.getLogger("girder_upload_stream")
    before, level = list(package.handlers), package.level

    def broken(*args, **kwargs):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(assemble, "RegistryRecorder", broken)
    with pytest.raises(OSError):
        assemble.build_runner(RunSettings(output_dir=tmp_path / "out"), _kafka_settings(tmp_path),
                              submit=None, log_topic=LogTopic("logs", "prog"))
    assert package.handlers == before and package.level == level
