"""The py-spy summary of benchmarks.profile_consumer: shares by library and inclusive."""

from __future__ import annotations

from benchmarks.profile_consumer import summarise


def test_summary_counts_each_function_once_per_stack():
    raw = "\n".join([
        "main (cli/main.py:1);step (/x/girder_upload_stream/loop/runner.py:5);"
        "add (/x/girder_upload_stream/assembly/reassembly.py:9) 30",
        "main (cli/main.py:1);post (/x/requests/api.py:3);main (cli/main.py:1) 10",
        "garbage line",
    ])
    text = summarise(raw, top=3)
    assert text.startswith("40 samples while busy")
    assert " 75.0%  ours (girder_upload_stream)" in text
    assert "100.0%  main (cli/main.py)" in text  # once, although twice in the second stack
    assert summarise("") == "no samples"
