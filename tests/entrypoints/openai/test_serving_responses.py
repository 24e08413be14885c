"""``/v1/responses`` through the ``openai`` client on a live server: text in and out (the same as the chat
completion of the same conversation), OpenAI's streaming events, ``previous_response_id`` chaining,
``instructions`` not carried over, ``store=False``, and errors in OpenAI's shape."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def client(greedy_server):
    return openai.OpenAI(base_url=greedy_server.v1, api_key="none", max_retries=0)


@pytest.fixture
def x(client) -> str:
    return client.models.list().data[0].id  # the served model's name


def _chat(client, x, messages, n=6) -> str:
    return client.chat.completions.create(model=x, messages=messages, max_tokens=n).choices[0].message.content


def test_text_in_text_out_as_the_chat_completion(client, x):
    r = client.responses.create(model=x, input="Hello there", instructions="Be brief.", max_output_tokens=6)
    system = {"role": "system", "content": "Be brief."}
    want = _chat(client, x, [system, {"role": "user", "content": "Hello there"}])
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == want and r.output[0].content[0].type == "output_text"
    assert r.usage.output_tokens == 6 and r.usage.total_tokens == r.usage.input_tokens + 6
    parts = client.responses.create(
        model=x,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}],
        max_output_tokens=6,
    )
    assert parts.output_text == _chat(client, x, [{"role": "user", "content": "Hello there"}])


def test_streaming_events(client, x):
    events = list(client.responses.create(model=x, input="Count:", max_output_tokens=5, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (
        deltas
        == events[-1].response.output_text
        == _chat(client, x, [{"role": "user", "content": "Count:"}], 5)
    )
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


def test_previous_response_id_continues_the_conversation(client, x):
    first = client.responses.create(
        model=x, input="My name is Ada.", instructions="Be brief.", max_output_tokens=4
    )
    second = client.responses.create(
        model=x, input="What is my name?", previous_response_id=first.id, max_output_tokens=4
    )
    convo = [
        {"role": "user", "content": "My name is Ada."},  # the first turn's instructions are not carried
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.output_text == _chat(client, x, convo, 4)
    unstored = client.responses.create(model=x, input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.create(model=x, input="Hi", previous_response_id=unstored.id)


def test_bad_inputs_are_400s(greedy_server):
    url = greedy_server.v1 + "/responses"
    bad = httpx.post(url, json={"input": [{"type": "function_call", "name": "f"}]})
    assert bad.status_code == 400 and "only messages are supported" in bad.json()["error"]["message"]
    assert httpx.post(url, json={"input": "Hi", "max_output_tokens": 0}).status_code == 400
    assert httpx.post(url, json={"max_output_tokens": 3}).status_code == 400  # no input
