"""The consumer's own files below output_dir, out of reach of message names.

* partial files live in this run's staging folder ``.gus-staging/run-*/``, named from a
  hash of the generation, never from message text;
* a path that equals, lies below, or is a folder above a reserved path (the staging
  folder, the logs folder inside output_dir) is rejected in every mode;
* in disk mode the upload reads the verified staging file, which ``release`` deletes
  once the file is settled (as OpenMSIStream 1.8.8 deletes a rebuilt file); both mode
  keeps its local copy; the staging files of runs that ended are deleted at start;
* names up to 255 UTF-8 bytes per component work in every mode, longer ones are
  rejected with one reason in every mode.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from girder_upload_stream.wire.codec import Chunk, chunk_file, decode_chunk, encode_chunk
from girder_upload_stream.errors import ChunkDecodeError
from girder_upload_stream.ledger.processor import StreamProcessor
from girder_upload_stream.shared_types import FileOutcome, Outcome, RawMessage
from girder_upload_stream.assembly.reassembly import (STAGING_DIR, AddStatus, Mode, Reassembler,
                                             reserved_paths)

MODES = [Mode.MEMORY, Mode.DISK, Mode.BOTH]


def chunks_of(data: bytes, name: str, subdir: str = "", size: int = 4) -> list[Chunk]:
    return [decode_chunk(encode_chunk(c)[1])
            for c in chunk_file(data, subdir, size, filename=name)]


def rebuild(reassembler: Reassembler, chunks: list[Chunk]):
    return [reassembler.add(c) for c in chunks][-1]


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


def make(mode: Mode, out: Path, **kwargs) -> Reassembler:
    return Reassembler(mode, out if mode is not Mode.MEMORY else None, **kwargs)


# ------------------------------------------------------------ reserved paths

RESERVED = {"LOGS", "deep/er/logs"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("subdir", "name", "reaches"), [
    ("", "LOGS", "LOGS"),                          # equal: a file where the folder is
    ("LOGS", "consuming_from_t_by_g_in_progress.csv", "LOGS"),  # below: a forged registry
    ("LOGS/sub", "x.log", "LOGS"),
    ("", "deep", "deep/er/logs"),                  # a folder above: stands in the way
    ("deep", "er", "deep/er/logs"),
    ("deep/er/logs", "x", "deep/er/logs"),
    ("", STAGING_DIR, STAGING_DIR),
    (STAGING_DIR, "x.partial", STAGING_DIR),
    (f"{STAGING_DIR}/run-0123456789abcdef", "0" * 40 + "-1.partial", STAGING_DIR),
])
def test_paths_reaching_the_consumers_own_folders_are_rejected_in_every_mode(
        tmp_path, mode, subdir, name, reaches):
    out = tmp_path / "out"
    reassembler = make(mode, out, reserved=RESERVED)
    result, *later = [reassembler.add(c) for c in chunks_of(b"forged rows", name, subdir)]
    assert result.status is AddStatus.REJECTED, result
    assert {r.status for r in later} == {AddStatus.IGNORED}
    rel = f"{subdir}/{name}" if subdir else name
    assert result.reason == (f"reserved path: {rel!r} reaches {reaches!r}, where the "
                             "consumer keeps its own files")
    assert not (out / "LOGS").exists() and not (out / "deep").exists()
    if reassembler.staging_dir is not None:
        assert tree(out / STAGING_DIR) == {reassembler.staging_dir.name}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("subdir", "name"), [
    ("", "LOGS2"), ("LOGS2", "x"), ("logs", "x"), ("deep/er", "logs2"), ("deep/err", "x"),
    ("", ".gus-staging2"), ("a", STAGING_DIR + ".txt"),
])
def test_neighbours_of_reserved_paths_are_ordinary_files(tmp_path, mode, subdir, name):
    reassembler = make(mode, tmp_path / "out", reserved=RESERVED)
    done = rebuild(reassembler, chunks_of(b"fine", name, subdir)).completed
    assert done is not None and done.size == 4


def test_reserved_paths_are_the_logs_folder_inside_output_dir_and_the_staging_folder(
        tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    assert reserved_paths(out, [out / "LOGS"]) == {STAGING_DIR, "LOGS"}
    assert reserved_paths(out, [out / "a" / ".." / "b" / "logs"]) == {STAGING_DIR, "b/logs"}
    assert reserved_paths(out, [tmp_path / "logs"]) == {STAGING_DIR}  # outside: nothing
    assert reserved_paths(out, [out]) == {STAGING_DIR}
    assert reserved_paths(out, [tmp_path]) == {STAGING_DIR}
    (out / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert reserved_paths(out, [out / "link" / "LOGS"]) == {STAGING_DIR, "link/LOGS"}
    monkeypatch.chdir(tmp_path)  # relative spellings, as on a command line
    assert reserved_paths(Path("out"), [Path("out/LOGS")]) == {STAGING_DIR, "LOGS"}


def test_the_staging_folder_is_reserved_even_when_nobody_says_so(tmp_path):
    reassembler = Reassembler("memory")
    result = rebuild(reassembler, chunks_of(b"x", "y", f"{STAGING_DIR}/z"))
    assert result.status is AddStatus.REJECTED and "reserved path" in result.reason


# ------------------------------------------------------------ staging files

@pytest.mark.parametrize("mode", [Mode.DISK, Mode.BOTH])
def test_partial_files_live_in_the_locked_staging_folder_named_by_a_hash(tmp_path, mode):
    out = tmp_path / "out"
    reassembler = make(mode, out)
    chunks = chunks_of(b"0123456789", "report (final).txt", "a/b", 4)
    reassembler.add(chunks[0])
    [partial] = reassembler.staging_dir.iterdir()
    assert reassembler.staging_dir.parent == out.resolve() / STAGING_DIR
    assert tree(out) == {STAGING_DIR, f"{STAGING_DIR}/{reassembler.staging_dir.name}",
                         f"{STAGING_DIR}/{reassembler.staging_dir.name}/{partial.name}"}
    generation = hashlib.sha256("a/b/report (final).txt".encode() + b"\0"
                                + chunks[0].file_hash).hexdigest()
    assert partial.name == f"{generation[:40]}-1.partial"
    held = os.open(reassembler.staging_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):  # in use: locked
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(held)


def test_a_file_named_like_another_files_partial_cannot_touch_it(tmp_path):
    """The old layout put ``.{name}.{ids}.partial`` beside the final file, so a message
    naming that file could write into another file's partial before it was published.
    Now partial names come from hashes in a reserved folder, and a file named like the
    old partial is just a file."""
    out = tmp_path / "out"
    victim = b"the verified content"
    reassembler = Reassembler("both", out)
    v_chunks = chunks_of(victim, "v.bin", "d", 8)
    reassembler.add(v_chunks[0])
    old_style = f".v.bin.{hashlib.sha1(b'v.bin').hexdigest()[:8]}." \
                f"{v_chunks[0].file_hash.hex()[:16]}.partial"
    intruder = rebuild(reassembler, chunks_of(b"EVIL" * 6, old_style, "d", 8)).completed
    assert intruder.rel_path == f"d/{old_style}"
    [partial] = reassembler.staging_dir.iterdir()
    forged = rebuild(reassembler, chunks_of(b"EVIL", partial.name,
                                            f"{STAGING_DIR}/{partial.parent.name}"))
    assert forged.status is AddStatus.REJECTED
    done = rebuild(reassembler, v_chunks[1:]).completed
    assert bytes(done.data) == victim and (out / "d" / "v.bin").read_bytes() == victim


def test_disk_mode_uploads_the_verified_staging_file_and_release_deletes_it(tmp_path):
    out = tmp_path / "out"
    reassembler = Reassembler("disk", out)
    done = rebuild(reassembler, chunks_of(b"verified bytes", "f.bin", "sub"))
    path = done.completed.path
    assert path.parent == reassembler.staging_dir and path.read_bytes() == b"verified bytes"
    assert not (out / "sub").exists()  # nothing where another message could write
    # The same generation produced again while the first still waits for its upload is
    # rebuilt in a file of its own: the first is never reopened.
    reassembler.discard(done.file_key)
    again = rebuild(reassembler, chunks_of(b"verified bytes", "f.bin", "sub", 3)).completed
    assert again.path != path and path.read_bytes() == b"verified bytes"
    reassembler.release(done.completed)
    reassembler.release(done.completed)  # twice: harmless
    assert not path.exists() and again.path.exists()
    reassembler.release(again)
    assert list(reassembler.staging_dir.iterdir()) == []


def test_release_touches_nothing_outside_its_own_staging_folder(tmp_path):
    out = tmp_path / "out"
    first, second = Reassembler("disk", out), Reassembler("disk", out)
    done = rebuild(first, chunks_of(b"mine", "m.bin")).completed
    second.release(done)  # not second's file
    assert done.path.exists()
    both = Reassembler("both", tmp_path / "out2")
    kept = rebuild(both, chunks_of(b"local copy", "k.bin")).completed
    both.release(kept)
    assert kept.path.read_bytes() == b"local copy"  # both mode keeps it
    memory = Reassembler("memory")
    memory.release(rebuild(memory, chunks_of(b"ram", "r.bin")).completed)  # no-op


CRASHING_RUN = """
import os, sys
from girder_upload_stream.wire.codec import chunk_file
from girder_upload_stream.assembly.reassembly import Reassembler
reassembler = Reassembler("disk", sys.argv[1])
reassembler.add(next(chunk_file(b"0123456789", "", 4, filename="p.bin")))
for chunk in chunk_file(b"never uploaded", "", 4, filename="q.bin"):
    reassembler.add(chunk)
print(reassembler.staging_dir, flush=True)
os._exit(9)  # as a kill -9: no clean-up runs
"""


def test_a_new_run_deletes_the_staging_files_of_runs_that_ended_only(tmp_path):
    out = tmp_path / "out"
    live = Reassembler("disk", out)
    live.add(chunks_of(b"abcdefgh", "live.bin")[0])
    crashed = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(out)], text=True,
                             capture_output=True, timeout=60)
    assert crashed.returncode == 9, crashed.stderr
    crashed_dir = Path(crashed.stdout.strip())
    assert len(list(crashed_dir.iterdir())) == 2  # a partial and a completed file
    (out / STAGING_DIR / "not-a-run").mkdir()  # not ours: left alone
    restarted = Reassembler("disk", out)
    assert restarted.stale_removed == 1 and not crashed_dir.exists()
    assert (out / STAGING_DIR / "not-a-run").is_dir()
    assert len(list(live.staging_dir.iterdir())) == 1  # a live run's files are kept
    assert rebuild(live, chunks_of(b"abcdefgh", "live.bin")[1:]).completed.size == 8


def test_closing_a_run_deletes_its_staging_folder_with_what_is_left(tmp_path):
    out = tmp_path / "out"
    reassembler = Reassembler("disk", out)
    reassembler.add(chunks_of(b"0123456789", "partial.bin")[0])
    done = rebuild(reassembler, chunks_of(b"settled or not", "done.bin")).completed
    assert done.path.exists()
    reassembler.close()
    reassembler.close()  # idempotent
    assert not done.path.exists() and tree(out) == {STAGING_DIR}
    collected = Reassembler("disk", out)
    folder = collected.staging_dir
    rebuild(collected, chunks_of(b"abc", "a.bin"))
    del collected
    gc.collect()  # collected (or the interpreter exits): the same
    assert not folder.exists()


def test_a_run_that_ends_cleanly_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "out"
    reassembler = Reassembler("both", out)
    rebuild(reassembler, chunks_of(b"abc", "a.bin"))
    del reassembler
    gc.collect()
    assert tree(out) == {"a.bin", STAGING_DIR}


# ------------------------------------------------------------ the pipeline releases

# Calling Reassembler.release when a file is settled or handed over is the pipeline's
# (ledger/processor.py, rewritten on main around the file ledger): until it does, a disk-mode
# file stays in the staging folder until the run ends (Reassembler.close). strict: the
# marker must go when the call is in.

def _processor(tmp_path) -> StreamProcessor:
    return StreamProcessor(Reassembler("disk", tmp_path / "out"), retry_delay=0.0,
                           clock=lambda: 0.0)


def _feed(processor: StreamProcessor, data: bytes, name: str, partition: int = 0) -> None:
    for offset, chunk in enumerate(chunks_of(data, name)):
        key, value = encode_chunk(chunk)
        processor.handle(RawMessage("t", partition, 100 * len(name) + offset,
                                    key.encode(), value))


@pytest.mark.parametrize(("outcome", "kept"), [
    (Outcome.UPLOADED, False),
    (Outcome.SKIPPED_IDENTICAL, False),
    # 1.8.8 deletes it after a failed upload too
    (Outcome.FAILED_TERMINAL, False),
    (Outcome.FAILED_TRANSIENT, True),  # kept for the retry
])
def test_disk_mode_deletes_a_rebuilt_file_once_its_fate_is_settled(tmp_path, outcome, kept):
    processor = _processor(tmp_path)
    _feed(processor, b"a file of some bytes", "f.bin")
    [unit] = processor.take_units()
    [completed] = unit.files
    processor.finish_unit(unit, [FileOutcome(completed.rel_path, completed.file_key, outcome)])
    assert completed.path.exists() is kept
    if kept:  # the retry reads the same verified bytes, then they go
        [retry] = processor.take_units()
        assert retry.files[0].path.read_bytes() == b"a file of some bytes"
        processor.finish_unit(retry, [FileOutcome(completed.rel_path, completed.file_key,
                                                  Outcome.UPLOADED)])
        assert not completed.path.exists()


def test_a_file_handed_over_at_a_rebalance_leaves_no_staging_file(tmp_path):
    processor = _processor(tmp_path)
    _feed(processor, b"to the next owner", "h.bin", partition=3)
    assert processor.hand_over([("t", 3)]) == 1
    assert list(processor.reassembler.staging_dir.iterdir()) == []


# ------------------------------------------------------------ names long in bytes

CJK_74 = "\u6f22" * 74  # 222 bytes in UTF-8: failed in disk mode with the old partial names


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("subdir", "name"), [
    ("", CJK_74), ("", "a" * 255), ("\u00e9" * 127 + "z", "\u00e9" * 127 + "z"),
    ("b" * 255 + "/" + CJK_74, "c" * 251 + ".bin"),
])
def test_names_up_to_255_bytes_per_component_work_in_every_mode(tmp_path, mode, subdir, name):
    out = tmp_path / "out"
    reassembler = make(mode, out)
    data = os.urandom(40)
    done = rebuild(reassembler, chunks_of(data, name, subdir, 7)).completed
    assert done is not None, "rejected"
    rel = f"{subdir}/{name}" if subdir else name
    assert done.rel_path == rel
    if mode is Mode.BOTH:
        assert (out / rel).read_bytes() == data
    if mode is Mode.DISK:
        assert done.path.read_bytes() == data


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("subdir", "name", "what"), [
    ("", "a" * 256, "filename"), ("", "\u6f22" * 86, "filename"),
    ("ok/" + "b" * 256, "f.bin", "subdir"),
])
def test_a_component_over_255_bytes_is_rejected_alike_in_every_mode(tmp_path, mode, subdir,
                                                                    name, what):
    chunk = Chunk(name, hashlib.sha512(b"x").digest(), hashlib.sha512(b"x").digest(), 0, 1, 1,
                  subdir, "", b"x")
    result = make(mode, tmp_path / "out").add(chunk)
    assert result.status is AddStatus.REJECTED
    assert result.reason.startswith(f"unsafe path: {what} has a component of ")
    assert result.reason.endswith("no file system holds a name over 255 bytes")
    with pytest.raises(ChunkDecodeError, match="no file system holds a name over 255"):
        decode_chunk(encode_chunk(chunk)[1])


# ------------------------------------------------------------ wiring from the settings

def _rejected_in_logs(reassembler: Reassembler) -> bool:
    chunk = chunks_of(b"forged row", "processed_from_t_by_g.csv", "LOGS", 64)[0]
    return reassembler.add(chunk).status is AddStatus.REJECTED


@pytest.mark.parametrize("mode", ["memory", "disk", "both"])
def test_the_default_logs_folder_is_out_of_reach_of_message_names(tmp_path, mode):
    from girder_upload_stream.loop.wiring import build_reassembler
    from girder_upload_stream.settings import RunSettings
    run = RunSettings(mode=mode, output_dir=tmp_path / "out")
    reassembler = build_reassembler(run, run.output_dir)
    assert reassembler.max_file_bytes == 1 << 40
    assert _rejected_in_logs(reassembler)
    elsewhere = RunSettings(mode=mode, output_dir=tmp_path / "out2",
                            logger_file_path=tmp_path / "logs", max_file_bytes=1 << 20)
    reassembler = build_reassembler(elsewhere, elsewhere.output_dir)
    assert reassembler.max_file_bytes == 1 << 20
    assert not _rejected_in_logs(reassembler)  # LOGS/ is then an ordinary folder


def test_logs_in_output_dir_itself_are_refused_where_files_are_rebuilt_there(tmp_path):
    from girder_upload_stream.loop.wiring import build_reassembler
    from girder_upload_stream.errors import ConfigError
    from girder_upload_stream.settings import RunSettings
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="could overwrite the registries"):
        build_reassembler(RunSettings(mode="disk", output_dir=out, logger_file_path=out), out)
    memory = RunSettings(mode="memory", output_dir=out, logger_file_path=out)
    assert build_reassembler(memory, out).mode is Mode.MEMORY
