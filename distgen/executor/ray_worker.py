"""The Ray actor of one tensor-parallel rank. Ray starts and places it; the steps reach it over the
executor's ZeroMQ sockets, not through Ray calls: :meth:`DistgenWorker.run` is one long call that serves
them (``worker_loop.serve``) and returns only at shutdown, so its ObjectRef doubles as a liveness probe
(it resolves with an error as soon as the actor dies)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from distgen.executor.ports import free_port
from distgen.executor.worker_loop import WorkerArgs, serve


@dataclass(frozen=True)
class ActorInfo:
    pid: int
    node_id: str
    node_ip: str
    free_port: int  # a port free on this node's address just now (rank 0's rendezvous)


class DistgenWorker:
    """Wrapped with ``ray.remote`` by the executor (the class name is the actor's process title)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def info(self) -> ActorInfo:
        import ray

        ip = ray.util.get_node_ip_address()
        return ActorInfo(os.getpid(), ray.get_runtime_context().get_node_id(), ip, free_port(ip))

    def run(self, args: WorkerArgs) -> None:
        if not serve(args):
            raise RuntimeError(f"worker rank {args.rank} failed (its traceback went to the executor)")
