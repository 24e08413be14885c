"""The synchronous engine behind ``LLM``: input processing, the engine core, output processing."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from distgen.config import EngineConfig
from distgen.engine.args import EngineArgs
from distgen.engine.core import EngineCore
from distgen.engine.messages import EngineCoreOutputs, EngineCoreRequest
from distgen.engine.output_processor import OutputProcessor
from distgen.model_loader.loader import ModelSource, generation_eos_ids, load_generation_config
from distgen.outputs import RequestOutput
from distgen.sampling_params import SamplingParams

logger = logging.getLogger("distgen")

PromptType = str | dict[str, Any] | list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.source = source
        t0 = time.time()
        self.tokenizer = source.load_tokenizer(config.model.tokenizer)
        self.generation_defaults = load_generation_config(source, config.model.generation_config)
        eos = set(generation_eos_ids(source, config.model.generation_config))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.core = EngineCore(config, source)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.last_stats = None
        logger.info(
            "engine ready in %.1fs: %s, %s, max_model_len=%d, %d KV blocks",
            time.time() - t0,
            config.model.architecture,
            str(config.model.dtype).replace("torch.", ""),
            self.core.max_model_len,
            self.core.num_blocks,
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        config, source = args.create_config()
        return cls(config, source)

    # -- input --------------------------------------------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.generation_defaults) if self.generation_defaults else SamplingParams()

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer(prompt["prompt"]).input_ids
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string, a token-id list or a dict, got {type(prompt).__name__}")

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> str:
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        params = params.clone()
        params._eos_token_ids = list(self.eos_token_ids)
        arrival_time = time.time() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            child = params.clone()
            child.n = 1
            if params.seed is not None:
                child.seed = params.seed + i
            children.append((request_id if params.n == 1 else f"{i}_{request_id}", child))
        reqs = [EngineCoreRequest(cid, ids, p, arrival_time) for cid, p in children]
        for r in reqs:  # validate every child before any enters the queue
            self.core.validate_request(r)
        self.output_processor.add_request(request_id, text, ids, params, children, arrival_time)
        try:
            for r in reqs:
                self.core.add_request(r)
        except BaseException:
            self.abort_request([request_id])
            raise
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        children = []
        for rid in request_ids:
            children.extend(self.output_processor.abort_request(rid))
        self.core.abort_requests(children)

    # -- the loop ------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        core_out: EngineCoreOutputs = self.core.step()
        self.last_stats = core_out.stats
        outputs, to_abort = self.output_processor.process_outputs(core_out.outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
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
            self.abort_request([i for i in ids if i not in done])
            raise
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        self.core.shutdown()
