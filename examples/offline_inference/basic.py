"""Generate text for a few prompts with the embedded default model (SmolLM2-135M-Instruct)."""

from distgen import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48, seed=0)

llm = LLM()
outputs = llm.generate(prompts, sampling_params)

print("-" * 60)
for output in outputs:
    print(f"Prompt:    {output.prompt!r}")
    print(f"Generated: {output.outputs[0].text!r}  ({output.outputs[0].finish_reason})")
    print("-" * 60)
