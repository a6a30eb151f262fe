"""KafkaCrypto: the node that encrypts and decrypts messages of encrypted topics.

A topic is encrypted when the config file has a ``[kafkacrypto]`` section naming a
*node*: a KafkaCrypto store (``<node_id>.config``) with the node's signing key and
ratchet next to it, provisioned beforehand with kafkacrypto's tools or OpenMSIStream's
``ProvisionNode``. The node exchanges message keys with the other nodes over three
topics per topic *root* (the topic name up to its first ``.``): ``<root>.keys``,
``<root>.reqs`` and ``<root>.subs``. A producer answers key requests while it runs; a
consumer asks for the key of each key index it meets and can decrypt once a producer
(or a controller) has answered.

This module owns every ``kafkacrypto`` call. The data topic itself is still read and
written with confluent-kafka (kafka_io.py): only the key exchange uses kafkacrypto's
own clients, and messages are encrypted or decrypted here, one key and value at a
time. kafkacrypto is an optional dependency (``pip install
'girder-upload-stream[kafkacrypto]'``, plus the system's libsodium); it is imported only
when a config asks for it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from girder_upload_stream.wire.config_files import BUNDLED_DIR
from girder_upload_stream.errors import ConfigError

__all__ = ["KEY_EXCHANGE_SUFFIXES", "KafkaCryptoNode", "MessageDecryption", "PartState",
           "ensure_key_exchange_topics", "key_exchange_topics", "missing_key_exchange_topics",
           "node_dirs", "open_node", "start_decryption", "topic_root",
           "warn_missing_key_topics"]

logger = logging.getLogger(__name__)

KEY_EXCHANGE_SUFFIXES = (".keys", ".reqs", ".subs")
_FILE_PREFIX = "file#"


def topic_root(topic: str) -> str:
    """The root KafkaCrypto keys a topic by: its name up to the first ``.``."""
    return topic.split(".", 1)[0]


def key_exchange_topics(topic: str) -> list[str]:
    """The three topics the nodes of ``topic`` exchange keys over."""
    return [topic_root(topic) + suffix for suffix in KEY_EXCHANGE_SUFFIXES]


def node_dirs() -> list[Path]:
    """Folders searched for ``<node_id>/<node_id>.config`` before the config file's own
    folder and the current directory: ``$OPENMSISTREAM_CONFIG_FILE_DIR``, our bundled
    configs, and OpenMSIStream's bundled configs when it is installed here (where its
    ``ProvisionNode`` puts new nodes)."""
    folders = []
    if os.environ.get("OPENMSISTREAM_CONFIG_FILE_DIR"):
        folders.append(Path(os.environ["OPENMSISTREAM_CONFIG_FILE_DIR"]))
    folders.append(BUNDLED_DIR)
    spec = importlib.util.find_spec("openmsistream")  # located, not imported
    if spec is not None and spec.origin:
        folders.append(Path(spec.origin).parent / "kafka_wrapper" / "config_files")
    return folders


def _import_kafkacrypto() -> Any:
    """kafkacrypto, imported quietly (it announces its version as RuntimeWarnings)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            import kafkacrypto
    except ImportError as exc:
        raise ConfigError(
            f"the config has a [kafkacrypto] section but kafkacrypto cannot be imported "
            f"({exc}): install it with `pip install 'girder-upload-stream[kafkacrypto]'` "
            f"and the system's libsodium (Debian: apt-get install libsodium23)") from None
    return kafkacrypto


def _quiet_kafkacrypto() -> None:
    """kafkacrypto's INFO lines (every setting it loads, every message it cannot
    decrypt yet) and WARNING tracebacks drown ours, and what matters is reported by
    this project: its loggers show errors only."""
    logging.getLogger("kafkacrypto").setLevel(logging.ERROR)


def _resolve(value: str | None, default: str, folder: Path) -> str:
    """A file named in the store (``file#NAME``, relative to the store's folder, which
    is how kafkacrypto's provisioning writes it) as an absolute path. OpenMSIStream
    changes the working directory for this; a path is thread-safe."""
    text = value if value else default
    if text.startswith(_FILE_PREFIX):
        text = text[len(_FILE_PREFIX):]
    path = Path(text)
    return str(path if path.is_absolute() else folder / path)


class KafkaCryptoNode:
    """One provisioned KafkaCrypto node: its key-exchange clients and background thread.

    ``broker`` (the config file's ``[broker]`` settings) is laid over the store's own
    Kafka settings for the key-exchange clients, as OpenMSIStream does, so a store
    provisioned for another cluster still talks to this one. The store file is
    KafkaCrypto's state (it writes producer keys and chains into it): one node per
    process, and it must be writable.
    """

    def __init__(self, store_path: Path, broker: dict[str, str]) -> None:
        kafkacrypto = _import_kafkacrypto()
        self.store_path = Path(store_path)
        folder = self.store_path.parent
        try:
            store = kafkacrypto.KafkaCryptoStore(str(self.store_path), conf_global_logger=False)
            try:
                self.node_id = store.load_value("node_id", section="DEFAULT") or ""
                consumer = store.get_kafka_config("consumer", extra="crypto")
                producer = store.get_kafka_config("producer", extra="crypto")
                cryptokey = _resolve(store.load_value("cryptokey"), f"{self.node_id}.crypto",
                                     folder)
                ratchet = _resolve(store.load_value("ratchet"), f"{self.node_id}.seed", folder)
            finally:
                store.close()
            _quiet_kafkacrypto()  # the store just set kafkacrypto's loggers from its file
            consumer.update(broker)
            producer.update(broker)
            self._crypto = kafkacrypto.KafkaCrypto(
                None, kafkacrypto.KafkaProducer(**producer),
                kafkacrypto.KafkaConsumer(**consumer), str(self.store_path),
                cryptokey=cryptokey, seed=ratchet)
        except ConfigError:
            raise
        except BlockingIOError:
            raise ConfigError("the KafkaCrypto node's store is in use by another running "
                              "program (a node's files can serve one program at a time)",
                              path=str(self.store_path)) from None
        except Exception as exc:  # kafkacrypto raises plain exceptions for bad stores
            logger.debug("KafkaCrypto node start failed", exc_info=True)
            raise ConfigError(f"cannot start the KafkaCrypto node: {type(exc).__name__}: {exc}",
                              path=str(self.store_path)) from None
        # kafkacrypto's deserializer sleeps up to ~10 s on the first message of each key
        # index, inside the caller's thread. The polling loop must not block: it waits
        # for keys itself (decrypting.py), so the library may only look, never sleep.
        self._crypto.DESER_INITIAL_WAIT_INTERVALS = 1
        self.key_serializer = self._crypto.getKeySerializer()
        self.value_serializer = self._crypto.getValueSerializer()
        self.key_deserializer = self._crypto.getKeyDeserializer()
        self.value_deserializer = self._crypto.getValueDeserializer()
        self._lock = threading.Lock()
        self._closed = False

    def encrypt(self, topic: str, key: bytes, value: bytes) -> tuple[bytes, bytes]:
        """``(key, value)`` encrypted for ``topic``; the first message of a root makes a
        producer key, which this node then hands to consumers that ask for it."""
        encrypted_key = self.key_serializer.serialize(topic, key)
        encrypted_value = self.value_serializer.serialize(topic, value)
        if not isinstance(encrypted_key, bytes) or not isinstance(encrypted_value, bytes):
            raise ConfigError("KafkaCrypto could not encrypt a message (is this node "
                              "provisioned as a producer?)", path=str(self.store_path))
        return encrypted_key, encrypted_value

    def wait_keys_saved(self, timeout: float = 10.0) -> bool:
        """Wait until the node has written the producer keys it made into its store
        (its background thread does, about once a second): a node closed before that
        loses them, and consumers could never get the keys of what it produced."""
        deadline = time.monotonic() + timeout
        while getattr(self._crypto, "_new_pgens", False):
            if time.monotonic() >= deadline:
                logger.warning("KafkaCrypto node %r did not save its new producer keys "
                               "within %gs", self.node_id, timeout)
                return False
            time.sleep(0.1)
        return True

    def decryption(self, topic: str, key: bytes | None, value: bytes | None
                   ) -> MessageDecryption:
        """A :class:`MessageDecryption` of one message read from ``topic``."""
        return MessageDecryption(self, topic, key, value)

    def close(self) -> None:
        """Stop the key-exchange thread (it saves new producer keys first) and clients."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._crypto.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            logger.warning("error while closing the KafkaCrypto node: %s", exc)


def open_node(store_path: Path, broker: dict[str, str]) -> KafkaCryptoNode:
    """Start the node whose store is ``store_path`` (see :class:`KafkaCryptoNode`)."""
    node = KafkaCryptoNode(store_path, broker)
    logger.info("KafkaCrypto node %r started (store %s)", node.node_id, store_path)
    return node


def start_decryption(options: Any, recorder: Any = None) -> Any:
    """A :class:`~girder_upload_stream.kafka.decrypting.DecryptingReader` over a new node for
    ``options`` (a :class:`~girder_upload_stream.settings.KafkaCryptoSettings`); closing
    the reader closes the node."""
    from girder_upload_stream.kafka.decrypting import DecryptingReader
    node = open_node(options.config_file, dict(options.broker))
    return DecryptingReader(
        node.decryption, treat_undecryptable_as_plaintext=options.treat_undecryptable_as_plaintext,
        max_wait_per_decrypt=options.max_wait_per_decrypt,
        max_initial_wait_per_decrypt=options.max_initial_wait_per_decrypt,
        recorder=recorder, on_close=node.close)


def warn_missing_key_topics(client: Any, topic: str) -> None:
    """Say so at once when the topics keys travel over are missing: no message could be
    decrypted (the broker does not create them; whoever creates the topic does)."""
    missing = missing_key_exchange_topics(client, topic)
    if missing:
        logger.error("the KafkaCrypto key-exchange topic(s) %s do not exist: no message of %s "
                     "can be decrypted until they are created (`girder-upload-stream "
                     "produce` creates them, with one partition each)", ", ".join(missing),
                     topic)


class PartState:
    """Where one part (key or value) of a message stands."""

    CLEAR = "clear"  # decrypted (or absent)
    WAIT = "wait"    # encrypted with a key this node does not have (yet)
    NEVER = "never"  # not a KafkaCrypto message: no key can ever decrypt it


class _Part:
    """One encrypted key or value and kafkacrypto's handle on it."""

    __slots__ = ("raw", "clear", "_handle", "state")

    def __init__(self, deserializer: Any, topic: str, raw: bytes | None) -> None:
        self.raw = raw
        self.clear: bytes | None = None
        self._handle = None
        if raw is None:
            self.state = PartState.CLEAR
            return
        self._handle = deserializer.deserialize(topic, raw)
        self.state = PartState.WAIT
        self._settle(retry=False)

    def _settle(self, retry: bool) -> None:
        handle = self._handle
        if handle.isCleartext(retry=retry):
            self.clear = bytes(handle.getMessage(retry=False))
            self.state, self._handle = PartState.CLEAR, None
        elif not handle.isPossiblyDecryptable():
            self.state = PartState.NEVER

    def retry(self) -> str:
        if self.state == PartState.WAIT:
            self._settle(retry=True)
        return self.state


class MessageDecryption:
    """The key and value of one message, decrypted as far as the keys received allow.

    The value is only looked at once the key no longer waits: both use the same key
    index, so while the key's is missing, trying the (large) value would only copy it.
    :attr:`state` is the worst of the two parts. The message's bytes are held until
    :meth:`release`.
    """

    def __init__(self, node: KafkaCryptoNode, topic: str, key: bytes | None,
                 value: bytes | None) -> None:
        self._node, self._topic = node, topic
        self._key: _Part | None = _Part(node.key_deserializer, topic, key)
        self._value: _Part | None = None
        self._raw_value = value
        self.size = len(key or b"") + len(value or b"")

    def _value_now(self) -> _Part | None:
        if self._value is None and self._key is not None and self._key.state != PartState.WAIT:
            self._value = _Part(self._node.value_deserializer, self._topic, self._raw_value)
            self._raw_value = None
        return self._value

    @property
    def state(self) -> str:
        value = self._value_now()
        if self._key is None:  # released
            return PartState.WAIT
        if PartState.NEVER in (self._key.state, value.state if value else None):
            return PartState.NEVER
        if value is None or value.state == PartState.WAIT:
            return PartState.WAIT
        return PartState.CLEAR

    def retry(self) -> str:
        """Try the parts still waiting again; returns the new :attr:`state`."""
        if self._key is not None:
            self._key.retry()
            value = self._value_now()
            if value is not None:
                value.retry()
        return self.state

    def never_parts(self) -> list[str]:
        """Which parts ("key", "value") are not KafkaCrypto messages at all."""
        parts = (("key", self._key), ("value", self._value_now()))
        return [name for name, part in parts if part is not None and part.state == PartState.NEVER]

    def plaintext(self) -> tuple[bytes | None, bytes | None]:
        """The decrypted key and value; a part that is not a KafkaCrypto message is
        taken as it is (``--treat_undecryptable_as_plaintext``)."""
        result = []
        for part in (self._key, self._value_now()):
            if part is None:
                result.append(None)
            else:
                result.append(part.raw if part.state == PartState.NEVER else part.clear)
        return result[0], result[1]

    def release(self) -> None:
        """Drop the message's bytes: it was given up, and memory is short."""
        self._key = self._value = None
        self._raw_value = None
        self.size = 0


def missing_key_exchange_topics(admin: Any, topic: str, timeout: float = 30.0) -> list[str]:
    """The key-exchange topics of ``topic`` the broker does not have."""
    metadata = admin.list_topics(timeout=timeout)
    return [name for name in key_exchange_topics(topic)
            if name not in metadata.topics or metadata.topics[name].error is not None]


def ensure_key_exchange_topics(settings: dict[str, str], topic: str,
                               timeout: float = 30.0) -> list[str]:
    """Create the key-exchange topics of ``topic`` that are missing (the broker does not
    create topics by itself); returns the ones created. kafkacrypto reads partition 0
    only, so they have one partition; the replication factor is the broker's default."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient(dict(settings))
    try:
        missing = missing_key_exchange_topics(admin, topic, timeout)
        if not missing:
            return []
        futures = admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=-1)
                                       for name in missing], operation_timeout=timeout)
        created = []
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
                created.append(name)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if getattr(error, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise  # not made by another producer meanwhile
    except KafkaException as exc:
        raise ConfigError(f"cannot create the KafkaCrypto key-exchange topics "
                          f"{', '.join(key_exchange_topics(topic))}: {exc}") from None
    if created:
        logger.info("created the KafkaCrypto key-exchange topics %s", ", ".join(created))
    return created
