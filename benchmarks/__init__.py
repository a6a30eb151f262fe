"""Side-by-side benchmarks of girder-upload-stream (issue 6), outside the test suite.

``make bench`` (``python -m benchmarks.run_all``) runs every scenario against the local
stack and writes ``docs/benchmarks.md``. Each consumer under test runs as its own
process, exactly as a user would start it:

* ours: ``.venv/bin/girder-upload-stream run`` (the Prefect flow, reporting to the
  stack's Prefect server);
* OpenMSIStream 1.8.8: ``.venv-openmsistream/bin/GirderUploadStreamProcessor``, run
  only as a black box through its console script;
* "the limit": :mod:`benchmarks.girder_limit`, girder-client uploading the same files
  straight from local disk with the same concurrency, no Kafka at all.

Modules: :mod:`~benchmarks.bench_common` (stack, processes, RSS, stats),
:mod:`~benchmarks.bench_girder` (Girder and Kafka look-ups, completion timing),
:mod:`~benchmarks.bench_data` (deterministic test data), :mod:`~benchmarks.bench_systems`
(starting the three systems, one timed run), :mod:`~benchmarks.count_proxy` (Girder
request counting), :mod:`~benchmarks.bench_report` (machine facts, Markdown), and one
module per scenario group (``scenario_*``). ``flow_bench.py`` and
``reassembly_bench.py`` are older stand-alone scripts, kept as they are.
"""

__all__: list[str] = []
