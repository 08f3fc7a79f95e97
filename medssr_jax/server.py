"""An OpenAI-compatible HTTP server on the JAX sampler.

    server = Server(model, tokenizer, model_name="smollm2").start()
    # OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=...)
    server.stop()

Endpoints (JSON over HTTP/1.1, standard library ``http.server`` only):

``GET /v1/models``, ``GET /v1/models/{id}``
    The one served model.
``POST /v1/chat/completions``
    ``messages`` rendered by :func:`medssr_jax.chat.format_chat` with the
    server's chat template; ``n``, ``temperature``, ``top_p``, ``top_k`` (an
    extension), ``max_tokens`` / ``max_completion_tokens``, ``stop`` (a string
    or up to 4: the text is cut before the first occurrence and the
    finish_reason is ``"stop"``), ``seed``, ``logprobs`` and ``top_logprobs``
    (0..20), ``stream`` (server-sent events of ``chat.completion.chunk``
    deltas, one per sampler chunk, ending with ``data: [DONE]``) and
    ``stream_options.include_usage``.
``POST /v1/completions``
    ``prompt`` as a string, a list of strings, a list of token ids or a list
    of such lists; the same sampling fields; ``logprobs`` as an int (0..20).
``GET /health``
    ``{"status": "ok"}``.

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
generate calls and the requests per call.

``completion_tokens`` counts the tokens a choice kept: its EOS token included,
tokens after a stop string excluded. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: 400 for invalid JSON,
fields or a prompt + max_tokens beyond the model's context, 401 for a missing
or wrong API key (when one is configured), 404 for an unknown model or path.
A client that disconnects mid-stream only ends its own response.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hmac
import http.server
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
from typing import Any, Sequence

import numpy as np

from medssr_jax.chat import format_chat

__all__ = ["APIError", "Server"]

MAX_BODY_BYTES = 32 << 20
MAX_TOP_LOGPROBS = 20
MAX_N = 128
MAX_STOP = 4
MIN_TOKENS_BUCKET = 16
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


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
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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


# --- the server -------------------------------------------------------------------

class Server:
    """OpenAI-compatible chat/completions server for one model (see the module docstring).

    model: a ``models.Transformer``; tokenizer: a Hugging Face tokenizer
    (``encode`` / ``decode``). chat_template: a :mod:`medssr_jax.chat` template
    name, default the model config's. eos_ids: tokens that end a completion,
    default the model config's EOS ids plus the template's stop tokens.
    api_key: when set, requests need ``Authorization: Bearer <api_key>``.
    max_batch: most sequences (prompts x n) per generate call; max_wait_ms:
    how long the worker waits for more requests before a call. chunk_size:
    decode steps per sampler chunk (the streaming granularity).
    default_max_tokens: chat completions without max_tokens get at most this
    many (and no more than the context leaves); completions default to 16.
    """

    def __init__(self, model, tokenizer, *, model_name: str, chat_template: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 max_batch: int = 32, max_wait_ms: float = 20, chunk_size: int = 32,
                 eos_ids: Sequence[int] | None = None, default_max_tokens: int = 512,
                 log_requests: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.config = model.config
        self.chat_template = chat_template or self.config.chat_template
        format_chat([{"role": "user", "content": "x"}], self.chat_template)  # validates the name
        self.host, self._port = host, port
        self.api_key = api_key or None
        self.max_batch, self.max_wait_ms, self.chunk_size = max_batch, max_wait_ms, chunk_size
        self.default_max_tokens = default_max_tokens
        self.log_requests = log_requests
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
        self._tok_lock = threading.Lock()  # HF tokenizer wrappers are not thread-safe
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._stats_lock = threading.Lock()
        self._stats = dict(requests=0, generate_calls=0, batch_sizes=[], generated_tokens=0)
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._jit_cache: dict = {}

    # --- lifecycle ----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def stats(self) -> dict:
        """requests answered by the worker, generate_calls, batch_sizes (requests per call),
        generated_tokens."""
        with self._stats_lock:
            return {k: list(v) if isinstance(v, list) else v for k, v in self._stats.items()}

    def start(self) -> "Server":
        if self._httpd is not None:
            raise RuntimeError("server already started")
        app = self

        class Handler(_Handler):
            server_app = app

        self._httpd = _HTTPServer((self.host, self._port), Handler)
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._worker, name="medssr-server-worker", daemon=True),
            threading.Thread(target=self._httpd.serve_forever, kwargs=dict(poll_interval=0.1),
                             name="medssr-server-http", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()
        self._queue.put(None)
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=30)
        while True:  # fail whatever is still queued
            try:
                r = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(r, _Call):
                r.error = RuntimeError("server stopped")
                r.done.set()
            elif r is not None:
                r.events.put(("error", APIError(503, "server is shutting down", type="server_error")))
        self._httpd = None

    def run_on_worker(self, fn):
        """Run fn() on the worker thread (between generate calls) and return its result."""
        if self._httpd is None:
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
        """Block until interrupted (Ctrl-C), then stop."""
        if self._httpd is None:
            self.start()
        try:
            while not self._stopping.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    # --- tokenizer helpers (any thread) ------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

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

    # --- request parsing (handler threads) --------------------------------------------

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required (a string)", param="model")
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{self.model_name}'", code="model_not_found", param="model")

    def _check_context(self, prompt_len: int, max_tokens: int | None, what: str) -> int:
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
        return max(1, min(default, room))

    def parse_chat(self, body: dict) -> _Request:
        self._check_model(body)
        _unsupported(body, dict(tools=None, functions=None, logit_bias=None, presence_penalty=0,
                                frequency_penalty=0, audio=None,
                                response_format=lambda v: v == {"type": "text"},
                                tool_choice=lambda v: v in ("none", "auto")))
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
            text = format_chat(msgs, self.chat_template)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"invalid 'messages': {e}", param="messages") from None
        prompt = self.encode(text, add_special_tokens=False)
        if not prompt:
            raise APIError(400, "the formatted messages are empty", param="messages")
        f = self._sampling_fields(body)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 31, integer=True)
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
        prompts = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids = self.encode(p, add_special_tokens=True)
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                if any(not 0 <= t < vocab for t in p):
                    raise APIError(400, f"prompt {i} has token ids outside [0, {vocab})", param="prompt")
                ids = list(p)
            else:
                raise APIError(400, f"prompt {i} must be a string or a list of token ids", param="prompt")
            if not ids:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
            prompts.append(ids)
        f = self._sampling_fields(body)
        max_tokens = _number(body, "max_tokens", None, 1, 1 << 31, integer=True)
        for i, p in enumerate(prompts):
            self._check_context(len(p), max_tokens, "prompt" if len(prompts) == 1 else f"prompt {i}")
        if max_tokens is None:
            max_tokens = self._default_max([len(p) for p in prompts], 16)
        top = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        return _Request(id="cmpl-" + uuid.uuid4().hex, kind="completion", prompts=prompts,
                        max_tokens=max_tokens, logprobs=top is not None, top_logprobs=top or 0,
                        include_usage=self._include_usage(body, f["stream"]), **_norm(f))

    def submit(self, req: _Request) -> None:
        if self._stopping.is_set():
            raise APIError(503, "server is shutting down", type="server_error")
        self._queue.put(req)

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
                if r.group_key() == key and (not batch or rows + r.rows <= self.max_batch):
                    batch.append(r)
                    rows += r.rows
                else:
                    rest.append(r)
            pending = rest
            try:
                pending.extendleft(reversed(self._run(batch)))
            except Exception as e:  # noqa: BLE001 - answered to the clients, server keeps going
                print(f"medssr server: generate failed: {type(e).__name__}: {e}", file=sys.stderr)
                for r in batch:
                    r.events.put(("error", APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                                    type="server_error")))
        for r in pending:
            r.events.put(("error", APIError(503, "server is shutting down", type="server_error")))

    def _run(self, batch: list[_Request]) -> list[_Request]:
        """One generate call for requests with the same group key; returns the requests
        that must wait for another call (their max_tokens does not fit beside a longer prompt)."""
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
            for r, s in streaming:
                if not r.cancelled.is_set():
                    r.events.put(("tokens", toks[s * n:(s + len(r.prompts)) * n].copy()))

        seed = r0.seed if r0.seed is not None else (0 if r0.greedy else secrets.randbits(31))
        gen = generate(self.model, prompts, n=n, max_new_tokens=max_new, temperature=r0.temperature,
                       top_p=r0.top_p, top_k=r0.top_k, seed=seed % (1 << 32), eos_ids=self.eos_ids,
                       pad_id=self.pad_id, chunk_size=self.chunk_size, progress=False,
                       on_tokens=on_tokens if streaming else None)
        with self._stats_lock:
            self._stats["generate_calls"] += 1
            self._stats["batch_sizes"].append(len(batch))
            self._stats["requests"] += len(batch)
            self._stats["generated_tokens"] += gen.stats["generated_tokens"]
        for r, s in zip(batch, starts):
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
            r.events.put(("done", choices))
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

    # --- responses (handler threads) ---------------------------------------------------

    def _wait(self, req: _Request):
        """Next event of a request, or an error once the server stops."""
        while True:
            try:
                return req.events.get(timeout=0.5)
            except queue.Empty:
                if self._stopping.is_set():
                    raise APIError(503, "server is shutting down", type="server_error") from None

    def _token_entry(self, tid: int, lp: float) -> dict:
        s = self.decode([tid], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

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

    def respond(self, req: _Request) -> dict:
        """The whole (non-streamed) response body."""
        while True:
            kind, payload = self._wait(req)
            if kind == "error":
                raise payload
            if kind == "done":
                break
        choices, kept = self._choices(req, payload)
        return {"id": req.id, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": req.created, "model": self.model_name, "choices": choices,
                "usage": self._usage(req, kept), "system_fingerprint": None}

    def stream(self, req: _Request):
        """The response as a sequence of SSE payloads (dicts; the caller adds [DONE])."""
        chat = req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": req.id, "object": obj, "created": req.created, "model": self.model_name,
                "system_fingerprint": None}
        rows = req.rows
        sent = [""] * rows
        hold = max((len(s) for s in req.stop), default=1) - 1

        def chunk(index: int, text: str | None = None, finish=None, logprobs=None, role=False):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                c = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                c = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return dict(base, choices=[c])

        if chat:
            for i in range(rows):
                yield chunk(i, "", role=True)
        while True:
            kind, payload = self._wait(req)
            if kind == "error":
                raise payload
            if kind == "done":
                break
            for i in range(rows):
                toks = payload[i].tolist()
                end = next((k for k, t in enumerate(toks) if t in self.eos_ids), len(toks))
                toks = toks[:min(end, req.max_tokens)]
                text = self.decode(toks)
                cut = _first_stop(text, req.stop)
                if cut is not None:
                    safe = text[:cut]
                else:
                    safe = text[:max(len(text) - hold, 0)].rstrip("\ufffd")
                if len(safe) > len(sent[i]) and safe.startswith(sent[i]):
                    yield chunk(i, safe[len(sent[i]):])
                    sent[i] = safe
        choices, kept = self._choices(req, payload)
        for i, c in enumerate(choices):
            text = c["message"]["content"] if chat else c["text"]
            if text.startswith(sent[i]):
                rest = text[len(sent[i]):]
            else:  # cannot happen with prefix-stable decoding; send the remainder by length
                rest = text[len(sent[i]):]
            if rest:
                yield chunk(i, rest)
            if c["logprobs"] is not None:
                yield chunk(i, None if chat else "", logprobs=c["logprobs"])
            yield chunk(i, None if chat else "", finish=c["finish_reason"])
        if req.include_usage:
            yield dict(base, choices=[], usage=self._usage(req, kept))

    def models_body(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "medssr-jax", "max_model_len": self.config.max_position_embeddings}

    def check_auth(self, header: str | None) -> None:
        if self.api_key is None:
            return
        given = ""
        if header and header.startswith("Bearer "):
            given = header[len("Bearer "):].strip()
        if not given:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


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


# --- HTTP plumbing --------------------------------------------------------------------

class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # listen backlog: many clients connect at once

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECTS):
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "medssr-jax"
    server_app: Server
    timeout = 300

    def log_message(self, format, *args):  # never logs headers (API keys)
        if self.server_app.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: APIError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        self._send_json(e.status, e.body(), headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise APIError(411, "a Content-Length header is required") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self):
        app = self.server_app
        try:
            path = self._path()
            if path == "/health":
                return self._send_json(200, {"status": "ok"})
            app.check_auth(self.headers.get("Authorization"))
            if path == "/v1/models":
                return self._send_json(200, app.models_body())
            if path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                if name != app.model_name:
                    raise APIError(404, f"The model '{name}' does not exist", code="model_not_found")
                return self._send_json(200, app.model_card())
            raise APIError(404, f"no route GET {path}", code="not_found")
        except APIError as e:
            self._send_error(e)
        except _DISCONNECTS:
            self.close_connection = True

    def do_POST(self):
        app = self.server_app
        req = None
        try:
            try:
                raw = self._read_body()
            except APIError:
                raise
            path = self._path()
            app.check_auth(self.headers.get("Authorization"))
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise APIError(404, f"no route POST {path}", code="not_found")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"Invalid JSON in the request body: {e}") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            req = (app.parse_chat if path == "/v1/chat/completions" else app.parse_completion)(body)
            app.submit(req)
            if req.stream:
                self._stream(req)
            else:
                self._send_json(200, app.respond(req))
        except APIError as e:
            if req is not None:
                req.cancelled.set()
            try:
                self._send_error(e)
            except _DISCONNECTS:
                self.close_connection = True
        except _DISCONNECTS:
            if req is not None:
                req.cancelled.set()
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug answers 500, the server keeps serving
            if req is not None:
                req.cancelled.set()
            print(f"medssr server: {type(e).__name__}: {e}", file=sys.stderr)
            try:
                self._send_error(APIError(500, f"internal error: {type(e).__name__}",
                                          type="server_error"))
            except _DISCONNECTS:
                self.close_connection = True

    def _stream(self, req: _Request) -> None:
        app = self.server_app
        events = app.stream(req)
        try:
            first = next(events)  # errors before the first chunk still get a JSON status
        except APIError:
            raise
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def write(payload: str) -> None:
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        try:
            write(json.dumps(first))
            for ev in events:
                write(json.dumps(ev))
        except APIError as e:  # mid-stream: an error event, then the end of the stream
            write(json.dumps(e.body()))
        write("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
