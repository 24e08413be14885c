"""Talk to a running `distgen serve` with the official openai client (chat, then a streamed completion).

Start the server, then run this::

    distgen serve                     # in another terminal (default model, 127.0.0.1:8000)
    python examples/online_serving/openai_chat_client.py [http://127.0.0.1:8000/v1]
"""

import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=base_url, api_key="EMPTY")  # any key unless the server has --api-key
model = client.models.list().data[0].id

chat = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    max_tokens=32,
    temperature=0,
)
print(f"Chat ({model}): {chat.choices[0].message.content!r}")

print("Streamed completion: ", end="")
for chunk in client.completions.create(model=model, prompt="The future of AI is", max_tokens=24, stream=True):
    print(chunk.choices[0].text, end="", flush=True)
print()
