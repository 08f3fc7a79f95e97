"""A local OpenAI-compatible HTTP server with scheduled faults, for tests.

``FakeOpenAI`` serves, on 127.0.0.1 at an ephemeral port from a background
thread:

- ``POST /v1/chat/completions``: the reply is deterministic in the request.
  A synthesis prompt gets a JSON question built from a hash of the prompt (so
  distinct prompts give distinct questions); a reasoning/memorization prompt
  gets ``<Reasoning>``/``<Memorization>`` or, for some, text with neither.
- ``POST /v1/files`` (multipart), ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches/{id}``: enough of the Batch API for
  :func:`synth.synthesize.synthesize_batch`.

Faults come from ``schedule(key, attempt) -> fault | None`` where ``key`` is
the request's ``Idempotency-Key`` header (else a hash of the body) and
``attempt`` counts this server's earlier requests with that key. Faults:
``429`` (with ``Retry-After``), ``500``, ``timeout`` (sleeps past the client
timeout), ``truncated_body`` (the HTTP body stops half way), ``malformed_body``
(a 200 whose body is not JSON), ``refusal`` (prose instead of JSON),
``bad_content`` (a JSON reply cut off, finish_reason ``length``),
``three_options``, ``leak`` (answer text in the stem), ``seed_copy`` (copies
the first example question of the prompt), ``duplicate_options``.

The server is bounded: it shuts itself down after ``lifetime`` seconds or
``max_requests`` requests. Everything it saw is in ``requests`` (key, path,
fault) and ``per_key`` (requests per key).

Also here: seed questions, rare-disease entities and a retriever for tests.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import Counter
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("fever rash cough dyspnea ataxia seizures hepatomegaly splenomegaly jaundice "
         "hypotonia myopathy neuropathy cataract deafness nystagmus scoliosis anemia "
         "thrombocytopenia proteinuria hematuria arthralgia uveitis alopecia pruritus "
         "hypoglycemia lactic acidosis cardiomyopathy arrhythmia ptosis dysphagia tremor "
         "chorea dystonia spasticity macrocephaly microcephaly hypertelorism syndactyly "
         "polydactyly osteopenia fractures nephrocalcinosis hyperkalemia hyponatremia").split()
DRUGS = ("enzyme replacement|liver transplant|bone marrow transplant|dietary restriction|"
         "corticosteroids|gene therapy|chelation|plasmapheresis|biotin supplementation|"
         "carnitine|ketogenic diet|vitamin B12|thiamine|riboflavin|coenzyme Q10|"
         "hydroxyurea|eculizumab|nitisinone|miglustat|sapropterin").split("|")


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def default_schedule(key: str, attempt: int) -> str | None:
    """Deterministic faults per key: about 60% of keys see one."""
    b = _h("fault:" + key) % 20
    plan = {
        0: ["429"], 1: ["500", "500"], 2: ["timeout"], 3: ["truncated_body"],
        4: ["malformed_body"], 5: ["429", "500"], 6: ["refusal"], 7: ["bad_content"],
        8: ["three_options"], 9: ["leak"], 10: ["seed_copy"], 11: ["duplicate_options"],
    }.get(b, [])
    if b in (6, 7, 8, 9, 10, 11):  # content faults are the final answer for the key
        return plan[0]
    return plan[attempt] if attempt < len(plan) else None


def generated_question(prompt: str, fault: str | None = None) -> tuple[dict, str]:
    """The JSON object a fake generator returns for ``prompt`` and its text."""
    rng = random.Random(_h(prompt))
    findings = rng.sample(WORDS, 6)
    age = rng.randrange(1, 80)
    stem = (f"A {age}-year-old presents with {', '.join(findings)}. "
            f"Case {rng.randrange(10**6):06d}. Which management is most appropriate?")
    opts = rng.sample(DRUGS, 5)
    options = {letter: f"{o} ({rng.choice(WORDS)})" for letter, o in zip("ABCDE", opts)}
    answer = "ABCDE"[rng.randrange(5)]
    if fault == "three_options":
        options = {k: options[k] for k in "ABC"}
        answer = "A"
    elif fault == "leak":
        stem = stem.replace("Which", f"Is {options[answer]} the best choice? Which")
    elif fault == "duplicate_options":
        options["C"] = options["A"].upper()
    elif fault == "seed_copy":
        m = re.search(r"Example 1:\n(.*?)\n(A\. .*?)\nB\. ", prompt, re.DOTALL)
        if m:
            stem = m.group(1)
            block = re.search(r"Example 1:\n.*?\n((?:[A-E]\. .*\n?)+)", prompt)
            lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
            options = {ln[0]: ln[3:] for ln in lines}
            answer = "A"
    obj = {"question": stem, "options": options, "answer": answer}
    return obj, json.dumps(obj)


def classify_reply(prompt: str) -> str:
    b = _h("filter:" + prompt) % 3
    return ["Reasoning about it: <Reasoning>", "<Memorization>", "I cannot tell."][b]


def _completion(content: str, finish_reason: str = "stop", model: str = "gpt-4.1",
                prompt: str = "") -> dict:
    return {
        "id": "chatcmpl-" + hashlib.sha1(content.encode()).hexdigest()[:12],
        "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content, "refusal": None}}],
        "usage": {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": max(1, len(content) // 4),
                  "total_tokens": max(1, len(prompt) // 4) + max(1, len(content) // 4)},
    }


def answer_chat(body: dict, fault: str | None, key: str = "") -> dict:
    """The chat.completion object for a request body (content faults applied)."""
    messages = body.get("messages", [])
    prompt = "\n".join(m.get("content", "") for m in messages)
    model = body.get("model", "gpt-4.1")
    if "<Reasoning>" in prompt:
        return _completion(classify_reply(prompt), model=model, prompt=prompt)
    if fault == "refusal":
        return _completion("I'm sorry, but I can't help with writing exam questions.",
                           model=model, prompt=prompt)
    _, text = generated_question(key + prompt, fault)
    if fault == "bad_content":
        return _completion(text[: len(text) // 2], "length", model=model, prompt=prompt)
    return _completion(text, model=model, prompt=prompt)


class FakeOpenAI:
    def __init__(self, schedule=default_schedule, *, retry_after: float = 0.05,
                 timeout_sleep: float = 0.6, lifetime: float = 120.0, max_requests: int = 20000,
                 batch_polls_before_done: int = 1):
        self.schedule = schedule or (lambda key, attempt: None)
        self.retry_after, self.timeout_sleep = retry_after, timeout_sleep
        self.lifetime, self.max_requests = lifetime, max_requests
        self.batch_polls_before_done = batch_polls_before_done
        self.requests: list[tuple[str, str, str | None]] = []
        self.per_key: Counter = Counter()
        self.auth_headers: list[str] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.lock = threading.Lock()
        self._server = None
        self._timer = None

    # -- lifecycle --
    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                fake._handle(self, "POST")

            def do_GET(self):
                fake._handle(self, "GET")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def stop(self) -> None:
        if self._server is not None:
            srv, self._server = self._server, None
            srv.shutdown()
            srv.server_close()
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- helpers --
    @staticmethod
    def _send(h, code: int, body: bytes, headers: dict | None = None, cut: bool = False):
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body[: len(body) // 2] if cut else body)
        h.wfile.flush()
        if cut:
            h.close_connection = True

    def _json(self, h, code, obj, headers=None):
        self._send(h, code, json.dumps(obj).encode(), headers)

    def _handle(self, h, method):
        try:
            length = int(h.headers.get("Content-Length") or 0)
            raw = h.rfile.read(length) if length else b""
            self.auth_headers.append(h.headers.get("Authorization", ""))
            path = h.path.split("?")[0]
            if method == "POST" and path.endswith("/chat/completions"):
                return self._chat(h, raw)
            if method == "POST" and path.endswith("/files"):
                return self._upload(h, raw)
            m = re.search(r"/files/([^/]+)/content$", path)
            if method == "GET" and m:
                return self._send(h, 200, self.files[m.group(1)])
            if method == "POST" and path.endswith("/batches"):
                return self._create_batch(h, json.loads(raw))
            m = re.search(r"/batches/([^/]+)$", path)
            if method == "GET" and m:
                return self._get_batch(h, m.group(1))
            self._json(h, 404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _chat(self, h, raw: bytes):
        body = json.loads(raw)
        key = h.headers.get("Idempotency-Key") or hashlib.sha256(raw).hexdigest()[:32]
        with self.lock:
            attempt = self.per_key[key]
            self.per_key[key] += 1
            over = len(self.requests) >= self.max_requests
            fault = None if over else self.schedule(key, attempt)
            self.requests.append((key, "chat", fault))
        if over:
            return self._json(h, 503, {"error": {"message": "request cap reached", "type": "server_error"}})
        if fault == "429":
            return self._json(h, 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}},
                              {"Retry-After": str(self.retry_after)})
        if fault in ("400", "401"):  # echo the credentials like a careless server would
            msg = f"bad request; you sent {h.headers.get('Authorization', '')}"
            return self._json(h, int(fault), {"error": {"message": msg, "type": "invalid_request_error"}})
        if fault == "500":
            return self._json(h, 500, {"error": {"message": "internal error", "type": "server_error"}})
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
            return self._json(h, 200, answer_chat(body, None, key))
        if fault == "truncated_body":
            return self._send(h, 200, json.dumps(answer_chat(body, None, key)).encode(), cut=True)
        if fault == "malformed_body":
            return self._send(h, 200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
        self._json(h, 200, answer_chat(body, fault, key))

    def _upload(self, h, raw: bytes):
        ctype = h.headers.get("Content-Type", "")
        msg = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
        data, purpose = b"", None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if name == "file":
                data = payload
            elif name == "purpose":
                purpose = payload.decode()
        with self.lock:
            fid = f"file-{len(self.files)}"
            self.files[fid] = data
            self.requests.append((fid, "upload", None))
        self._json(h, 200, {"id": fid, "object": "file", "bytes": len(data), "created_at": 1700000000,
                            "filename": "batch_input.jsonl", "purpose": purpose or "batch",
                            "status": "processed"})

    def _batch_obj(self, bid):
        b = self.batches[bid]
        return {"id": bid, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
                "input_file_id": b["input"], "completion_window": "24h", "status": b["status"],
                "output_file_id": b.get("output"), "error_file_id": None, "created_at": 1700000000,
                "request_counts": {"total": b["n"], "completed": b["n"] if b["status"] == "completed" else 0,
                                   "failed": 0}}

    def _create_batch(self, h, body):
        lines = [json.loads(ln) for ln in self.files[body["input_file_id"]].decode().splitlines() if ln.strip()]
        out = []
        for ln in lines:
            key = ln["custom_id"]
            with self.lock:
                attempt = self.per_key[key]
                self.per_key[key] += 1
                fault = self.schedule(key, attempt)
                self.requests.append((key, "batch_line", fault))
            if fault in ("429", "500", "timeout", "truncated_body", "malformed_body"):
                fault = None  # transport faults do not exist inside a batch
            out.append({"id": f"batch_req_{key}", "custom_id": key,
                        "response": {"status_code": 200, "request_id": key,
                                     "body": answer_chat(ln["body"], fault, key)}, "error": None})
        with self.lock:
            bid = f"batch_{len(self.batches)}"
            oid = f"file-{len(self.files)}"
            self.files[oid] = "".join(json.dumps(o) + "\n" for o in out).encode()
            self.batches[bid] = {"input": body["input_file_id"], "status": "validating", "n": len(lines),
                                 "polls": 0, "pending_output": oid}
            self.requests.append((bid, "batch_create", None))
        self._json(h, 200, self._batch_obj(bid))

    def _get_batch(self, h, bid):
        with self.lock:
            b = self.batches[bid]
            b["polls"] += 1
            if b["polls"] > self.batch_polls_before_done:
                b["status"], b["output"] = "completed", b["pending_output"]
            else:
                b["status"] = "in_progress"
            self.requests.append((bid, "batch_poll", None))
        self._json(h, 200, self._batch_obj(bid))


# --- seeds, entities and a retriever for tests ---------------------------------

RARE_DISEASES = ["Fabry disease", "Gaucher disease", "Pompe disease", "Wilson disease",
                 "Alkaptonuria", "Tyrosinemia type 1", "Niemann-Pick disease type C",
                 "Phenylketonuria", "Krabbe disease", "Hunter syndrome"]


def make_seeds(n: int = 12):
    from synth.synthesize import SeedQuestion

    rng = random.Random(1234)
    seeds = []
    for i in range(n):
        findings = rng.sample(WORDS, 5)
        opts = rng.sample(DRUGS, 4)
        seeds.append(SeedQuestion(
            id=f"seed{i}",
            question=f"Seed case {i}: a patient has {', '.join(findings)}. What is the best next step?",
            options={k: v for k, v in zip("ABCD", opts)}, answer="ABCD"[i % 4]))
    return seeds


class FakeRetriever:
    """Three made-up passages per query, ids derived from the query."""

    def __init__(self):
        self.calls = 0

    def retrieve(self, text: str, k: int):
        self.calls += 1
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
        return [({"id": f"{slug}-{j}", "title": f"{text} ({j})",
                  "text": f"{text} is a rare disorder; passage {j}.", "source": "fake"}, 1.0 - j / 10)
                for j in range(k)]


def run_synthesis_cli(base_url: str, out_dir: str, n_prompts: int, workers: int) -> None:
    """Entry point for a subprocess that the tests kill part way through."""
    from synth.synthesize import synthesize

    synthesize(make_seeds(), out_dir, n_prompts=n_prompts, alpha=0.3, entities=RARE_DISEASES,
               retriever=FakeRetriever(), seed=7, base_url=base_url, api_key=TEST_KEY,
               workers=workers, timeout=0.3, backoff_base=0.01, backoff_cap=0.05)


TEST_KEY = "sk-test-SECRET-6f1c2d9e8b7a"
