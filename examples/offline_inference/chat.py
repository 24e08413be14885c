"""Chat with the default model: the conversation is rendered with the model's own chat template."""

from distgen import LLM, SamplingParams

llm = LLM()
params = SamplingParams(temperature=0, max_tokens=64)
conversation = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Write a short paragraph about the importance of higher education."},
]
outputs = llm.chat(conversation, params)
print(outputs[0].outputs[0].text)

# A batch of conversations in one call.
batch = [conversation, [{"role": "user", "content": "Name three colors."}]]
for out in llm.chat(batch, params):
    print("-" * 40)
    print(out.outputs[0].text)
