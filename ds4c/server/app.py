"""The FastAPI application of ``ds4c serve``: OpenAI routes over one ``ds4c.Engine``.

Every generation request is submitted to the engine (whose background loop steps it with the
others) and waits on an asyncio event that the engine sets from its thread when the request gets a
token or finishes. A client that disconnects cancels its request: the engine frees its pages at
the next step. Admission is bounded: with ``max_waiting`` requests already queued, a new one gets
429 with Retry-After. While draining (SIGTERM), new requests get 503 and in-flight ones go on.

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: malformed JSON, a
field of the wrong type or out of range, an unknown model, a prompt too long for the artifact all
get 400 naming the field and the fix; the server and the other requests go on."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ds4c.errors import Ds4cError
from ds4c.runtime.engine import Engine
from ds4c.runtime.tokenizer import Tokenizer
from ds4c.server.metrics import Metrics
from ds4c.server.protocol import ChatCompletionRequest, CompletionRequest
from ds4c.server.text import TextStream

POLL_S = 0.25  # how often a waiting handler checks that its client is still there


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Disconnected(Exception):
    """The client went away while its request was generating."""


@dataclass
class Generation:
    """One submitted request, as a handler follows it."""

    req: Any
    event: asyncio.Event
    submitted: float
    first_token: float | None = None
    last_token: float | None = None
    seen: int = 0  # output tokens handed to the response so far
    text: TextStream | None = None
    finish_reason: str | None = None


class Server:
    """The state behind the routes: the engine, the tokenizer, the limits, the metrics."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str, max_waiting: int):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.metrics = Metrics(engine)
        self.draining = False
        self.created = int(time.time())
        self.active: set[Any] = set()  # submitted requests a handler still follows
        self.pending = 0  # admitted, not yet in the engine's queue (submit runs in a thread)
        self._ids = itertools.count()

    # -- admission ---------------------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise HTTPError(400, f"model {model!r} is not served here; this server serves {self.model_name!r} "
                            "(GET /v1/models lists it)", param="model", code="model_not_found")

    def admit(self) -> None:
        if self.draining:
            raise HTTPError(503, "the server is shutting down and takes no new requests", kind="unavailable",
                            headers={"Retry-After": "5"})
        # ours that wait: being submitted, or queued in the engine (counted here, on the event loop,
        # so a request is never counted twice while its submit returns)
        waiting = self.pending + sum(1 for req in self.active if req.status == "waiting")
        if waiting >= self.max_waiting:
            self.metrics.rejected.labels("429").inc()
            raise HTTPError(429, f"the server is at capacity ({self.max_waiting} requests waiting); retry later",
                            kind="rate_limit_error", code="overloaded", headers={"Retry-After": "1"})

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not self.tokenizer.has_text:
                raise HTTPError(400, "this artifact has no tokenizer: give the prompt as token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise HTTPError(400, "the prompt is empty (or encodes to no tokens): give at least one token",
                            param="prompt")
        return ids

    async def submit(self, ids: list[int], params) -> Generation:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake(_req) -> None:
            loop.call_soon_threadsafe(event.set)

        self.pending += 1
        try:  # in a thread: submit takes the engine's lock, which a running step holds
            req = await asyncio.to_thread(self.engine.submit, ids, params, on_progress=wake)
        except Ds4cError as e:
            raise HTTPError(400, str(e)) from None
        finally:
            self.pending -= 1
        self.active.add(req)
        self.metrics.prompt_tokens.inc(len(ids))
        return Generation(req, event, time.perf_counter())

    def cancel(self, gen: Generation) -> None:
        """Cancel ``gen``'s request without waiting for the engine's lock (safe when the handler's
        task is being cancelled)."""
        if not gen.req.finished:
            asyncio.get_running_loop().run_in_executor(None, self.engine.cancel, gen.req)

    # -- following a request -----------------------------------------------------------------------

    async def follow(self, gen: Generation, http: Request) -> AsyncIterator[tuple[list[int], list, bool]]:
        """Yield (new token ids, their logprobs, finished) as the engine produces them; raise
        Disconnected when the client leaves."""
        req = gen.req
        want_logprobs = req.params.logprobs is not None
        while True:
            gen.event.clear()
            done = req.finished  # first: once finished, every token is in output_ids
            end = len(req.output_ids)
            if want_logprobs:
                end = min(end, len(req.logprobs))
            new = req.output_ids[gen.seen:end]
            lps = req.logprobs[gen.seen:end] if want_logprobs else []
            gen.seen = end
            if new:
                now = time.perf_counter()
                if gen.first_token is None:
                    gen.first_token = now
                    self.metrics.ttft.observe(now - gen.submitted)
                gen.last_token = now
            if new or done:
                yield new, lps, done
            if done:
                return
            try:
                await asyncio.wait_for(gen.event.wait(), POLL_S)
            except TimeoutError:
                if await http.is_disconnected():
                    raise Disconnected from None

    def finished(self, gen: Generation, endpoint: str) -> None:
        self.active.discard(gen.req)
        reason = gen.finish_reason or gen.req.finish_reason or "cancelled"
        self.metrics.requests.labels(endpoint, reason).inc()
        self.metrics.generation_tokens.inc(gen.seen)
        now = time.perf_counter()
        self.metrics.latency.observe(now - gen.submitted)
        if gen.first_token is not None and gen.seen > 1:
            self.metrics.tpot.observe((gen.last_token - gen.first_token) / (gen.seen - 1))

    # -- responses ---------------------------------------------------------------------------------

    def token_text(self, tok: int) -> str:
        return self.tokenizer.decode([tok]) if self.tokenizer.has_text else ""

    def completion_logprobs(self, toks: list[int], lps: list) -> dict[str, Any]:
        return {"tokens": [self.token_text(t) for t in toks], "token_ids": toks,
                "token_logprobs": [lp for lp, _ in lps],
                "top_logprobs": [{self.token_text(t): v for t, v in top} for _, top in lps]}

    def chat_logprobs(self, toks: list[int], lps: list) -> dict[str, Any]:
        def entry(tok: int, lp: float) -> dict[str, Any]:
            text = self.token_text(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(tt, v) for tt, v in top]}
                            for t, (lp, top) in zip(toks, lps, strict=True)]}


def _finish_reason(gen: Generation) -> str | None:
    if gen.text is not None and gen.text.stopped:
        return "stop"
    return gen.req.finish_reason


def create_app(engine: Engine, tokenizer: Tokenizer, *, model_name: str, max_waiting: int = 256,
               start_engine: bool = True) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (its background loop runs while the app does)."""
    server = Server(engine, tokenizer, model_name=model_name, max_waiting=max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            server.draining = True
            for req in list(server.active):  # what the grace period did not finish
                engine.cancel(req)
            if start_engine:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(title="ds4c serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(HTTPError)
    async def _http_error(_request: Request, e: HTTPError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError):
        by_field: dict[str, list[dict]] = {}
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            by_field.setdefault(loc[0] if loc else "body", []).append(err)
        problems = []
        for name, errs in by_field.items():
            if len(errs) == 1:
                problems.append(f"{name}: {errs[0].get('msg')}")
            else:  # a union field (prompt, stop, ...): one line, not one per accepted form
                value = errs[0].get("input")
                problems.append(f"{name}: {type(value).__name__} {str(value)[:40]!r} is none of the accepted forms")
        msg = "invalid request: " + "; ".join(problems[:5])
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            msg = f"the request body is not valid JSON ({e.errors()[0].get('ctx', {}).get('error', 'decode error')})"
        server.metrics.rejected.labels("400").inc()
        return JSONResponse(HTTPError(400, msg).body(), status_code=400)

    @app.exception_handler(Ds4cError)
    async def _ds4c_error(_request: Request, e: Ds4cError):
        server.metrics.rejected.labels("400").inc()
        return JSONResponse(HTTPError(400, str(e)).body(), status_code=400)

    @app.get("/health")
    async def health():
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "ds4c", "max_model_len": engine.layout.max_context,
                                            "vocab_size": engine.vocab_size}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        server.check_model(body.model)
        server.admit()
        ids = server.encode(body.prompt_input())
        if body.max_tokens is not None and body.max_tokens < 1:
            raise HTTPError(400, f"max_tokens = {body.max_tokens}: must be >= 1", param="max_tokens")
        params = body.sampling_params(body.max_tokens or 16, server.tokenizer.eos_token_id, body.logprobs)
        stops = body.stop_strings()
        gen = await server.submit(ids, params)
        gen.text = TextStream(server.tokenizer, stops)
        rid = f"cmpl-{next(server._ids)}"

        def chunk(text: str, toks: list[int], lps: list, reason: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": text, "token_ids": toks, "finish_reason": reason,
                                 "logprobs": server.completion_logprobs(toks, lps) if params.logprobs is not None
                                 else None}]}

        if body.stream:
            return _sse(server, gen, http, "completions", chunk, body, len(ids))
        return await _whole(server, gen, http, "completions", chunk, len(ids))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        server.check_model(body.model)
        server.admit()
        if not server.tokenizer.has_text:
            raise HTTPError(400, "this artifact has no tokenizer, so no chat: use /v1/completions with token ids")
        prompt = server.tokenizer.apply_chat_template([m.for_template() for m in body.messages])
        ids = server.encode(server.tokenizer.encode(prompt, add_special_tokens=False))
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is not None and limit < 1:
            raise HTTPError(400, f"max_tokens = {limit}: must be >= 1", param="max_tokens")
        room = engine.layout.max_context - len(ids)
        if limit is None and room < 1:
            raise HTTPError(400, f"the conversation is {len(ids)} tokens; this model's context is "
                            f"{engine.layout.max_context}: shorten it", param="messages")
        params = body.sampling_params(limit or room, server.tokenizer.eos_token_id, body.requested_logprobs())
        stops = body.stop_strings()
        gen = await server.submit(ids, params)
        gen.text = TextStream(server.tokenizer, stops)
        rid = f"chatcmpl-{next(server._ids)}"
        first = [True]

        def chunk(text: str, toks: list[int], lps: list, reason: str | None) -> dict[str, Any]:
            logprobs = server.chat_logprobs(toks, lps) if params.logprobs is not None else None
            base = {"id": rid, "created": int(time.time()), "model": model_name}
            if not body.stream:
                return {**base, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "token_ids": toks, "finish_reason": reason, "logprobs": logprobs}]}
            delta = {"content": text}
            if first[0]:
                delta, first[0] = {"role": "assistant", "content": text}, False
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "token_ids": toks, "finish_reason": reason,
                                 "logprobs": logprobs}]}

        if body.stream:
            return _sse(server, gen, http, "chat", chunk, body, len(ids))
        return await _whole(server, gen, http, "chat", chunk, len(ids))

    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _whole(server: Server, gen: Generation, http: Request, endpoint: str, chunk, prompt_len: int):
    toks, lps, text = [], [], []
    try:
        async for new, new_lps, done in server.follow(gen, http):
            toks += new
            lps += new_lps
            text.append(gen.text.add(new, done))
            if gen.text.stopped:
                server.cancel(gen)
                break
    except Disconnected:
        server.cancel(gen)
        gen.finish_reason = "cancelled"
        return Response(status_code=499)
    finally:
        server.finished(gen, endpoint)
    if gen.req.finish_reason == "error" and not gen.text.stopped:
        raise HTTPError(500, f"the model failed on this request: {gen.req.error}", kind="server_error")
    body = chunk("".join(text), toks, lps, _finish_reason(gen))
    body["usage"] = _usage(prompt_len, len(toks))
    return JSONResponse(body)


def _sse(server: Server, gen: Generation, http: Request, endpoint: str, chunk, body, prompt_len: int):
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        count = 0
        try:
            async for new, lps, done in server.follow(gen, http):
                count += len(new)
                text = gen.text.add(new, done)
                stopped = gen.text.stopped
                if stopped:
                    server.cancel(gen)
                if gen.req.finish_reason == "error" and done and not stopped:
                    err = HTTPError(500, f"the model failed on this request: {gen.req.error}", kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                reason = _finish_reason(gen) if (done or stopped) else None
                if new or reason:
                    yield f"data: {json.dumps(chunk(text, new, lps, reason))}\n\n"
                if stopped:
                    break
            if include_usage:
                usage = {**chunk("", [], [], None), "choices": [], "usage": _usage(prompt_len, count)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        except Disconnected:
            gen.finish_reason = "cancelled"
        finally:  # also when Starlette cancels or closes the stream because the client left
            if not gen.req.finished and not (gen.text and gen.text.stopped):
                gen.finish_reason = gen.finish_reason or "cancelled"
            server.cancel(gen)
            server.finished(gen, endpoint)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
