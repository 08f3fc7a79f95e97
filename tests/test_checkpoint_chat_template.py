"""A checkpoint's own chat template is what its prompts are rendered with.

A tiny HF directory is written with transformers (a random Llama model, and the byte-level
tokenizer carrying a jinja template of its own), loaded the way the pipeline and
`launch.serve` load it, and served: the chat endpoint's prompt is that template's text,
not the built-in renderer's. The built-in template *name* a checkpoint gets (stop tokens,
fallback rendering) is read from its template or, without one, from its architecture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

openai = pytest.importorskip("openai")

import models  # noqa: E402
from medssr_jax.chat import SMOLLM2_DEFAULT_SYSTEM, format_chat, render_chat, template_name  # noqa: E402
from medssr_jax.protocol import SYSTEM_MESSAGE, Prompter  # noqa: E402
from medssr_jax.sampler import generate  # noqa: E402
from medssr_jax.server import Server  # noqa: E402
from medssr_jax.tokenizers import byte_tokenizer, checkpoint_chat_template, load_tokenizer  # noqa: E402
from models.config import ModelConfig  # noqa: E402

# ChatML markers (ids 1 and 2 of the byte tokenizer) around bracketed role names: a
# template no built-in renderer produces.
OWN_TEMPLATE = ("{% for m in messages %}<|im_start|>[{{ m['role'] | upper }}] {{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>[ASSISTANT] {% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Dose?"}]
EXPECTED = ("<|im_start|>[SYSTEM] Be brief.<|im_end|>\n<|im_start|>[USER] Dose?<|im_end|>\n"
            "<|im_start|>[ASSISTANT] ")


def write_checkpoint(directory, template):
    from tests.hf_models import make_hf_model
    make_hf_model("llama", vocab=256).save_pretrained(directory, safe_serialization=True)
    tok = byte_tokenizer()
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("own_template"), OWN_TEMPLATE)


def test_hf_directory_with_its_own_template_is_served_with_it(checkpoint):
    model, cfg = models.from_pretrained(checkpoint)
    tok = load_tokenizer(checkpoint)
    assert tok.chat_template == OWN_TEMPLATE == checkpoint_chat_template(checkpoint)
    assert cfg.chat_template == "qwen3"  # ChatML markers: the fallback renderer and stop tokens
    assert format_chat(MESSAGES, cfg.chat_template) != EXPECTED

    # evaluation, labelling and GRPO prompts (the protocol) use the same template
    prompter = Prompter(tok, cfg.chat_template, family=cfg.family)
    assert prompter.prompt_text("Q?") == EXPECTED.replace("Be brief.", SYSTEM_MESSAGE).replace("Dose?", "Q?")

    prompt = tok.encode(EXPECTED, add_special_tokens=False)
    with Server(model, tok, model_name="own", chunk_size=8, max_wait_ms=0) as srv:
        assert srv.chat_template_source == "checkpoint"
        assert srv.render_chat(MESSAGES) == EXPECTED
        assert 1 in srv.eos_ids  # <|im_end|>: the stop token of the ChatML name
        client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="own", messages=MESSAGES, max_tokens=8, temperature=0)
        eos = srv.eos_ids
        # an unknown role is refused with 400 before the template sees it
        with pytest.raises(openai.BadRequestError, match="role 'tool'"):
            client.chat.completions.create(model="own", messages=[{"role": "tool", "content": "x"}],
                                           max_tokens=8)
    assert r.usage.prompt_tokens == len(prompt)
    ref = generate(model, [prompt], n=1, max_new_tokens=8, temperature=0.0, eos_ids=eos, chunk_size=8,
                   progress=False)[0][0]
    content = ref.tokens[:-1] if ref.finish_reason == "eos" else ref.tokens
    assert r.choices[0].message.content == tok.decode(content, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(ref.tokens)


def test_a_named_template_or_a_base_model_uses_the_builtin_renderer(checkpoint):
    model, cfg = models.from_pretrained(checkpoint)
    tok = load_tokenizer(checkpoint)
    named = Server(model, tok, model_name="own", chat_template="smollm2")
    assert named.chat_template_source == "built-in"
    assert named.render_chat(MESSAGES) == format_chat(MESSAGES, "smollm2")
    base = Server(model, tok, model_name="own", chat_template="raw")
    assert base.render_chat(MESSAGES) == "Be brief.\n\nDose?"
    assert Server(model, tok, model_name="own").chat_template_source == "checkpoint"
    assert render_chat(MESSAGES, "raw", tok) == "Be brief.\n\nDose?"


def test_directory_without_a_template_falls_back_to_the_builtin_renderer(tmp_path):
    d = write_checkpoint(tmp_path / "plain", None)
    model, cfg = models.from_pretrained(d)
    tok = load_tokenizer(d)
    assert checkpoint_chat_template(d) is None and not tok.chat_template
    assert cfg.chat_template == "llama3"  # Llama architecture, not SmolLM2's vocabulary
    srv = Server(model, tok, model_name="plain")
    assert srv.chat_template_source == "built-in"
    assert srv.render_chat(MESSAGES) == format_chat(MESSAGES, "llama3")


SMOLLM2_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_JINJA = "{{- bos_token }}<|start_header_id|>system<|end_header_id|>\n\n..."
QWEN3_JINJA = "{%- if enable_thinking is defined %}<|im_start|>assistant\n<think>\n\n</think>\n\n{%- endif %}"


@pytest.mark.parametrize("jinja, family, vocab, name", [
    (SMOLLM2_JINJA, "llama", 49_152, "smollm2"),
    (SMOLLM2_JINJA, "llama", 256, "smollm2"),     # the template decides, not the vocabulary
    (LLAMA3_JINJA, "llama", 128_256, "llama3"),
    (QWEN3_JINJA, "qwen3", 151_936, "qwen3"),
    (None, "llama", 49_152, "smollm2"),           # no template: SmolLM2's vocabulary
    (None, "llama", 128_256, "llama3"),
    (None, "qwen3", 151_936, "qwen3"),
    ("{{ messages }}", "llama", 49_152, "smollm2"),  # an unrecognised template: the architecture
])
def test_template_name(jinja, family, vocab, name):
    assert template_name(jinja, family=family, vocab_size=vocab) == name
    hf = dict(architectures=["LlamaForCausalLM" if family == "llama" else "Qwen3ForCausalLM"],
              vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
    assert ModelConfig.from_hf(hf, chat_template_text=jinja).chat_template == name
    assert ModelConfig.from_hf(hf, chat_template_text=jinja, chat_template="raw").chat_template == "raw"


def test_smollm2_jinja_renders_like_the_builtin_renderer():
    tok = byte_tokenizer()
    tok.chat_template = SMOLLM2_JINJA
    for msgs in (MESSAGES, MESSAGES[1:]):
        assert render_chat(msgs, "smollm2", tok) == format_chat(msgs, "smollm2")


def test_template_files_are_read_as_transformers_reads_them(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert checkpoint_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert checkpoint_chat_template(tmp_path) == "J"  # the .jinja file wins
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: 'chat_template' must be"):
        checkpoint_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: cannot be read as JSON"):
        checkpoint_chat_template(tmp_path)


def test_template_refusal_is_a_value_error():
    tok = byte_tokenizer()
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ValueError, match="refused these messages: only user turns"):
        render_chat(MESSAGES, "qwen3", tok)
    np.testing.assert_equal(render_chat(MESSAGES, "raw", tok), "Be brief.\n\nDose?")
