"""The server's periodic log line of engine stats (``LoggingStatLogger``), on a fake clock."""

from __future__ import annotations

import logging

from distgen.engine_core.messages import SchedulerStatsMsg
from distgen.frontend.stats import IterationStats, LoggingStatLogger


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sched(running: int, waiting: int = 0) -> SchedulerStatsMsg:
    return SchedulerStatsMsg(
        running, waiting, 0.25, prefix_cache_queries=200, prefix_cache_hits=50, num_preemptions=1
    )


def test_one_line_per_interval_while_busy_then_one_when_idle(caplog):
    clock = Clock()
    stats = LoggingStatLogger(interval_s=10.0, clock=clock)
    lines = lambda: [r.getMessage() for r in caplog.records if r.name == "distgen"]  # noqa: E731
    with caplog.at_level(logging.INFO, logger="distgen"):
        for _ in range(4):  # 2.5 s apart: the fourth step passes the interval
            clock.now += 2.5
            stats.record(_sched(3, 2), IterationStats(num_prompt_tokens=100, num_generation_tokens=10))
        assert lines() == [
            "engine: prompt 40.0 tok/s, generation 4.0 tok/s, running 3, waiting 2, KV cache 25.0%, "
            "prefix cache hits 25.0%, preemptions 1"
        ]
        clock.now += 5.0
        stats.record(_sched(3), IterationStats(num_generation_tokens=3))
        assert len(lines()) == 1  # within the next interval
        # The work ends: the next line says so, then an idle engine (stats scraped for /metrics) is quiet.
        for _ in range(3):
            clock.now += 10.0
            stats.record(_sched(0), IterationStats())
        assert len(lines()) == 3
        assert lines()[1].startswith("engine: prompt 0.0 tok/s, generation 0.2 tok/s, running 0, waiting 0")
        assert lines()[2].startswith("engine: prompt 0.0 tok/s, generation 0.0 tok/s, running 0, waiting 0")
        clock.now += 10.0
        stats.record(_sched(1), IterationStats(num_generation_tokens=5))
        assert len(lines()) == 4  # busy again
