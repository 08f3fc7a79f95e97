"""`report.md` of a run directory: stage summaries, reward curves, accuracy table.

Built from what the stages recorded (manifests, `label/label_summary.json`,
`rl_*/history.json`, `eval/results.{json,md}`), so it can be rewritten at any
point of a run and shows the stages finished so far. Plots are PNG files
beside the report (`reward_curves.png`; the evaluation's `eval/accuracy.png`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from launch.rundir import RunDir
from medssr_jax.atomic import atomic_open, write_text_atomic
from medssr_jax.redact import redact_text

STAGE_ORDER = ("synthesize", "label", "rl_self", "rl_sup", "rl_mixed", "eval", "export")


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def plot_reward_curves(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """Reward mean (and accuracy) per step, one line per GRPO stage, steps continued across stages."""
    histories = {k: h for k, h in histories.items() if h}
    if not histories:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    offset = 0
    for stage, hist in histories.items():
        steps = [offset + h["step"] for h in hist]
        ax.plot(steps, [h["reward_mean"] for h in hist], marker="o", label=f"{stage} reward")
        offset = steps[-1]
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Reward per step (self-supervised, then supervised RL)", fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def method_settings(manifests: dict[str, dict | None]) -> dict[str, str]:
    """The settings the paper's ablations change, as recorded in a run's manifests."""
    def cfg(stage):
        return (manifests.get(stage) or {}).get("config", {})
    out = {}
    if manifests.get("synthesize"):
        out["alpha"] = str(cfg("synthesize").get("alpha"))
    if manifests.get("label"):
        c = cfg("label")
        out["pseudo-label filter"] = f"confidence {'>=' if c.get('label_keep') == 'ge' else '>'} " \
                                     f"{c.get('label_threshold')}"
    grpo = [s for s in ("rl_self", "rl_sup", "rl_mixed") if manifests.get(s)]
    if grpo:
        out["GRPO stages"] = " -> ".join(grpo)
        sup = manifests.get("rl_sup") or {}
        if sup:
            out["stage 2 starts from"] = str((sup.get("summary") or {}).get("start_policy", "?"))
        mixed = manifests.get("rl_mixed") or {}
        if mixed:
            out["mix ratio"] = str(cfg("rl_mixed").get("mix_ratio") or "all items of both sets")
    if manifests.get("eval"):
        out["evaluation protocol"] = str(cfg("eval").get("eval_protocol", "legacy"))
    return out


def evaluations(root: Path) -> dict[str, dict]:
    """The evaluation results of a run directory by policy (``eval/<policy>/results.json``)."""
    out = {}
    order = {"base": 0, "rl_self": 1, "rl_mixed": 2, "rl_sup": 3}
    for path in sorted((root / "eval").glob("*/results.json"), key=lambda p: (order.get(p.parent.name, 9), p)):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def comparison_table(columns: dict[str, dict]) -> str:
    """Markdown: one row per benchmark, one column per evaluation (results.json
    objects by name), accuracy mean ± std in %, and an average row."""
    names = list(columns)
    benches = list(dict.fromkeys(b for r in columns.values() for b in r["benchmarks"]))
    lines = ["| benchmark | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    means = {n: [] for n in names}
    for b in benches:
        cells = []
        for n in names:
            r = columns[n]["benchmarks"].get(b)
            if r is None:
                cells.append("")
                continue
            means[n].append(100 * r["accuracy_mean"])
            cells.append(f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("| average | " + " | ".join(f"{sum(v) / len(v):.2f}" if v else "" for v in means.values()) + " |")
    return "\n".join(lines) + "\n"


def write_report(workdir: str | os.PathLike, title: str = "medssr-jax run") -> Path:
    run = RunDir(workdir)
    root = run.root
    lines = [f"# {title}", "", f"Run directory: `{root}`", "",
             "| stage | status | seconds | summary |", "|---|---|---:|---|"]
    manifests = {s: run.manifest(s) for s in STAGE_ORDER}
    for stage, m in manifests.items():
        if m is None:
            lines.append(f"| {stage} | not run | | |")
            continue
        secs = f"{m['seconds']:.0f}" if "seconds" in m else ""
        flat = {k: v for k, v in (m.get("summary") or {}).items() if not isinstance(v, (dict, list))}
        lines.append(f"| {stage} | {m.get('status')} | {secs} | {_fmt(flat)} |")  # details: sections below
    first = next((m for m in manifests.values() if m), None)
    if first:
        lines += ["", f"Model input: `{first['inputs'].get('model')}`; code version "
                  f"`{first.get('code_version')}`; preset `{first['config'].get('name')}`."]

    settings = method_settings(manifests)
    if settings:
        lines += ["", "Method settings (the paper's ablations): " + "; ".join(f"{k} {v}" for k, v in settings.items())
                  + "."]

    synth = root / "synthesize" / "synthetic.jsonl"
    if synth.is_file():
        items = [json.loads(x) for x in synth.read_text().splitlines() if x.strip()]
        rare = sum(1 for it in items if it.get("provenance", {}).get("entity"))
        lines += ["", "## Synthetic questions", "",
                  f"{len(items)} items; {rare} with injected rare-disease knowledge (alpha "
                  f"{(manifests.get('synthesize') or {}).get('config', {}).get('alpha', '?')}) "
                  f"(retrieved profiles in each item's provenance)."]
        for it in items[:2]:
            opts = "; ".join(f"{k}. {v}" for k, v in it["options"].items())
            lines += ["", f"> {it['question']}", f"> {opts}",
                      f"> (generator's answer: {it.get('intended_answer')})"]

    summary = _read_json(root / "label" / "label_summary.json")
    if summary:
        agree = summary.get("agreement_with_intended")
        lines += ["", "## Pseudo-labels", "",
                  f"- {summary['items']} items x {summary['n']} votes; kept {summary['kept']} "
                  f"(confidence {'>=' if summary.get('keep') == 'ge' else '>'} {summary['threshold']}), "
                  f"dropped {summary['dropped']} "
                  f"({summary['dropped_no_label']} without a readable majority)",
                  f"- mean confidence {summary['mean_confidence']:.3f}; unreadable votes "
                  f"{100 * summary['unparseable_share']:.1f}%",
                  f"- kept labels by letter: {summary['label_distribution']}"
                  + (f"; agreement with the generator's answer {100 * agree:.1f}%" if agree is not None else "")]

    histories = {s: _read_json(root / s / "history.json") or [] for s in ("rl_self", "rl_sup", "rl_mixed")}
    if any(histories.values()):
        lines += ["", "## GRPO", "", "| stage | step | reward | accuracy | kl | clip frac | response len | "
                  "seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for stage, hist in histories.items():
            for h in hist:
                lines.append(f"| {stage} | {h['step']} | {h['reward_mean']:.3f} | {h.get('accuracy', 0):.3f} | "
                             f"{h.get('kl', 0):.4f} | {h['pg_clipfrac']:.3f} | {h['response_length']:.0f} | "
                             f"{h['time_step']:.1f} |")
        for stage in ("rl_self", "rl_sup", "rl_mixed"):
            summ = (manifests.get(stage) or {}).get("summary") or {}
            if summ.get("sources"):
                lines += ["", f"{stage} questions by source: " + "; ".join(
                    f"{name} {c['used']} of {c['read']}" + (f" (cap {c['cap']})" if c.get("cap") else "")
                    for name, c in summ["sources"].items())]
            plan = summ.get("plan")
            if plan:
                lines += ["", f"{stage} memory plan: {plan.get('prompts_per_call')} prompts per generate call "
                          f"({plan.get('generate_calls')} calls per step), {plan.get('rows_per_micro')} packed rows "
                          f"of {plan.get('pack_len')} tokens per micro-batch, remat {plan.get('remat')}, peak "
                          f"{plan.get('peak_bytes', 0) / 2 ** 30:.1f} GiB per device."]
        if plot_reward_curves(histories, root / "reward_curves.png"):
            lines += ["", "![reward per step](reward_curves.png)"]

    evaluated = evaluations(root)
    if evaluated:
        first = next(iter(evaluated.values()))
        cfg = first.get("config", {})
        lines += ["", "## Evaluation", "",
                  f"Protocol {cfg.get('protocol', 'legacy')}; {cfg.get('num_generations', '?')} generations per item "
                  f"at temperature {cfg.get('temperature', '?')}; accuracy in % (mean ± std over generations), "
                  f"each policy beside the base model.", ""]
        lines += comparison_table({name: r for name, r in evaluated.items()}).splitlines()
        skipped = {f"{p}/{b}": r.get("skipped") for p, res in evaluated.items()
                   for b, r in res["benchmarks"].items() if r.get("skipped")}
        if skipped:
            lines += ["", f"Records lost to read errors (partial results): {skipped}"]
        for name in evaluated:
            if (root / "eval" / name / "accuracy.png").is_file():
                lines += ["", f"![accuracy of {name}](eval/{name}/accuracy.png)"]
    return write_text_atomic(root / "report.md", redact_text("\n".join(lines) + "\n"))
