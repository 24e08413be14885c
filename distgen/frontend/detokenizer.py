"""Incremental detokenization and stop-string handling for one output sequence.

Byte-level BPE (and SentencePiece byte fallback) can split one character over several tokens, and
decoders adjust leading spaces based on the neighbouring tokens, so decoding each new token alone is
wrong. We keep two offsets into the ids of the sequence:

* ``prefix_offset`` .. ``read_offset``: the last chunk already turned into text (the context window);
* ``read_offset`` .. end: the tokens whose text has not been emitted yet.

Each step decodes ``ids[prefix_offset:]`` and ``ids[prefix_offset:read_offset]``; the difference is the
new text. While it ends in U+FFFD the last character is still incomplete, so nothing is emitted and the
pending tokens wait for the next one. The work per step is bounded by the window, not the sequence length.

Stop strings are matched on the newly added text plus ``len(stop) - 1`` characters of lookback, the text
is truncated before the stop string (or after it with ``include_stop_str_in_output``), and while a sequence
runs the last ``len(longest stop) - 1`` characters are held back from the outputs because they may be the
start of a stop string, as vLLM v1 does.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from typing import Any

from distgen.sampling_params import SamplingParams

# How many trailing prompt tokens seed the decode window (the same number vLLM uses).
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5
# Pending tokens after which the text is emitted even if it still ends in U+FFFD: a UTF-8 character is at
# most 4 bytes, so a longer run is invalid output from the model and waiting would only grow the window.
_MAX_PENDING_TOKENS = 16
# When this many consumed ids sit before the window, drop them so the id list stays small.
_COMPACT_AFTER = 256
_REPLACEMENT_CHAR = "\ufffd"

DecodeFn = Callable[[list[int]], str]


@functools.cache
def _fast_decode_impl() -> Any:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - older transformers
        return None
    return TokenizersBackend._decode


def make_decode_fn(
    tokenizer: Any, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True
) -> DecodeFn:
    """A function ids -> text for ``tokenizer`` with the given options, without clean-up of spaces.

    Accepts a ``transformers`` tokenizer or a bare ``tokenizers.Tokenizer``. A ``tokenizers``-backed
    ``transformers`` tokenizer is decoded by its Rust backend directly (the Python wrapper only adds
    per-call overhead and a clean-up pass that vLLM's incremental path never applies).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(type(tokenizer), "_decode", None) is _fast_decode_impl():
        tokenizer = backend
    if not hasattr(tokenizer, "convert_ids_to_tokens"):  # a tokenizers.Tokenizer
        decode = tokenizer.decode
        return lambda ids: decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
        clean_up_tokenization_spaces=False,
    )


def _vocab_size(tokenizer: Any) -> int:
    if hasattr(tokenizer, "get_vocab_size"):  # a tokenizers.Tokenizer
        return tokenizer.get_vocab_size(with_added_tokens=True)
    return len(tokenizer)


def detokenize_all(
    tokenizer: Any,
    ids: Sequence[int],
    skip_special_tokens: bool = True,
    spaces_between_special_tokens: bool = True,
) -> str:
    """Decode a whole id sequence at once, with the same options and rules as the incremental path."""
    vocab = _vocab_size(tokenizer)
    decode = make_decode_fn(tokenizer, skip_special_tokens, spaces_between_special_tokens)
    return decode([int(i) for i in ids if 0 <= i < vocab])


def find_stop_string(
    text: str, new_char_count: int, stop: Sequence[str], include_in_output: bool
) -> tuple[str, int] | None:
    """Find a stop string that ends within the last ``new_char_count`` characters of ``text``.

    Returns ``(stop_string, truncate_to)``, or None. ``truncate_to`` is the length the text keeps:
    the start of the stop string, or its end with ``include_in_output`` (-1 when that is the end of
    the text already). When several stop strings occur in the new text, the first in ``stop``
    (list order) wins, as in vLLM.
    """
    if not new_char_count or not stop:
        return None
    best: tuple[int, str, int] | None = None  # (end, stop_str, start)
    for stop_str in stop:
        # A match must end inside the new text: start no earlier than len - new - len(stop) + 1.
        start = text.find(stop_str, max(0, len(text) - new_char_count - len(stop_str) + 1))
        if start == -1:
            continue
        # The first stop string in list order that occurs wins, as in vLLM.
        best = (start + len(stop_str), stop_str, start)
        break
    if best is None:
        return None
    end, stop_str, start = best
    if not include_in_output:
        return stop_str, start
    return stop_str, (-1 if end >= len(text) else end)


class IncrementalDetokenizer:
    """Turns the output ids of one sequence into text, step by step, and detects stop strings.

    ``output_text`` is the text so far (after stop-string truncation), ``token_ids`` the output ids.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.token_ids: list[int] = []
        self.detokenize = params.detokenize
        self.stop: list[str] = list(params.stop or [])
        self.min_tokens = params.min_tokens
        self.include_stop_str_in_output = params.include_stop_str_in_output
        # Held back from outputs while running: possibly the start of a stop string that is excluded.
        if self.stop and not self.include_stop_str_in_output:
            self.stop_buffer_length = max(len(s) for s in self.stop) - 1
        else:
            self.stop_buffer_length = 0
        # Characters before the new text a stop string may start in.
        self._stop_lookback = max((len(s) for s in self.stop), default=1) - 1
        self._last_output_text_offset = 0
        # The text lives in a StringIO: appends and tail reads cost O(new text), not O(total length).
        self._text = io.StringIO(newline="")
        self._text_len = 0
        self._text_cache: str | None = ""
        if not self.detokenize:
            return
        self._decode = make_decode_fn(
            tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        self._vocab_size = _vocab_size(tokenizer)
        # Window ids: a few prompt ids for context, then the in-vocabulary output ids.
        seed = [int(i) for i in prompt_token_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:]]
        seed = [i for i in seed if 0 <= i < self._vocab_size]
        self._prefix_text = self._decode(seed) if seed else ""
        if self._prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: it cannot serve as a clean prefix.
            seed, self._prefix_text = [], ""
        self._ids: list[int] = seed
        self._prefix_offset = 0
        self._read_offset = len(seed)

    # -- text storage ---------------------------------------------------------------------------------
    @property
    def output_text(self) -> str:
        if self._text_cache is None:
            self._text_cache = self._text.getvalue()
        return self._text_cache

    def _append_text(self, piece: str) -> None:
        if piece:
            self._text.write(piece)
            self._text_len += len(piece)
            self._text_cache = None

    def _tail(self, n: int) -> str:
        """The last ``n`` characters of the text, read without copying the rest."""
        n = min(n, self._text_len)
        if n <= 0:
            return ""
        self._text.seek(self._text_len - n)
        return self._text.read(n)  # leaves the position at the end, ready for the next write

    def _truncate_text(self, length: int) -> None:
        self._text.truncate(length)
        self._text.seek(length)
        self._text_len = length
        self._text_cache = None

    # -- decoding ---------------------------------------------------------------------------------------
    def _decode_next(self, token_id: int) -> str:
        """Add one id to the window and return the text that became final."""
        if not 0 <= token_id < self._vocab_size:
            return ""  # out of the tokenizer's vocabulary (a padded model vocab): no text, as in vLLM
        ids = self._ids
        ids.append(token_id)
        new_text = self._decode(ids[self._prefix_offset :])
        pending = len(ids) - self._read_offset
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            if pending < _MAX_PENDING_TOKENS:
                return ""  # nothing visible yet, or an unfinished multi-byte character
        piece = new_text[len(self._prefix_text) :]
        # The emitted chunk becomes the context of the next step.
        self._prefix_offset = self._read_offset
        if pending >= _MAX_PENDING_TOKENS:
            self._prefix_offset = len(ids) - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET
        self._read_offset = len(ids)
        self._prefix_text = self._decode(ids[self._prefix_offset :])
        if self._prefix_offset >= _COMPACT_AFTER:
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return piece

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool) -> str | None:
        """Add newly sampled ids; return the stop string that matched, else None.

        ``stop_terminated`` means the engine already ended the sequence on the last id (EOS or a stop
        token id): its text is left out unless ``include_stop_str_in_output``. On a stop-string match the
        text is cut before the stop string (after it with ``include_stop_str_in_output``); the caller must
        then finish the sequence with finish_reason "stop" and stop_reason the returned string.
        """
        if not new_token_ids:
            return None
        if not self.detokenize:
            self.token_ids.extend(int(i) for i in new_token_ids)
            return None
        skipped_stop_id = None
        if stop_terminated and not self.include_stop_str_in_output:
            skipped_stop_id = int(new_token_ids[-1])
            new_token_ids = new_token_ids[:-1]

        stop_check_offset = self._text_len
        for token_id in new_token_ids:
            token_id = int(token_id)
            self.token_ids.append(token_id)
            self._append_text(self._decode_next(token_id))
            if self.min_tokens and len(self.token_ids) <= self.min_tokens:
                stop_check_offset = self._text_len  # text of the first min_tokens tokens cannot stop
        if skipped_stop_id is not None:
            self.token_ids.append(skipped_stop_id)

        if not self.stop or len(self.token_ids) <= self.min_tokens:
            return None
        new_chars = self._text_len - stop_check_offset
        if not new_chars:
            return None
        window_len = min(self._text_len, new_chars + self._stop_lookback)
        window = self._tail(window_len)
        match = find_stop_string(window, new_chars, self.stop, self.include_stop_str_in_output)
        if match is None:
            return None
        stop_str, truncate_to = match
        if truncate_to != -1:
            self._truncate_text(self._text_len - window_len + truncate_to)
        return stop_str

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The whole text (``delta=False``) or the text new since the last delta call (``delta=True``).

        While the sequence runs, the last ``len(longest stop) - 1`` characters are held back.
        """
        buffer_length = 0 if finished else self.stop_buffer_length
        length = max(0, self._text_len - buffer_length)
        if not delta:
            return self.output_text[:length] if buffer_length else self.output_text
        last = self._last_output_text_offset
        if last >= length:
            return ""
        self._last_output_text_offset = length
        return self._tail(self._text_len - last)[: length - last]
