"""A step's sampled tokens on their way to the host.

Reading a CUDA tensor on the host (``tolist``) waits for the whole stream. Instead the runner queues
non-blocking copies of what the step sampled into pinned host memory right after the sampler, records
an event, and hands back this object: :meth:`SampledOutput.get` waits for that event only. With async
scheduling the engine core launches the next step before calling it, so the GPU stays busy while
the host turns these tokens into outputs.
"""

from __future__ import annotations

import torch

from distgen.layers.sampler import SamplerOutput
from distgen.workers.scheduler_output import ModelRunnerOutput


class SampledOutput:
    def __init__(
        self,
        req_ids: list[str],
        sampled: SamplerOutput | None,
        prompt_logprobs: dict | None = None,
    ) -> None:
        self._result: ModelRunnerOutput | None = None
        self._req_ids = req_ids
        self._prompt_logprobs = prompt_logprobs or {}
        self._event: torch.cuda.Event | None = None
        self._host: list[torch.Tensor] = []
        if sampled is None:
            self._result = ModelRunnerOutput([], [], prompt_logprobs=self._prompt_logprobs)
            return
        tensors = [sampled.sampled_token_ids]
        if sampled.logprobs is not None:
            tensors += [sampled.logprob_token_ids, sampled.logprobs, sampled.sampled_token_ranks]
        if tensors[0].is_cuda:
            # A non-blocking copy to the CPU lands in pinned memory; the event marks it done.
            self._host = [t.to("cpu", non_blocking=True) for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensors

    @classmethod
    def done(cls, result: ModelRunnerOutput) -> SampledOutput:
        out = cls([], None)
        out._result = result
        return out

    def get(self) -> ModelRunnerOutput:
        """The step's output; waits for its copies (not for anything launched after them)."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            host = self._host
            result = ModelRunnerOutput(
                req_ids=self._req_ids,
                sampled_token_ids=host[0].tolist(),
                prompt_logprobs=self._prompt_logprobs,
            )
            if len(host) > 1:
                result.logprob_token_ids = host[1].tolist()
                result.logprobs = host[2].tolist()
                result.sampled_ranks = host[3].tolist()
            self._result, self._host = result, []
        return self._result
