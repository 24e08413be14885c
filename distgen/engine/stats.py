"""What one engine step did, as seen from the front end, for the metrics loggers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from distgen.engine.messages import SchedulerStatsMsg


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
