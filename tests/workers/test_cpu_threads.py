"""The CPU workers' thread plan: one thread per physical core, an equal share per worker of a machine,
explicit lists honoured and bad ones named; applied, it pins the process and sets torch's threads."""

from __future__ import annotations

import os

import pytest
import torch

from distgen.config import ParallelConfig
from distgen.workers import cpu_threads


def test_auto_splits_the_cores_between_the_workers(monkeypatch):
    monkeypatch.setattr(cpu_threads, "physical_cores", lambda cpus: [c for c in sorted(cpus) if c % 2 == 0])
    available = list(range(16))  # 8 cores with two SMT threads each: 0/1, 2/3, ...
    assert cpu_threads.plan("auto", 0, 1, available) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert cpu_threads.plan("auto", 0, 2, available) == [0, 2, 4, 6]
    assert cpu_threads.plan("auto", 1, 2, available) == [8, 10, 12, 14]
    assert cpu_threads.plan("auto", 2, 3, available) == [8, 10]  # 8 // 3 = 2 cores each
    assert cpu_threads.plan("auto", 0, 10, available) is None  # more workers than cores: see configure


def test_explicit_lists_and_nobind():
    assert cpu_threads.plan("nobind", 0, 1, [0, 1]) is None
    assert cpu_threads.plan("0-1,3|4-5", 0, 2, list(range(8))) == [0, 1, 3]
    assert cpu_threads.plan("0-1,3|4-5", 1, 2, list(range(8))) == [4, 5]
    with pytest.raises(ValueError, match="lists 2 CPU sets for 3 workers"):
        cpu_threads.plan("0|1", 0, 3, [0, 1])
    with pytest.raises(ValueError, match=r"CPUs \[9\] are not available"):
        cpu_threads.plan("8-9", 0, 1, list(range(9)))
    with pytest.raises(ValueError, match="'3-1' .* is not a CPU number"):
        cpu_threads.plan("3-1", 0, 1, list(range(4)))
    with pytest.raises(ValueError, match="cpu_omp_threads_bind must be 'auto', 'nobind' or CPU lists"):
        ParallelConfig(cpu_omp_threads_bind="all of them")


def test_physical_cores_of_this_machine_are_a_subset():
    cpus = sorted(os.sched_getaffinity(0))
    cores = cpu_threads.physical_cores(cpus)
    assert cores and set(cores) <= set(cpus)


def test_configure_pins_this_process_and_sets_the_threads():
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    cpu = min(before)
    try:
        assert cpu_threads.configure(str(cpu), 0, 1) == [cpu]
        assert os.sched_getaffinity(0) == {cpu} and torch.get_num_threads() == 1
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def test_more_workers_than_cores_run_one_unpinned_thread_each():
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        assert cpu_threads.configure("auto", 0, 4 * len(before)) is None
        assert torch.get_num_threads() == 1 and os.sched_getaffinity(0) == before
    finally:
        torch.set_num_threads(threads)
