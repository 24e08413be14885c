"""The official ``openai`` client against a live ``distgen serve``: completions and chat, streamed and
not, n, logprobs, stop; greedy text equals the offline ``LLM``'s for the same request."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from distgen import LLM, SamplingParams
from tests.entrypoints.openai.conftest import descendants, start_server

pytestmark = pytest.mark.slow
PROMPT = "The quick brown fox jumps over"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(server):
    llm = LLM(server.model_dir, dtype="float32", kv_cache_memory=16 << 20)
    yield llm
    llm.shutdown()


def test_completion_matches_offline_greedy(client, offline):
    want = offline.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    got = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == want[0].outputs[0].text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want[0].prompt_token_ids)
    assert got.usage.completion_tokens == 12
    assert got.model == "tiny-llama"


def test_logit_bias_and_allowed_token_ids(client, offline):
    """OpenAI's logit_bias (string keys) and vLLM's allowed_token_ids reach the sampler."""
    tok = offline.get_tokenizer()
    target = tok(" banana", add_special_tokens=False).input_ids[0]
    got = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(target): 100}
    )
    assert got.choices[0].text == tok.decode([target] * 4)
    allowed = [tok(w, add_special_tokens=False).input_ids[0] for w in (" red", " green", " blue")]
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=CONVERSATION,
        max_tokens=5,
        temperature=1.0,
        seed=1,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True},
        logprobs=True,
    )
    tokens = [t.token for t in chat.choices[0].logprobs.content]
    assert len(tokens) == 5 and set(tokens) <= {tok.decode([t]) for t in allowed}, tokens


def test_truncate_prompt_tokens_and_bad_words(client, offline):
    """vLLM's extra fields: the prompt is cut before the length checks (a prompt longer than the
    model fits), and a word the model would say is not said."""
    tok = offline.get_tokenizer()
    long = " ".join(["word"] * 5000)  # far past the tiny model's context
    got = client.completions.create(
        model="tiny-llama",
        prompt=long + " " + PROMPT,
        max_tokens=4,
        temperature=0,
        extra_body={"truncate_prompt_tokens": 8, "ignore_eos": True},
    )
    kept = tok(long + " " + PROMPT).input_ids[-8:]
    want = offline.generate(
        kept, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    assert got.usage.prompt_tokens == 8 and got.choices[0].text == want[0].outputs[0].text
    chat = client.chat.completions.create(
        model="tiny-llama", messages=CONVERSATION, max_tokens=4, extra_body={"truncate_prompt_tokens": 3}
    )
    assert chat.usage.prompt_tokens == 3

    free = offline.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    word = tok.decode(free[0].outputs[0].token_ids[:1]).strip()
    got = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"bad_words": [word], "ignore_eos": True},
    )
    banned = offline.llm_engine.input_processor.bad_words_token_ids([word])
    ids = tok(got.choices[0].text, add_special_tokens=False).input_ids
    assert got.choices[0].text != free[0].outputs[0].text
    assert not any(ids[i : i + len(s)] == s for s in banned for i in range(len(ids))), (
        word,
        got.choices[0].text,
    )


def test_structured_outputs(client):
    """The tiny random model writes nonsense, yet what comes back fits the constraint."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
        "required": ["ok", "tag"],
        "additionalProperties": False,
    }
    spec = {"json": schema, "disable_any_whitespace": True}
    chat = client.chat.completions.create(
        model="tiny-llama", messages=CONVERSATION, max_tokens=40, extra_body={"structured_outputs": spec}
    )
    value = json.loads(chat.choices[0].message.content)
    assert isinstance(value["ok"], bool) and value["tag"] in {"a", "b"}
    got = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=10, n=3, extra_body={"guided_choice": ["red", "green"]}
    )
    assert {c.text for c in got.choices} <= {"red", "green"}
    assert all(c.finish_reason == "stop" for c in got.choices)
    chunks = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=10, stream=True, extra_body={"guided_regex": "[0-9]{4}"}
    )
    assert re.fullmatch("[0-9]{4}", "".join(c.choices[0].text for c in chunks if c.choices))


def test_completion_stream_equals_non_stream(client):
    kwargs = dict(
        model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    kwargs = dict(
        model="tiny-llama", max_tokens=12, temperature=1.0, n=2, stream=True, stream_options=options
    )
    body = {"ignore_eos": True}
    for chunks in (
        list(client.completions.create(prompt=PROMPT, extra_body=body, **kwargs)),
        list(client.chat.completions.create(messages=CONVERSATION, extra_body=body, **kwargs)),
    ):
        counts = [c.usage.completion_tokens for c in chunks]
        assert all(
            c.usage is not None and c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks
        )
        assert counts == sorted(counts) and counts[-1] == 24 and counts[-2] == 24 and counts[0] < 24
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


def test_chat_matches_offline_and_streams(client, offline):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = offline.chat(CONVERSATION, params, use_tqdm=False)[0].outputs[0].text
    got = client.chat.completions.create(
        model="tiny-llama",
        messages=CONVERSATION,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=CONVERSATION,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices(client):
    got = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in got.choices) == [0, 1]
    assert got.usage.completion_tokens == 16
    assert got.choices[0].text != got.choices[1].text  # different seeds (seed, seed + 1)
    again = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in again.choices] == [c.text for c in got.choices]  # seeded: reproducible
    stream = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=7,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finishes[c.index].append(c.finish_reason)
    assert [texts[0], texts[1]] == [c.text for c in got.choices]
    assert finishes == {0: ["length"], 1: ["length"]}  # one final chunk per choice
    chat = client.chat.completions.create(
        model="tiny-llama", messages=CONVERSATION, max_tokens=4, n=3, temperature=1.0, seed=1
    )
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_logprobs(client):
    got = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(val)  # greedy: the chosen token is the most likely
        assert top[tok] == pytest.approx(val)
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=CONVERSATION,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.bytes == list(c.token.encode())


def test_stop_string(client, offline):
    base = (
        client.completions.create(
            model="tiny-llama", prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = base[len(base) // 2 : len(base) // 2 + 3]
    assert stop.strip(), "pick a stop string with visible characters"
    got = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert got.finish_reason == "stop"
    assert got.text == base[: base.index(stop)]
    want = offline.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert got.text == want.text
    streamed = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stop=[stop],
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == got.text


def test_multiple_prompts_in_one_completion(client):
    got = client.completions.create(
        model="tiny-llama",
        prompt=[PROMPT, "Hello"],
        max_tokens=4,
        n=2,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in got.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in got.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: n copies agree


def test_models_version_tokenize_detokenize_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"  # OpenAI's retrieve-model route
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").status_code == 200
    toks = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()
    assert toks["count"] == len(toks["tokens"]) > 0 and toks["max_model_len"] > 0
    text = httpx.post(server.url + "/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"]
    assert text == PROMPT
    chat = httpx.post(server.url + "/tokenize", json={"messages": CONVERSATION}).json()
    assert chat["count"] > toks["count"]
    # SageMaker's /ping (GET and POST) and the load a router balances by.
    assert httpx.get(server.url + "/ping").status_code == httpx.post(server.url + "/ping").status_code == 200
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}


def test_load_counts_the_requests_in_flight(server):
    import threading

    body = {"prompt": "Long:", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    done = []
    threads = [
        threading.Thread(
            target=lambda: done.append(httpx.post(server.v1 + "/completions", json=body, timeout=120))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    seen = 0
    while any(t.is_alive() for t in threads):
        seen = max(seen, httpx.get(server.url + "/load").json()["server_load"])
    for t in threads:
        t.join()
    assert seen == 3 and all(r.status_code == 200 for r in done)
    assert httpx.get(server.url + "/load").json() == {"server_load": 0}


def test_metrics_after_requests(server, client):
    client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("distgen:") and "{" in line:
            name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
            values[name] = values.get(name, 0.0) + value
    for name in (
        "distgen:num_requests_running",
        "distgen:num_requests_waiting",
        "distgen:kv_cache_usage_perc",
        "distgen:prefix_cache_queries_total",
        "distgen:prefix_cache_hits_total",
        "distgen:num_preemptions_total",
        "distgen:time_to_first_token_seconds_count",
        "distgen:inter_token_latency_seconds_count",
        "distgen:e2e_request_latency_seconds_count",
        "distgen:request_success_total",
    ):
        assert name in values, name
    assert values["distgen:prompt_tokens_total"] > 0
    assert values["distgen:generation_tokens_total"] >= 3
    assert values["distgen:time_to_first_token_seconds_count"] >= 1
    assert values["distgen:kv_cache_usage_perc"] == 0.0


def test_client_example_runs_against_the_server(server):
    example = Path(__file__).resolve().parents[3] / "examples" / "online_serving" / "openai_chat_client.py"
    res = subprocess.run(
        [sys.executable, str(example), server.v1], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Chat (tiny-llama): " in res.stdout and "Streamed completion: " in res.stdout


def test_tensor_parallel_server_matches_tp1(server, client):
    """The server over the mp executor (two ranks behind the engine core) answers as tp=1 does."""
    tp2 = start_server(server.model_dir, "--served-model-name", "tiny-llama", "-tp", "2")
    try:
        kwargs = dict(
            model="tiny-llama", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        want = client.completions.create(**kwargs).choices[0].text
        other = openai.OpenAI(base_url=tp2.v1, api_key="unused", max_retries=0)
        assert other.completions.create(**kwargs).choices[0].text == want
        assert len(descendants(tp2.proc.pid)) >= 3  # the engine core and its two workers
    finally:
        tp2.stop()


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    """What evaluation harnesses (lm-eval's local-completions) send to score a text: token-id prompts,
    echo, max_tokens 0, logprobs. The prompt's logprobs equal the offline engine's prompt_logprobs."""
    tok = offline.get_tokenizer()
    prompts = [tok(PROMPT).input_ids, tok("Paris is the capital of").input_ids]
    want = offline.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
        use_tqdm=False,
    )
    got = client.completions.create(
        model="tiny-llama", prompt=prompts, echo=True, max_tokens=0, temperature=0, logprobs=2
    )
    assert got.usage.completion_tokens == 0
    for choice, ids, ref in zip(got.choices, prompts, want):
        lp = choice.logprobs
        assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = [ref.prompt_logprobs[p][t].logprob for p, t in enumerate(ids) if p > 0]
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        assert all(len(top) == 2 for top in lp.top_logprobs[1:])
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    # With generated tokens: the prompt's entries, then the completion's, in the text and the stream.
    kwargs = dict(model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1, echo=True)
    full = client.completions.create(**kwargs)
    n_prompt = len(prompts[0])
    assert full.usage.completion_tokens == 4 and len(full.choices[0].logprobs.tokens) == n_prompt + 4
    assert full.choices[0].logprobs.text_offset[n_prompt] == len(PROMPT)  # the completion starts there
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == full.choices[0].logprobs.token_logprobs
    # n > 1: the prompt's logprobs arrive on choice 0's outputs; each choice's echo waits for them,
    # though a stream hands out only the choices that changed.
    chunks = list(client.completions.create(**{**kwargs, "temperature": 1.0, "n": 3, "seed": 5}, stream=True))
    for i in range(3):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine).startswith(PROMPT)
        lps = [t for c in mine if c.logprobs for t in c.logprobs.token_logprobs]
        assert len(lps) == n_prompt + 4 and lps[0] is None
        assert lps[1:n_prompt] == pytest.approx(full.choices[0].logprobs.token_logprobs[1:n_prompt], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="max_tokens may be 0 only with echo"):
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=0)


def test_echo(client):
    plain = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text
