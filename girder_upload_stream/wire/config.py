"""OpenMSIStream-style Kafka config files, shared by the producer and the consumer.

An INI file with a ``[broker]`` section (librdkafka settings every client shares),
``[consumer]`` and ``[producer]`` sections (client-specific settings), and optional
``[heartbeat]`` and ``[log]`` sections (the producers of heartbeat and log messages).
Rules kept from OpenMSIStream 1.8.8:

* a value starting with ``$`` names environment variables (``$NAME`` or ``${NAME}``,
  possibly embedded: ``$HOST:9092``); an unset one is a :class:`ConfigError`. Sections
  are expanded when used, so an unused section may name unset variables;
* ``key.serializer``/``value.serializer``/``key.deserializer``/``value.deserializer``
  name OpenMSIStream classes, not librdkafka settings: they are dropped, and so are
  ``node_id`` (KafkaCrypto) and ``auto.offset.reset = none`` in ``[consumer]``;
* ``group.id = create_new`` (any case) becomes a fresh random id, drawn once per loaded
  config so that every consumer built from it joins the same group;
* a ``[heartbeat]`` (or ``[log]``) section with its own ``bootstrap.servers`` describes
  a different broker and replaces ``[broker]`` entirely; otherwise it is merged over it.
  ``prefer.separate.producer`` is not a librdkafka setting and is dropped.

Differences: option names keep their case, ``%`` is not an interpolation character, and
values stay strings (librdkafka parses them; ``"False"`` is a valid boolean there).
No error message shows the value of a secret option (``sasl.password``...; see
:func:`girder_upload_stream.redact.is_secret_option`) or the text of a line the INI
parser could not read: such a line may hold a password.
"""

from __future__ import annotations

import configparser
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from girder_upload_stream.errors import ConfigError
from girder_upload_stream.redact import is_secret_option

__all__ = [
    "CREATE_NEW",
    "KAFKACRYPTO_SECTION",
    "SERDES_KEYS",
    "KafkaFileConfig",
    "load_config",
    "parse_bool",
]

CREATE_NEW = "create_new"
KAFKACRYPTO_SECTION = "kafkacrypto"
#: A KafkaCrypto store path may be written as kafkacrypto writes its own: ``file#PATH``.
_FILE_PREFIX = "file#"
SERDES_KEYS = frozenset(
    {"key.serializer", "value.serializer", "key.deserializer", "value.deserializer"}
)
_CLIENT_SECTIONS = ("broker", "consumer", "producer")
_DROPPED_EVERYWHERE = SERDES_KEYS | {"prefer.separate.producer"}
_ENV_REF = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_TRUE = {"true", "t", "1", "yes", "y", "on"}
_FALSE = {"false", "f", "0", "no", "n", "off"}


def parse_bool(value: object) -> bool | None:
    """Read a librdkafka-style boolean (``"False"``, ``"true"``, ``"0"``...); None if not one."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


@dataclass(frozen=True)
class KafkaFileConfig:
    """A parsed config file. ``sections`` holds raw (unexpanded) values by section name."""

    path: Path
    #: Raw values, secrets included: kept out of ``repr()``.
    sections: Mapping[str, Mapping[str, str]] = field(repr=False)
    env: Mapping[str, str] = field(default_factory=lambda: os.environ, repr=False)
    fresh_group_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def uses_kafkacrypto(self) -> bool:
        """True if the file has a ``[kafkacrypto]`` section (encrypted topics)."""
        return KAFKACRYPTO_SECTION in self.sections

    def kafkacrypto_node_config(self, node_dirs: list[Path] | None = None) -> Path | None:
        """The KafkaCrypto store (the node's own ``.config`` file) that ``[kafkacrypto]``
        names, found as OpenMSIStream 1.8.8 finds it; None without that section.

        ``config_file = PATH`` names the store itself (a leading ``file#`` is removed; a
        relative path is relative to the current directory). Otherwise ``node_id = ID``
        names a folder ``ID/`` holding ``ID.config``, looked for in each of ``node_dirs``
        (the bundled-config folders), then next to this config file, then in the
        current directory. ``config_file`` wins when both are given. A section with
        neither, or a store that is not there, is a :class:`ConfigError`.
        """
        if not self.uses_kafkacrypto:
            return None
        options = self.section(KAFKACRYPTO_SECTION)
        if options.get("config_file"):
            text = options["config_file"].strip()
            path = Path(text[len(_FILE_PREFIX):] if text.startswith(_FILE_PREFIX) else text)
            if not path.is_file():
                raise ConfigError(f"KafkaCrypto config file {str(path)!r} not found",
                                  path=str(self.path), section=KAFKACRYPTO_SECTION,
                                  option="config_file")
            return path.resolve()
        node_id = options.get("node_id", "").strip()
        if not node_id:
            raise ConfigError("the [kafkacrypto] section needs node_id or config_file",
                              path=str(self.path), section=KAFKACRYPTO_SECTION)
        folders = [*(node_dirs or []), self.path.resolve().parent, Path.cwd()]
        candidates = [folder / node_id / f"{node_id}.config" for folder in folders]
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        raise ConfigError(f"no KafkaCrypto config file for node_id {node_id!r} (looked for "
                          f"{', '.join(str(c) for c in candidates)})", path=str(self.path),
                          section=KAFKACRYPTO_SECTION, option="node_id")

    def has_section(self, name: str) -> bool:
        """True if the file has a section called ``name``."""
        return name in self.sections

    def section(self, name: str) -> dict[str, str]:
        """One section's settings with ``$`` variables expanded and (de)serializers dropped.

        A missing section gives ``{}``.
        """
        raw = self.sections.get(name, {})
        settings: dict[str, str] = {}
        for option, value in raw.items():
            if option in _DROPPED_EVERYWHERE:
                continue
            if option == "node_id" and name in _CLIENT_SECTIONS:
                continue
            settings[option] = self._expand(value, name, option)
        return settings

    def _expand(self, value: str, section: str, option: str) -> str:
        if not value.startswith("$"):
            return value
        # The value of a secret option may be the secret itself (a password that starts
        # with '$'): its errors name the option, never the value or the variable.
        secret = is_secret_option(option)
        if not _ENV_REF.match(value):
            shown = "its value (not shown: a secret)" if secret else repr(value)
            raise ConfigError(f"{shown} is not an environment variable reference",
                              path=str(self.path), section=section, option=option)

        def replace(match: re.Match[str]) -> str:
            name = match.group("braced") if match.group("braced") is not None \
                else match.group("plain")
            if not name or name not in self.env:
                shown = ("the environment variable its value names (not shown: a secret)"
                         if secret else f"environment variable {name!r}")
                raise ConfigError(f"{shown} is not set", path=str(self.path),
                                  section=section, option=option)
            return self.env[name]

        return _ENV_REF.sub(replace, value)

    def _require_servers(self, settings: dict[str, str], what: str) -> dict[str, str]:
        if not settings.get("bootstrap.servers"):
            raise ConfigError(f"no bootstrap.servers for the {what}", path=str(self.path),
                              section="broker", option="bootstrap.servers")
        return settings

    def resolve_group_id(self, group_id: str) -> str:
        """Return ``group_id``, or this config's fresh random id for ``create_new``."""
        return self.fresh_group_id if group_id.strip().lower() == CREATE_NEW else group_id

    def consumer_settings(self, group_id_override: str | None = None) -> dict[str, str]:
        """librdkafka settings for a consumer: ``[broker]`` then ``[consumer]`` over it.

        ``group_id_override`` (e.g. from the command line) replaces ``group.id``;
        ``create_new`` in either place becomes :attr:`fresh_group_id`.
        """
        consumer = self.section("consumer")
        if consumer.get("auto.offset.reset", "").strip().lower() == "none":
            del consumer["auto.offset.reset"]
        settings = {**self.section("broker"), **consumer}
        if group_id_override is not None:
            settings["group.id"] = group_id_override
        if "group.id" in settings:
            settings["group.id"] = self.resolve_group_id(settings["group.id"])
        return self._require_servers(settings, "consumer")

    def producer_settings(self) -> dict[str, str]:
        """librdkafka settings for the file-chunk producer: ``[broker]`` + ``[producer]``."""
        settings = {**self.section("broker"), **self.section("producer")}
        return self._require_servers(settings, "producer")

    def _side_producer_settings(self, name: str) -> dict[str, str]:
        own = self.section(name)
        if "bootstrap.servers" in own:
            return self._require_servers(own, f"{name} producer")
        return self._require_servers({**self.section("broker"), **own}, f"{name} producer")

    def heartbeat_producer_settings(self) -> dict[str, str]:
        """Settings for the heartbeat producer (``[heartbeat]`` over, or instead of, broker)."""
        return self._side_producer_settings("heartbeat")

    def log_producer_settings(self) -> dict[str, str]:
        """Settings for the log-message producer (``[log]`` over, or instead of, broker)."""
        return self._side_producer_settings("log")

    def dead_letter_settings(self) -> tuple[str | None, dict[str, str]]:
        """The ``[dead_letter]`` section: its ``topic`` (None without one) and the
        producer's settings (the section's others over, or instead of, ``[broker]``)."""
        settings = self._side_producer_settings("dead_letter")
        return settings.pop("topic", None) or None, settings

    def rekey_settings(self) -> tuple[bool, int | None, dict[str, str]]:
        """The ``[rekey_by_file]`` section: ``enabled`` (re-key by file, as
        ``--rekey_by_file``), ``retention.ms`` of the internal topic (None: the default)
        and the settings of the internal topic's producer and admin client (the
        section's others over, or instead of, ``[broker]``)."""
        settings = self._side_producer_settings("rekey_by_file")
        enabled = parse_bool(settings.pop("enabled", "false"))
        retention = settings.pop("retention.ms", None)
        try:
            retention_ms = int(retention) if retention not in (None, "") else None
        except ValueError:
            raise ConfigError(f"retention.ms is not a number of milliseconds: {retention!r}",
                              path=str(self.path), section="rekey_by_file",
                              option="retention.ms") from None
        if enabled is None:
            raise ConfigError("enabled is not true or false", path=str(self.path),
                              section="rekey_by_file", option="enabled")
        return enabled, retention_ms, settings

    @property
    def auto_commit_disabled(self) -> bool:
        """True only if the consumer settings say ``enable.auto.commit`` is false.

        At-least-once delivery needs it: offsets are committed by hand after each upload.
        """
        raw = {**self.sections.get("broker", {}), **self.sections.get("consumer", {})}
        value = raw.get("enable.auto.commit")
        if value is None:
            return False
        try:
            value = self._expand(value, "consumer", "enable.auto.commit")
        except ConfigError:
            return False
        return parse_bool(value) is False


def _ini_problem(exc: configparser.Error) -> str:
    """What is wrong with the file, by line number only: configparser quotes the lines it
    could not parse, and such a line may be ``sasl.password hunter2``."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno} comes before the first [section] header"
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        return f"line(s) {lines} are not 'option = value' (text not shown)"
    if isinstance(exc, (configparser.DuplicateOptionError,
                        configparser.DuplicateSectionError)):
        return str(exc)  # names a section or an option, never a value
    return type(exc).__name__


def load_config(path: str | os.PathLike[str],
                env: Mapping[str, str] | None = None) -> KafkaFileConfig:
    """Read an OpenMSIStream-style config file; ``env`` defaults to ``os.environ``.

    Raises :class:`ConfigError` if the file is missing, unreadable, not valid INI, or has
    no ``[broker]`` section. Variables are expanded later, when settings are built.
    """
    config_path = Path(path)
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(config_path, encoding="utf-8") as stream:
            parser.read_file(stream)
    except FileNotFoundError:
        raise ConfigError("config file not found", path=str(config_path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", path=str(config_path)) from None
    except configparser.Error as exc:
        raise ConfigError(f"config file is not valid INI: {_ini_problem(exc)}",
                          path=str(config_path)) from None
    if not parser.has_section("broker"):
        raise ConfigError("config file has no [broker] section", path=str(config_path))
    sections = {name: dict(parser.items(name)) for name in parser.sections()}
    return KafkaFileConfig(config_path, sections,
                           env=os.environ if env is None else env)
