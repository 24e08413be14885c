"""The scheduler's waiting queue, in the order requests are admitted.

``fcfs``: arrival order; a preempted request goes back to the head (it was admitted before any
request still waiting). ``priority``: by ``(priority, arrival time)``, lower first (vLLM's rule); a
preempted request goes back to its place in that order.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator

from distgen.engine_core.request import Request


def priority_key(req: Request) -> tuple[int, float, int]:
    """The admission order under the priority policy (ties: arrival, then the order added)."""
    return (req.priority, req.arrival_time, req.seq)


class _Queue:
    """What both policies share: the requests in admission order, the next one first."""

    def __init__(self, q: deque[Request] | list[Request]) -> None:
        self._q = q

    def peek(self) -> Request:
        return self._q[0]

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)


class FCFSQueue(_Queue):
    def __init__(self) -> None:
        super().__init__(deque())

    def add(self, req: Request) -> None:
        self._q.append(req)

    def put_back(self, req: Request) -> None:
        """A preempted request: ahead of every request that has not run yet."""
        self._q.appendleft(req)

    def pop(self) -> Request:
        return self._q.popleft()


class PriorityQueue(_Queue):
    """Kept sorted by :func:`priority_key` (insertion by bisection; queues here are short)."""

    def __init__(self) -> None:
        super().__init__([])

    def add(self, req: Request) -> None:
        bisect.insort(self._q, req, key=priority_key)

    put_back = add  # a preempted request keeps its place in the order

    def pop(self) -> Request:
        return self._q.pop(0)


def make_queue(policy: str) -> FCFSQueue | PriorityQueue:
    """The waiting queue of ``policy`` (checked by ``SchedulerConfig``)."""
    return PriorityQueue() if policy == "priority" else FCFSQueue()
