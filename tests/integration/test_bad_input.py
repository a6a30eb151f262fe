"""Hostile and broken input mixed into good traffic, through the real CLI.

Good files are produced before and after a batch of bad messages covering every
hostile class of the wire format (undecodable values, wrong shapes and types, bad
hashes, unsafe paths, impossible chunk placements, a symlink planted in the output
folder), plus messages without a key, keys that disagree with their values, and a
second topic holding no chunk data at all. The consumer runs in ``--mode both`` so that
files are also rebuilt on disk, where a path escape would do harm.

Checked: every good file lands once; every bad message or file is logged and listed in
the in-progress registry (``failed`` or ``mismatched_hash``, with the reason in the row's
``extra``); the program runs on to its idle stop and exits 0; the group's commits reach
the end of the topic; nothing changes outside the output folder, nor in its ``LOGS``
folder but the program's own files; and no Girder folder or item is named from hostile
input.

Poison pills (integers no real file can have, a chunk count of 2**62 sent twice, an
offset past the size limit or past what the file system allows), paths that reach the
consumer's own folders (``LOGS``, ``.gus-staging``) and names long in bytes are sent
in both mode with the rest, and again in disk mode with a small ``--max_file_size_mb``
and a file size limit (``ulimit -f``) on the consumer, so that the file system itself
refuses an offset (EFBIG) below the size limit.

Layout (so that "outside" can be checked): ``tmp/box/out`` is the output folder,
``tmp/box/outside`` a sibling with a sentinel file, and ``tmp/box`` holds nothing else.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest


from girder_upload_stream.wire.codec import (DEFAULT_MAX_FILE_BYTES, Chunk, chunk_file, encode_chunk,
                                        make_key)
from tests.integration.girder_checks import (assert_exactly_once, girder_listing, root_folder_or_none)
from tests.integration.kafka_checks import committed_offsets, end_offsets, produce_raw
from tests.integration.local_files import in_progress_rows, log_uniform_files, tree_snapshot
from tests.integration.programs import (Program, consumer_argv, consumer_env, stop_line, write_fault_config)
from tests.integration.girder_checks import default_root_path

pytestmark = pytest.mark.integration

CHUNK_SIZE = 65_536
MAX_IDLE = 8
RUN_TIMEOUT = 150.0
BAD_STATUSES = {"failed", "mismatched_hash"}
#: Chunks placed wrongly (an overlap, a hole, other bytes for a number) no longer reject
#: their file (issue 20: only the whole-file sha512 decides): they are competing copies
#: of a file that never completes, registered as failed once stale, which must happen
#: before the idle stop for the commits to reach the end.
STALE_SECONDS = 3


def _sha512(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()


def _chunk(data: bytes, name: str, subdir: str = "", i: int = 1, n: int = 1,
           offset: int = 0, file_data: bytes | None = None, append: str = "") -> Chunk:
    """A chunk with a correct chunk hash and any placement (bypasses chunk_file)."""
    return Chunk(name, _sha512(file_data if file_data is not None else data), _sha512(data),
                 offset, i, n, subdir, append, data, 0.0)


def _fields(chunk: Chunk) -> list:
    return [chunk.filename, chunk.file_hash, chunk.chunk_hash, chunk.chunk_offset,
            chunk.chunk_i, chunk.n_total_chunks, chunk.subdir, chunk.filename_append,
            chunk.data, chunk.file_mtime]


def _pack(fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _tampered(index: int, value) -> tuple[str, bytes]:
    base = _chunk(b"some bytes", "tampered.bin")
    fields = _fields(base)
    fields[index] = value
    return base.key, _pack(fields)


@dataclass
class Bad:
    """One hostile case: ``messages`` go to ``partition`` in order. ``rel`` names the file
    whose registry rows must say why (a whole-file rejection, a file stale with competing
    chunks, or messages refused on their own, named after the file); None: each message
    is rejected on its own and found by its offset."""

    label: str
    messages: list[tuple[bytes | str | None, bytes | None]]
    partition: int
    rel: str | None = None
    status: str | None = None  # a required status, when the class has its own
    where: list[tuple[int, int]] | None = None
    reason: str | None = None  # a fragment the registered reason must contain


def hostile_cases(outside: Path) -> list[Bad]:
    cases: list[tuple[str, list]] = []
    valid = _chunk(b"valid bytes", "v.bin")
    key, value = encode_chunk(valid)

    def message(label: str, k, v) -> None:
        cases.append((label, [(k, v)]))

    def unsafe(label: str, name: str, subdir: str, append: str = "") -> None:
        chunk = _chunk(b"evil bytes", name, subdir, append=append)
        message(label, make_key(subdir, name, 1, 1), encode_chunk(chunk)[1])

    message("not msgpack", "_junk.bin_chunk_1_of_1", b"\xc1\xc1 this is not msgpack \xff")
    message("truncated msgpack", key, value[:-5])
    message("msgpack map, not an array", key, _pack({"filename": "v.bin", "data": b"x"}))
    message("8 fields", key, _pack(_fields(valid)[:8]))
    message("11 fields", key, _pack(_fields(valid) + ["extra"]))
    message("chunk_i is a string", *_tampered(4, "1"))
    message("filename is not UTF-8", *_tampered(0, b"caf\xe9.bin"))
    message("file_hash is not 64 bytes", *_tampered(1, b"short"))
    message("chunk hash mismatch", *_tampered(8, b"other bytes"))
    message("empty chunk data", *_tampered(8, b""))
    message("mtime is not a number", *_tampered(9, "yesterday"))
    chunk = _chunk(b"zero", "zero.bin", n=0)
    message("n_total_chunks 0", chunk.key, encode_chunk(chunk)[1])
    chunk = _chunk(b"three", "range.bin", i=3, n=2, offset=8)
    message("chunk_i beyond n_total_chunks", chunk.key, encode_chunk(chunk)[1])
    chunk = _chunk(b"neg", "neg.bin", i=2, n=2, offset=-4)
    message("negative chunk_offset", chunk.key, encode_chunk(chunk)[1])
    unsafe("subdir ../outside", "evil.txt", "../outside")
    unsafe("absolute subdir (the real outside folder)", "evil.txt", str(outside))
    unsafe("absolute subdir /etc", "passwd", "/etc")
    unsafe("subdir climbing with ..", "evil.txt", "a/../../outside")
    unsafe("filename ..", "..", "")
    unsafe("filename with /", "../evil.txt", "")
    unsafe("backslashes", "evil.txt", "a\\..\\..\\outside")
    unsafe("NUL in filename", "evil\x00.txt", "")
    unsafe("empty filename", "", "d")
    unsafe("empty subdir component", "evil.txt", "a//b")
    unsafe("subdir .", "evil.txt", ".")
    unsafe("filename_append with /", "evil.txt", "", append="/../../x")
    # Valid chunks of complete files, with a missing or wrong key.
    message("no key", None, encode_chunk(_chunk(b"lost", "lost.bin", "nokey"))[1])
    message("key names another file", "_other.bin_chunk_1_of_1",
            encode_chunk(_chunk(b"liar", "liar.bin", "liar"))[1])
    message("key names another chunk", "liar_liar2.bin_chunk_2_of_1",
            encode_chunk(_chunk(b"liar2", "liar2.bin", "liar"))[1])
    message("key is not UTF-8", b"\xff\xfe\xfd",
            encode_chunk(_chunk(b"badkey", "badkey.bin", "badkey"))[1])
    message("tombstone (no value)", "_tomb.bin_chunk_1_of_1", None)
    bad = [Bad(label, msgs, index % 4) for index, (label, msgs) in enumerate(cases)]

    def whole_file(label: str, rel: str, chunks: list[Chunk], status: str | None = None):
        bad.append(Bad(label, [encode_chunk(c) for c in chunks], len(bad) % 4, rel, status))

    content = b"abcdefghijkl"  # one 3-chunk file of 12 bytes, chunks placed wrongly
    whole_file("mismatched file hash", "bad/mismatch.bin",
               [_chunk(b"abcdef", "mismatch.bin", "bad", 1, 2, 0, b"something else"),
                _chunk(b"ghijkl", "mismatch.bin", "bad", 2, 2, 6, b"something else")],
               "mismatched_hash")
    whole_file("overlapping chunks", "bad/overlap.bin",
               [_chunk(b"abcd", "overlap.bin", "bad", 1, 3, 0, content),
                _chunk(b"cdef", "overlap.bin", "bad", 2, 3, 2, content)])
    whole_file("chunk past the end", "bad/pastend.bin",
               [_chunk(b"ijkl", "pastend.bin", "bad", 3, 3, 8, content),
                _chunk(b"efgh", "pastend.bin", "bad", 2, 3, 9, content)])
    whole_file("hole between chunks", "bad/hole.bin",
               [_chunk(b"abcd", "hole.bin", "bad", 1, 3, 0, content),
                _chunk(b"ghij", "hole.bin", "bad", 2, 3, 6, content)])
    whole_file("one chunk twice with different data", "bad/twice.bin",
               [_chunk(b"abcd", "twice.bin", "bad", 1, 3, 0, content),
                _chunk(b"efgh", "twice.bin", "bad", 2, 3, 4, content),
                _chunk(b"fghi", "twice.bin", "bad", 2, 3, 5, content)])
    whole_file("n_total_chunks changed", "bad/ntotal.bin",
               [_chunk(b"abcd", "ntotal.bin", "bad", 1, 2, 0, b"abcdefgh"),
                _chunk(b"ef", "ntotal.bin", "bad", 2, 3, 4, b"abcdefgh")])
    whole_file("through a symlink in output_dir", "escape/evil.txt",
               [_chunk(b"through the link", "evil.txt", "escape")])
    whole_file("below a symlink in output_dir", "escape/deeper/evil.txt",
               [_chunk(b"below the link", "evil.txt", "escape/deeper")])
    bad += poison_pills(len(bad))
    return bad


CJK_74 = "\u6f22" * 74  # 222 bytes in UTF-8


def long_named_files(seed: int) -> dict[str, bytes]:
    """Good files whose names are long in bytes: up to 255 per component must work."""
    rng = random.Random(seed)
    return {CJK_74: rng.randbytes(3000), f"long/{CJK_74}": rng.randbytes(200),
            f"{'d' * 255}/{'n' * 251}.bin": rng.randbytes(70_000),
            "LOGS2/not reserved.txt": b"a folder named like LOGS, but not LOGS"}


def poison_pills(first_partition: int, limit: int = DEFAULT_MAX_FILE_BYTES) -> list[Bad]:
    """Chunks no file under ``limit`` bytes can have, paths reaching the consumer's own
    folders, and names over 255 bytes. Each case is one message (rejected by the codec)
    or one file (``rel``: rejected by the reassembler, its later chunks ignored)."""
    cases: list[Bad] = []

    def message(label: str, chunk: Chunk, reason: str) -> None:
        cases.append(Bad(label, [encode_chunk(chunk)], (first_partition + len(cases)) % 4,
                         reason=reason))

    def whole_file(label: str, chunks: list[Chunk], reason: str) -> None:
        cases.append(Bad(label, [encode_chunk(c) for c in chunks],
                         (first_partition + len(cases)) % 4, chunks[0].rel_path, reason=reason))

    message("n_total_chunks 2**63", _chunk(b"pill", "p1.bin", "pills", 1, 2**63), "more chunks")
    message("n_total_chunks 2**64-1", _chunk(b"pill", "p2.bin", "pills", 1, 2**64 - 1),
            "more chunks")
    message("n_total_chunks 2**63-1", _chunk(b"pill", "p3.bin", "pills", 1, 2**63 - 1),
            "more than any file can hold")
    message("chunk_offset 2**63-1", _chunk(b"pill", "p4.bin", "pills", 2, 2, 2**63 - 1),
            "more than any file can hold")
    message("chunk_offset 2**64-1", _chunk(b"pill", "p5.bin", "pills", 2, 2, 2**64 - 1),
            "more than any file can hold")
    message("chunk_offset below its chunk number", _chunk(b"pill", "p6.bin", "pills", 9, 9, 3),
            "is invalid for chunk 9")
    message("file name of 256 bytes", _chunk(b"long", "n" * 256, "names"),
            "no file system holds a name over 255 bytes")
    message("sub-folder of 300 bytes", _chunk(b"long", "f.bin", "names/" + "\u00e9" * 150),
            "no file system holds a name over 255 bytes")
    whole_file("2**62 chunks sent twice", [
        _chunk(b"pill", "count.bin", "pills", 1, 2**62, file_data=b"huge"),
        _chunk(b"pill", "count.bin", "pills", 1, 2**62, file_data=b"huge"),
        _chunk(b"more", "count.bin", "pills", 2, 2**62, 4, file_data=b"huge")],
        f"{2**62} chunks exceed the {limit}-byte limit")
    whole_file("offset just past the size limit", [
        _chunk(b"12345678", "over.bin", "pills", 2, 2, limit - 7, file_data=b"over"),
        _chunk(b"head", "over.bin", "pills", 1, 2, 0, file_data=b"over")],
        f"over the {limit}-byte limit")
    whole_file("sub-folder LOGS (a forged registry row)", [
        _chunk(b"filename;rel_filepath;n_chunks\n", "processed_from_x_by_y.csv", "LOGS")],
        "reserved path: 'LOGS/processed_from_x_by_y.csv' reaches 'LOGS'")
    whole_file("a file named LOGS", [_chunk(b"in the way", "LOGS")],
               "reserved path: 'LOGS' reaches 'LOGS'")
    whole_file("into the staging folder", [
        _chunk(b"staged", "0" * 40 + "-1.partial", ".gus-staging/run-0123456789abcdef")],
        "reaches '.gus-staging'")
    return cases


def good_messages(files: dict[str, bytes]) -> list[tuple[str, bytes, None]]:
    messages = []
    for rel, data in files.items():
        subdir, _, name = rel.rpartition("/")
        for chunk in chunk_file(data, subdir, CHUNK_SIZE, filename=name):
            key, value = encode_chunk(chunk)
            messages.append((key, value, None))
    return messages


NON_CHUNK_MESSAGES: list[tuple[bytes | str | None, bytes | None]] = [
    (None, b"hello, plain text without a key"),
    ("greeting", b"hello, plain text"),
    ("json", b'{"filename": "a.txt", "subdir": "../x", "data": "aGVsbG8="}'),
    ("json-array", b'["a.txt", "x", 1, 2]'),
    ("csv", b"filename,size\na.txt,3\n"),
    ("empty", b""),
    ("tombstone", None),
    ("msgpack int", msgpack.packb(42)),
    ("msgpack list of 10 ints", msgpack.packb(list(range(10)))),
    ("utf-16", "héllo wörld".encode("utf-16")),
]



OWN_LOG_FILES = ("GirderUploadStreamProcessor.log", "consuming_from_", "processed_from_")


def _foreign_in_logs(logs: Path) -> list[str]:
    """What the LOGS folder holds that is not one of the program's own files."""
    return sorted(rel for rel, (kind, *_) in tree_snapshot(logs).items()
                  if kind != "file" or not rel.startswith(OWN_LOG_FILES))


def _problems_logged(text: str, topic: str, where: list[tuple[int, int]],
                     rel: str | None) -> list[str]:
    """What is missing from the log: a WARNING/ERROR line naming each message (by topic,
    partition and offset), or for a whole-file rejection, naming the file."""
    lines = [line for line in text.splitlines() if " ERROR " in line or " WARNING " in line]
    if rel is not None:
        return [] if any(repr(rel) in line or rel in line for line in lines) else [rel]
    missing = []
    for partition, offset in where:
        pattern = re.compile(rf"topic={re.escape(repr(topic))}, partition={partition}, "
                             rf"offset={offset}\b")
        if not any(pattern.search(line) for line in lines):
            missing.append(f"{partition}@{offset}")
    return missing


def _registry_problems(rows: list, where: list[tuple[int, int]], rel: str | None,
                       status: str | None, fragment: str | None = None) -> list[str]:
    """Why the in-progress registry does not list this case with a reason (containing
    ``fragment``, when given)."""
    def ok(row) -> bool:
        reason = (row.extra or {}).get("reason")
        return (row.status in BAD_STATUSES and (status is None or row.status == status)
                and isinstance(reason, str) and bool(reason.strip())
                and (fragment is None or fragment in reason))

    if rel is not None:
        found = [r for r in rows if str(r.rel_filepath) == rel]
        if not any(ok(r) for r in found):
            return [f"{rel}: rows {[(r.status, dict(r.extra)) for r in found]}"]
        return []
    problems = []
    for partition, offset in where:
        found = [r for r in rows
                 if ((r.extra or {}).get("partition"), (r.extra or {}).get("offset"))
                 == (partition, offset) or r.generation == f"offset-{partition}-{offset}"]
        if not any(ok(r) for r in found):
            problems.append(f"{partition}@{offset}: rows "
                            f"{[(r.status, dict(r.extra)) for r in found]}")
    return problems


def _run(argv: list[str], name: str, tmp_path: Path, env: dict, programs: list,
         log_file: tuple[Path, ...]) -> tuple[Program, str]:
    program = Program(argv, tmp_path / name, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    programs.append(program)
    code = program.wait(RUN_TIMEOUT)
    assert code == 0, f"the consumer did not run on to a clean exit\n{program.describe(log_file)}"
    summary = stop_line(program.output())
    assert summary["reason"].startswith(f"no new message for {MAX_IDLE}s"), summary
    assert "Traceback" not in program.output(), program.describe(log_file)
    return program, program.output() + "".join(p.read_text(errors="replace")
                                               for p in log_file if p.is_file())


@pytest.mark.timeout(420)
def test_hostile_messages_mixed_into_good_traffic_are_logged_registered_and_contained(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    bootstrap, api_url = stack_env["KAFKA_BOOTSTRAP_SERVERS"], stack_env["GIRDER_API_URL"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    box = tmp_path / "box"
    out, outside = box / "out", box / "outside"
    (out / "LOGS").mkdir(parents=True)
    outside.mkdir()
    (outside / "sentinel.txt").write_bytes(b"must not change")
    (outside / "evil.txt").write_bytes(b"original content")
    (out / "escape").symlink_to(Path("..") / "outside", target_is_directory=True)
    before = tree_snapshot(box, skip=out)

    good = log_uniform_files(24, 44, 1024, 300 << 10,
                             folders=("", "good", "good/nested/deeper", "données été"))
    good |= long_named_files(44)
    bad = hostile_cases(outside)
    stream = good_messages(good)
    half = len(stream) // 2
    flat_bad = [(k, v, case.partition) for case in bad for k, v in case.messages]
    where = produce_raw(bootstrap, topic, stream[:half] + flat_bad + stream[half:])
    bad_where = where[half:half + len(flat_bad)]
    for case in bad:
        case.where, bad_where = bad_where[:len(case.messages)], bad_where[len(case.messages):]

    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    config = write_fault_config(tmp_path / "consumer.config")
    env = consumer_env(stack_env, prefect_env)
    _, text = _run(consumer_argv(api_url, topic, collection["name"], out, group, config,
                                 MAX_IDLE, "--mode", "both",
                                 "--stale_partial_seconds", str(STALE_SECONDS)),
                   "bad.out", tmp_path, env, programs, log_file)

    rows = in_progress_rows(out / "LOGS", topic, group)
    not_logged = {case.label: m for case in bad
                  if (m := _problems_logged(text, topic, case.where, case.rel))}
    not_registered = {case.label: p for case in bad
                      if (p := _registry_problems(rows, case.where, case.rel, case.status,
                                                  case.reason))}
    committed, end = committed_offsets(kafka_admin, group, topic), end_offsets(bootstrap, topic)

    # A second topic holding no chunk data at all, consumed into the same output folder.
    topic2, group2 = make_topic(partitions=4), make_group()
    where2 = produce_raw(bootstrap, topic2, [(k, v, None) for k, v in NON_CHUNK_MESSAGES])
    _, text2 = _run(consumer_argv(api_url, topic2, collection["name"], out, group2, config,
                                  MAX_IDLE, "--mode", "both"),
                    "non-chunk.out", tmp_path, env, programs, log_file)
    rows2 = in_progress_rows(out / "LOGS", topic2, group2)
    for (key, _), spot in zip(NON_CHUNK_MESSAGES, where2):
        label = f"non-chunk message {key!r}"
        if missing := _problems_logged(text2, topic2, [spot], None):
            not_logged[label] = missing
        if problems := _registry_problems(rows2, [spot], None, None):
            not_registered[label] = problems

    # Every check runs, and the test reports all that failed at once.
    failures: dict[str, object] = {}
    if not_logged:
        failures["bad input not logged"] = not_logged
    if not_registered:
        failures["bad input not in the in-progress registry with a reason"] = not_registered
    if committed != end:
        failures["commits did not reach the end of the topic"] = (committed, end)
    if foreign := _foreign_in_logs(out / "LOGS"):
        failures["files in LOGS that the program did not write"] = foreign

    # Girder: the good files exactly once; nothing else anywhere in the collection.
    root_path = default_root_path(collection["name"], topic)
    root = root_folder_or_none(girder_client, root_path)
    assert root is not None, f"{root_path} was never created"
    try:
        assert_exactly_once(girder_client, root["_id"], good, topic, root_path=root_path)
    except AssertionError as exc:
        failures["good files in Girder"] = str(exc)
    listing = girder_listing(girder_client, collection["_id"], "collection")
    # The default root path '{collection}/{topic}': a first folder named like the
    # collection, the topics' folders below it.
    first = collection["name"]
    below = f"{first}/{topic}/"
    allowed_folders = {first, f"{first}/{topic}", f"{first}/{topic2}"} | {
        below + "/".join(rel.split("/")[:i]) for rel in good for i in range(1, rel.count("/") + 1)}
    stray_folders = sorted(rel for rel, _ in listing.folders if rel not in allowed_folders)
    stray_items = sorted(rel for rel, _ in listing.items
                         if not (rel.startswith(below) and rel[len(below):] in good))
    if stray_folders or stray_items:
        failures["Girder folders or items named from hostile input"] = {
            "folders": stray_folders, "items": stray_items}

    # The disk: nothing outside the output folder changed; inside it only the good files
    # (mode both rebuilds them there), the registries and our own symlink.
    after = tree_snapshot(box, skip=out)
    changed = sorted(set(before.items()) ^ set(after.items()))
    if changed:
        failures["changed outside the output folder"] = changed
    if not ((out / "escape").is_symlink()
            and Path(os.readlink(out / "escape")) == Path("..") / "outside"):
        failures["the planted symlink was replaced"] = str(out / "escape")
    inside = {rel for rel, (kind, *_) in tree_snapshot(out).items()
              if kind != "dir" and not rel.startswith("LOGS/")}
    # ... and no staging file left: each one completed (and was published) or was dropped
    if inside - set(good) - {"escape"}:
        failures["unexpected files below the output folder"] = sorted(
            inside - set(good) - {"escape"})
    wrong = sorted(rel for rel, data in good.items()
                   if not (out / rel).is_file() or (out / rel).read_bytes() != data)
    if wrong:
        failures["good files not rebuilt on disk"] = wrong

    print(f"[bad input] {len(good)} good files, {len(bad)} hostile cases "
          f"({len(flat_bad)} messages), {len(NON_CHUNK_MESSAGES)} non-chunk messages; "
          f"registry rows: {len(rows)} + {len(rows2)}; failures: {sorted(failures)}",
          flush=True)
    assert not failures, "\n".join(f"{what}: {detail}" for what, detail in failures.items())


DISK_LIMIT_MB = 200
FSIZE_LIMIT_KIB = 64 << 10  # ulimit -f: 64 MiB, below the size limit


@pytest.mark.timeout(300)
def test_poison_pills_in_disk_mode_are_rejected_commits_reach_the_end_and_nothing_stays(
        tmp_path, stack_env, prefect_env, make_topic, make_group, make_collection,
        girder_client, kafka_admin, programs):
    """Disk mode, ``--max_file_size_mb 200`` and ``ulimit -f`` 64 MiB: a chunk within the
    size limit but past what the file system lets this process write (EFBIG) rejects its
    file like any pill; good files land in Girder and are deleted from disk once there
    (as OpenMSIStream 1.8.8 does), and no staging file is left."""
    bootstrap, api_url = stack_env["KAFKA_BOOTSTRAP_SERVERS"], stack_env["GIRDER_API_URL"]
    topic, group, collection = make_topic(partitions=4), make_group(), make_collection()
    box = tmp_path / "box"
    out, outside = box / "out", box / "outside"
    (out / "LOGS").mkdir(parents=True)
    outside.mkdir()
    (outside / "sentinel.txt").write_bytes(b"must not change")
    before = tree_snapshot(box, skip=out)

    limit = DISK_LIMIT_MB << 20
    good = log_uniform_files(12, 45, 1024, 400 << 10, folders=("", "good", "good/deeper"))
    good |= long_named_files(45)
    bad = poison_pills(0, limit)
    big = 100 << 20  # under the size limit, over ulimit -f
    efbig = [_chunk(b"past ulimit -f", "efbig.bin", "pills", 2, 3, big, file_data=b"efbig"),
             _chunk(b"head", "efbig.bin", "pills", 1, 3, 0, file_data=b"efbig")]
    bad.append(Bad("an offset the file system refuses (EFBIG)",
                   [encode_chunk(c) for c in efbig], 1, "pills/efbig.bin",
                   reason="cannot write below output_dir: File too large"))
    stream = good_messages(good)
    half = len(stream) // 2
    flat_bad = [(k, v, case.partition) for case in bad for k, v in case.messages]
    where = produce_raw(bootstrap, topic, stream[:half] + flat_bad + stream[half:])
    bad_where = where[half:half + len(flat_bad)]
    for case in bad:
        case.where, bad_where = bad_where[:len(case.messages)], bad_where[len(case.messages):]

    log_file = (out / "LOGS" / "GirderUploadStreamProcessor.log",)
    argv = consumer_argv(api_url, topic, collection["name"], out, group,
                         write_fault_config(tmp_path / "consumer.config"), MAX_IDLE,
                         "--mode", "disk", "--max_file_size_mb", str(DISK_LIMIT_MB),
                         "--stale_partial_seconds", str(STALE_SECONDS))
    limited = ["bash", "-c", f'ulimit -f {FSIZE_LIMIT_KIB} && exec "$@"', "ulimit", *argv]
    _, text = _run(limited, "disk.out", tmp_path, consumer_env(stack_env, prefect_env),
                   programs, log_file)

    rows = in_progress_rows(out / "LOGS", topic, group)
    failures: dict[str, object] = {}
    if not_logged := {case.label: m for case in bad
                      if (m := _problems_logged(text, topic, case.where, case.rel))}:
        failures["bad input not logged"] = not_logged
    if not_registered := {case.label: p for case in bad
                          if (p := _registry_problems(rows, case.where, case.rel, None,
                                                      case.reason))}:
        failures["bad input not registered with its reason"] = not_registered
    committed, end = committed_offsets(kafka_admin, group, topic), end_offsets(bootstrap, topic)
    if committed != end:
        failures["commits did not reach the end of the topic"] = (committed, end)
    root_path = default_root_path(collection["name"], topic)
    root = root_folder_or_none(girder_client, root_path)
    try:
        assert root is not None, f"{root_path} was never created"
        assert_exactly_once(girder_client, root["_id"], good, topic, root_path=root_path)
    except AssertionError as exc:
        failures["good files in Girder"] = str(exc)
    if changed := sorted(set(before.items()) ^ set(tree_snapshot(box, skip=out).items())):
        failures["changed outside the output folder"] = changed
    if foreign := _foreign_in_logs(out / "LOGS"):
        failures["files in LOGS that the program did not write"] = foreign
    left = sorted(rel for rel, (kind, *_) in tree_snapshot(out).items()
                  if kind != "dir" and not rel.startswith("LOGS/"))
    if left:  # uploaded files are deleted; rejected ones and the run's folder too
        failures["files left below the output folder"] = left
    print(f"[bad input, disk] {len(good)} good files, {len(bad)} hostile cases "
          f"({len(flat_bad)} messages); committed {sum(committed.values())} of "
          f"{sum(end.values())}; registry rows: {len(rows)}; failures: {sorted(failures)}",
          flush=True)
    assert not failures, "\n".join(f"{what}: {detail}" for what, detail in failures.items())
