"""Unit tests for girder_upload_stream.errors: hierarchy, context rendering, pickling."""

from __future__ import annotations

import pickle

import pytest

from girder_upload_stream.errors import (
    ChunkDecodeError,
    ConfigError,
    FileRejectedError,
    GirderUploadStreamError,
    SourceFileChangedError,
    StorageError,
    TerminalError,
    TransientError,
)


def test_hierarchy_tells_retry_from_record():
    assert issubclass(ChunkDecodeError, TerminalError)
    assert issubclass(FileRejectedError, TerminalError)
    assert issubclass(StorageError, TransientError)
    assert issubclass(SourceFileChangedError, TransientError)
    for cls in (TransientError, TerminalError, ConfigError):
        assert issubclass(cls, GirderUploadStreamError)
    assert not issubclass(ConfigError, (TransientError, TerminalError))


def test_str_shows_only_the_context_that_is_set():
    assert str(GirderUploadStreamError("plain")) == "plain"
    error = TransientError("broker down", topic="t", offset=5)
    assert str(error) == "broker down [topic='t', offset=5]"
    error = FileRejectedError("too large", rel_path="a/b.bin", partition=0)
    assert str(error) == "file rejected: too large [partition=0, file='a/b.bin']"
    assert error.reason == "too large"


def test_add_context_fills_only_what_is_missing():
    error = ChunkDecodeError("bad", topic="t")
    assert error.add_context(topic="other", partition=3, offset=None, group="g") is error
    assert (error.topic, error.partition, error.offset) == ("t", 3, None)
    assert str(error) == "invalid chunk message: bad [topic='t', partition=3, group='g']"


def test_config_error_names_file_section_and_option():
    error = ConfigError("variable 'X' is not set", path="/c.ini", section="broker",
                        option="sasl.password")
    assert str(error) == ("variable 'X' is not set [path='/c.ini', section='broker', "
                          "option='sasl.password']")


@pytest.mark.parametrize("error", [
    GirderUploadStreamError("m", topic="t", partition=1, offset=2, rel_path="p"),
    ChunkDecodeError("why", topic="t", offset=9),
    FileRejectedError("why", rel_path="x", details={"k": 1}),
    ConfigError("m", path="/p", section="s"),
    StorageError("disk", rel_path="r"),
])
def test_errors_survive_pickling_with_their_context(error):
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is type(error)
    assert str(restored) == str(error)
    assert restored.context == error.context
