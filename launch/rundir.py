"""One run directory per pipeline run: per-stage manifests, atomic outputs, resume.

Each stage writes into `<workdir>/<stage>/` and records a `manifest.json`:
its inputs (files with their SHA-256, upstream stages with their manifest
hashes), its configuration, the code version, timings and status. A stage
whose manifest says "done" with the same inputs and configuration is skipped;
one that says "running" resumes (its own outputs are append-only or
checkpointed); one whose recorded inputs or configuration differ is refused
rather than silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping


class ManifestMismatch(RuntimeError):
    pass


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON through a temporary file in the same directory and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's files (names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no such input")
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """The git commit of the checkout (with '+dirty' for local changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunDir:
    def __init__(self, workdir: str | os.PathLike):
        self.root = Path(workdir)
        self.root.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, stage: str) -> Path:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self, stage: str) -> dict | None:
        path = self.root / stage / "manifest.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestMismatch(f"{path}: unreadable manifest ({e}); move the stage directory away "
                                   f"to rerun it") from None

    def manifest_hash(self, stage: str) -> str:
        m = self.manifest(stage)
        if m is None or m.get("status") != "done":
            raise ManifestMismatch(f"stage {stage!r} has not finished in {self.root}: run it first")
        return hashlib.sha256(json.dumps(m["outputs"], sort_keys=True).encode()).hexdigest()  # paths + digests

    def begin(self, stage: str, inputs: Mapping[str, str], config: Mapping[str, Any], *,
              write: bool = True) -> str:
        """'skip' when done with these inputs, 'resume' when interrupted, 'start' otherwise.

        Raises ManifestMismatch when the stage ran with other inputs or config.
        ``write=False`` (processes other than 0) checks without writing.
        """
        key = {"inputs": dict(inputs), "config": json.loads(json.dumps(dict(config), default=str))}
        old = self.manifest(stage)
        if old is not None:
            recorded = {"inputs": old.get("inputs"), "config": old.get("config")}
            if recorded != key:
                diff = sorted(k for k in set(key["config"]) | set(recorded["config"] or {})
                              if key["config"].get(k) != (recorded["config"] or {}).get(k))
                diff += sorted(f"input {k}" for k in set(key["inputs"]) | set(recorded["inputs"] or {})
                               if key["inputs"].get(k) != (recorded["inputs"] or {}).get(k))
                raise ManifestMismatch(
                    f"{self.root / stage / 'manifest.json'}: stage {stage!r} ran with different "
                    f"{', '.join(diff) or 'settings'}; use another --workdir or remove {self.root / stage}")
            if old.get("status") == "done":
                return "skip"
            status = "resume"
        else:
            status = "start"
        if not write:
            return status
        write_json_atomic(self.root / stage / "manifest.json",
                          dict(key, stage=stage, status="running", code_version=code_version(),
                               started=time.time(), outputs={}))
        return status

    def finish(self, stage: str, outputs: Mapping[str, str], summary: Mapping[str, Any] | None = None
               ) -> None:
        """Mark the stage done, recording each output (a path in the stage directory) with its
        SHA-256, so the manifest hash that later stages record changes whenever an output does."""
        m = self.manifest(stage) or {}
        outs = {name: {"path": rel, "sha256": file_digest(self.root / stage / rel)} for name, rel in outputs.items()}
        m.update(status="done", finished=time.time(), outputs=outs, summary=dict(summary or {}))
        m["seconds"] = m["finished"] - m.get("started", m["finished"])
        write_json_atomic(self.root / stage / "manifest.json", m)
