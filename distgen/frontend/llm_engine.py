"""The synchronous engine behind ``LLM``: input processing, the engine-core client, output processing."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

from distgen.config import EngineConfig
from distgen.exceptions import ReplicaDeadError
from distgen.frontend.args import EngineArgs
from distgen.frontend.core_client import EngineCoreClient
from distgen.frontend.input_processor import CheckedPrompt, InputProcessor, PromptType
from distgen.frontend.output_processor import OutputProcessor
from distgen.outputs import RequestOutput
from distgen.sampling_params import SamplingParams

logger = logging.getLogger("distgen")

__all__ = ["LLMEngine", "PromptType"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model  # vLLM's name for it (runner_type, architecture, dtype, ...)
        t0 = time.time()

        def load_inputs() -> None:  # the tokenizer loads while the engine core loads the model
            self.input_processor = InputProcessor(config)

        self.client = EngineCoreClient.make(config, while_starting=load_inputs)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.last_stats = None
        logger.info(
            "engine ready in %.1fs: %s, %s, max_model_len=%d, %d KV blocks",
            time.time() - t0,
            config.model.architecture,
            str(config.model.dtype).replace("torch.", ""),
            self.max_model_len,
            self.client.num_blocks,
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        config = args.create_config()
        return cls(config)

    @property
    def tokenizer(self):
        return self.input_processor.tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return self.input_processor.eos_token_ids

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    # -- input --------------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        return self.input_processor.default_sampling_params()

    def prepare_prompt(self, prompt: PromptType, add_special_tokens: bool = True) -> CheckedPrompt:
        """``prompt`` tokenized and checked as a request's is (no truncation): InvalidPromptError for
        one the engine can never run."""
        return self.input_processor.rules(self.max_model_len).prepare(prompt, None, add_special_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids, as the input processor tokenizes a prompt (unchecked)."""
        return self.input_processor.rules(self.max_model_len).encode(text, add_special_tokens)

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        *,
        max_logprobs: int | None = None,
        priority: int = 0,
    ) -> str:
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival_time = time.time() if arrival_time is None else arrival_time
        new = self.input_processor.process(
            request_id, prompt, params, arrival_time, self.max_model_len, max_logprobs, priority
        )
        self.output_processor.add_request(request_id, new, arrival_time)
        try:
            for r in new.core_requests:
                self.client.add_request(r)
        except BaseException:
            self.abort_request([request_id])
            raise
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        children = []
        for rid in request_ids:
            children.extend(self.output_processor.abort_request(rid))
        self.client.abort_requests(children)

    # -- the loop ------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        try:
            core_out = self.client.get_output()
        except ReplicaDeadError as e:
            # A data-parallel replica died: its requests end with the error; the others stay.
            self.abort_request(self.output_processor.parents_of(e.request_ids))
            raise
        if core_out.stats is not None:
            self.last_stats = core_out.stats
        outputs, to_abort = self.output_processor.process_outputs(core_out.outputs)
        if to_abort:
            self.client.abort_requests(to_abort)
        return outputs

    def run_to_completion(
        self, ids: list[str], on_finished: Callable[[RequestOutput], None] | None = None
    ) -> list[RequestOutput]:
        """Step until the requests ``ids`` finish; their final outputs in the order of ``ids``.

        On any exception (Ctrl-C included) the unfinished ones are aborted before it propagates.
        """
        done: dict[str, RequestOutput] = {}
        try:
            while self.has_unfinished_requests():
                for out in self.step():
                    if out.finished:
                        done[out.request_id] = out
                        if on_finished is not None:
                            on_finished(out)
        except BaseException:
            self._abort_quietly([i for i in ids if i not in done])
            raise
        return [done[i] for i in ids]

    def _abort_quietly(self, request_ids: list[str]) -> None:
        """Abort ``request_ids``; if the engine core is already dead, only forget them here."""
        try:
            self.abort_request(request_ids)
        except Exception:
            for rid in request_ids:
                self.output_processor.abort_request(rid)

    def get_stats(self):
        """The engine core's scheduler stats (running/waiting requests, KV cache usage, prefix cache
        queries and hits, preemptions); between ``generate`` calls."""
        if self.has_unfinished_requests():
            raise RuntimeError("get_stats() is for an idle engine: requests are still in flight")
        self.last_stats = self.client.get_stats()
        return self.last_stats

    def shutdown(self) -> None:
        self.client.shutdown()
