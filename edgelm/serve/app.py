"""The HTTP side of `edgelm serve`: OpenAI's routes over one served artifact.

Errors come back in OpenAI's shape ({"error": {"message", "type", "code"}}) with the status a
client expects: 400 for a request edgelm cannot honour (the reason in one line), 401 without
the key, 404 for another model's name, 413 for a body over the limit; never a stack trace (an
unexpected failure is logged here and answered with a 500 that says so).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgelm.errors import EdgeLMError
from edgelm.generate import check_prompt_length
from edgelm.serve.engine import Finished, Job, Piece, ServedModel
from edgelm.serve.metrics import ServerMetrics
from edgelm.serve.requests import ChatRequest, CompletionRequest, EmbeddingRequest
from edgelm.serve.tools import ToolCallFormat, chosen_tools, tool_format

log = logging.getLogger("edgelm.serve")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above a context window of text
OPEN_ROUTES = {"/health"}  # answered without the API key


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error_body(status: int, message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code or str(status)}}


class Gate:
    """ASGI middleware in front of every route: the API key, the body size limit (before the
    body is read: a Content-Length over it, or a chunked body that grows past it) and the
    request/error counters."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, status = scope["path"], {"code": 500}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._checked(scope, receive, counted_send)
        finally:
            code = str(status["code"])
            self.metrics.requests.labels(route if route in KNOWN_ROUTES else "other", code).inc()
            if status["code"] >= 400:
                self.metrics.errors.labels(code).inc()

    async def _checked(self, scope: dict, receive: Any, send: Any) -> None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_ROUTES:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await _send_error(
                    send, 401, "a valid API key is needed: Authorization: Bearer <key>", "invalid_api_key"
                )
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _send_error(send, 413, f"the request body is over {self.max_body} bytes", "request_too_large")
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_chunked(receive)  # no length given: read it here, up to the limit
            if body is None:
                await _send_error(send, 413, f"the request body is over {self.max_body} bytes", "request_too_large")
                return
            replayed = False

            async def replay() -> dict:
                nonlocal replayed
                if replayed:
                    return await receive()  # after the body: disconnects
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            receive = replay
        await self.app(scope, receive, send)

    async def _read_chunked(self, receive: Any) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is not read)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                return b"".join(parts)


async def _send_error(send: Any, status: int, message: str, code: str) -> None:
    body = json.dumps(_error_body(status, message, "invalid_request_error", code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


KNOWN_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


def create_app(served: ServedModel, api_key: str | None = None, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over `served` (which it closes on shutdown)."""
    metrics = served.metrics

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        served.close()

    app = FastAPI(title="edgelm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Gate, api_key=api_key, max_body=max_body, metrics=metrics)
    _error_handlers(app)
    _routes(app, served)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, with the status a client expects; no traces."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(err.status, err.message, err.kind, err.code), status_code=err.status)

    @app.exception_handler(EdgeLMError)
    async def edgelm_error(_: Request, err: EdgeLMError) -> JSONResponse:
        return JSONResponse(_error_body(400, str(err), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return JSONResponse(_error_body(400, message, "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("edgelm serve: unexpected error")  # the trace stays in the server's log
        message = f"internal error ({type(err).__name__}); this is a bug in edgelm — the server log has the details"
        return JSONResponse(_error_body(500, message, "server_error"), status_code=500)


def _routes(app: FastAPI, served: ServedModel) -> None:
    metrics = served.metrics

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.id}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served)]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        _check_model(served, body.model, decoder=True)
        body.refuse_unsupported()
        job, call_format = _chat_job(served, body)
        return await _answer(served, body, job, "chat.completion", call_format)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        _check_model(served, body.model, decoder=True)
        body.refuse_unsupported()
        ids = served.tokenizer.encode(body.text())
        constraint = _extension_constraint(served, body)
        job = Job(ids, served.sampling(body.sampling(served.model.manifest.generation)), constraint)
        return await _answer(served, body, job, "text_completion", None)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        _check_model(served, body.model, decoder=False)
        if served.model.task != "feature-extraction":
            raise ApiError(400, f"this bundle is a {served.model.task} model; /v1/embeddings needs an embedding model")
        if body.dimensions is not None:
            raise ApiError(400, "dimensions is not supported (the model's embedding size is fixed)")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        vectors = await served.embed(texts)
        tokens = sum(len(served.tokenizer.encode(t)) for t in texts)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": served.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def _model_card(served: ServedModel) -> dict[str, Any]:
    return {
        "id": served.id,
        "object": "model",
        "created": served.created,
        "owned_by": "edgelm",
        "artifact": served.model.artifact.name,
    }


def _check_model(served: ServedModel, name: str, decoder: bool) -> None:
    if name != served.id:
        raise ApiError(
            404, f"model {name[:80]!r} is not served here; this server serves {served.id!r}", code="model_not_found"
        )
    if decoder and not served.is_decoder:
        raise ApiError(
            400, f"{served.id} is an encoder ({served.model.task}); it has /v1/embeddings, not text generation"
        )
    if not decoder and not served.is_encoder:
        raise ApiError(400, f"{served.id} is a text-generation model; /v1/embeddings needs an encoder bundle")


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]


def _extension_constraint(served: ServedModel, body: Any) -> Any:
    if body.regex is not None and body.grammar is not None:
        raise ApiError(400, "give regex or grammar, not both")
    if body.regex is not None:
        return served.constraint("regex", body.regex)
    if body.grammar is not None:
        return served.constraint("lark", body.grammar)
    return None


def _response_format_constraint(served: ServedModel, body: ChatRequest) -> Any:
    form = body.response_format
    if not form or form.get("type") == "text":
        return None
    if form.get("type") == "json_object":
        return served.constraint("json_object", None)
    if form.get("type") == "json_schema":
        schema = (form.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object")
        return served.constraint("json_schema", schema)
    raise ApiError(
        400, f"response_format type {str(form.get('type'))[:40]!r} is not supported (text, json_object, json_schema)"
    )


def _chat_job(served: ServedModel, body: ChatRequest) -> tuple[Job, ToolCallFormat | None]:
    tokenizer = served.tokenizer
    if not tokenizer.chat_template:
        raise ApiError(400, f"{served.id} has no chat template; use /v1/completions with raw text")
    tools, must_call = chosen_tools(body.tools, body.tool_choice) if body.tools else ([], False)
    call_format = tool_format(tokenizer) if tools else None
    messages = [m.for_template() for m in body.messages]
    prompt = tokenizer.apply_chat_template(messages, tools=tools or None)
    constraints = [
        c
        for c in (
            _response_format_constraint(served, body),
            _extension_constraint(served, body),
            served.constraint("lark", call_format.grammar(tools)) if must_call and call_format else None,
        )
        if c is not None
    ]
    if len(constraints) > 1:
        raise ApiError(400, "give one of response_format, regex, grammar or a required tool call, not several")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    job = Job(
        ids, served.sampling(body.sampling(served.model.manifest.generation)), constraints[0] if constraints else None
    )
    return job, call_format


async def _answer(served: ServedModel, body: Any, job: Job, kind: str, call_format: ToolCallFormat | None) -> Any:
    check_prompt_length(len(job.prompt_ids), served.model.session().capabilities.max_context)  # a 400 before any stream
    reply = _Reply(served, kind)
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(reply.events(served.stream(job), call_format, usage), media_type="text/event-stream")
    text, finished = [], None
    async for item in served.stream(job):
        if isinstance(item, Piece):
            text.append(item.text)
        else:
            finished = item
    return reply.whole("".join(text), finished, call_format)


class _Reply:
    """OpenAI's response objects for one request (chat.completion or text_completion)."""

    def __init__(self, served: ServedModel, kind: str) -> None:
        self.served, self.kind = served, kind
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.served.id,
            "choices": choices,
        }

    @staticmethod
    def _usage(finished: Finished) -> dict[str, Any]:
        return {
            "prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.reused_tokens},
        }

    def whole(self, text: str, finished: Finished, call_format: ToolCallFormat | None) -> dict[str, Any]:
        reason = finished.reason
        if self.kind != "chat.completion":
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            return self._envelope("text_completion", [choice]) | {"usage": self._usage(finished)}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if call_format is not None:
            content, calls = call_format.parse(text)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                reason = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
        return self._envelope("chat.completion", [choice]) | {"usage": self._usage(finished)}

    async def events(
        self, items: AsyncIterator[Piece | Finished], call_format: ToolCallFormat | None, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events; with tools, the calls are sent whole at the end (a call is only
        known to be one once it is complete)."""
        chat = self.kind == "chat.completion"
        object_name = "chat.completion.chunk" if chat else "text_completion"
        pieces: list[str] = []
        try:
            if chat:
                yield _sse(self._envelope(object_name, [{"index": 0, "delta": {"role": "assistant", "content": ""}}]))
            async for item in items:
                if isinstance(item, Piece):
                    pieces.append(item.text)
                    if call_format is None:
                        yield _sse(self._envelope(object_name, [self._delta(item.text, chat, None)]))
                    continue
                reason = item.reason
                if call_format is not None:
                    content, calls = call_format.parse("".join(pieces))
                    delta: dict[str, Any] = {"content": content} if not calls else {"content": content or None}
                    if calls:
                        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
                        reason = "tool_calls"
                    yield _sse(self._envelope(object_name, [{"index": 0, "delta": delta}]))
                yield _sse(self._envelope(object_name, [self._delta("", chat, reason)]))
                if include_usage:
                    yield _sse(self._envelope(object_name, []) | {"usage": self._usage(item)})
            yield "data: [DONE]\n\n"
        except EdgeLMError as err:
            yield _sse(_error_body(400, str(err), "invalid_request_error"))
        except Exception as err:  # noqa: BLE001 — the stream has started: the error goes in it, the trace in the log
            log.exception("edgelm serve: unexpected error while streaming")
            yield _sse(
                _error_body(
                    500, f"internal error ({type(err).__name__}); the server log has the details", "server_error"
                )
            )

    @staticmethod
    def _delta(text: str, chat: bool, reason: str | None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"
