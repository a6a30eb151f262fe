"""No secret in any text we make: the redaction helper, config-file errors, the repr of
settings, and Girder errors translated from girder-client/requests exceptions (fakes of
those exceptions; no server is contacted)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import requests
from girder_client import HttpError

from girder_upload_stream.wire.config import load_config
from girder_upload_stream.errors import ConfigError
from girder_upload_stream.girder.errors import (LOGIN, GirderAuthError, GirderTerminalError,
                                                GirderTransientError, girder_name, translate)
from girder_upload_stream.girder.store import GirderStore
from girder_upload_stream.redact import MASK, is_secret_option, redact
from girder_upload_stream.settings import GirderSettings, KafkaSettings

KEY = "K3y-0f-Girder+/=Secret"
PASSWORD = "$3cret-Passw0rd!"


# ----------------------------------------------------------------------- redact()

def test_redact_masks_a_known_secret_as_given_and_url_encoded() -> None:
    text = (f"POST http://h/api/v1/api_key/token?key={KEY} failed; body key%3D"
            f"{requests.utils.quote(KEY, safe='')} / form {KEY.replace('/', '%2F')}")
    masked = redact(text, [KEY])
    assert KEY not in masked
    assert requests.utils.quote(KEY, safe="") not in masked
    assert MASK in masked


def test_redact_masks_credential_query_parameters_of_unknown_value() -> None:
    text = ("HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: "
            "/api/v1/api_key/token?key=abcdef123&duration=2 (Caused by ...); "
            "other?token=tok456&password=pw789 and apiKey=zz9")
    masked = redact(text)
    for secret in ("abcdef123", "tok456", "pw789", "zz9"):
        assert secret not in masked, masked
    assert "duration=2" in masked and "port=1" in masked


def test_redact_leaves_ordinary_text_and_ignores_empty_secrets() -> None:
    text = "upload file: HTTP 400: bad name [file='a/b.txt', offset=7]"
    assert redact(text, ["", None]) == text


def test_redact_masks_the_longest_secret_whole() -> None:
    assert redact("abcdefgh", ["abc", "abcdefgh"]) == MASK


@pytest.mark.parametrize("option,secret", [
    ("sasl.password", True), ("ssl.key.password", True), ("ssl.keystore.password", True),
    ("sasl.oauthbearer.client.secret", True), ("ssl.key.pem", True),
    ("SASL.Password", True), ("bootstrap.servers", False), ("sasl.username", False),
    ("sasl.mechanism", False), ("group.id", False)])
def test_is_secret_option(option: str, secret: bool) -> None:
    assert is_secret_option(option) is secret


# ----------------------------------------------------------------------- config files

def _error_text(exc: BaseException) -> str:
    """Everything a user could see of an error: its text and its whole traceback."""
    return str(exc) + "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("text", [
    # a password starting with '$' that is not a variable name
    f"[broker]\nbootstrap.servers = b:9092\nsasl.password = {PASSWORD}\n",
    # a password starting with '$' that reads as an unset variable
    "[broker]\nbootstrap.servers = b:9092\nsasl.password = $Secret_Passw0rd\n",
    "[broker]\nbootstrap.servers = b:9092\nssl.key.password = ${Secret_Passw0rd}\n",
])
def test_a_secret_option_that_cannot_be_expanded_is_named_but_not_shown(
        tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.config"
    path.write_text(text)
    config = load_config(path, env={})
    with pytest.raises(ConfigError) as caught:
        config.consumer_settings("g")
    shown = _error_text(caught.value)
    for secret in (PASSWORD, "3cret-Passw0rd", "Secret_Passw0rd"):
        assert secret not in shown, shown
    assert "password" in str(caught.value) and "secret" in str(caught.value), caught.value


def test_an_ordinary_option_still_shows_its_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "c.config"
    path.write_text("[broker]\nbootstrap.servers = $1host\n")
    with pytest.raises(ConfigError, match=r"'\$1host' is not an environment variable"):
        load_config(path, env={}).consumer_settings("g")


@pytest.mark.parametrize("text,problem", [
    (f"[broker]\nbootstrap.servers = b\nsasl.password {PASSWORD}\n", "line(s) 3"),
    (f"sasl.password = {PASSWORD}\n[broker]\n", "line 1 comes before"),
])
def test_ini_errors_give_line_numbers_not_line_text(tmp_path: Path, text: str,
                                                    problem: str) -> None:
    path = tmp_path / "c.config"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert problem in str(caught.value), caught.value
    assert PASSWORD not in _error_text(caught.value)


def test_parsed_config_and_kafka_settings_do_not_show_passwords(tmp_path: Path) -> None:
    path = tmp_path / "c.config"
    path.write_text(f"[broker]\nbootstrap.servers = b\nsasl.password = {PASSWORD[1:]}\n")
    config = load_config(path)
    consumer = config.consumer_settings("g")
    assert consumer["sasl.password"] == PASSWORD[1:]
    settings = KafkaSettings(topic="t", group_id="g", consumer=consumer,
                             heartbeat_producer=consumer)
    for text in (repr(config), repr(settings), str(settings)):
        assert PASSWORD[1:] not in text, text


# ----------------------------------------------------------------------- Girder errors

def _http_error(status: int, text: str, what_url: str) -> HttpError:
    return HttpError(status, text, what_url, "POST")


def test_a_refused_key_at_log_in_is_an_auth_error_without_the_key() -> None:
    exc = _http_error(400, '{"message": "Invalid API key.", "type": "validation"}',
                      f"http://h/api/v1/api_key/token?key={KEY}")
    error = translate(exc, LOGIN, None, (KEY,))
    assert isinstance(error, GirderAuthError) and isinstance(error, GirderTransientError)
    assert str(error) == "log in: HTTP 400: Invalid API key."


@pytest.mark.parametrize("status,what,cls", [
    (401, "create item", GirderAuthError),       # token expired or revoked: log in again
    (403, LOGIN, GirderAuthError),
    (403, "create item", GirderTerminalError),   # permissions: not a log-in problem
    (400, "create item", GirderTerminalError),
    (404, LOGIN, GirderTerminalError),           # a wrong API URL is not a wrong key
    (429, LOGIN, GirderTransientError),
    (503, "upload file", GirderTransientError),
])
def test_http_statuses(status: int, what: str, cls: type) -> None:
    error = translate(_http_error(status, f"echo {KEY}", "http://h/x"), what, "a.txt", (KEY,))
    assert type(error) is cls, error
    assert KEY not in str(error) and error.rel_path == "a.txt"


def test_connection_errors_quoting_the_url_lose_the_key() -> None:
    exc = requests.ConnectionError(
        f"HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: "
        f"/api/v1/api_key/token?key={KEY} (Caused by NewConnectionError(...))")
    error = translate(exc, LOGIN, None, (KEY,))
    assert isinstance(error, GirderTransientError) and not isinstance(error, GirderAuthError)
    assert "Girder unreachable" in str(error) and KEY not in str(error)


def test_other_exceptions_are_not_translated() -> None:
    assert translate(ValueError("x"), "create item", None, (KEY,)) is None


def test_the_store_raises_its_error_without_the_library_exception_in_the_traceback() -> None:
    store = GirderStore(GirderSettings(api_url="http://127.0.0.1:1/api/v1", api_key=KEY), "t")

    def fails():
        raise requests.ConnectionError(f"url: /api/v1/api_key/token?key={KEY}")

    with pytest.raises(GirderTransientError) as caught:
        store._call(fails, LOGIN)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert KEY not in _error_text(caught.value)
    assert store.requests == 1


def test_an_auth_error_makes_the_thread_log_in_again() -> None:
    store = GirderStore(GirderSettings(api_url="http://127.0.0.1:1/api/v1", api_key=KEY), "t")
    store._local.client = object()

    def refused():
        raise _http_error(401, '{"message": "You must be logged in."}', "http://h/item")

    with pytest.raises(GirderAuthError):
        store._call(refused, "create item")
    assert store._local.client is None


# ----------------------------------------------------------------------- names

@pytest.mark.parametrize("name,stored", [
    (" spaced name.txt ", "spaced name.txt"), ("\tsub\n", "sub"), ("a b", "a b"),
    ("\u3000全角\u3000", "全角")])
def test_girder_name_strips_as_girder_does(name: str, stored: str) -> None:
    assert girder_name(name) == stored == name.strip()


@pytest.mark.parametrize("name", ["", "   ", "\t\n", "\u3000"])
def test_a_name_empty_once_stripped_is_a_terminal_error(name: str) -> None:
    with pytest.raises(GirderTerminalError, match="empty once Girder strips"):
        girder_name(name, "folder")


def test_root_path_default_keeps_the_collection_as_first_folder() -> None:
    settings = GirderSettings(api_url="http://h/api/v1", api_key=KEY, collection_name="C")
    assert settings.root_path_for("topic") == "C/topic"
    custom = settings.model_copy(update={"root_folder_path": "/P1/P2/"})
    assert custom.root_path_for("topic") == "P1/P2"


# ----------------------------------------------------------------------- URL credentials

@pytest.mark.parametrize("text,hidden,kept", [
    ("Girder API at http://user:pa55w0rd@h:8080/api/v1", "pa55w0rd", "http://user:***@h:8080"),
    ("proxy https://me:S3cr%40t@proxy.example:3128 refused", "S3cr%40t", "https://me:***@proxy"),
    ("brokers SASL_SSL://alice:tops3cret@b1:9093,b2:9093", "tops3cret", "SASL_SSL://alice:***@b1"),
    ("url='http://u:p4ss@h/api/v1' and http://v:w0rd@k", "p4ss", "http://v:***@k"),
    ("socks5h://:onlypass@h:1080", "onlypass", "socks5h://:***@h"),
])
def test_url_passwords_are_masked_without_knowing_them(text: str, hidden: str,
                                                       kept: str) -> None:
    masked = redact(text)
    assert hidden not in masked and kept in masked, masked
    assert "w0rd" not in redact("http://u:p4ss@h and http://v:w0rd@k")


@pytest.mark.parametrize("text", [
    "http://host:8080/api/v1", "mailto:someone@example.org", "user@host:22",
    "at 12:30 someone@host said", "http://user@host/api/v1"])
def test_urls_without_a_password_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_a_url_password_never_reaches_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    logger = logging.getLogger("girder_upload_stream.console")
    with caplog.at_level(logging.INFO, logger="girder_upload_stream"):
        logger.info("Listening ... using the API at %s", "http://admin:hunter2@h/api/v1")
        logger.error("proxy error: %r", {"https": "http://p:s3cretproxy@proxy:3128"})
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "hunter2" not in text and "s3cretproxy" not in text
    assert "http://admin:***@h/api/v1" in text


def test_a_url_password_never_reaches_the_log_topic() -> None:
    import logging
    from girder_upload_stream.loop.log_topic import LogBuffer
    buffer = LogBuffer()
    logger = logging.getLogger("girder_upload_stream.test_log_topic_url")
    logger.addHandler(buffer)
    try:
        logger.warning("broker SASL_SSL://bob:brokerpw@b:9093 unreachable")
    finally:
        logger.removeHandler(buffer)
    (line,) = buffer.take()
    assert "brokerpw" not in line and "SASL_SSL://bob:***@b:9093" in line


def test_a_girder_error_quoting_a_proxy_url_loses_its_password() -> None:
    exc = requests.ConnectionError("ProxyError('Cannot connect to proxy.', "
                                   "'http://proxyuser:proxypw@proxy:3128')")
    error = translate(exc, "create item", "a.txt", (KEY,))
    assert "proxypw" not in str(error) and "proxyuser:***@proxy" in str(error)
