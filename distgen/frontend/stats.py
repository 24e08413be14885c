"""What one engine step did, as seen from the front end, for the metrics loggers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from distgen.engine_core.messages import SchedulerStatsMsg

logger = logging.getLogger("distgen")


@dataclass
class IterationStats:
    num_prompt_tokens: int = 0  # prompts of the requests that got their first token in this step
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    e2e_latencies: list[float] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # one per finished sequence


class StatLogger(Protocol):
    def record(self, scheduler: SchedulerStatsMsg | None, iteration: IterationStats) -> None: ...


class LoggingStatLogger:
    """One INFO line of engine stats every ``interval_s`` while there is work, as vLLM's server logs
    (``--disable-log-stats`` turns it off): throughput since the last line, the queues, the KV cache."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._since = clock()
        self._prompt_tokens = self._generation_tokens = 0
        self._last = SchedulerStatsMsg(0, 0, 0.0, 0, 0, 0)  # the scheduler, as last reported
        self._logged_idle = True  # an idle engine logs one line, then nothing until work comes

    def record(self, scheduler: SchedulerStatsMsg | None, iteration: IterationStats) -> None:
        self._prompt_tokens += iteration.num_prompt_tokens
        self._generation_tokens += iteration.num_generation_tokens
        if scheduler is not None:
            self._last = scheduler
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self.interval_s:
            return
        s = self._last
        busy = bool(self._prompt_tokens or self._generation_tokens or s.num_running or s.num_waiting)
        if busy or not self._logged_idle:
            hit = 100.0 * s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
            logger.info(
                "engine: prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                "KV cache %.1f%%, prefix cache hits %.1f%%, preemptions %d",
                self._prompt_tokens / elapsed,
                self._generation_tokens / elapsed,
                s.num_running,
                s.num_waiting,
                100.0 * s.kv_cache_usage,
                hit,
                s.num_preemptions,
            )
        self._logged_idle = not busy
        self._since, self._prompt_tokens, self._generation_tokens = now, 0, 0
