"""``distgen run-batch``: OpenAI's batch format in and out, offline, answered as the server answers
(the same app, in process), in input order, with bad lines reported and the others unharmed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distgen import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_run_batch_answers_each_line_as_the_server_would(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    greedy = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
    lines = [
        {
            "custom_id": "c1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Once upon", **greedy},
        },
        {
            "custom_id": "chat1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi"}], **greedy},
        },
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {
            "custom_id": "too-long",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "a", "max_tokens": 5000},
        },
        {
            "custom_id": "c2",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "The sky", **greedy, "n": 2},
        },
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "run-batch", "-i", str(src), "-o", str(out)]
    cmd += ["--model", model, "--dtype", "float32", "--kv-cache-memory", "16MiB"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["c1", "chat1", "bad-url", "too-long", "c2", None]
    by_id = {r["custom_id"]: r for r in results}

    llm = LLM(model, dtype="float32", kv_cache_memory=16 << 20)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    try:
        want = {
            p: llm.generate(p, params, use_tqdm=False)[0].outputs[0].text for p in ("Once upon", "The sky")
        }
    finally:
        llm.shutdown()
    c1 = by_id["c1"]["response"]
    assert c1["status_code"] == 200 and c1["body"]["choices"][0]["text"] == want["Once upon"]
    assert c1["request_id"] == c1["body"]["id"] and by_id["c1"]["error"] is None
    c2 = by_id["c2"]["response"]["body"]["choices"]
    assert [c["text"] for c in c2] == [want["The sky"]] * 2
    chat = by_id["chat1"]["response"]
    assert chat["status_code"] == 200 and chat["body"]["choices"][0]["message"]["role"] == "assistant"
    assert by_id["too-long"]["response"]["status_code"] == 400
    assert "maximum context length" in by_id["too-long"]["response"]["body"]["error"]["message"]
    assert by_id["bad-url"]["response"] is None and "/v1/embeddings" in by_id["bad-url"]["error"]["message"]
    assert results[-1]["error"]["code"] == "invalid_request"  # the line that is not JSON
