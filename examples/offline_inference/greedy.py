"""Greedy decoding: temperature 0 always picks the most likely token, so the output is deterministic."""

from distgen import LLM, SamplingParams

llm = LLM()
params = SamplingParams(temperature=0, max_tokens=32)
for out in llm.generate(["The capital of France is", "def add(a, b):"], params):
    print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
