"""Data parallelism: ``data_parallel_size`` engine replicas behind one front end.

Each replica is an engine-core process of its own, with its own executor, workers
(``tensor_parallel_size`` ranks) and KV cache, started by :class:`SyncDPClient` (``LLM``) or
:class:`AsyncDPClient` (the server) all at once, so start-up takes one replica's time. To the front
end they are one :class:`EngineCoreClient`:

- a new request goes to the live replica with the fewest requests in flight, counted here from the
  requests sent and the finishes and aborts seen (:class:`Router`); on a tie, to the replica that last
  took a prompt with the same first KV block (its prefix cache may still hold it);
- an abort goes to the replica that holds the request;
- every poll reads each replica's socket that has a step ready and merges their outputs; the stats
  they carry are the sum over the replicas (``kv_cache_usage``: the share of all their blocks in use);
- a replica that dies (its process gone, or its engine dead) ends only its own requests, with
  :class:`ReplicaDeadError` (an :class:`EngineDeadError`); new requests go to the others. When the
  last one dies, the engine is dead as with one replica.

``num_blocks`` and ``max_model_len`` are one replica's (the smallest): a request runs on one replica.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

import msgspec
import zmq
import zmq.asyncio

from distgen.config import EngineConfig
from distgen.engine_core.messages import (
    EngineCoreOutputs,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreShutdown,
    SchedulerStatsMsg,
)
from distgen.exceptions import EngineDeadError, ReplicaDeadError
from distgen.frontend.core_client import (
    POLL_MS,
    AsyncMPClient,
    EngineCoreClient,
    SyncMPClient,
    _CoreProcess,
    _MPClientBase,
)
from distgen.frontend.dp_router import Router, sum_stats

logger = logging.getLogger("distgen")

_DEAD_PREFIX = "the engine is dead: "


def replica_config(config: EngineConfig, rank: int) -> EngineConfig:
    return replace(config, parallel=replace(config.parallel, data_parallel_rank=rank))


def replica_env(config: EngineConfig, rank: int, ray_address: str | None) -> dict[str, str] | None:
    """The environment of replica ``rank``'s engine core (None: this process's). On CUDA without Ray,
    the replica sees only its own ``tp x pp`` GPUs, since each executor numbers its
    ranks' devices from 0 (Ray gives each actor its GPU itself); with Ray, every replica joins the
    same instance."""
    par = config.parallel
    if ray_address is not None:
        return dict(os.environ, RAY_ADDRESS=ray_address)
    if config.device != "cuda" or par.distributed_executor_backend == "ray":
        return None
    world, dp = par.world_size, par.data_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(dp * world)]
    if len(devices) < dp * world:
        raise ValueError(
            f"data_parallel_size {dp} x {world} workers per replica (tensor x pipeline parallel) needs "
            f"{dp * world} GPUs; CUDA_VISIBLE_DEVICES={visible!r} shows {len(devices)}"
        )
    return dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(devices[rank * world : (rank + 1) * world]))


def _start_ray(config: EngineConfig) -> str | None:
    """With Ray and no instance the replicas would find (none initialized here, no ``RAY_ADDRESS``),
    each would start a private one: start (or join) one here and hand its address to every replica."""
    if config.parallel.distributed_executor_backend != "ray" or os.environ.get("RAY_ADDRESS"):
        return None
    from distgen.executor.ray_executor import connect_ray, import_ray

    ray = import_ray()
    if ray.is_initialized():
        return None  # the replicas find it with address="auto", as a single engine core does
    par = config.parallel
    connect_ray(par.data_parallel_size * par.world_size)
    return ray.get_runtime_context().gcs_address


class _DPClientBase(EngineCoreClient):
    replica_cls: type[_MPClientBase]

    def __init__(self, config: EngineConfig, while_starting: Callable[[], None] | None = None) -> None:
        self.size = config.parallel.data_parallel_size
        self.router = Router(self.size, config.cache.block_size)
        self.replicas: list[_MPClientBase] = []
        self._dead: list[str | None] = [None] * self.size
        self._failures: list[ReplicaDeadError] = []
        self._all_dead: str | None = None
        self._stats: list[SchedulerStatsMsg | None] = [None] * self.size
        self._last_check = 0.0
        self._ray_address = _start_ray(config)
        t0 = time.monotonic()
        configs = [replica_config(config, r) for r in range(self.size)]
        procs: list[_CoreProcess] = []
        attached = 0
        try:
            for r, cfg in enumerate(configs):
                procs.append(_CoreProcess.start(cfg, replica_env(cfg, r, self._ray_address)))
            if while_starting is not None:
                while_starting()
            for cfg, proc in zip(configs, procs):
                attached += 1  # the replica's client owns its process from here, even if it raises
                self.replicas.append(self.replica_cls(cfg, proc=proc))
        except BaseException:
            for proc in procs[attached:]:
                proc.close()
            self._stop_replicas()
            raise
        readies = [rep.ready for rep in self.replicas]
        self.ready = EngineCoreReady(
            min(x.num_blocks for x in readies),
            min(x.max_model_len for x in readies),
            readies[0].vocab_size,
            readies[0].pid,
            [pid for x in readies for pid in x.worker_pids],
        )
        self.pids = [x.pid for x in readies]  # each replica's engine-core process
        logger.info(
            "%d data-parallel replicas ready in %.1fs (engine cores %s)",
            self.size,
            time.monotonic() - t0,
            self.pids,
        )

    # -- input ------------------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        if self._all_dead is not None:
            raise EngineDeadError(self._all_dead)
        self.replicas[self.router.route(req)].add_request(req)

    def abort_requests(self, request_ids: list[str]) -> None:
        by_rank: dict[int, list[str]] = {}
        for rid in request_ids:
            rank = self.router.release(rid)
            if rank is not None:
                by_rank.setdefault(rank, []).append(rid)
        for rank, ids in by_rank.items():
            self.replicas[rank].abort_requests(ids)

    # -- output -----------------------------------------------------------------------------------
    def _live(self) -> list[int]:
        return [r for r in range(len(self.replicas)) if self._dead[r] is None]

    def _take(self, rank: int, data: bytes) -> EngineCoreOutputs | None:
        """Replica ``rank``'s step outputs, its finishes counted; None if they say it died."""
        try:
            out = self.replicas[rank]._decode_output(data)
        except EngineDeadError as e:
            self._replica_died(rank, str(e))
            return None
        for o in out.outputs:
            if o.finish_reason is not None:
                self.router.release(o.request_id)
        if out.stats is not None:
            self._stats[rank] = out.stats
        return out

    def _merge(self, outs: list[EngineCoreOutputs]) -> EngineCoreOutputs | None:
        if not outs:
            return None
        return EngineCoreOutputs(outputs=[o for out in outs for o in out.outputs], stats=self.total_stats())

    def total_stats(self) -> SchedulerStatsMsg | None:
        """The sum over the replicas; a dead one keeps its counters (Prometheus counters never go
        down) but holds no request and no block."""
        stats, blocks = [], []
        for rank, s in enumerate(self._stats):
            if s is None:
                continue
            if self._dead[rank] is not None:
                s = msgspec.structs.replace(s, num_running=0, num_waiting=0)
            stats.append(s)
            blocks.append(0 if self._dead[rank] is not None else self.replicas[rank].ready.num_blocks)
        return sum_stats(stats, blocks) if stats else None

    def _check_replicas(self, now: bool = False) -> None:
        """Notice replicas whose process died, at most every POLL_MS (busy replicas' sockets are
        always ready, so the poll timeout alone would never come)."""
        t = time.monotonic()
        if not now and t - self._last_check < POLL_MS / 1000:
            return
        self._last_check = t
        for rank in self._live():
            try:
                self.replicas[rank]._check_alive()
            except EngineDeadError as e:
                self._replica_died(rank, str(e))

    def _replica_died(self, rank: int, why: str) -> None:
        why = why.removeprefix(_DEAD_PREFIX)
        self._dead[rank] = why
        self.replicas[rank].shutdown()  # its workers stop with it (already, if it ended by itself)
        lost = self.router.fail(rank)
        self._replicas_changed()
        live = len(self._live())
        if live == 0:
            self._all_dead = f"{_DEAD_PREFIX}every data-parallel replica is gone; the last: {why}"
            return
        logger.error(
            "data-parallel replica %d of %d is dead (%s): its %d requests in flight fail, %d serve on",
            rank,
            self.size,
            why,
            len(lost),
            live,
        )
        if lost:
            msg = f"data-parallel replica {rank} is dead ({why}); {live} of {self.size} replicas still serve"
            self._failures.append(ReplicaDeadError(msg, lost))

    def _replicas_changed(self) -> None:
        """A replica left: forget whatever polls its socket."""

    def _raise_failures(self) -> None:
        if self._all_dead is not None:
            raise EngineDeadError(self._all_dead)
        if self._failures:
            raise self._failures.pop(0)

    @property
    def errored(self) -> bool:
        return self._all_dead is not None

    @property
    def num_live_replicas(self) -> int:
        return len(self._live())

    def shutdown(self) -> None:
        if self._all_dead is None:
            self._all_dead = f"{_DEAD_PREFIX}the engine was shut down"
        self._stop_replicas()

    def _stop_replicas(self) -> None:
        # Every core is told first, so they wind their workers down together, not one after another.
        for rep in self.replicas:
            if rep._dead is None:
                try:
                    rep._proc.input.send(msgspec.msgpack.encode(EngineCoreShutdown()), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        for rep in self.replicas:
            rep.shutdown()
        if self._ray_address is not None:
            import ray

            ray.shutdown()
            self._ray_address = None


class SyncDPClient(_DPClientBase):
    replica_cls = SyncMPClient

    def __init__(self, config: EngineConfig, while_starting: Callable[[], None] | None = None) -> None:
        self._poller: zmq.Poller | None = None
        super().__init__(config, while_starting)

    def _replicas_changed(self) -> None:
        self._poller = None

    def get_output(self) -> EngineCoreOutputs:
        while True:
            self._raise_failures()
            self._check_replicas()
            if self._poller is None:
                self._poller = zmq.Poller()
                for rank in self._live():
                    self._poller.register(self.replicas[rank]._proc.output, zmq.POLLIN)
            ready = dict(self._poller.poll(POLL_MS))
            outs = []
            for rank in self._live():
                sock = self.replicas[rank]._proc.output
                if sock in ready and (out := self._take(rank, sock.recv())) is not None:
                    outs.append(out)
            merged = self._merge(outs)
            if merged is not None:
                return merged

    def get_stats(self) -> SchedulerStatsMsg:
        """Every live replica's stats now, summed (an idle engine's, as with one replica)."""
        for rank in self._live():
            try:
                self._stats[rank] = self.replicas[rank].get_stats()
            except EngineDeadError as e:
                self._replica_died(rank, str(e))
        self._raise_failures()
        total = self.total_stats()
        assert total is not None
        return total


class AsyncDPClient(_DPClientBase):
    replica_cls = AsyncMPClient

    def __init__(self, config: EngineConfig, while_starting: Callable[[], None] | None = None) -> None:
        self._poller: zmq.asyncio.Poller | None = None
        super().__init__(config, while_starting)

    def _replicas_changed(self) -> None:
        self._poller = None

    def _socket(self, rank: int) -> zmq.asyncio.Socket:
        rep = self.replicas[rank]
        assert isinstance(rep, AsyncMPClient)
        return rep._output

    async def get_output_async(self) -> EngineCoreOutputs:
        while True:
            self._raise_failures()
            self._check_replicas()
            if self._poller is None:
                self._poller = zmq.asyncio.Poller()
                for rank in self._live():
                    self._poller.register(self._socket(rank), zmq.POLLIN)
            ready = dict(await self._poller.poll(POLL_MS))
            outs = []
            for rank in self._live():
                sock = self._socket(rank)
                if sock in ready and (out := self._take(rank, await sock.recv())) is not None:
                    outs.append(out)
            merged = self._merge(outs)
            if merged is not None:
                return merged
