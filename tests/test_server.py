"""The OpenAI-compatible server against the sampler, through the real `openai` client.

A tiny random model (untied embeddings, so greedy text varies) with a byte-level tokenizer
built here: ids 0..2 are <pad>, <|im_end|> (the model's EOS, id 1) and <|im_start|>, ids
3..255 the bytes 3..255. Every response is checked against `generate` on the same prompt
tokens. All tiny-model requests use max_tokens <= 16 and prompts <= 32 tokens, so the server's
calls (max_tokens bucket 16, chunk size 8) and the reference calls share compiled shapes.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")

import models  # noqa: E402
from medssr_jax.chat import format_chat  # noqa: E402
from medssr_jax.sampler import generate  # noqa: E402
from medssr_jax.server import Server  # noqa: E402
from medssr_jax.tokenizers import byte_tokenizer  # noqa: E402

API_KEY = "test-key-123"
NEW = 16
CHUNK = 8
TEMPLATE = "qwen3"


def tiny_tokenizer():
    return byte_tokenizer()


# --- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    assert t.encode("ab", add_special_tokens=False) == [97, 98]
    assert t.encode("<|im_start|>x<|im_end|>", add_special_tokens=False) == [2, 120, 1]
    return t


@pytest.fixture(scope="module")
def tiny():
    return models.init_model(models.preset("tiny", tie_word_embeddings=False,
                                           max_position_embeddings=64))


@pytest.fixture(scope="module")
def server(tiny, tok):
    s = Server(tiny, tok, model_name="tiny", chat_template=TEMPLATE, api_key=API_KEY,
               max_batch=32, max_wait_ms=100, chunk_size=CHUNK).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


def reference(model, prompts, **kw):
    kw = dict(n=1, max_new_tokens=NEW, temperature=0.0, eos_ids=[1], pad_id=0, chunk_size=CHUNK,
              progress=False) | kw
    return generate(model, prompts, **kw)


def chat_ids(tok, content):
    return tok.encode(format_chat([{"role": "user", "content": content}], TEMPLATE),
                      add_special_tokens=False)


def text_of(tok, tokens):
    if tokens and tokens[-1] == 1:
        tokens = tokens[:-1]
    return tok.decode(tokens, skip_special_tokens=True)


def finish_of(c, limit=NEW):
    return "stop" if c.finish_reason == "eos" else "length"


def chat(client, content, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}],
        **(dict(max_tokens=NEW, temperature=0) | kw))


def assert_alive(client, tiny, tok):
    r = client.completions.create(model="tiny", prompt="still alive?", max_tokens=NEW, temperature=0)
    ref = reference(tiny, [tok.encode("still alive?")])[0][0]
    assert r.choices[0].text == text_of(tok, ref.tokens)


# --- tests --------------------------------------------------------------------------

def test_models(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert server.eos_ids == [1]


def test_greedy_chat_equals_generate(client, tiny, tok):
    r = chat(client, "hi there")
    prompt = chat_ids(tok, "hi there")
    ref = reference(tiny, [prompt])[0][0]
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    assert c.message.role == "assistant"
    assert c.message.content == text_of(tok, ref.tokens)
    assert c.finish_reason == finish_of(ref)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(ref.tokens)
    assert r.usage.total_tokens == len(prompt) + len(ref.tokens)


def test_greedy_completions_equal_generate(client, tiny, tok):
    prompts = ["The patient", "fever and cough"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=NEW, temperature=0)
    ids = [tok.encode(p) for p in prompts]
    ref = reference(tiny, ids)
    assert [c.index for c in r.choices] == [0, 1]
    for c, g in zip(r.choices, ref):
        assert c.text == text_of(tok, g[0].tokens)
        assert c.finish_reason == finish_of(g[0])
    assert r.usage.prompt_tokens == sum(map(len, ids))
    assert r.usage.completion_tokens == sum(len(g[0].tokens) for g in ref)
    # max_tokens below the bucket: the prefix of the same greedy completion, cut for length.
    r5 = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=5, temperature=0)
    assert r5.choices[0].finish_reason == "length"
    assert r5.choices[0].text == text_of(tok, ref[0][0].tokens[:5])
    assert r5.usage.completion_tokens == 5


def test_n_choices_and_seed(client, tiny, tok):
    kw = dict(n=3, temperature=1.0, seed=1234)
    r = chat(client, "sample me", **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1
    # A seeded sampling request runs alone, so its samples are those of generate with that seed.
    ref = reference(tiny, [chat_ids(tok, "sample me")], n=3, temperature=1.0, seed=1234)[0]
    assert texts == [text_of(tok, c.tokens) for c in ref]
    assert r.usage.completion_tokens == sum(c.length for c in ref)
    assert [c.message.content for c in chat(client, "sample me", **kw).choices] == texts


def test_streaming_chat_matches_non_streamed(client):
    full = chat(client, "stream it").choices[0]
    stream = chat(client, "stream it", stream=True, stream_options={"include_usage": True})
    deltas, finish, usage, n_chunks = [], None, None, 0
    for chunk in stream:
        n_chunks += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                deltas.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert "".join(deltas) == full.message.content
    assert finish == full.finish_reason
    assert usage is not None and usage.completion_tokens > 0
    assert len(deltas) >= 2  # one delta per sampler chunk (first token, then chunks of 8)


def test_streaming_raw_sse_ends_with_done(server, client):
    full = client.completions.create(model="tiny", prompt="raw sse", max_tokens=NEW, temperature=0)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps(dict(model="tiny", prompt="raw sse", max_tokens=NEW, temperature=0, stream=True))
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {API_KEY}",
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason


def test_stop_strings(client, tiny, tok):
    ref = reference(tiny, [chat_ids(tok, "stop here")])[0][0]
    text = text_of(tok, ref.tokens)
    stop = text[6:8]
    expected = text[:text.find(stop)]
    r = chat(client, "stop here", stop=[stop, "never-there"])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= len(ref.tokens)
    streamed = "".join(ch.delta.content or "" for chunk in chat(client, "stop here", stop=stop,
                                                                stream=True)
                       for ch in chunk.choices)
    assert streamed == expected


def test_logprobs_equal_the_samplers(client, tiny, tok):
    prompt = chat_ids(tok, "logprobs")
    ref = reference(tiny, [prompt])[0][0]
    r = chat(client, "logprobs", logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.tokens)
    np.testing.assert_allclose([e.logprob for e in content], ref.logprobs, atol=1e-6)
    for e, t in zip(content, ref.tokens):
        assert e.token == tok.decode([t]) and bytes(e.bytes) == e.token.encode()
        assert len(e.top_logprobs) == 3
        tops = [a.logprob for a in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the sampled token is the top alternative of the teacher-forced pass.
        assert e.top_logprobs[0].token == e.token
        assert abs(tops[0] - e.logprob) < 1e-4
    plain = chat(client, "logprobs", logprobs=True).choices[0].logprobs.content
    assert [e.top_logprobs for e in plain] == [[]] * len(ref.tokens)
    c = client.completions.create(model="tiny", prompt="logprobs", max_tokens=NEW, temperature=0,
                                  logprobs=2).choices[0]
    cref = reference(tiny, [tok.encode("logprobs")])[0][0]
    np.testing.assert_allclose(c.logprobs.token_logprobs, cref.logprobs, atol=1e-6)
    assert len(c.logprobs.tokens) == len(c.logprobs.top_logprobs) == len(cref.tokens)
    assert all(len(d) <= 2 for d in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0


def test_concurrent_clients_are_batched(server, client, tiny, tok):
    # Odd cases go through chat, even ones through completions; both batch together.
    prompts = [f"case {i}: dx?" for i in range(32)]
    is_chat = {p: i % 2 == 1 for i, p in enumerate(prompts)}
    refs = {}
    for p in prompts:
        ids = chat_ids(tok, p) if is_chat[p] else tok.encode(p)
        refs[p] = text_of(tok, reference(tiny, [ids])[0][0].tokens)
    before = server.stats
    results, errors = {}, []
    barrier = threading.Barrier(len(prompts))

    def one(p):
        try:
            barrier.wait()
            if is_chat[p]:
                results[p] = chat(client, p).choices[0].message.content
            else:
                results[p] = client.completions.create(model="tiny", prompt=p, max_tokens=NEW,
                                                       temperature=0).choices[0].text
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == refs
    after = server.stats
    calls = after["generate_calls"] - before["generate_calls"]
    assert after["requests"] - before["requests"] == len(prompts)
    assert calls < len(prompts), after["batch_sizes"]
    assert max(after["batch_sizes"][len(before["batch_sizes"]):]) > 1


def test_bad_requests_then_still_serving(server, client, tiny, tok):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", "{not json", {"Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    err = json.loads(resp.read())["error"]
    assert resp.status == 400 and "JSON" in err["message"] and err["type"] == "invalid_request_error"
    conn.close()
    assert_alive(client, tiny, tok)

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    assert_alive(client, tiny, tok)

    with pytest.raises(openai.BadRequestError) as e:  # 30-token prompt + 40 > 64
        client.completions.create(model="tiny", prompt="x" * 30, max_tokens=40)
    assert "64" in e.value.message and "70" in e.value.message and "30" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x" * 80)
    assert_alive(client, tiny, tok)

    for bad in (dict(temperature=5), dict(n=0), dict(top_p=0), dict(max_tokens="ten"),
                dict(stop=[1, 2]), dict(top_logprobs=3)):
        with pytest.raises(openai.BadRequestError):
            chat(client, "x", **bad)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    assert_alive(client, tiny, tok)

    wrong = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="x", max_tokens=2)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/v1/models")  # no key at all
    assert conn.getresponse().status == 401
    conn.close()
    assert_alive(client, tiny, tok)


def test_client_disconnect_mid_stream(server, client, tiny, tok):
    body = json.dumps(dict(model="tiny", messages=[{"role": "user", "content": "bye"}],
                           max_tokens=NEW, temperature=0, stream=True, n=2)).encode()
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # reset, mid-stream
    time.sleep(0.5)
    assert_alive(client, tiny, tok)


def test_jax_work_runs_on_the_worker_thread(server):
    assert server.run_on_worker(lambda: threading.current_thread().name) == "medssr-server-worker"
    assert threading.current_thread().name != "medssr-server-worker"

# --- the real SmolLM2 -----------------------------------------------------------------

@pytest.mark.real_assets
def test_smollm2_greedy_chat_equals_generate():
    from medssr_jax import assets
    from models.gguf import tokenizer_from_gguf

    path = assets.smollm2_gguf()
    model, cfg = models.from_pretrained(path)
    tok = tokenizer_from_gguf(path)
    messages = [{"role": "user", "content": "What is the first-line treatment for hypertension?"}]
    with Server(model, tok, model_name="smollm2", chunk_size=32) as srv:
        c = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0)
        eos = srv.eos_ids
    prompt = tok.encode(format_chat(messages, cfg.chat_template), add_special_tokens=False)
    ref = generate(model, [prompt], n=1, max_new_tokens=32, temperature=0.0, eos_ids=eos,
                   chunk_size=32, progress=False)[0][0]
    content = ref.tokens[:-1] if ref.finish_reason == "eos" else ref.tokens
    assert r.choices[0].message.content == tok.decode(content, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(ref.tokens)
    assert len(r.choices[0].message.content) > 20


# --- limits and hardening -----------------------------------------------------------

def started(tiny, tok, **kw):
    kw = dict(model_name="tiny", chat_template=TEMPLATE, api_key=API_KEY, max_batch=4,
              max_wait_ms=10, chunk_size=CHUNK) | kw
    return Server(tiny, tok, **kw).start()


def raw_request(port, method, path, body=b"", headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"} | (headers or {})
    conn.request(method, path, body, h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def completion_body(prompt="hello", **kw):
    return json.dumps(dict(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0) | kw).encode()


def slowed(server, seconds):
    """Every decode chunk of the server takes `seconds` longer (the streaming hook sleeps
    after handing out the chunk's tokens)."""
    orig = server._on_chunk

    def slow(*a):
        orig(*a)
        time.sleep(seconds)

    server._on_chunk = slow


def test_no_key_with_a_large_body_gets_401_before_the_body_is_read(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    # Announce 64 MiB and send none of it: the answer must come from the headers alone.
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 67108864\r\n\r\n")
    t0 = time.monotonic()
    reply = s.recv(4096)
    s.close()
    assert reply.startswith(b"HTTP/1.1 401") and time.monotonic() - t0 < 5
    assert b"invalid_api_key" in reply and b"WWW-Authenticate" in reply.replace(b"www-authenticate",
                                                                                b"WWW-Authenticate")
    # With the key, a body over max_body_bytes is refused from its Content-Length.
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 67108864\r\n\r\n")
    reply = s.recv(4096)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in reply


def test_full_queue_gets_429_with_retry_after(tiny, tok):
    srv = started(tiny, tok, max_queue=1)
    try:
        gate = threading.Event()
        blocker = threading.Thread(target=srv.run_on_worker, args=(lambda: gate.wait(30),))
        blocker.start()  # the worker is busy: the first request waits in the queue
        first = {}
        t = threading.Thread(target=lambda: first.update(
            r=raw_request(srv.port, "POST", "/v1/completions", completion_body())))
        t.start()
        deadline = time.monotonic() + 10
        while srv._active < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        resp, data = raw_request(srv.port, "POST", "/v1/completions", completion_body())
        err = json.loads(data)["error"]
        assert resp.status == 429 and resp.getheader("Retry-After") == "1"
        assert "max_queue" in err["message"] and err["type"] == "rate_limit_error"
        gate.set()
        t.join(60)
        blocker.join(60)
        assert first["r"][0].status == 200
        # the slot is free again
        assert raw_request(srv.port, "POST", "/v1/completions", completion_body())[0].status == 200
    finally:
        srv.stop()


def test_oversized_requests_get_400_naming_the_limit(tiny, tok):
    srv = started(tiny, tok, max_tokens_limit=8)
    try:
        c = openai.OpenAI(base_url=srv.url, api_key=API_KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match=r"4 prompt\(s\) x n=2 = 8 .*at most 4 .*max_batch"):
            c.completions.create(model="tiny", prompt=["a", "b", "c", "d"], n=2, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match=r"1 prompt\(s\) x n=128 = 128"):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                      n=128, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match=r"'max_tokens' is 9; .*at most 8 .*max_tokens_limit"):
            c.completions.create(model="tiny", prompt="a", max_tokens=9)
        r = c.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=8, temperature=0)
        assert len(r.choices) == 4
        assert r.usage.completion_tokens <= 4 * 8
        # without max_tokens the default stays within the limit
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                      temperature=0)
        assert r.usage.completion_tokens <= 8
    finally:
        srv.stop()


def test_huge_prompt_refused_before_tokenizing_without_stalling_others(server, client, tiny, tok):
    huge = completion_body(prompt="x" * (8 << 20))
    out = {}
    t = threading.Thread(target=lambda: out.update(r=raw_request(server.port, "POST",
                                                                 "/v1/completions", huge)))
    t0 = time.monotonic()
    t.start()
    assert_alive(client, tiny, tok)  # served while the huge body is handled
    t.join(60)
    resp, data = out["r"]
    assert resp.status == 400 and time.monotonic() - t0 < 10
    err = json.loads(data)["error"]
    assert err["code"] == "context_length_exceeded" and "8388608 characters" in err["message"]


def test_lone_surrogate_and_deep_nesting_get_400(server, client, tiny, tok):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    resp, data = raw_request(server.port, "POST", "/v1/chat/completions", body)
    err = json.loads(data)["error"]
    assert resp.status == 400 and "lone surrogate" in err["message"]
    assert "messages[0].content" in err["message"] and err["param"] == "messages"
    body = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp, data = raw_request(server.port, "POST", "/v1/completions", body)
    assert resp.status == 400 and "nested too deeply" in json.loads(data)["error"]["message"]
    body = b'{"model": "tiny", "prompt": "a", "stop": "\\udfff"}'
    resp, data = raw_request(server.port, "POST", "/v1/completions", body)
    assert resp.status == 400 and "'stop'" in json.loads(data)["error"]["message"]
    assert_alive(client, tiny, tok)


def test_disconnect_mid_stream_stops_generation_and_frees_the_slot(tiny, tok):
    srv = started(tiny, tok, max_queue=1, eos_ids=[])
    slowed(srv, 0.5)  # first token, then chunks of 8 and 7: about 1.5 s for 16 tokens
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        body = completion_body(stream=True)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # reset after the first chunk
        t0 = time.monotonic()
        while srv._active and time.monotonic() - t0 < 2:  # the slot frees when the reset is seen
            time.sleep(0.01)
        assert srv._active == 0
        resp, data = raw_request(srv.port, "POST", "/v1/completions", completion_body(max_tokens=4))
        assert resp.status == 200, data  # max_queue=1: served, not 429
        stats = srv.stats
        assert stats["stopped_calls"] == 1  # the abandoned call ended at its next chunk
        assert stats["generate_calls"] == 1 and stats["requests"] == 1  # only the second finished
    finally:
        srv.stop()


def test_disconnect_while_waiting_for_a_whole_response_stops_generation(tiny, tok):
    srv = started(tiny, tok, max_queue=1, eos_ids=[])
    chunks = []
    orig = srv._on_chunk

    def noted(*a):
        chunks.append(time.monotonic())
        orig(*a)
        time.sleep(0.5)

    srv._on_chunk = noted
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        body = completion_body()  # not streamed: nothing is written until the end
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        t0 = time.monotonic()
        while not chunks and time.monotonic() - t0 < 60:  # generating
            time.sleep(0.01)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        t0 = time.monotonic()
        while srv._active and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        assert srv._active == 0
        assert raw_request(srv.port, "POST", "/v1/completions",
                           completion_body(max_tokens=4))[0].status == 200
        assert srv.stats["stopped_calls"] == 1 and srv.stats["requests"] == 1
    finally:
        srv.stop()


def test_sse_keepalive_while_waiting(tiny, tok):
    srv = started(tiny, tok, keepalive_s=0.1)
    try:
        gate = threading.Event()
        blocker = threading.Thread(target=srv.run_on_worker, args=(lambda: gate.wait(0.6),))
        blocker.start()
        body = json.dumps(dict(model="tiny", messages=[{"role": "user", "content": "wait"}],
                               max_tokens=NEW, temperature=0, stream=True)).encode()
        resp, data = raw_request(srv.port, "POST", "/v1/chat/completions", body)
        blocker.join(30)
        events = [e for e in data.decode().split("\n\n") if e]
        assert resp.status == 200 and events[-1] == "data: [DONE]"
        assert events.count(": keep-alive") >= 2
        # keep-alives are SSE comments: the openai client ignores them
        c = openai.OpenAI(base_url=srv.url, api_key=API_KEY, max_retries=0, timeout=60)
        full = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "wait"}],
                                         max_tokens=NEW, temperature=0).choices[0].message.content
        chunks = [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]
        assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == full
    finally:
        srv.stop()


def test_request_log_escapes_control_characters_and_hides_the_key(tiny, tok):
    lines = []
    srv = started(tiny, tok, log_requests=True, log=lines.append)
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"GET /v1/models%0d%0a127.0.0.1%20-%20GET%20/admin%20200%1b[31m HTTP/1.1\r\n"
                  b"Host: x\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 404")
        s.close()
        raw_request(srv.port, "GET", "/v1/models")
    finally:
        srv.stop()
    assert len(lines) == 2
    forged, ok = lines
    assert "\n" not in forged and "\r" not in forged and "\x1b" not in forged
    assert "/v1/models\\r\\n127.0.0.1 - GET /admin 200\\x1b[31m 404 " in forged
    assert " GET /v1/models 200 " in ok
    assert all(API_KEY not in line for line in lines)


CTRL_C_SCRIPT = r"""
import faulthandler, http.client, json, signal, sys, threading, time
# Ctrl-C as from a terminal: a child of a process that ignores SIGINT (a background job of a
# non-interactive shell; in the full suite the test process itself) inherits SIGINT ignored,
# and Python then leaves it ignored: the server would never see the Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack on a hang
import models
from medssr_jax.server import Server
from medssr_jax.tokenizers import byte_tokenizer

model = models.init_model(models.preset("tiny", tie_word_embeddings=False, max_position_embeddings=64))
srv = Server(model, byte_tokenizer(), model_name="tiny", chat_template="qwen3", eos_ids=[],
             chunk_size=4)
orig = srv._on_chunk
def slow(*a):
    orig(*a)
    time.sleep(0.3)
srv._on_chunk = slow
srv.start()

def client():
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(dict(model="tiny", prompt="hi",
                 max_tokens=48, temperature=0, stream=True)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    print("GENERATING", flush=True)
    assert resp.read().endswith(b"data: [DONE]\n\n")

threading.Thread(target=client, daemon=True).start()
srv.serve_forever()
print("STOPPED", srv.stats["stopped_calls"], flush=True)
"""


def test_ctrl_c_while_generating_stops_cleanly():
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "GENERATING"
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # faulthandler: where every thread is stuck
            time.sleep(2)
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the server did not stop within 60 s of Ctrl-C; its threads:\n{err[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == ["STOPPED", "1"], (out, err[-3000:])
    for bad in ("Traceback", "terminate called", "Fatal Python error", "Aborted"):
        assert bad not in err, err[-3000:]
