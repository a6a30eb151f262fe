"""The OpenMSIStream 1.8.x file-chunk wire format: encode, decode, validate, chunk files.

One Kafka message carries one chunk of one file. Its value is a msgpack array of 10
elements (9 from producers older than 1.8)::

    [filename, file_hash, chunk_hash, chunk_offset, chunk_i, n_total_chunks,
     subdir, filename_append, data, file_mtime]

and its key is ``"{subdir with '/' -> '_'}_{filename}_chunk_{i}_of_{n}"``. Note that
OpenMSIStream 1.8.8 always puts the ``_`` separator in the key, so a file at the root
has a key starting with ``_`` (``"_hello.txt_chunk_1_of_3"``); :func:`decode_chunk` also
accepts the documented form without it.

Decoding is defensive: anything that is not a well-formed, hash-verified chunk with a
safe relative path raises :class:`~girder_upload_stream.errors.ChunkDecodeError`, and
nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import msgpack

from girder_upload_stream.errors import ChunkDecodeError, FileRejectedError, SourceFileChangedError
from girder_upload_stream.text_bounds import bounded

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_FILE_BYTES",
    "MAX_POSSIBLE_FILE_BYTES",
    "MAX_NAME_BYTES",
    "SHA512_DIGEST_SIZE",
    "Chunk",
    "FileKey",
    "encode_chunk",
    "decode_chunk",
    "chunk_file",
    "make_key",
    "reconstructed_name",
    "path_problem",
    "file_identity",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 524_288
SHA512_DIGEST_SIZE = 64

#: No file can be larger: a file offset is a signed 64-bit integer (``off_t``), and
#: ``os.pwrite`` past it raises OverflowError. A chunk that cannot fit is refused here.
MAX_POSSIBLE_FILE_BYTES = 2**63 - 1

#: Default of ``--max_file_size_mb`` (1 TiB): the largest file the consumer rebuilds.
#: See docs/configuration.md for why this value.
DEFAULT_MAX_FILE_BYTES = 1 << 40

#: Longest path component, in UTF-8 bytes, that a file system holds (ext4, XFS, btrfs,
#: tmpfs, APFS, NTFS all stop at 255).
MAX_NAME_BYTES = 255

FileKey = tuple[str, bytes]
"""Identity of one generation of one file: ``(rel_path, file_hash)``."""


def reconstructed_name(filename: str, filename_append: str) -> str:
    """Return the file name OpenMSIStream reconstructs: append inserted before the suffix.

    ``("scan.tar.gz", "_v2") -> "scan.tar_v2.gz"``; ``(".bashrc", "_x") -> ".bashrc_x"``
    (pathlib's stem/suffix rules, as OpenMSIStream uses).
    """
    if not filename_append:
        return filename
    pure = PurePosixPath(filename)
    return f"{pure.stem}{filename_append}{pure.suffix}"


def make_key(subdir: str, filename: str, chunk_i: int, n_total_chunks: int) -> str:
    """Return the message key OpenMSIStream 1.8.8 gives a chunk (leading ``_`` at the root)."""
    return f"{subdir.replace('/', '_')}_{filename}_chunk_{chunk_i}_of_{n_total_chunks}"


def _component_problem(part: str, what: str) -> str | None:
    if part in ("", ".", ".."):
        return f"{what} has an empty, '.' or '..' component"
    if "\\" in part:
        return f"{what} contains a backslash"
    if "\x00" in part:
        return f"{what} contains a NUL character"
    try:
        size = len(part.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: only from a Chunk built in code
        return f"{what} contains a character that UTF-8 cannot encode"
    if size > MAX_NAME_BYTES:
        return (f"{what} has a component of {size} bytes in UTF-8; no file system holds "
                f"a name over {MAX_NAME_BYTES} bytes")
    return None


def path_problem(filename: str, subdir: str, filename_append: str = "") -> str | None:
    """Say why ``subdir/filename`` (+ append) is not a safe relative path, or return None.

    Safe means: a non-empty file name without ``/``; a subdir that is ``""`` or a relative
    POSIX path; no ``.``/``..``/empty component, backslash or NUL anywhere; no component
    (the reconstructed file name included) over 255 bytes in UTF-8. The same rule holds
    in every mode, so that a name works in memory mode exactly when it works on disk.
    """
    if "/" in filename:
        return "filename contains '/'"
    problem = _component_problem(filename, "filename")
    if problem:
        return problem
    if filename_append and ("/" in filename_append or "\\" in filename_append
                            or "\x00" in filename_append):
        return "filename_append contains '/', a backslash or NUL"
    if subdir.startswith("/"):
        return "subdir is an absolute path"
    if subdir:
        for part in subdir.split("/"):
            problem = _component_problem(part, "subdir")
            if problem:
                return problem
    return _component_problem(reconstructed_name(filename, filename_append), "file name")


@dataclass(frozen=True, slots=True)
class Chunk:
    """One decoded (or to-be-encoded) chunk of one file, with OpenMSIStream's fields.

    ``file_mtime`` is the producer-side modification time (epoch seconds), ``0.0`` if
    unknown. ``data`` may be a memoryview (zero-copy slices of an in-memory file).
    """

    filename: str
    file_hash: bytes
    chunk_hash: bytes
    chunk_offset: int
    chunk_i: int
    n_total_chunks: int
    subdir: str = ""
    filename_append: str = ""
    data: bytes | memoryview = field(default=b"", repr=False)
    file_mtime: float = 0.0

    @property
    def size(self) -> int:
        """Number of data bytes in this chunk."""
        data = self.data
        return data.nbytes if isinstance(data, memoryview) else len(data)

    @property
    def rel_path(self) -> str:
        """POSIX path of the reconstructed file, relative to the output root."""
        name = reconstructed_name(self.filename, self.filename_append)
        return f"{self.subdir}/{name}" if self.subdir else name

    @property
    def file_key(self) -> FileKey:
        """``(rel_path, file_hash)``: the identity of this chunk's file generation."""
        return (self.rel_path, self.file_hash)

    @property
    def key(self) -> str:
        """The Kafka message key OpenMSIStream uses for this chunk."""
        return make_key(self.subdir, self.filename, self.chunk_i, self.n_total_chunks)


def encode_chunk(chunk: Chunk) -> tuple[str, bytes]:
    """Serialize a chunk exactly as OpenMSIStream 1.8.x does: ``(key, msgpack value)``.

    The value is a 10-element array packed with ``use_bin_type=True`` (names as msgpack
    str, hashes and data as bin, mtime as float64).
    """
    value = msgpack.packb(
        [
            chunk.filename,
            chunk.file_hash,
            chunk.chunk_hash,
            chunk.chunk_offset,
            chunk.chunk_i,
            chunk.n_total_chunks,
            chunk.subdir,
            chunk.filename_append,
            chunk.data,
            float(chunk.file_mtime),
        ],
        use_bin_type=True,
    )
    return chunk.key, value


def _text(raw: Any, what: str, ctx: dict[str, Any]) -> str:
    if not isinstance(raw, bytes):
        raise ChunkDecodeError(f"{what} is {type(raw).__name__}, expected a string", **ctx)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ChunkDecodeError(f"{what} is not valid UTF-8", **ctx) from None


def _integer(raw: Any, what: str, ctx: dict[str, Any]) -> int:
    if type(raw) is not int:
        raise ChunkDecodeError(f"{what} is {type(raw).__name__}, expected an integer", **ctx)
    return raw


def _digest(raw: Any, what: str, ctx: dict[str, Any]) -> bytes:
    if not isinstance(raw, bytes) or len(raw) != SHA512_DIGEST_SIZE:
        raise ChunkDecodeError(f"{what} is not a 64-byte sha512 digest", **ctx)
    return raw


def _mtime(fields: Any, ctx: dict[str, Any]) -> float:
    if len(fields) == 9:
        return 0.0
    raw = fields[9]
    if type(raw) not in (float, int) or not math.isfinite(raw):
        raise ChunkDecodeError("file_mtime is not a finite number", **ctx)
    return float(raw)


def _check_placement(offset: int, i: int, n_total: int, size: int,
                     ctx: dict[str, Any]) -> None:
    """Refuse integers no file can have. Each chunk holds at least one byte, so chunk
    ``i`` starts at byte ``i - 1`` or later, and the file has at least
    ``offset + size + (n_total - i)`` bytes, which must fit in a file offset."""
    if n_total < 1:
        raise ChunkDecodeError(f"n_total_chunks is {n_total}, must be >= 1", **ctx)
    if n_total > MAX_POSSIBLE_FILE_BYTES:
        raise ChunkDecodeError(f"n_total_chunks {n_total} is more chunks than any file "
                               f"can have (at most 2**63-1 bytes, one or more per chunk)",
                               **ctx)
    if not 1 <= i <= n_total:
        raise ChunkDecodeError(f"chunk_i {i} is outside 1..{n_total}", **ctx)
    if offset < i - 1 or (i == 1 and offset != 0):
        raise ChunkDecodeError(f"chunk_offset {offset} is invalid for chunk {i} (the "
                               f"chunks before it hold at least one byte each)", **ctx)
    least = offset + size + (n_total - i)
    if least > MAX_POSSIBLE_FILE_BYTES:
        raise ChunkDecodeError(f"chunk {i} of {n_total} at offset {offset} needs a file of "
                               f"at least {least} bytes, more than any file can hold "
                               f"(2**63-1)", **ctx)


def _unpack(value: Any, ctx: dict[str, Any]) -> Any:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ChunkDecodeError(f"message value is {type(value).__name__}, not bytes", **ctx)
    try:
        fields = msgpack.unpackb(value, raw=True, use_list=False)
    except Exception as exc:  # msgpack raises many types for garbage input
        # msgpack's FormatError has no text: say what it means.
        why = str(exc) or ("a byte no msgpack value begins with"
                           if isinstance(exc, msgpack.FormatError) else type(exc).__name__)
        raise ChunkDecodeError(f"message value is not msgpack ({why})", **ctx) from None
    if not isinstance(fields, tuple):
        raise ChunkDecodeError(f"message value is a msgpack {type(fields).__name__}, "
                               "not an array", **ctx)
    if len(fields) not in (9, 10):
        raise ChunkDecodeError(f"expected 9 or 10 fields, found {len(fields)}", **ctx)
    return fields


def _check_key(key: str | bytes, chunk: Chunk, ctx: dict[str, Any]) -> None:
    if isinstance(key, (bytes, bytearray, memoryview)):
        try:
            key = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise ChunkDecodeError("message key is not valid UTF-8", **ctx) from None
    if not isinstance(key, str):
        raise ChunkDecodeError(f"message key is {type(key).__name__}", **ctx)
    expected = chunk.key
    if key == expected or (not chunk.subdir and key == expected[1:]):
        return
    raise ChunkDecodeError(f"message key '{bounded(key)}' disagrees with its value "
                           f"(expected '{bounded(expected)}')", **ctx)


def decode_chunk(
    value: bytes | bytearray | memoryview,
    key: str | bytes | None = None,
    *,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    check_hash: bool = True,
) -> Chunk:
    """Decode and fully validate one chunk message; raise only :class:`ChunkDecodeError`.

    Checks: msgpack array of 9/10 fields, field types, UTF-8 names, 64-byte digests,
    non-empty data, safe relative path, ``1 <= chunk_i <= n_total_chunks``,
    ``chunk_offset >= chunk_i - 1`` (and ``== 0`` for chunk 1), integers that fit a file
    (see :func:`_check_placement`), the chunk's sha512, and, when a key is given, that
    the key names the same file and chunk as the value. ``check_hash=False`` leaves the
    chunk's sha512 to a reassembler with lazy checks (assembly/lazy_checks.py).
    ``topic``/``partition``/``offset`` only decorate the error.
    """
    ctx: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset}
    fields = _unpack(value, ctx)
    filename = _text(fields[0], "filename", ctx)
    subdir = _text(fields[6], "subdir", ctx)
    append = _text(fields[7], "filename_append", ctx)
    ctx["rel_path"] = f"{subdir}/{filename}" if subdir else filename
    problem = path_problem(filename, subdir, append)
    if problem:
        raise ChunkDecodeError(f"unsafe path: {problem}", **ctx)
    file_hash = _digest(fields[1], "file_hash", ctx)
    chunk_hash = _digest(fields[2], "chunk_hash", ctx)
    chunk_offset = _integer(fields[3], "chunk_offset", ctx)
    chunk_i = _integer(fields[4], "chunk_i", ctx)
    n_total = _integer(fields[5], "n_total_chunks", ctx)
    data = fields[8]
    if not isinstance(data, bytes):
        raise ChunkDecodeError(f"data is {type(data).__name__}, expected bytes", **ctx)
    mtime = _mtime(fields, ctx)
    if not data:
        raise ChunkDecodeError("chunk data is empty", **ctx)
    _check_placement(chunk_offset, chunk_i, n_total, len(data), ctx)
    if check_hash and hashlib.sha512(data).digest() != chunk_hash:
        raise ChunkDecodeError("chunk hash mismatch", **ctx)
    chunk = Chunk(filename, file_hash, chunk_hash, chunk_offset, chunk_i, n_total,
                  subdir, append, data, mtime)
    if key is not None:
        _check_key(key, chunk, ctx)
    return chunk


def file_identity(value: bytes | bytearray | memoryview | None) -> FileKey:
    """``(path, file_hash)`` of a chunk message, decoding only what names its file (the
    re-key hop's key: no chunk hash is checked, no data copied). ``path`` is subdir and
    filename as the producer sent them, without ``filename_append`` (unlike
    :attr:`Chunk.rel_path`): every chunk of a file carries the same, which is all a key
    needs. Raises :class:`ChunkDecodeError` when the value cannot name a file."""
    ctx: dict[str, Any] = {}
    fields = _unpack(value, ctx)
    filename = _text(fields[0], "filename", ctx)
    subdir = _text(fields[6], "subdir", ctx)
    file_hash = _digest(fields[1], "file_hash", ctx)
    return (f"{subdir}/{filename}" if subdir else filename), file_hash


def _hash_source(path: Path, chunk_size: int) -> tuple[bytes, list[bytes]]:
    """First pass over a file on disk: whole-file sha512 and each chunk's sha512."""
    file_hasher = hashlib.sha512()
    chunk_hashes: list[bytes] = []
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb") as stream:
        while True:
            n_read = stream.readinto(buffer)
            if not n_read:
                break
            file_hasher.update(view[:n_read])
            chunk_hashes.append(hashlib.sha512(view[:n_read]).digest())
    return file_hasher.digest(), chunk_hashes


def _chunks_of_bytes(data: memoryview, chunk_size: int, **common: Any) -> Iterator[Chunk]:
    n_total = -(-data.nbytes // chunk_size)
    file_hash = hashlib.sha512(data).digest()
    for index, start in enumerate(range(0, data.nbytes, chunk_size), start=1):
        piece = data[start:start + chunk_size]
        yield Chunk(file_hash=file_hash, chunk_hash=hashlib.sha512(piece).digest(),
                    chunk_offset=start, chunk_i=index, n_total_chunks=n_total,
                    data=piece, **common)


def _chunks_of_path(path: Path, chunk_size: int, **common: Any) -> Iterator[Chunk]:
    before = path.stat()
    file_hash, chunk_hashes = _hash_source(path, chunk_size)
    n_total = len(chunk_hashes)
    with open(path, "rb") as stream:
        for index, expected in enumerate(chunk_hashes, start=1):
            start = stream.tell()
            piece = stream.read(chunk_size)
            if hashlib.sha512(piece).digest() != expected:
                raise SourceFileChangedError("file changed while it was being chunked",
                                             rel_path=str(path))
            yield Chunk(file_hash=file_hash, chunk_hash=expected, chunk_offset=start,
                        chunk_i=index, n_total_chunks=n_total, data=piece, **common)
        if stream.read(1):
            raise SourceFileChangedError("file grew while it was being chunked",
                                         rel_path=str(path))
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise SourceFileChangedError("file changed while it was being chunked",
                                     rel_path=str(path))


def chunk_file(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview,
    rel_subdir: str = "",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    filename: str | None = None,
    filename_append: str = "",
    file_mtime: float | None = None,
) -> Iterator[Chunk]:
    """Yield the chunks of one file, as an OpenMSIStream producer would cut them.

    ``source`` is a path (streamed from disk in two passes: hashes first, then data, so
    memory stays at about one chunk) or an in-memory buffer (chunks are zero-copy
    memoryview slices; ``filename`` is then required). ``rel_subdir`` is the POSIX folder
    relative to the producer's root. ``file_mtime`` defaults to the file's st_mtime
    (``0.0`` for buffers).

    Empty files are skipped with a logged warning and yield nothing: OpenMSIStream cuts
    them into 0 chunks, which no consumer could ever complete.

    Raises :class:`FileRejectedError` for a name the consumer would refuse, and
    :class:`SourceFileChangedError` if the file on disk changes while being chunked
    (chunks already yielded are then a torn generation; produce the file again).
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    is_buffer = isinstance(source, (bytes, bytearray, memoryview))
    if filename is None:
        if is_buffer:
            raise ValueError("filename is required when chunking an in-memory buffer")
        filename = Path(source).name
    problem = path_problem(filename, rel_subdir, filename_append)
    if problem:
        rel_path = f"{rel_subdir}/{filename}" if rel_subdir else filename
        raise FileRejectedError(f"unsafe path: {problem}", rel_path=rel_path)
    if file_mtime is None:
        file_mtime = 0.0 if is_buffer else Path(source).stat().st_mtime
    common = {"filename": filename, "subdir": rel_subdir,
              "filename_append": filename_append, "file_mtime": float(file_mtime)}
    if is_buffer:
        view = memoryview(source).cast("B")
        if view.nbytes == 0:
            logger.warning("skipping empty file %r: OpenMSIStream sends no chunks for it",
                           filename)
            return
        yield from _chunks_of_bytes(view, chunk_size, **common)
        return
    path = Path(source)
    if path.stat().st_size == 0:
        logger.warning("skipping empty file %s: OpenMSIStream sends no chunks for it", path)
        return
    yield from _chunks_of_path(path, chunk_size, **common)
