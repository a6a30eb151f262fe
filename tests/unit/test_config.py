"""Unit tests for girder_upload_stream.wire.config (OpenMSIStream-style INI config files)."""

from __future__ import annotations

import uuid

import pytest

from girder_upload_stream.wire.config import KafkaFileConfig, load_config, parse_bool
from girder_upload_stream.errors import ConfigError

# The shape of OpenMSIStream 1.8.8's bundled test.config, plus heartbeat and log sections.
OPENMSISTREAM_STYLE = """\
[broker]
bootstrap.servers = $KAFKA_SERVERS
sasl.mechanism    = PLAIN
security.protocol = SASL_SSL
sasl.username     = ${KAFKA_USER}
sasl.password     = $KAFKA_PASSWORD

[producer]
batch.size       = 2000000
linger.ms        = 100
compression.type = lz4
key.serializer   = StringSerializer
value.serializer = DataFileChunkSerializer

[consumer]
group.id           = create_new
auto.offset.reset  = earliest
enable.auto.commit = False
fetch.min.bytes    = 100000
key.deserializer   = StringDeserializer
value.deserializer = DataFileChunkDeserializer

[heartbeat]
linger.ms = 100
prefer.separate.producer = True
"""

ENV = {"KAFKA_SERVERS": "broker1:9092", "KAFKA_USER": "alice", "KAFKA_PASSWORD": "s3cr%t"}


def write(tmp_path, text: str, name: str = "test.config"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def config(tmp_path) -> KafkaFileConfig:
    return load_config(write(tmp_path, OPENMSISTREAM_STYLE), env=ENV)


def test_consumer_settings_merge_broker_and_consumer_and_drop_serdes(config):
    settings = config.consumer_settings()
    assert settings["bootstrap.servers"] == "broker1:9092"
    assert settings["sasl.username"] == "alice"
    assert settings["sasl.password"] == "s3cr%t"
    assert settings["auto.offset.reset"] == "earliest"
    assert settings["enable.auto.commit"] == "False"
    assert not {"key.deserializer", "value.deserializer"} & settings.keys()
    assert "batch.size" not in settings


def test_producer_settings_merge_broker_and_producer_and_drop_serdes(config):
    settings = config.producer_settings()
    assert settings["compression.type"] == "lz4" and settings["linger.ms"] == "100"
    assert settings["security.protocol"] == "SASL_SSL"
    assert not {"key.serializer", "value.serializer"} & settings.keys()
    assert "group.id" not in settings


def test_create_new_gives_one_fresh_group_per_loaded_config(config, tmp_path):
    group = config.consumer_settings()["group.id"]
    assert str(uuid.UUID(group)) == group
    assert config.consumer_settings()["group.id"] == group  # consumers share one group
    other = load_config(write(tmp_path, OPENMSISTREAM_STYLE, "b.config"), env=ENV)
    assert other.consumer_settings()["group.id"] != group


def test_group_id_override_wins_and_may_itself_be_create_new(config):
    assert config.consumer_settings("my-group")["group.id"] == "my-group"
    assert config.consumer_settings("CREATE_NEW")["group.id"] == config.fresh_group_id
    assert config.resolve_group_id("kept") == "kept"


def test_environment_variables_are_expanded_when_a_section_is_used(tmp_path):
    text = "[broker]\nbootstrap.servers = $HOST:${PORT}\n[log]\nx = $UNSET_BUT_UNUSED\n"
    config = load_config(write(tmp_path, text), env={"HOST": "h", "PORT": "1"})
    assert config.producer_settings() == {"bootstrap.servers": "h:1"}
    with pytest.raises(ConfigError, match="UNSET_BUT_UNUSED"):
        config.log_producer_settings()


def test_an_unset_variable_names_itself_the_section_and_the_file(tmp_path):
    path = write(tmp_path, OPENMSISTREAM_STYLE)
    config = load_config(path, env={"KAFKA_SERVERS": "b:1", "KAFKA_PASSWORD": "p"})
    with pytest.raises(ConfigError) as caught:
        config.consumer_settings()
    text = str(caught.value)
    assert "'KAFKA_USER'" in text and "section='broker'" in text
    assert "option='sasl.username'" in text and str(path) in text


def test_an_unset_variable_of_a_secret_option_names_the_option_only(tmp_path):
    # The value of a secret option may be the password itself ('$ecret'): not shown.
    path = write(tmp_path, OPENMSISTREAM_STYLE)
    config = load_config(path, env={"KAFKA_SERVERS": "b:1", "KAFKA_USER": "u"})
    with pytest.raises(ConfigError) as caught:
        config.consumer_settings()
    text = str(caught.value)
    assert "KAFKA_PASSWORD" not in text and "section='broker'" in text
    assert "option='sasl.password'" in text and str(path) in text


@pytest.mark.parametrize("value", ["$", "$1abc", "${}"])
def test_malformed_variable_references_are_errors(tmp_path, value):
    config = load_config(write(tmp_path, f"[broker]\nbootstrap.servers = {value}\n"), env={})
    with pytest.raises(ConfigError):
        config.producer_settings()


def test_values_not_starting_with_dollar_are_literal(tmp_path):
    text = "[broker]\nbootstrap.servers = b:1\nsasl.password = pa$$word%%\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.producer_settings()["sasl.password"] == "pa$$word%%"


def test_option_case_is_kept_and_node_id_and_none_reset_are_dropped(tmp_path):
    text = ("[broker]\nbootstrap.servers = b:1\nnode_id = n1\n"
            "[consumer]\nClient.Id = Mixed\nauto.offset.reset = none\n")
    settings = load_config(write(tmp_path, text), env={}).consumer_settings()
    assert settings == {"bootstrap.servers": "b:1", "Client.Id": "Mixed"}


def test_heartbeat_without_servers_merges_over_broker(config):
    settings = config.heartbeat_producer_settings()
    assert settings["bootstrap.servers"] == "broker1:9092"
    assert settings["sasl.username"] == "alice" and settings["linger.ms"] == "100"
    assert "prefer.separate.producer" not in settings


def test_heartbeat_with_its_own_servers_replaces_the_broker_section(tmp_path):
    text = OPENMSISTREAM_STYLE + "bootstrap.servers = other:9092\n"
    settings = load_config(write(tmp_path, text), env=ENV).heartbeat_producer_settings()
    assert settings == {"bootstrap.servers": "other:9092", "linger.ms": "100"}


def test_missing_heartbeat_section_falls_back_to_the_broker(tmp_path):
    config = load_config(write(tmp_path, "[broker]\nbootstrap.servers = b:1\n"), env={})
    assert not config.has_section("heartbeat")
    assert config.heartbeat_producer_settings() == {"bootstrap.servers": "b:1"}


def test_settings_without_bootstrap_servers_are_an_error(tmp_path):
    config = load_config(write(tmp_path, "[broker]\nsecurity.protocol = SSL\n"), env={})
    with pytest.raises(ConfigError, match="bootstrap.servers"):
        config.consumer_settings()


@pytest.mark.parametrize(("consumer", "disabled"), [
    ("enable.auto.commit = False", True), ("enable.auto.commit = false", True),
    ("enable.auto.commit = 0", True), ("enable.auto.commit = True", False),
    ("enable.auto.commit = $AC", True), ("enable.auto.commit = $NOPE", False),
    ("enable.auto.commit = maybe", False), ("", False),
])
def test_auto_commit_detection_and_warning(tmp_path, consumer, disabled):
    text = f"[broker]\nbootstrap.servers = b:1\n[consumer]\n{consumer}\n"
    config = load_config(write(tmp_path, text), env={"AC": "false"})
    assert config.auto_commit_disabled is disabled


@pytest.mark.parametrize(("text", "fragment"), [
    (None, "not found"),
    ("no sections at all\n", "not valid INI"),
    ("[broker]\nbootstrap.servers = a\nbootstrap.servers = b\n", "not valid INI"),
    ("[consumer]\ngroup.id = g\n", r"no \[broker\] section"),
])
def test_bad_files_raise_config_error_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "bad.config"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_kafkacrypto_sections_are_reported(tmp_path):
    text = "[broker]\nbootstrap.servers = b:1\n[kafkacrypto]\nnode_id = n\n"
    assert load_config(write(tmp_path, text), env={}).uses_kafkacrypto
    assert not load_config(write(tmp_path, text.split("[kafka")[0], "p.config"),
                           env={}).uses_kafkacrypto


def _node(folder, node_id: str):
    """A node folder as provisioning leaves it: ``<folder>/<node_id>/<node_id>.config``."""
    store = folder / node_id / f"{node_id}.config"
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text("[DEFAULT]\nnode_id : " + node_id + "\n")
    return store.resolve()


def test_kafkacrypto_node_is_found_as_openmsistream_finds_it(tmp_path, monkeypatch):
    bundled, conf_dir, cwd = tmp_path / "bundled", tmp_path / "conf", tmp_path / "cwd"
    for folder in (bundled, conf_dir, cwd):
        folder.mkdir()
    monkeypatch.chdir(cwd)
    text = "[broker]\nbootstrap.servers = b:1\n[kafkacrypto]\nnode_id = $NODE\n"
    config = load_config(write(conf_dir, text), env={"NODE": "lab"})
    in_cwd = _node(cwd, "lab")
    assert config.kafkacrypto_node_config([bundled]) == in_cwd, "the current directory last"
    next_to_config = _node(conf_dir, "lab")
    assert config.kafkacrypto_node_config([bundled]) == next_to_config
    in_bundled = _node(bundled, "lab")
    assert config.kafkacrypto_node_config([bundled]) == in_bundled, "bundled folders first"
    assert load_config(write(conf_dir, "[broker]\nbootstrap.servers = b:1\n", "p.config"),
                       env={}).kafkacrypto_node_config([bundled]) is None


def test_kafkacrypto_config_file_wins_and_may_be_written_with_file_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = _node(tmp_path, "other")
    for value in (str(store), f"file#{store}", "other/other.config"):
        text = f"[broker]\nbootstrap.servers = b:1\n[kafkacrypto]\nnode_id = lab\nconfig_file = {value}\n"
        assert load_config(write(tmp_path, text), env={}).kafkacrypto_node_config([]) == store


@pytest.mark.parametrize("section, fragment", [
    ("config_file = /nowhere/x.config", "KafkaCrypto config file '/nowhere/x.config' not found"),
    ("node_id = ghost", "no KafkaCrypto config file for node_id 'ghost'"),
    ("", "needs node_id or config_file"),
])
def test_kafkacrypto_section_errors_are_clear(tmp_path, monkeypatch, section, fragment):
    monkeypatch.chdir(tmp_path)
    text = f"[broker]\nbootstrap.servers = b:1\n[kafkacrypto]\n{section}\n"
    with pytest.raises(ConfigError, match=fragment) as caught:
        load_config(write(tmp_path, text), env={}).kafkacrypto_node_config([])
    assert "kafkacrypto" in str(caught.value)


def test_kafkacrypto_settings_in_kafka_settings(tmp_path, monkeypatch):
    from girder_upload_stream.loop.wiring import kafka_settings
    monkeypatch.chdir(tmp_path)
    store = _node(tmp_path, "lab")
    text = ("[broker]\nbootstrap.servers = b:1\nsecurity.protocol = PLAINTEXT\n"
            "[consumer]\nenable.auto.commit = False\n[kafkacrypto]\nnode_id = lab\n")
    path = write(tmp_path, text)
    kafka = kafka_settings(str(path), "t", "g", 2, max_wait_per_decrypt=2.5,
                           treat_undecryptable_as_plaintext=True)
    crypto = kafka.kafkacrypto
    assert crypto.config_file == store and crypto.max_wait_per_decrypt == 2.5
    assert crypto.treat_undecryptable_as_plaintext and crypto.max_initial_wait_per_decrypt == 60
    assert crypto.broker == {"bootstrap.servers": "b:1", "security.protocol": "PLAINTEXT"}
    assert "node_id" not in kafka.consumer
    plain = write(tmp_path, "[broker]\nbootstrap.servers = b:1\n", "plain.config")
    assert kafka_settings(str(plain), "t", "g", 2).kafkacrypto is None


def test_parse_bool():
    assert parse_bool("False") is False and parse_bool("TRUE") is True
    assert parse_bool(True) is True and parse_bool("perhaps") is None
