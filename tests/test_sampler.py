"""The sampler against transformers and against its own contract, on tiny random models.

References: transformers' greedy `generate` (token for token), transformers' full forward for
teacher-forced logprobs, transformers' TopK/TopP logits warpers for the truncation sets, and
softmax(l / T) with a chi-square test for the sampling frequencies.

Compilation dominates the run time (each distinct model / n / sampling-params / chunk count
compiles anew), so the tests share a handful of configurations through module fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from jax.scipy.stats import chi2

import models
from medssr_jax.sampler import Completion, SamplingParams, generate, sample_logits
from medssr_jax.sharding import make_mesh
from tests.hf_models import make_hf_model

VOCAB = 160  # make_hf_model's default
PROMPT_LENS = (5, 37, 12)  # 3 prompts (bucketed to 4), one past the default prompt bucket of 32
GREEDY_NEW = 40
GREEDY_CHUNK = 16  # 40 tokens -> the first from prefill, then decode chunks of 16, 16, 7
SAMPLE_NEW = 20
SAMPLE_CHUNK = 8  # 20 tokens -> chunks of 8, 8, 3
LOGPROB_TOL = 1e-4


def _prompts(lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, n).tolist() for n in lens]


PROMPTS = _prompts()


# --- fixtures -------------------------------------------------------------------

def _load(tmp_path_factory, family):
    hf = make_hf_model(family, seed=1 if family == "llama" else 0)
    d = tmp_path_factory.mktemp(family) / "hf"
    hf.save_pretrained(d)
    model, cfg = models.from_pretrained(d)
    assert cfg.family == family and cfg.vocab_size == VOCAB
    return hf, model, d


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _load(tmp_path_factory, "qwen3")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _load(tmp_path_factory, "llama")


def _greedy(model, prompts=PROMPTS, **kw):
    kw = dict(n=1, max_new_tokens=GREEDY_NEW, temperature=0.0, eos_ids=[], chunk_size=GREEDY_CHUNK,
              progress=False) | kw
    return generate(model, prompts, **kw)


@pytest.fixture(scope="module")
def qwen3_greedy(qwen3):
    return _greedy(qwen3[1])


def _hf_greedy(hf, prompts, max_new_tokens, eos_ids=None):
    """transformers' greedy generate on the left-padded batch; rows cut after their first EOS."""
    from transformers import GenerationConfig

    s = max(map(len, prompts))
    ids = np.zeros((len(prompts), s), np.int64)
    mask = np.zeros((len(prompts), s), np.int64)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = p
        mask[i, s - len(p):] = 1
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=list(eos_ids or []))  # [] disables EOS (None would not)
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=gc)
    rows = []
    for row in out[:, s:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if eos_ids and t in eos_ids), len(row))
        rows.append(row[:end])
    return rows


def _teacher_forced(hf, prompt, completion, temperature):
    """log_softmax(logits / T) of each completion token under transformers' full forward."""
    full = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = hf(full).logits[0, len(prompt) - 1:-1].double()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.numpy(), lp[torch.arange(len(completion)), torch.tensor(completion)].numpy()


# --- greedy parity with transformers ---------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_matches_transformers(request, family):
    hf, model, _ = request.getfixturevalue(family)
    ours = request.getfixturevalue("qwen3_greedy") if family == "qwen3" else _greedy(model)
    ref = _hf_greedy(hf, PROMPTS, GREEDY_NEW)
    assert len(ours) == len(PROMPTS)
    for i, group in enumerate(ours):
        assert len(group) == 1 and isinstance(group[0], Completion)
        c = group[0]
        assert c.finish_reason == "length" and c.length == GREEDY_NEW == len(c.logprobs)
        assert c.tokens == ref[i], f"prompt {i} (length {len(PROMPTS[i])})"
    # the prompts really lead to different continuations (padding is not ignored by accident)
    assert len({tuple(g[0].tokens) for g in ours}) == len(PROMPTS)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_stops_at_eos_like_transformers(request, family):
    hf, model, _ = request.getfixturevalue(family)
    free = _hf_greedy(hf, PROMPTS, GREEDY_NEW)  # verified equal to ours above
    # EOS = a token of prompt 0's continuation at step 10 that prompt 1's continuation never emits:
    # prompt 0 stops early (in the first decode chunk), prompt 1 runs to the length limit.
    eos = next(t for t in free[0][10:] if t not in free[1])
    out = _greedy(model, eos_ids=[eos])
    ref = _hf_greedy(hf, PROMPTS, GREEDY_NEW, eos_ids=[eos])
    assert [len(g) for g in out] == [1, 1, 1]
    reasons = []
    for i, (group, full) in enumerate(zip(out, free)):
        c = group[0]
        assert c.tokens == ref[i]
        if eos in full:
            end = full.index(eos) + 1
            assert (c.finish_reason, c.tokens, c.tokens[-1]) == ("eos", full[:end], eos)
        else:
            assert (c.finish_reason, c.tokens) == ("length", full)
        assert len(c.logprobs) == c.length
        reasons.append(c.finish_reason)
    assert reasons[0] == "eos" and reasons[1] == "length" and out[0][0].length < GREEDY_NEW
    assert out.stats["generated_tokens"] == sum(g[0].length for g in out)

    # several EOS ids that end every sequence early: decoding stops once all are done
    stops = [full[4 + 3 * i] for i, full in enumerate(free)]
    out = _greedy(model, eos_ids=stops)
    ref = _hf_greedy(hf, PROMPTS, GREEDY_NEW, eos_ids=stops)
    for i, group in enumerate(out):
        assert group[0].finish_reason == "eos" and group[0].tokens == ref[i]
        assert group[0].tokens[-1] in stops and group[0].length <= 5 + 3 * i
    assert out.stats["decode_steps"] == max(g[0].length for g in out) < GREEDY_NEW


def test_default_eos_ids_come_from_the_config(llama):
    """eos_ids=None uses config.json's eos_token_id (2 for transformers' LlamaConfig), like HF."""
    hf, model, _ = llama
    assert model.config.eos_token_ids == (2,) == (hf.generation_config.eos_token_id,)
    out = _greedy(model, eos_ids=None)
    ref = _hf_greedy(hf, PROMPTS, GREEDY_NEW, eos_ids=[2])
    assert [g[0].tokens for g in out] == ref
    assert [g[0].finish_reason for g in out] == ["eos" if r[-1] == 2 else "length" for r in ref]
    assert any(g[0].finish_reason == "eos" for g in out)


def test_greedy_n_samples_are_identical_and_equal_n1(qwen3, qwen3_greedy):
    out = _greedy(qwen3[1], n=3)
    for group, ref in zip(out, qwen3_greedy):
        assert len(group) == 3
        for c in group:
            assert c.tokens == ref[0].tokens and c.finish_reason == "length"
            np.testing.assert_allclose(c.logprobs, ref[0].logprobs, rtol=0, atol=1e-5)


def test_greedy_logprobs_are_untempered_teacher_forced(qwen3, qwen3_greedy):
    """At temperature 0 the logprobs are log_softmax(logits) of the argmax token."""
    hf = qwen3[0]
    for p, group in zip(PROMPTS, qwen3_greedy):
        c = group[0]
        full, ref = _teacher_forced(hf, p, c.tokens, 1.0)
        np.testing.assert_allclose(c.logprobs, ref, rtol=0, atol=LOGPROB_TOL)
        np.testing.assert_array_equal(c.tokens, full.argmax(-1))


# --- sampled logprobs, shared prompt KV --------------------------------------------

SAMPLED = {  # id -> (temperature, top_k, top_p)
    "T0.7-topk20": (0.7, 20, 1.0),
    "T1.0-topp0.9": (1.0, 0, 0.9),
}


def _sample(model, cfg, seed=0, n=4):
    t, k, p = SAMPLED[cfg]
    return generate(model, PROMPTS, n=n, max_new_tokens=SAMPLE_NEW, temperature=t, top_k=k, top_p=p,
                    seed=seed, eos_ids=[], chunk_size=SAMPLE_CHUNK, progress=False)


@pytest.fixture(scope="module")
def sampled(qwen3):
    return {cfg: _sample(qwen3[1], cfg) for cfg in SAMPLED}


@pytest.mark.parametrize("cfg", list(SAMPLED))
def test_sampled_logprobs_equal_teacher_forcing(qwen3, sampled, cfg):
    """Each of the n=4 samples per prompt, over 3 decode chunks, has the logprobs that the full
    forward of prompt + completion gives: the shared prompt KV and every chunk's own KV are used
    correctly. The logprobs are those of log_softmax(logits / T) BEFORE top-k / top-p truncation
    (verl's old-logprob convention), so they are compared with the untruncated distribution."""
    hf = qwen3[0]
    temperature, top_k, top_p = SAMPLED[cfg]
    out = sampled[cfg]
    assert len(out) == len(PROMPTS)
    truncated_mass = []
    for p, group in zip(PROMPTS, out):
        assert len(group) == 4
        assert len({tuple(c.tokens) for c in group}) == 4  # the samples really differ
        for c in group:
            assert c.finish_reason == "length" and c.length == SAMPLE_NEW == len(c.logprobs)
            full, ref = _teacher_forced(hf, p, c.tokens, temperature)
            np.testing.assert_allclose(c.logprobs, ref, rtol=0, atol=LOGPROB_TOL)
            # the truncation was applied to the draw: every token lies in the kept set
            order = np.argsort(-full, -1)
            rank = (order == np.asarray(c.tokens)[:, None]).argmax(-1)
            probs = np.exp(np.take_along_axis(full, order, -1))
            above = np.cumsum(probs, -1) - probs  # mass strictly above each rank
            if top_k:
                assert rank.max() < top_k
                truncated_mass.append(probs[:, top_k:].sum(-1))
            if top_p < 1:
                assert (above[np.arange(len(rank)), rank] < top_p + 1e-6).all()
                truncated_mass.append(np.where(above >= top_p, probs, 0).sum(-1))
    # and the truncation mattered: a real share of the distribution was cut away
    assert np.concatenate(truncated_mass).mean() > 0.02


def test_sampled_eos_ends_each_sample_on_its_own(qwen3, sampled):
    """With an EOS that some samples emit, those stop (EOS included) while the other samples of
    the same prompt group go on, and every logprob still matches teacher forcing."""
    hf = qwen3[0]
    cfg = "T1.0-topp0.9"
    counts = np.bincount([t for g in sampled[cfg] for c in g for t in c.tokens], minlength=VOCAB)
    eos = int(counts.argmax())  # the token the samples emit most often
    out = generate(qwen3[1], PROMPTS, n=4, max_new_tokens=SAMPLE_NEW, temperature=1.0, top_p=0.9,
                   seed=0, eos_ids=[eos], chunk_size=SAMPLE_CHUNK, progress=False)
    for p, group in zip(PROMPTS, out):
        assert len(group) == 4
        for c in group:
            assert len(c.logprobs) == c.length
            if c.finish_reason == "eos":
                assert c.tokens.index(eos) == c.length - 1
            else:
                assert c.finish_reason == "length" and c.length == SAMPLE_NEW and eos not in c.tokens
            np.testing.assert_allclose(c.logprobs, _teacher_forced(hf, p, c.tokens, 1.0)[1],
                                       rtol=0, atol=LOGPROB_TOL)
    # some prompt group has samples that stopped and samples that ran on
    assert any(len({c.finish_reason for c in g}) == 2 for g in out)
    assert out.stats["generated_tokens"] == sum(c.length for g in out for c in g)


def test_seeds_reproduce_and_differ(qwen3, sampled):
    cfg = "T1.0-topp0.9"
    ref = sampled[cfg]
    again = _sample(qwen3[1], cfg, seed=0)
    for g1, g2 in zip(ref, again):
        for c1, c2 in zip(g1, g2):
            assert c1.tokens == c2.tokens and c1.logprobs == c2.logprobs
    other = _sample(qwen3[1], cfg, seed=1)
    toks = lambda gen: np.array([c.tokens for g in gen for c in g])  # noqa: E731  [12, 20]
    a, b = toks(ref), toks(other)
    assert (a != b).any(-1).sum() >= len(a) - 1  # 12 completions of 20 tokens: a coincidence is rare
    # the seed reaches every step, the prefill's first token included: at each step some of the
    # 12 completions differ (all 12 agreeing by chance has probability far below 1e-6)
    assert (a != b).any(0).all()
    for group in list(ref) + list(other):  # at T=1 the n samples of a prompt are not all alike
        assert len({tuple(c.tokens) for c in group}) > 1


# --- sharded -------------------------------------------------------------------------

def test_sharded_greedy_equals_unsharded(qwen3, qwen3_greedy):
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model, _ = models.from_pretrained(qwen3[2], mesh=mesh)
    q = model.layers[0].q_dnh[...]  # [D=64, N=4, H=16]: embed over fsdp, heads over tensor
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 2, 16)
    out = _greedy(model)
    for group, ref in zip(out, qwen3_greedy):
        assert len(group) == 1 and group[0].finish_reason == "length"
        assert group[0].tokens == ref[0].tokens
        np.testing.assert_allclose(group[0].logprobs, ref[0].logprobs, rtol=0, atol=1e-5)


# --- stats and progress ------------------------------------------------------------

def test_progress_and_stats(qwen3, qwen3_greedy):
    seen, streamed = [], []
    out = _greedy(qwen3[1], progress=seen.append, on_tokens=streamed.append)
    assert [g[0].tokens for g in out] == [g[0].tokens for g in qwen3_greedy]
    # on_tokens streams the tokens so far (real prompts only): after the prefill, then per chunk
    assert [t.shape for t in streamed] == [(3, 1), (3, 17), (3, 33), (3, 40)]
    np.testing.assert_array_equal(streamed[-1], [g[0].tokens for g in out])
    for a, b in zip(streamed, streamed[1:]):
        np.testing.assert_array_equal(b[:, :a.shape[1]], a)
    assert len(seen) == 3  # one report per decode chunk: 16 + 16 + 7 steps after the prefill token
    for s in seen:
        assert s["tokens_per_s"] > 0 and s["batch"] == 4 and s["running"] == 3
    generated = [s["generated"] for s in seen]
    assert generated == sorted(generated) and len(set(generated)) == 3
    assert generated[-1] >= 3 * GREEDY_NEW
    st = out.stats
    assert st["generated_tokens"] == sum(c.length for g in out for c in g) == 3 * GREEDY_NEW
    assert st["tokens_per_s"] > 0 and st["seconds"] > 0
    assert st["tokens_per_s"] == pytest.approx(st["generated_tokens"] / st["seconds"])
    assert st["decode_steps"] == GREEDY_NEW


# --- bad input ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return models.init_model(models.preset("tiny", max_position_embeddings=64))


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "no prompts"),
    ([[3, 4], []], {}, "prompt 1 is empty"),
    ([[3] * 60], dict(max_new_tokens=5), "prompt 0 has 60 tokens.*exceeds the model's context of 64"),
    ([[3] * 64], dict(max_new_tokens=1), "exceeds the model's context"),
    ([[3]], dict(n=0), "n must be >= 1"),
    ([[3]], dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ([[3]], dict(temperature=-0.1), "temperature must be >= 0"),
    ([[3]], dict(temperature=float("nan")), "temperature must be >= 0"),
    ([[3]], dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([[3]], dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ([[3]], dict(top_k=-1), "top_k must be >= 0"),
    ([[3], [5, 256]], {}, r"prompt 1 has token ids outside \[0, 256\)"),
    ([[-1, 3]], {}, r"prompt 0 has token ids outside \[0, 256\)"),
    ([[3]], dict(n=2.5), "n must be an integer, got 2.5"),
    ([[3]], dict(prompt_bucket=0), "prompt_bucket must be >= 1"),
    ([[3]], dict(pad_id=256), r"pad_id=256 is outside the vocabulary \[0, 256\)"),
], ids=["no-prompts", "empty-prompt", "too-long", "too-long-by-1", "n0", "max-new-0", "neg-temp",
        "nan-temp", "top-p-0", "top-p-1.5", "neg-top-k", "token-too-big", "token-negative",
        "float-n", "bucket-0", "pad-outside-vocab"])
def test_bad_input_is_rejected(tiny, prompts, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny, prompts, **({"max_new_tokens": 4} | kw))


def test_top_k_wider_than_the_vocabulary_keeps_every_token(tiny):
    wide = generate(tiny, [[3, 4]], n=3, max_new_tokens=6, top_k=10_000, seed=5, eos_ids=[])
    plain = generate(tiny, [[3, 4]], n=3, max_new_tokens=6, top_k=0, seed=5, eos_ids=[])
    assert [c.tokens for c in wide[0]] == [c.tokens for c in plain[0]]


def test_prompt_filling_the_context_exactly_is_accepted(tiny):
    out = generate(tiny, [[3] * 63], max_new_tokens=1, temperature=0.0, eos_ids=[])
    assert len(out) == 1 and len(out[0]) == 1 and out[0][0].length == 1


# --- sample_logits statistics ------------------------------------------------------------

BASE = np.array([3.0, 2.2, 1.9, 1.0, 0.5, 0.0, -0.3, -1.0, -2.0, -4.0], np.float32)  # distinct
ROWS = 20_000


def _rows(seed=0):
    """ROWS rows, each a random permutation of BASE, so each row has its own top set."""
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random((ROWS, BASE.size)), -1)
    return BASE[perm], perm  # row r: token t has logit BASE[perm[r, t]], i.e. rank perm[r, t]


def _draw(logits, perm, params, seed=0, key=None):
    key = jax.random.key(seed) if key is None else key
    tok, lp = sample_logits(jnp.asarray(logits), key, params)
    tok, lp = np.asarray(tok), np.asarray(lp)
    assert tok.shape == lp.shape == (ROWS,) and tok.dtype == np.int32
    rank = perm[np.arange(ROWS), tok]
    # logprobs are always those of the untruncated softmax(l / T)
    t = params.temperature or 1.0
    ref = jax.nn.log_softmax(BASE / t)[rank]
    np.testing.assert_allclose(lp, ref, rtol=0, atol=1e-5)
    return np.bincount(rank, minlength=BASE.size)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _chi2_p(counts, probs):
    probs = np.asarray(probs, np.float64)
    keep = probs > 0
    assert counts[~keep].sum() == 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    return float(chi2.sf(stat, keep.sum() - 1))  # Pearson's chi-square test (scipy-free)


def _hf_kept(scores, top_k=0, top_p=1.0):
    """The tokens transformers' TopK -> TopP warpers keep (an independent reference)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    s = torch.tensor(scores)[None]
    if top_k:
        s = TopKLogitsWarper(top_k)(None, s)
    if top_p < 1:
        s = TopPLogitsWarper(top_p)(None, s)
    return np.isfinite(s[0].numpy())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_frequencies_follow_tempered_softmax(temperature):
    logits, perm = _rows()
    counts = _draw(logits, perm, SamplingParams(temperature=temperature))
    assert _chi2_p(counts, _softmax(BASE / temperature)) > 1e-3
    # the test can tell temperatures apart: the T=1 softmax is clearly rejected at T != 1
    if temperature != 1.0:
        assert _chi2_p(counts, _softmax(BASE)) < 1e-6


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 3, 1.0),
    (0.7, 5, 1.0),
    (1.0, 1, 1.0),      # top_k=1 is greedy
    (1.0, 0, 0.8),
    (2.0, 0, 0.6),      # the nucleus is computed on the tempered distribution
    (1.0, 0, 0.05),     # below the top token's mass: the top token alone is kept
    (1.0, 4, 0.9),      # top-p on the top-k renormalised distribution, as transformers does
])
def test_truncated_sampling(temperature, top_k, top_p):
    scaled = BASE / temperature
    kept = _hf_kept(scaled, top_k, top_p)
    n_kept = int(kept.sum())
    assert kept[:n_kept].all()  # a prefix of the ranks
    probs = _softmax(scaled)
    if top_p < 1 and not top_k:  # the smallest prefix whose mass reaches top_p
        cum = np.cumsum(probs)
        assert n_kept == int(np.argmax(cum >= top_p)) + 1
    logits, perm = _rows(seed=1)
    counts = _draw(logits, perm, SamplingParams(temperature, top_p, top_k))
    assert counts[n_kept:].sum() == 0  # nothing outside the kept set, ever
    assert (counts[:n_kept] > 0).all()  # and every kept token does occur
    if n_kept > 1:  # within the kept set: the renormalised tempered softmax
        assert _chi2_p(counts, np.where(kept, probs, 0)) > 1e-3
    else:
        assert counts[0] == ROWS


def test_greedy_sample_logits_is_argmax():
    logits, perm = _rows(seed=2)
    counts = _draw(logits, perm, SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    assert counts[0] == ROWS


def test_sampling_params_reject_bad_values():
    for kw in (dict(temperature=-1.0), dict(temperature=float("inf")), dict(top_p=0.0),
               dict(top_p=1.01), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


# --- one KV buffer per call: compilations do not follow the number of new tokens ----------

class _CompileCounter:
    """Counts XLA backend compilations (every jit executable, eager ops included)."""

    def __enter__(self):
        from jax._src import monitoring
        self.count = 0

        def listener(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                self.count += 1
        self._listener = listener
        monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        from jax._src import monitoring
        monitoring.unregister_event_duration_listener(self._listener)


def test_compilations_do_not_grow_with_max_new_tokens():
    model = models.init_model(models.preset("tiny", max_position_embeddings=1100))
    prompts = [[3, 4, 5], [6, 7]]
    kw = dict(n=2, temperature=1.0, eos_ids=[], chunk_size=128, progress=False)
    with _CompileCounter() as first:
        out = generate(model, prompts, max_new_tokens=128, **kw)  # 127 decode steps: one chunk
    assert all(c.length == 128 for g in out for c in g)
    with _CompileCounter() as longer:
        out = generate(model, prompts, max_new_tokens=1024, seed=1, **kw)
    # 1,023 decode steps = 8 chunks of 128, all through one executable of the new length bucket;
    # besides it only that bucket's empty KV buffer is new
    assert all(c.length == 1024 for g in out for c in g)
    assert longer.count == 2 < first.count
    with _CompileCounter() as again:
        generate(model, prompts, max_new_tokens=1024, seed=2, **kw)
        generate(model, prompts, max_new_tokens=1000, seed=3, **kw)  # the same length bucket
    assert again.count == 0


def test_kernel_in_interpret_mode_samples_like_xla(qwen3):
    """The Pallas decode-attention kernel (interpret mode) gives the XLA path's tokens and logprobs."""
    kw = dict(n=2, max_new_tokens=12, temperature=1.0, seed=4, eos_ids=[], chunk_size=8,
              progress=False)
    prompts = PROMPTS[:2]
    ref = generate(qwen3[1], prompts, decode_attention="xla", **kw)
    got = generate(qwen3[1], prompts, decode_attention="interpret", **kw)
    for g_ref, g in zip(ref, got):
        for a, b in zip(g_ref, g):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_blocked_xla_path_samples_like_the_reference():
    """Past 512 slots the XLA path reads the own KV in blocks (what "auto" takes off GPUs):
    the same tokens and logprobs as the whole-buffer reference over 600 new tokens, on one
    device and on an 8-device mesh (the loop's trip count is a max over a sharded batch)."""
    cfg = models.preset("tiny", max_position_embeddings=1100)
    kw = dict(n=2, max_new_tokens=600, temperature=1.0, seed=6, eos_ids=[], progress=False)
    prompts = [[3, 4, 5], [6, 7], [8], [9, 10, 11, 12]]
    ref = generate(models.init_model(cfg), prompts, decode_attention="xla", **kw)
    sharded = models.init_model(cfg, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    for model in (models.init_model(cfg), sharded):
        got = generate(model, prompts, decode_attention="auto", **kw)
        assert (ref.stats["decode_attention"], got.stats["decode_attention"]) == ("xla", "blocked")
        for g_ref, g in zip(ref, got):
            for a, b in zip(g_ref, g):
                assert a.tokens == b.tokens and len(a.tokens) == 600
                np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_rbg_keys_reproduce_and_sample_the_tempered_softmax():
    params = SamplingParams(temperature=1.0)
    logits, perm = _rows(seed=4)
    key = jax.random.key(0, impl="rbg")
    counts = _draw(logits, perm, params, key=key)
    assert _chi2_p(counts, _softmax(BASE)) > 1e-3
    np.testing.assert_array_equal(counts, _draw(logits, perm, params, key=key))


def test_rng_choice_in_generate(tiny):
    kw = dict(n=3, max_new_tokens=6, eos_ids=[], progress=False)
    a = generate(tiny, [[3, 4]], rng="rbg", seed=5, **kw)
    b = generate(tiny, [[3, 4]], rng="rbg", seed=5, **kw)
    c = generate(tiny, [[3, 4]], seed=5, **kw)
    assert [x.tokens for x in a[0]] == [x.tokens for x in b[0]]
    assert [x.tokens for x in a[0]] != [x.tokens for x in c[0]]
    with pytest.raises(ValueError, match="rng must be one of"):
        generate(tiny, [[3]], rng="mt19937", **kw)
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        generate(tiny, [[3]], decode_attention="flash", **kw)


def test_length_buckets():
    from medssr_jax.sampler import _length_bucket
    assert [_length_bucket(s) for s in (1, 15, 16, 17, 127, 128, 511, 512, 513, 1023, 3071, 3072)] == \
        [16, 16, 16, 32, 128, 128, 512, 512, 1024, 1024, 3072, 3072]


@pytest.mark.parametrize("attention,platform", [("xla", None), ("pallas", "cuda")])
def test_a_decode_layer_step_writes_its_kv_once_and_runs_four_weight_matmuls(attention, platform):
    """Per layer-step of the lowered decode loop (one more layer minus one layer): one
    dynamic-update-slice writes the token's K and V together, and the weights enter four
    matmuls (fused QKV, output, fused gate|up, down); the Pallas path adds one kernel call
    and no other matmul. The Pallas program is lowered for CUDA on this host, not compiled."""
    from launch.decode_ops import lower_decode_chunk, per_layer
    cfg = models.preset("tiny")
    counts = per_layer(lambda c: lower_decode_chunk(c, 2, 4, 32, 64, attention, platform), cfg,
                       compile=False)["stablehlo_key_ops"]
    assert counts["dynamic_update_slice"] == 1
    if attention == "pallas":
        assert (counts["dot_general"], counts["custom_call"]) == (4, 1)
    else:  # the XLA path's attention: scores and values over the prompt KV and the own KV
        assert (counts["dot_general"], counts["custom_call"]) == (4 + 4, 0)
