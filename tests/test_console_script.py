"""The `medssr` console script declared in pyproject.toml runs the pipeline's absl entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_medssr_script_runs_launch_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"medssr": "launch.cli:run"}
    module, func = scripts["medssr"].split(":")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    # What the generated `medssr` wrapper does: import the entry and call it with sys.argv.
    code = f"import sys; sys.argv = ['medssr', '--help']; from {module} import {func}; {func}()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    direct = subprocess.run([sys.executable, "-m", "launch.main", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--stage" in out.stdout and "--config" in out.stdout
    assert out.returncode == direct.returncode  # absl's --help exit status
    flags_of = lambda text: sorted(line for line in text.splitlines() if line.startswith("  --"))
    assert flags_of(out.stdout) == flags_of(direct.stdout)
    bad = subprocess.run([sys.executable, "-c", code.replace("'--help'", "'stray'")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unexpected arguments: stray" in bad.stderr
