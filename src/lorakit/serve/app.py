"""The FastAPI app: OpenAI-compatible endpoints over an Engine.

Every error is answered in OpenAI's error shape, ``{"error": {"message", "type", "param",
"code"}}``, with its HTTP status; no stack trace ever reaches a client (it is logged here)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import LorakitError
from ..runfolder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INT8_WEIGHTS
from .engine import Engine, EngineError, Request
from .metrics import Metrics
from .protocol import (
    ERROR_RESPONSES,
    AdapterDeleted,
    AdapterLoadRequest,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Health,
    ModelCard,
    ModelList,
    completion_responses,
)

log = logging.getLogger("lorakit.serve")

DEFAULT_MAX_TOKENS = 256
# pydantic error types that mean "the right type, but out of range" (422); the rest are 400
_RANGE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_long",
    "too_short",
    "value_error",
    "string_pattern_mismatch",
    "literal_error",
}


def error_response(
    status: int,
    message: str,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    type_ = type_ or (
        "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    )
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, declared or not.

    The body is read here first (it is small by then), so the app never sees a partial one."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = error_response(
            413, f"the request body is larger than this server takes ({self.limit} bytes)", code="body_too_large"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_big(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then disconnects, for streaming answers

        await self.app(scope, replay, send)


def resolve_adapter_path(root: Path | None, path: str) -> Path:
    """An adapter path from a request, confined to ``root`` (the --adapters-dir)."""
    if root is None:
        raise EngineError(
            "loading adapters at run time is off: start the server with --adapters-dir DIR",
            403,
            "adapter_loading_disabled",
            "path",
        )
    if "\x00" in path:
        raise EngineError("path: not a valid path", 400, "invalid_path", "path")
    root = root.resolve()
    try:
        target = Path(os.path.realpath(root / path))  # symlinks resolved: a link out of root is refused too
        is_dir = target.is_dir()
    except OSError as e:  # a name too long for the filesystem, a loop of links (found by schemathesis)
        raise EngineError(
            f"path: no adapter folder there ({e.strerror or e})", 404, "adapter_not_found", "path"
        ) from None
    if target != root and root not in target.parents:
        raise EngineError(
            "path: must name a folder inside the server's adapters directory", 403, "path_outside_adapters_dir", "path"
        )
    if not is_dir:
        raise EngineError(
            f"path: no adapter folder '{path}' in the adapters directory", 404, "adapter_not_found", "path"
        )
    return target


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    adapters_dir: str | Path | None = None,
    max_body_bytes: int = 1 << 20,
    metrics: Metrics | None = None,
) -> FastAPI:
    metrics = metrics or engine.metrics or Metrics()
    app = FastAPI(title="lorakit", version="0.1.0", docs_url=None, redoc_url=None, responses=ERROR_RESPONSES)
    app.state.engine = engine
    root = Path(adapters_dir) if adapters_dir else None

    # ---- errors ----------------------------------------------------------------------------
    @app.exception_handler(EngineError)
    async def _engine_error(request, exc: EngineError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return error_response(exc.status, str(exc), param=exc.param, code=exc.code, headers=headers)

    @app.exception_handler(LorakitError)
    async def _lorakit_error(request, exc: LorakitError):
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        status = 422 if all(e.get("type") in _RANGE_ERRORS for e in errors) else 400
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Allow: every method of the path (Starlette names only the first route's)
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request.scope))}
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    def allowed_methods(scope) -> list[str]:
        methods: set[str] = set()
        for route in app.router.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                methods |= getattr(route, "methods", None) or set()
        return sorted(methods)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "internal server error")

    # ---- auth and accounting (plain ASGI, so streamed answers and disconnects pass untouched) --
    open_paths = {"/health"}

    class AuthAndCount:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            started, path = time.perf_counter(), scope["path"]
            if api_key and path not in open_paths:
                given = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                token = given[7:] if given[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    metrics.observe_request("unauthorized", 401, started)
                    return await error_response(
                        401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
                    )(scope, receive, send)
            status = 500

            async def send_and_count(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)
                if (
                    message["type"] == "http.response.body"
                    and not message.get("more_body", False)
                    and path != "/metrics"
                ):
                    route = scope.get("route")
                    metrics.observe_request(getattr(route, "path", "unmatched"), status, started)

            await self.inner(scope, receive, send_and_count)

    # ---- endpoints -------------------------------------------------------------------------
    @app.get("/health", response_model=Health)
    async def health():
        return {
            "status": "ok",
            "base": engine.base_name,
            "adapters": engine.model_names()[1:],
            "in_progress": engine.in_progress,
        }

    @app.get(
        "/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}}
    )
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        info = engine.adapters.get(name)
        return {
            "id": name,
            "object": "model",
            "created": int(info.loaded_at if info else engine_started),
            "owned_by": "lorakit",
            "root": engine.base_name,
            "parent": engine.base_name if info else None,
        }

    engine_started = time.time()

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in engine.model_names()]}

    @app.get("/v1/models/{name}", response_model=ModelCard)
    async def get_model(name: str):
        if name not in engine.model_names():
            raise EngineError(f"The model '{name}' does not exist", 404, "model_not_found", "model")
        return model_card(name)

    @app.post("/v1/adapters", response_model=ModelCard)
    async def load_adapter(body: AdapterLoadRequest):
        path = resolve_adapter_path(root, body.path)
        try:
            await asyncio.to_thread(engine.load_adapter, body.name, path)
        except EngineError:
            raise
        except LorakitError as e:
            raise EngineError(str(e), 400, "invalid_adapter", "path") from None
        return model_card(body.name)

    @app.get("/v1/adapters", response_model=ModelList)
    async def list_adapters():
        return {"object": "list", "data": [model_card(n) for n in engine.model_names()[1:]]}

    @app.delete("/v1/adapters/{name}", response_model=AdapterDeleted)
    async def unload_adapter(name: str):
        if name == engine.base_name:
            raise EngineError("the base model cannot be unloaded", 400, "base_model", "name")
        await asyncio.to_thread(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions", responses=completion_responses(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model)
        messages = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        ids = engine.chat_prompt_ids(body.model, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await run(body, ids, max_tokens, http, chat=True)

    @app.post("/v1/completions", responses=completion_responses(Completion))
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        return await run(
            body,
            engine.text_prompt_ids(body.prompt),
            body.max_tokens,
            http,
            chat=False,
            echo=body.prompt if body.echo else "",
        )

    def check_model(name: str) -> None:
        if name not in engine.model_names():
            raise EngineError(f"The model '{name}' does not exist", 404, "model_not_found", "model")

    async def run(body, ids: list[int], max_tokens: int | None, http: HTTPRequest, *, chat: bool, echo: str = ""):
        for key in ("max_tokens", "max_completion_tokens"):  # each one given, even the one not used
            given = getattr(body, key, None)
            if given is not None and given > engine.max_tokens_limit:
                raise EngineError(f"{key}: at most {engine.max_tokens_limit} on this server", 422, param=key)
        max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, engine.max_tokens_limit)  # within --max-tokens-limit
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(kind, value):  # called on the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        req = engine.submit(
            Request(
                prompt_ids=ids,
                model=body.model,
                adapter=None,
                max_tokens=max_tokens,
                temperature=body.temperature if body.temperature is not None else 1.0,
                top_p=body.top_p if body.top_p is not None else 1.0,
                seed=body.seed,
                stop=body.stop or [],
                on_event=on_event,
            )
        )
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                stream(req, events, rid, created, body, chat, echo),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                try:
                    kind, _ = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancel()
                        return Response(status_code=499)
                    continue
                if kind == "done":
                    break
        except asyncio.CancelledError:
            req.cancel()
            raise
        if req.finish_reason == "error":
            raise EngineError(req.error or "generation failed", 500, "generation_failed")
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(req.ids), "total_tokens": len(ids) + len(req.ids)}
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": req.text.strip()},
                "logprobs": None,
                "finish_reason": req.finish_reason,
            }
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            }
        choice = {"index": 0, "text": echo + req.text, "logprobs": None, "finish_reason": req.finish_reason}
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [choice],
            "usage": usage,
        }

    async def stream(req: Request, events: asyncio.Queue, rid: str, created: int, body, chat: bool, echo: str):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        started = False  # chat answers drop leading whitespace, as the non-streamed answer does
        try:
            if chat:
                yield chunk(None, None, first=True)
            elif echo:
                yield chunk(echo, None)
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    text = value.lstrip() if chat and not started else value
                    if text:
                        started = True
                        yield chunk(text, None)
                    continue
                if req.finish_reason == "error":
                    err = {
                        "error": {
                            "message": req.error or "generation failed",
                            "type": "server_error",
                            "param": None,
                            "code": "generation_failed",
                        }
                    }
                    yield f"data: {json.dumps(err)}\n\n"
                else:
                    yield chunk(None, req.finish_reason)
                    if body.include_usage:
                        usage = {
                            "prompt_tokens": len(req.prompt_ids),
                            "completion_tokens": len(req.ids),
                            "total_tokens": len(req.prompt_ids) + len(req.ids),
                        }
                        payload = {
                            "id": rid,
                            "object": obj,
                            "created": created,
                            "model": body.model,
                            "choices": [],
                            "usage": usage,
                        }
                        yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            if not req.finished:
                req.cancel()  # the client went away: its row stops at the next step

    def openapi() -> dict:
        """FastAPI's schema, with the model names this server answers to right now as examples."""
        app.openapi_schema = None  # adapters come and go: built anew on each request (a few ms)
        schema = FastAPI.openapi(app)
        names = engine.model_names()
        for body in ("ChatCompletionRequest", "CompletionRequest"):
            fields = schema["components"]["schemas"][body]["properties"]
            fields["model"]["examples"] = names
            for key in ("max_tokens", "max_completion_tokens"):  # this server's --max-tokens-limit
                if key in fields:
                    fields[key]["anyOf"][0]["maximum"] = engine.max_tokens_limit
        for path in ("/v1/models/{name}", "/v1/adapters/{name}"):
            for operation in schema["paths"][path].values():
                for param in operation.get("parameters", []):
                    param["schema"]["examples"] = names if path.startswith("/v1/models") else names[1:] or ["support"]
        if root is not None and root.is_dir():  # the adapter folders a POST /v1/adapters can name
            folders = sorted(
                p.name
                for p in root.iterdir()
                if (p / ADAPTER_CONFIG).is_file() and any((p / w).is_file() for w in (ADAPTER_WEIGHTS, INT8_WEIGHTS))
            )[:20]
            if folders:
                schema["components"]["schemas"]["AdapterLoadRequest"]["properties"]["path"]["examples"] = folders
        return schema

    app.openapi = openapi
    if max_body_bytes:
        app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(AuthAndCount)  # outermost: no body is read for a request without the key
    return app
