"""Chat with a template of your own (a file path or a Jinja string)."""

from pathlib import Path

from distgen import LLM, SamplingParams
from distgen.entrypoints.chat_utils import load_chat_template

template = load_chat_template(Path(__file__).parent.parent / "template_chatml.jinja")
llm = LLM()
conversation = [{"role": "user", "content": "Say hello in French."}]
out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=24), chat_template=template)[0]
print(repr(out.prompt))
print(out.outputs[0].text)
