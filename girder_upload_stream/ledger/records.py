"""The file ledger: one record per file generation, with an explicit state.

A file generation (``(rel_path, file_hash)``) lives through these states::

    ASSEMBLING ──complete──► READY ──dispatch──► UPLOADING ──settle──► DONE | FAILED
     │  │  ▲                 ▲  ▲                  │
     │  │  └──(chunks keep   │  └──────due──── WAITING_TO_RETRY ◄──retry_later──┘
     │  │      coming)       │
     │  └─stream─► STREAMING ┘complete (a big file: a Girder upload is open and is sent
     │  ◄─unstream─┘ │         its in-order prefix while chunks keep coming; its final
     │               │         bytes wait for the sha512, sent by the finishing unit)
     │               └─settle─► FAILED (mismatched hash: the open upload is abandoned)
     ├──release──► RELEASED (incomplete for too long: holds no commit, may still complete)
     ├──settle───► DONE (found in Girder) | FAILED (rejected: bad chunk, mismatched hash)
     └──forget───► (gone: handed over to another consumer, or dropped)

``unstream`` is the way back when a streamed upload is abandoned (partitions revoked,
the file stale, the upload broken): the file goes on assembling and is uploaded whole
at completion, as any other; its open Girder upload is removed by its session.

``DONE`` and ``FAILED`` are final: the record leaves the ledger, and what later
messages of the same generation mean is decided from what the ledger remembers of it
(:meth:`FileLedger.route`). A record also has a *role*: ``FIRST`` (its messages hold
the partition's commit until it is settled) or ``AGAIN`` (the same content was put in
Girder before -- "produced again" -- so its messages hold nothing).

A generation produced again while its first copy is still on its way is not rebuilt:
its chunks are counted by a :class:`RepeatCounter`, and each whole copy is registered
once the first copy is settled.

Pure bookkeeping: no Prefect, Kafka or Girder; the caller owns the clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from enum import StrEnum

from girder_upload_stream.assembly.candidates import Group
from girder_upload_stream.shared_types import CompletedFile, FileProgress, file_generation
from girder_upload_stream.ledger.offsets import PendingOffsets
from girder_upload_stream.ledger.repeats import CopyCounts, RepeatCounter
from girder_upload_stream.ledger.states import FileState, Role
from girder_upload_stream.ledger.transitions import FileTransitions
from girder_upload_stream.wire.codec import FileKey

__all__ = ["FileState", "Role", "Route", "FileRecord", "RepeatCounter", "FileLedger",
           "LedgerError"]


class Route(StrEnum):
    """What a message of a generation means, before it reaches the reassembler."""

    DONE_BEFORE = "done_before"      # re-read of a file processed before: done at once
    COUNT_REPEAT = "count_repeat"    # a copy counted, not rebuilt: done at once
    ASSEMBLE_AGAIN = "assemble_again"  # produced again after it was settled: rebuild, hold nothing
    ASSEMBLE = "assemble"            # everything else: to the reassembler


class LedgerError(RuntimeError):
    """A transition the state machine does not allow (a programming error)."""


_ALLOWED: dict[str, tuple[FileState, ...]] = {
    "complete": (FileState.ASSEMBLING, FileState.RELEASED, FileState.STREAMING),
    "release": (FileState.ASSEMBLING,),
    "stream": (FileState.ASSEMBLING,),
    "unstream": (FileState.STREAMING,),
    "dispatch": (FileState.READY,),
    "retry_later": (FileState.UPLOADING,),
    "due": (FileState.WAITING_TO_RETRY,),
    "settle": (FileState.ASSEMBLING, FileState.RELEASED, FileState.STREAMING,
               FileState.UPLOADING),
}

#: States whose file bytes (memory modes) are held by the ledger, not the reassembler.
_HOLDING = (FileState.READY, FileState.UPLOADING, FileState.WAITING_TO_RETRY)


@dataclass(slots=True)
class FileRecord:
    """Everything the consumer knows of one generation it is working on, and every
    per-file handle: what the reassembler holds of it (``assembly``), where its pending
    messages are (``pending``), its streamed upload (``stream``) and its upload attempts
    (``failures``). Its life's transitions return their effects (:mod:`.transitions`)."""

    key: FileKey
    role: Role
    state: FileState = FileState.ASSEMBLING
    completed: CompletedFile | None = None
    unit_id: int | None = None
    retry_at: float = 0.0
    failures: int = 0  # transient upload failures so far (retry_policy.py's count)
    message_bytes: int = 0
    looked_up: bool = False  # a Girder lookup was wanted once (at most once per record)
    #: The streamed upload of this file (an opaque handle of the I/O side), from
    #: ``stream`` until the file is settled; None: uploaded whole at completion.
    stream: object | None = None
    stream_tried: bool = False  # a stream was opened once (never twice per record)
    #: Its pending messages (offsets rule 1): the per-file part of the offset tracker.
    pending: PendingOffsets = field(default_factory=PendingOffsets)
    #: Its competing candidates in the reassembler while it assembles (None before its
    #: first chunk is stored, and once it completed).
    assembly: Group | None = None

    @property
    def holds_commit(self) -> bool:
        """Whether new messages of this file are pending until it is settled (a released
        file's new chunks hold again: it may still complete)."""
        return self.role is Role.FIRST

    def progress(self) -> FileProgress | None:
        """How far it got: its assembly's, else its completed file's (None: neither)."""
        if self.assembly is not None:
            return self.assembly.progress()
        done = self.completed
        return None if done is None else FileProgress(
            done.rel_path, done.file_hash_hex, done.n_chunks, done.n_chunks, done.size, 0,
            done.first_message_at, done.last_message_at)

    @property
    def held_bytes(self) -> int:
        """File bytes in RAM that this record (not the reassembler) holds."""
        if self.state in _HOLDING and self.completed is not None \
                and self.completed.data is not None:
            return self.completed.size - self.completed.held_from
        return 0


class FileLedger(FileTransitions, CopyCounts):
    """The records of every generation in flight, plus a bounded memory of settled ones.

    ``known_done``/``known_pending`` are ``(rel_path, generation)`` pairs the registries
    list as processed / in progress (from a run before this one); ``known_in_girder``
    those of the processed files whose content Girder holds (default: all)."""

    def __init__(self, known_done: set[tuple[str, str]] | None = None,
                 known_pending: set[tuple[str, str]] | None = None,
                 max_remembered: int = 10_000,
                 known_in_girder: set[tuple[str, str]] | None = None) -> None:
        self.known_done = known_done or set()
        self.known_pending = known_pending or set()
        # Done files whose content Girder holds (not those skipped as different): only
        # these, produced again, need not hold their commit.
        self.known_in_girder = set(self.known_done if known_in_girder is None
                                   else known_in_girder)
        self._records: dict[FileKey, FileRecord] = {}
        self._by_state: dict[FileState, dict[FileKey, FileRecord]] = {s: {} for s in FileState}
        self._settled: OrderedDict[FileKey, CompletedFile] = OrderedDict()  # no bytes kept
        self._failed: OrderedDict[FileKey, None] = OrderedDict()
        self._repeats: dict[FileKey, RepeatCounter] = {}
        self._lookups: dict[FileKey, float] = {}  # Girder lookups wanted, by due time
        self._max = max_remembered
        self.held_bytes = 0

    # -- looking up ------------------------------------------------------------------
    def get(self, key: FileKey) -> FileRecord | None:
        return self._records.get(key)

    def busy(self, key: FileKey) -> bool:
        """True while a generation's fate is not durable yet."""
        return key in self._records

    def in_state(self, state: FileState) -> list[FileRecord]:
        return list(self._by_state[state].values())

    def count(self, *states: FileState) -> int:
        return sum(len(self._by_state[s]) for s in states)

    def is_known_done(self, key: FileKey) -> bool:
        return (key[0], file_generation(key[1])) in self.known_done

    def listed_by_another_program(self, key: FileKey) -> bool:
        """True when the processed table lists this path in a row without a generation
        (written by another program, e.g. OpenMSIStream 1.8.8, which keeps none): which
        content it processed is unknown, so only Girder can tell."""
        return (key[0], "") in self.known_done

    def is_in_girder(self, key: FileKey) -> bool:
        return (key[0], file_generation(key[1])) in self.known_in_girder

    def is_known_pending(self, key: FileKey) -> bool:
        return (key[0], file_generation(key[1])) in self.known_pending

    def learn_done(self, keys: set[tuple[str, str]]) -> None:
        """``(rel_path, generation)`` pairs learnt during the run to be processed and in
        Girder (a registry fallback read late): their files' messages read from now on
        are routed as the ``known_done`` ones; files already in flight are unchanged."""
        self.known_done |= keys
        self.known_in_girder |= keys

    def failed_for_good(self, key: FileKey) -> bool:
        """True if this generation's upload failed for good in this run."""
        return key in self._failed

    def route(self, key: FileKey, reread: bool) -> Route:
        """The one place that says what a message means before reassembly (offsets
        rules 3 and 7): ``reread`` -- an earlier owner of the group read it. A new
        production of a file whose content Girder holds is rebuilt without holding its
        commit; of any other file settled before (failed for good, or skipped because a
        different file of that name was there), it is rebuilt holding it."""
        if key in self._records:
            return Route.ASSEMBLE
        if key in self._failed:
            return Route.ASSEMBLE  # a failed file is rebuilt and tried again, holding commits
        if reread:
            # Done before, unless the registry says its messages are read again for it
            # (in progress, or a failed upload retried by this run: rule 9).
            done = self.is_known_done(key) and not self.is_known_pending(key)
            return Route.DONE_BEFORE if done else Route.ASSEMBLE
        if key in self._repeats:
            return Route.COUNT_REPEAT
        if self.is_in_girder(key):
            return Route.ASSEMBLE_AGAIN
        return Route.ASSEMBLE

    # -- transitions -------------------------------------------------------------------
    def _move(self, record: FileRecord, transition: str, state: FileState) -> None:
        if record.state not in _ALLOWED[transition]:
            raise LedgerError(f"{record.key[0]}: cannot {transition} a file that is "
                              f"{record.state.value}")
        self.held_bytes -= record.held_bytes
        del self._by_state[record.state][record.key]
        record.state = state
        self._by_state[state][record.key] = record
        self.held_bytes += record.held_bytes

    def open(self, key: FileKey, role: Role = Role.FIRST) -> FileRecord:
        """A record for a generation whose first message is being taken (or the one
        already open)."""
        record = self._records.get(key)
        if record is None:
            self._failed.pop(key, None)
            record = FileRecord(key, role)
            self._records[key] = record
            self._by_state[record.state][key] = record
        return record

    def complete(self, key: FileKey, completed: CompletedFile) -> FileRecord:
        """ASSEMBLING/RELEASED -> READY: the file is whole and its sha512 matched."""
        record = self._records[key]
        record.completed, record.assembly = completed, None
        self._move(record, "complete", FileState.READY)
        return record

    def stream(self, key: FileKey, handle: object) -> None:
        """ASSEMBLING -> STREAMING: a Girder upload of this file was opened (``handle``)
        and is fed its in-order prefix while the file assembles."""
        record = self._records[key]
        self._move(record, "stream", FileState.STREAMING)
        record.stream, record.stream_tried = handle, True

    def unstream(self, key: FileKey) -> object | None:
        """STREAMING -> ASSEMBLING: the streamed upload is given up; returns its handle
        (for the caller to abandon). The file is uploaded whole once complete."""
        record = self._records[key]
        self._move(record, "unstream", FileState.ASSEMBLING)
        handle, record.stream = record.stream, None
        return handle

    def release(self, key: FileKey) -> None:
        """ASSEMBLING -> RELEASED: incomplete for too long, stops holding commits."""
        self._move(self._records[key], "release", FileState.RELEASED)

    def dispatch(self, key: FileKey, unit_id: int) -> None:
        """READY -> UPLOADING in upload unit ``unit_id``."""
        record = self._records[key]
        record.unit_id = unit_id
        self._move(record, "dispatch", FileState.UPLOADING)

    def retry_later(self, key: FileKey, at: float) -> None:
        """UPLOADING -> WAITING_TO_RETRY until ``at`` (a transient failure, counted in
        ``failures``: the retry policy's attempts)."""
        record = self._records[key]
        record.retry_at, record.unit_id = at, None
        record.failures += 1
        self._move(record, "retry_later", FileState.WAITING_TO_RETRY)

    def due(self, now: float) -> list[FileRecord]:
        """WAITING_TO_RETRY -> READY for every record whose delay has passed."""
        due = [r for r in self._by_state[FileState.WAITING_TO_RETRY].values()
               if r.retry_at <= now]
        for record in due:
            self._move(record, "due", FileState.READY)
        return due

    def settle(self, key: FileKey, state: FileState, in_girder: bool = True) -> FileRecord:
        """-> DONE or FAILED, final: the record leaves the ledger. A generation done is
        remembered (its copies may still be counted); one whose upload failed for good
        is remembered as failed, so that producing it again retries it."""
        if state not in (FileState.DONE, FileState.FAILED):
            raise LedgerError(f"settle to {state.value}")
        record = self._records[key]
        self._move(record, "settle", state)
        self._drop(record)
        if state is FileState.DONE:
            self.known_done.add((key[0], file_generation(key[1])))
            if in_girder:
                self.known_in_girder.add((key[0], file_generation(key[1])))
            if record.completed is not None:
                self._remember(self._settled, key, replace(record.completed, data=None))
        else:
            self._repeats.pop(key, None)  # copies of a failed file are rebuilt, not counted
            if record.completed is not None:  # uploaded in vain, not a bad file
                self._remember(self._failed, key, None)
        return record

    def forget(self, key: FileKey) -> FileRecord | None:
        """Any state -> gone (handed over, dropped): its messages come back as new."""
        record = self._records.get(key)
        if record is not None:
            self._drop(record)
            # Copies counted against a first copy that will not settle here must be
            # rebuilt when their chunks come back, not counted again.
            self._repeats.pop(key, None)
        return record

    def _drop(self, record: FileRecord) -> None:
        self.held_bytes -= record.held_bytes
        del self._by_state[record.state][record.key]
        del self._records[record.key]
        self._lookups.pop(record.key, None)

    def _remember(self, memory: OrderedDict, key: FileKey, value) -> None:
        memory[key] = value
        memory.move_to_end(key)
        while len(memory) > self._max:
            old, _ = memory.popitem(last=False)
            self._repeats.pop(old, None)

    # -- Girder lookups of re-read files ----------------------------------------------
    def want_lookup(self, key: FileKey, at: float) -> None:
        """Ask Girder once whether it holds this generation (from ``at`` on)."""
        record = self._records.get(key)
        if record is not None and not record.looked_up:
            record.looked_up = True
            self._lookups[key] = at

    def take_lookups(self, now: float) -> list[FileKey]:
        """The lookups due now; each is handed out once (see :meth:`lookup_unanswered`)."""
        due = [key for key, at in self._lookups.items() if at <= now]
        for key in due:
            del self._lookups[key]
        return due

    def lookup_unanswered(self, key: FileKey, at: float) -> None:
        """Girder could not tell: ask again from ``at`` on (while the file is in flight)."""
        if key in self._records:
            self._lookups[key] = at

    @property
    def lookups_wanted(self) -> int:
        return len(self._lookups)
