"""Start `distgen serve` on a free port, ask it one chat question through the openai client, stop it.

What `make demo` runs after the offline example.
"""

import subprocess
import sys
import time
import urllib.request

from openai import OpenAI

from distgen.executor.ports import free_port

port = free_port()  # one that no outgoing connection can be handed before the server binds it

cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "serve", "--port", str(port)]
cmd += ["--log-level", "warning"]
print("$", " ".join(["distgen", *cmd[3:]]), flush=True)
server = subprocess.Popen(cmd)
try:
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("the server did not become healthy in time")
            time.sleep(0.5)

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
    question = "What is the capital of France?"
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
        temperature=0,
    )
    print(f"User:      {question}")
    print(f"Assistant: {reply.choices[0].message.content}")
    u = reply.usage
    print(f"Usage:     {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens")
finally:
    server.terminate()  # SIGTERM: uvicorn shuts down, the engine core stops with it
    server.wait(30)
