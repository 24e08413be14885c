"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi.responses import JSONResponse

from distgen.exceptions import InvalidPromptError, PromptTooLongError

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class OpenAIError(Exception):
    """Raised by a handler; the app turns it into a JSON error response."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    @classmethod
    def from_prompt_error(cls, e: InvalidPromptError) -> OpenAIError:
        """The input processor's prompt error as OpenAI words it: a prompt too long says the model's
        context, in tokens or (measured before tokenizing) characters; the others keep their message."""
        if not isinstance(e, PromptTooLongError):
            return cls(str(e), 400, e.param)
        if e.chars is None:
            has = f"{e.num_tokens} tokens, which leaves no room for the completion"
        else:
            has = (
                f"{e.chars} characters, at least {e.num_tokens} tokens (no token of this model is longer "
                f"than {e.token_chars} characters)"
            )
        return cls(
            f"This model's maximum context length is {e.max_model_len} tokens. However, your prompt has "
            f"{has}. Please reduce the length of the prompt.",
            400,
            e.param,
        )

    @classmethod
    def from_value_error(cls, e: ValueError) -> OpenAIError:
        if isinstance(e, InvalidPromptError):
            return cls.from_prompt_error(e)
        # The message names the field: "SamplingParams.temperature must be >= 0, got -1.", or a
        # request's own field (input_processor.check_priority: "priority=1 needs ...").
        m = re.match(r"SamplingParams\.(\w+)|(priority)\b", str(e))
        return cls(str(e), 400, (m.group(1) or m.group(2)) if m else None)

    def response(self) -> JSONResponse:
        return error_response(self.message, self.status, self.param)


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(message: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)
