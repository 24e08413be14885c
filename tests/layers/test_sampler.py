"""Sampler: greedy, seeds, top-k/top-p/min-p, temperature, penalties, min_tokens, allowed ids and
logit bias, logprobs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from distgen.layers.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p
from distgen.layers.sampling_metadata import SamplingMetadata, build_sampling_metadata
from distgen.sampling_params import SamplingParams
from distgen.sampling_spec import SamplingSpec

NEG_INF = float("-inf")


def make_meta(batch: int, **overrides) -> SamplingMetadata:
    """Metadata for ``batch`` random rows at temperature 1 with everything else disabled."""
    fields = dict(
        temperature=torch.ones(batch),
        all_greedy=False,
        all_random=True,
        top_p=None,
        top_k=None,
        min_p=None,
        generators={},
        max_num_logprobs=None,
        no_penalties=True,
        presence_penalties=None,
        frequency_penalties=None,
        repetition_penalties=None,
        prompt_token_ids=None,
        output_token_ids=[[] for _ in range(batch)],
        blocked={},
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)


def greedy_meta(batch: int, **overrides) -> SamplingMetadata:
    return make_meta(batch, temperature=torch.zeros(batch), all_greedy=True, all_random=False, **overrides)


def repeated(logits_row: torch.Tensor, n: int) -> torch.Tensor:
    return logits_row.unsqueeze(0).expand(n, -1).contiguous()


def support(ids: torch.Tensor) -> set[int]:
    return set(ids.tolist())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


sampler = Sampler()


# -- greedy ------------------------------------------------------------------------------------------
def test_greedy_is_argmax():
    logits = torch.randn(7, 50)
    out = sampler(logits, greedy_meta(7))
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_token_ranks is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_on_half_logits_equals_greedy_on_their_float32(dtype):
    """Plain greedy takes argmax of the logits as they come, without a float32 copy; ties (frequent in
    bf16) must still resolve to the first maximum, as on float32."""
    logits = (torch.randn(64, 3000) * 4).to(dtype)
    logits[3, [7, 2000]] = 100.0  # a tie: the first index wins
    out = sampler(logits, greedy_meta(64))
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.sampled_token_ids[3] == 7


def test_mixed_batch_greedy_rows_argmax_random_rows_sample():
    logits = repeated(torch.zeros(20), 400)  # uniform: random rows must spread
    logits[:, 5] = 0.01  # argmax, barely
    temperature = torch.ones(400)
    temperature[::2] = 0.0
    meta = make_meta(400, temperature=temperature, all_random=False)
    ids = sampler(logits, meta).sampled_token_ids
    assert torch.all(ids[::2] == 5)
    assert len(support(ids[1::2])) > 10


def test_caller_logits_untouched():
    logits = torch.randn(3, 16)
    before = logits.clone()
    meta = make_meta(
        3,
        top_k=torch.tensor([2, 16, 4]),
        top_p=torch.tensor([0.5, 0.9, 1.0]),
        min_p=torch.tensor([0.1, 0.0, 0.2]),
        temperature=torch.tensor([0.7, 1.0, 1.3]),
        no_penalties=False,
        repetition_penalties=torch.tensor([1.5, 1.5, 1.5]),
        output_token_ids=[[1, 2], [3], []],
        blocked={0: {4}},
    )
    sampler(logits, meta)
    assert torch.equal(logits, before)


# -- seeds -------------------------------------------------------------------------------------------
def _seeded_run(target_row: torch.Tensor, batch: int, position: int, seed: int, steps: int = 12) -> list[int]:
    """Sample ``steps`` tokens for one seeded request sitting at ``position`` in a batch of strangers."""
    gen = torch.Generator().manual_seed(seed)
    tokens = []
    for step in range(steps):
        logits = torch.randn(batch, target_row.numel()) * 3  # other rows change every step
        logits[position] = target_row
        temperature = torch.full((batch,), 0.8)
        temperature[(position + 1) % batch] = 0.0  # a greedy neighbour, when there is one
        if batch == 1:
            temperature[0] = 0.8
        generators = {position: gen}
        if batch > 2:
            generators[(position + 2) % batch] = torch.Generator().manual_seed(1000 + step)
        top_k = torch.full((batch,), target_row.numel())
        top_k[(position + 1) % batch] = 3 if batch > 1 else target_row.numel()
        meta = make_meta(
            batch,
            temperature=temperature,
            all_random=bool((temperature > 0).all()),
            generators=generators,
            top_k=top_k,
        )
        tokens.append(int(sampler(logits, meta).sampled_token_ids[position]))
    return tokens


def test_seeded_rows_reproducible_across_batch_composition_and_position():
    target = torch.randn(64) * 0.5  # flat enough that the seed decides
    alone = _seeded_run(target, batch=1, position=0, seed=42)
    assert len(set(alone)) > 3  # really random, not a disguised argmax
    assert _seeded_run(target, batch=5, position=3, seed=42) == alone
    assert _seeded_run(target, batch=9, position=0, seed=42) == alone
    torch.manual_seed(999)  # the global RNG must not matter either
    assert _seeded_run(target, batch=3, position=2, seed=42) == alone


def test_different_seeds_differ():
    target = torch.randn(64) * 0.5
    a = _seeded_run(target, batch=1, position=0, seed=1)
    b = _seeded_run(target, batch=1, position=0, seed=2)
    assert a != b


# -- top-k / top-p / min-p ------------------------------------------------------------------------------
def test_top_k_1_equals_greedy():
    logits = torch.randn(16, 100) * 0.3
    meta = make_meta(16, temperature=torch.full((16,), 1.5), top_k=torch.ones(16, dtype=torch.long))
    assert torch.equal(sampler(logits, meta).sampled_token_ids, logits.argmax(-1))


def test_top_k_keeps_exactly_k_tokens():
    row = torch.randn(30) * 0.3
    n = 4000
    top_k = torch.tensor([5, 2] * (n // 2))
    out = sampler(repeated(row, n), make_meta(n, top_k=top_k)).sampled_token_ids
    assert support(out[0::2]) == support(row.topk(5).indices)
    assert support(out[1::2]) == support(row.topk(2).indices)


def test_top_k_mask_exact_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([2]), None)
    assert int(torch.isfinite(masked).sum()) == 2
    wide = torch.cat([logits, torch.full((1, 20), -5.0)], dim=1)  # small k: the partial top-k path
    assert int(torch.isfinite(apply_top_k_top_p(wide, torch.tensor([2]), None)).sum()) == 2


def test_partial_top_k_path_matches_full_sort_path():
    vocab = 200
    logits = torch.randn(4, vocab) * 2
    top_k = torch.tensor([3, 10, 40, 25])
    top_p = torch.tensor([0.5, 0.9, 1.0, 0.3])
    head_path = apply_top_k_top_p(logits, top_k, top_p)  # every k <= vocab / 4
    # One extra row with top-k disabled forces the full sort for the whole batch.
    both = apply_top_k_top_p(
        torch.cat([logits, logits[:1]]),
        torch.cat([top_k, top_k.new_tensor([vocab])]),
        torch.cat([top_p, top_p[:1]]),
    )
    assert torch.equal(head_path, both[:4])
    kept = torch.isfinite(head_path).sum(-1)
    assert kept[2] == 40 and bool((kept[:2] <= top_k[:2]).all()) and bool((kept >= 1).all())
    assert torch.equal(head_path[torch.isfinite(head_path)], logits[torch.isfinite(head_path)])


# A hand-built distribution, deliberately not sorted.
NUCLEUS_PROBS = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.3, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p_keeps_the_nucleus(top_p, kept):
    logits = NUCLEUS_PROBS.log().unsqueeze(0)
    masked = apply_top_k_top_p(logits, None, torch.tensor([top_p]))
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == kept

    n = 4000
    out = sampler(repeated(logits[0], n), make_meta(n, top_p=torch.full((n,), top_p))).sampled_token_ids
    assert support(out) == kept
    # Kept tokens keep their relative weights.
    renorm = {t: float(NUCLEUS_PROBS[t]) / sum(float(NUCLEUS_PROBS[k]) for k in kept) for t in kept}
    counts = Counter(out.tolist())
    for t, p in renorm.items():
        assert abs(counts[t] / n - p) < 0.04


def test_top_k_then_top_p_combined():
    logits = NUCLEUS_PROBS.log().unsqueeze(0)
    # top-k=3 leaves {1, 3, 4} with weights 0.47, 0.35, 0.18; top-p 0.7 then keeps {1, 3}.
    masked = apply_top_k_top_p(logits, torch.tensor([3]), torch.tensor([0.7]))
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == {1, 3}


def test_min_p_mask():
    probs = torch.tensor([0.06, 0.30, 0.04, 0.50, 0.10])
    logits = probs.log().unsqueeze(0)
    masked = apply_min_p(logits, torch.tensor([0.15]))  # threshold 0.075
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == {1, 3, 4}

    n = 3000
    meta = make_meta(n, min_p=torch.tensor([0.15, 0.5] * (n // 2)))
    out = sampler(repeated(logits[0], n), meta).sampled_token_ids
    assert support(out[0::2]) == {1, 3, 4}
    assert support(out[1::2]) == {1, 3}  # threshold 0.25


# -- temperature -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_matches_softmax(temperature):
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 40000
    meta = make_meta(n, temperature=torch.full((n,), temperature))
    out = sampler(repeated(row, n), meta).sampled_token_ids
    observed = torch.bincount(out, minlength=row.numel()).double()
    expected = torch.softmax(row.double() / temperature, -1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, observed.tolist(), expected.tolist())  # 5 dof: p < 2e-5 at 30


# -- penalties ---------------------------------------------------------------------------------------------
def _reference_penalties(logits, prompts, outputs, rep, freq, pres):
    out = logits.clone()
    for r in range(logits.shape[0]):
        for t in set(prompts[r]) | set(outputs[r]):
            v = float(out[r, t])
            out[r, t] = v / rep[r] if v > 0 else v * rep[r]
        for t, c in Counter(outputs[r]).items():
            out[r, t] -= freq[r] * c + pres[r]
    return out


PROMPTS = [[1, 2, 3], [4], [0, 0, 9, 11], [5, 6]]
OUTPUTS = [[3, 3, 7], [], [2, 2, 2, 10, 0], [6]]
REP = [1.0, 1.3, 0.8, 2.0]
FREQ = [0.0, 0.5, -0.3, 1.0]
PRES = [0.2, 0.0, 1.0, -0.5]


def _penalty_meta(vocab: int, rep=True, freq=True, pres=True) -> SamplingMetadata:
    width = max(len(p) for p in PROMPTS)
    prompts = torch.tensor([p + [vocab] * (width - len(p)) for p in PROMPTS])
    return greedy_meta(
        4,
        no_penalties=False,
        repetition_penalties=torch.tensor(REP) if rep else None,
        frequency_penalties=torch.tensor(FREQ) if freq else None,
        presence_penalties=torch.tensor(PRES) if pres else None,
        prompt_token_ids=prompts,
        output_token_ids=[list(o) for o in OUTPUTS],
    )


@pytest.mark.parametrize("rep, freq, pres", [(True, True, True), (True, False, False), (False, True, True)])
def test_penalties_match_reference(rep, freq, pres):
    vocab = 12
    logits = torch.randn(4, vocab) * 2
    expected = _reference_penalties(
        logits,
        PROMPTS,
        OUTPUTS,
        REP if rep else [1.0] * 4,
        FREQ if freq else [0.0] * 4,
        PRES if pres else [0.0] * 4,
    )
    got = apply_penalties(logits, _penalty_meta(vocab, rep, freq, pres))
    assert not torch.allclose(got, logits)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # The sampler uses the penalized logits for its decision.
    out = sampler(logits, _penalty_meta(vocab, rep, freq, pres)).sampled_token_ids
    assert torch.equal(out, expected.argmax(-1))


def test_repetition_penalty_flips_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    meta = greedy_meta(
        1,
        no_penalties=False,
        repetition_penalties=torch.tensor([2.0]),
        prompt_token_ids=torch.tensor([[0, 3]]),  # 3 = padding
        output_token_ids=[[]],
    )
    assert int(sampler(logits, meta).sampled_token_ids[0]) == 1


# -- min_tokens --------------------------------------------------------------------------------------------
def test_min_tokens_blocks_eos():
    eos, other_stop = 3, 7
    logits = torch.randn(2, 10)
    logits[:, eos] = 10.0
    logits[:, other_stop] = 9.0
    meta = greedy_meta(2, blocked={0: {eos, other_stop}})
    ids = sampler(logits, meta).sampled_token_ids
    masked = logits[0].clone()
    masked[[eos, other_stop]] = NEG_INF
    assert int(ids[0]) == int(masked.argmax())
    assert int(ids[1]) == eos

    # Random rows too: never EOS while blocked, even though it holds almost all the mass.
    n = 500
    meta = make_meta(n, blocked={r: {eos} for r in range(n)})
    ids = sampler(repeated(logits[0], n), meta).sampled_token_ids
    assert eos not in support(ids)


# -- allowed_token_ids and logit_bias --------------------------------------------------------------------
def _metadata_for(params: list[SamplingParams], vocab: int) -> SamplingMetadata:
    specs = [SamplingSpec.from_params(p) for p in params]
    return build_sampling_metadata(specs, [[1]] * len(params), [[] for _ in params], {}, vocab)


def test_logit_bias_moves_greedy_and_random_rows_and_leaves_logprobs_raw():
    vocab, favourite, pushed = 30, 4, 17
    logits = torch.randn(3, vocab)
    logits[:, favourite] = 8.0
    params = [
        SamplingParams(temperature=0, logit_bias={pushed: 100.0}),
        SamplingParams(temperature=0, logit_bias={favourite: -100.0}, logprobs=1),
        SamplingParams(temperature=0),  # no bias: untouched by its neighbours'
    ]
    out = sampler(logits, _metadata_for(params, vocab))
    unfavoured = logits[1].clone()
    unfavoured[favourite] -= 100
    assert out.sampled_token_ids.tolist() == [pushed, int(unfavoured.argmax()), favourite]
    # Logprobs are of the raw logits, as in vLLM: the bias does not show in them.
    raw = torch.log_softmax(logits[1], -1)
    torch.testing.assert_close(out.logprobs[1, 0], raw[out.sampled_token_ids[1]])
    # A random row: a +100 bias takes essentially all the mass.
    n = 200
    biased = [SamplingParams(temperature=1.0, logit_bias={pushed: 100.0}) for _ in range(n)]
    drawn = sampler(repeated(logits[0], n), _metadata_for(biased, vocab)).sampled_token_ids
    assert support(drawn) == {pushed}


def test_allowed_token_ids_restrict_only_their_rows():
    vocab, allowed = 30, [2, 11, 29]
    logits = torch.randn(4, vocab)
    logits[:, 5] = 20.0  # everyone's favourite, not allowed
    params = [
        SamplingParams(temperature=0, allowed_token_ids=allowed),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, allowed_token_ids=[7], logit_bias={7: -50.0, 5: 3.0}),
        SamplingParams(temperature=0, allowed_token_ids=allowed, logit_bias={29: 100.0}),
    ]
    ids = sampler(logits, _metadata_for(params, vocab)).sampled_token_ids.tolist()
    assert ids[0] == allowed[int(logits[0, allowed].argmax())]
    assert ids[1:] == [5, 7, 29]  # row 2: the only allowed id, however biased
    n = 400
    rows = [SamplingParams(temperature=1.5, allowed_token_ids=allowed) for _ in range(n)]
    drawn = sampler(repeated(logits[0], n), _metadata_for(rows, vocab)).sampled_token_ids
    assert support(drawn) <= set(allowed) and len(support(drawn)) > 1


# -- logprobs ----------------------------------------------------------------------------------------------
def test_logprobs_from_raw_logits_with_sampled_first_and_ranks():
    batch, vocab, k = 6, 40, 4
    logits = torch.randn(batch, vocab)
    raw_top = logits.argmax(-1)
    temperature = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 0.0])
    meta = make_meta(
        batch,
        temperature=temperature,
        all_random=False,
        max_num_logprobs=k,
        no_penalties=False,
        repetition_penalties=torch.full((batch,), 50.0),
        output_token_ids=[[int(t)] for t in raw_top],  # punish each row's raw favourite
        top_k=torch.tensor([vocab, vocab, 10, 10, vocab, vocab]),
    )
    out = sampler(logits, meta)
    sampled = out.sampled_token_ids
    expected_lp = torch.log_softmax(logits, -1)
    assert out.logprob_token_ids.shape == (batch, k + 1) and out.logprobs.shape == (batch, k + 1)
    assert torch.equal(out.logprob_token_ids[:, 0], sampled)
    torch.testing.assert_close(out.logprobs[:, 0], expected_lp.gather(1, sampled[:, None]).squeeze(1))
    top_lp, top_ids = expected_lp.topk(k, -1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(out.logprobs[:, 1:], top_lp)
    expected_rank = 1 + (expected_lp > expected_lp.gather(1, sampled[:, None])).sum(-1)
    assert torch.equal(out.sampled_token_ranks, expected_rank)
    assert bool((out.sampled_token_ranks > 1).all())  # the penalty moved every row off its raw top


def test_zero_logprobs_gives_only_the_sampled_token():
    logits = torch.randn(3, 20)
    out = sampler(logits, greedy_meta(3, max_num_logprobs=0))
    assert out.logprob_token_ids.shape == (3, 1)
    assert torch.equal(out.sampled_token_ranks, torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(out.logprobs[:, 0], torch.log_softmax(logits, -1).amax(-1))


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_top_p_head_path_equals_full_sort(p):
    from distgen.layers import sampler as smp

    torch.manual_seed(3)
    logits = torch.randn(6, 5000) * 4
    top_p = torch.full((6,), p)
    fast = smp._top_p_from_head(logits, top_p)
    assert fast is not None  # peaked rows: every nucleus fits in the head
    ascending, order = logits.sort(dim=-1)
    mask = smp._sorted_mask(ascending, None, top_p)
    full = logits.masked_fill(mask.scatter(-1, order, mask), float("-inf"))
    # The two sum the same probabilities in a different order: at most the one token that sits on the
    # top_p boundary may flip by float rounding.
    differ = (torch.isinf(fast) != torch.isinf(full)).sum(dim=-1)
    assert int(differ.max()) <= 1 and int(differ.sum()) <= 2
    assert (~torch.isinf(fast)).sum() > 6  # real nuclei, not just the top token
    # A flat row whose nucleus does not fit in the head falls back to the full sort.
    assert smp._top_p_from_head(torch.zeros(1, 5000), torch.tensor([0.9])) is None
