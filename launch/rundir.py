"""One run directory per pipeline run: one writer, per-stage manifests, atomic outputs, resume.

Each stage writes into `<workdir>/<stage>/` and records a `manifest.json`:
its inputs (files with their SHA-256, upstream stages with their manifest
hashes), its configuration, the code version, timings and status. A stage
whose manifest says "done" with the same inputs and configuration is skipped
(after checking that its output files still have the recorded SHA-256); one
that says "running" resumes (its own outputs are append-only or
checkpointed); one whose recorded inputs or configuration differ is refused
rather than silently mixing two runs.

One run at a time writes a run directory (`RunLock`, `exclusive_run`):
- `flock`: an OS lock (`fcntl.flock`) on `<workdir>/.medssr.lock`, released
  by the kernel when the owner exits, however it exits;
- `lease`: for storage without working locks (gcsfuse and other FUSE
  buckets, where flock is at most per host): `<workdir>/.medssr.lease`
  records the owner (host, pid, start time) and a heartbeat that a daemon
  thread refreshes every TTL/4. A lease whose heartbeat is older than the
  owner's TTL, or whose owner process no longer exists on this host, has
  expired and is taken over;
- `auto` (the default): `lease` on FUSE mounts and where flock is not
  supported, else `flock`; `none`: no lock.
A run that finds the directory owned stops with `RunDirLocked`, one line
naming the owner, before creating or writing anything in it.
Manifests never record credentials: URL userinfo and secret query
parameters are masked (`medssr_jax.redact`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from medssr_jax.atomic import write_json_atomic
from medssr_jax.redact import redact, redact_text

__all__ = ["DEFAULT_LEASE_TTL", "LEASE_NAME", "LOCK_MODES", "LOCK_NAME", "ManifestMismatch", "RunDir",
           "RunDirLocked", "RunLock", "code_version", "exclusive_run", "file_digest", "filesystem_type",
           "prepare_workdir", "write_json_atomic"]

LOCK_MODES = ("auto", "flock", "lease", "none")
LOCK_NAME = ".medssr.lock"
LEASE_NAME = ".medssr.lease"
DEFAULT_LEASE_TTL = 120.0  # seconds without a heartbeat after which a lease has expired
_FLOCK_UNSUPPORTED = {errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK}
_MANIFEST_STATUSES = ("running", "done")


class ManifestMismatch(RuntimeError):
    """A manifest that refuses the stage: other inputs or settings, unfinished, unreadable."""


class RunDirLocked(RuntimeError):
    """Another run owns the run directory (the message names it)."""


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """The run directory, created if missing; an error naming it when it cannot be one."""
    root = Path(workdir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: --workdir is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{root}: cannot create the run directory (--workdir): {e.strerror or e}") from None
    return root


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


def filesystem_type(path: str | os.PathLike) -> str | None:
    """The type of the filesystem holding `path` ("ext4", "fuse.gcsfuse", ...) from
    /proc/self/mounts, or None where that is not available."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # \040 is a space
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def _utc(t: float | None) -> str:
    if not isinstance(t, (int, float)):
        return "an unknown time"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive right to write one run directory, for as long as it is held.

        with RunLock(workdir, mode="auto", ttl=120).acquire() as lock:
            ...               # lock.check() raises if a lease was lost meanwhile

    `acquire` raises RunDirLocked, naming the owner (host, pid, since when),
    when another run holds the directory; nothing is created or written then
    (the run directory and lock file exist already when it has an owner).
    """

    def __init__(self, workdir: str | os.PathLike, mode: str = "auto", ttl: float = DEFAULT_LEASE_TTL, *,
                 settle: float | None = None):
        if mode not in LOCK_MODES:
            raise ValueError(f"--lock={mode!r}: expected one of {', '.join(LOCK_MODES)}")
        if not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValueError(f"--lease_ttl={ttl}: the lease TTL must be > 0 seconds")
        self.root = Path(workdir)
        self.mode, self.ttl = mode, float(ttl)
        # a lease is re-read this long after it is written: a second writer racing for it shows by then
        self.settle = min(2.0, self.ttl / 10) if settle is None else float(settle)
        self.held: str | None = None  # "flock", "lease" or "none" once acquired
        self.lost: dict | None = None  # the lease's new owner, when another run took it over
        self._fd: int | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def lease_path(self) -> Path:
        return self.root / LEASE_NAME

    # --- taking and giving back -------------------------------------------------------------
    def acquire(self) -> "RunLock":
        if self.held is not None:
            raise RuntimeError(f"{self.root}: this lock is held already")
        prepare_workdir(self.root)
        mode = self.mode
        if mode == "none":
            self.held = "none"
            return self
        if mode == "auto":
            mode = "lease" if (filesystem_type(self.root) or "").startswith("fuse") else "flock"
        try:
            # lease mode holds the flock too where the storage has one
            if not self._flock(required=self.mode == "flock"):
                mode = "lease"  # auto, on storage without flock
            if mode == "flock":
                self._refuse_if_leased()  # a run in lease mode owns it
            else:
                self._take_lease()
        except BaseException:
            self._unlock()
            raise
        self.held = mode
        return self

    def release(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        if self._token is not None:
            with contextlib.suppress(OSError):
                current = self._read_lease()
                if current is not None and current.get("token") == self._token:
                    self.lease_path.unlink()
            self._token = None
        self._unlock()
        self.held = None

    def check(self) -> None:
        """Raise RunDirLocked when the lease was taken over by another run while held."""
        if self.lost is not None:
            raise RunDirLocked(f"{self.root}: the lease on this run directory was taken over by "
                               f"{self._owner_text(self.lost)} while this run held it; stopping")

    def __enter__(self) -> "RunLock":
        return self if self.held is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- the record of who holds it -----------------------------------------------------------
    def _owner_record(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
                "started": now, "started_utc": _utc(now), "command": redact_text(" ".join(sys.argv))}

    @staticmethod
    def _owner_text(owner: Mapping | None) -> str:
        owner = owner or {}
        return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
                f"since {_utc(owner.get('started'))}")

    def _refusal(self, owner: Mapping | None, how: str) -> RunDirLocked:
        return RunDirLocked(f"{self.root}: in use by another run ({self._owner_text(owner)}; {how}); "
                            f"wait for it to finish or use another --workdir")

    # --- flock ----------------------------------------------------------------------------------
    def _flock(self, required: bool) -> bool:
        """Hold the OS lock on the lock file; False where the filesystem has none (and not required)."""
        path = self.lock_path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OSError(f"{path}: cannot open the run directory's lock file: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._refusal(self._read_flock_owner(), f"flock on {path.name}") from None
            if e.errno in _FLOCK_UNSUPPORTED:
                if required:
                    raise OSError(f"{path}: this filesystem does not support flock ({e.strerror}); "
                                  f"use --lock=lease") from None
                return False
            raise OSError(f"{path}: flock failed: {e.strerror or e}") from None
        self._fd = fd
        record = json.dumps(self._owner_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        return True

    def _read_flock_owner(self) -> dict | None:
        for _ in range(20):  # the owner writes its record right after taking the lock
            try:
                raw = self.lock_path.read_bytes()
            except OSError:
                return None
            if raw.strip():
                try:
                    record = json.loads(raw)
                    return record if isinstance(record, dict) else None
                except ValueError:
                    pass
            time.sleep(0.05)
        return None

    def _unlock(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no stale owner for the next holder's readers
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    # --- lease ----------------------------------------------------------------------------------
    def _read_lease(self) -> dict | None:
        """The lease record; None when there is none; {"unreadable": mtime} while it is being
        written or when damaged."""
        path = self.lease_path
        try:
            raw = path.read_bytes()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OSError(f"{path}: cannot read the run directory's lease: {e.strerror or e}") from None
        try:
            record = json.loads(raw)
        except ValueError:
            return {"unreadable": mtime}
        return record if isinstance(record, dict) and "token" in record else {"unreadable": mtime}

    def _expired(self, lease: Mapping) -> bool:
        now = time.time()
        if "unreadable" in lease:
            return now - float(lease["unreadable"]) >= self.ttl
        try:
            ttl = float(lease.get("ttl", self.ttl))
            if now - float(lease["heartbeat"]) >= ttl:
                return True
        except (KeyError, TypeError, ValueError):
            return True
        same_machine = (lease.get("host") == socket.gethostname()
                        and lease.get("pid_namespace") == _pid_namespace())
        return same_machine and isinstance(lease.get("pid"), int) and not _pid_running(lease["pid"])

    def _lease_text(self, lease: Mapping) -> str:
        if "unreadable" in lease:
            return (f"lease {LEASE_NAME} being written or damaged, modified {time.time() - lease['unreadable']:.0f} s "
                    f"ago, expires {self.ttl:.0f} s after that")
        age = time.time() - float(lease.get("heartbeat", 0))
        return (f"lease {LEASE_NAME}, last heartbeat {age:.0f} s ago, expires "
                f"{float(lease.get('ttl', self.ttl)):.0f} s after its last heartbeat")

    def _refuse_if_leased(self) -> None:
        lease = self._read_lease()
        if lease is not None and not self._expired(lease):
            raise self._refusal(lease, self._lease_text(lease))

    def _take_lease(self) -> None:
        path = self.lease_path
        current = self._read_lease()
        if current is not None and not self._expired(current):
            raise self._refusal(current, self._lease_text(current))
        token = uuid.uuid4().hex
        record = dict(self._owner_record(), token=token, ttl=self.ttl)
        record["heartbeat"] = record["started"]
        if current is None:
            try:  # exclusive creation where the storage offers it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                current = self._read_lease() or {"unreadable": time.time()}
                if not self._expired(current):
                    raise self._refusal(current, self._lease_text(current)) from None
                write_json_atomic(path, record)
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(record, f)
                    f.flush()
                    os.fsync(f.fileno())
        else:  # an expired lease: replaced whole
            write_json_atomic(path, record)
        time.sleep(self.settle)
        now = self._read_lease()
        if now is None or now.get("token") != token:  # another run took it in the meantime
            raise self._refusal(now, self._lease_text(now or {"unreadable": time.time()}))
        self._token = token
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.root}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.ttl / 4
        while not self._stop.wait(interval):
            try:
                current = self._read_lease()
                if current is None or current.get("token") != self._token:
                    self.lost = current or {}
                    print(f"warning: {self.root}: the run directory's lease was taken over by "
                          f"{self._owner_text(current)}; this run stops before its next stage",
                          file=sys.stderr, flush=True)
                    return
                current["heartbeat"] = time.time()
                write_json_atomic(self.lease_path, current)
            except OSError as e:
                print(f"warning: lease heartbeat failed, retrying in {interval:.0f} s: {e}",
                      file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive_run(workdir: str | os.PathLike, mode: str = "auto", ttl: float = DEFAULT_LEASE_TTL, *,
                  main: bool = True, agree: Callable[[bool], bool] | None = None) -> Iterator[RunLock | None]:
    """Hold the run directory for the block: process 0 (`main`) takes the lock, and `agree`
    (process 0's success, broadcast to every process) stops all processes when it could not.
    Yields the lock on process 0, None on the others."""
    lock, error = None, None
    if main:
        try:
            lock = RunLock(workdir, mode, ttl).acquire()
        except (RunDirLocked, OSError, ValueError) as e:
            error = e
    if agree is not None and not agree(error is None):
        if error is None:
            raise RunDirLocked(f"{workdir}: process 0 could not take the run directory lock (see its log)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


class RunDir:
    def __init__(self, workdir: str | os.PathLike):
        self.root = prepare_workdir(workdir)

    def stage_dir(self, stage: str) -> Path:
        d = self.root / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or None before its first run; ManifestMismatch naming the file
        when it cannot be read or is not a manifest."""
        path = self.root / stage / "manifest.json"
        if not path.exists():
            return None
        fix = "move the stage directory away to rerun it"
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ManifestMismatch(f"{path}: unreadable manifest ({e}); {fix}") from None
        except OSError as e:
            raise ManifestMismatch(f"{path}: cannot read the manifest ({e.strerror or e}); {fix}") from None
        if not isinstance(m, dict):
            raise ManifestMismatch(f"{path}: not a manifest (a JSON {type(m).__name__}, expected an object); "
                                   f"{fix}")
        problems = []
        if m.get("status") not in _MANIFEST_STATUSES:
            problems.append(f"status {m.get('status')!r} is not one of {', '.join(_MANIFEST_STATUSES)}")
        for field in ("inputs", "config", "outputs"):
            if not isinstance(m.get(field), dict):
                problems.append(f"field {field!r} is {'missing' if field not in m else 'not an object'}")
        outputs = m.get("outputs") if isinstance(m.get("outputs"), dict) else {}
        for name, out in outputs.items():
            if not (isinstance(out, dict) and isinstance(out.get("path"), str)
                    and isinstance(out.get("sha256"), str)):
                problems.append(f"output {name!r} lacks a path and sha256")
        if problems:
            raise ManifestMismatch(f"{path}: damaged manifest ({'; '.join(problems)}); {fix}")
        return m

    def _write_manifest(self, stage: str, m: Mapping[str, Any]) -> None:
        write_json_atomic(self.root / stage / "manifest.json", redact(dict(m)))

    def manifest_hash(self, stage: str) -> str:
        m = self.manifest(stage)
        if m is None or m.get("status") != "done":
            raise ManifestMismatch(f"stage {stage!r} has not finished in {self.root}: run it first")
        return hashlib.sha256(json.dumps(m["outputs"], sort_keys=True).encode()).hexdigest()  # paths + digests

    def verify_outputs(self, stage: str, m: Mapping[str, Any]) -> None:
        """ManifestMismatch, naming the file, when an output file of a finished stage is missing or
        no longer has the SHA-256 its manifest records (directories, i.e. models, are not re-read)."""
        for name, out in m["outputs"].items():
            path = self.root / stage / out["path"]
            if path.is_dir():
                continue
            if not path.is_file():
                raise ManifestMismatch(f"{path}: output {name!r} of finished stage {stage!r} is missing; "
                                       f"move {self.root / stage} away to rerun the stage")
            if file_digest(path) != out["sha256"]:
                raise ManifestMismatch(f"{path}: changed since stage {stage!r} finished (its SHA-256 differs "
                                       f"from the manifest's); move {self.root / stage} away to rerun the stage")

    def begin(self, stage: str, inputs: Mapping[str, str], config: Mapping[str, Any], *,
              write: bool = True, record: Mapping[str, Any] | None = None) -> str:
        """'skip' when done with these inputs, 'resume' when interrupted, 'start' otherwise.

        Raises ManifestMismatch when the stage ran with other inputs or config,
        or when a finished stage's output files no longer match their digests.
        Credentials in the settings are masked before they are compared or
        recorded. ``write=False`` (processes other than 0) checks without writing.
        ``record``: more fields for the manifest that are written but not compared
        (the run's whole resolved configuration, say).
        """
        key = redact({"inputs": dict(inputs), "config": json.loads(json.dumps(dict(config), default=str))})
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
                self.verify_outputs(stage, old)
                return "skip"
            status = "resume"
        else:
            status = "start"
        if not write:
            return status
        extra = json.loads(json.dumps(dict(record or {}), default=str))
        self._write_manifest(stage, dict(extra, **key, stage=stage, status="running", code_version=code_version(),
                                         started=time.time(), outputs={}))
        return status

    def finish(self, stage: str, outputs: Mapping[str, str], summary: Mapping[str, Any] | None = None
               ) -> None:
        """Mark the stage done, recording each output (a path in the stage directory) with its
        SHA-256, so the manifest hash that later stages record changes whenever an output does."""
        m = self.manifest(stage)
        if m is None:
            raise ManifestMismatch(f"{self.root / stage / 'manifest.json'}: missing; stage {stage!r} "
                                   f"cannot finish without having begun")
        outs = {name: {"path": rel, "sha256": file_digest(self.root / stage / rel)} for name, rel in outputs.items()}
        m.update(status="done", finished=time.time(), outputs=outs, summary=dict(summary or {}))
        m["seconds"] = m["finished"] - m.get("started", m["finished"])
        self._write_manifest(stage, m)
