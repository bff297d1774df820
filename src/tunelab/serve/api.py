"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions and /v1/chat/completions (with server-sent
events when `stream` is true), /health and /metrics, on FastAPI; requests go to the dynamic batcher."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.generation import Engine
from tunelab.serve.batcher import Batcher, Job, QueueFull
from tunelab.serve.metrics import Metrics

log = logging.getLogger(__name__)
MAX_N = 8
# Parameters of OpenAI's API that are accepted only at their neutral value (anything else gets 400)
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "echo": False, "best_of": 1,
           "suffix": None, "logit_bias": None, "top_logprobs": None, "tools": None, "tool_choice": None,
           "functions": None, "function_call": None, "response_format": None, "parallel_tool_calls": None}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _text(content: str | list[dict] | None) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str) or content is None:
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


class Server:
    """The engine behind one model name, its batcher, metrics and request handling."""

    def __init__(self, engine: Engine, model_name: str, *, api_key: str | None, max_batch_size: int = 32,
                 max_queue: int = 256, wait_seconds: float = 0.01, max_tokens_limit: int = 2048):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.metrics = Metrics()
        self.batcher = Batcher(engine, self.metrics, max_batch_size=max_batch_size, max_queue=max_queue,
                               wait_seconds=wait_seconds)
        self.context_length = getattr(engine.model.config, "max_position_embeddings", None) or 2048
        self.max_tokens_limit = min(max_tokens_limit, self.context_length)
        self.created = int(time.time())

    # requests -> jobs
    def _parse(self, body: object, schema: type[_Request]) -> _Request:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for key, neutral in NEUTRAL.items():
            if key in body and body[key] != neutral and body[key] is not None:
                raise ApiError(400, f"parameter {key!r} is not supported by tunelab serve (supported: "
                                    f"{', '.join(sorted(set(schema.model_fields) - {'model_config'}))})", key,
                               "unsupported_parameter")
        try:
            request = schema.model_validate(body)
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or None
            raise ApiError(400, f"{where}: {problem['msg']}" if where else problem["msg"], where) from None
        unknown = sorted(set(request.model_extra or {}) - set(NEUTRAL))
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}", unknown[0], "unsupported_parameter")
        if request.model != self.model_name:
            raise ApiError(404, f"model {request.model!r} does not exist (this server serves {self.model_name!r})",
                           "model", "model_not_found")
        if request.stop is not None:
            stops = [request.stop] if isinstance(request.stop, str) else request.stop
            if len(stops) > 4 or not all(stops):
                raise ApiError(400, "stop: at most 4 non-empty strings", "stop")
        return request

    def _max_tokens(self, request: _Request, prompts: list[str]) -> tuple[int, int]:
        """The request's max new tokens, checked against the limit and the context length; its prompt tokens."""
        requested = getattr(request, "max_completion_tokens", None) or request.max_tokens
        max_tokens = requested if requested is not None else self.engine.config.max_new_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be between 1 and {self.max_tokens_limit}, got {max_tokens}",
                           "max_tokens")
        lengths = [self.engine.prompt_tokens(p) for p in prompts]
        if max(lengths) + max_tokens > self.context_length:
            raise ApiError(400, f"the prompt has {max(lengths)} tokens; with max_tokens {max_tokens} that exceeds the "
                                f"model's context length of {self.context_length} tokens", "messages"
                           if isinstance(request, ChatRequest) else "prompt", "context_length_exceeded")
        return max_tokens, sum(lengths)

    def chat_prompt(self, messages: list[Message]) -> str:
        """The model's chat template when the study's prompt format is chat_template; otherwise the study's
        prompt format with the last user message as the instruction."""
        if self.engine.prompt_format == "chat_template":
            turns = [{"role": m.role, "content": _text(m.content)} for m in messages]
            return self.engine.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        users = [m for m in messages if m.role == "user"]
        if not users:
            raise ApiError(400, "messages: at least one message with role 'user' is needed", "messages")
        return self.engine.record_prompt({"instruction": _text(users[-1].content), "input": ""})

    def _sampling(self, request: _Request) -> tuple:
        """temperature 0 is greedy; a temperature or top_p samples; neither follows the model's settings."""
        config = self.engine.config
        if request.temperature == 0 or (request.temperature is None and request.top_p is None and not config.do_sample):
            return ("greedy",)
        return ("sample", request.temperature or config.temperature, request.top_p or config.top_p, request.seed)

    async def handle(self, endpoint: str, request: Request):
        began = time.perf_counter()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ApiError(400, f"the request body is not valid JSON ({err})") from None
            chat = endpoint == "chat/completions"
            parsed = self._parse(body, ChatRequest if chat else CompletionRequest)
            prompts = [self.chat_prompt(parsed.messages)] if chat else (
                [parsed.prompt] if isinstance(parsed.prompt, str) else parsed.prompt)
            if not prompts:
                raise ApiError(400, "prompt: at least one prompt is needed", "prompt")
            max_tokens, prompt_tokens = self._max_tokens(parsed, prompts)
            stops = [parsed.stop] if isinstance(parsed.stop, str) else (parsed.stop or [])
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            job = Job([p for p in prompts for _ in range(parsed.n)], max_tokens, self._sampling(parsed),
                      lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)),
                      streaming=parsed.stream, prompt_tokens=prompt_tokens * parsed.n)
            try:
                self.batcher.submit(job)
            except QueueFull as err:
                raise ApiError(503, f"the server is busy: {err}; retry later", code="queue_full") from None
        except ApiError as err:
            self.metrics.request_done(endpoint, err.status)
            return _error_body(err.status, err.message, err.param, err.code)
        reply = Reply(self, chat, parsed, job, stops, prompt_tokens)
        if parsed.stream:
            return StreamingResponse(reply.stream(events, endpoint, began), media_type="text/event-stream")
        kind, payload = await events.get()
        while kind == "step":
            kind, payload = await events.get()
        if kind == "error":
            self.metrics.request_done(endpoint, 500, time.perf_counter() - began)
            return _error_body(500, payload)
        self.metrics.request_done(endpoint, 200, time.perf_counter() - began)
        return JSONResponse(reply.whole(payload))


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to its first stop string, and whether one was found."""
    found = [text.index(s) for s in stops if s in text]
    return (text[:min(found)], True) if found else (text, False)


class Reply:
    """One request's OpenAI response body, whole or as server-sent event chunks."""

    def __init__(self, server: Server, chat: bool, request: _Request, job: Job, stops: list[str], prompt_tokens: int):
        self.server, self.chat, self.request, self.job, self.stops = server, chat, request, job, stops
        self.prompt_tokens = prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        if not self.request.stream:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason, "logprobs": None}
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}

    def _body(self, choices: list[dict], usage: dict | None) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        if self.chat and self.request.stream:
            kind += ".chunk"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_name,
                "choices": choices}
        if usage is not None or not self.request.stream:
            body["usage"] = usage
        return body

    def whole(self, completions: list) -> dict:
        choices = []
        for index, completion in enumerate(completions):
            text, stopped = _cut(completion.text, self.stops)
            choices.append(self._choice(index, text, "stop" if stopped else completion.finish_reason))
        return self._body(choices, self._usage(sum(c.generated_tokens for c in completions)))

    async def stream(self, events: asyncio.Queue, endpoint: str, began: float):
        """Chunks as tokens arrive; text is held back while it could still be the start of a stop string."""
        rows = len(self.job.prompts)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        sent = [""] * rows
        finished: list[str | None] = [None] * rows
        stop_ids = set(self.server.engine.stop_token_ids)
        holdback = max((len(s) for s in self.stops), default=1) - 1
        decode = self.server.engine.tokenizer.decode

        def chunk(index: int, text: str | None, reason: str | None = None, first: bool = False) -> str:
            return f"data: {json.dumps(self._body([self._choice(index, text, reason, first)], None))}\n\n"

        def advance(index: int, final_reason: str | None) -> str:
            """Row `index`'s text not sent yet (all of it once the row ends); a stop string ends the row."""
            text, stopped = _cut(decode(tokens[index], skip_special_tokens=True), self.stops)
            if stopped or final_reason:
                finished[index] = "stop" if stopped else final_reason
                safe = text
            else:
                safe = text[:max(len(text) - holdback, 0)].rstrip("\ufffd")
            piece = safe[len(sent[index]):]
            sent[index] += piece
            return piece

        if self.chat:
            for index in range(rows):
                yield chunk(index, None, first=True)
        generated = 0
        while True:
            kind, payload = await events.get()
            if kind == "error":
                self.server.metrics.request_done(endpoint, 500, time.perf_counter() - began)
                yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                return
            if kind == "done":
                for index, completion in enumerate(payload):
                    generated += completion.generated_tokens
                    if finished[index] is None:
                        tokens[index] = completion.token_ids
                        yield chunk(index, advance(index, completion.finish_reason), finished[index])
                break
            for index, token in payload.items():
                if finished[index] is not None:
                    continue
                if token in stop_ids:
                    yield chunk(index, advance(index, "stop"), "stop")
                    continue
                tokens[index].append(token)
                piece = advance(index, "length" if len(tokens[index]) >= self.job.max_new_tokens else None)
                if piece or finished[index]:
                    yield chunk(index, piece, finished[index])
        if (self.request.stream_options or {}).get("include_usage"):
            yield f"data: {json.dumps(self._body([], self._usage(generated)))}\n\n"
        yield "data: [DONE]\n\n"
        self.server.metrics.request_done(endpoint, 200, time.perf_counter() - began)


def build_app(server: Server) -> FastAPI:
    """The FastAPI application of `server`; /v1 needs `Authorization: Bearer <key>` when a key is set."""
    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
            if not secrets.compare_digest(given.encode(), server.api_key.encode()):
                server.metrics.request_done(request.url.path.removeprefix("/v1/"), 401)
                return _error_body(401, "missing or wrong API key: send the header Authorization: Bearer KEY "
                                        "with the key in TUNELAB_API_KEY", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "tunelab", "max_model_len": server.context_length}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle("completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle("chat/completions", request)

    return app
