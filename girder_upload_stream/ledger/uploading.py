"""The upload side of the :class:`~girder_upload_stream.ledger.processor.StreamProcessor`:
completed files packed into upload units, and each file settled from its outcome. A
mixin of the processor: it works on its ledger, offsets, reassembler and recorder."""

from __future__ import annotations

import logging
from dataclasses import replace

from girder_upload_stream.shared_types import (CompletedFile, FileOutcome, Outcome,
                                               RETRIED_NEXT_RUN)
from girder_upload_stream.ledger.records import FileRecord, FileState, Role
from girder_upload_stream.ledger.units import UploadUnit, group_into_units, stripe_into_units

__all__ = ["Uploading", "RETRIED_NEXT_RUN"]

logger = logging.getLogger(__name__)


class Uploading:
    """Upload units and outcomes (see the module)."""

    # -- uploading -------------------------------------------------------------------
    def take_units(self) -> list[UploadUnit]:
        """Completed files (and transient failures whose delay passed) as upload units,
        no more at once than ``max_inflight_units``, and no more than the files fill.

        Every unit costs a Prefect task run (about 24 KiB of the server's database, its
        events included), so at low rates files wait for company: until they fill a
        unit, or ``linger_seconds`` have passed since a worker was free for them (the
        lingering never delays a file's upload by more than that)."""
        self.settle_liars()  # found by a streamed upload's thread (lazy check 2)
        self.expire_stale()
        free = (1 if self.max_inflight_units is None
                else self.max_inflight_units - len(self._units))
        if free <= 0:
            return []  # every worker busy: sort and pack when one frees up, not each round
        now = self._clock()
        if self.ledger.due(now):  # they waited their retry delay: no linger on top
            self._ready_since = min(self._ready_since or now, now - self.linger_seconds)
        ready = self.ledger.in_state(FileState.READY)
        if not ready:
            self._ready_since = None
            return []
        if self._ready_since is None:
            self._ready_since = now
        if now - self._ready_since < self.linger_seconds \
                and not self._fills_a_unit([r.completed for r in ready]):
            return []  # lingering: more files may come to share the unit
        # Oldest messages first: a partition's commit waits for its lowest pending
        # offset, so uploading in completion order (scrambled across partitions) would
        # hold every commit near the start while the reading runs far ahead.
        ready.sort(key=lambda r: r.pending.first_offset())
        files = [r.completed for r in ready]
        self._ready_since = None
        if self.max_inflight_units is None:
            units = group_into_units(files, self._next_unit, self.max_unit_files,
                                     self.max_unit_bytes)
        else:
            # No more units than can run at once, striped: the rest stay READY, so the
            # next unit takes the oldest files when a worker frees up.
            units, rest = stripe_into_units(files, self._next_unit,
                                            min(free, self._units_needed(files)),
                                            self.max_unit_files, self.max_unit_bytes)
            if rest:
                self._ready_since = now - self.linger_seconds  # they waited: no new linger
        self._next_unit += len(units)
        for unit in units:
            self._units[unit.unit_id] = unit
            for completed in unit.files:
                record = self.ledger.get(completed.file_key)
                if record.stream is not None:  # its finishing step sends the rest
                    unit.streams[completed.file_key] = record.stream
                if record.role is Role.AGAIN:
                    unit.known_there.add(completed.file_key)
                self.ledger.dispatch(completed.file_key, unit.unit_id)
        return units

    def _units_needed(self, files: list[CompletedFile]) -> int:
        """How many units ``files`` fill at least (by count and by bytes): striping a
        few files over every free worker would only cost more task runs."""
        by_count = -(-len(files) // self.max_unit_files)
        by_bytes = -(-sum(f.size for f in files) // self.max_unit_bytes)
        return max(1, by_count, by_bytes)

    def _fills_a_unit(self, files: list[CompletedFile]) -> bool:
        return (len(files) >= self.max_unit_files
                or sum(f.size for f in files) >= self.max_unit_bytes)

    def settle_early(self, unit_id: int, outcome: FileOutcome) -> None:
        """A file of a unit still running has landed (or failed for good): settle it now,
        so its offsets need not wait for the rest of the unit. Transient outcomes wait
        for the unit's result (its retry decides)."""
        if outcome.outcome.durable:
            self.settle(unit_id, outcome)

    def finish_unit(self, unit: UploadUnit, outcomes: list[FileOutcome]) -> None:
        """Settle each file of a unit from its outcome (files settled early are left
        alone); a missing outcome is transient."""
        self._units.pop(unit.unit_id, None)
        by_key = {o.file_key: o for o in outcomes}
        for completed in unit.files:
            key = completed.file_key
            self.settle(unit.unit_id, by_key.get(key) or FileOutcome(
                completed.rel_path, key, Outcome.FAILED_TRANSIENT, "no outcome reported"))
        for completed in unit.files:
            # Only now that the unit is over (a retry of the task re-reads its files),
            # and only if no retry of this very file waits for it.
            record = self.ledger.get(completed.file_key)
            if record is None or record.completed is not completed:
                self.reassembler.release(completed)

    def fail_unit(self, unit: UploadUnit, reason: str) -> None:
        """A whole unit failed (it raised: Girder unreachable, a refused token, a 5xx for
        one of its files, a crash): its files not settled yet are tried again later."""
        self.finish_unit(unit, [FileOutcome(f.rel_path, f.file_key,
                                            Outcome.FAILED_TRANSIENT, reason) for f in unit.files])

    def settle(self, unit_id: int, outcome: FileOutcome) -> None:
        """One file's upload outcome, from either report; the first one counts."""
        record = self.ledger.get(outcome.file_key)
        if record is None or record.state is not FileState.UPLOADING \
                or record.unit_id != unit_id:
            return  # settled already (reported early), or no longer ours
        completed = record.completed
        failed = outcome.outcome is Outcome.FAILED_TERMINAL
        if failed and record.role is Role.FIRST:
            outcome = replace(outcome, reason=f"{outcome.reason}; {RETRIED_NEXT_RUN}")
        self.recorder.file_outcome(completed, outcome)
        if not outcome.outcome.durable:
            self._retry_later(record, outcome.reason)
            return
        self._count_outcome(completed, outcome)
        self.last_settled_at = self._clock()
        self.counters.messages_processed += completed.n_chunks
        self.counters.bytes_processed += record.message_bytes or completed.size
        self._carry_out(self.ledger.finish(
            record.key, FileState.FAILED if failed else FileState.DONE,
            retry=failed and record.role is Role.FIRST,
            in_girder=outcome.outcome is not Outcome.SKIPPED_DIFFERENT))
        if failed:
            self.counters.files_to_retry += 1
        else:
            self._register_repeats(record.key)

    def _retry_later(self, record: FileRecord, reason: str) -> None:
        """A transient failure: the file waits (registered, its messages uncommitted)
        for its next attempt, after the retry policy's delay (retry_policy.py)."""
        delay = self.retry_policy.delay(record.failures + 1)
        logger.warning("upload of %s failed (%s); attempt %d, retrying in %.0fs",
                       record.key[0], reason, record.failures + 1, delay)
        self.ledger.retry_later(record.key, self._clock() + delay)

    def _count_outcome(self, completed: CompletedFile, outcome: FileOutcome) -> None:
        if outcome.outcome is Outcome.FAILED_TERMINAL:
            logger.error("upload of %s failed for good: %s", completed.rel_path, outcome.reason)
            self.counters.files_failed += 1
        elif outcome.outcome in (Outcome.UPLOADED, Outcome.REPLACED):
            self.counters.files_uploaded += 1
        elif outcome.outcome is Outcome.SKIPPED_DIFFERENT:
            self.counters.files_skipped_different += 1  # not "already in Girder": it is not
        else:
            self.counters.files_skipped += 1

