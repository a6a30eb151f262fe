"""Unit tests of how --memory_budget_mb is shared out (memory_plan.py) and of the
librdkafka settings derived from it (setdefault: a config file's values win)."""

from __future__ import annotations

import pytest

from girder_upload_stream import memory_plan
from girder_upload_stream.girder.store import UPLOAD_BLOCK_BYTES
from girder_upload_stream.girder.streaming import SEND_SLOTS, STREAM_BLOCK
from girder_upload_stream.loop.wiring import kafka_settings
from girder_upload_stream.memory_plan import plan_memory

MIB = 1 << 20


def test_the_block_sizes_it_counts_are_the_ones_the_code_uses() -> None:
    assert memory_plan.UPLOAD_BLOCK == UPLOAD_BLOCK_BYTES
    assert memory_plan.STREAM_BLOCK == STREAM_BLOCK
    assert memory_plan.SEND_SLOTS == SEND_SLOTS


def test_a_default_budget_keeps_librdkafkas_big_fetches_and_gives_files_the_rest() -> None:
    plan = plan_memory(1024 * MIB, n_threads=2)
    assert plan.consumer_defaults() == {"queued.max.messages.kbytes": str(64 * 1024),
                                        "fetch.message.max.bytes": str(8 * MIB)}
    assert plan.poll_bytes == 32 * MIB and plan.upload_bytes == 32 * MIB
    assert plan.stream_bytes == 16 * MIB
    assert plan.files_bytes == (1024 - 128 - 32 - 32 - 16) * MIB


def test_a_small_budget_shrinks_the_prefetch_and_the_poll_batch() -> None:
    plan = plan_memory(256 * MIB, n_threads=2)
    assert plan.queue_bytes == 16 * MIB and plan.fetch_partition_bytes == 2 * MIB
    assert plan.poll_bytes == 16 * MIB
    assert plan.files_bytes == (256 - 32 - 16 - 32 - 16) * MIB


def test_a_huge_budget_caps_the_prefetch_at_librdkafkas_defaults() -> None:
    plan = plan_memory(64 << 30, n_threads=4)
    assert plan.queue_bytes == 64 * MIB and plan.fetch_partition_bytes == 8 * MIB
    assert plan.poll_bytes == 32 * MIB and plan.upload_bytes == 64 * MIB


@pytest.mark.parametrize("budget_mib", [1, 16, 64, 128, 200, 256, 512, 1024, 4096])
@pytest.mark.parametrize("n_threads", [1, 2, 8])
@pytest.mark.parametrize("streaming", [True, False])
def test_every_share_is_positive_and_files_get_at_least_a_quarter(
        budget_mib: int, n_threads: int, streaming: bool) -> None:
    budget = budget_mib * MIB
    plan = plan_memory(budget, n_threads, streaming)
    assert plan.files_bytes >= budget // 4
    assert 4 * MIB <= plan.queue_bytes <= 64 * MIB and plan.queue_bytes % 1024 == 0
    assert 1 * MIB <= plan.fetch_partition_bytes <= 8 * MIB
    # One fetch response (capped at the queue) serves eight partitions alike.
    assert plan.fetch_partition_bytes * 8 <= max(plan.queue_bytes, 8 * MIB)
    assert 1 * MIB <= plan.poll_bytes <= 32 * MIB
    shares = (plan.prefetch_bytes + plan.poll_bytes + plan.upload_bytes + plan.stream_bytes)
    if plan.files_bytes > budget // 4:  # the budget holds the blocks: they add up to it
        assert shares + plan.files_bytes == budget
    assert (plan.stream_bytes > 0) is streaming


def test_the_files_share_grows_with_the_budget() -> None:
    shares = [plan_memory(m * MIB, 2).files_bytes for m in range(16, 4096, 16)]
    assert shares == sorted(shares)


def _config(tmp_path, consumer_lines: str) -> str:
    path = tmp_path / "c.config"
    path.write_text("[broker]\nbootstrap.servers = localhost:1\n\n[consumer]\n"
                    "group.id = g\nenable.auto.commit = False\n" + consumer_lines)
    return str(path)


def test_the_consumer_gets_the_plans_settings_unless_its_config_file_sets_them(tmp_path) -> None:
    plan = plan_memory(256 * MIB, 2)
    derived = kafka_settings(_config(tmp_path, ""), "t", "g", 2, memory=plan).consumer
    assert derived["queued.max.messages.kbytes"] == str(16 * 1024)
    assert derived["fetch.message.max.bytes"] == str(2 * MIB)
    mine = kafka_settings(_config(tmp_path, "queued.max.messages.kbytes = 1000\n"
                                            "fetch.message.max.bytes = 2000000\n"),
                          "t", "g", 2, memory=plan).consumer
    assert mine["queued.max.messages.kbytes"] == "1000"
    assert mine["fetch.message.max.bytes"] == "2000000"


def test_the_consumer_refills_its_queue_at_once_unless_its_config_file_says_otherwise(
        tmp_path) -> None:
    """librdkafka's 1 s fetch.queue.backoff.ms throttled a consumer whose queue was
    full to about one queue per second (issue 22 §3): the default is 10 ms."""
    derived = kafka_settings(_config(tmp_path, ""), "t", "g", 2).consumer
    assert derived["fetch.queue.backoff.ms"] == "10"
    mine = kafka_settings(_config(tmp_path, "fetch.queue.backoff.ms = 500\n"), "t", "g",
                          2).consumer
    assert mine["fetch.queue.backoff.ms"] == "500"


def test_tune_malloc_says_no_without_a_libc() -> None:
    assert memory_plan.tune_malloc("/nonexistent/libc.so") is False
