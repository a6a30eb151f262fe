"""Unit tests for girder_upload_stream.wire.codec: wire format, validation, chunking."""

from __future__ import annotations

import contextlib
import hashlib
import math
import pickle
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from girder_upload_stream.wire.codec import (
    DEFAULT_CHUNK_SIZE,
    MAX_NAME_BYTES,
    MAX_POSSIBLE_FILE_BYTES,
    Chunk,
    chunk_file,
    decode_chunk,
    encode_chunk,
    make_key,
    path_problem,
    reconstructed_name,
)
from girder_upload_stream.errors import (
    ChunkDecodeError,
    FileRejectedError,
    SourceFileChangedError,
    TerminalError,
)

# Test vectors produced by the real OpenMSIStream 1.8.8 (PyPI `openmsistream==1.8.8`, in a
# throwaway virtualenv), not by this project:
#   root/hello.txt        = b"hello openmsistream\n", chunk_size=8, filename_append=""
#   root/sub/dir/data.bin = 40 bytes: rng = random.Random(7); rng.getrandbits(8) x 40,
#                           chunk_size=16, filename_append="_x"
#   both with mtime 2024-01-02 03:04:05 UTC (touch -d), then for each file:
#     udf = UploadDataFile(root / rel, rootdir=root, filename_append=append)
#     udf.add_chunks_to_upload(chunk_size=...)
#     for c in udf.chunks_to_upload:
#         c.populate_with_file_data()
#         key, value = c.msg_key, DataFileChunkSerializer()(c)
# Note the key of a file at the root starts with "_" in the real package.
REAL_MESSAGES = [
    ('_hello.txt_chunk_1_of_3',
     bytes.fromhex(
         "9aa968656c6c6f2e747874c44080ddd13b861130ff6879a5975dc06c012d2cce7af086d67425852c"
         "fdc486ad25a68a61e3245d36eb9f0478a9c12aa7d1133fba8babdd8a465f2806962dcc6bfac4407c"
         "4248fe8c9e2e9a17ac150ec4c750898edbc17820d4a45dbda6f5ace3fe0d0cc171e4957703655b7c"
         "76a307e34c082f313564babe81259b674a475b7f8fb7a6000103a0a0c40868656c6c6f206f70cb41"
         "d964df49400000"
     )),
    ('_hello.txt_chunk_2_of_3',
     bytes.fromhex(
         "9aa968656c6c6f2e747874c44080ddd13b861130ff6879a5975dc06c012d2cce7af086d67425852c"
         "fdc486ad25a68a61e3245d36eb9f0478a9c12aa7d1133fba8babdd8a465f2806962dcc6bfac44001"
         "5175806d92f9015d65268316ac7365f0fcdac2e7480f79c334afb9ddbb075dc87986f7e638ce0ab9"
         "112917be418cb708f5134107319c9ba8bac48c6f8fe540080203a0a0c408656e6d7369737472cb41"
         "d964df49400000"
     )),
    ('_hello.txt_chunk_3_of_3',
     bytes.fromhex(
         "9aa968656c6c6f2e747874c44080ddd13b861130ff6879a5975dc06c012d2cce7af086d67425852c"
         "fdc486ad25a68a61e3245d36eb9f0478a9c12aa7d1133fba8babdd8a465f2806962dcc6bfac44096"
         "7312be2837636bb198dbc88ecbcd41f69e4a2d22b8e90af5bbea036783abe667a70393d2b7beac88"
         "14d6cd7e64490da536e3d72af1861f3cc396e0f04320ec100303a0a0c40465616d0acb41d964df49"
         "400000"
     )),
    ('sub_dir_data.bin_chunk_1_of_3',
     bytes.fromhex(
         "9aa8646174612e62696ec440d22433efb6fe61269213299f9b71e42b3a92da1082f0ab3b05c54a20"
         "54970b36fdb0e361bedf88efb495972127a62800f5941c6580939262f40df373aa1bf408c4403224"
         "0e82b1f7c0e776a9ec5e195a5041171401555311849da0311b31873f9e46a8a0fc53323711fda714"
         "08493ff49df58d958d95ec31e941437a427c46540205000103a77375622f646972a25f78c41052f2"
         "2665a60c12d289185d950ee88136cb41d964df49400000"
     )),
    ('sub_dir_data.bin_chunk_2_of_3',
     bytes.fromhex(
         "9aa8646174612e62696ec440d22433efb6fe61269213299f9b71e42b3a92da1082f0ab3b05c54a20"
         "54970b36fdb0e361bedf88efb495972127a62800f5941c6580939262f40df373aa1bf408c4406263"
         "c9053b6103296cd8b165db59382a8a2096a8dcb5dc369ee9cd2f18e77d312173ece499cc3a59d19c"
         "f81103e5c923f313e27e5b8275b77f799229b9e0999a100203a77375622f646972a25f78c4100916"
         "6f6b113d178d6c0fd3901ff239a1cb41d964df49400000"
     )),
    ('sub_dir_data.bin_chunk_3_of_3',
     bytes.fromhex(
         "9aa8646174612e62696ec440d22433efb6fe61269213299f9b71e42b3a92da1082f0ab3b05c54a20"
         "54970b36fdb0e361bedf88efb495972127a62800f5941c6580939262f40df373aa1bf408c440bab2"
         "fb25518e2185389f8108489d6affa00f4e5195f7f073e060be6760a91f0bc69a27e5c5c2b67175cc"
         "fa2cee8991dda8cf5a5c7bea6fd74dd0f0ca6cec3975200303a77375622f646972a25f78c408a095"
         "f20f9395650ccb41d964df49400000"
     )),
]

HELLO = b"hello openmsistream\n"
_RNG = random.Random(7)
DATA_BIN = bytes(_RNG.getrandbits(8) for _ in range(40))
MTIME = 1704164645.0


def make_chunk(data: bytes = b"payload", **overrides) -> Chunk:
    """A valid single-chunk file unless overridden."""
    fields = dict(filename="f.txt", file_hash=hashlib.sha512(data).digest(),
                  chunk_hash=hashlib.sha512(data).digest(), chunk_offset=0, chunk_i=1,
                  n_total_chunks=1, subdir="", filename_append="", data=data,
                  file_mtime=0.0)
    fields.update(overrides)
    return Chunk(**fields)


def raw_fields(chunk: Chunk | None = None) -> list:
    """The 10 msgpack fields of a chunk, for tampering."""
    return msgpack.unpackb(encode_chunk(chunk or make_chunk())[1], raw=False)


def pack(fields: list) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


# ---------------------------------------------------------------- real vectors


def test_real_openmsistream_messages_decode_to_the_expected_chunks():
    chunks = [decode_chunk(value, key) for key, value in REAL_MESSAGES]
    hello, data = chunks[:3], chunks[3:]
    assert [c.rel_path for c in hello] == ["hello.txt"] * 3
    assert [c.rel_path for c in data] == ["sub/dir/data_x.bin"] * 3
    assert b"".join(c.data for c in hello) == HELLO
    assert b"".join(c.data for c in data) == DATA_BIN
    assert hello[0].file_hash == hashlib.sha512(HELLO).digest()
    assert data[0].file_hash == hashlib.sha512(DATA_BIN).digest()
    assert [(c.chunk_i, c.chunk_offset, c.n_total_chunks) for c in hello] == [
        (1, 0, 3), (2, 8, 3), (3, 16, 3)]
    assert data[0].subdir == "sub/dir" and data[0].filename == "data.bin"
    assert data[0].filename_append == "_x"
    assert all(c.file_mtime == MTIME for c in chunks)


def test_our_encoder_reproduces_real_messages_byte_for_byte():
    for key, value in REAL_MESSAGES:
        assert encode_chunk(decode_chunk(value)) == (key, value)


def test_chunk_file_cuts_files_exactly_like_openmsistream(tmp_path):
    (tmp_path / "hello.txt").write_bytes(HELLO)
    ours = list(chunk_file(tmp_path / "hello.txt", "", 8, file_mtime=MTIME))
    assert [encode_chunk(c) for c in ours] == REAL_MESSAGES[:3]
    ours = list(chunk_file(DATA_BIN, "sub/dir", 16, filename="data.bin",
                           filename_append="_x", file_mtime=MTIME))
    assert [encode_chunk(c) for c in ours] == REAL_MESSAGES[3:]


# ---------------------------------------------------------------- names and keys


@pytest.mark.parametrize(("filename", "append", "expected"), [
    ("scan.tif", "", "scan.tif"),
    ("scan.tif", "_v2", "scan_v2.tif"),
    ("archive.tar.gz", "_v2", "archive.tar_v2.gz"),
    (".bashrc", "_x", ".bashrc_x"),
    ("noext", "_x", "noext_x"),
    ("a.", "_x", "a._x"),
])
def test_reconstructed_name_inserts_append_before_the_last_suffix(filename, append, expected):
    assert reconstructed_name(filename, append) == expected


def test_keys_follow_openmsistream_including_the_leading_underscore_at_the_root():
    assert make_key("", "a.txt", 1, 2) == "_a.txt_chunk_1_of_2"
    assert make_key("x/y", "a.txt", 2, 2) == "x_y_a.txt_chunk_2_of_2"
    assert make_chunk(subdir="d").key == "d_f.txt_chunk_1_of_1"


def test_key_check_accepts_str_bytes_and_the_documented_root_form():
    key, value = encode_chunk(make_chunk())
    assert decode_chunk(value, key).filename == "f.txt"
    assert decode_chunk(value, key.encode()).filename == "f.txt"
    assert decode_chunk(value, "f.txt_chunk_1_of_1").filename == "f.txt"


@pytest.mark.parametrize("key", ["_other.txt_chunk_1_of_1", "_f.txt_chunk_2_of_1",
                                 "_f.txt_chunk_1_of_2", "", b"\xff\xfe", 12])
def test_a_key_that_disagrees_with_its_value_is_rejected(key):
    _, value = encode_chunk(make_chunk())
    with pytest.raises(ChunkDecodeError, match="key"):
        decode_chunk(value, key)


def test_key_without_underscore_is_only_accepted_at_the_root():
    _, value = encode_chunk(make_chunk(subdir="d"))
    with pytest.raises(ChunkDecodeError):
        decode_chunk(value, "f.txt_chunk_1_of_1")


# ---------------------------------------------------------------- round trips

_name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00")
_names = st.text(_name_chars, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(name=_names, subdir=st.lists(_names, max_size=3).map("/".join),
       append=st.text(_name_chars, max_size=5), data=st.binary(min_size=1, max_size=300),
       size=st.integers(1, 64), mtime=st.floats(0, 2e9))
def test_encode_decode_round_trip(name, subdir, append, data, size, mtime):
    chunks = list(chunk_file(data, subdir, size, filename=name, filename_append=append,
                             file_mtime=mtime))
    assert len(chunks) == math.ceil(len(data) / size)
    for chunk in chunks:
        key, value = encode_chunk(chunk)
        back = decode_chunk(value, key)
        assert back == Chunk(**{**_fields(chunk), "data": bytes(chunk.data)})
        assert back.rel_path == (f"{subdir}/" if subdir else "") + \
            reconstructed_name(name, append)


def _fields(chunk: Chunk) -> dict:
    return {name: getattr(chunk, name) for name in Chunk.__dataclass_fields__}


def test_legacy_nine_field_messages_decode_with_unknown_mtime():
    fields = raw_fields(make_chunk(file_mtime=5.0))[:9]
    assert decode_chunk(pack(fields)).file_mtime == 0.0


def test_integer_mtime_is_accepted():
    fields = raw_fields()
    fields[9] = 1700000000
    assert decode_chunk(pack(fields)).file_mtime == 1700000000.0


# ---------------------------------------------------------------- hostile messages


@pytest.mark.parametrize("value", [b"", b"\xc1", b"not msgpack at all \xff", b"\x9a\x01",
                                   None, "a string", 17])
def test_non_msgpack_values_are_rejected(value):
    with pytest.raises(ChunkDecodeError) as raised:
        decode_chunk(value)
    assert "()" not in str(raised.value)  # the reason always says something


def test_a_byte_no_msgpack_value_begins_with_is_named() -> None:
    with pytest.raises(ChunkDecodeError, match=r"not msgpack \(a byte no msgpack value"):
        decode_chunk(b"\xc1 not msgpack")


@pytest.mark.parametrize("value", [msgpack.packb({"a": 1}), msgpack.packb(7),
                                   msgpack.packb(b"bytes"), msgpack.packb(None)])
def test_non_array_values_are_rejected(value):
    with pytest.raises(ChunkDecodeError, match="not an array"):
        decode_chunk(value)


@pytest.mark.parametrize("count", [0, 1, 8, 11, 20])
def test_wrong_element_count_is_rejected(count):
    fields = (raw_fields() * 3)[:count]
    with pytest.raises(ChunkDecodeError, match="9 or 10 fields"):
        decode_chunk(pack(fields))


@pytest.mark.parametrize(("index", "bad"), [
    (0, 5), (0, None), (1, "text"), (1, b"short"), (2, 3.5), (2, b"x" * 65),
    (3, "0"), (3, 1.0), (3, True), (4, None), (4, 1.0), (5, b"\x01"), (5, False),
    (6, 3), (7, [1]), (8, "text data"), (8, None), (8, 42),
    (9, "1.0"), (9, None), (9, True), (9, float("nan")), (9, float("inf")),
])
def test_wrong_field_types_are_rejected(index, bad):
    fields = raw_fields()
    fields[index] = bad
    with pytest.raises(ChunkDecodeError):
        decode_chunk(pack(fields))


@pytest.mark.parametrize("index", [0, 6, 7])
def test_non_utf8_names_are_rejected(index):
    fields = raw_fields()
    fields[index] = b"bad\xff\xfename"
    with pytest.raises(ChunkDecodeError, match="UTF-8"):
        decode_chunk(pack(fields))


def test_surrogates_encoded_as_utf8_are_rejected():
    fields = raw_fields()
    fields[0] = b"\xed\xa0\x80.txt"  # a lone surrogate, invalid in strict UTF-8
    with pytest.raises(ChunkDecodeError, match="UTF-8"):
        decode_chunk(pack(fields))


def test_chunk_hash_mismatch_is_rejected():
    fields = raw_fields()
    fields[8] = b"tampered"
    with pytest.raises(ChunkDecodeError, match="chunk hash mismatch"):
        decode_chunk(pack(fields))


def test_empty_chunk_data_is_rejected():
    chunk = make_chunk(data=b"", chunk_hash=hashlib.sha512(b"").digest())
    with pytest.raises(ChunkDecodeError, match="empty"):
        decode_chunk(encode_chunk(chunk)[1])


@pytest.mark.parametrize(("offset", "i", "n", "match"), [
    (0, 1, 0, "n_total_chunks"), (0, 1, -3, "n_total_chunks"),
    (0, 0, 3, "chunk_i"), (0, 4, 3, "chunk_i"), (0, -1, 3, "chunk_i"),
    (-1, 2, 3, "chunk_offset"), (5, 1, 3, "chunk_offset"),
])
def test_out_of_range_numbers_are_rejected(offset, i, n, match):
    chunk = make_chunk(chunk_offset=offset, chunk_i=i, n_total_chunks=n)
    with pytest.raises(ChunkDecodeError, match=match):
        decode_chunk(encode_chunk(chunk)[1])


# Integers at the limits of what msgpack carries (uint64) and a file offset holds (int64).
@pytest.mark.parametrize(("offset", "i", "n", "match"), [
    (0, 1, 2**63 - 1, "needs a file of at least"),  # one byte + 2**63-2 more chunks
    (0, 1, 2**63, "more chunks than any file"),
    (0, 1, 2**64 - 1, "more chunks than any file"),
    (2**63 - 1, 2, 2, "more than any file can hold"),
    (2**63 - 7, 2, 2, "more than any file can hold"),  # ends one byte past 2**63-1
    (2**64 - 1, 2, 2, "more than any file can hold"),
    (0, 2**63, 2**63, "more chunks than any file"),
    (2, 4, 5, "chunk_offset 2 is invalid for chunk 4"),  # 3 chunks before: >= 3 bytes
    (-2**63, 2, 2, "chunk_offset"),
])
def test_integers_no_file_can_have_are_rejected(offset, i, n, match):
    chunk = make_chunk(chunk_offset=offset, chunk_i=i, n_total_chunks=n)
    with pytest.raises(ChunkDecodeError, match=match):
        decode_chunk(encode_chunk(chunk)[1], chunk.key)


@pytest.mark.parametrize(("offset", "i", "n"), [
    (0, 1, 2**62), (2**63 - 8, 2, 2),  # "payload" (7 bytes) ends at exactly 2**63-1
    (2**62, 3, 2**61), (1, 2, 3),
])
def test_integers_at_the_edge_of_a_file_still_decode(offset, i, n):
    """The codec only refuses what no file can be; the size limit is the reassembler's."""
    chunk = make_chunk(chunk_offset=offset, chunk_i=i, n_total_chunks=n)
    decoded = decode_chunk(encode_chunk(chunk)[1], chunk.key)
    assert (decoded.chunk_offset, decoded.chunk_i, decoded.n_total_chunks) == (offset, i, n)
    assert offset + decoded.size + (n - i) <= MAX_POSSIBLE_FILE_BYTES


CJK_74 = "\u6f22" * 74  # 222 bytes in UTF-8


@pytest.mark.parametrize(("filename", "subdir", "append"), [
    (CJK_74, "", ""), ("a" * 255, "", ""), ("f.txt", "b" * 255, ""),
    ("\u00e9" * 127 + "x", "\u00e9" * 127 + "x/" + CJK_74, ""),
    ("a" * 250 + ".txt", "", "_"),  # 255 bytes once the append is in
])
def test_names_up_to_255_bytes_per_component_are_accepted(filename, subdir, append):
    assert path_problem(filename, subdir, append) is None
    chunk = make_chunk(filename=filename, subdir=subdir, filename_append=append)
    assert decode_chunk(encode_chunk(chunk)[1], chunk.key).rel_path == chunk.rel_path


@pytest.mark.parametrize(("filename", "subdir", "append", "what"), [
    ("a" * 256, "", "", "filename"), ("\u6f22" * 86, "", "", "filename"),  # 258 bytes
    ("f.txt", "ok/" + "b" * 256, "", "subdir"),
    ("a" * 251 + ".txt", "", "_", "file name"),  # 256 bytes once the append is in
])
def test_a_component_over_255_bytes_is_rejected_with_one_reason(filename, subdir, append,
                                                                what, tmp_path):
    problem = path_problem(filename, subdir, append)
    assert problem is not None and problem.startswith(what)
    assert f"no file system holds a name over {MAX_NAME_BYTES} bytes" in problem
    chunk = make_chunk(filename=filename, subdir=subdir, filename_append=append)
    with pytest.raises(ChunkDecodeError, match=f"unsafe path: {problem}"):
        decode_chunk(encode_chunk(chunk)[1])
    with pytest.raises(FileRejectedError, match=problem):  # the producer refuses it too
        list(chunk_file(b"data", subdir, filename=filename, filename_append=append))


def test_a_lone_surrogate_in_a_name_is_a_problem_not_an_exception():
    assert "cannot encode" in path_problem("bad\udcff.txt", "")
    assert "cannot encode" in path_problem("f.txt", "d\ud800")


@pytest.mark.parametrize(("filename", "subdir", "append"), [
    ("/etc/passwd", "", ""), ("passwd", "/etc", ""), ("..", "", ""), (".", "", ""),
    ("f", "..", ""), ("f", "a/../..", ""), ("f", "a/./b", ""), ("f", "./a", ""),
    ("f", "a//b", ""), ("f", "a/", ""), ("a\\b", "", ""), ("f", "a\\..\\b", ""),
    ("f\x00.txt", "", ""), ("f", "a\x00", ""), ("", "", ""), ("", "d", ""),
    ("f.txt", "", "/../x"), ("f.txt", "", "\\x"), ("f.txt", "", "\x00"),
])
def test_unsafe_paths_are_rejected(filename, subdir, append):
    chunk = make_chunk(filename=filename, subdir=subdir, filename_append=append)
    assert path_problem(filename, subdir, append) is not None
    with pytest.raises(ChunkDecodeError, match="unsafe path"):
        decode_chunk(encode_chunk(chunk)[1])


def test_errors_carry_their_context():
    with pytest.raises(ChunkDecodeError) as caught:
        decode_chunk(pack(raw_fields()[:3]), topic="t", partition=2, offset=17)
    text = str(caught.value)
    assert "9 or 10 fields" in text and "topic='t'" in text
    assert "partition=2" in text and "offset=17" in text
    assert isinstance(caught.value, TerminalError)
    fields = raw_fields()
    fields[8] = b"tampered"
    with pytest.raises(ChunkDecodeError) as caught:
        decode_chunk(pack(fields))
    assert caught.value.rel_path == "f.txt" and "file='f.txt'" in str(caught.value)
    restored = pickle.loads(pickle.dumps(caught.value))
    assert str(restored) == str(caught.value) and restored.reason == caught.value.reason


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=10) | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=11), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _msgpack_values.map(pack)),
       st.one_of(st.none(), st.text(max_size=20), st.binary(max_size=20)))
def test_decoding_garbage_raises_only_chunk_decode_error(value, key):
    with contextlib.suppress(ChunkDecodeError):
        decode_chunk(value, key)


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 9), replacement=_msgpack_values)
def test_tampering_with_one_field_never_escapes_chunk_decode_error(index, replacement):
    fields = raw_fields()
    fields[index] = replacement
    with contextlib.suppress(ChunkDecodeError):
        decode_chunk(pack(fields))


# ---------------------------------------------------------------- chunk_file


def test_chunk_file_streams_a_file_from_disk(tmp_path):
    data = random.Random(1).randbytes(10_000)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    from_disk = list(chunk_file(path, "a/b", 3000))
    from_memory = list(chunk_file(data, "a/b", 3000, filename="big.bin",
                                  file_mtime=path.stat().st_mtime))
    assert [encode_chunk(c) for c in from_disk] == [encode_chunk(c) for c in from_memory]
    assert [c.size for c in from_disk] == [3000, 3000, 3000, 1000]
    assert from_disk[0].file_mtime == path.stat().st_mtime
    assert isinstance(from_memory[0].data, memoryview)


def test_chunk_file_defaults(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"z" * (DEFAULT_CHUNK_SIZE + 1))
    assert [c.size for c in chunk_file(path)] == [DEFAULT_CHUNK_SIZE, 1]


def test_empty_files_are_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "empty").write_bytes(b"")
    with caplog.at_level("WARNING"):
        assert list(chunk_file(tmp_path / "empty")) == []
        assert list(chunk_file(b"", filename="empty")) == []
    assert caplog.text.count("skipping empty file") == 2


def test_chunk_file_refuses_names_the_consumer_would_reject(tmp_path):
    (tmp_path / "back\\slash").write_bytes(b"x")
    with pytest.raises(FileRejectedError, match="backslash"):
        list(chunk_file(tmp_path / "back\\slash"))
    with pytest.raises(FileRejectedError, match="subdir"):
        list(chunk_file(b"x", "../up", filename="f"))
    with pytest.raises(ValueError):
        list(chunk_file(b"x"))
    with pytest.raises(ValueError):
        list(chunk_file(b"x", filename="f", chunk_size=0))


def test_chunk_file_notices_a_file_changing_underneath(tmp_path):
    path = tmp_path / "moving.bin"
    path.write_bytes(b"a" * 100)
    chunks = chunk_file(path, "", 10)
    next(chunks)
    path.write_bytes(b"b" * 100)
    with pytest.raises(SourceFileChangedError):
        list(chunks)


def test_chunk_file_notices_a_file_growing(tmp_path):
    path = tmp_path / "growing.bin"
    path.write_bytes(b"a" * 100)
    chunks = chunk_file(path, "", 10)
    next(chunks)
    with open(path, "ab") as stream:
        stream.write(b"more")
    with pytest.raises(SourceFileChangedError):
        list(chunks)
