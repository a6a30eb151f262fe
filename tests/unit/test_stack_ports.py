"""``stackctl env`` names the port a running component was started on, not the one the
environment would give a new start: a second stack on other ports (another
``GUS_STACK_DIR``) never gets the first one's broker, and a running one is never
misdirected by a changed ``GUS_KAFKA_PORT``. Nothing of the stack runs: this process
stands in for a recorded broker (a live PID)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stack import common, kafka


@pytest.fixture
def stack_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "STACK_DIR", tmp_path)
    return tmp_path


def test_env_names_the_running_brokers_recorded_port(stack_dir: Path, monkeypatch):
    monkeypatch.setenv("GUS_KAFKA_PORT", "29999")
    common.pid_path("kafka").write_text(str(os.getpid()))
    common.record_port("kafka", 29192)
    assert kafka.env() == {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:29192"}


def test_env_without_a_running_broker_names_the_port_a_start_would_use(stack_dir: Path,
                                                                       monkeypatch):
    common.record_port("kafka", 29192)  # left by a broker that is gone (no live PID)
    monkeypatch.setenv("GUS_KAFKA_PORT", "29555")
    assert kafka.env() == {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:29555"}
    monkeypatch.delenv("GUS_KAFKA_PORT")
    assert kafka.env() == {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka.DEFAULT_PORT}"}


def test_server_properties_listen_on_the_given_port_and_the_next(tmp_path: Path):
    props = kafka._server_properties(tmp_path, 29192)
    assert "PLAINTEXT://127.0.0.1:29192,CONTROLLER://127.0.0.1:29193" in props
    assert "1@127.0.0.1:29193" in props
