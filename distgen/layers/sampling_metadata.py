"""The per-step sampling state of a batch, built from each row's ``SamplingSpec`` on rank 0.

Optional parts stay ``None`` (or empty) when no row in the batch uses them, so the sampler
(:mod:`distgen.layers.sampler`) skips that work; per-row sparse settings (``allowed_token_ids``,
``logit_bias``) travel as index tensors, applied with one indexed write each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from distgen.host_to_device import to_device
from distgen.sampling_spec import SamplingSpec
from distgen.structured_output import GrammarBitmask, allows_other_than, unpack_bitmask

SAMPLING_EPS = 1e-5


class AllowedTokens(NamedTuple):
    """The rows restricted by ``allowed_token_ids``, and every (row, id) pair they allow."""

    rows: torch.Tensor  # [R] int64: each restricted row once
    pair_rows: torch.Tensor  # [N] int64: the row of each allowed pair
    pair_ids: torch.Tensor  # [N] int64: the token id of each allowed pair


class LogitBias(NamedTuple):
    """Every ``logit_bias`` entry of the batch as parallel tensors: ``values[i]`` goes to
    ``(rows[i], token_ids[i])``."""

    rows: torch.Tensor  # [N] int64
    token_ids: torch.Tensor  # [N] int64
    values: torch.Tensor  # [N] float32


class GrammarMask(NamedTuple):
    """The rows with a grammar (structured outputs) and the tokens each allows this step."""

    rows: torch.Tensor  # [k] int64
    allowed: torch.Tensor  # [k, V] bool


@dataclass
class SamplingMetadata:
    """Per-step sampling state of the ``B`` rows in a batch (built once per step by the runner)."""

    temperature: torch.Tensor  # [B] float32 (0 for greedy rows)
    all_greedy: bool
    all_random: bool
    top_p: torch.Tensor | None  # [B] float32; None when no row uses top-p (< 1)
    top_k: torch.Tensor | None  # [B] int64, vocab_size where disabled; None when no row uses it
    min_p: torch.Tensor | None  # [B] float32; None when no row uses it
    generators: dict[int, torch.Generator]  # row -> per-request generator (seeded requests)
    max_num_logprobs: int | None  # None: no row wants logprobs
    no_penalties: bool
    presence_penalties: torch.Tensor | None  # [B]
    frequency_penalties: torch.Tensor | None  # [B]
    repetition_penalties: torch.Tensor | None  # [B]
    prompt_token_ids: torch.Tensor | None  # [B, P] int64, padded with vocab_size
    output_token_ids: list[list[int]]  # per row, tokens generated so far
    # row -> ids forbidden this step: stop/EOS ids below min_tokens, and bad words' last tokens
    blocked: dict[int, set[int]] = field(default_factory=dict)
    allowed: AllowedTokens | None = None  # None when no row has allowed_token_ids
    logit_bias: LogitBias | None = None  # None when no row has a logit_bias
    grammar: GrammarMask | None = None  # None when no row has a grammar


def bad_word_ends(bad_words: list[list[int]], output: Sequence[int]) -> set[int]:
    """The tokens that would complete a bad word now: a word's last token, where the output ends
    with the rest of it (a one-token word: always). Only the output counts, not the prompt."""
    ends = set()
    for seq in bad_words:
        head = len(seq) - 1
        if head == 0 or (len(output) >= head and list(output[len(output) - head :]) == seq[:-1]):
            ends.add(seq[-1])
    return ends


def build_sampling_metadata(
    params: Sequence[SamplingSpec],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: list[list[int]],
    generators: dict[int, torch.Generator],
    vocab_size: int,
    device: torch.device | str = "cpu",
    grammar_bitmask: GrammarBitmask | None = None,
) -> SamplingMetadata:
    """Build the step's metadata from each row's ``SamplingSpec`` and token history.

    ``generators`` maps a row to its request's persistent generator (requests with a seed);
    ``output_token_ids`` is kept by reference; ``grammar_bitmask`` holds the constrained rows and
    their packed allowed tokens (:class:`~distgen.workers.grammar_matchers.GrammarMatchers`). Optional
    tensors are left ``None`` when no row needs them, so the sampler skips that work.
    """
    greedy = [p.is_greedy for p in params]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    rep = [float(p.repetition_penalty) for p in params]
    freq = [float(p.frequency_penalty) for p in params]
    pres = [float(p.presence_penalty) for p in params]

    def floats(values: list[float]) -> torch.Tensor:
        return to_device(values, device, torch.float32)

    use_rep = any(abs(r - 1.0) > SAMPLING_EPS for r in rep)
    use_freq = any(abs(f) > SAMPLING_EPS for f in freq)
    use_pres = any(abs(p) > SAMPLING_EPS for p in pres)
    prompts = _padded_prompts(prompt_token_ids, vocab_size, device) if use_rep else None
    blocked = _blocked_ids(params, output_token_ids, vocab_size)
    allowed = _allowed_tokens(params, device)
    bias = _logit_bias(params, device)
    grammar = None
    if grammar_bitmask is not None:
        grammar = _grammar_mask(grammar_bitmask, blocked, vocab_size, device)

    wanted = [p.logprobs for p in params if p.logprobs is not None]
    use_top_p = any(p.top_p < 1.0 for p in params)
    use_top_k = any(k < vocab_size for k in top_k)
    use_min_p = any(p.min_p > SAMPLING_EPS for p in params)
    return SamplingMetadata(
        temperature=floats([0.0 if g else float(p.temperature) for g, p in zip(greedy, params, strict=True)]),
        all_greedy=all(greedy),
        all_random=not any(greedy),
        top_p=floats([float(p.top_p) for p in params]) if use_top_p else None,
        top_k=to_device(top_k, device, torch.long) if use_top_k else None,
        min_p=floats([float(p.min_p) for p in params]) if use_min_p else None,
        generators=generators,
        max_num_logprobs=max(wanted) if wanted else None,
        no_penalties=not (use_rep or use_freq or use_pres),
        presence_penalties=floats(pres) if use_pres else None,
        frequency_penalties=floats(freq) if use_freq else None,
        repetition_penalties=floats(rep) if use_rep else None,
        prompt_token_ids=prompts,
        output_token_ids=output_token_ids,
        blocked=blocked,
        allowed=allowed,
        logit_bias=bias,
        grammar=grammar,
    )


def _padded_prompts(
    prompt_token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """The prompts as one ``[B, P]`` tensor, padded with ``vocab_size`` (an id no token has)."""
    width = max((len(p) for p in prompt_token_ids), default=0)
    padded = [list(p) + [vocab_size] * (width - len(p)) for p in prompt_token_ids]
    return to_device(padded, device, torch.long).reshape(len(prompt_token_ids), width)


def _blocked_ids(
    params: Sequence[SamplingSpec], output_token_ids: list[list[int]], vocab_size: int
) -> dict[int, set[int]]:
    """Row -> the ids it may not sample this step: its stop ids while it is below ``min_tokens``,
    and the tokens that would complete one of its bad words."""
    blocked: dict[int, set[int]] = {}
    for row, p in enumerate(params):
        ids = set()
        if len(output_token_ids[row]) < p.min_tokens:
            ids.update(p.all_stop_token_ids)
        if p.bad_words_token_ids:
            ids.update(bad_word_ends(p.bad_words_token_ids, output_token_ids[row]))
        ids = {t for t in ids if t < vocab_size}
        if ids:
            blocked[row] = ids
    return blocked


def _allowed_tokens(params: Sequence[SamplingSpec], device: torch.device | str) -> AllowedTokens | None:
    restricted = [r for r, p in enumerate(params) if p.allowed_token_ids]
    if not restricted:
        return None
    pairs = [(r, t) for r in restricted for t in params[r].allowed_token_ids]
    return AllowedTokens(
        rows=to_device(restricted, device, torch.long),
        pair_rows=to_device([r for r, _ in pairs], device, torch.long),
        pair_ids=to_device([t for _, t in pairs], device, torch.long),
    )


def _logit_bias(params: Sequence[SamplingSpec], device: torch.device | str) -> LogitBias | None:
    entries = [(r, t, b) for r, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()]
    if not entries:
        return None
    return LogitBias(
        rows=to_device([r for r, _, _ in entries], device, torch.long),
        token_ids=to_device([t for _, t, _ in entries], device, torch.long),
        values=to_device([b for _, _, b in entries], device, torch.float32),
    )


def _grammar_mask(
    bitmask: GrammarBitmask, blocked: dict[int, set[int]], vocab_size: int, device: torch.device | str
) -> GrammarMask:
    """The constrained rows' masks, unpacked on the device. Removes from ``blocked`` a row whose
    grammar allows nothing but blocked tokens (it can only end, and min_tokens says not yet): the
    grammar wins there, since blocking them all would leave nothing to sample."""
    for k, row in enumerate(bitmask.rows):
        if row in blocked and not allows_other_than(bitmask.packed[k], blocked[row]):
            del blocked[row]
    packed_on_device = to_device(bitmask.packed.numpy(), device)  # asynchronous, like every input
    return GrammarMask(
        rows=to_device(bitmask.rows, device, torch.long),
        allowed=unpack_bitmask(packed_on_device, vocab_size),
    )
