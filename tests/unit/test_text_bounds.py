"""Attacker-sized and attacker-shaped message text (issue 20 §4): every piece of it that
reaches a log line, a registry cell, an artifact or an exception is bounded and on one
line. Pure: no Kafka, Girder or Prefect."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from pathlib import Path, PurePosixPath

import msgpack
import pytest

from girder_upload_stream.errors import ChunkDecodeError, FileRejectedError, MESSAGE_LIMIT
from girder_upload_stream.shared_types import RawMessage, RejectedFile
from girder_upload_stream.registry import recording
from girder_upload_stream.registry.artifact_content import CELL_LIMIT, _cell
from girder_upload_stream.registry.recording import (MAX_REJECTED_MESSAGE_ROWS,
                                                     OVERFLOW_GENERATION, RegistryRecorder)
from girder_upload_stream.text_bounds import LIMIT, LINE_LIMIT, bounded, escape_controls
from girder_upload_stream.wire.codec import chunk_file, decode_chunk, encode_chunk

HUGE = "x" * 1_000_000


# ---------------------------------------------------------------- bounded()

@pytest.mark.parametrize("text,shown", [
    ("a\nb", "a\\nb"), ("a\r\nb", "a\\r\\nb"), ("\x1b[31mred", "\\x1b[31mred"),
    ("tab\there", "tab\\there"), ("nul\x00", "nul\\x00"), ("del\x7f", "del\\x7f"),
    ("c1\x85", "c1\\x85"), ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
    ("rlo\u202etxt.exe", "rlo\\u202etxt.exe"), ("isolate\u2066", "isolate\\u2066"),
    ("ordinary name é 全角.txt", "ordinary name é 全角.txt")])
def test_control_characters_are_escaped(text: str, shown: str) -> None:
    assert bounded(text) == shown == escape_controls(text)
    assert "\n" not in bounded(text) and "\r" not in bounded(text)


def test_a_long_text_is_cut_with_its_length_and_digest() -> None:
    shown = bounded(HUGE)
    digest = hashlib.sha256(HUGE.encode()).hexdigest()[:12]
    assert len(shown) < LIMIT + 60
    assert shown.startswith("x" * LIMIT)
    assert f"+{len(HUGE) - LIMIT} chars" in shown and digest in shown


def test_two_long_texts_differing_at_the_end_stay_told_apart() -> None:
    assert bounded(HUGE + "a") != bounded(HUGE + "b")


def test_escapes_never_push_a_cut_text_over_its_limit() -> None:
    shown = bounded("\n" * 5000, 100)
    assert len(shown) < 100 + 60 and "\n" not in shown


def test_bytes_are_decoded_with_escapes_for_non_utf8() -> None:
    assert bounded(b"ok\xff\n") == "ok\\xff\\n"
    assert bounded(None) == "None" and bounded(17) == "17"


def test_text_at_the_limit_is_kept_whole() -> None:
    assert bounded("y" * LIMIT) == "y" * LIMIT


# ---------------------------------------------------------------- exceptions

def test_an_error_with_a_huge_forged_path_is_bounded_and_one_line() -> None:
    error = ChunkDecodeError("chunk hash mismatch", topic="t", partition=0, offset=3,
                             rel_path="a\nFORGED ERROR line" + HUGE)
    text = str(error)
    assert "\n" not in text and len(text) < 600, len(text)
    assert "a\\\\nFORGED" in text or "a\\nFORGED" in text


def test_an_error_message_built_from_a_huge_reason_is_bounded() -> None:
    error = FileRejectedError("bad\n" + HUGE)
    assert len(str(error)) <= MESSAGE_LIMIT + 60 and "\n" not in str(error)
    assert len(error.reason) <= MESSAGE_LIMIT + 60


def test_a_key_that_disagrees_is_quoted_bounded_in_the_decode_error() -> None:
    key, value = encode_chunk(next(chunk_file(b"data", filename="f.txt", chunk_size=4)))
    with pytest.raises(ChunkDecodeError) as caught:
        decode_chunk(value, "k\n" + HUGE, topic="t", partition=0, offset=1)
    assert len(str(caught.value)) < 1200 and "\n" not in str(caught.value)


def test_a_name_with_a_newline_decodes_but_its_error_text_is_escaped() -> None:
    chunk = next(chunk_file(b"data", filename="evil\n2026 ERROR forged.txt", chunk_size=4))
    key, value = encode_chunk(chunk)
    fields = list(msgpack.unpackb(value, raw=True))
    fields[2] = b"\x00" * 64  # a chunk hash that fails
    with pytest.raises(ChunkDecodeError) as caught:
        decode_chunk(msgpack.packb(fields, use_bin_type=True), key)
    assert "\n" not in str(caught.value) and "evil\\\\n2026" in str(caught.value)


# ---------------------------------------------------------------- log records

def test_every_log_line_of_the_package_is_escaped_and_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("girder_upload_stream.test_text_bounds")
    with caplog.at_level(logging.INFO, logger="girder_upload_stream"):
        logger.error("file rejected: %s", "name\n2026-12-05 INFO forged" + HUGE)
    message = caplog.records[-1].getMessage()
    assert "\n" not in message and len(message) < LINE_LIMIT + 60


def test_other_loggers_are_untouched(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="someone.else"):
        logging.getLogger("someone.else").info("two\nlines")
    assert caplog.records[-1].getMessage() == "two\nlines"


# ---------------------------------------------------------------- registry and artifacts

def _message(offset: int) -> RawMessage:
    return RawMessage("t", 0, offset, b"k" * 100_000, b"v" * 100_000)


def test_a_rejected_message_row_holds_bounded_text(tmp_path: Path) -> None:
    recorder = RegistryRecorder(tmp_path, "t", "g")
    error = ChunkDecodeError("unsafe path: x\n" + HUGE, rel_path="d/" + HUGE + "\nfake")
    recorder.message_rejected(_message(5), error)
    recorder.save(final=True)
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert written < 4000, written
    (row,) = recorder.in_progress.rows()
    assert len(str(row.rel_filepath)) < recording.PATH_LIMIT + 60
    assert "\n" not in str(row.rel_filepath) and "\n" not in row.extra["reason"]


def test_a_rejected_file_row_holds_bounded_text(tmp_path: Path) -> None:
    recorder = RegistryRecorder(tmp_path, "t", "g")
    now = datetime.now().timestamp()
    recorder.file_rejected(RejectedFile("a/" * 200_000 + "f\n.txt", b"\x01" * 64,
                                        "sha512 mismatch " + HUGE, 1, 2, now, now))
    (row,) = recorder.in_progress.rows()
    assert len(str(row.rel_filepath)) < recording.PATH_LIMIT + 60
    assert len(row.extra["reason"]) < MESSAGE_LIMIT + 60


def test_rejected_message_rows_are_capped_then_summarised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording, "MAX_REJECTED_MESSAGE_ROWS", 5)
    recorder = RegistryRecorder(tmp_path, "t", "g")
    for offset in range(12):
        recorder.message_rejected(_message(offset), ChunkDecodeError("not msgpack"))
    rows = recorder.in_progress.rows()
    assert len(rows) == 6
    (summary,) = [row for row in rows if row.generation == OVERFLOW_GENERATION]
    assert summary.extra["count"] == 7 and "t[0]@11" in summary.extra["reason"]
    recorder.save(final=True)
    again = RegistryRecorder(tmp_path, "t", "g")  # the cap counts the rows already there
    again.message_rejected(_message(99), ChunkDecodeError("not msgpack"))
    assert len(again.in_progress.rows()) == 6


def test_undecrypted_message_rows_are_never_summarised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from girder_upload_stream.kafka.decrypting import UndecryptedMessageError
    monkeypatch.setattr(recording, "MAX_REJECTED_MESSAGE_ROWS", 1)
    recorder = RegistryRecorder(tmp_path, "t", "g")
    for offset in range(3):
        recorder.message_rejected(RawMessage("t", 0, offset, None, None),
                                  UndecryptedMessageError("not decrypted"))
    assert {row.generation for row in recorder.in_progress.rows()} == {
        "offset-0-0", "offset-0-1", "offset-0-2"}


def test_the_default_cap_is_documented() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert str(MAX_REJECTED_MESSAGE_ROWS) in docs and "beyond the registry's limit" in docs


def test_an_artifact_cell_is_bounded_and_one_line() -> None:
    cell = _cell("p\n" + HUGE)
    assert "\n" not in cell and len(cell) < CELL_LIMIT + 80
