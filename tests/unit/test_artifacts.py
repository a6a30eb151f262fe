"""Unit tests for the Prefect artifacts of a run (girder_upload_stream.registry.artifact_content and
girder_upload_stream.prefect_glue.artifacts): keys, table rows, progress, the end-of-run markdown,
the fallback parsing and the publisher's throttling, with a fake publish function and
no Prefect server."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest

from girder_upload_stream.prefect_glue import artifacts as A
from girder_upload_stream.registry import tables as R
from girder_upload_stream.registry.artifact_content import (
    IN_PROGRESS_LIMIT, RECENT_UPLOADS_LIMIT, RunFacts, artifact_keys, fallback_keys,
    in_progress_table, key_slug, progress_description, progress_percent,
    recent_uploads_table, summary_markdown)
from girder_upload_stream.ledger.processor import Counters
from girder_upload_stream.registry.recording import RegistryRecorder

KEY_RE = re.compile(r"^[a-z0-9-]+$")
T0 = datetime(2024, 6, 3, 14, 5, 9)


def ip_row(rel: str, status: str = R.STATUS_IN_PROGRESS, reason: str | None = None,
           generation: str = "g" * 32) -> R.InProgressRow:
    return R.InProgressRow(PurePosixPath(rel).name, rel, status, 3, T0, T0 + timedelta(1),
                           generation, {"reason": reason} if reason else {})


def proc_row(i: int, rel: str | None = None) -> R.ProcessedRow:
    return R.ProcessedRow(f"f{i}.bin", rel or f"dir/f{i}.bin", 2, T0,
                          T0 + timedelta(seconds=i), f"{i:032x}",
                          {"outcome": "uploaded", "sha256": f"{i:064x}", "item_id": f"id{i}"})


# ----------------------------------------------------------------------------- keys

@pytest.mark.parametrize("topic, group", [
    ("test", "create_new"), ("XRD.Lab_1", "Équipe Ünï 日本"), ("a" * 249, "g" * 300),
    ("...", "___"), ("t", ""), ("日本", "東京")])
def test_keys_are_valid_stable_and_distinct(topic, group):
    keys = artifact_keys(topic, group)
    assert keys == artifact_keys(topic, group)  # stable across calls (and processes)
    assert len(set(keys)) == 4
    for key in keys:
        assert KEY_RE.match(key), key
        assert key.startswith("gus-") and "--" not in key and len(key) < 80, key
    assert keys.in_progress.endswith("-in-progress")
    assert keys.recent_uploads.endswith("-recent-uploads")
    assert keys.progress.endswith("-progress") and keys.summary.endswith("-summary")


def test_keys_are_readable():
    keys = artifact_keys("XRD.Lab_1", "Équipe-2")
    assert re.fullmatch(r"gus-xrd-lab-1-equipe-2-[0-9a-f]{8}-in-progress", keys.in_progress)
    assert key_slug("  Été / 2024 ") == "ete-2024"
    assert key_slug("日本") == ""  # nothing readable: the key is prefix and hash alone
    assert re.fullmatch(r"gus-[0-9a-f]{8}-summary", artifact_keys("日本", "東京").summary)


def test_keys_of_names_sharing_a_slug_differ():
    # Same slug, different exact names: the hash keeps them apart.
    pairs = [("a.b", "g"), ("a_b", "g"), ("a-b", "g"), ("A.B", "g"), ("a", "b-g"),
             ("a-b", "-g"), ("x" * 60, "1"), ("x" * 60, "2"), ("t", "g\x00"), ("t", "g")]
    assert len({key_slug(f"{t}-{g}") for t, g in pairs}) < len(pairs)
    assert len({artifact_keys(t, g).in_progress for t, g in pairs}) == len(pairs)


def test_no_separator_can_be_forged():
    # topic "a" + group "b-c" vs topic "a-b" + group "c": same joined text, other keys.
    assert artifact_keys("a", "b-c") != artifact_keys("a-b", "c")
    assert artifact_keys("a\", \"b", "c") != artifact_keys("a", "b\", \"c")


# ----------------------------------------------------------------------------- tables

def test_in_progress_table_rows_failed_first_with_reason():
    rows = [ip_row("sub/a.dat"), ip_row("sub/b.dat", R.STATUS_FAILED, "failed_terminal: 403"),
            ip_row("c.dat"), ip_row("d.dat", R.STATUS_MISMATCHED_HASH, "hash mismatch")]
    table = in_progress_table(rows)
    assert [r["rel_filepath"] for r in table] == ["sub/b.dat", "d.dat", "sub/a.dat", "c.dat"]
    assert table[0] == {"filename": "b.dat", "rel_filepath": "sub/b.dat", "status": "failed",
                        "n_chunks": 3, "first_message": "2024-06-03 14:05:09",
                        "most_recent_message": "2024-06-04 14:05:09",
                        "generation": "g" * 32, "reason": "failed_terminal: 403"}
    assert table[2]["reason"] == ""
    json.dumps(table)  # what Prefect stores


def test_in_progress_table_is_capped():
    rows = [ip_row(f"x{i}") for i in range(IN_PROGRESS_LIMIT + 5)]
    rows.append(ip_row("bad", R.STATUS_FAILED, "why"))
    table = in_progress_table(rows)
    assert len(table) == IN_PROGRESS_LIMIT and table[0]["rel_filepath"] == "bad"


def test_recent_uploads_table_newest_first_and_limited():
    rows = [proc_row(i) for i in range(RECENT_UPLOADS_LIMIT + 50)]
    table = recent_uploads_table(rows)
    assert len(table) == RECENT_UPLOADS_LIMIT
    newest = RECENT_UPLOADS_LIMIT + 49
    assert table[0] == {"filename": f"f{newest}.bin", "rel_filepath": f"dir/f{newest}.bin",
                        "n_chunks": 2, "first_message": "2024-06-03 14:05:09",
                        "processed_at": (T0 + timedelta(seconds=newest)).isoformat(sep=" "),
                        "generation": f"{newest:032x}", "outcome": "uploaded",
                        "sha256": f"{newest:064x}", "item_id": f"id{newest}"}
    assert table[-1]["filename"] == "f50.bin"
    assert recent_uploads_table(rows, limit=0) == [] and recent_uploads_table([]) == []
    plain = R.ProcessedRow("o.txt", "o.txt", 1, T0, T0)  # an OpenMSIStream row: no extras
    assert recent_uploads_table([plain])[0]["outcome"] == ""
    json.dumps(table)


# ----------------------------------------------------------------------------- fallback

def test_fallback_keys_round_trip_through_json():
    rows = [proc_row(i) for i in range(5)] + [proc_row(9, rel="é/日本 (1).bin")]
    data = json.dumps(recent_uploads_table(rows))  # as Prefect stores a table
    assert fallback_keys(data) == {(str(r.rel_filepath), r.generation) for r in rows}
    assert fallback_keys(json.loads(data)) == fallback_keys(data)


@pytest.mark.parametrize("data", [None, "", "not json", "[1, 2]", "{}", 42, "null",
                                  '[{"rel_filepath": "a"}]',
                                  '[{"rel_filepath": "a", "generation": ""}]',
                                  '[{"rel_filepath": 3, "generation": "x"}]'])
def test_fallback_keys_of_odd_data_is_empty(data):
    assert fallback_keys(data) == set()


def test_fallback_keys_of_a_column_table():
    assert fallback_keys({"rel_filepath": ["a", "b"], "generation": ["1", "2"]}) == \
        {("a", "1"), ("b", "2")}


# ----------------------------------------------------------------------------- progress

@pytest.mark.parametrize("read, lag, expected", [
    (0, 0, 100.0), (10, 0, 100.0), (50, 50, 50.0), (1, 2, 33.3), (99_999, 1, 99.9),
    (0, 10, 0.0), (10, None, None), (10, -1, None)])
def test_progress_percent(read, lag, expected):
    assert progress_percent(read, lag) == expected


def test_progress_description():
    counters = {"messages_read": 1234, "files_uploaded": 5, "files_skipped": 1,
                "files_failed": 0}
    text = progress_description("t", "g", counters, 10)
    assert "1,234 message(s) read" in text and "10 message(s) behind" in text
    assert "uploaded 5, skipped 1, failed 0" in text
    assert "lag unknown" in progress_description("t", "g", counters, None)


# ----------------------------------------------------------------------------- markdown

def facts(**kw) -> RunFacts:
    base = dict(topic="lab", group="uploader", counters={"messages_read": 12, "bytes_read": 5000,
                "files_uploaded": 3, "files_skipped": 1, "files_failed": 1,
                "messages_rejected": 2}, pending_messages=4, elapsed_seconds=12.34,
                registry_folder="/data/out/LOGS",
                registry_files=("consuming_from_lab_by_uploader_in_progress.csv",
                                "processed_from_lab_by_uploader.csv"),
                host="node-1", stopped_because="no new message for 3s")
    base.update(kw)
    return RunFacts(**base)


def test_summary_markdown_content():
    rows = [ip_row("sub/bad.bin", R.STATUS_FAILED, "failed_terminal: 403 Forbidden"),
            ip_row("h.bin", R.STATUS_MISMATCHED_HASH, "sha512 mismatch"), ip_row("wip.bin")]
    text = summary_markdown(facts(), rows)
    assert text.startswith("# girder-upload-stream: lab by uploader\n")
    assert "Stopped: no new message for 3s. Ran 12.3 s." in text
    for line in ("| messages read | 12 |", "| bytes read | 5,000 |", "| files uploaded | 3 |",
                 "| files skipped (already in Girder) | 1 |", "| files failed | 1 |",
                 "| messages rejected | 2 |",
                 "| pending messages (read again by the next run) | 4 |",
                 "## Failed files: 2",
                 "| sub/bad.bin | failed | failed\\_terminal: 403 Forbidden |",
                 "| h.bin | mismatched\\_hash | sha512 mismatch |",
                 "1 file(s) still incomplete", "In `/data/out/LOGS` on host `node-1`:",
                 "* `consuming_from_lab_by_uploader_in_progress.csv`",
                 "* `processed_from_lab_by_uploader.csv`"):
        assert line in text, (line, text)
    assert "wip.bin" not in text


def test_summary_markdown_labels_counters_it_does_not_know():
    text = summary_markdown(facts(counters={"files_found_in_girder": 2, "new_thing_seen": 1}))
    assert "| files found in Girder when read again | 2 |" in text
    assert "| new thing seen | 1 |" in text


def test_summary_markdown_without_failures_or_reason():
    text = summary_markdown(facts(stopped_because="", host=""), [])
    assert "## Failed files: 0\n\nNone." in text and "Stopped" not in text
    assert "still incomplete" not in text and "on host" not in text


def test_summary_markdown_escapes_hostile_names():
    rows = [ip_row("a|b\n<script>x</script>*y*.txt", R.STATUS_FAILED, "bad | [link](http://x)")]
    text = summary_markdown(facts(topic="t|<b>"), rows, max_failed=5)
    assert "<script>" not in text and "<b>" not in text
    failed_line = next(line for line in text.splitlines() if "script" in line)
    assert failed_line.count(" | ") == 2 + 0 and "\\|" in failed_line  # still 3 cells
    assert "\\[link\\]" in failed_line


def test_summary_markdown_caps_the_failed_list():
    rows = [ip_row(f"f{i}", R.STATUS_FAILED, "r") for i in range(7)]
    text = summary_markdown(facts(), rows, max_failed=3)
    assert "| f2 |" in text and "| f3 |" not in text and "... and 4 more" in text


# ----------------------------------------------------------------------------- publisher

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePublish:
    def __init__(self) -> None:
        self.calls: list[A.Publication] = []
        self.fail = False

    def __call__(self, pub: A.Publication):
        if self.fail:
            raise ConnectionError("Prefect API down")
        self.calls.append(pub)
        return f"id-{len(self.calls)}"

    def of(self, key: str) -> list[A.Publication]:
        return [c for c in self.calls if c.key == key]


def make_runner(lag: list | None = None) -> SimpleNamespace:
    """A runner whose group's lag() returns ``lag[0]`` (no lag() at all without ``lag``)."""
    group = SimpleNamespace() if lag is None else SimpleNamespace(lag=lambda: lag[0])
    processor = SimpleNamespace(counters=Counters(),
                                offsets=SimpleNamespace(pending_count=lambda: 0))
    return SimpleNamespace(processor=processor, group=group, summary=None)


@pytest.fixture
def setup(tmp_path: Path):
    recorder = RegistryRecorder(tmp_path / "LOGS", "topic", "group")
    clock, publish = Clock(), FakePublish()
    publisher = A.ArtifactPublisher(recorder, "topic", "group", interval_seconds=30,
                                    progress_interval_seconds=5, publish=publish,
                                    active=lambda: True, clock=clock)
    return SimpleNamespace(recorder=recorder, clock=clock, publish=publish, pub=publisher,
                           keys=artifact_keys("topic", "group"))


def test_publisher_throttles_and_publishes_only_changes(setup):
    s = setup
    runner = make_runner(lag=[100])
    s.pub.tick(runner)  # first tick: the progress artifact is created, no table yet
    assert [(c.kind, c.key, c.data, c.artifact_id) for c in s.publish.calls] == \
        [("progress", s.keys.progress, 0.0, None)]
    for _ in range(50):  # many rounds of the loop within the intervals: nothing
        s.clock.now += 0.05
        s.pub.tick(runner)
    assert len(s.publish.calls) == 1

    s.recorder.in_progress.update(ip_row("a.bin"))
    s.clock.now += 30
    s.pub.tick(runner)
    tables = [c for c in s.publish.calls if c.kind == "table"]
    assert [c.key for c in tables] == [s.keys.in_progress]  # no upload yet: no recent table
    assert tables[0].data[0]["rel_filepath"] == "a.bin"

    s.clock.now += 30  # nothing changed: no new version (progress unchanged either)
    n = len(s.publish.calls)
    s.pub.tick(runner)
    assert len(s.publish.calls) == n

    s.recorder.processed.add(proc_row(1))
    s.recorder.in_progress.remove(R.RowKey(PurePosixPath("a.bin"), "g" * 32))
    s.clock.now += 10  # changed, but within the interval
    s.pub.tick(runner)
    assert not s.publish.of(s.keys.recent_uploads)
    s.clock.now += 20
    s.pub.tick(runner)
    assert s.publish.of(s.keys.in_progress)[-1].data == []
    assert [r["rel_filepath"] for r in s.publish.of(s.keys.recent_uploads)[-1].data] == \
        ["dir/f1.bin"]
    assert s.pub.publications == len(s.publish.calls)


def test_a_new_failure_shows_before_the_table_interval(setup):
    """Failures are what someone opens the UI for: a file that gets a reason is in the
    in-progress artifact within FAILURES_CHECK_SECONDS; files merely arriving are not."""
    s = setup
    runner = make_runner(lag=[0])
    s.pub.tick(runner)
    s.recorder.in_progress.update(ip_row("arriving.bin"))  # no reason: waits for the interval
    s.clock.now += A.FAILURES_CHECK_SECONDS
    s.pub.tick(runner)
    assert not s.publish.of(s.keys.in_progress)
    s.recorder.in_progress.update(ip_row("bad.bin", reason="failed_transient: Girder unreachable"))
    s.clock.now += A.FAILURES_CHECK_SECONDS
    s.pub.tick(runner)
    [published] = s.publish.of(s.keys.in_progress)
    assert {r["rel_filepath"]: r["reason"] for r in published.data}["bad.bin"] == \
        "failed_transient: Girder unreachable"
    s.clock.now += A.FAILURES_CHECK_SECONDS  # the same failure again: no new version
    s.pub.tick(runner)
    assert len(s.publish.of(s.keys.in_progress)) == 1
    assert A.FAILURES_CHECK_SECONDS < 30  # sooner than the table interval of this setup


def test_publisher_progress_updates_in_place(setup):
    s = setup
    lag = [100]
    runner = make_runner(lag=lag)
    runner.processor.counters.messages_read = 100
    s.pub.tick(runner)
    s.clock.now += 1
    runner.processor.counters.messages_read = 300
    lag[0] = 0
    s.pub.tick(runner)  # within the progress interval: not yet
    s.clock.now += 5
    s.pub.tick(runner)
    progress = s.publish.of(s.keys.progress)
    assert [(p.data, p.artifact_id) for p in progress] == [(50.0, None), (100.0, "id-1")]
    assert "300 message(s) read" in progress[-1].description


def test_publisher_keeps_the_last_progress_when_lag_is_unknown(setup):
    s = setup
    lag = [10]
    runner = make_runner(lag=lag)
    runner.processor.counters.messages_read = 30
    s.pub.tick(runner)
    lag[0] = None
    runner.processor.counters.messages_read = 40
    s.clock.now += 5
    s.pub.tick(runner)
    progress = s.publish.of(s.keys.progress)
    assert [p.data for p in progress] == [75.0, 75.0]
    assert "40 message(s) read, lag unknown" in progress[-1].description


@pytest.mark.parametrize("group", [SimpleNamespace(), SimpleNamespace(lag=None),
                                   SimpleNamespace(lag=lambda: 1 / 0),
                                   SimpleNamespace(lag=lambda: "many")])
def test_publisher_without_a_usable_lag(setup, group):
    s = setup
    runner = make_runner()
    runner.group = group
    runner.processor.counters.messages_read = 7
    s.pub.tick(runner)
    s.pub.tick(runner, final=True)
    progress = s.publish.of(s.keys.progress)
    assert progress[0].data == 0.0 and "7 message(s) read, lag unknown" in progress[0].description
    assert s.publish.of(s.keys.summary)


def test_final_tick_publishes_everything_at_once(setup):
    s = setup
    runner = make_runner(lag=[0])
    s.recorder.in_progress.update(ip_row("sub/bad.bin", R.STATUS_FAILED, "failed_terminal: 403"))
    for i in range(3):
        s.recorder.processed.add(proc_row(i))
    runner.processor.counters.messages_read = 6
    runner.processor.counters.files_uploaded = 3
    runner.stopping_reason = "stop requested"
    s.pub.tick(runner, final=True)  # immediately, ignoring the intervals
    kinds = {c.key: c.kind for c in s.publish.calls}
    assert kinds == {s.keys.progress: "progress", s.keys.in_progress: "table",
                     s.keys.recent_uploads: "table", s.keys.summary: "markdown"}
    assert s.publish.of(s.keys.progress)[0].data == 100.0
    summary = s.publish.of(s.keys.summary)[0].data
    assert "| files uploaded | 3 |" in summary and "sub/bad.bin" in summary
    assert "Stopped: stop requested." in summary
    assert str((s.recorder.folder).resolve()) in summary
    assert "processed_from_topic_by_group.csv" in summary


def test_final_tick_with_nothing_processed_keeps_the_previous_recent_uploads(setup):
    s = setup
    s.pub.tick(make_runner(lag=[0]), final=True)
    assert not s.publish.of(s.keys.recent_uploads)  # an empty table would hide the fallback
    assert s.publish.of(s.keys.in_progress)[0].data == []


def test_publisher_never_raises_and_backs_off(setup, caplog):
    s = setup
    runner = make_runner(lag=[5])
    s.publish.fail = True
    s.pub.tick(runner)
    assert "could not publish the Prefect artifacts" in caplog.text
    s.clock.now += 29  # within the back-off: no attempt
    s.pub.tick(runner)
    assert caplog.text.count("could not publish") == 1
    s.clock.now += 1
    s.pub.tick(runner)  # second failure: the wait doubles
    assert caplog.text.count("could not publish") == 2 and "next attempt in 60 s" in caplog.text
    s.publish.fail = False
    s.clock.now += 60
    s.pub.tick(runner)
    assert [c.kind for c in s.publish.calls] == ["progress", "table"]
    s.publish.fail = True
    s.pub.tick(runner, final=True)  # a failure at the end is logged too, not raised
    assert caplog.text.count("could not publish") == 3


def test_backoff_is_capped(setup):
    s = setup
    s.publish.fail = True
    for _ in range(12):
        s.pub.tick(make_runner())
        s.clock.now += A.MAX_BACKOFF_SECONDS
    assert s.pub._tables_at - s.clock.now <= 0


def test_publisher_outside_a_flow_run_does_nothing(tmp_path):
    recorder = RegistryRecorder(tmp_path, "t", "g")
    publish, checks = FakePublish(), []
    publisher = A.ArtifactPublisher(recorder, "t", "g", publish=publish,
                                    active=lambda: checks.append(1) or False)
    for final in (False, False, True):
        publisher.tick(make_runner(lag=[0]), final=final)
    assert publish.calls == [] and checks == [1]  # asked once, remembered


def test_default_activity_check_is_false_without_prefect_context(tmp_path):
    assert A.in_flow_run() is False
    publisher = A.ArtifactPublisher(RegistryRecorder(tmp_path, "t", "g"), "t", "g",
                                    publish=FakePublish())
    publisher.tick(make_runner(lag=[0]), final=True)
    assert publisher.publications == 0


def test_recent_window_spans_part_rollovers(tmp_path):
    table = R.ProcessedTable(tmp_path, "t", "g", "w", max_rows=3)
    window = A._RecentWindow(limit=5)
    for i in range(2):
        table.add(proc_row(i))
    window.update(table)
    for i in range(2, 7):  # rolls over to part 2 at the 4th row
        table.add(proc_row(i))
        window.update(table)
    window.update(table)  # nothing new: no duplicates
    assert [r.filename for r in window.rows()] == [f"f{i}.bin" for i in range(2, 7)]


def test_load_registry_fallback_with_the_api_unreachable(caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert A.load_registry_fallback("t", "g") == set()
    assert "could not read the Prefect artifact" in caplog.text
