"""The command line as users run it: bad input, API synthesis, and `--stage=all` killed in
every stage then rerun (outputs equal to an uninterrupted run's)."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.rundir import file_digest
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-pipeline-test-secret-4711"


def cli_env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(ROOT))
    env.pop("OPENAI_API_KEY", None)
    env.update(extra)
    return env


def run_cli(args: list[str], *, env: dict | None = None, kill_on: tuple[str, ...] = (),
            timeout: float = 300) -> tuple[int, str, bool]:
    """Run `python -m launch.main args`; SIGKILL it as soon as stderr lines have matched the
    patterns of `kill_on` in order. Returns (exit code, stderr, killed)."""
    proc = subprocess.Popen([sys.executable, "-m", "launch.main", *args], cwd=ROOT, env=env or cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, killed, deadline, todo = [], False, time.monotonic() + timeout, list(kill_on)
    try:
        for line in proc.stderr:
            lines.append(line)
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch.main {args} ran past {timeout} s:\n{''.join(lines[-20:])}")
            if todo and re.search(todo[0], line):
                todo.pop(0)
                if not todo:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    return rc, "".join(lines), killed


@pytest.mark.parametrize("args,message", [
    (["--config.alpha=2"], r"^all: alpha must be in \[0, 1\], got 2\.0$"),
    (["--config=nope"], r"^FATAL Flags parsing error: flag --config=nope: unknown --config 'nope'; known: "),
    (["--model=/no/such/model"], r"^all: /no/such/model: no such model \(--model takes"),
    (["--stage=label", "--seeds=/no/seeds.json"], r"^label: /no/seeds\.json: no such file or directory \(--seeds\)$"),
    (["--benchmarks=/no/bench"], r"^all: /no/bench: no benchmark files; pass --benchmarks="),
    (["--config.rl_sup.steps=0"], r"^all: rl_sup\.steps must be >= 1, got 0$"),
    (["--config.eval_temperature=-1"], r"^all: eval_temperature must be >= 0 \(0: greedy\), got -1\.0$"),
    (["--config.skip_stages=label"], r"^all: skip_stages takes rl_self, rl_sup and export, got label$"),
    (["--real_data=/no/real.json"], r"^all: /no/real\.json: no such file or directory \(--real_data\)$"),
    (["--config.mix_ratio=0.5"], r"^all: mix_ratio needs rl_mode=mixed$"),
    (["--config.rl_sup.temperature=0.7", "--config.rl_sup.loss.temperature=1.0"],
     r"^all: rl_sup: the loss temperature 1\.0 differs from the rollout temperature 0\.7"),
    (["--config.rl_sup.loss.kl_cof=1"], r"^FATAL Flags parsing error: Field kl_cof not found on dataclass "
                                        r"<class 'rl\.train_step\.LossConfig'>; --config\.FIELD takes"),
    (["--config.alpha=high"], r"^FATAL Flags parsing error: flag --config\.alpha=high: could not convert"),
    (["--alpha=0.5"], r"^FATAL Flags parsing error: Unknown command line flag 'alpha'\. A preset's settings are "
                      r"set as --config\.FIELD=VALUE"),
    (["stray"], r"^unexpected arguments: stray \(flags are --name=value; see --help\)$"),
])
def test_bad_flags_give_one_clear_line(tmp_path, args, message):
    rc, err, _ = run_cli(["--config=tiny", f"--workdir={tmp_path}", *args], timeout=120)
    assert rc != 0
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert "Traceback" not in err


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "launch.main", "--help"], cwd=ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=120).stdout
    for flag in ("stage", "config", "workdir", "model", "seeds", "real_data", "benchmarks", "show_config",
                 "coordinator_address", "num_processes", "process_id", "lock", "lease_ttl"):
        m = re.search(rf"^  --(?:\[no\])?{flag}: (.+)$", out, re.MULTILINE)
        assert m and len(m.group(1)) > 10, flag
    assert re.search(r"--config\.FIELD=VALUE after --config=NAME, e\.g\. --config\.alpha=0", out)
    for stage in ("synthesize", "label", "rl_self", "rl_sup", "rl_mixed", "eval", "export", "all"):
        assert re.search(rf"^  {stage}\s+\S", out, re.MULTILINE), stage


def _show_config(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "launch.main", "--show_config", *args], cwd=ROOT,
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("config ")
    return {k: ast.literal_eval(v) for k, v in (x.strip().split(" = ", 1) for x in lines[1:])}


def test_any_field_of_a_preset_is_set_from_the_command_line():
    """--config=NAME selects the preset; --config.PATH=VALUE sets top-level, nested and tuple fields."""
    base = _show_config("--config=tiny")
    got = _show_config("--config=tiny", "--config.alpha=0.5", "--config.rl_sup.loss.kl_coef=0.02",
                       "--config.rl_self.optim.learning_rate=1e-6", "--config.mesh=(1,2,1)",
                       "--config.skip_stages=rl_self", "--config.eval_policies=base,rl_sup",
                       "--config.eval_filter=is_reasoning", "--config.rl_sup.temperature=0.7",
                       "--config.rl_sup.steps=5", "--config.label_recover=false")
    changed = {k: v for k, v in got.items() if base[k] != v}
    assert changed == {
        "alpha": 0.5, "rl_sup.loss.kl_coef": 0.02, "rl_self.optim.learning_rate": 1e-6, "mesh": [1, 2, 1],
        "skip_stages": ["rl_self"], "eval_policies": ["base", "rl_sup"], "eval_filter": "is_reasoning",
        "rl_sup.temperature": 0.7, "rl_sup.loss.temperature": 0.7,  # the loss follows the rollout
        "rl_sup.steps": 5, "rl_sup.optim.total_steps": 5,           # the lr schedule spans the stage
        "label_recover": False}
    assert base["name"] == "tiny" and base["rl_self.loss.temperature"] == 1.0
    assert _show_config()["name"] == "smollm2"  # the embedded default


_SPY = """
import json, os, sys
import rl.loop
seen = []
_step = rl.loop.train_step
def spy(*args, cfg, **kw):  # the LossConfig each GRPO update runs with
    seen.append({"kl_coef": cfg.kl_coef, "temperature": cfg.temperature})
    return _step(*args, cfg=cfg, **kw)
rl.loop.train_step = spy
from launch import main
try:
    main.run(sys.argv)
finally:
    with open(os.environ["SPY_OUT"], "w") as f:
        json.dump(seen, f)
"""


def test_a_nested_override_reaches_the_grpo_loss_and_the_manifest(tmp_path):
    """--config.rl_sup.loss.kl_coef set on the command line is the coefficient of every rl_sup
    update (and brings in the reference pass), is printed, and is recorded in the manifest."""
    spy_out = tmp_path / "seen.json"
    args = ["--stage=rl_sup", "--config=tiny", f"--workdir={tmp_path / 'run'}", "--config.skip_stages=rl_self",
            "--config.rl_sup.loss.kl_coef=0.125", "--config.rl_sup.steps=1"]
    out = subprocess.run([sys.executable, "-c", _SPY, *args], cwd=ROOT, env=cli_env(SPY_OUT=str(spy_out)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(spy_out.read_text()) == [{"kl_coef": 0.125, "temperature": 1.0}]
    assert "  rl_sup.loss.kl_coef = 0.125\n" in out.stdout      # the resolved config, printed at start
    assert re.search(r"^step 1/1 .* kl \d", out.stderr, re.MULTILINE), out.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "rl_sup" / "manifest.json").read_text())
    assert m["config"]["rl_sup"]["loss"]["kl_coef"] == 0.125            # compared on resume
    assert m["run_config"]["rl_sup"]["loss"]["kl_coef"] == 0.125        # the whole run's config
    assert m["run_config"]["rl_self"]["loss"]["kl_coef"] == 0.0 and m["run_config"]["skip_stages"] == ["rl_self"]
    assert m["summary"]["plan"]["reference_bytes"] > 0                  # the reference pass was planned


def test_api_synthesis_from_the_command_line(tmp_path):
    with FakeOpenAI(schedule=None) as srv:
        args = ["--stage=synthesize", "--config=tiny", f"--workdir={tmp_path}", "--config.num_questions=8",
                "--config.alpha=0.5", f"--config.openai_base_url={srv.base_url}",
                "--config.synth_model=gpt-4.1-mini"]
        rc, err, _ = run_cli(args, env=cli_env(OPENAI_API_KEY=API_KEY), timeout=240)
        assert rc == 0, err
        n_requests = len(srv.requests)
    out = tmp_path / "synthesize"
    items = [json.loads(x) for x in (out / "synthetic.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()] \
        if (out / "rejected.jsonl").exists() else []
    assert len(items) + len(rejected) == 8 and len(items) >= 6 and n_requests >= 8
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["generator"] == "gpt-4.1-mini" and summary["items"] == len(items)
    rare = [it for it in items + rejected if it["provenance"]["entity"]]
    assert summary["rare_ratio"] == len(rare) / 8 and rare
    for it in rare:  # the knowledge block came from the HPO profile index
        ids = it["provenance"]["retrieved_doc_ids"]
        assert len(ids) == 3 and all(i.startswith(("ORPHA:", "OMIM:", "DECIPHER:")) for i in ids)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert API_KEY not in f.read_text(errors="replace"), f
    assert API_KEY not in err
    # with the endpoint gone, a rerun is skipped; another generator model is refused
    rc, err, _ = run_cli(args, env=cli_env(OPENAI_API_KEY=API_KEY), timeout=120)
    assert rc == 0 and "synthesize: finished earlier, skipped" in err
    rc, err, _ = run_cli(args[:-1] + ["--config.synth_model=gpt-4.1"], env=cli_env(OPENAI_API_KEY=API_KEY), timeout=120)
    assert rc != 0 and "ran with different synth_model" in err


def _outputs(workdir: Path) -> dict:
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted((workdir / "eval").glob("*/results.json"))}
    assert list(results) == ["base", "rl_sup"]
    return {
        "synthetic": file_digest(workdir / "synthesize" / "synthetic.jsonl"),
        "labels": file_digest(workdir / "label" / "pseudo_labelled.jsonl"),
        "rl_self": file_digest(workdir / "rl_self" / "model"),
        "rl_sup": file_digest(workdir / "rl_sup" / "model"),
        "eval": {p: {b: [it["predictions"] for it in r["items"]] for b, r in res["benchmarks"].items()}
                 for p, res in results.items()},
        "export": file_digest(workdir / "export" / "model"),
        "history": {s: [(h["step"], h["reward_mean"], h["loss"]) for h in
                        json.loads((workdir / s / "history.json").read_text())] for s in ("rl_self", "rl_sup")},
    }


KILL_POINTS = [  # (stage, the stderr lines after which the run is killed)
    ("synthesize", (r"^synthesize: starting",)),
    ("label", (r"^label: starting",)),
    ("rl_self", (r"^rl_self: starting", r"^step 2/3")),  # after a checkpoint: the rerun resumes from it
    ("rl_sup", (r"^rl_sup: starting", r"^step 2/3")),
    ("eval", (r"^eval: starting",)),
    ("export", (r"^export: starting",)),
]
STAGES = [s for s, _ in KILL_POINTS]


def test_all_resumes_after_a_kill_in_every_stage(tmp_path):
    args = ["--stage=all", "--config=tiny", "--config.rl_self.steps=3", "--config.rl_sup.steps=3"]
    rc, err, _ = run_cli(args + [f"--workdir={tmp_path / 'straight'}"])
    assert rc == 0, err
    expected = _outputs(tmp_path / "straight")
    report = (tmp_path / "straight" / "report.md").read_text()
    for stage in STAGES:
        assert re.search(rf"^\| {stage} \| done \| \d+ \|", report, re.MULTILINE), stage
    assert "| rl_sup | 3 |" in report and "## Pseudo-labels" in report and "| medqa | " in report
    assert "| benchmark | base | rl_sup |" in report
    for png in ("reward_curves.png", "eval/base/accuracy.png", "eval/rl_sup/accuracy.png"):
        assert f"]({png})" in report
        assert (tmp_path / "straight" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from launch.pipeline import resolve_model  # --model=<run directory>: its latest policy
    assert resolve_model(str(tmp_path / "straight")) == str(tmp_path / "straight" / "export" / "model")

    work = tmp_path / "killed"
    errs = []
    for i, (stage, patterns) in enumerate(KILL_POINTS):
        rc, err, killed = run_cli(args + [f"--workdir={work}"], kill_on=patterns)
        errs.append(err)
        assert killed and rc == -signal.SIGKILL, (stage, err)
        assert json.loads((work / stage / "manifest.json").read_text())["status"] == "running"
        for done in STAGES[:i]:
            assert json.loads((work / done / "manifest.json").read_text())["status"] == "done"
    rc, err, _ = run_cli(args + [f"--workdir={work}"])
    errs.append(err)
    assert rc == 0, err
    # each rerun resumed the stage killed before it; GRPO stages from their step-1 or -2 checkpoint
    for (stage, _), later in zip(KILL_POINTS, errs[1:]):
        assert f"{stage}: resuming" in later, (stage, later)
    assert re.search(r"resumed from step [12]", errs[3]) and re.search(r"resumed from step [12]", errs[4])
    assert _outputs(work) == expected
