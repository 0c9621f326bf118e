"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Unknown fields are ignored (OpenAI clients send more than a small server uses); known fields
are type-checked (400 when wrong) and range-checked (422 when out of range)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

MAX_STOP = 4


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stream: StrictBool = False
    stream_options: dict | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: StrictStr
    echo: StrictBool = False


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    path: StrictStr = Field(..., min_length=1, max_length=4096)


# ---- responses the OpenAPI schema documents -------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


def _error(description: str, **headers: str) -> dict:
    entry: dict = {"model": ErrorResponse, "description": description}
    if headers:
        entry["headers"] = {
            name: {"description": text, "schema": {"type": "string"}} for name, text in headers.items()
        }
    return entry


ERROR_RESPONSES: dict[int | str, dict] = {
    400: _error("The body is not JSON, a field has the wrong type or is missing, or the request cannot be served"),
    401: _error("An API key is required: send 'Authorization: Bearer KEY'"),
    403: _error("Run-time adapter loading is off (the server was started without --adapters-dir)"),
    404: _error("Unknown model, adapter or route"),
    405: _error("The route does not take this method", Allow="The methods it takes"),
    409: _error("The adapter name is in use"),
    413: _error("The body is larger than --max-body-bytes"),
    422: _error("A value is out of range"),
    500: _error("Internal server error (the trace is in the server's log, never in the answer)"),
    503: _error("Too many requests in progress (--max-queue)", **{"Retry-After": "Seconds to wait"}),
}
