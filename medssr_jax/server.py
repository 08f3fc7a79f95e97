"""An OpenAI-compatible HTTP server on the JAX sampler: a Starlette app served by uvicorn.

    server = Server(model, tokenizer, model_name="smollm2").start()
    # OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=...)
    server.stop()

Endpoints:

``GET /v1/models``, ``GET /v1/models/{id}``
    The one served model.
``POST /v1/chat/completions``
    ``messages`` rendered with the checkpoint's own chat template (the
    tokenizer's ``chat_template`` through ``apply_chat_template``), or with the
    built-in renderer of :mod:`medssr_jax.chat` where the tokenizer has none or
    a template name is given; ``n``, ``temperature``, ``top_p``, ``top_k`` (an
    extension), ``max_tokens`` / ``max_completion_tokens``, ``stop`` (a string
    or up to 4: the text is cut before the first occurrence and the
    finish_reason is ``"stop"``), ``seed``, ``logprobs`` and ``top_logprobs``
    (0..20), ``stream`` (server-sent events of ``chat.completion.chunk``
    deltas, one per sampler chunk, ending with ``data: [DONE]``; a
    ``: keep-alive`` comment every ``keepalive_s`` while nothing else is sent)
    and ``stream_options.include_usage``.
``POST /v1/completions``
    ``prompt`` as a string, a list of strings, a list of token ids or a list
    of such lists; the same sampling fields; ``logprobs`` as an int (0..20).
``GET /health``
    ``{"status": "ok"}``.

Response bodies are checked against the ``openai`` package's own types
(``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``, ``Model``).

Logprobs follow the sampler's convention: log_softmax(logits / T) of the
sampled token before top-p / top-k truncation (log_softmax(logits) when
greedy). Top alternatives come from a teacher-forced forward pass over prompt
+ completion after generation, under the same temperature. When streaming, the
logprobs of all tokens arrive in one chunk after the last content delta (the
sampler reports them only at the end of a generation).

Batching: requests go into one queue; a single worker thread (the only thread
that runs JAX) takes the first waiting request, waits up to ``max_wait_ms`` for
more, and groups them by sampling parameters (n, temperature, top_p, top_k and
max_tokens rounded up to a power of two, at least 16). Each group becomes one
``generate`` call of at most ``max_batch`` sequences (prompts x n); every
request is then cut back to its own max_tokens. Greedy requests batch with
each other regardless of seed; sampling requests that set a seed run on their
own, so the same seed gives the same completions. ``Server.stats`` counts the
generate calls, the requests per call and the calls stopped early.

Limits and hardening: the API key is checked before the body is read; a body
over ``max_body_bytes`` gets 413 before it is read; at most ``max_queue``
requests wait or run at once, further ones get 429 with ``Retry-After``; one
request asks for at most ``max_batch`` sequences (prompts x n) and
``max_tokens_limit`` new tokens (400 naming the limit); a prompt whose
character count cannot fit the context is refused before it is tokenized;
tokenizing runs in a small thread pool with one tokenizer copy per thread, so
a long prompt never stalls the other clients; invalid JSON, JSON nested too
deeply and strings with lone surrogates get 400. A client that disconnects,
streaming or not, releases its queue slot at once, and its generation stops at
the next decode chunk when no other request shares the call. ``stop()`` (and
Ctrl-C under :meth:`Server.serve_forever`) stops a running generation at the
next decode chunk, answers the waiting requests 503 and shuts down cleanly.
Logged request lines escape control characters, and never contain headers.

``completion_tokens`` counts the tokens a choice kept: its EOS token included,
tokens after a stop string excluded. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import dataclasses
import functools
import hmac
import itertools
import json
import math
import queue
import secrets
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np

from medssr_jax.chat import check_messages, format_chat, has_own_template, render_chat

__all__ = ["APIError", "Server"]

MAX_BODY_BYTES = 16 << 20
MAX_TOP_LOGPROBS = 20
MAX_N = 128
MAX_STOP = 4
MIN_TOKENS_BUCKET = 16
TOKENIZER_THREADS = 4


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _shutting_down() -> APIError:
    return APIError(503, "server is shutting down", type="server_error")


class _Aborted(Exception):
    """Raised from the sampler's on_tokens hook to end a generate call early."""


@dataclasses.dataclass(frozen=True)
class _Sampled:
    """One choice as the worker hands it back: tokens (EOS included), their logprobs,
    "eos" / "length", and per token the top alternatives (ids, logprobs) or None."""
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    top: list[tuple[list[int], list[float]]] | None = None


class _Call:
    """A function the worker thread runs between generate calls (JAX stays on that thread)."""

    def __init__(self, fn):
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = e
        self.done.set()


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    kind: str  # "chat" | "completion"
    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    # Set by the handler before submitting: events go from the worker thread to the handler's
    # event loop through loop.call_soon_threadsafe.
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    admitted: bool = False  # holds one of the server's max_queue slots

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def emit(self, kind: str, payload) -> None:
        """Hand an event to the request's handler (any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def group_key(self) -> tuple:
        bucket = MIN_TOKENS_BUCKET
        while bucket < self.max_tokens:
            bucket *= 2
        if self.greedy:
            return (self.n, bucket, 0.0, 1.0, 0, None)
        # A seeded sampling request runs alone: its samples then depend on the seed only.
        alone = None if self.seed is None else self.id
        return (self.n, bucket, self.temperature, self.top_p, self.top_k, alone)


# --- field validation -----------------------------------------------------------

def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (not integer and not math.isfinite(v)):
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind}, got {json.dumps(v)}", param=name)
    if v < lo or v > hi or (lo_open and v == lo):
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        raise APIError(400, f"'{name}' must be {lo_s} and <= {hi}, got {v}", param=name)
    return int(v) if integer else float(v)


def _flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {json.dumps(v)}", param=name)
    return v


def _stop_strings(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > MAX_STOP:
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings",
                       param="stop")
    return [s for s in v if s]


def _unsupported(body: dict, fields: dict[str, Any]) -> None:
    for name, neutral in fields.items():
        v = body.get(name)
        if v is not None and v != neutral and not (callable(neutral) and neutral(v)):
            raise APIError(400, f"'{name}' is not supported by this server", param=name)


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; 400 for invalid or too deeply nested JSON and for strings
    that are not valid Unicode (lone surrogates), naming where."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"Invalid JSON in the request body: {e}") from None
    except RecursionError:
        raise APIError(400, "Invalid JSON in the request body: nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:  # iterative: a deep structure cannot exhaust the Python stack here
        where, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"the string at '{where}' is not valid Unicode (it holds a "
                                    "lone surrogate)", param=where.split("[")[0].split(".")[0]) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((f"{where}.{k}" if where else str(k), x))
                if isinstance(k, str):
                    stack.append((f"{where}.<key>" if where else "<key>", k))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return body


def printable(text: str) -> str:
    """text with control and other non-printable characters escaped (\\r, \\n, \\x1b ...), so
    a client cannot forge or colour log lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# --- the server -------------------------------------------------------------------

class Server:
    """OpenAI-compatible chat/completions server for one model (see the module docstring).

    model: a ``models.Transformer``; tokenizer: a Hugging Face tokenizer
    (``encode`` / ``decode``). chat_template: a :mod:`medssr_jax.chat` template
    name that renders chat prompts with the built-in renderer; default: the
    tokenizer's own template when it has one (``chat_template_source`` says
    ``"checkpoint"``), else the built-in renderer of the model config's name
    (base models, named ``"raw"``, always get the raw prompt). eos_ids: tokens that end a completion,
    default the model config's EOS ids plus the template's stop tokens.
    api_key: when set, requests need ``Authorization: Bearer <api_key>``.
    max_batch: most sequences (prompts x n) per generate call, and per request;
    max_wait_ms: how long the worker waits for more requests before a call.
    chunk_size: decode steps per sampler chunk (the streaming and cancelling
    granularity). default_max_tokens: chat completions without max_tokens get
    at most this many (and no more than the context leaves); completions
    default to 16. max_tokens_limit: most new tokens one request may ask for
    (default: the context). max_queue: most requests waiting or running at
    once (429 beyond). max_body_bytes: largest request body (413 beyond).
    keepalive_s: seconds between SSE keep-alive comments on an idle stream.
    log_requests: one line per request through ``log`` (default: stderr).
    """

    def __init__(self, model, tokenizer, *, model_name: str, chat_template: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 max_batch: int = 32, max_wait_ms: float = 20, chunk_size: int = 32,
                 eos_ids: Sequence[int] | None = None, default_max_tokens: int = 512,
                 max_tokens_limit: int | None = None, max_queue: int = 256,
                 max_body_bytes: int = MAX_BODY_BYTES, keepalive_s: float = 15.0,
                 log_requests: bool = False, log: Callable[[str], None] | None = None):
        for name, value, lo in (("max_batch", max_batch, 1), ("max_wait_ms", max_wait_ms, 0),
                                ("chunk_size", chunk_size, 1), ("max_queue", max_queue, 1),
                                ("max_body_bytes", max_body_bytes, 1), ("keepalive_s", keepalive_s, 0),
                                ("default_max_tokens", default_max_tokens, 1)):
            if value is None or value < lo or (name == "keepalive_s" and value == 0):
                raise ValueError(f"Server: {name} must be {'>' if name == 'keepalive_s' else '>='} "
                                 f"{lo}, got {value}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.config = model.config
        self.chat_template = chat_template or self.config.chat_template
        format_chat([{"role": "user", "content": "x"}], self.chat_template)  # validates the name
        own = chat_template is None and self.chat_template != "raw" and has_own_template(tokenizer)
        self.chat_template_source = "checkpoint" if own else "built-in"
        self.host, self._port = host, port
        self.api_key = api_key or None
        self.max_batch, self.max_wait_ms, self.chunk_size = max_batch, max_wait_ms, chunk_size
        self.default_max_tokens = default_max_tokens
        ctx = self.config.max_position_embeddings
        if max_tokens_limit is not None and max_tokens_limit < 1:
            raise ValueError(f"Server: max_tokens_limit must be >= 1, got {max_tokens_limit}")
        self.max_tokens_limit = min(max_tokens_limit or ctx, ctx)
        self.max_queue, self.max_body_bytes, self.keepalive_s = max_queue, max_body_bytes, keepalive_s
        self.log_requests = log_requests
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        if eos_ids is None:
            ids = list(self.config.eos_token_ids)
            try:
                from medssr_jax.tokenizers import stop_token_ids
                ids += stop_token_ids(tokenizer, self.chat_template)
            except ValueError:
                pass
            eos_ids = list(dict.fromkeys(int(i) for i in ids))
        self.eos_ids = list(eos_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else 0
        self.created = int(time.time())
        self._longest_token = _longest_token_chars(tokenizer)
        self._local = threading.local()  # one tokenizer copy per pool thread, no global lock
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: queue.Queue = queue.Queue()
        self._slots_lock = threading.Lock()
        self._active = 0  # requests admitted and not yet answered or abandoned
        self._stats_lock = threading.Lock()
        self._stats = dict(requests=0, generate_calls=0, batch_sizes=[], generated_tokens=0,
                           stopped_calls=0)
        self._uvicorn = None
        self._http_thread: threading.Thread | None = None
        self._worker_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._jit_cache: dict = {}

    # --- lifecycle ----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._uvicorn else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def stats(self) -> dict:
        """requests answered by the worker, generate_calls, batch_sizes (requests per call),
        generated_tokens, stopped_calls (generate calls ended early: every request of the
        call gone, or the server stopping)."""
        with self._stats_lock:
            return {k: list(v) if isinstance(v, list) else v for k, v in self._stats.items()}

    def start(self) -> "Server":
        try:
            import starlette  # noqa: F401
            import uvicorn
        except ImportError as e:
            raise ImportError(f"Server.start: the server needs starlette and uvicorn ({e}); "
                              "pip install starlette uvicorn") from None

        if self._uvicorn is not None:
            raise RuntimeError("server already started")
        self._stopping.clear()
        self._pool = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS,
                                                           thread_name_prefix="medssr-server-tok")
        self._sock = socket.create_server((self.host, self._port), backlog=256)
        config = uvicorn.Config(self.asgi_app(), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5,
                                timeout_keep_alive=30)
        self._uvicorn = uvicorn.Server(config)
        self._worker_thread = threading.Thread(target=self._worker, name="medssr-server-worker",
                                               daemon=True)
        self._http_thread = threading.Thread(target=self._uvicorn.run,
                                             kwargs=dict(sockets=[self._sock]),
                                             name="medssr-server-http", daemon=True)
        self._worker_thread.start()
        self._http_thread.start()
        deadline = time.monotonic() + 60
        while not self._uvicorn.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self._port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop: a running generation ends at its next decode chunk, waiting requests get 503,
        open connections close."""
        if self._uvicorn is None:
            return
        self._stopping.set()
        self._queue.put(None)
        if self._worker_thread is not None:
            self._worker_thread.join(timeout=120)
        self._fail_queued()
        self._uvicorn.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout=30)
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._uvicorn = None

    def _fail_queued(self) -> None:
        while True:
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(r, _Call):
                r.error = RuntimeError("server stopped")
                r.done.set()
            elif r is not None:
                r.emit("error", _shutting_down())

    def run_on_worker(self, fn):
        """Run fn() on the worker thread (between generate calls) and return its result."""
        if self._uvicorn is None:
            raise RuntimeError("server not started")
        call = _Call(fn)
        self._queue.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def warmup(self, *, prompt_len: int = 32, max_tokens: int = 16, n: int = 1,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> float:
        """Compile the generate calls the batcher can make for these settings: every
        prompt-count bucket up to max_batch // n, prompts of prompt_len tokens (they are
        padded to multiples of 32), max_tokens rounded up as the batcher rounds it, all decode
        chunks. Returns the seconds it took. Needs a started server."""
        from medssr_jax.sampler import _bucket_prompts, generate

        bucket = MIN_TOKENS_BUCKET
        while bucket < max_tokens:
            bucket *= 2
        max_new = min(bucket, self.config.max_position_embeddings - prompt_len)
        sizes = sorted({_bucket_prompts(p, 1) for p in range(1, max(self.max_batch // n, 1) + 1)})

        def compile_all() -> None:
            for p in sizes:
                generate(self.model, [[self.pad_id] * prompt_len] * p, n=n, max_new_tokens=max_new,
                         temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=[],
                         pad_id=self.pad_id, chunk_size=self.chunk_size, progress=False)

        t0 = time.perf_counter()
        self.run_on_worker(compile_all)
        return time.perf_counter() - t0

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block until interrupted (Ctrl-C), then stop cleanly."""
        if self._uvicorn is None:
            self.start()
        try:
            while not self._stopping.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # --- tokenizer helpers (pool threads) ------------------------------------------------

    def _tok(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            try:
                tok = copy.deepcopy(self.tokenizer)
            except Exception:  # noqa: BLE001 - an uncopyable tokenizer is shared as it is
                tok = self.tokenizer
            self._local.tokenizer = tok
        return tok

    def render_chat(self, messages) -> str:
        """The prompt text of ``messages`` as the chat endpoint renders it (see the class
        docstring for which template); ``ValueError`` for messages it cannot render."""
        if self.chat_template_source == "checkpoint":
            return render_chat(check_messages(messages), self.chat_template, self._tok())
        return format_chat(messages, self.chat_template)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self._tok().encode(text, add_special_tokens=add_special_tokens))

    def decode(self, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok().decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _content_tokens(self, tokens: Sequence[int]) -> list[int]:
        """The tokens of a choice without its final EOS token."""
        tokens = list(tokens)
        if tokens and tokens[-1] in self.eos_ids:
            tokens = tokens[:-1]
        return tokens

    def _offsets(self, tokens: Sequence[int]) -> list[int]:
        """Character offset of each token's text in decode(tokens), and the total length."""
        return [len(self.decode(tokens[:i])) for i in range(len(tokens) + 1)]

    def _finalize(self, req: _Request, s: _Sampled) -> dict:
        """Text, kept tokens and finish reason of one choice (stop strings applied)."""
        content = self._content_tokens(s.tokens)
        text = self.decode(content)
        finish = "stop" if s.finish_reason == "eos" else "length"
        kept = len(s.tokens)
        offsets = None
        cut = _first_stop(text, req.stop)
        if cut is not None:
            offsets = self._offsets(content)
            kept = max((i + 1 for i in range(len(content)) if offsets[i] < cut), default=0)
            text, finish = text[:cut], "stop"
        elif req.logprobs:
            offsets = self._offsets(content)
        return dict(text=text, finish_reason=finish, kept=kept, offsets=offsets)

    # --- request parsing (pool threads) ---------------------------------------------

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required (a string)", param="model")
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{self.model_name}'", code="model_not_found", param="model")

    def _check_chars(self, text: str, what: str, param: str) -> None:
        """Refuse, before tokenizing, a text too long for the context whatever its tokens."""
        ctx = self.config.max_position_embeddings
        if self._longest_token and len(text) > ctx * self._longest_token:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, "
                                f"your {what} has {len(text)} characters, more than {ctx} tokens "
                                "can hold. Please reduce its length.",
                           code="context_length_exceeded", param=param)

    def _check_context(self, prompt_len: int, max_tokens: int | None, what: str) -> int | None:
        ctx = self.config.max_position_embeddings
        if max_tokens is None:
            if prompt_len >= ctx:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, "
                                    f"your {what} has {prompt_len} tokens. Please reduce its length.",
                               code="context_length_exceeded")
            return None
        if prompt_len + max_tokens > ctx:
            raise APIError(
                400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                     f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in "
                     "the completion). Please reduce the length of the "
                     f"{what} or the completion (max_tokens).",
                code="context_length_exceeded", param="max_tokens")
        return max_tokens

    def _max_tokens(self, body: dict, name: str) -> int | None:
        v = _number({name: body.get(name)}, name, None, 1, 1 << 31, integer=True)
        if v is not None and v > self.max_tokens_limit:
            raise APIError(400, f"'{name}' is {v}; this server allows at most "
                                f"{self.max_tokens_limit} new tokens per request "
                                "(max_tokens_limit)", param=name)
        return v

    def _check_rows(self, prompts: int, n: int) -> None:
        if prompts * n > self.max_batch:
            raise APIError(400, f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} "
                                f"sequences; this server allows at most {self.max_batch} per "
                                "request (max_batch)", param="n")

    def _sampling_fields(self, body: dict) -> dict:
        return dict(
            n=_number(body, "n", 1, 1, MAX_N, integer=True),
            temperature=_number(body, "temperature", 1.0, 0, 2),
            top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
            top_k=_number(body, "top_k", 0, -1, 1 << 30, integer=True),
            seed=_number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True),
            stop=_stop_strings(body),
            stream=_flag(body, "stream"),
        )

    def _include_usage(self, body: dict, stream: bool) -> bool:
        opts = body.get("stream_options")
        if opts is None:
            return False
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        if not stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true",
                           param="stream_options")
        v = opts.get("include_usage", False)
        if not isinstance(v, bool):
            raise APIError(400, "'stream_options.include_usage' must be a boolean",
                           param="stream_options")
        return v

    def _default_max(self, prompt_lens: list[int], default: int) -> int:
        room = self.config.max_position_embeddings - max(prompt_lens)
        return max(1, min(default, room, self.max_tokens_limit))

    def parse_chat(self, body: dict) -> _Request:
        self._check_model(body)
        _unsupported(body, dict(tools=None, functions=None, logit_bias=None, presence_penalty=0,
                                frequency_penalty=0, audio=None,
                                response_format=lambda v: v == {"type": "text"},
                                tool_choice=lambda v: v in ("none", "auto")))
        f = self._sampling_fields(body)
        self._check_rows(1, f["n"])
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = self._max_tokens({"max_tokens": max_tokens}, "max_tokens")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects",
                           param="messages")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
                content = "".join(p["text"] for p in content)
            role = m.get("role")
            if role == "developer":
                role = "system"
            msgs.append({"role": role, "content": content})
        try:
            text = self.render_chat(msgs)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"invalid 'messages': {e}", param="messages") from None
        self._check_chars(text, "messages", "messages")
        prompt = self.encode(text, add_special_tokens=False)
        if not prompt:
            raise APIError(400, "the formatted messages are empty", param="messages")
        max_tokens = self._check_context(len(prompt), max_tokens, "messages")
        if max_tokens is None:
            max_tokens = self._default_max([len(prompt)], self.default_max_tokens)
        logprobs = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        if top and not logprobs:
            raise APIError(400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        return _Request(id="chatcmpl-" + uuid.uuid4().hex, kind="chat", prompts=[prompt],
                        max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top,
                        include_usage=self._include_usage(body, f["stream"]), **_norm(f))

    def parse_completion(self, body: dict) -> _Request:
        self._check_model(body)
        _unsupported(body, dict(logit_bias=None, presence_penalty=0, frequency_penalty=0, echo=False,
                                best_of=lambda v: v == body.get("n", 1) or v == 1, suffix=None))
        prompt = body.get("prompt")
        vocab = self.config.vocab_size
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "'prompt' must be a string, a list of strings or token-id lists",
                           param="prompt")
        f = self._sampling_fields(body)
        self._check_rows(len(prompt), f["n"])
        max_tokens = self._max_tokens(body, "max_tokens")
        prompts = []
        for i, p in enumerate(prompt):
            what = "prompt" if len(prompt) == 1 else f"prompt {i}"
            if isinstance(p, str):
                self._check_chars(p, what, "prompt")
                ids = self.encode(p, add_special_tokens=True)
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                if any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt {i} has token ids outside [0, {vocab})", param="prompt")
                ids = list(p)
            else:
                raise APIError(400, f"prompt {i} must be a string or a list of token ids", param="prompt")
            if not ids:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
            self._check_context(len(ids), max_tokens, what)
            prompts.append(ids)
        if max_tokens is None:
            max_tokens = self._default_max([len(p) for p in prompts], 16)
        top = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        return _Request(id="cmpl-" + uuid.uuid4().hex, kind="completion", prompts=prompts,
                        max_tokens=max_tokens, logprobs=top is not None, top_logprobs=top or 0,
                        include_usage=self._include_usage(body, f["stream"]), **_norm(f))

    # --- admission -----------------------------------------------------------------------

    def _admit(self) -> None:
        if self._stopping.is_set():
            raise _shutting_down()
        with self._slots_lock:
            if self._active >= self.max_queue:
                raise APIError(429, f"the server is busy: {self.max_queue} requests are already "
                                    "waiting or running (max_queue); retry shortly",
                               type="rate_limit_error", code="server_busy",
                               headers={"Retry-After": "1"})
            self._active += 1

    def _finish(self, req: _Request) -> None:
        """The request is answered or abandoned: the worker skips it, its slot is free."""
        req.cancelled.set()
        with self._slots_lock:
            if req.admitted:
                req.admitted = False
                self._active -= 1

    # --- the worker thread: the only one that runs JAX ---------------------------------

    def _worker(self) -> None:
        pending: collections.deque[_Request] = collections.deque()
        while not self._stopping.is_set():
            if not pending:
                r = self._queue.get()
                if r is None:
                    break
                if isinstance(r, _Call):
                    r.run()
                    continue
                pending.append(r)
            deadline = time.monotonic() + self.max_wait_ms / 1000
            while sum(r.rows for r in pending) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    r = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if r is None:
                    self._stopping.set()
                    break
                if isinstance(r, _Call):
                    r.run()
                    continue
                pending.append(r)
            if self._stopping.is_set():
                break
            # One group per call: the group of the oldest request, up to max_batch sequences.
            pending = collections.deque(r for r in pending if not r.cancelled.is_set())
            if not pending:
                continue
            key = pending[0].group_key()
            batch, rest, rows = [], collections.deque(), 0
            for r in pending:
                if r.group_key() == key and rows + r.rows <= self.max_batch:
                    batch.append(r)
                    rows += r.rows
                else:
                    rest.append(r)
            pending = rest
            try:
                pending.extendleft(reversed(self._run(batch)))
            except _Aborted:
                with self._stats_lock:
                    self._stats["stopped_calls"] += 1
                for r in batch:
                    r.emit("error", _shutting_down() if self._stopping.is_set() else
                           APIError(499, "client closed the request"))
            except Exception as e:  # noqa: BLE001 - answered to the clients, server keeps going
                print(f"medssr server: generate failed: {type(e).__name__}: {printable(str(e))}",
                      file=sys.stderr)
                for r in batch:
                    r.emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                             type="server_error"))
        for r in pending:
            r.emit("error", _shutting_down())

    def _on_chunk(self, streaming: list[tuple[_Request, int]], n: int, toks: np.ndarray) -> None:
        """The tokens so far, for every streaming request of the call."""
        for r, s in streaming:
            if not r.cancelled.is_set():
                r.emit("tokens", toks[s * n:(s + len(r.prompts)) * n].copy())

    def _run(self, batch: list[_Request]) -> list[_Request]:
        """One generate call for requests with the same group key; returns the requests
        that must wait for another call (their max_tokens does not fit beside a longer prompt).
        Raises _Aborted when every request of the call is gone or the server stops."""
        from medssr_jax.sampler import generate

        ctx = self.config.max_position_embeddings
        bucket = batch[0].group_key()[1]
        room = min(ctx - len(p) for r in batch for p in r.prompts)
        max_new = min(bucket, room)
        later = [r for r in batch if r.max_tokens > max_new]
        if later and len(later) == len(batch):  # fit the longest max_tokens; the rest wait
            max_new = max(r.max_tokens for r in batch)
            later = [r for r in batch if any(len(p) + max_new > ctx for p in r.prompts)]
        batch = [r for r in batch if r not in later]
        r0 = batch[0]
        n = r0.n
        prompts = [p for r in batch for p in r.prompts]
        starts = list(itertools.accumulate((len(r.prompts) for r in batch), initial=0))
        streaming = [(r, s) for r, s in zip(batch, starts) if r.stream]

        def on_tokens(toks: np.ndarray) -> None:
            if self._stopping.is_set() or all(r.cancelled.is_set() for r in batch):
                raise _Aborted
            self._on_chunk(streaming, n, toks)

        seed = r0.seed if r0.seed is not None else (0 if r0.greedy else secrets.randbits(31))
        gen = generate(self.model, prompts, n=n, max_new_tokens=max_new, temperature=r0.temperature,
                       top_p=r0.top_p, top_k=r0.top_k, seed=seed % (1 << 32), eos_ids=self.eos_ids,
                       pad_id=self.pad_id, chunk_size=self.chunk_size, progress=False,
                       on_tokens=on_tokens)
        with self._stats_lock:
            self._stats["generate_calls"] += 1
            self._stats["batch_sizes"].append(len(batch))
            self._stats["requests"] += len(batch)
            self._stats["generated_tokens"] += gen.stats["generated_tokens"]
        for r, s in zip(batch, starts):
            if r.cancelled.is_set():
                continue
            choices = []
            for i in range(len(r.prompts)):
                for c in gen[s + i]:
                    toks, lps, reason = c.tokens, c.logprobs, c.finish_reason
                    if len(toks) > r.max_tokens:
                        toks, lps, reason = toks[:r.max_tokens], lps[:r.max_tokens], "length"
                    top = None
                    if r.top_logprobs:
                        top = self._top_logprobs(r.prompts[i], toks, r.temperature, r.top_logprobs)
                    choices.append(_Sampled(toks, lps, reason, top))
            r.emit("done", choices)
        return later

    def _top_logprobs(self, prompt: list[int], completion: list[int], temperature: float, k: int
                      ) -> list[tuple[list[int], list[float]]]:
        """Teacher-forced top-k of log_softmax(logits / T) at each completion position."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from models.transformer import forward

        if not completion:
            return []
        fn = self._jit_cache.get("top")
        if fn is None:
            graphdef, state = nnx.split(self.model)

            @functools.partial(jax.jit, static_argnames=("k",))
            def top(state, tokens, mask, inv_temp, *, k):
                logits = forward(nnx.merge(graphdef, state), tokens, mask)
                return jax.lax.top_k(jax.nn.log_softmax(logits * inv_temp, axis=-1), k)

            fn = self._jit_cache["top"] = functools.partial(top, state)
        seq = prompt + completion
        length = 64  # right-padded to a power-of-two bucket, so few shapes compile
        while length < len(seq):
            length *= 2
        tokens = np.full((1, length), self.pad_id, np.int32)
        mask = np.zeros((1, length), bool)
        tokens[0, :len(seq)] = seq
        mask[0, :len(seq)] = True
        t = temperature if temperature > 0 else 1.0
        vals, ids = fn(jnp.asarray(tokens), jnp.asarray(mask), jnp.float32(1.0 / t),
                       k=MAX_TOP_LOGPROBS)
        # Position j predicts token j + 1: the completion's tokens are predicted from
        # positions len(prompt) - 1 ... len(seq) - 2.
        window = slice(len(prompt) - 1, len(seq) - 1)
        vals, ids = np.asarray(vals)[0, window, :k], np.asarray(ids)[0, window, :k]
        return [(ids[i].tolist(), vals[i].tolist()) for i in range(len(completion))]

    # --- response bodies (pool threads) ------------------------------------------------

    def _token_entry(self, tid: int, lp: float) -> dict:
        s = self.decode([tid], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

    def _chat_logprobs(self, s: _Sampled, kept: int) -> dict:
        content = []
        for i in range(kept):
            e = self._token_entry(s.tokens[i], s.logprobs[i])
            e["top_logprobs"] = ([self._token_entry(t, v) for t, v in zip(*s.top[i])]
                                 if s.top is not None else [])
            content.append(e)
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, s: _Sampled, kept: int, offsets: list[int]) -> dict:
        tokens = [self.decode([t], skip_special_tokens=False) for t in s.tokens[:kept]]
        top = None
        if s.top is not None:
            top = []
            for i in range(kept):
                d: dict[str, float] = {}
                for t, v in zip(*s.top[i]):
                    key = self.decode([t], skip_special_tokens=False)
                    d[key] = max(v, d.get(key, -math.inf))
                top.append(d)
        text_offset = [offsets[min(i, len(offsets) - 1)] for i in range(kept)]
        return {"tokens": tokens, "token_logprobs": s.logprobs[:kept], "top_logprobs": top,
                "text_offset": text_offset}

    def _usage(self, req: _Request, kept: list[int]) -> dict:
        p = sum(len(x) for x in req.prompts)
        c = sum(kept)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _choices(self, req: _Request, sampled: list[_Sampled]) -> tuple[list[dict], list[int]]:
        choices, kept = [], []
        for i, s in enumerate(sampled):
            f = self._finalize(req, s)
            kept.append(f["kept"])
            if req.kind == "chat":
                c = {"index": i, "message": {"role": "assistant", "content": f["text"],
                                             "refusal": None},
                     "logprobs": self._chat_logprobs(s, f["kept"]) if req.logprobs else None,
                     "finish_reason": f["finish_reason"]}
            else:
                c = {"index": i, "text": f["text"],
                     "logprobs": (self._completion_logprobs(s, f["kept"], f["offsets"])
                                  if req.logprobs else None),
                     "finish_reason": f["finish_reason"]}
            choices.append(c)
        return choices, kept

    def response_body(self, req: _Request, sampled: list[_Sampled]) -> dict:
        """The whole (non-streamed) response body."""
        choices, kept = self._choices(req, sampled)
        body = {"id": req.id, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": req.created, "model": self.model_name, "choices": choices,
                "usage": self._usage(req, kept), "system_fingerprint": None}
        return _typed("ChatCompletion" if req.kind == "chat" else "Completion", body)

    def _chunk(self, req: _Request, index: int | None, text: str | None = None, finish=None,
               logprobs=None, role: bool = False, usage: dict | None = None) -> dict:
        chat = req.kind == "chat"
        body = {"id": req.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": req.created, "model": self.model_name, "system_fingerprint": None}
        if usage is not None:
            body.update(choices=[], usage=usage)
        elif chat:
            delta = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs,
                                "finish_reason": finish}]
        else:
            body["choices"] = [{"index": index, "text": text or "", "logprobs": logprobs,
                                "finish_reason": finish}]
        # A streamed text completion has finish_reason null until its last chunk, which
        # openai's Completion type does not allow (its client reads streams without checking).
        return _typed("ChatCompletionChunk", body) if chat else body

    def _stream_deltas(self, req: _Request, toks: np.ndarray, sent: list[str]) -> list[dict]:
        """Chunks for the text the rows have gained (held back: a possible stop-string start
        and a partly decoded character)."""
        hold = max((len(s) for s in req.stop), default=1) - 1
        out = []
        for i in range(req.rows):
            row = toks[i].tolist()
            end = next((k for k, t in enumerate(row) if t in self.eos_ids), len(row))
            text = self.decode(row[:min(end, req.max_tokens)])
            cut = _first_stop(text, req.stop)
            safe = text[:cut] if cut is not None else text[:max(len(text) - hold, 0)].rstrip("\ufffd")
            if len(safe) > len(sent[i]) and safe.startswith(sent[i]):
                out.append(self._chunk(req, i, safe[len(sent[i]):]))
                sent[i] = safe
        return out

    def _stream_tail(self, req: _Request, sampled: list[_Sampled], sent: list[str]) -> list[dict]:
        """The rest of every choice, its logprobs, its finish_reason, then the usage."""
        chat = req.kind == "chat"
        choices, kept = self._choices(req, sampled)
        out = []
        for i, c in enumerate(choices):
            text = c["message"]["content"] if chat else c["text"]
            rest = text[len(sent[i]):]
            if rest:
                out.append(self._chunk(req, i, rest))
            if c["logprobs"] is not None:
                out.append(self._chunk(req, i, None if chat else "", logprobs=c["logprobs"]))
            out.append(self._chunk(req, i, None if chat else "", finish=c["finish_reason"]))
        if req.include_usage:
            out.append(self._chunk(req, None, usage=self._usage(req, kept)))
        return out

    def model_card(self) -> dict:
        return _typed("Model", {"id": self.model_name, "object": "model", "created": self.created,
                                "owned_by": "medssr-jax",
                                "max_model_len": self.config.max_position_embeddings})

    def check_auth(self, header: str | None) -> None:
        if self.api_key is None:
            return
        given = ""
        if header and header.startswith("Bearer "):
            given = header[len("Bearer "):].strip()
        if not given:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # --- HTTP (the event loop) ----------------------------------------------------------

    def asgi_app(self):
        """The Starlette application (wrapped in the request logger when log_requests)."""
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def http_error(request, exc: HTTPException):
            code = "not_found" if exc.status_code == 404 else None
            return _error_response(APIError(exc.status_code, f"no route {request.method} "
                                                             f"{printable(request.url.path)}",
                                            code=code))

        async def unhandled(request, exc: Exception):
            print(f"medssr server: {type(exc).__name__}: {printable(str(exc))}", file=sys.stderr)
            return _error_response(APIError(500, f"internal error: {type(exc).__name__}",
                                            type="server_error"))

        routes = [
            Route("/health", self._health, methods=["GET"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/models/{name:path}", self._model, methods=["GET"]),
            Route("/v1/chat/completions", functools.partial(self._completions, "chat"),
                  methods=["POST"]),
            Route("/v1/completions", functools.partial(self._completions, "completion"),
                  methods=["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                           Exception: unhandled})
        app.router.redirect_slashes = False
        return _RequestLog(app, self._log) if self.log_requests else app

    async def _health(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"status": "ok"})

    async def _models(self, request):
        from starlette.responses import JSONResponse
        try:
            self.check_auth(request.headers.get("authorization"))
        except APIError as e:
            return _error_response(e)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def _model(self, request):
        from starlette.responses import JSONResponse
        try:
            self.check_auth(request.headers.get("authorization"))
            name = request.path_params["name"]
            if name != self.model_name:
                raise APIError(404, f"The model '{printable(name)}' does not exist",
                               code="model_not_found")
        except APIError as e:
            return _error_response(e)
        return JSONResponse(self.model_card())

    async def _read_body(self, request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, f"invalid Content-Length header {printable(length)!r}")
            if int(length) > self.max_body_bytes:
                raise APIError(413, f"request body of {int(length)} bytes exceeds this server's "
                                    f"limit of {self.max_body_bytes} bytes (max_body_bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body exceeds this server's limit of "
                                    f"{self.max_body_bytes} bytes (max_body_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _completions(self, kind: str, request):
        from starlette.responses import JSONResponse, StreamingResponse

        req, stream_started = None, False
        try:
            self.check_auth(request.headers.get("authorization"))  # before the body is read
            raw = await self._read_body(request)
            body = await self._in_pool(parse_body, raw)  # a large body parses off the event loop
            req = await self._in_pool(self.parse_chat if kind == "chat" else self.parse_completion,
                                      body)
            self._admit()
            req.admitted = True
            req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
            self._queue.put(req)
            if req.stream:
                events = self._sse(request, req)
                try:  # errors before the first chunk still get a status
                    first = await events.__anext__()
                except StopAsyncIteration:  # the client left before the first chunk
                    return _error_response(APIError(499, "client closed the request"))
                stream_started = True  # the stream's own finally releases the slot from here on
                return StreamingResponse(_prepend(first, events), headers={
                    "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no"})
            sampled = await self._until_done(request, req)
            return JSONResponse(await self._in_pool(self.response_body, req, sampled))
        except APIError as e:
            return _error_response(e)
        finally:
            if req is not None and not stream_started:
                self._finish(req)

    async def _next_event(self, request, req: _Request, timeout: float | None):
        """The request's next event; None after `timeout` seconds; APIError(499) when the
        client has gone."""
        get = asyncio.ensure_future(req.events.get())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({get, gone}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not get.done():
                get.cancel()
        if get in done:
            kind, payload = get.result()
            if kind == "error":
                raise payload
            return kind, payload
        if gone in done:
            raise APIError(499, "client closed the request")
        return None

    async def _until_done(self, request, req: _Request) -> list[_Sampled]:
        while True:
            ev = await self._next_event(request, req, None)
            if ev[0] == "done":
                return ev[1]

    async def _sse(self, request, req: _Request):
        """The SSE body: `data: <json>` events, keep-alive comments, `data: [DONE]`. The queue
        slot is released when the stream ends, however it ends."""
        sent = [""] * req.rows
        started = req.kind == "chat"  # chat streams open with the role deltas at once
        try:
            if req.kind == "chat":
                for i in range(req.rows):
                    yield _sse_data(self._chunk(req, i, "", role=True))
            try:
                while True:
                    ev = await self._next_event(request, req, self.keepalive_s)
                    if ev is None:
                        started = True
                        yield ": keep-alive\n\n"
                        continue
                    kind, payload = ev
                    if kind == "tokens":
                        for c in await self._in_pool(self._stream_deltas, req, payload, sent):
                            started = True
                            yield _sse_data(c)
                    else:
                        for c in await self._in_pool(self._stream_tail, req, payload, sent):
                            yield _sse_data(c)
                        break
            except APIError as e:
                if e.status == 499:
                    return
                if not started:
                    raise  # nothing sent yet: the handler answers with the error's status
                yield _sse_data(e.body())  # mid-stream: an error event, then the end
            yield "data: [DONE]\n\n"
        finally:
            self._finish(req)


# --- helpers -------------------------------------------------------------------------

_TYPES: dict[str, Any] = {}


def _typed(name: str, body: dict) -> dict:
    """body checked against the openai package's type of that name, as JSON-ready data."""
    cls = _TYPES.get(name)
    if cls is None:
        import openai.types as t
        import openai.types.chat as tc
        cls = _TYPES[name] = getattr(tc, name, None) or getattr(t, name)
    return cls.model_validate(body).model_dump(mode="json", exclude_unset=True)


def _sse_data(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _prepend(first, rest):
    yield first
    async for x in rest:
        yield x


async def _disconnected(request) -> None:
    """Returns once the client has disconnected (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error_response(e: APIError):
    from starlette.responses import JSONResponse
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


def _longest_token_chars(tokenizer) -> int | None:
    """Most characters one token stands for (a bound from the vocabulary's strings), or None."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - then only the body-size limit guards the tokenizer
        return None
    return max((len(t) for t in vocab), default=0) or None


class _RequestLog:
    """ASGI wrapper: one line per request (client, method, path, status, seconds), with
    control characters escaped; headers (API keys) are never logged."""

    def __init__(self, app, log: Callable[[str], None]):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]
        t0 = time.perf_counter()

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            path = scope.get("path", "")
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            self.log(f"{printable(str(client[0]))} - {printable(scope.get('method', ''))} "
                     f"{printable(path)} {status[0]} {time.perf_counter() - t0:.3f}s")


def _norm(f: dict) -> dict:
    """Sampling fields with greedy settings made canonical."""
    f = dict(f)
    if f["temperature"] == 0:
        f.update(top_p=1.0, top_k=0, seed=None)
    if f["top_k"] == -1:  # vLLM's "no top-k"
        f["top_k"] = 0
    return f


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
