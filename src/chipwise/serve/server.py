"""`chipwise serve`'s HTTP side: the OpenAI API (completions and chat completions, streamed by server-sent events),
/v1/models, /health and Prometheus /metrics, in FastAPI, over the engine (engine.py) that runs on its own thread.

Errors are the OpenAI API's JSON: 400 for a malformed request or a prompt the context cannot hold, 429 when the
bounded queue is full, 503 while the server drains after SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from chipwise.serve import protocol
from chipwise.serve.engine import Engine, NotAccepting, QueueFull, SamplingParams
from chipwise.serve.engine import Request as EngineRequest
from chipwise.serve.metrics import ServerMetrics
from chipwise.serve.model_source import ServedModel


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def build_app(engine: Engine, served: ServedModel, metrics: ServerMetrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        yield
        # uvicorn has stopped taking connections and the open ones have ended: finish what is left, then stop
        await asyncio.to_thread(engine.shutdown, True)

    app = FastAPI(title="chipwise serve", lifespan=lifespan)

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        metrics.reject(status)
        kind = {429: "rate_limit_error", 503: "service_unavailable", 404: "not_found_error"}.get(
            status, "invalid_request_error")
        return JSONResponse(protocol.error_body(message, kind, param, status), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "chipwise", "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request):
        check(body)
        try:
            prompt = body.single_prompt()
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from None
        if isinstance(prompt, str):
            ids = served.tokenizer.encode(prompt).ids
        else:
            vocab = engine.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
            ids = list(prompt)
        return await generate(request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: protocol.ChatRequest, request: Request):
        check(body)
        if served.chat_template is None:
            raise ApiError(400, f"the model {served.name} has no chat template; use /v1/completions", "messages")
        try:
            text = protocol.render_chat(served.chat_template, body.messages, served.special_tokens)
        except Exception as e:  # a template's own raise_exception, or one that does not fit these messages
            raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from None
        ids = served.tokenizer.encode(text, add_special_tokens=False).ids
        limit = body.max_completion_tokens or body.max_tokens or max(engine.max_seq_len - len(ids), 1)
        return await generate(request, body, ids, limit, chat=True)

    def check(body) -> None:
        problem = body.unsupported()
        if problem:
            raise ApiError(400, problem)
        if body.model is not None and body.model != served.name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {served.name!r}",
                           "model")

    async def generate(request: Request, body, ids: list[int], max_tokens: int, chat: bool):
        sampling = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                                  top_p=body.top_p, seed=body.seed, stop=body.stop_strings(),
                                  ignore_eos=body.ignore_eos)
        problem = engine.check_fits(len(ids), max_tokens)
        if problem:
            raise ApiError(400, problem, "max_tokens" if len(ids) < engine.max_seq_len else "prompt")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = EngineRequest(ids, sampling, lambda e: loop.call_soon_threadsafe(
            events.put_nowait, (time.perf_counter(), e)))
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        except NotAccepting as e:
            raise ApiError(503, str(e)) from None
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        times: list[float] = []

        def done():
            metrics.request_done(job.arrival, times, len(ids), len(job.output_ids), job.finish_reason or "abort")

        def use():
            return protocol.usage(len(ids), len(job.output_ids))

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                try:
                    while True:
                        t, e = await events.get()
                        times.append(t)
                        yield sse(protocol.completion_object(rid, served.name, e.text, e.finish_reason, None, chat,
                                                             chunk=True))
                        if e.finish_reason:
                            break
                    if include_usage:
                        tail = protocol.completion_object(rid, served.name, "", None, use(), chat, chunk=True)
                        yield sse({**tail, "choices": []})
                    yield "data: [DONE]\n\n"
                finally:  # also when the client went away and the response task was cancelled
                    if job.finish_reason is None:
                        engine.cancel(job)
                    done()

            return StreamingResponse(stream(), media_type="text/event-stream")
        text, finish = [], None
        while finish is None:
            try:
                t, e = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():  # nobody will read the reply: free the slot now
                    engine.cancel(job)
                    done()
                    return Response(status_code=499)
                continue
            times.append(t)
            text.append(e.text)
            finish = e.finish_reason
        done()
        return protocol.completion_object(rid, served.name, "".join(text), finish, use(), chat, chunk=False)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def run(app: FastAPI, engine: Engine, host: str, port: int, log=print) -> None:
    """Serve until SIGINT or SIGTERM: then admit nothing more, let the open requests finish, and return."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop_accepting()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal once it has shut down, so the process dies by it; a server that
            # drained cleanly exits 0 instead, which is what supervisors (Kubernetes, systemd) read as success
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=None)
    server = DrainingServer(config)
    log(f"serving {engine.served.name} on http://{host}:{port}/v1 ({engine.num_slots} slots, context "
        f"{engine.max_seq_len} tokens)")
    server.run()
