"""Test oracle: the MedSSR evaluation harness's behaviour, transcribed independently.

The reference is `vllm_logitsbias_multi.py` and `utils/logits_bias.py` of the
authors' public repository (tdlhl/MedSSR). Each function below reproduces one
of its functions step by step, including its model-name rules, so the tests can
hold `medssr_jax.protocol` and `medssr_jax.evaluation.evaluate_medssr` against
it. Nothing here is imported by the library.
"""

from __future__ import annotations

import re

import numpy as np

COT = ("You are a professional medical expert answering a multiple-choice medical question.\n"
       "Please think step by step and then provide exactly one final option.\n"
       "Format the final answer as: The answer is [LETTER].\n\nQuestion:\n{question}\n\n")
SYSTEM = "Please think step by step and output the final answer as 'The answer is [LETTER]'."
LLAMA_RULE_NAMES = ("gemma", "llama", "biomed", "huatuo", "deepseek-r1", "medreason")
ONE_TOKEN_NAMES = ("Qwen3", "Qwen2", "m1")


def extract_option(prediction, model_name=None):
    if not prediction:
        return None
    prediction = prediction.strip()
    for pattern in (r"The answer is ([A-Z])", r"The answer is \$\\boxed{([A-Z])}\$", r"The answer is \[([A-Z])\]"):
        found = list(re.finditer(pattern, prediction))
        if found:
            return found[-1].group(1)
    if model_name and "gemma" in model_name.lower():
        found = list(re.finditer(r"The answer is \*\*([A-Z])\*\*", prediction))
        if found:
            return found[-1].group(1)
    found = list(re.finditer(r"The answer is ([A-Z])", prediction, re.IGNORECASE))
    return found[-1].group(1).upper() if found else None


def allowed_letters(data):
    return sorted({item["gold"].upper() for item in data if item.get("gold")})


def is_base_model(model_name: str) -> bool:
    return "base" in model_name.lower()


def build_prompt(item, tokenizer, is_base):
    if is_base:
        return COT.format(question=item["question"])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["question"]}]
    if hasattr(tokenizer, "apply_chat_template") and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError("Instruct model tokenizer does not provide a chat template.")


def build_recovery_prompt(item, model_answer, tokenizer, is_base):
    if is_base:
        end = "" if model_answer.strip().endswith(".") else "."
        return COT.format(question=item["question"]) + model_answer + end + \
            "\nRespond with one option only.\nThe answer is "
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["question"]},
                {"role": "assistant", "content": model_answer},
                {"role": "user", "content": "Respond with one option only. The answer is "}]
    if hasattr(tokenizer, "apply_chat_template") and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return COT.format(question=item["question"]) + model_answer + "\nRespond with one option only.\nThe answer is "


def biased_token_ids(tokenizer, letters, model_name):
    ids = []
    for letter in letters:
        ids.append(tokenizer.encode(letter)[0])
        if any(name in model_name.lower() for name in LLAMA_RULE_NAMES):
            ids.extend(tokenizer.encode(f"{letter}."))
    return list(set(ids))


def recovery_max_tokens(model_name):
    return 1 if any(name in model_name for name in ONE_TOKEN_NAMES) else 2


def vllm_prompt_ids(tokenizer, text):
    """A text prompt as vLLM tokenizes it: the tokenizer's defaults."""
    return list(tokenizer.encode(text))


def generation_scores(group):
    golds = [item["gold"].upper() for item in group]
    preds = [(item["pred"] or "UNKNOWN").strip().rstrip(".").upper() for item in group]
    accuracy = round(float(np.mean([g == p for g, p in zip(golds, preds)])) * 100, 2)
    return {"accuracy": accuracy,
            "recovery_used": sum(1 for item in group if item.get("recovery_used", False)),
            "invalid_answers": sum(1 for p in preds if p == "UNKNOWN"),
            "sample_count": len(group)}


def split_by_generation(results):
    grouped = {}
    for item in results:
        grouped.setdefault(item["generation_idx"], []).append(item)
    return [grouped[k] for k in sorted(grouped)]


def run(data, answers, recover, model_name, params):
    """The harness's bookkeeping for one file: ``answers[i][g]`` is the text of
    generation g of item i, ``recover(item, answer) -> text`` the constrained
    decode. Returns (generation files, log entry)."""
    results, recovery = [], []
    for item, outs in zip(data, answers):
        for g, text in enumerate(outs):
            answer = text.strip()
            pred = extract_option(answer, model_name)
            if pred:
                results.append({"id": item["id"], "name": item.get("name", "unknown"), "gold": item["gold"],
                                "model": model_name.split("/")[-1], "generation_idx": g, "answer": answer,
                                "pred": pred, "recovery_used": False})
            else:
                recovery.append((item, g, answer))
    for item, g, answer in recovery:
        got = recover(item, answer).strip()
        results.append({"id": item["id"], "name": item.get("name", "unknown"), "gold": item["gold"],
                        "model": model_name.split("/")[-1], "generation_idx": g,
                        "answer": answer + "\nThe answer is " + got, "pred": got, "recovery_used": True})
    groups = split_by_generation(results)
    per_gen = [{"generation": g, **generation_scores(group)} for g, group in enumerate(groups)]
    accs = [m["accuracy"] for m in per_gen]
    log = {"dataset": data[0].get("name", "unknown") if data else "unknown", "model": model_name.split("/")[-1],
           "per_generation": per_gen, "average_accuracy": round(float(np.mean(accs)), 2),
           "std_accuracy": round(float(np.std(accs)), 2), "num_generations": len(groups),
           "total_records": len(results), "params": params}
    return groups, log
