"""Question synthesis end to end against our own server: the local JAX model as the generator."""

from __future__ import annotations

import json

import pytest

import models
from medssr_jax.server import Server
from synth.synthesize import SeedQuestion, plan_prompts, synthesize
from tests.test_server import tiny_tokenizer

API_KEY = "sk-local-synthesis-test-key"


class _Retriever:
    def retrieve(self, text, k):
        return [({"id": f"doc-{i}", "title": text, "text": f"{text} passage {i}.", "source": "test"}, 1.0 - i / 10)
                for i in range(k)]


def _seeds():
    return [SeedQuestion(f"s{i}", f"Seed question {i}: which finding is most likely?",
                         {"A": f"alpha {i}", "B": f"beta {i}", "C": f"gamma {i}", "D": f"delta {i}"}, "A")
            for i in range(4)]


@pytest.fixture(scope="module")
def server():
    cfg = models.preset("tiny", tie_word_embeddings=False, max_position_embeddings=4096)
    s = Server(models.init_model(cfg), tiny_tokenizer(), model_name="local-tiny", chat_template="qwen3",
               api_key=API_KEY, max_batch=8, max_wait_ms=50, chunk_size=16).start()
    yield s
    s.stop()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_synthesis_runs_against_the_local_server(server, tmp_path):
    kw = dict(n_prompts=6, alpha=0.5, entities=["Marfan syndrome", "Gaucher disease"],
              retriever=_Retriever(), k_docs=2, seed=3, model="local-tiny", base_url=server.url,
              api_key=API_KEY, max_tokens=24, json_mode=False, workers=3, timeout=120)
    report = synthesize(_seeds(), tmp_path, **kw)
    keys = {s.key for s in plan_prompts(_seeds(), 6, alpha=0.5, entities=kw["entities"], seed=3)}
    accepted, rejected = _records(tmp_path / "synthetic.jsonl"), _records(tmp_path / "rejected.jsonl")
    seen = [r["key"] for r in accepted + rejected]
    # every prompt was answered by the local model and recorded exactly once
    assert sorted(seen) == sorted(keys) and report.planned == 6
    assert report.accepted + report.rejected == 6 and report.failed == 0
    assert server.stats["requests"] >= 6 and server.stats["generated_tokens"] > 0
    # a random tiny model writes no valid question: every item is rejected with a reason, not dropped
    assert all(r.get("reason") for r in rejected)
    assert report.prompt_tokens > 1000 and report.completion_tokens > 0
    usage = json.loads((tmp_path / "usage.json").read_text())
    assert usage["total"]["requests"] >= 6 and usage["total"]["completion_tokens"] > 0
    for f in tmp_path.iterdir():
        assert API_KEY not in f.read_text()

    # a rerun finds every key finished and asks the server for nothing
    before = server.stats["requests"]
    again = synthesize(_seeds(), tmp_path, **kw)
    assert again.already_done == 6 and again.requests == 0
    assert server.stats["requests"] == before
