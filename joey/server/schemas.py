"""The OpenAI request bodies the server accepts, validated strictly, and the error they answer with.

Types are strict (``"5"`` is not an integer, ``true`` is not a number) and every field's range is
checked here, so a bad request gets a 400 naming the field before it reaches the engine. Fields of
the OpenAI API that joey ignores harmlessly (``user``, ``metadata``, ...) are accepted; those that
would change the answer and are not implemented (``n > 1``, ``logprobs``, penalties, tools) are
refused by name rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from joey.config import SamplingParams

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


# OpenAI options joey does not implement, with the values that mean "off" (null always does);
# any other value is refused
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
}


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 and -1 turn it off
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    def refuse_unsupported(self) -> None:
        """Options that would change the answer and that joey does not implement: a 400 naming them."""
        extra = self.model_extra or {}
        for name, off in _UNSUPPORTED.items():
            value = extra.get(name)
            if value is not None and value not in off:
                raise APIError(400, f"{name} = {value!r} is not supported by joey (only {off[0]!r})", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0),
                              top_p=self.top_p, seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI completions default

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("joey answers one prompt per request (n = 1); send a list of one string")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v

    def limit(self, default: int) -> int:
        return self.max_tokens or default


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Parse and validate a JSON body; any problem is a 400 in OpenAI's shape naming the field."""
    try:
        request = model.model_validate_json(raw or b"")
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip())
        if err["type"] == "model_type":
            raise APIError(400, "the request body must be a JSON object")
        # drop the union-member tags pydantic adds to locations, e.g. ('prompt', 'str')
        loc = [str(p) for p in err["loc"] if p not in ("str", "list[str]", "list[int]", "list[TextPart]")
               and not str(p).startswith("function-")]
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param)
    if isinstance(request, _Sampling):
        request.refuse_unsupported()
    return request
