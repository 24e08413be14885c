"""Tensor and pipeline parallelism over Ray: one actor per rank in a placement group, on one node or many.

Ray only places the workers and manages their lifetime. The per-step control plane is the same ZeroMQ
broadcast as ``mp`` (:mod:`distgen.executor.broadcast`), over tcp:// on this node's address; the data
plane is torch.distributed rendezvousing on rank 0's node address and a port free there. A worker is
gone when its long-running ``run`` call resolves (``ray.wait`` with no timeout, between polls).

Connecting: an already-initialized Ray in this process is used as it is; otherwise ``RAY_ADDRESS`` when
set (``local`` starts a private instance), otherwise a running cluster found by ``address="auto"``,
otherwise a small local instance. Whatever this executor initialized, it shuts down again.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, NoReturn

from distgen.config import EngineConfig
from distgen.exceptions import WorkerStartupError
from distgen.executor.broadcast import (
    STARTUP_TIMEOUT_S,
    BroadcastExecutor,
    Channel,
    WorkerExit,
    WorkerHandles,
)
from distgen.executor.ray_worker import ActorInfo, DistgenWorker
from distgen.executor.worker_loop import WorkerArgs

logger = logging.getLogger("distgen")

PLACEMENT_TIMEOUT_S = 60.0  # the placement group must be placed within this
LOCAL_OBJECT_STORE_BYTES = 100 << 20  # a Ray instance we start only carries a few small calls


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "distributed_executor_backend='ray' needs Ray: pip install 'distgen[ray]' (or 'ray')"
        ) from e
    return ray


def connect_ray(num_cpus: int) -> bool:
    """Make sure this process is connected to Ray; True when this call connected it (so the caller
    disconnects it again). ``num_cpus`` sizes a local instance if one has to be started."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = dict(logging_level=logging.WARNING, configure_logging=True)
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init(address=address, **quiet)
        logger.info("joined the Ray cluster at %s", address)
        return True
    if not address:
        try:
            ray.init(address="auto", **quiet)
            logger.info("joined the running Ray cluster")
            return True
        except ConnectionError:
            pass
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        include_dashboard=False,
        **quiet,
    )
    logger.info("started a local Ray instance (%d CPUs)", num_cpus)
    return True


class _Actors(WorkerHandles):
    def __init__(self, owns_ray: bool) -> None:
        self.owns_ray = owns_ray
        self.pg: Any = None
        self.actors: list[Any] = []
        self.infos: list[ActorInfo] = []
        self.runs: list[Any] = []  # each actor's ObjectRef of its run() call

    def exits(self, starting: bool) -> list[WorkerExit]:
        if not self.runs:
            return []
        import ray

        if not ray.is_initialized():  # shut down under us: Ray ended this job's actors with it
            return [
                WorkerExit(r, True, f"worker rank {r}: Ray was shut down in this process")
                for r in range(len(self.runs))
            ]
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        done_ids = {ref.hex() for ref in done}
        out = []
        for rank, ref in enumerate(self.runs):
            if ref.hex() in done_ids:
                out.append(self._describe(rank, ref))
        return out

    def _describe(self, rank: int, ref: Any) -> WorkerExit:
        import ray

        info = self.infos[rank]
        who = f"worker rank {rank} (pid {info.pid} on {info.node_ip})"
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError as e:
            return WorkerExit(rank, True, f"{who} died: {_summary(e)}")
        except ray.exceptions.RayTaskError as e:
            return WorkerExit(rank, False, f"{who} stopped: {_summary(e)}")
        return WorkerExit(rank, False, f"{who} stopped serving")

    def all_gone(self) -> bool:
        import ray

        if not ray.is_initialized():
            return True
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0) if self.runs else ([], [])
        return len(done) == len(self.runs)

    def stop(self, deadline: float) -> None:
        try:
            import ray

            if not ray.is_initialized():
                return  # Ray is already down (interpreter exit): it took the actors with it
            if self.runs:
                ray.wait(self.runs, num_returns=len(self.runs), timeout=max(0.0, deadline - time.monotonic()))
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            if self.pg is not None:
                ray.util.remove_placement_group(self.pg)
            if self.owns_ray:
                ray.shutdown()
        except Exception:  # a half-torn-down Ray at exit must not mask the real error
            logger.warning("error while stopping the Ray workers", exc_info=True)


def _summary(e: BaseException) -> str:
    """Ray's first line, and the line saying why the worker process went, if any."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = [ln for ln in lines[1:] if ln.startswith("The actor is dead because")]
    text = " ".join(lines[:1] + why[:1])
    return text if len(text) < 400 else text[:400] + "..."


class RayExecutor(BroadcastExecutor):
    backend_name = "ray"
    local_ipc = True  # ranks on the engine's node use ipc://; False sends every rank over tcp://

    def __init__(self, config: EngineConfig, worker_cls: type | None = None) -> None:
        ray = import_ray()
        world = config.parallel.world_size
        owns = connect_ray(max(os.cpu_count() or 1, world))
        try:
            # Ranks on this node connect over ipc (abstract: no file to leave), the others over tcp.
            bases = [f"tcp://{ray.util.get_node_ip_address()}", f"ipc://@distgen-ray-{uuid.uuid4().hex}"]
            channel = Channel(world, bases)
        except BaseException:
            if owns:
                ray.shutdown()
            raise
        super().__init__(config, channel, worker_cls)
        self.worker_transports: list[str] = []  # per rank: "ipc" (this node) or "tcp"
        self._actors = _Actors(owns)
        self._start(self._actors)

    @property
    def worker_pids(self) -> list[int]:
        return [i.pid for i in self._actors.infos]

    @property
    def worker_node_ids(self) -> list[str]:
        return [i.node_id for i in self._actors.infos]

    def _start_workers(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        t0 = time.monotonic()
        cuda = self.config.device.startswith("cuda")
        bundle = {"GPU": 1.0} if cuda else {"CPU": 1.0}
        self._actors.pg = self._place([dict(bundle) for _ in range(self.world_size)])
        cls = ray.remote(DistgenWorker)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(self._actors.pg, placement_group_bundle_index=rank)
            opts = dict(num_cpus=0, num_gpus=1) if cuda else dict(num_cpus=1)
            self._actors.actors.append(cls.options(scheduling_strategy=strategy, **opts).remote(rank))
        self._actors.infos = self._actor_infos()
        self._order_ranks(ray.get_runtime_context().get_node_id())
        rank0 = self._actors.infos[0]
        init_method = f"tcp://{rank0.node_ip}:{rank0.free_port}"
        here = ray.get_runtime_context().get_node_id()
        self.worker_transports = [
            "ipc" if self.local_ipc and i.node_id == here else "tcp" for i in self._actors.infos
        ]
        node_of = [i.node_id for i in self._actors.infos]  # each rank's node: its share of that node's CPUs
        for rank, actor in enumerate(self._actors.actors):
            args = WorkerArgs(
                rank,
                self.config,
                init_method,
                *self.channel.endpoints(rank, 1 if self.worker_transports[rank] == "ipc" else 0),
                local_rank=node_of[:rank].count(node_of[rank]),
                local_size=node_of.count(node_of[rank]),
                worker_cls=self.worker_cls,
                device_index=0 if cuda else None,  # Ray shows each actor only its own GPU
            )
            self._actors.runs.append(actor.run.remote(args))
        nodes = len(set(self.worker_node_ids))
        logger.info(
            "%d Ray actors on %d node(s) in %.1fs; control plane per rank: %s",
            self.world_size,
            nodes,
            time.monotonic() - t0,
            self.worker_transports,
        )
        self._wait_ready(max(1.0, STARTUP_TIMEOUT_S - (time.monotonic() - t0)))

    def _order_ranks(self, here: str) -> None:
        """Global ranks by node, this node's first: consecutive ranks form a TP group, so a TP group
        stays within a node wherever the nodes hold whole groups, and pipeline stages (the next ranks)
        go to the other nodes, where only hidden states cross the network."""
        infos = self._actors.infos
        order = sorted(range(len(infos)), key=lambda b: (infos[b].node_id != here, infos[b].node_id, b))
        self._actors.actors = [self._actors.actors[b] for b in order]
        self._actors.infos = [infos[b] for b in order]

    def _place(self, bundles: list[dict[str, float]]) -> Any:
        import ray
        from ray.util.placement_group import placement_group

        kind = next(iter(bundles[0]))
        have = ray.cluster_resources().get(kind, 0.0)
        if have < len(bundles):
            self._startup_failed(
                f"{len(bundles)} workers (tensor_parallel_size x pipeline_parallel_size) need {len(bundles)} "
                f"bundles of {bundles[0]}, but the "
                f"Ray cluster has {have:g} {kind} in all"
            )
        pg = placement_group(bundles, strategy="PACK")
        self._actors.pg = pg
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self._startup_failed(
                f"the placement group of {len(bundles)} x {bundles[0]} was not placed within "
                f"{PLACEMENT_TIMEOUT_S:.0f}s (available now: {ray.available_resources()})"
            )
        return pg

    def _actor_infos(self) -> list[ActorInfo]:
        import ray

        refs = [a.info.remote() for a in self._actors.actors]
        ray.wait(refs, num_returns=len(refs), timeout=STARTUP_TIMEOUT_S)
        infos = []
        for rank, ref in enumerate(refs):
            try:
                infos.append(ray.get(ref, timeout=0))
            except ray.exceptions.GetTimeoutError:
                self._startup_failed(f"worker rank {rank}'s actor did not start in {STARTUP_TIMEOUT_S:.0f}s")
            except ray.exceptions.RayError as e:
                self._startup_failed(f"worker rank {rank}'s actor could not start: {_summary(e)}")
        return infos

    def _startup_failed(self, why: str) -> NoReturn:
        raise WorkerStartupError(f"tensor-parallel workers failed to start: {why}")
