"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn): ``peftjax serve``.

Endpoints: ``GET /v1/models`` (the base and every adapter), ``POST /v1/completions``,
``POST /v1/chat/completions`` (the tokenizer's chat template; ``stream: true`` sends
server-sent events), ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` (vLLM's
names and bodies: ``{"lora_name": ..., "lora_path": ...}``) and ``GET /health``. A request's
``model`` names an adapter, or the base model's name for no adapter. Sampling: ``max_tokens``
(``max_completion_tokens``), ``temperature``, ``top_p``, ``stop`` (strings; the text ends
before the first one), ``seed``, ``n = 1``, ``stream_options.include_usage`` and vLLM's
``ignore_eos``. Parameters the server does not implement (``logprobs``, penalties, tools...)
and unknown ones are refused, never ignored.

Bad requests get a 4xx with OpenAI's error body (``{"error": {"message", "type", "param",
"code"}}``) and the server goes on serving. A request the engine has not finished when its
client goes away is cancelled, freeing its row.
"""

import asyncio
import json
import time
import uuid

from peftjax.serving._engine import Engine, Request, ServingError


class BadRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error(status: int, message: str, param=None, code=None):
    from fastapi.responses import JSONResponse
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": param, "code": code}})


def _number(body: dict, key: str, default, kind, lo=None, hi=None, lo_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"{key} must be an integer, got {value!r}", param=key)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BadRequest(f"{key} must be a number, got {value!r}", param=key)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or \
            (hi is not None and value > hi):
        raise BadRequest(f"{key} must lie in {'(' if lo_open else '['}{lo}, {hi}], got {value}",
                         param=key)
    return kind(value)


_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
           "stream_options", "n", "user", "logprobs", "logit_bias", "presence_penalty",
           "frequency_penalty", "ignore_eos"}
KNOWN_COMPLETION = _COMMON | {"prompt", "echo", "suffix", "best_of"}
KNOWN_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                        "tool_choice", "functions", "response_format", "parallel_tool_calls"}


def _usage(ids, request: Request) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": len(request.tokens),
            "total_tokens": len(ids) + len(request.tokens)}


class _Text:
    """A request's text as its tokens arrive, in pieces that are safe to send: tokens are decoded
    incrementally (those since the last complete piece, after the ones before them as context,
    as byte-level and sentencepiece tokenizers need), an incomplete character and a tail that
    may begin a stop string are held back, and the text ends before the first stop string."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens, self.text, self.sent, self.stopped = [], "", 0, False
        self.prefix = self.read = 0  # token offsets: context start, end of the decoded text

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix:self.read])
        now = self.decode(self.tokens[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # not inside a character
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)
        return self._release(len(self.text) - self.hold)

    def close(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if self.stopped:
            return ""
        start = max(0, self.sent - self.hold)
        found = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if found:
            self.stopped, upto = True, min(found)
        piece = self.text[self.sent:max(upto, self.sent)]
        self.sent += len(piece)
        return piece


class Server:
    """The HTTP layer: parses and checks requests, feeds the engine, formats the answers."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str = "base",
                 default_max_tokens: int = 16):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = () if eos is None else (int(eos),)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ------------------------------------------------------------------ parsing
    def _adapter(self, body: dict) -> str | None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model is required: the base model's name or an adapter's",
                             param="model")
        if model == self.model_name:
            return None
        if model not in self.engine.adapters:
            raise BadRequest(f"The model `{model}` does not exist (serving "
                             f"{[self.model_name] + self.engine.adapters}).", param="model",
                             status=404, code="model_not_found")
        return model

    def _sampling(self, body: dict, chat: bool) -> dict:
        known = KNOWN_CHAT if chat else KNOWN_COMPLETION
        unknown = sorted(set(body) - known)
        if unknown:  # as OpenAI's API: never ignore a parameter silently
            raise BadRequest(f"unrecognized request arguments {unknown}; this endpoint takes "
                             f"{sorted(known)}", param=unknown[0])
        for key in ("presence_penalty", "frequency_penalty"):
            if body.get(key) not in (None, 0, 0.0):
                raise BadRequest(f"{key} is not supported by this server", param=key)
        if _number(body, "n", 1, int, 1) != 1:
            raise BadRequest("only n = 1 is supported", param="n")
        for key in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions",
                    "logit_bias"):
            if body.get(key) not in (None, False, 0, [], {}):
                raise BadRequest(f"{key} is not supported by this server", param=key)
        if body.get("tool_choice") not in (None, "none"):
            raise BadRequest("tools are not supported by this server", param="tool_choice")
        if body.get("response_format") not in (None, {"type": "text"}):
            raise BadRequest("response_format other than text is not supported",
                             param="response_format")
        if body.get("best_of") not in (None, 1):
            raise BadRequest("best_of is not supported by this server", param="best_of")
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or \
                len(stop) > 4:
            raise BadRequest("stop must be a non-empty string or a list of at most 4",
                             param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest(f"seed must be an integer, got {seed!r}", param="seed")
        return dict(max_tokens=_number(body, key, self.default_max_tokens, int, 1),
                    temperature=_number(body, "temperature", 1.0, float, 0, 2),
                    top_p=_number(body, "top_p", 1.0, float, 0, 1, lo_open=True),
                    seed=None if seed is None else seed % (2 ** 31 - 1), stop=stop,
                    stream=bool(body.get("stream", False)),
                    ignore_eos=bool(body.get("ignore_eos", False)),
                    usage_chunk=bool((body.get("stream_options") or {}).get("include_usage")))

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and
                    isinstance(m.get("content"), str) for m in messages):
                raise BadRequest("messages must be a non-empty list of {role, content} with "
                                 "string content", param="messages")
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise BadRequest("this model's tokenizer has no chat template; use "
                                 "/v1/completions", param="messages")
            text = self.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages],
                tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # one prompt given as a batch of one
        if isinstance(prompt, str) and prompt:
            return self.tokenizer(prompt)["input_ids"]
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt "
                         "per request)", param="prompt")

    # ------------------------------------------------------------------ answering
    async def complete(self, body: dict, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse
        adapter = self._adapter(body)
        opts = self._sampling(body, chat)
        ids = self._prompt_ids(body, chat)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        # the engine's thread only hands tokens over; the text is made here, off its loop
        request = Request(prompt=list(ids), adapter=adapter, max_tokens=opts["max_tokens"],
                          temperature=opts["temperature"], top_p=opts["top_p"],
                          seed=opts["seed"], eos=() if opts["ignore_eos"] else self.eos,
                          on_token=lambda _, token: put(("token", token)),
                          on_finish=lambda req: put(("end", req.finish_reason)))
        pieces = self._pieces(request, queue, opts["stop"])
        try:
            self.engine.submit(request)
        except ServingError as e:
            param = "max_tokens" if "max_len" in str(e) else "model" if "adapter" in str(e) \
                else None
            raise BadRequest(str(e), param=param) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, name = int(time.time()), body["model"]
        if opts["stream"]:
            usage = (lambda: _usage(ids, request)) if opts["usage_chunk"] else None
            return StreamingResponse(self._events(request, pieces, rid, created, name, chat,
                                                  usage), media_type="text/event-stream")
        text, reason = [], None
        try:
            async for kind, value in pieces:
                if kind == "text":
                    text.append(value)
                else:
                    reason = value
        finally:
            if not request.done:
                self.engine.cancel(request)
        if reason in ("error", "cancelled") and request.error:
            return _error(503, f"the request failed: {request.error}")
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                   "finish_reason": reason, "logprobs": None} if chat else
                  {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None})
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": name, "choices": [choice],
            "usage": _usage(ids, request)})

    async def _pieces(self, request: Request, queue, stops: list[str]):
        """``("text", piece)`` as the request's tokens come, then ``("end", finish reason)``; a
        stop string cancels the request."""
        text = _Text(self.decode, stops)
        while True:
            kind, value = await queue.get()
            if kind == "token":
                piece = text.add(value)
                if piece:
                    yield "text", piece
                if text.stopped:
                    self.engine.cancel(request)
                    yield "end", "stop"
                    return
                continue
            piece = text.close()
            if piece:
                yield "text", piece
            yield "end", "stop" if text.stopped else value
            return

    async def _events(self, request: Request, pieces, rid, created, name, chat, usage):
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece=None, reason=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": piece} if piece is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": reason,
                          "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": kind_name, "created": created,
                                          "model": name, "choices": [choice]}) + "\n\n"
        try:
            if chat:
                yield chunk(first=True)
            async for kind, value in pieces:
                if kind == "text":
                    yield chunk(value)
                    continue
                if value == "error":
                    yield "data: " + json.dumps({"error": {
                        "message": f"the request failed: {request.error}",
                        "type": "server_error", "param": None, "code": None}}) + "\n\n"
                else:
                    yield chunk(reason=value)
                if usage is not None:  # stream_options.include_usage: a last chunk, no choices
                    yield "data: " + json.dumps({"id": rid, "object": kind_name,
                                                 "created": created, "model": name,
                                                 "choices": [], "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (or we are done): free the row
            if not request.done:
                self.engine.cancel(request)

    def models(self) -> dict:
        entry = lambda n, parent: {"id": n, "object": "model", "created": self.created,  # noqa: E731
                                   "owned_by": "peftjax", "root": n, "parent": parent}
        return {"object": "list", "data": [entry(self.model_name, None)] +
                [entry(n, self.model_name) for n in self.engine.adapters]}

    async def load_adapter(self, body: dict):
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise BadRequest("give lora_name and lora_path (strings)", param="lora_name")
        if name == self.model_name:
            raise BadRequest(f"{name!r} is the base model's name", param="lora_name")
        try:  # loading reads files and computes on the host: off the event loop
            await asyncio.to_thread(self.engine.register, name, path)
        except (ServingError, FileNotFoundError, ValueError, TypeError) as e:
            raise BadRequest(f"cannot load adapter {name!r} from {path}: {e}",
                             param="lora_path") from None
        return {"status": "ok", "message": f"adapter {name!r} loaded from {path}"}

    async def unload_adapter(self, body: dict):
        name = body.get("lora_name")
        if name not in self.engine.adapters:
            raise BadRequest(f"no adapter {name!r} (serving {self.engine.adapters})",
                             param="lora_name", status=404, code="model_not_found")
        await asyncio.to_thread(self.engine.unregister, name)
        return {"status": "ok", "message": f"adapter {name!r} unloaded"}


def create_app(engine: Engine, tokenizer, *, model_name: str = "base",
               default_max_tokens: int = 16, manage_engine: bool = True):
    """The FastAPI application. With ``manage_engine`` the app starts the engine's thread on
    startup and stops it (finishing running requests) on shutdown. (No postponed annotations
    in this module: FastAPI reads the endpoints' parameter types at definition.)"""
    import contextlib

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    server = Server(engine, tokenizer, model_name=model_name,
                    default_max_tokens=default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop, drain=True)

    app = FastAPI(title="peftjax", lifespan=lifespan)
    app.state.server = server

    async def body_of(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return _error(e.status, str(e), e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e):
        return _error(400, f"invalid request: {e.errors()}")

    @app.exception_handler(HTTPException)
    async def http_error(_, e):
        return _error(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": len(engine.adapters)}

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await server.complete(await body_of(request), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await server.complete(await body_of(request), chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: HTTPRequest):
        return await server.load_adapter(await body_of(request))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: HTTPRequest):
        return await server.unload_adapter(await body_of(request))

    return app


# ---------------------------------------------------------------------------- peftjax serve
SETTINGS = {  # YAML key -> (default, type, help)
    "model": (None, str, "base model: directory, Hub id or pkg:NAME"),
    "adapters": ({}, dict, "adapters served from the start: {name: PEFT directory}"),
    "served_model_name": (None, str, "the base model's name in requests (default: model)"),
    "host": ("127.0.0.1", str, "address to listen on"),
    "port": (8000, int, "port to listen on"),
    "dtype": ("float32", str, "compute dtype of the base (float32, bfloat16, float16)"),
    "max_batch": (8, int, "requests decoded together"),
    "max_len": (1024, int, "cache slots per request (padded prompt + generated tokens)"),
    "bank_slots": (8, int, "adapters on the device at once, plus one for the base"),
    "max_rank": (None, int, "the adapter bank's rank (default: the largest given adapter's)"),
    "max_virtual_tokens": (None, int, "the longest soft prompt the bank holds (default: the "
                           "longest given adapter's)"),
    "targets": (None, object, "layers the bank covers (default: the given adapters' union, or "
                "all-linear)"),
    "bucket": (16, int, "prompts are padded to a multiple of this many tokens"),
    "max_tokens": (16, int, "max_tokens of a request that gives none"),
}


def load_settings(path: str | None, overrides: dict) -> dict:
    """``peftjax serve`` settings: a YAML file's (see :data:`SETTINGS`), then the flags (the
    flags' adapters add to the file's)."""
    import difflib

    import yaml
    data = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of serve settings")
    adapters = data.get("adapters") or {}
    if isinstance(adapters, dict):  # (anything else fails the type check below)
        adapters = {**adapters, **(overrides.get("adapters") or {})}
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}, "adapters": adapters}
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(
            k, SETTINGS, 1)) else repr(k) for k in unknown]
        raise ValueError(f"unknown serve settings: {', '.join(hints)}; known: "
                         f"{', '.join(SETTINGS)}")
    out = {k: data.get(k, default) for k, (default, _, _) in SETTINGS.items()}
    for k, (_, kind, _) in SETTINGS.items():
        if out[k] is not None and kind is not object and not isinstance(out[k], kind):
            raise ValueError(f"serve setting {k}: expected {kind.__name__}, got {out[k]!r}")
    if not out["model"]:
        raise ValueError("serve needs a base model: --model PATH (or model: in the YAML file)")
    if out["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {out['dtype']!r}")
    return out


def build(settings: dict, *, progress: bool = True):
    """``(engine, app)`` for serve settings (loads the model, tokenizer and adapters)."""
    import jax.numpy as jnp

    from peftjax.models import from_pretrained
    from peftjax.tokenizer import load_tokenizer
    model = from_pretrained(settings["model"], task="causal_lm",
                            dtype=getattr(jnp, settings["dtype"]), progress=progress)
    tokenizer = load_tokenizer(settings["model"])
    engine = Engine(model, adapters=settings["adapters"], targets=settings["targets"],
                    max_rank=settings["max_rank"], bank_slots=settings["bank_slots"],
                    max_virtual_tokens=settings["max_virtual_tokens"],
                    max_batch=settings["max_batch"], max_len=settings["max_len"],
                    bucket=settings["bucket"], base_name=settings["model"])
    name = settings["served_model_name"] or settings["model"]
    return engine, create_app(engine, tokenizer, model_name=name,
                              default_max_tokens=settings["max_tokens"])


def serve(settings: dict, *, progress: bool = True) -> int:
    """Runs the server until SIGTERM or Ctrl-C, which stop accepting connections and finish the
    requests in flight (up to 60 s) first; returns the exit code (0, or 130 after Ctrl-C)."""
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        stopped_by = None

        def handle_exit(self, sig, frame):
            self.stopped_by = sig
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down; we have shut down cleanly and
            # exit with our own code instead
            getattr(self, "_captured_signals", []).clear()

    engine, app = build(settings, progress=progress)
    server = GracefulServer(uvicorn.Config(app, host=settings["host"], port=settings["port"],
                                           log_level="info", timeout_graceful_shutdown=60))
    print(f"peftjax serve: {settings['model']} with adapters {engine.adapters or '(none)'} on "
          f"http://{settings['host']}:{settings['port']}/v1", flush=True)
    server.run()
    return 130 if server.stopped_by == signal.SIGINT else 0
