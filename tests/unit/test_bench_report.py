"""``make bench --merge``: sections of scenarios not re-run survive, in scenario order."""

from __future__ import annotations

from benchmarks.bench_report import Section, merged_sections, write_report


def _section(number: int, value: str, provenance: str) -> Section:
    return Section(f"{number}. scenario {number}", "what", ["metric"], [[value]],
                   headline=[value], number=number, provenance=provenance)


def test_merge_keeps_the_scenarios_not_run_now(tmp_path):
    report = tmp_path / "benchmarks.md"
    first = [_section(1, "one-old", "run A"), _section(4, "four-old", "run A")]
    write_report(report, first, [("CPU", "2")], "run A", False, 0.0)
    fresh = [_section(4, "four-new", "run B")]
    merged = merged_sections(report, fresh)
    assert [(s.number, s.rows[0][0]) for s in merged] == [(1, "one-old"), (4, "four-new")]
    write_report(report, merged, [("CPU", "2")], "run B", False, 0.0)
    text = report.read_text()
    assert "one-old" in text and "four-new" in text and "four-old" not in text
    assert "several invocations" in text and "Measured by run A." in text


def test_without_an_earlier_report_only_the_fresh_sections_remain(tmp_path):
    fresh = [_section(2, "two", "run")]
    assert merged_sections(tmp_path / "none.md", fresh) == fresh


def test_the_startup_timeline_is_read_from_the_last_line_with_the_first_file():
    """Scenario 8: with a Prefect server the line logged when the flow run takes the
    run over (after the first file) adds the flow run's marks."""
    from benchmarks.scenario_startup import parse_timeline
    first = ("start-up: command line read at 0.33 s; first message read at 1.06 s; "
             "first file in Girder at 1.27 s")
    output = "\n".join([f"INFO girder_upload_stream.startup: {first}",
                        "12:00:00.000 | INFO    | Flow run 'x' - Beginning flow run",
                        f"INFO girder_upload_stream.startup: {first}; Prefect imported at "
                        "3.10 s; flow run started at 3.40 s; flow run attached at 3.45 s  "])
    assert parse_timeline(output) == {
        "command line read": 0.33, "first message read": 1.06, "first file in Girder": 1.27,
        "Prefect imported": 3.1, "flow run started": 3.4, "flow run attached": 3.45}
    assert parse_timeline(output.split("\n")[0]) == {
        "command line read": 0.33, "first message read": 1.06, "first file in Girder": 1.27}
    assert parse_timeline("start-up: first message read at 1.06 s") == {}
