"""``LLM``: offline batch generation, with vLLM's interface."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from distgen.entrypoints.beam_search import beam_search
from distgen.entrypoints.chat_utils import Conversation, render_chat_text, validate_conversation
from distgen.entrypoints.openai.reasoning_parsers import (
    check_reasoning_parser,
    constrain_after_thinking,
    end_token_ids,
)
from distgen.frontend.args import EngineArgs
from distgen.frontend.llm_engine import LLMEngine, PromptType
from distgen.outputs import BeamSearchOutput, RequestOutput
from distgen.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("distgen")


class LLM:
    """Generate text for batches of prompts.

    ``LLM()`` loads the embedded default model (SmolLM2-135M-Instruct); ``model`` may be a Hugging
    Face directory or a ``.gguf`` file. Keyword arguments are the engine's (vLLM's names):
    ``dtype``, ``seed``, ``max_model_len``, ``tensor_parallel_size``, ``data_parallel_size``,
    ``kv_cache_memory``, ``enable_prefix_caching``, ``max_num_seqs``, ``max_num_batched_tokens``,
    ``generation_config``...
    ``reasoning_parser`` (``"qwen3"``, ``"deepseek_r1"``), as vLLM's: the model's thinking is left
    free, and a structured-output constraint holds from the end of it (``</think>``).
    """

    def __init__(
        self, model: str | None = None, *, reasoning_parser: str | None = None, **kwargs: Any
    ) -> None:
        check_reasoning_parser(reasoning_parser)
        self.reasoning_parser = reasoning_parser
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in the order of ``prompts``. ``priority``: one
        per prompt, lower scheduled first (an engine started with ``scheduling_policy="priority"``)."""
        if prompts is None or isinstance(prompts, (int, float, bytes)):
            raise TypeError(
                "prompts must be a string, a token-id list, a prompt dict, or a list of them, "
                f"got {type(prompts).__name__}"
            )
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            is_seq = isinstance(sampling_params, Sequence) and not isinstance(sampling_params, str)
            params = list(sampling_params) if is_seq else [sampling_params]
            if not all(isinstance(p, SamplingParams) for p in params):
                raise TypeError(
                    "sampling_params must be a SamplingParams or a list of them (one per prompt), "
                    f"got {type(sampling_params).__name__}"
                )
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; "
                    "pass one, or one per prompt"
                )
        if self.reasoning_parser is not None:
            params = [self._after_thinking(prompt, p) for prompt, p in zip(prompts, params)]
        if priority is None:
            priorities = [0] * len(prompts)
        elif isinstance(priority, Sequence) and len(priority) == len(prompts):
            priorities = list(priority)
        else:
            raise ValueError(
                f"priority must be a list of one integer per prompt ({len(prompts)}), got {priority!r}"
            )
        ids = []
        try:
            for prompt, p, prio in zip(prompts, params, priorities):
                ids.append(self.llm_engine.add_request(prompt, p, priority=prio))
        except BaseException:
            self.llm_engine.abort_request(ids)
            raise
        return self._run_engine(ids, use_tqdm)

    def _after_thinking(self, prompt: PromptType, params: SamplingParams) -> SamplingParams:
        """``params``, with its constraint held back until the thinking ends, if it has one and the
        prompt leaves the reply room to think."""
        if params.structured_outputs is None:
            return params
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            text = prompt["prompt"]
        else:  # token ids: their last few, as text, say whether the prompt closed the think block
            ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else prompt
            text = self.get_tokenizer().decode(list(ids)[-8:]) if isinstance(ids, (list, tuple)) else ""
        return constrain_after_thinking(params, text, self._reasoning_end_ids)

    @functools.cached_property
    def _reasoning_end_ids(self) -> list[int]:
        return end_token_ids(self.get_tokenizer())

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the model's chat
        template (or ``chat_template``: a Jinja string, see ``load_chat_template``). ``tools`` are
        rendered by the template as it describes them; the reply is text (tool calls unparsed), as
        with vLLM's ``LLM.chat``."""
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise ValueError("messages must be a conversation (a list of message dicts) or a list of them")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = render_chat_text(
                self.get_tokenizer(),
                validate_conversation(conv),
                chat_template,
                add_generation_prompt,
                continue_final_message,
                chat_template_kwargs,
                tools,
            )
            # Tokenized by the input processor's rule; cut and checked with the request's params.
            ids = self.llm_engine.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self, prompts: Sequence[PromptType], params: BeamSearchParams, use_tqdm: bool = False
    ) -> list[BeamSearchOutput]:
        """Beam search per prompt; each output's ``sequences`` are sorted best first."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return beam_search(self.llm_engine, list(prompts), params, use_tqdm)

    def _run_engine(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        out_tokens = 0

        def progress(out: RequestOutput) -> None:
            nonlocal out_tokens
            out_tokens += sum(len(c.token_ids) for c in out.outputs)
            bar.update(1)
            bar.set_postfix_str(
                f"{out_tokens / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s", refresh=False
            )

        try:
            return self.llm_engine.run_to_completion(ids, progress)
        finally:
            bar.close()

    def shutdown(self) -> None:
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()
            self.llm_engine = None

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
