"""Unit tests for girder_upload_stream.registry.tables (OpenMSIStream-format registry files)."""

from __future__ import annotations

import fnmatch
import math
import os
import shutil
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from girder_upload_stream.registry import csv_files as _registry_csv
from girder_upload_stream.registry import tables as R
from girder_upload_stream.registry.csv_files import format_datetime, parse_datetime

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "openmsistream_registry_samples"
T0 = datetime(2024, 3, 5, 7, 8, 9)
T1 = datetime(2024, 12, 31, 23, 59, 58)
ODD_NAMES = ["plain.dat", "semi;colon.txt", 'dq"uote.txt', "sq'uote.txt", "both'\"q.txt",
             "ünï–cødé 日本.bin", "new\nline.txt", "tab\tx", " lead space ", "back\\slash"]
STATUSES = [R.STATUS_IN_PROGRESS, R.STATUS_FAILED, R.STATUS_MISMATCHED_HASH]
IN_PROGRESS_HEADER = "filename;rel_filepath;status;n_chunks;first_message;most_recent_message"
PROCESSED_HEADER = "filename;rel_filepath;n_chunks;first_message;processed_at"


def ip_row(name: str = "a.dat", generation: str = "", status: str = R.STATUS_IN_PROGRESS,
           n: int = 1, subdir: str = "sub", extra: dict | None = None) -> R.InProgressRow:
    return R.InProgressRow(name, f"{subdir}/{name}" if subdir else name, status, n, T0, T1,
                           generation, extra or {})


def proc_row(name: str = "a.dat", generation: str = "", at: datetime = T1, n: int = 1,
             extra: dict | None = None) -> R.ProcessedRow:
    return R.ProcessedRow(name, f"sub/{name}", n, T0, at, generation, extra or {})


def odd_in_progress_rows() -> list[R.InProgressRow]:
    """The rows OpenMSIStream wrote into the odd_names samples (minus our extras)."""
    return [R.InProgressRow(name, f"sub/dir/{name}", STATUSES[i % 3], i,
                            T0.replace(microsecond=123456), T1)
            for i, name in enumerate(ODD_NAMES)]


def names_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------- format


def test_datetime_format_is_openmsistreams_and_locale_free() -> None:
    assert format_datetime(T0) == "Tue Mar 05, 2024 at 07:08:09"
    assert format_datetime(T0) == T0.strftime("%a %b %d, %Y at %H:%M:%S")  # C locale here
    assert parse_datetime("Tue Mar 05, 2024 at 07:08:09") == T0
    for bad in ("2024-03-05 07:08:09", "Tue Mar 05, 2024 at 7:08:09", "Xyz Mar 05, 2024 at "
                "07:08:09", "Tue Feb 30, 2024 at 07:08:09", "Tue Mar 05, 2024 at 07:08:09 "):
        with pytest.raises(ValueError):
            parse_datetime(bad)


def test_exact_file_text(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    table.update(ip_row("a;b.txt", n=3))
    table.update(ip_row("c.txt", status=R.STATUS_FAILED, subdir=""))
    assert table.save()
    assert (tmp_path / "ip.csv").read_bytes() == (
        f"{IN_PROGRESS_HEADER}\n"
        "\"'a;b.txt'\";\"'sub/a;b.txt'\";'in_progress';3;"
        "'Tue Mar 05, 2024 at 07:08:09';'Tue Dec 31, 2024 at 23:59:58'\n"
        "'c.txt';'c.txt';'failed';1;"
        "'Tue Mar 05, 2024 at 07:08:09';'Tue Dec 31, 2024 at 23:59:58'").encode()


def test_empty_table_is_the_header_only(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    assert table.dirty and table.save()
    assert (tmp_path / "ip.csv").read_bytes() == \
        (SAMPLES / "odd_names" / "in_progress_empty.csv").read_bytes()
    assert len(R.InProgressTable(tmp_path / "ip.csv")) == 0


def test_writer_matches_openmsistream_sample_byte_for_byte(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    for row in odd_in_progress_rows():
        table.update(row)
    table.save()
    assert (tmp_path / "ip.csv").read_bytes() == \
        (SAMPLES / "odd_names" / "in_progress.csv").read_bytes()
    worker = R.ProcessedTable(tmp_path, "t", "g", "w1")
    for i, name in enumerate(ODD_NAMES[:3]):
        worker.add(R.ProcessedRow(name, name, i, T0, T1))
    worker.save()
    assert worker.path.read_bytes() == (SAMPLES / "odd_names" / "processed.csv").read_bytes()


def test_reader_reads_openmsistream_odd_names(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "odd_names" / "in_progress.csv", tmp_path / "ip.csv")
    table = R.InProgressTable(tmp_path / "ip.csv")
    assert table.issues == []
    assert table.rows() == odd_in_progress_rows()
    assert not table.dirty


# ---------------------------------------------------------------- round trips


def test_odd_names_round_trip_with_extras(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    rows = [ip_row(name, generation=f"gen;'{i}\"", extra={"hash": "ab;c", "offsets": [(0, 5)],
                                                           "why": None, "raw": b"\x00;"})
            for i, name in enumerate([*ODD_NAMES, "\udcff.bin", "x\r\u2028y"])]
    for row in rows:
        table.update(row)
    table.save()
    reloaded = R.InProgressTable(tmp_path / "ip.csv")
    assert reloaded.rows() == rows and reloaded.issues == []
    assert len((tmp_path / "ip.csv").read_bytes().split(b"\n")) == len(rows) + 1


_literals = st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.binary(),
                      st.floats(allow_nan=False, allow_infinity=False))
_extras = st.dictionaries(st.text(max_size=5), st.one_of(_literals, st.lists(_literals)),
                          max_size=3)
_paths = st.text(min_size=1).filter(lambda s: str(PurePosixPath(s)) not in ("", "."))


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.builds(R.ProcessedRow, st.text(), _paths, st.integers(0, 10**9),
                               st.datetimes(), st.datetimes(), st.text(), _extras),
                     max_size=5))
def test_processed_round_trip_property(rows: list[R.ProcessedRow]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        worker = R.ProcessedTable(Path(folder), "t", "g", "w")
        for row in rows:
            worker.add(row)
        worker.save()
        result = R.read_processed(Path(folder), "t", "g")
    assert result.issues == []
    assert result.rows == sorted(rows, key=lambda row: row.processed_at)


def test_rows_normalize_times_paths_and_validate() -> None:
    aware = datetime(2024, 3, 5, 7, 8, 9, 999999, tzinfo=timezone(timedelta(hours=3)))
    row = R.ProcessedRow("a", Path("x/a"), 1, aware, T1.replace(microsecond=5))
    assert row.first_message == aware.astimezone().replace(tzinfo=None, microsecond=0)
    assert row.processed_at == T1 and row.rel_filepath == PurePosixPath("x/a")
    assert row.key == R.RowKey(PurePosixPath("x/a"), "")
    bad = [dict(status="done"), dict(n=True), dict(n=-1), dict(extra={"s": {1}}),
           dict(extra={"f": math.nan}), dict(extra={1: "int key"}), dict(subdir="", name=".")]
    for kwargs in bad:
        with pytest.raises((ValueError, TypeError)):
            ip_row(**kwargs)


# ---------------------------------------------------------------- in-progress table


def test_in_progress_table_operations(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    first, second, other = ip_row(generation="g1"), ip_row(generation="g2"), ip_row("b")
    for row in (first, second, other):
        table.update(row)
    assert table.save() and not table.dirty and not table.save()
    table.update(R.InProgressRow(**{**first.__dict__, "status": R.STATUS_FAILED}))
    assert table.dirty
    assert [r.status for r in table.rows()] == ["failed", "in_progress", "in_progress"]
    assert table.remove(("sub/a.dat", "g2")) == second
    assert table.remove(("sub/a.dat", "g2")) is None
    assert table.get(first.key).status == R.STATUS_FAILED and len(table) == 2
    table.save()
    assert [r.key for r in R.InProgressTable(tmp_path / "ip.csv").rows()] == \
        [first.key, other.key]
    assert table.save(force=True)


def test_openmsistream_1_8_8_in_progress_table_is_ours(tmp_path: Path) -> None:
    """We read and write the name OpenMSIStream 1.8.8 reads back (issue 16)."""
    shutil.copytree(SAMPLES / "LOGS", tmp_path, dirs_exist_ok=True)
    ours = R.in_progress_path(tmp_path, "topic", "group")
    assert ours.name == "consuming_from_topic_in_progress_by_group.csv"
    table = R.InProgressTable.open(tmp_path, "topic", "group")
    assert table.path == ours and [r.status for r in table.rows()] == STATUSES
    assert table.rows()[0].rel_filepath == PurePosixPath("données/ünïcødé 日本.bin")
    assert not table.dirty  # nothing merged: nothing to rewrite
    table.remove(table.rows()[1].key)
    assert table.save()
    assert [r.status for r in R.InProgressTable.open(tmp_path, "topic", "group").rows()] \
        == [STATUSES[0], STATUSES[2]]


def test_seed_name_of_earlier_versions_is_merged_then_retired(tmp_path: Path) -> None:
    seed = R.seed_in_progress_path(tmp_path, "t", "g")
    assert seed.name == "consuming_from_t_by_g_in_progress.csv"
    earlier = R.InProgressTable(seed)  # as an earlier version of ours wrote it
    earlier.update(ip_row("old.dat", "h1", R.STATUS_FAILED, extra={"reason": "400"}))
    earlier.save()
    assert R.sidecar_path(seed).is_file()
    table = R.InProgressTable.open(tmp_path, "t", "g")
    assert [(r.filename, r.generation, r.extra) for r in table.rows()] == [
        ("old.dat", "h1", {"reason": "400"})]
    assert table.dirty and seed.is_file()  # kept until the rows are saved under our name
    table.save()
    assert names_in(tmp_path) == {R.in_progress_path(tmp_path, "t", "g").name,
                                  R.in_progress_path(tmp_path, "t", "g").name + ".extra"}
    again = R.InProgressTable.open(tmp_path, "t", "g")
    assert [(r.filename, r.generation, r.extra) for r in again.rows()] == [
        ("old.dat", "h1", {"reason": "400"})]


def test_both_names_are_read_and_merged(tmp_path: Path) -> None:
    later = T1 + timedelta(hours=1)
    seed = R.InProgressTable(R.seed_in_progress_path(tmp_path, "t", "g"))
    seed.update(ip_row("only_seed.dat", status=R.STATUS_FAILED))
    seed.update(R.InProgressRow("both.dat", "sub/both.dat", R.STATUS_FAILED, 2, T0, later))
    seed.update(ip_row("stale.dat", status=R.STATUS_FAILED))
    seed.save()
    omsi = R.InProgressTable(R.in_progress_path(tmp_path, "t", "g"))  # as 1.8.8 writes it
    omsi.update(ip_row("only_omsi.dat", status=R.STATUS_MISMATCHED_HASH))
    omsi.update(R.InProgressRow("both.dat", "sub/both.dat", R.STATUS_IN_PROGRESS, 2, T0, T1))
    omsi.update(R.InProgressRow("stale.dat", "sub/stale.dat", R.STATUS_IN_PROGRESS, 1, T0,
                                later))
    omsi.save()
    table = R.InProgressTable.open(tmp_path, "t", "g")
    got = {r.filename: r.status for r in table.rows()}
    assert got == {"only_omsi.dat": R.STATUS_MISMATCHED_HASH,
                   "both.dat": R.STATUS_FAILED,      # the seed's row is the later one
                   "stale.dat": R.STATUS_IN_PROGRESS,  # 1.8.8's row is the later one
                   "only_seed.dat": R.STATUS_FAILED}
    table.save()
    assert not R.seed_in_progress_path(tmp_path, "t", "g").exists()
    reread = R.InProgressTable(R.in_progress_path(tmp_path, "t", "g"))
    assert {r.filename: r.status for r in reread.rows()} == got


def test_a_seed_table_with_bad_lines_is_kept_aside_when_retired(tmp_path: Path) -> None:
    seed = R.seed_in_progress_path(tmp_path, "t", "g")
    seed.write_text(IN_PROGRESS_HEADER + "\n'a.dat';'a.dat';'failed';1;'Tue Mar 05, 2024 at "
                    "07:08:09';'Tue Mar 05, 2024 at 07:08:09'\nnot a row\n", encoding="utf-8")
    table = R.InProgressTable.open(tmp_path, "t", "g")
    assert [r.filename for r in table.rows()] == ["a.dat"] and table.issues
    table.save()
    assert not seed.exists()
    assert [p.name for p in tmp_path.glob(seed.name + ".*.malformed")]


def test_an_unreadable_seed_table_is_left_alone(tmp_path: Path) -> None:
    seed = R.seed_in_progress_path(tmp_path, "t", "g")
    seed.write_text("something;else\n", encoding="utf-8")
    table = R.InProgressTable.open(tmp_path, "t", "g")
    assert len(table) == 0 and any("not merged" in i.message for i in table.issues)
    table.save()
    assert seed.read_text(encoding="utf-8") == "something;else\n"


def test_rows_processed_after_their_last_message_are_dropped(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    table.update(ip_row("omsi_left.dat", status=R.STATUS_FAILED))           # no generation
    table.update(ip_row("ours.dat", "g1", R.STATUS_FAILED))
    table.update(ip_row("new_version.dat", "g2"))                           # other generation
    table.update(ip_row("produced_again.dat", "g3"))
    table.save()
    dropped = table.drop_superseded([
        proc_row("omsi_left.dat", "g9", at=T1), proc_row("ours.dat", "g1", at=T1),
        proc_row("new_version.dat", "g1", at=T1 + timedelta(days=1)),
        proc_row("produced_again.dat", "g3", at=T1 - timedelta(seconds=1))])
    assert dropped == 2 and table.dirty
    assert [r.filename for r in table.rows()] == ["new_version.dat", "produced_again.dat"]


def test_to_dataframe(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    frame = table.to_dataframe()
    assert list(frame.columns) == [*IN_PROGRESS_HEADER.split(";"), "generation", "extra"]
    table.update(ip_row(extra={"k": 1}))
    frame = table.to_dataframe()
    assert frame.loc[0, "rel_filepath"] == "sub/a.dat" and frame.loc[0, "extra"] == {"k": 1}
    assert str(frame["first_message"].dtype).startswith("datetime64")
    worker = R.ProcessedTable(tmp_path, "t", "g", "w")
    assert list(worker.to_dataframe().columns)[:5] == PROCESSED_HEADER.split(";")


# ---------------------------------------------------------------- atomicity


def test_writes_go_through_a_hidden_temp_file_in_the_same_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        replaced.append((src, str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(_registry_csv.os, "replace", spy)
    table = R.InProgressTable.open(tmp_path, "t", "g")
    table.update(ip_row())
    table.save()
    assert len(replaced) == 2  # sidecar, then main file
    for src, dst in replaced:
        assert Path(src).parent == Path(dst).parent and Path(src).name != Path(dst).name
        assert not fnmatch.fnmatch(Path(src).name, "*.csv")
        assert not fnmatch.fnmatch(Path(src).name, "consuming_from_*")
    assert Path(replaced[1][1]) == table.path


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_crash_mid_write_leaves_previous_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    table.update(ip_row("old"))
    table.save()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    table.update(ip_row("new"))

    def crash(*args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(_registry_csv.os, failing, crash)
    with pytest.raises(OSError, match="disk on fire"):
        table.save()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp left
    assert table.dirty and table.save()
    reloaded = R.InProgressTable(tmp_path / "ip.csv")
    assert {r.filename for r in reloaded.rows()} == {"old", "new"}


def test_concurrent_reader_only_sees_complete_files(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    table.save()
    stop = threading.Event()

    def writer() -> None:
        for i in range(40):
            table.update(ip_row(f"f{i}.dat", extra={"pad": "x" * 5000}))
            table.save()
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = 0
    while not stop.is_set():
        reader = R.InProgressTable(tmp_path / "ip.csv")
        assert reader.issues == [] and len(reader) >= seen
        seen = len(reader)
    thread.join()
    assert len(R.InProgressTable(tmp_path / "ip.csv")) == 40


# ---------------------------------------------------------------- processed tables


def test_cap_of_1000_rows_rolls_over(tmp_path: Path) -> None:
    worker = R.ProcessedTable(tmp_path, "t", "g", "w-1")
    for i in range(2500):
        worker.add(proc_row(f"f{i}", at=T1 + timedelta(seconds=i)))
    assert worker.path.name == "processed_from_t_by_g_w-1_part0003.csv"
    assert len(worker.rows()) == 500 and worker.dirty and worker.save()
    counts = {p.name: len(p.read_text().split("\n")) - 1
              for p in sorted(tmp_path.glob("processed_from_t_by_g*.csv"))}
    assert counts == {"processed_from_t_by_g_w-1_part0001.csv": 1000,
                      "processed_from_t_by_g_w-1_part0002.csv": 1000,
                      "processed_from_t_by_g_w-1_part0003.csv": 500}
    rows = R.read_processed(tmp_path, "t", "g").rows
    assert [r.filename for r in rows] == [f"f{i}" for i in range(2500)]


def test_new_table_never_reuses_an_existing_part(tmp_path: Path) -> None:
    first = R.ProcessedTable(tmp_path, "t", "g", "w")
    first.add(proc_row("a"))
    first.save()
    second = R.ProcessedTable(tmp_path, "t", "g", "w")
    assert second.path.name == "processed_from_t_by_g_w_part0002.csv"
    assert not second.save(force=True)  # nothing to write: no empty part files
    assert not second.path.exists()


def test_consolidation_keeps_duplicates_and_extras(tmp_path: Path) -> None:
    workers = [R.ProcessedTable(tmp_path, "t", "g", w) for w in ("w1", "w2")]
    workers[0].add(proc_row("same", "h1", at=T1, extra={"offsets": {"0": 5}}))
    workers[1].add(proc_row("same", "h1", at=T1 + timedelta(seconds=1)))
    workers[1].add(proc_row("same", "h2", at=T1 + timedelta(seconds=2)))
    for worker in workers:
        worker.save()
    result = R.consolidate(tmp_path, "t", "g")
    assert result.n_added == 3 and len(result.merged) == 2 and result.issues == []
    assert names_in(tmp_path) == {"processed_from_t_by_g.csv",
                                  "processed_from_t_by_g.csv.extra"}
    rows = R.read_processed(tmp_path, "t", "g").rows
    assert [(r.generation, r.extra) for r in rows] == \
        [("h1", {"offsets": {"0": 5}}), ("h1", {}), ("h2", {})]
    assert R.load_processed_keys(tmp_path, "t", "g") == {
        R.RowKey(PurePosixPath("sub/same"), "h1"), R.RowKey(PurePosixPath("sub/same"), "h2")}
    workers[0].add(proc_row("later", at=T1 + timedelta(days=1)))  # after consolidation
    workers[0].save()
    assert workers[0].path.name.endswith("_w1_part0001.csv")
    assert R.consolidate(tmp_path, "t", "g").n_added == 1
    assert [r.filename for r in R.read_processed(tmp_path, "t", "g").rows] == \
        ["same", "same", "same", "later"]
    assert R.consolidate(tmp_path, "t", "g").merged == []


def test_consolidation_leaves_other_groups_alone(tmp_path: Path) -> None:
    for group in ("g", "g2", "g_x"):
        worker = R.ProcessedTable(tmp_path, "t", group, "w")
        worker.add(proc_row(group))
        worker.save()
        R.consolidate(tmp_path, "t", group)
        worker.add(proc_row(group + "-again"))
        worker.save()
    R.consolidate(tmp_path, "t", "g")
    assert [r.filename for r in R.read_processed(tmp_path, "t", "g").rows] == ["g", "g-again"]
    for group in ("g2", "g_x"):
        assert len(R.read_processed(tmp_path, "t", group).rows) == 2


def test_consolidates_openmsistream_per_thread_files(tmp_path: Path) -> None:
    shutil.copytree(SAMPLES / "LOGS", tmp_path, dirs_exist_ok=True)
    before = [r.filename for r in R.read_processed(tmp_path, "topic", "group").rows]
    assert sorted(before) == sorted(["a.dat", 'semi;colon "q".txt', "a.dat", "b.dat", "c.dat"])
    result = R.consolidate(tmp_path, "topic", "group")
    assert result.n_added == 3 and result.issues == []
    assert not any("_t1" in name for name in names_in(tmp_path))
    assert [r.filename for r in R.read_processed(tmp_path, "topic", "group").rows] == before


def test_orphan_sidecars_of_parts_are_removed(tmp_path: Path) -> None:
    worker = R.ProcessedTable(tmp_path, "t", "g", "w")
    worker.add(proc_row())
    worker.save()
    worker.path.unlink()  # as when OpenMSIStream merged our part and kept the sidecar
    R.consolidate(tmp_path, "t", "g")
    assert names_in(tmp_path) == set()


def test_file_names_and_globs(tmp_path: Path) -> None:
    assert R.processed_path(tmp_path, "t", "g").name == "processed_from_t_by_g.csv"
    part = R.processed_part_path(tmp_path, "t", "g", "w0", 7)
    assert part.name == "processed_from_t_by_g_w0_part0007.csv"
    for name in (part.name, "processed_from_t_by_g.csv"):
        assert fnmatch.fnmatch(name, "processed_from_t_by_g*.csv")
        assert not fnmatch.fnmatch(R.sidecar_path(tmp_path / name).name,
                                   "processed_from_t_by_g*.csv")
    for bad in (("t/x", "g", "w"), ("t", "..", "w"), ("t", "g", "w_1"), ("t", "g", "")):
        with pytest.raises(ValueError):
            R.processed_part_path(tmp_path, *bad, 1)


# ---------------------------------------------------------------- malformed input


ROW = "'ok.txt';'ok.txt';'in_progress';3;'Tue Mar 05, 2024 at 07:08:09';" \
      "'Tue Dec 31, 2024 at 23:59:58'"


def test_malformed_lines_are_skipped_and_reported(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    bad_lines = [
        ROW.replace(";3;", ";three;"),
        ROW.replace("Tue Mar 05", "Tue Mar 45"),
        ROW.rsplit(";", 1)[0],
        ROW.replace("'in_progress'", "'exploded'"),
        ROW.replace("'ok.txt'", f"__import__('pathlib').Path({str(canary)!r}).touch()", 1),
        ROW.replace("'ok.txt'", "'unterminated", 1),
        ROW.replace(";3;", ";True;"),
        '"\'ok.txt\'";x"y;1;2;3;4',
    ]
    body = [IN_PROGRESS_HEADER.encode(), ROW.encode(), *[b.encode() for b in bad_lines],
            b"'\xff\xfe';'a';'in_progress';1;'x';'y'", b"", b"   ",
            ROW.replace("ok", "ok2").encode()]
    path = tmp_path / "ip.csv"
    path.write_bytes(b"\n".join(body))
    table = R.InProgressTable(path)
    assert [r.filename for r in table.rows()] == ["ok.txt", "ok2.txt"]
    assert [issue.line for issue in table.issues] == list(range(3, 12))
    assert all(str(issue).startswith(f"{path}:") for issue in table.issues)
    assert "field 'n_chunks'" in str(table.issues[0]) and "status" in str(table.issues[3])
    assert not canary.exists()
    original = path.read_bytes()
    table.save(force=True)  # the rewrite keeps a copy of what it drops
    [copy] = tmp_path.glob("ip.csv.*.malformed")
    assert copy.read_bytes() == original


def test_whole_file_problems_raise_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ip.csv"
    for content in (b"", b"filename;rel_filepath\n",
                    (IN_PROGRESS_HEADER + ";generation").encode()):
        path.write_bytes(content)
        with pytest.raises(R.RegistryFormatError, match=str(path)):
            R.InProgressTable(path)


def test_tolerated_variants(tmp_path: Path) -> None:
    path = tmp_path / "ip.csv"
    for text in (f"sep=;\n{IN_PROGRESS_HEADER}\n{ROW}\n",
                 f"\ufeff{IN_PROGRESS_HEADER}\r\n{ROW}\r\n\r\n"):
        path.write_text(text, encoding="utf-8", newline="")
        table = R.InProgressTable(path)
        assert [r.filename for r in table.rows()] == ["ok.txt"] and table.issues == []


def test_bad_part_is_left_unmerged_and_bad_lines_preserved(tmp_path: Path) -> None:
    good = R.ProcessedTable(tmp_path, "t", "g", "w1")
    good.add(proc_row("a"))
    good.add(proc_row("b"))
    good.save()
    text = good.path.read_text().replace("'sub/b'", "'sub/b';'x'")
    good.path.write_text(text)
    broken = R.processed_part_path(tmp_path, "t", "g", "w2", 1)
    broken.write_text("not;a;registry")
    result = R.consolidate(tmp_path, "t", "g")
    assert result.n_added == 1 and result.merged == [good.path]
    assert {(i.path.name, i.line) for i in result.issues} == {
        (good.path.name, 3), (broken.name, None)}
    assert broken.exists() and len(list(tmp_path.glob("*.malformed"))) == 1


def test_stale_or_missing_sidecar_loses_only_extras(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    for name in ("a", "b", "c"):
        table.update(ip_row(name, generation=f"gen-{name}"))
    table.save()
    lines = table.path.read_text().split("\n")
    table.path.write_text("\n".join([lines[0], lines[3], lines[1]]))  # hand-edited
    rows = R.InProgressTable(tmp_path / "ip.csv").rows()
    assert [(r.filename, r.generation) for r in rows] == [("c", "gen-c"), ("a", "gen-a")]
    table.path.write_text("\n".join(lines + [lines[2].replace("'b'", "'d'", 1)]))
    reloaded = R.InProgressTable(tmp_path / "ip.csv")
    assert [r.generation for r in reloaded.rows()] == ["gen-a", "gen-b", "gen-c", ""]
    assert "1 row(s)" in str(reloaded.issues[-1])
    table.path.write_text("\n".join(lines))
    R.sidecar_path(table.path).unlink()
    reloaded = R.InProgressTable(tmp_path / "ip.csv")
    assert reloaded.issues == [] and {r.generation for r in reloaded.rows()} == {""}


def test_consolidation_appends_without_touching_existing_lines(tmp_path: Path) -> None:
    target = R.processed_path(tmp_path, "t", "g")
    bad = "'old';'old';1;'Tue Mar 05, 2024 at 07:08:09';'garbage'"
    target.write_text(f"{PROCESSED_HEADER}\n{bad}\n")
    worker = R.ProcessedTable(tmp_path, "t", "g", "w")
    worker.add(proc_row("new", "h"))
    worker.save()
    expected_line = worker.path.read_text().split("\n")[1]
    assert R.consolidate(tmp_path, "t", "g").n_added == 1
    assert target.read_text() == f"{PROCESSED_HEADER}\n{bad}\n{expected_line}"
    result = R.read_processed(tmp_path, "t", "g")
    assert [(r.filename, r.generation) for r in result.rows] == [("new", "h")]
    assert [issue.line for issue in result.issues] == [2]


def test_consolidation_refuses_a_target_with_another_header(tmp_path: Path) -> None:
    target = R.processed_path(tmp_path, "t", "g")
    target.write_text(IN_PROGRESS_HEADER)
    worker = R.ProcessedTable(tmp_path, "t", "g", "w")
    worker.add(proc_row())
    worker.save()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(R.RegistryFormatError, match="processed_from_t_by_g.csv:1"):
        R.consolidate(tmp_path, "t", "g")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_processed_file_takes_another_programs_row_of_its_path_with_it(tmp_path: Path) -> None:
    table = R.InProgressTable(tmp_path / "ip.csv")
    for row in (ip_row("y.dat"), ip_row("y.dat", "g1"), ip_row("y.dat", "g2"),
                ip_row("other.dat")):
        table.update(row)
    table.remove_processed(R.RowKey(PurePosixPath("sub/y.dat"), "g1"))
    assert sorted((r.filename, r.generation) for r in table.rows()) == [
        ("other.dat", ""), ("y.dat", "g2")]
