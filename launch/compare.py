"""Compare the evaluations of several run directories: the paper's ablation table.

    python -m launch.compare runs/full runs/no_knowledge runs/no_filter runs/no_self runs/mixed \
        --out=runs/ablation

Each run contributes the evaluation of one policy (``--policy``: ``final``, the
latest trained policy it evaluated, by default; or base, rl_self, rl_sup,
rl_mixed); ``--with_base`` adds the first run's base model as a column. Writes
``comparison.md`` (one row per benchmark, one column per run, accuracy
mean ± std in %, and the average), ``comparison.json`` and
``comparison.png`` (grouped bars) into ``--out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from launch.report import comparison_table, evaluations, method_settings
from launch.rundir import RunDir, write_json_atomic

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined when run as a program only, so importing
    :func:`compare` next to other absl programs (tests) clashes with none of theirs."""
    flags.DEFINE_string("out", None, "Directory for comparison.md / .json / .png (default: the current directory).")
    flags.DEFINE_enum("policy", "final", ["final", "base", "rl_self", "rl_sup", "rl_mixed"],
                      "Which evaluated policy of each run: final = the latest trained one it evaluated.")
    flags.DEFINE_boolean("with_base", True, "Add the first run's base model as a column.")

FINAL_ORDER = ("rl_sup", "rl_mixed", "rl_self")


def pick(run: Path, policy: str) -> tuple[str, dict]:
    """(policy name, results) of one run directory, or ValueError naming what is missing."""
    evaluated = evaluations(run)
    if not evaluated:
        raise ValueError(f"{run}: no evaluation results (eval/<policy>/results.json); run --stage=eval first")
    if policy == "final":
        for name in FINAL_ORDER:
            if name in evaluated:
                return name, evaluated[name]
        raise ValueError(f"{run}: no trained policy was evaluated (found {', '.join(evaluated)})")
    if policy not in evaluated:
        raise ValueError(f"{run}: policy {policy} was not evaluated (found {', '.join(evaluated)})")
    return policy, evaluated[policy]


def plot(columns: dict[str, dict], path: Path) -> Path:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches = list(dict.fromkeys(b for r in columns.values() for b in r["benchmarks"]))
    fig = Figure(figsize=(max(5.0, 1.3 * len(benches) + 2), 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(columns), 1)
    x = np.arange(len(benches))
    for k, (name, res) in enumerate(columns.items()):
        vals = [100 * res["benchmarks"][b]["accuracy_mean"] if b in res["benchmarks"] else 0.0 for b in benches]
        errs = [100 * res["benchmarks"][b]["accuracy_std"] if b in res["benchmarks"] else 0.0 for b in benches]
        ax.bar(x + (k - (len(columns) - 1) / 2) * width, vals, width, yerr=errs, capsize=2, label=name)
    ax.set_xticks(x, benches, rotation=20 if len(benches) > 4 else 0)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Accuracy per benchmark and run", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def compare(runs: list[Path], out: Path, policy: str = "final", with_base: bool = True) -> dict[str, Path]:
    columns, settings = {}, {}
    for run in runs:
        if not run.is_dir():
            raise ValueError(f"{run}: no such run directory")
        name, res = pick(run, policy)
        label = f"{run.name} ({name})"
        if with_base and not columns:
            base = evaluations(run).get("base")
            if base is not None:
                columns[f"{run.name} (base)"] = base
        columns[label] = res
        settings[label] = method_settings({s: RunDir(run).manifest(s) for s in
                                           ("synthesize", "label", "rl_self", "rl_sup", "rl_mixed", "eval")})
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Comparison of runs", "", comparison_table(columns).rstrip(), "", "## Settings", ""]
    lines += [f"- {label}: " + "; ".join(f"{k} {v}" for k, v in s.items()) for label, s in settings.items()]
    paths = dict(markdown=out / "comparison.md", json=out / "comparison.json", plot=out / "comparison.png")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    write_json_atomic(paths["json"], {"columns": {k: {b: {"accuracy_mean": r["accuracy_mean"],
                                                          "accuracy_std": r["accuracy_std"], "n": r["n"]}
                                                      for b, r in v["benchmarks"].items()}
                                                  for k, v in columns.items()}, "settings": settings})
    plot(columns, paths["plot"])
    return paths


def main(argv):
    runs = [Path(a) for a in argv[1:]]
    if not runs:
        raise SystemExit("compare: name one or more run directories (see --help)")
    try:
        paths = compare(runs, Path(FLAGS.out or "."), FLAGS.policy, FLAGS.with_base)
    except (ValueError, OSError) as e:
        raise SystemExit(f"compare: {e}") from None
    print(f"compare: wrote {paths['markdown']}", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
