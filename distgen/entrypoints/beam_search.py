"""Beam search on top of the engine, as vLLM's ``LLM.beam_search`` defines it.

Each step, every live beam of every prompt is one single-token request asking for the top
``2 * beam_width`` logprobs. Candidates are ranked by cumulative logprob and the best
``beam_width`` survive; a candidate ending in EOS (unless ``ignore_eos``) is set aside as
finished. Beams of one prompt share their prefix's KV blocks through the prefix cache: a step
recomputes at most the last, partial block of each beam.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from distgen.outputs import BeamSearchOutput, BeamSearchSequence
from distgen.sampling_params import BeamSearchParams, SamplingParams


def beam_score(seq: BeamSearchSequence, prompt_len: int, eos_ids: set[int], length_penalty: float) -> float:
    """Cumulative logprob over generated length ** length_penalty (a final EOS does not count)."""
    n = len(seq.tokens) - prompt_len
    if n and seq.tokens[-1] in eos_ids:
        n -= 1
    return seq.cum_logprob / (max(n, 1) ** length_penalty)


def beam_search(
    engine, prompts: list[Any], params: BeamSearchParams, use_tqdm: bool = False
) -> list[BeamSearchOutput]:
    tok = engine.tokenizer
    eos = set(engine.eos_token_ids)
    width = params.beam_width
    vocab = engine.config.model.vocab_size
    if 2 * width > vocab:  # each step asks for 2 * beam_width candidates per beam
        raise ValueError(
            f"BeamSearchParams.beam_width={width} is more than half the vocabulary ({vocab} tokens)"
        )
    step_params = SamplingParams(
        temperature=params.temperature, max_tokens=1, logprobs=2 * width, ignore_eos=True, detokenize=False
    )
    prompt_ids = []
    for p in prompts:
        if isinstance(p, dict) and "prompt" in p and "prompt_token_ids" not in p:
            p = p["prompt"]
        prompt_ids.append(engine.prepare_prompt(p).token_ids)
    live = [[BeamSearchSequence(tokens=list(ids))] for ids in prompt_ids]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    limit = engine.max_model_len
    for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
        flat = [(i, b) for i, beams in enumerate(live) for b in beams if len(b.tokens) < limit]
        if not flat:
            break
        # 2 * width logprobs is what the algorithm needs, whatever the engine's cap for user requests.
        ids = [
            engine.add_request({"prompt_token_ids": b.tokens}, step_params, max_logprobs=2 * width)
            for _, b in flat
        ]
        outs = engine.run_to_completion(ids)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(flat, outs):
            for tid, lp in out.outputs[0].logprobs[0].items():
                cand = BeamSearchSequence(
                    tokens=beam.tokens + [tid],
                    cum_logprob=beam.cum_logprob + lp.logprob,
                    logprobs=beam.logprobs + [{tid: lp}],
                )
                if tid in eos and not params.ignore_eos:
                    cand.finish_reason, cand.stop_reason = "stop", None
                    done[i].append(cand)
                else:
                    candidates[i].append(cand)
        live = [sorted(c, key=lambda s: s.cum_logprob, reverse=True)[:width] for c in candidates]
    results = []
    for i, ids in enumerate(prompt_ids):
        for b in live[i]:
            b.finish_reason = b.finish_reason or "length"
        pool = done[i] + live[i]
        best = sorted(pool, key=lambda s: beam_score(s, len(ids), eos, params.length_penalty), reverse=True)
        best = best[:width]
        for b in best:
            gen = b.tokens[len(ids) :]
            if gen and gen[-1] in eos and not params.include_stop_str_in_output:
                gen = gen[:-1]
            b.text = tok.decode(ids + gen, skip_special_tokens=True)
        results.append(BeamSearchOutput(sequences=best))
    return results
