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
