"""Chat prompt formatting without jinja, for checkpoints that carry no template.

A checkpoint's own ``chat_template`` (``tokenizer_config.json``,
``chat_template.jinja`` or GGUF metadata), rendered by transformers'
``apply_chat_template``, is what prompts are made with wherever a tokenizer
has one (:func:`render_chat`). The renderers here stand in where it has none,
pick the stop tokens of :func:`medssr_jax.tokenizers.stop_token_ids`, and serve
as the test oracle of the official templates. :func:`template_name` tells
which of them a checkpoint is.

Each template is a pure function of the messages that reproduces, for plain
conversations (system / user / assistant turns with string content, no tools),
the text the model's official jinja chat template renders:

``qwen3``
    ChatML as in Qwen3's hybrid-thinking template: a leading system message
    becomes ``<|im_start|>system\\n...<|im_end|>\\n``; every turn is
    ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Assistant turns before the
    last user message lose their ``<think>...</think>`` block (only the text
    after ``</think>`` is kept, left-stripped of newlines); assistant turns after
    the last user message keep it, re-rendered as
    ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``. The generation prompt is
    ``<|im_start|>assistant\\n``; with ``enable_thinking=False`` it is followed
    by an empty think block ``<think>\\n\\n</think>\\n\\n``.
``llama3``
    Llama-3.1 Instruct: ``<|begin_of_text|>``, then always a system header whose
    body is ``Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n``
    followed by the (stripped) system message, or nothing; then each turn as
    ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>``.
    Generation prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
``smollm2``
    ChatML as in SmolLM2-Instruct; when the first message is not a system
    message the default system prompt ``You are a helpful AI assistant named
    SmolLM, trained by Hugging Face`` is inserted.
``raw``
    Base models: no markup. The message contents are joined with a blank line
    (``\\n\\n``) in order, so a single user message is rendered exactly as its
    content.

``enable_thinking`` only affects ``qwen3``; the other templates ignore it.
Allowed roles are ``system``, ``user`` and ``assistant``; ``content`` must be a
string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

__all__ = ["CHAT_TEMPLATES", "SMOLLM2_DEFAULT_SYSTEM", "check_messages", "format_chat", "has_own_template",
           "render_chat", "template_name"]

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA3_DATE_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
_ROLES = ("system", "user", "assistant")


def _validate(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' keys, got {m!r}")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise ValueError(f"message {i} has role {role!r}; allowed roles: {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        out.append((role, content))
    return out


def _chatml_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _qwen3(msgs: list[tuple[str, str]], add_generation_prompt: bool, enable_thinking: bool) -> str:
    parts = []
    # Index of the last user turn: assistant turns after it keep their reasoning.
    last_query = len(msgs) - 1
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i][0] == "user":
            last_query = i
            break
    for i, (role, content) in enumerate(msgs):
        if role in ("system", "user"):
            parts.append(_chatml_turn(role, content))
            continue
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        is_last = i == len(msgs) - 1
        if i > last_query and (is_last or reasoning):
            body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        else:
            body = content
        parts.append(f"<|im_start|>assistant\n{body}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if not enable_thinking:
            parts.append("<think>\n\n</think>\n\n")
    return "".join(parts)


def _llama3(msgs: list[tuple[str, str]], add_generation_prompt: bool, enable_thinking: bool) -> str:
    del enable_thinking
    system = ""
    if msgs and msgs[0][0] == "system":
        system = msgs[0][1].strip()
        msgs = msgs[1:]
    parts = [
        "<|begin_of_text|>",
        "<|start_header_id|>system<|end_header_id|>\n\n",
        LLAMA3_DATE_PREAMBLE,
        system,
        "<|eot_id|>",
    ]
    for role, content in msgs:
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _smollm2(msgs: list[tuple[str, str]], add_generation_prompt: bool, enable_thinking: bool) -> str:
    del enable_thinking
    parts = []
    if msgs and msgs[0][0] != "system":
        parts.append(_chatml_turn("system", SMOLLM2_DEFAULT_SYSTEM))
    parts.extend(_chatml_turn(role, content) for role, content in msgs)
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _raw(msgs: list[tuple[str, str]], add_generation_prompt: bool, enable_thinking: bool) -> str:
    del add_generation_prompt, enable_thinking
    return "\n\n".join(content for _, content in msgs)


CHAT_TEMPLATES: dict[str, Callable[[list[tuple[str, str]], bool, bool], str]] = {
    "qwen3": _qwen3,
    "llama3": _llama3,
    "smollm2": _smollm2,
    "raw": _raw,
}


def format_chat(
    messages: Sequence[Mapping[str, str]],
    template: str,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
) -> str:
    """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) as the
    prompt string of chat template ``template`` (see the module docstring).

    Raises ``ValueError`` for an unknown template (listing the known ones), a
    role other than system/user/assistant, or non-string content.
    """
    try:
        render = CHAT_TEMPLATES[template]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown chat template {template!r}; known templates: {', '.join(CHAT_TEMPLATES)}"
        ) from None
    return render(_validate(messages), bool(add_generation_prompt), bool(enable_thinking))


def check_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """``messages`` as plain ``{"role", "content"}`` dicts, checked as :func:`format_chat`
    checks them (roles system/user/assistant, string content); ``ValueError`` otherwise."""
    return [{"role": role, "content": content} for role, content in _validate(messages)]


def has_own_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a checkpoint's jinja chat template it can render."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def render_chat(messages: Sequence[Mapping[str, str]], template: str, tokenizer=None, *,
                add_generation_prompt: bool = True, enable_thinking: bool = True) -> str:
    """The prompt text of ``messages``: the tokenizer's own chat template when it has one
    (transformers' ``apply_chat_template``), else the built-in renderer ``template``.
    Template ``"raw"`` (base models) is always the built-in one: no markup."""
    msgs = check_messages(messages)
    if template != "raw" and tokenizer is not None and has_own_template(tokenizer):
        kw = {} if enable_thinking else {"enable_thinking": False}
        from jinja2.exceptions import TemplateError  # transformers renders templates with jinja2
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False,
                                                 add_generation_prompt=bool(add_generation_prompt), **kw)
        except TemplateError as e:  # includes raise_exception(...) inside the template
            raise ValueError(f"the checkpoint's chat template refused these messages: {e}") from None
    return format_chat(msgs, template, add_generation_prompt=add_generation_prompt,
                       enable_thinking=enable_thinking)


# Llama's vocabulary sizes are 128,256 (3.x); SmolLM2 shares the Llama architecture with 49,152.
SMOLLM2_VOCAB_SIZE = 49_152


def template_name(jinja: str | None, *, family: str, vocab_size: int | None = None) -> str:
    """The built-in template that matches a checkpoint: read from its own jinja template
    when it has one (Llama-3 headers, ChatML with SmolLM's default system prompt, other
    ChatML), else from the architecture (``qwen3``; Llama with SmolLM2's vocabulary
    ``smollm2``; other Llama ``llama3``)."""
    if isinstance(jinja, str) and jinja:
        if "<|start_header_id|>" in jinja:
            return "llama3"
        if "<|im_start|>" in jinja:
            return "smollm2" if "SmolLM" in jinja else "qwen3"
    if family == "qwen3":
        return "qwen3"
    return "smollm2" if vocab_size == SMOLLM2_VOCAB_SIZE else "llama3"
