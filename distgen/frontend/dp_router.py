"""How data parallelism picks a replica for each request and adds up the replicas' stats (the
front end's side: see dp_client.py)."""

from __future__ import annotations

from collections import OrderedDict

from distgen.engine_core.messages import EngineCoreRequest, SchedulerStatsMsg
from distgen.exceptions import EngineDeadError

PREFIX_HOMES = 4096  # first blocks remembered for tie-breaking; the least recently routed go first


class Router:
    """Which replica takes each request, and which replica holds each request in flight."""

    def __init__(self, size: int, block_size: int) -> None:
        self.load = [0] * size  # requests in flight (waiting or running) per replica
        self.live = [True] * size
        self.owner: dict[str, int] = {}
        self.block_size = block_size
        self._homes: OrderedDict[tuple[int, ...], int] = OrderedDict()

    def route(self, req: EngineCoreRequest) -> int:
        live = [r for r, ok in enumerate(self.live) if ok]
        if not live:
            raise EngineDeadError("the engine is dead: no data-parallel replica is left")
        least = min(self.load[r] for r in live)
        ties = [r for r in live if self.load[r] == least]
        key = tuple(req.prompt_token_ids[: self.block_size])
        if len(key) < self.block_size:
            key = ()  # no full block: nothing a prefix cache could share
        home = self._homes.get(key) if key else None
        rank = home if home in ties else ties[0]
        if key:
            self._homes[key] = rank
            self._homes.move_to_end(key)
            if len(self._homes) > PREFIX_HOMES:
                self._homes.popitem(last=False)
        self.owner[req.request_id] = rank
        self.load[rank] += 1
        return rank

    def release(self, request_id: str) -> int | None:
        """The request is finished or aborted: the replica that held it, if any still does."""
        rank = self.owner.pop(request_id, None)
        if rank is not None:
            self.load[rank] -= 1
        return rank

    def fail(self, rank: int) -> list[str]:
        """Replica ``rank`` is gone: it takes nothing more; returns the requests it held."""
        self.live[rank] = False
        lost = [rid for rid, r in self.owner.items() if r == rank]
        for rid in lost:
            del self.owner[rid]
        self.load[rank] = 0
        return lost


def sum_stats(stats: list[SchedulerStatsMsg], blocks: list[int]) -> SchedulerStatsMsg:
    """One engine's stats from its replicas': counters summed, KV usage weighed by each replica's
    ``blocks`` (0 for a dead one, which counts in the counters only). The engine is ``recovering``
    (``/health`` 503) only while every live replica is: until then the others serve."""
    total_blocks = sum(blocks)
    live = [s for s, b in zip(stats, blocks) if b > 0]
    usage = sum(s.kv_cache_usage * b for s, b in zip(stats, blocks)) / total_blocks if total_blocks else 0.0
    return SchedulerStatsMsg(
        num_running=sum(s.num_running for s in stats),
        num_waiting=sum(s.num_waiting for s in stats),
        kv_cache_usage=usage,
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_preemptions=sum(s.num_preemptions for s in stats),
        recovering=bool(live) and all(s.recovering for s in live),
        num_worker_restarts=sum(s.num_worker_restarts for s in stats),
        num_recovered_requests=sum(s.num_recovered_requests for s in stats),
    )
