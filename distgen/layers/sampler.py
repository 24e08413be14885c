"""Batched token sampling on rank 0, with vLLM v1 semantics and no host-device sync.

Order of operations per step, for a batch of ``B`` rows over a vocabulary of ``V``:

1. logprobs of the *raw* logits (float32 ``log_softmax``), when any row asks for them;
2. a grammar's mask (structured outputs), ``allowed_token_ids`` (every other id set to ``-inf``),
   then ``logit_bias`` (added);
   blocked ids set to ``-inf``: stop/EOS ids while a row is below its ``min_tokens``, and each
   bad word's last token where the output ends with the rest of the word;
3. penalties: repetition (prompt + output tokens), then frequency and presence (output tokens);
4. greedy rows: ``argmax``;
5. random rows: temperature, top-k, top-p, min-p, then the Exp(1) race
   ``argmax(probs / q)`` with ``q ~ Exp(1)``, which samples from ``probs`` without
   ``torch.multinomial``. Seeded rows draw ``q`` from their own generator, so their tokens do not
   depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgen.host_to_device import to_device
from distgen.kernels.dispatch import cpu_kernels, use_cpu_kernels
from distgen.layers.sampling_metadata import (
    SAMPLING_EPS,
    AllowedTokens,
    GrammarMask,
    LogitBias,
    SamplingMetadata,
)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, max_num_logprobs + 1]: col 0 = sampled, then top ids
    logprobs: torch.Tensor | None  # [B, max_num_logprobs + 1]
    sampled_token_ranks: torch.Tensor | None  # [B], 1 = most likely


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token: ``logits.argmax(-1)``; on the CPU kernels' path their vectorized row
    argmax, which gives torch's answer (ties and NaN included) several times faster."""
    if logits.dim() == 2 and logits.is_contiguous() and use_cpu_kernels(logits):
        return cpu_kernels().argmax_rows(logits)
    return logits.argmax(dim=-1)


class Sampler(torch.nn.Module):
    """Turns the last-position logits ``[B, V]`` into one token per row (see the module docstring)."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        plain_greedy = meta.all_greedy and meta.no_penalties and meta.max_num_logprobs is None
        no_bias = meta.allowed is None and meta.logit_bias is None and meta.grammar is None
        if plain_greedy and not meta.blocked and no_bias:
            # Widening to float32 keeps every value and its order, so argmax needs no float32 copy
            # of the logits (a launch and B x V x 6 bytes of traffic each step on a GPU).
            return SamplerOutput(argmax(logits), None, None, None)
        logits = logits.float()  # every step below is out of place: the caller's tensor is untouched
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = apply_grammar(logits, meta.grammar)
        logits = apply_allowed_and_bias(logits, meta.allowed, meta.logit_bias)
        logits = apply_blocked(logits, meta.blocked)
        if not meta.no_penalties:
            logits = apply_penalties(logits, meta)

        greedy_ids = None if meta.all_random else argmax(logits)
        if meta.all_greedy:
            sampled = greedy_ids
        else:
            random_ids = sample_random(logits, meta)
            if greedy_ids is None:
                sampled = random_ids
            else:
                sampled = torch.where(meta.temperature < SAMPLING_EPS, greedy_ids, random_ids)

        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        ids, lps, ranks = gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, ids, lps, ranks)


# -- steps, usable on their own ---------------------------------------------------------------------
def apply_grammar(logits: torch.Tensor, grammar: GrammarMask | None) -> torch.Tensor:
    """Rows with a grammar (structured outputs) keep only the tokens it allows next."""
    if grammar is None:
        return logits
    rows = grammar.rows
    return logits.index_put((rows,), logits[rows].masked_fill(~grammar.allowed, float("-inf")))


def apply_allowed_and_bias(
    logits: torch.Tensor, allowed: AllowedTokens | None, bias: LogitBias | None
) -> torch.Tensor:
    """Rows with ``allowed_token_ids`` keep only those ids (the rest ``-inf``); then each
    ``logit_bias`` entry is added to its (row, id). Two indexed writes at most, no host sync."""
    if allowed is not None:
        forbidden = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        forbidden[allowed.rows] = True
        forbidden[allowed.pair_rows, allowed.pair_ids] = False
        logits = logits.masked_fill(forbidden, float("-inf"))
    if bias is not None:
        logits = logits.index_put((bias.rows, bias.token_ids), bias.values, accumulate=True)
    return logits


def apply_blocked(logits: torch.Tensor, blocked: dict[int, set[int]]) -> torch.Tensor:
    """Set ``logits[row, id] = -inf`` for every blocked (row, id), in one indexed write."""
    if not blocked:
        return logits
    rows = [r for r, ids in blocked.items() for _ in ids]
    cols = [t for ids in blocked.values() for t in ids]
    if not rows:
        return logits
    idx = (
        to_device(rows, logits.device, torch.long),
        to_device(cols, logits.device, torch.long),
    )
    return logits.index_put(idx, logits.new_full((), float("-inf")))


def output_token_counts(output_token_ids: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """``[B, V]`` float32 counts of each token in each row's output, via one scatter_add."""
    num_rows = len(output_token_ids)
    max_len = max((len(o) for o in output_token_ids), default=0)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    if max_len:
        padded = [o + [vocab_size] * (max_len - len(o)) for o in output_token_ids]
        ids = to_device(padded, device, torch.long)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output) penalties, batched."""
    num_rows, vocab_size = logits.shape
    counts = output_token_counts(meta.output_token_ids, vocab_size, logits.device)
    seen_in_output = counts > 0
    if meta.repetition_penalties is not None:
        seen = seen_in_output
        if meta.prompt_token_ids is not None:
            in_prompt = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
            in_prompt.scatter_(1, meta.prompt_token_ids.to(logits.device), True)
            seen = seen | in_prompt[:, :vocab_size]
        rep = meta.repetition_penalties.to(logits).unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if meta.frequency_penalties is not None:
        logits = logits - meta.frequency_penalties.to(logits).unsqueeze(1) * counts
    if meta.presence_penalties is not None:
        logits = logits - meta.presence_penalties.to(logits).unsqueeze(1) * seen_in_output.to(logits)
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask all but each row's ``top_k`` largest logits, then all outside its top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability sums to at least
    ``top_p``; the most likely token is always kept. Exactly ``k`` tokens survive top-k, ties or not.
    """
    if top_k is None and top_p is None:
        return logits
    vocab_size = logits.shape[-1]
    if top_k is not None and logits.device.type == "cpu":
        # Off the GPU, reading the largest k costs no sync, and a partial top-k beats a full sort.
        max_k = int(top_k.max())
        if 0 < max_k <= vocab_size // 4:
            head, order = logits.topk(max_k, dim=-1)  # descending
            head, order = head.flip(-1), order.flip(-1)
            head = head.masked_fill(_sorted_mask(head, top_k, top_p), float("-inf"))
            return torch.full_like(logits, float("-inf")).scatter(-1, order, head)
    if top_k is None and logits.device.type == "cpu":
        masked = _top_p_from_head(logits, top_p)
        if masked is not None:
            return masked
    sorted_logits, order = logits.sort(dim=-1)
    mask = _sorted_mask(sorted_logits, top_k, top_p)
    return logits.masked_fill(mask.scatter(-1, order, mask), float("-inf"))


_TOP_P_HEAD = 1024


def _top_p_from_head(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor | None:
    """Top-p from each row's largest ``_TOP_P_HEAD`` logits when every nucleus fits in them (the usual
    case), else None. Sorting a whole 50k-128k vocabulary is the CPU sampler's largest cost.

    Tokens outside the head are dropped, which the full rule would do too: together they weigh
    ``1 - covered <= 1 - top_p``.
    """
    n = min(_TOP_P_HEAD, logits.shape[-1])
    head, order = logits.topk(n, dim=-1)  # descending
    probs = (head - logits.logsumexp(dim=-1, keepdim=True)).exp()
    covered = probs.sum(dim=-1)
    top_p = top_p.to(logits)
    if not bool((covered >= top_p).all()):
        return None
    ascending, order = probs.flip(-1), order.flip(-1)
    cum = (1.0 - covered).unsqueeze(1) + ascending.cumsum(dim=-1)
    drop = cum <= 1.0 - top_p.unsqueeze(1)
    drop[:, -1] = False
    kept = logits.gather(-1, order).masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, kept)


def _sorted_mask(
    ascending: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Which entries of ascending-sorted logits (a row's full vocabulary, or its largest ``n``) to drop."""
    n = ascending.shape[-1]
    mask = torch.zeros_like(ascending, dtype=torch.bool)
    if top_k is not None:
        keep = top_k.to(ascending.device).clamp(1, n)
        mask = torch.arange(n, device=ascending.device).unsqueeze(0) < (n - keep).unsqueeze(1)
        ascending = ascending.masked_fill(mask, float("-inf"))
    if top_p is not None:
        cum = ascending.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when everything at or below it weighs <= 1 - p: what stays still weighs >= p.
        drop = cum <= 1.0 - top_p.to(ascending).unsqueeze(1)
        drop[:, -1] = False
        mask = mask | drop
    return mask


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's largest probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.to(logits).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one id per row from ``probs`` as ``argmax(probs / q)``, ``q ~ Exp(1)``; no host sync.

    ``q = -log(u)`` with ``u`` uniform in ``(0, 1)``: the inverse CDF of Exp(1), and several times
    faster on the CPU than ``exponential_``. ``u`` starts at the smallest normal float, so ``q`` is
    finite and never zero.
    """
    u = torch.empty_like(probs)
    lo = torch.finfo(u.dtype).tiny
    if len(generators) < probs.shape[0]:
        u.uniform_(lo, 1.0)
    for row, gen in generators.items():
        u[row].uniform_(lo, 1.0, generator=gen)
    return probs.div(u.log_().neg_()).argmax(dim=-1)


def sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then the exponential race, for every row of the batch."""
    temperature = meta.temperature.to(logits)
    if not meta.all_random:  # greedy rows carry 0; they are sampled here only to be discarded
        temperature = torch.where(temperature < SAMPLING_EPS, torch.ones_like(temperature), temperature)
    logits = logits / temperature.unsqueeze(1)
    logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    return exponential_race(logits.softmax(dim=-1), meta.generators)


def gather_logprobs(
    logprobs: torch.Tensor, sampled: torch.Tensor, num_logprobs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids ``[B, n + 1]`` (sampled token first, then the top ``n``), their logprobs, and the rank."""
    sampled = sampled.unsqueeze(1)
    sampled_logprob = logprobs.gather(-1, sampled)
    ranks = (logprobs >= sampled_logprob).sum(dim=-1)
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)
    ids = torch.cat([sampled, top_ids], dim=1)
    return ids, torch.cat([sampled_logprob, top_logprobs], dim=1), ranks
