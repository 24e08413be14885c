"""The body of one tensor-parallel worker, shared by the ``mp`` and ``ray`` executors: build the rank's
Worker, then serve the executor's messages until told to stop.

The executor binds the sockets; the worker connects to the two addresses it is given (``ipc://`` paths
for ``mp``, ``tcp://host:port`` for ``ray``). :func:`serve` returns True after a clean ``Shutdown`` and
False after a failure, which it has already reported to the executor as :class:`Failed`.
:func:`run_mp_worker` is the entry point of an ``mp`` process; the Ray actor calls :func:`serve` itself.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq

from distgen.config import EngineConfig
from distgen.executor.messages import (
    Ack,
    DetermineNumBlocks,
    ExecuteModel,
    Failed,
    InitKVCache,
    NumBlocks,
    Ready,
    Shutdown,
    StepResult,
    WorkerRequest,
)
from distgen.orphan_watch import start_orphan_watch
from distgen.signals import ignore_ctrl_c
from distgen.workers.cpu_threads import configure
from distgen.workers.heap import keep_freed_memory

if TYPE_CHECKING:
    from distgen.workers.worker import Worker


@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    config: EngineConfig
    init_method: str  # torch.distributed rendezvous, tcp://HOST:PORT
    request_addr: str  # the executor's PUSH socket for this rank (we pull from it)
    reply_addr: str  # the executor's PULL socket (we push to it)
    local_rank: int  # among the workers on this machine: which share of its CPUs this one takes
    local_size: int
    device_index: int | None = None  # CUDA device of this rank; None = the rank
    parent_pid: int | None = None  # mp: exit as soon as this process is gone
    cleanup_dir: str | None = None  # mp: the socket directory rank 0 removes when orphaned
    worker_cls: type | None = None  # None = distgen's Worker; another class with its interface (benchmarks)


def setup_cpu_threads(config: EngineConfig, local_rank: int, local_size: int) -> None:
    """A CPU worker takes its share of this machine's cores (workers/cpu_threads.py) and keeps its freed
    step memory for the next step (workers/heap.py); a GPU worker
    keeps its share of torch's threads for host work. The ranks of every data-parallel replica on
    this host count as one set (replica r's ranks come after the r replicas before it), so replicas
    split the cores instead of each taking all of them."""
    import torch

    par = config.parallel
    local_rank += par.data_parallel_rank * local_size
    local_size *= par.data_parallel_size
    if config.device == "cpu":
        configure(config.parallel.cpu_omp_threads_bind, local_rank, local_size)
        keep_freed_memory()
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))


def failure(rank: int, e: BaseException) -> Failed:
    """The report of ``e``, raised in this rank and being handled now."""
    return Failed(rank, traceback.format_exc(), type(e).__name__, str(e))


def run_mp_worker(args: WorkerArgs) -> None:
    """Entry point of an ``mp`` worker process (the target of ``multiprocessing.Process``)."""
    # Ctrl-C reaches the whole process group: the executor shuts the workers down, they don't die alone.
    ignore_ctrl_c()
    # If the executor's process dies without shutting us down, exit at once, even while the main thread
    # is loading the model or blocked in a collective; rank 0 removes the dead executor's socket directory.
    cleanup = args.cleanup_dir if args.rank == 0 else None
    start_orphan_watch(args.parent_pid, cleanup, lambda: os._exit(1))
    if not serve(args):
        raise SystemExit(1)


def serve(args: WorkerArgs) -> bool:
    """Connect, load the rank's shard, report Ready, then answer calls until Shutdown (True) or a
    failure, sent to the executor as Failed (False)."""
    import torch

    setup_cpu_threads(args.config, args.local_rank, args.local_size)
    ctx = zmq.Context()
    requests = ctx.socket(zmq.PULL)
    requests.connect(args.request_addr)
    replies = ctx.socket(zmq.PUSH)
    replies.connect(args.reply_addr)
    encoder = msgspec.msgpack.Encoder()
    worker = None
    try:
        from distgen.workers.worker import Worker

        worker = (args.worker_cls or Worker)(
            args.config,
            rank=args.rank,
            init_method=args.init_method,
            device_index=args.device_index,
        )
        replies.send(encoder.encode(Ready(args.rank, os.getpid())))
        sender = None
        if args.config.scheduler.async_scheduling:
            device = torch.cuda.current_device() if args.config.device.startswith("cuda") else None
            sender = _ReplySender(args.rank, replies, device)
        try:
            _loop(args.rank, worker, requests, sender.put if sender else _sender(replies, encoder))
        finally:
            if sender is not None:
                sender.close()
        return True
    except BaseException as e:
        try:
            replies.send(encoder.encode(failure(args.rank, e)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # nobody listens any more
        return False
    finally:
        gc.unfreeze()  # collectable again at exit (see EngineCore.shutdown)
        if worker is not None:
            worker.shutdown()
        else:
            from distgen.distributed import parallel_state as ps

            ps.destroy_parallel_groups()
        requests.close(linger=0)
        replies.close(linger=1000)  # let a last Failed message leave
        ctx.term()


def _sender(replies: zmq.Socket, encoder: msgspec.msgpack.Encoder) -> Callable[[object], None]:
    return lambda msg: replies.send(encoder.encode(_wire(msg)))


def _wire(msg: object) -> msgspec.Struct:
    """A reply as sent: a launched step (``SampledOutput``) as a StepResult once its tokens are on the
    host, which ``get`` waits for."""
    return msg if isinstance(msg, msgspec.Struct) else StepResult(msg.get())


def _loop(rank: int, worker: Worker, requests: zmq.Socket, reply: Callable[[object], None]) -> None:
    decoder = msgspec.msgpack.Decoder(WorkerRequest)
    while True:
        msg = decoder.decode(requests.recv())
        if isinstance(msg, ExecuteModel):
            out = worker.submit(msg.sched)
            if out is not None:  # the driver (TP rank 0 of the last stage) answers the step
                reply(out)  # a SampledOutput: its tokens are read back when the reply is sent
        elif isinstance(msg, DetermineNumBlocks):
            reply(NumBlocks(rank, worker.determine_num_blocks()))
        elif isinstance(msg, InitKVCache):
            worker.init_kv_cache(msg.num_blocks)
            gc.freeze()  # start-up is over: later collections scan only what the steps allocate
            reply(Ack(rank))
        elif isinstance(msg, Shutdown):
            return


class _ReplySender:
    """Rank 0's replies under async scheduling, sent in order by a thread of their own: while it
    waits for step n's tokens to reach the host, the main thread is already launching step n+1."""

    def __init__(self, rank: int, replies: zmq.Socket, cuda_device: int | None) -> None:
        self.rank, self.replies, self.cuda_device = rank, replies, cuda_device
        self.encoder = msgspec.msgpack.Encoder()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="distgen-worker-replies", daemon=True)
        self.thread.start()

    def put(self, msg: object) -> None:
        self.queue.put(msg)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self.queue.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        try:
            if self.cuda_device is not None:  # else this thread's first CUDA call opens a context on GPU 0
                import torch

                torch.cuda.set_device(self.cuda_device)
            while (msg := self.queue.get()) is not None:
                self.replies.send(self.encoder.encode(_wire(msg)))
        except BaseException as e:  # e.g. a CUDA error surfacing at the read-back: the executor gives up
            self.replies.send(self.encoder.encode(failure(self.rank, e)))
