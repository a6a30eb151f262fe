"""Who else used the machine during a run: a census of every process's CPU-seconds and of
the kernel's time, taken at the start and at the end of a run, from /proc.

On a shared machine (several engineers' test runs beside a benchmark) the machine's
busy share says little by itself: :func:`take` then :func:`spent` split what the cores
did over the run into the processes outside this benchmark's tree and outside the
stack's services (``others``), the kernel's own threads (``kernel threads``), the time
spent in interrupts (``interrupts``, charged to no process) and the time the hypervisor
took from this virtual machine (``steal``). It says how noisy a run was; it is not a
measurement of the run itself.
Each process counts with its own time only (not its reaped children's: a test runner
reaping a worker that ran for minutes would add all of them to a run of seconds), so
processes that start and end within the run are missed: a lower bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_common import tree_pids

__all__ = ["Census", "take", "spent"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_KTHREAD = 0x00200000  # PF_KTHREAD in /proc/<pid>/stat's flags


@dataclass(frozen=True)
class Census:
    """CPU-seconds so far: ``processes`` (their own) by (pid, start time) with a
    kernel-thread flag,
    and the machine's ``interrupts`` and ``steal`` (all cores)."""

    processes: dict[tuple[int, int], tuple[float, bool]]
    interrupts: float
    steal: float


def _process(pid: int) -> tuple[tuple[int, int], tuple[float, bool]] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the name: state(0) ppid(1) ... flags(6) ... utime(11) stime(12) ...
    # starttime(19); its reaped children's time (13, 14) is left out (see above)
    cpu = sum(int(f) for f in fields[11:13]) / _TICK
    return (pid, int(fields[19])), (cpu, bool(int(fields[6]) & _KTHREAD))


def take() -> Census:
    """Every live process's own CPU-seconds and the kernel's interrupt and steal time,
    now."""
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _process(int(entry))) is not None:
            processes[found[0]] = found[1]
    cpu = [int(f) / _TICK for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal
    return Census(processes, cpu[5] + cpu[6], cpu[7] if len(cpu) > 7 else 0.0)


def spent(before: Census, after: Census, ours: list[int]) -> dict[str, float]:
    """CPU-seconds between the two censuses, by whom: processes outside the trees of
    ``ours`` (this benchmark's process, the stack's services), kernel threads,
    interrupts and steal."""
    mine = {pid for root in ours for pid in tree_pids(root)}
    split = {"others": 0.0, "kernel threads": 0.0}
    for key, (cpu, kernel) in after.processes.items():
        if key[0] in mine:
            continue
        was = before.processes.get(key, (0.0, kernel))[0]
        split["kernel threads" if kernel else "others"] += max(0.0, cpu - was)
    split["interrupts"] = max(0.0, after.interrupts - before.interrupts)
    split["steal"] = max(0.0, after.steal - before.steal)
    return split
