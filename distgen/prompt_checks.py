"""The rule for a prompt the engine can run, shared by the front end (which checks every request) and
the engine core (its last-line guard). A module below both, so neither imports the other for it."""

from __future__ import annotations

from distgen.exceptions import InvalidPromptError, PromptTooLongError


def validate_prompt(token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Raise ``InvalidPromptError`` for a prompt that can never run: empty, too long (``PromptTooLongError``:
    the prompt plus one generated token must fit), or holding an id outside the vocabulary."""
    n = len(token_ids)
    if n == 0:
        raise InvalidPromptError("the prompt is empty: give at least one token")
    if n >= max_model_len:
        raise PromptTooLongError(n, max_model_len)
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidPromptError(f"prompt token id {bad} is out of the vocabulary range [0, {vocab_size})")
