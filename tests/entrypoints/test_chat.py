"""``LLM.chat`` renders conversations exactly as transformers' ``apply_chat_template`` does."""

from __future__ import annotations

import pytest

from distgen import LLM, SamplingParams
from distgen.entrypoints.chat_utils import load_chat_template

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONV_A = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Write one sentence about the sea."},
]
CONV_B = [{"role": "user", "content": "What is 2 + 2?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), kv_cache_memory=16 << 20)


def test_chat_prompt_matches_apply_chat_template(llm):
    tok = llm.get_tokenizer()
    (out,) = llm.chat(CONV_A, GREEDY, use_tqdm=False)
    assert (
        out.prompt_token_ids
        == tok.apply_chat_template(CONV_A, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert out.prompt == tok.apply_chat_template(CONV_A, add_generation_prompt=True, tokenize=False)
    assert out.prompt.endswith("<|im_start|>assistant\n")
    # Same tokens as generate() on the rendered ids.
    ref = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_batch_of_conversations_and_continue_final_message(llm):
    tok = llm.get_tokenizer()
    outs = llm.chat([CONV_A, CONV_B], GREEDY, use_tqdm=False)
    assert len(outs) == 2
    assert outs[1].prompt == tok.apply_chat_template(CONV_B, add_generation_prompt=True, tokenize=False)
    partial = CONV_B + [{"role": "assistant", "content": "The answer is"}]
    (cont,) = llm.chat(
        partial, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    assert cont.prompt.endswith("The answer is")
    # OpenAI-style content parts are flattened.
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]
    assert llm.chat(parts, GREEDY, use_tqdm=False)[0].prompt == outs[1].prompt


def test_custom_template_from_file_and_string(llm, tmp_path):
    path = tmp_path / "template_chatml.jinja"
    path.write_text(CHATML)
    from_file = load_chat_template(str(path))
    assert from_file == CHATML and load_chat_template(CHATML) == CHATML
    (out,) = llm.chat(CONV_B, GREEDY, chat_template=from_file, use_tqdm=False)
    assert out.prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="neither an existing file"):
        load_chat_template("no/such/template.jinja")


def test_tools_reach_the_template(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    template = "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}" + CHATML
    (out,) = llm.chat(CONV_B, GREEDY, chat_template=template, tools=tools, use_tqdm=False)
    assert out.prompt.startswith("TOOL get_weather\n<|im_start|>user")
    (plain,) = llm.chat(CONV_B, GREEDY, chat_template=template, use_tqdm=False)
    assert plain.prompt.startswith("<|im_start|>user")
    # The model's own template (SmolLM2's does not use tools) renders as without them.
    tok = llm.get_tokenizer()
    (own,) = llm.chat(CONV_B, GREEDY, tools=tools, use_tqdm=False)
    want = tok.apply_chat_template(CONV_B, tools=tools, add_generation_prompt=True, tokenize=False)
    assert own.prompt == want


def test_missing_template_names_the_remedy(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir("llama"), d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for f in d.glob("*.jinja"):
        f.unlink()
    llm = LLM(str(d), kv_cache_memory=16 << 20)
    assert not llm.get_tokenizer().chat_template
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        llm.chat(CONV_B, GREEDY, use_tqdm=False)
    assert llm.chat(CONV_B, GREEDY, chat_template=CHATML, use_tqdm=False)[0].outputs[0].token_ids


def test_bad_conversations(llm):
    with pytest.raises(ValueError, match="conversation"):
        llm.chat([], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"content": "hi"}], GREEDY, use_tqdm=False)
