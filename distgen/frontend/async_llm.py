"""``AsyncLLM``: the asyncio front end the server uses, over the same engine-core client as ``LLM``.

``generate`` is an async generator of delta ``RequestOutput``s (each holds the tokens and text new
since the previous one). One output-handler task reads the engine core's per-step outputs,
detokenizes them and hands each request its share through an ``asyncio.Queue``. A consumer that
stops iterating (a client that disconnects, a cancelled task) aborts its request, which frees its KV
blocks. When the engine core dies, every in-flight request raises ``EngineDeadError`` and so does
every new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from distgen.config import EngineConfig
from distgen.engine_core.messages import EngineCoreOutputs, SchedulerStatsMsg
from distgen.exceptions import EngineDeadError, ReplicaDeadError
from distgen.frontend.args import EngineArgs
from distgen.frontend.core_client import AsyncMPClient, EngineCoreClient
from distgen.frontend.dp_client import AsyncDPClient
from distgen.frontend.input_processor import InputProcessor, NewRequest, PromptType
from distgen.frontend.output_processor import OutputProcessor
from distgen.frontend.stats import IterationStats, StatLogger
from distgen.outputs import RequestOutput
from distgen.sampling_params import SamplingParams

logger = logging.getLogger("distgen")


class AsyncLLM:
    def __init__(self, config: EngineConfig, stat_loggers: list[StatLogger] | None = None) -> None:
        self.config = config

        def load_inputs() -> None:  # the tokenizer loads while the engine core loads the model
            self.input_processor = InputProcessor(config)

        client = EngineCoreClient.make(config, asyncio_mode=True, while_starting=load_inputs)
        assert isinstance(client, AsyncMPClient | AsyncDPClient)
        self.client = client
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stat_loggers: list[StatLogger] = list(stat_loggers or [])
        self.last_stats: SchedulerStatsMsg | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._last_token_time: dict[str, float] = {}
        self._handler: asyncio.Task | None = None
        self._dead: EngineDeadError | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stat_loggers: list[StatLogger] | None = None) -> AsyncLLM:
        config = args.create_config()
        return cls(config, stat_loggers)

    @property
    def tokenizer(self):
        return self.input_processor.tokenizer

    @property
    def generation_defaults(self) -> dict:
        """Sampling defaults from the model's generation_config.json (SamplingParams names)."""
        return self.input_processor.generation_defaults

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    @property
    def errored(self) -> bool:
        return self._dead is not None or self.client.errored

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def default_sampling_params(self) -> SamplingParams:
        return self.input_processor.default_sampling_params()

    # -- requests ---------------------------------------------------------------------------------
    def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Delta outputs of one request until it finishes.

        The request is checked here, at the call: a prompt that can never run or parameters the
        engine refuses raise ValueError at once (a server answers 400 before it starts a stream), and
        a dead engine EngineDeadError. It is queued when the iteration starts, and aborted if the
        iteration ends before the request does.
        """
        if self.errored:
            raise self._dead or EngineDeadError("the engine is dead: the engine core process is gone")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival = time.time()
        new = self.input_processor.process(
            request_id, prompt, params, arrival, self.max_model_len, priority=priority
        )
        return self._run(request_id, new, arrival)

    async def _run(self, request_id: str, new: NewRequest, arrival: float) -> AsyncIterator[RequestOutput]:
        if request_id in self._queues:  # two calls with one id, both iterated
            raise ValueError(f"request id {request_id!r} is already in use")
        self._start_output_handler()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self.output_processor.add_request(request_id, new, arrival)
        finished = False
        try:
            for i, r in enumerate(new.core_requests):
                self.client.add_request(r)
                if i % 512 == 511:  # n in the thousands: let the other requests' outputs through
                    await asyncio.sleep(0)
            while True:
                item = queue.get_nowait() if not queue.empty() else await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing left to abort
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            self._last_token_time.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def end_all(self, error: EngineDeadError) -> int:
        """End every request in flight: each is aborted, and its caller gets ``error`` (the engine
        died, or a server stops). Returns how many there were."""
        in_flight = list(self._queues.items())
        for request_id, queue in in_flight:
            self.abort(request_id)
            queue.put_nowait(error)
        return len(in_flight)

    def abort(self, request_id: str) -> None:
        """End a request early (its KV blocks are freed); unknown or finished ids are ignored."""
        children = self.output_processor.abort_request(request_id)
        self._last_token_time.pop(request_id, None)
        if not children:
            return
        # Counted here: the engine core's "abort" outputs come for a request already forgotten.
        aborted = IterationStats(finish_reasons=["abort"] * len(children))
        for stat_logger in self.stat_loggers:
            stat_logger.record(None, aborted)
        if not self.errored:
            self.client.abort_requests(children)

    # -- the output handler -----------------------------------------------------------------------
    def _start_output_handler(self) -> None:
        if self._handler is None or self._handler.done():
            self._handler = asyncio.get_running_loop().create_task(self._run_output_handler())

    async def _run_output_handler(self) -> None:
        try:
            while True:
                try:
                    core_out = await self.client.get_output_async()
                except ReplicaDeadError as e:
                    self._fail_requests(e)
                    continue
                self._process(core_out)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            dead = e if isinstance(e, EngineDeadError) else EngineDeadError(f"the engine is dead: {e!r}")
            self._dead = dead
            logger.error("%s", self._dead)
            self.end_all(dead)  # dead: nothing is sent to the engine core

    def _fail_requests(self, error: ReplicaDeadError) -> None:
        """A data-parallel replica died: the requests it held end with ``error`` (their children on
        other replicas are aborted); every other request goes on. The client logged the death."""
        for request_id in self.output_processor.parents_of(error.request_ids):
            queue = self._queues.get(request_id)
            self.abort(request_id)
            if queue is not None:
                queue.put_nowait(error)

    def _process(self, core_out: EngineCoreOutputs) -> None:
        now = time.time()
        if core_out.stats is not None:
            self.last_stats = core_out.stats
        outputs, to_abort = self.output_processor.process_outputs(core_out.outputs, delta=True)
        it = IterationStats()
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
            self._account(out, now, it)
        if to_abort:
            self.client.abort_requests(to_abort)
        for stat_logger in self.stat_loggers:
            stat_logger.record(core_out.stats, it)

    def _account(self, out: RequestOutput, now: float, it: IterationStats) -> None:
        new = sum(len(c.token_ids) for c in out.outputs)
        it.num_generation_tokens += new
        if new:
            prev = self._last_token_time.get(out.request_id)
            if prev is None:
                it.num_prompt_tokens += len(out.prompt_token_ids)
                if out.metrics is not None:
                    it.time_to_first_tokens.append(now - out.metrics.arrival_time)
            else:
                it.inter_token_latencies.append(now - prev)
            self._last_token_time[out.request_id] = now
        if out.finished:
            self._last_token_time.pop(out.request_id, None)
            if out.metrics is not None:
                it.e2e_latencies.append(now - out.metrics.arrival_time)
        # Each sequence's finish comes once, in the delta output of the step that ended it.
        it.finish_reasons.extend(c.finish_reason for c in out.outputs if c.finish_reason is not None)

    # -- lifecycle --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._handler is not None:
            self._handler.cancel()
        self.client.shutdown()
