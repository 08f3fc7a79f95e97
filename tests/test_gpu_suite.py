"""The one-call GPU suite: parts run in their own processes, failures degrade gracefully, and the
smoke mode runs our sampler benchmark end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from launch import gpu_suite
from launch.gpu_suite import Part


def _py(code):
    return [sys.executable, "-c", code]


def test_parts_run_fail_time_out_and_skip_without_stopping_the_suite(tmp_path):
    parts = [
        Part("ok", _py('import json; print(json.dumps({"kind": "medssr_jax_sampler", "model": "tiny", '
                       '"tokens_per_s": 100.0, "peak_mem_gb": 0.5}))'), 30),
        Part("fails", _py("import sys; print('boom'); sys.exit(3)"), 30),
        Part("hangs", _py("import time; print('{\"kind\": \"partial\"}', flush=True); time.sleep(60)"), 2),
        Part("missing", _py("print(1)"), 30, needs=str(tmp_path / "nowhere")),
        Part("after", _py('import json; print(json.dumps({"kind": "tunix_sampler", "model": "tiny", '
                          '"tokens_per_s": 50.0}))'), 30),
    ]
    t = time.perf_counter()
    result = gpu_suite.run_suite(parts, budget_s=60, out_dir=str(tmp_path))
    assert time.perf_counter() - t < 30  # the hanging part was stopped at its limit
    status = {p["name"]: p["status"] for p in result["parts"]}
    assert status == {"ok": "ok", "fails": "failed (exit 3)", "hangs": "timeout", "missing": "skipped",
                      "after": "ok"}
    parts_by_name = {p["name"]: p for p in result["parts"]}
    assert "boom" in parts_by_name["fails"]["tail"]
    assert parts_by_name["hangs"]["rows"] == [{"kind": "partial"}]  # what it printed before the kill
    assert parts_by_name["ok"]["peak_host_rss_gb"] > 0
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["summary"]["sampler"][0]["ours_over_tunix"] == 2.0
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| tiny | - | 50 | 100 | 2.00 |" in md
    assert "| hangs | timeout |" in md and "| ok | ok |" in md
    assert "[fails] boom" in (tmp_path / "gpu_suite.log").read_text()


def test_budget_spent_skips_the_remaining_parts(tmp_path):
    parts = [Part("slow", _py("import time; time.sleep(30)"), 30), Part("next", _py("print(1)"), 30)]
    result = gpu_suite.run_suite(parts, budget_s=6, out_dir=str(tmp_path))
    assert [p["status"] for p in result["parts"]] == ["timeout", "skipped"]


def test_smoke_suite_runs_our_sampler_benchmark(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.gpu_suite", "--smoke", "--parts=sampler",
                        f"--out={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    (part,) = result["parts"]
    assert part["status"] == "ok"
    (row,) = [x for x in part["rows"] if x["kind"] == "medssr_jax_sampler"]
    assert row["model"] == "tiny" and row["tokens_per_s"] > 0 and row["decode_attention_used"] == "xla"
    assert result["summary"]["sampler"][0]["ours"] == row["tokens_per_s"]
