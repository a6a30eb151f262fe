"""Typed settings, one model per external system. Secrets are ``SecretStr``: they come
from the command line, the environment or a Prefect Secret block and are never logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from girder_upload_stream import timings
from girder_upload_stream.wire.codec import DEFAULT_MAX_FILE_BYTES, MAX_POSSIBLE_FILE_BYTES

__all__ = ["DEFAULT_COLLECTION_NAME", "GirderSettings", "KafkaCryptoSettings", "KafkaSettings",
           "RunSettings"]

DEFAULT_COLLECTION_NAME = "WholeTale Catalog"


class GirderSettings(BaseModel):
    """Where and how files land in Girder."""

    model_config = ConfigDict(frozen=True)

    api_url: str
    api_key: SecretStr
    root_folder_id: str | None = None
    collection_name: str = DEFAULT_COLLECTION_NAME
    #: Folders below the collection, '/'-separated (default "{collection_name}/{topic}":
    #: OpenMSIStream 1.8.8 makes its first part a folder too, named like the collection).
    root_folder_path: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    replace_existing: bool = False

    @field_validator("api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def root_path_for(self, topic: str) -> str:
        """The root folder's path below the collection ``collection_name``, as
        OpenMSIStream 1.8.8 builds it: every part is a folder, the first one included
        (the default ``{collection_name}/{topic}`` gives ``/collection/C/C/topic``)."""
        return (self.root_folder_path or f"{self.collection_name}/{topic}").strip("/")



class KafkaCryptoSettings(BaseModel):
    """Decryption of a KafkaCrypto-encrypted topic (the config's ``[kafkacrypto]``)."""

    model_config = ConfigDict(frozen=True)

    config_file: Path  # the node's KafkaCrypto store, found as OpenMSIStream finds it
    broker: dict[str, str] = Field(default_factory=dict)  # [broker], for the key exchange
    treat_undecryptable_as_plaintext: bool = False
    max_wait_per_decrypt: float = Field(default=5.0, gt=0)
    max_initial_wait_per_decrypt: float = Field(default=60.0, gt=0)


class KafkaSettings(BaseModel):
    """The topic, the consumer group and the librdkafka settings from the config file."""

    model_config = ConfigDict(frozen=True)

    topic: str
    group_id: str
    #: librdkafka settings, SASL/SSL passwords included: kept out of ``repr()``.
    consumer: dict[str, str] = Field(repr=False)
    #: Upload tasks running at once (--n_threads). The process reads with one consumer:
    #: all polling happens in the flow's thread, so more consumers would only add
    #: rebalances (and their re-reads) without reading faster.
    n_threads: int = Field(default=2, ge=1)
    heartbeat_topic: str | None = None
    heartbeat_program_id: str | None = None
    heartbeat_interval_secs: float = 900.0  # OpenMSIStream 1.8.8's default
    heartbeat_producer: dict[str, str] = Field(default_factory=dict, repr=False)
    kafkacrypto: KafkaCryptoSettings | None = None  # None: the topic is not encrypted


class RunSettings(BaseModel):
    """How the consumer runs: reassembly, batching, memory, stop conditions, console."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["memory", "disk", "both"] = "memory"
    output_dir: Path = Path("GirderUploadStreamProcessor_output")
    logger_file_path: Path | None = None
    download_regex: str | None = None
    memory_budget_bytes: int = Field(default=1 << 30, ge=1 << 20)
    #: Files from this size stream into Girder while they arrive (None: never).
    stream_min_bytes: int | None = Field(default=64 << 20, ge=1)
    #: The largest file rebuilt (--max_file_size_mb); a chunk of a larger one rejects it.
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, ge=1, le=MAX_POSSIBLE_FILE_BYTES)
    max_unit_files: int = Field(default=64, ge=1)
    #: Bytes per upload unit: small enough that units running side by side stay close
    #: in offset order (a restart re-reads what lies between them), large enough that
    #: small files still share a task run (64 x 64 KiB = 4 MiB).
    max_unit_bytes: int = Field(default=16 << 20, ge=1)
    #: Seconds completed files may wait for company before a unit that is not full is
    #: started (each unit is a Prefect task run, ~24 KiB of the server's database).
    upload_linger_seconds: float = Field(default=5.0, ge=0)
    update_seconds: float = 300.0
    #: Seconds between the progress lines on standard error (loop/progress.py); 0: none.
    progress_seconds: float = Field(default=30.0, ge=0)
    max_idle_seconds: float | None = None
    max_runtime_seconds: float | None = None
    interactive: bool = True
    poll_batch: int = Field(default=500, ge=1)
    commit_interval_seconds: float = 1.0
    registry_interval_seconds: float = 2.0
    #: Wait before a re-read file Girder could not be asked about is looked up again
    #: (the run's ``ledger_retry_seconds``, girder_upload_stream/timings.py); upload
    #: retries follow girder_upload_stream/retry_policy.py.
    retry_delay_seconds: float = Field(
        default_factory=lambda: timings.current().ledger_retry_seconds, ge=0)
    #: A partial file with no new chunk for this long stops holding commits (None: never).
    stale_partial_seconds: float | None = Field(default=3600.0, gt=0)
    #: Files being rebuilt at once (--max_files_in_progress); a chunk of one more waits
    #: (put off, uncommitted, read again once a file makes room: offsets rule 10).
    max_files_in_progress: int = Field(default=1000, ge=1)

    @property
    def logs_dir(self) -> Path:
        return self.logger_file_path or self.output_dir / "LOGS"
