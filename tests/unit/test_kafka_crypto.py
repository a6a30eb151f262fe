"""kafka/crypto.py's pure helpers and its refusal when kafkacrypto is missing (the
node itself runs against the real broker in tests/integration/test_kafkacrypto.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from girder_upload_stream.kafka import crypto as kafka_crypto
from girder_upload_stream.wire.config_files import BUNDLED_DIR
from girder_upload_stream.errors import ConfigError


def test_topic_root_and_key_exchange_topics():
    assert kafka_crypto.topic_root("lab.raw.v2") == "lab"
    assert kafka_crypto.topic_root("lab") == "lab"
    assert kafka_crypto.key_exchange_topics("lab.raw") == ["lab.keys", "lab.reqs", "lab.subs"]


def test_node_dirs(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENMSISTREAM_CONFIG_FILE_DIR", raising=False)
    assert kafka_crypto.node_dirs()[0] == BUNDLED_DIR
    monkeypatch.setenv("OPENMSISTREAM_CONFIG_FILE_DIR", str(tmp_path))
    assert kafka_crypto.node_dirs()[:2] == [tmp_path, BUNDLED_DIR]


def test_files_named_in_a_store_are_relative_to_its_folder(tmp_path):
    assert kafka_crypto._resolve("file#n.crypto", "x", tmp_path) == str(tmp_path / "n.crypto")
    assert kafka_crypto._resolve(None, "n.seed", tmp_path) == str(tmp_path / "n.seed")
    assert kafka_crypto._resolve("file#/abs/n.seed", "x", tmp_path) == "/abs/n.seed"


def test_a_missing_kafkacrypto_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kafkacrypto", None)  # import fails
    with pytest.raises(ConfigError, match=r"girder-upload-stream\[kafkacrypto\]"):
        kafka_crypto.KafkaCryptoNode(Path("/nowhere/n.config"), {})


def test_a_broken_store_is_a_config_error(tmp_path):
    store = tmp_path / "n" / "n.config"
    store.parent.mkdir()
    store.write_text("this is not a KafkaCrypto store")
    with pytest.raises(ConfigError, match="cannot start the KafkaCrypto node") as caught:
        kafka_crypto.KafkaCryptoNode(store, {"bootstrap.servers": "127.0.0.1:9"})
    assert str(store) in str(caught.value)


class _Metadata:
    def __init__(self, names):
        self.topics = {name: type("T", (), {"error": None})() for name in names}


class _Client:
    def __init__(self, names):
        self.names = names

    def list_topics(self, timeout=None):
        return _Metadata(self.names)


def test_missing_key_exchange_topics_are_reported(caplog):
    client = _Client(["lab.raw", "lab.keys", "lab.subs"])
    assert kafka_crypto.missing_key_exchange_topics(client, "lab.raw") == ["lab.reqs"]
    with caplog.at_level("ERROR", logger="girder_upload_stream.kafka.crypto"):
        kafka_crypto.warn_missing_key_topics(client, "lab.raw")
    assert "lab.reqs do not exist" in caplog.text
    caplog.clear()
    kafka_crypto.warn_missing_key_topics(_Client(["lab.keys", "lab.reqs", "lab.subs"]), "lab")
    assert caplog.text == ""
