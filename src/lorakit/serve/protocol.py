"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Unknown fields are ignored (OpenAI clients send more than a small server uses); known fields
are type-checked (400 when wrong) and range-checked (422 when out of range). Integers follow
JSON's rule, as the OpenAPI schema says: ``3`` and ``3.0`` are the same integer, ``3.5`` and
``"3"`` are not integers. The response models below are what the schema documents; every answer
is checked against them by schemathesis (tests/serve/test_schemathesis.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)

MAX_STOP = 4
SEED_BITS = 63  # torch generators take 64-bit seeds; larger ones are folded into this range


def _json_integer(value):
    """A float with no fraction is an integer in JSON (3.0 == 3); bools and strings are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def JsonInt(*constraints):
    """A JSON integer with annotated_types bounds (Ge(1)...): the schema then says minimum/maximum."""
    return Annotated[(StrictInt, *constraints, BeforeValidator(_json_integer))]


StopText = Annotated[StrictStr, Field(min_length=1)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: JsonInt(Ge(1)) | None = None
    temperature: Annotated[float, Strict(), Field(ge=0.0, le=2.0)] | None = None  # strict: true is not 1.0
    top_p: Annotated[float, Strict(), Field(gt=0.0, le=1.0)] | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    # any size, as OpenAI takes it: folded into 63 bits (a bound of 2**63-1 in the schema is a
    # float there, 9.223372036854776e18, which a client cannot rely on)
    seed: JsonInt(Ge(0)) | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    n: JsonInt(Ge(1), Le(1)) = 1
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("seed")
    @classmethod
    def _fold_seed(cls, v):
        return None if v is None else v % (1 << SEED_BITS)

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
    messages: list[Message] = Field(
        ..., min_length=1, description="The conversation; its last message, system messages aside, is from the user"
    )
    max_completion_tokens: JsonInt(Ge(1)) | None = None


class CompletionRequest(_Sampling):
    prompt: Annotated[StrictStr, Field(min_length=1)]
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
    403: _error(
        "Run-time adapter loading is off (the server was started without --adapters-dir), or the path leads out "
        "of the adapters directory"
    ),
    404: _error("Unknown model, adapter or route"),
    405: _error("The route does not take this method", Allow="The methods it takes"),
    409: _error("The adapter name is in use"),
    413: _error("The body is larger than --max-body-bytes"),
    422: _error("A value is out of range"),
    500: _error("Internal server error (the trace is in the server's log, never in the answer)"),
    503: _error("Too many requests in progress (--max-queue)", **{"Retry-After": "Seconds to wait"}),
}


# ---- answers the OpenAPI schema documents (the app builds them as dicts of this shape) ------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["model"]
    deleted: bool


class Health(BaseModel):
    status: Literal["ok"]
    base: str
    adapters: list[str]
    in_progress: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


def completion_responses(model: type[BaseModel]) -> dict:
    """A generation endpoint's 200: JSON of ``model``, or server-sent events with stream: true."""
    return {
        200: {
            "model": model,
            "description": "The answer as JSON, or with stream: true server-sent events ('data: {chunk}' lines, "
            "then 'data: [DONE]')",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        }
    }


# One server-sent event (before OpenAPI 3.2's itemSchema, a text/event-stream schema describes each
# event): its data is a JSON chunk in OpenAI's shape, an error object, or the closing [DONE].
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "A JSON chunk ({choices: [{delta}]}), {error: ...}, or [DONE]"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
