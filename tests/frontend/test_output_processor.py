"""The front end's output processor: what a delta (streaming) output of an n > 1 request carries."""

from __future__ import annotations

from distgen.engine_core.messages import EngineCoreOutput, Logprobs
from distgen.frontend.input_processor import NewRequest
from distgen.frontend.output_processor import OutputProcessor
from distgen.sampling_params import SamplingParams

PROMPT = [1, 2, 3, 4]


def _request(processor: OutputProcessor, n: int, **kw) -> list[str]:
    params = SamplingParams(n=n, max_tokens=8, **kw)
    children = []
    for i in range(n):
        child = params.clone()
        child.n = 1
        children.append((f"{i}_r", child))
    processor.add_request("r", NewRequest(None, PROMPT, params, children, []), arrival_time=0.0)
    return [cid for cid, _ in children]


def _step(processor: OutputProcessor, outs: list[EngineCoreOutput], delta: bool = True):
    results, to_abort = processor.process_outputs(outs, delta=delta)
    assert to_abort == []
    return results


def test_a_delta_output_carries_only_the_sequences_that_changed(smollm2_tokenizer):
    """With n in the thousands, handing out every sequence each step made a request O(n^2)."""
    proc = OutputProcessor(smollm2_tokenizer)
    ids = _request(proc, n=4)
    (out,) = _step(proc, [EngineCoreOutput(ids[2], [100]), EngineCoreOutput(ids[0], [101])])
    assert [c.index for c in out.outputs] == [0, 2]
    assert [c.token_ids for c in out.outputs] == [[101], [100]]
    assert not out.finished

    (out,) = _step(proc, [EngineCoreOutput(ids[1], [102, 103], finish_reason="length")])
    assert [(c.index, c.token_ids, c.finish_reason) for c in out.outputs] == [(1, [102, 103], "length")]

    # A prefill chunk of the rest hands out nothing; each sequence's finish comes once.
    assert _step(proc, [EngineCoreOutput(ids[3], [])]) == []
    (out,) = _step(
        proc,
        [
            EngineCoreOutput(ids[0], [104], finish_reason="stop", stop_reason=2),
            EngineCoreOutput(ids[2], [], finish_reason="abort"),
            EngineCoreOutput(ids[3], [105], finish_reason="length"),
        ],
    )
    assert [(c.index, c.token_ids, c.finish_reason) for c in out.outputs] == [
        (0, [104], "stop"),
        (2, [], "abort"),
        (3, [105], "length"),
    ]
    assert out.finished and not proc.has_unfinished()


def test_the_final_output_without_deltas_holds_every_sequence(smollm2_tokenizer):
    proc = OutputProcessor(smollm2_tokenizer)
    ids = _request(proc, n=3)
    assert _step(proc, [EngineCoreOutput(ids[1], [7], finish_reason="length")], delta=False) == []
    (out,) = _step(
        proc,
        [EngineCoreOutput(ids[0], [8, 9], finish_reason="length"), EngineCoreOutput(ids[2], [10], "length")],
        delta=False,
    )
    assert [(c.index, c.token_ids) for c in out.outputs] == [(0, [8, 9]), (1, [7]), (2, [10])]


def test_prompt_logprobs_reach_every_unfinished_sequence(smollm2_tokenizer):
    """The prompt's logprobs come on sequence 0's outputs, chunk by chunk; a consumer that waits for
    them whole (an echo with logprobs) sees each sequence again once they grow, except one that
    already reported its finish."""
    proc = OutputProcessor(smollm2_tokenizer)
    ids = _request(proc, n=3, prompt_logprobs=0)
    (out,) = _step(proc, [EngineCoreOutput(ids[1], [5], finish_reason="length")])
    assert [c.index for c in out.outputs] == [1]
    chunk = Logprobs(token_ids=[[2], [3], [4]], logprobs=[[-1.0], [-2.0], [-3.0]], ranks=[1, 1, 1])
    (out,) = _step(proc, [EngineCoreOutput(ids[0], [], new_prompt_logprobs=chunk)])
    assert [c.index for c in out.outputs] == [0, 2]
    assert len(out.prompt_logprobs) == len(PROMPT)
