"""Load benchmark of the OpenAI-compatible server: C concurrent clients, R requests each.

    python -m launch.bench_server --concurrency=32 --requests=8            # tiny model in-process
    python -m launch.bench_server --model=/path/model.gguf --concurrency=16
    python -m launch.bench_server --url=http://127.0.0.1:8000/v1 --model_name=NAME

In-process (no --url) the server runs --model (default: the random "tiny" preset with a
256-id byte-level tokenizer, untied embeddings). Each client is a thread with its own `openai`
client sending chat completions one after another. A warm-up round (every client sends
--warmup requests) compiles the batch shapes first and is not timed. Prints one JSON line:
requests/s, completion tokens/s, latency p50/p90/p99 (seconds), and with an in-process server
the generate calls and mean requests per call; an in-process server also compiles every
batch-size bucket first (Server.warmup), so compilation stays out of the timed round. The API key for --url comes from the
environment variable named by --api_key_env.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
from absl import app, flags, logging

from medssr_jax import tokenizers

FLAGS = flags.FLAGS
flags.DEFINE_string("url", None, "Base URL of a running server (…/v1); default: start one in-process.")
flags.DEFINE_string("model", None, "In-process: HF directory or .gguf file; default: the tiny preset.")
flags.DEFINE_string("model_name", None, "Model name to request; default: the served one.")
flags.DEFINE_string("api_key_env", "MEDSSR_SERVER_API_KEY", "Environment variable with the API key.")
flags.DEFINE_integer("concurrency", 32, "Concurrent clients (threads).")
flags.DEFINE_integer("requests", 8, "Timed requests per client.")
flags.DEFINE_integer("warmup", 1, "Untimed requests per client before the timed ones.")
flags.DEFINE_integer("max_tokens", 32, "max_tokens per request.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature.")
flags.DEFINE_boolean("stream", False, "Stream the responses (latency is to the last chunk).")
flags.DEFINE_integer("max_batch", 32, "In-process server: sequences per generate call.")
flags.DEFINE_float("max_wait_ms", 20, "In-process server: batching wait.")
flags.DEFINE_integer("chunk_size", 32, "In-process server: decode steps per chunk.")

QUESTIONS = [
    "Fever and cough?", "Chest pain?", "Dx of anemia?", "Treat a UTI?", "Signs of sepsis?",
    "What is BP?", "Scurvy cause?", "Kidney stones?",
]


def start_server():
    import models
    from medssr_jax.server import Server
    from medssr_jax.tokenizers import load_tokenizer

    if FLAGS.model:
        model, _ = models.from_pretrained(FLAGS.model)
        tok, name, template = load_tokenizer(FLAGS.model), os.path.basename(FLAGS.model), None
    else:
        model = models.init_model(models.preset("tiny", tie_word_embeddings=False))
        tok, name, template = tokenizers.byte_tokenizer(), "tiny", "qwen3"
    server = Server(model, tok, model_name=name, chat_template=template, max_batch=FLAGS.max_batch,
                    max_wait_ms=FLAGS.max_wait_ms, chunk_size=FLAGS.chunk_size).start()
    longest = max(len(tok.encode(server.render_chat([{"role": "user", "content": q + " #999.999"}]),
                                 add_special_tokens=False))
                  for q in QUESTIONS)
    seconds = server.warmup(prompt_len=longest, max_tokens=FLAGS.max_tokens,
                            temperature=FLAGS.temperature)
    logging.info("warm-up compiled in %.1f s", seconds)
    return server


def run_round(url: str, api_key: str, model: str, per_client: int) -> tuple[list[float], int, float]:
    import openai

    latencies, tokens, errors = [], [0], []
    lock = threading.Lock()
    barrier = threading.Barrier(FLAGS.concurrency + 1)

    def client_loop(c: int):
        client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600)
        barrier.wait()
        for r in range(per_client):
            q = QUESTIONS[(c + r) % len(QUESTIONS)] + f" #{c}.{r}"
            kw = dict(model=model, messages=[{"role": "user", "content": q}],
                      max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature)
            t0 = time.perf_counter()
            try:
                if FLAGS.stream:
                    n = 0
                    for chunk in client.chat.completions.create(
                            stream=True, stream_options={"include_usage": True}, **kw):
                        if chunk.usage is not None:
                            n = chunk.usage.completion_tokens
                else:
                    n = client.chat.completions.create(**kw).usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens[0] += n

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(FLAGS.concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return latencies, tokens[0], time.perf_counter() - t0


def main(argv):
    del argv
    import logging as py_logging

    import openai

    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        py_logging.getLogger(name).setLevel(py_logging.WARNING)

    server = None
    if FLAGS.url:
        url, api_key = FLAGS.url, os.environ.get(FLAGS.api_key_env) or "none"
    else:
        server = start_server()
        url, api_key = server.url, "none"
    try:
        model = FLAGS.model_name or openai.OpenAI(base_url=url, api_key=api_key).models.list().data[0].id
        if FLAGS.warmup:
            run_round(url, api_key, model, FLAGS.warmup)
        before = server.stats if server else None
        latencies, tokens, seconds = run_round(url, api_key, model, FLAGS.requests)
        lat = np.asarray(latencies)
        result = dict(
            url=None if server else url, model=model, concurrency=FLAGS.concurrency,
            requests=len(latencies), max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
            stream=FLAGS.stream, seconds=round(seconds, 3),
            requests_per_s=round(len(lat) / seconds, 2),
            completion_tokens_per_s=round(tokens / seconds, 1),
            latency_p50_s=round(float(np.percentile(lat, 50)), 4),
            latency_p90_s=round(float(np.percentile(lat, 90)), 4),
            latency_p99_s=round(float(np.percentile(lat, 99)), 4),
        )
        if server:
            after = server.stats
            sizes = after["batch_sizes"][len(before["batch_sizes"]):]
            result.update(generate_calls=len(sizes),
                          mean_requests_per_call=round(float(np.mean(sizes)), 2) if sizes else 0.0,
                          max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                          chunk_size=FLAGS.chunk_size)
        print(json.dumps(result), flush=True)
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    app.run(main)
