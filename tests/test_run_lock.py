"""One writer per run directory: runs racing on one --workdir (both orders, flock and lease),
owners killed with SIGKILL whose locks and leases must pass on, leases taken over, and the
multi-process rule (process 0 holds the lock and stops the others when it cannot)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import rundir
from launch.rundir import LEASE_NAME, LOCK_NAME, RunDirLocked, RunLock, exclusive_run, file_digest
from tests.test_cli import cli_env

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
SINCE = r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def snapshot(root: Path) -> dict:
    """Every file and directory under root with its contents and mtime: what 'touching nothing' keeps."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_mtime_ns, None if p.is_dir() else p.read_bytes())
    return out


def refusal(root: Path, pid: int, how: str, host: str = HOST) -> str:
    return (rf"{re.escape(str(root))}: in use by another run \(host {re.escape(host)}, pid {pid}, {SINCE}; "
            rf"{how}\); wait for it to finish or use another --workdir")


FLOCK_HOW = r"flock on \.medssr\.lock"
LEASE_HOW = r"lease \.medssr\.lease, last heartbeat \d+ s ago, expires {ttl} s after its last heartbeat"


def fast_lock(*args, **kwargs) -> RunLock:
    kwargs.setdefault("settle", 0.05)  # a lease is re-read after 0.05 s rather than up to 2 s
    return RunLock(*args, **kwargs)


# --- in-process lock objects -----------------------------------------------------------------

@pytest.mark.parametrize("first,second,how", [
    ("flock", "flock", FLOCK_HOW),
    ("lease", "lease", FLOCK_HOW),  # on a local disk a lease run holds the flock too
    ("flock", "lease", FLOCK_HOW),
    ("lease", "none", None),        # --lock=none takes nothing and is never refused
], ids=["flock-flock", "lease-lease", "flock-lease", "lease-none"])
def test_second_holder_is_refused_and_touches_nothing(tmp_path, first, second, how):
    work = tmp_path / "run"
    a = fast_lock(work, first, ttl=30).acquire()
    assert a.held == first
    owner_files = {LOCK_NAME} | ({LEASE_NAME} if first == "lease" else set())
    assert {p.name for p in work.iterdir()} == owner_files
    before = snapshot(work)
    b = fast_lock(work, second, ttl=30)
    if how is None:
        assert b.acquire().held == "none"
        b.release()
    else:
        with pytest.raises(RunDirLocked) as e:
            b.acquire()
        assert re.fullmatch(refusal(work, os.getpid(), how), str(e.value)), str(e.value)
        assert b.held is None
    assert snapshot(work) == before
    a.release()
    assert not (work / LEASE_NAME).exists() and (work / LOCK_NAME).read_bytes() == b""
    c = fast_lock(work, second, ttl=30).acquire()  # free again
    assert c.held == second
    c.release()


def test_a_live_lease_refuses_a_flock_run(tmp_path, monkeypatch):
    """A run on storage without flock leaves only its lease; a flock run must still see it."""
    real_flock = rundir.fcntl.flock
    monkeypatch.setattr(rundir.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks")))
    a = fast_lock(tmp_path, "auto", ttl=30).acquire()
    assert a.held == "lease" and a._fd is None
    monkeypatch.setattr(rundir.fcntl, "flock", real_flock)
    with pytest.raises(RunDirLocked) as e:
        fast_lock(tmp_path, "flock", ttl=30).acquire()
    assert re.fullmatch(refusal(tmp_path, os.getpid(), LEASE_HOW.format(ttl=30)), str(e.value)), str(e.value)
    a.release()


def test_auto_mode_follows_the_filesystem(tmp_path, monkeypatch):
    assert rundir.filesystem_type("/proc/self") == "proc"
    assert rundir.filesystem_type(tmp_path)
    monkeypatch.setattr(rundir, "filesystem_type", lambda p: "fuse.gcsfuse")
    lock = fast_lock(tmp_path / "bucket", "auto", ttl=30).acquire()
    assert lock.held == "lease" and (tmp_path / "bucket" / LEASE_NAME).is_file()
    lease = json.loads((tmp_path / "bucket" / LEASE_NAME).read_text())
    assert (lease["host"], lease["pid"], lease["ttl"]) == (HOST, os.getpid(), 30.0)
    assert lease["heartbeat"] == lease["started"] and len(lease["token"]) == 32
    lock.release()
    assert not (tmp_path / "bucket" / LEASE_NAME).exists()
    monkeypatch.setattr(rundir, "filesystem_type", lambda p: "ext4")
    lock = fast_lock(tmp_path / "disk", "auto").acquire()
    assert lock.held == "flock" and not (tmp_path / "disk" / LEASE_NAME).exists()
    owner = json.loads((tmp_path / "disk" / LOCK_NAME).read_text())
    assert (owner["host"], owner["pid"]) == (HOST, os.getpid())
    lock.release()


def test_flock_unsupported(tmp_path, monkeypatch):
    for code in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
        monkeypatch.setattr(rundir.fcntl, "flock",
                            lambda fd, op, code=code: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        with pytest.raises(OSError) as e:
            fast_lock(tmp_path, "flock").acquire()
        assert str(e.value) == (f"{tmp_path / LOCK_NAME}: this filesystem does not support flock "
                                f"({os.strerror(code)}); use --lock=lease")
        lock = fast_lock(tmp_path, "auto", ttl=30).acquire()  # auto falls back to a lease
        assert lock.held == "lease"
        lock.release()


def test_expired_and_live_leases(tmp_path):
    lease_path = tmp_path / LEASE_NAME

    def plant(**fields):
        record = dict(token="f" * 32, host="other-host", pid=4242, pid_namespace="pid:[1]",
                      started=time.time() - 100, heartbeat=time.time(), ttl=5.0)
        record.update(fields)
        lease_path.write_text(json.dumps(record))

    plant()  # a live lease on another machine
    with pytest.raises(RunDirLocked) as e:
        fast_lock(tmp_path, "lease", ttl=5).acquire()
    assert re.fullmatch(refusal(tmp_path, 4242, LEASE_HOW.format(ttl=5), host="other-host"), str(e.value))
    plant(heartbeat=time.time() - 6)  # its heartbeat is older than its TTL: expired, taken over
    lock = fast_lock(tmp_path, "lease", ttl=5).acquire()
    assert json.loads(lease_path.read_text())["pid"] == os.getpid()
    lock.release()
    # this machine, a process that no longer exists: expired at once, however fresh the heartbeat
    gone = subprocess.Popen(["true"])
    gone.wait()
    plant(host=HOST, pid=gone.pid, pid_namespace=os.readlink("/proc/self/ns/pid"))
    lock = fast_lock(tmp_path, "lease", ttl=5).acquire()
    assert json.loads(lease_path.read_text())["pid"] == os.getpid()
    lock.release()
    # the same pid seen from another pid namespace (another container) is not judged from here
    plant(host=HOST, pid=gone.pid, pid_namespace="pid:[1]")
    with pytest.raises(RunDirLocked):
        fast_lock(tmp_path, "lease", ttl=5).acquire()
    # a lease being written (empty) counts from its mtime
    lease_path.write_text("")
    with pytest.raises(RunDirLocked, match=r"\(host \?, pid \?, since an unknown time; lease \.medssr\.lease "
                                           r"being written or damaged, modified 0 s ago"):
        fast_lock(tmp_path, "lease", ttl=5).acquire()
    os.utime(lease_path, (time.time() - 6, time.time() - 6))
    lock = fast_lock(tmp_path, "lease", ttl=5).acquire()
    assert lock.held == "lease"
    lock.release()


def test_heartbeat_keeps_the_lease_and_a_taken_lease_stops_the_run(tmp_path):
    # a TTL of 2 s (heartbeat every 0.5 s) leaves a loaded 2-core machine slack to schedule the thread
    lock = fast_lock(tmp_path, "lease", ttl=2.0, settle=0).acquire()
    first = json.loads((tmp_path / LEASE_NAME).read_text())
    time.sleep(2.5)  # past the TTL: only the heartbeat keeps it alive
    now = json.loads((tmp_path / LEASE_NAME).read_text())
    assert now["token"] == first["token"] and now["heartbeat"] > first["heartbeat"] + 1.0
    assert not lock._expired(now)
    lock.check()  # still ours
    now.update(token="e" * 32, host="other-host", pid=999)  # another run takes it over
    rundir.write_json_atomic(tmp_path / LEASE_NAME, now)
    deadline = time.monotonic() + 10  # the next heartbeat notices
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.lost is not None and lock.lost["pid"] == 999
    with pytest.raises(RunDirLocked, match=rf"^{re.escape(str(tmp_path))}: the lease on this run directory was "
                                           rf"taken over by host other-host, pid 999, {SINCE} while this run "
                                           rf"held it; stopping$"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["pid"] == 999  # not ours to remove


def test_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"^--lock='lock': expected one of auto, flock, lease, none$"):
        fast_lock(tmp_path, "lock")
    with pytest.raises(ValueError, match=r"^--lease_ttl=0: the lease TTL must be > 0 seconds$"):
        fast_lock(tmp_path, "lease", ttl=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"^{re.escape(str(tmp_path / 'file'))}: --workdir is a file, "
                                                 rf"not a directory$"):
        fast_lock(tmp_path / "file").acquire()
    assert (tmp_path / "file").read_text() == "x"


def test_only_process_zero_takes_the_lock(tmp_path):
    votes = []

    def agree_with(main_ok):  # what broadcast_from_main gives every process: process 0's outcome
        def agree(ok):
            votes.append(ok)
            return main_ok
        return agree

    work = tmp_path / "run"
    with exclusive_run(work, "flock", main=False, agree=agree_with(True)) as lock:
        assert lock is None and not work.exists()  # the others neither create nor lock anything
    with exclusive_run(work, "flock", main=True, agree=agree_with(True)) as lock:
        assert lock.held == "flock" and votes[-1] is True
        # a second run's process 0 is refused and says so to its processes, which all stop
        with pytest.raises(RunDirLocked, match=FLOCK_HOW):
            with exclusive_run(work, "flock", main=True, agree=agree_with(False)):
                pass
        assert votes[-1] is False
        with pytest.raises(RunDirLocked, match=rf"^{re.escape(str(work))}: process 0 could not take the run "
                                               rf"directory lock \(see its log\)$"):
            with exclusive_run(work, "flock", main=False, agree=agree_with(False)):
                pass
    assert (work / LOCK_NAME).read_bytes() == b""  # released


# --- real runs of the command line -----------------------------------------------------------

def start(work: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.main", "--config=tiny", f"--workdir={work}", *args],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, [x for x in err.splitlines() if x.strip()]


def wait_for_owner(work: Path, pid: int, name: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = json.loads((work / name).read_text())
            if record.get("pid") == pid:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no run with pid {pid} took {work / name}")


def assert_manifest_matches_disk(work: Path, seed: int) -> dict:
    m = json.loads((work / "synthesize" / "manifest.json").read_text())
    synthetic = work / "synthesize" / "synthetic.jsonl"
    assert m["status"] == "done" and m["config"]["seed"] == seed
    assert m["outputs"] == {"synthetic": {"path": "synthetic.jsonl", "sha256": file_digest(synthetic)}}
    assert m["summary"]["items"] == len(synthetic.read_text().splitlines()) == 8
    assert not [p for p in work.rglob("*") if ".tmp" in p.name]
    return m


def test_two_runs_started_together_one_proceeds(tmp_path):
    """The reported race: two synthesize runs (seeds 1 and 2) on one directory at the same moment."""
    work = tmp_path / "run"
    procs = {seed: start(work, "--stage=synthesize", f"--config.seed={seed}") for seed in (1, 2)}
    results = {seed: finish(p) for seed, p in procs.items()}
    winners = [s for s, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    winner = winners[0]
    loser = 3 - winner
    rc, lines = results[loser]
    assert rc == 1 and len(lines) == 1, lines
    assert re.fullmatch(rf"synthesize: {refusal(work, procs[winner].pid, FLOCK_HOW)}", lines[0]), lines
    assert_manifest_matches_disk(work, winner)
    # and the file is exactly what that seed gives alone
    alone = tmp_path / "alone"
    rc, lines = finish(start(alone, "--stage=synthesize", f"--config.seed={winner}"))
    assert rc == 0, lines
    assert file_digest(alone / "synthesize" / "synthetic.jsonl") == file_digest(work / "synthesize" / "synthetic.jsonl")


@pytest.mark.parametrize("mode,first", [("flock", 1), ("lease", 2)])  # both orders, both modes
def test_second_run_is_refused_while_the_first_holds(tmp_path, mode, first):
    """Deterministic order: the first run is frozen (SIGSTOP) while it holds the directory."""
    work, second = tmp_path / "run", 3 - first
    owner = start(work, "--stage=synthesize", f"--config.seed={first}", f"--lock={mode}", "--lease_ttl=60")
    try:
        wait_for_owner(work, owner.pid, LOCK_NAME if mode == "flock" else LEASE_NAME)
        owner.send_signal(signal.SIGSTOP)
        before = snapshot(work)
        rc, lines = finish(start(work, "--stage=synthesize", f"--config.seed={second}", f"--lock={mode}",
                                 "--lease_ttl=60"))
        how = FLOCK_HOW  # on a local disk a lease run holds the flock as well
        assert rc == 1 and len(lines) == 1, lines
        assert re.fullmatch(rf"synthesize: {refusal(work, owner.pid, how)}", lines[0]), lines
        assert snapshot(work) == before  # the refused run touched nothing
    finally:
        owner.send_signal(signal.SIGCONT)
    rc, lines = finish(owner)
    assert rc == 0, lines
    assert_manifest_matches_disk(work, first)
    assert not (work / LEASE_NAME).exists()


@pytest.mark.slow
def test_label_runs_race(tmp_path):
    work = tmp_path / "run"
    rc, lines = finish(start(work, "--stage=synthesize"))
    assert rc == 0, lines
    owner = start(work, "--stage=label", "--config.seed=0")
    try:
        wait_for_owner(work, owner.pid, LOCK_NAME)
        owner.send_signal(signal.SIGSTOP)
        rc, lines = finish(start(work, "--stage=label", "--config.seed=0", "--config.num_votes=2"))
        assert rc == 1 and len(lines) == 1 and re.fullmatch(rf"label: {refusal(work, owner.pid, FLOCK_HOW)}",
                                                            lines[0]), lines
    finally:
        owner.send_signal(signal.SIGCONT)
    rc, lines = finish(owner)
    assert rc == 0, lines
    m = json.loads((work / "label" / "manifest.json").read_text())
    assert m["status"] == "done" and m["config"]["num_votes"] == 4  # the preset's, not the refused run's 2
    for name, out in m["outputs"].items():
        assert out["sha256"] == file_digest(work / "label" / out["path"]), name


def test_killed_owner_passes_the_directory_on(tmp_path):
    """SIGKILL: the kernel drops a flock at once; a lease of a dead process on this machine expires at
    once, and one of another machine once its heartbeat is older than its TTL."""
    work = tmp_path / "run"
    for mode in ("flock", "lease"):
        owner = start(work, "--stage=synthesize", f"--lock={mode}", "--lease_ttl=4")
        for line in owner.stderr:
            if line.startswith("synthesize: starting"):
                break
        owner.kill()
        owner.wait()
        owner.stderr.close()
        assert json.loads((work / "synthesize" / "manifest.json").read_text())["status"] == "running"
        if mode == "lease":
            assert json.loads((work / LEASE_NAME).read_text())["pid"] == owner.pid  # left behind
        rc, lines = finish(start(work, "--stage=synthesize", f"--lock={mode}", "--lease_ttl=4"))
        assert rc == 0 and "synthesize: resuming" in lines, lines
        assert_manifest_matches_disk(work, 0)
        (work / "synthesize" / "manifest.json").unlink()  # run the stage again for the next owner

    # a lease left by a killed owner on another host: refused until its TTL has passed
    owner = start(work, "--stage=synthesize", "--lock=lease", "--lease_ttl=4")
    for line in owner.stderr:
        if line.startswith("synthesize: starting"):
            break
    owner.kill()
    owner.wait()
    owner.stderr.close()
    lease = json.loads((work / LEASE_NAME).read_text())
    lease["host"] = "other-host"
    rundir.write_json_atomic(work / LEASE_NAME, lease)
    rc, lines = finish(start(work, "--stage=synthesize", "--lock=lease", "--lease_ttl=4"))
    assert rc == 1 and len(lines) == 1, lines
    how = LEASE_HOW.format(ttl=4)
    assert re.fullmatch(rf"synthesize: {refusal(work, owner.pid, how, host='other-host')}", lines[0]), lines
    time.sleep(max(0.0, lease["heartbeat"] + 4.2 - time.time()))
    rc, lines = finish(start(work, "--stage=synthesize", "--lock=lease", "--lease_ttl=4"))
    assert rc == 0 and "synthesize: resuming" in lines, lines
    assert_manifest_matches_disk(work, 0)
    assert not (work / LEASE_NAME).exists()


def test_endpoint_credentials_stay_out_of_records_and_logs(tmp_path):
    from tests.fake_openai import FakeOpenAI
    work = tmp_path / "run"
    with FakeOpenAI(schedule=None) as srv:
        url = srv.base_url.replace("http://", "http://alice:pw-4711@")
        masked = srv.base_url.replace("http://", "http://***@")
        env = cli_env(OPENAI_API_KEY="sk-run-lock-4713")
        proc = subprocess.Popen([sys.executable, "-m", "launch.main", "--stage=synthesize", "--config=tiny",
                                 f"--workdir={work}", "--config.num_questions=2", f"--config.openai_base_url={url}",
                                 "--config.synth_model=gpt-4.1-mini", "--seeds=/no/seeds.json"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rc, lines = finish(proc)
        assert rc == 1 and lines == ["synthesize: /no/seeds.json: no such file or directory (--seeds)"], lines
        proc = subprocess.Popen([sys.executable, "-m", "launch.main", "--stage=synthesize", "--config=tiny",
                                 f"--workdir={work}", "--config.num_questions=2", f"--config.openai_base_url={url}",
                                 "--config.synth_model=gpt-4.1-mini"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rc, lines = finish(proc)
        assert rc == 0, lines
    m = json.loads((work / "synthesize" / "manifest.json").read_text())
    assert m["config"]["openai_base_url"] == masked and m["status"] == "done"
    files = [p for p in work.rglob("*") if p.is_file()]
    assert work / "report.md" in files and work / "synthesize" / "synthetic.jsonl" in files
    for p in files:
        text = p.read_text(errors="replace")
        for secret in ("pw-4711", "alice", "sk-run-lock-4713"):
            assert secret not in text, (p, secret)
    assert not any(s in "\n".join(lines) for s in ("pw-4711", "sk-run-lock-4713"))


def test_run_directory_failures_are_one_named_line(tmp_path):
    not_dir = tmp_path / "a-file"
    not_dir.write_text("x")
    rc, lines = finish(start(not_dir, "--stage=synthesize"))
    assert rc == 1 and lines == [f"synthesize: {not_dir}: --workdir is a file, not a directory"], lines
    assert not_dir.read_text() == "x"
    work = tmp_path / "run"
    (work / "synthesize").mkdir(parents=True)
    (work / "synthesize" / "manifest.json").write_text('["not", "a", "manifest"]')
    rc, lines = finish(start(work, "--stage=synthesize"))
    assert rc == 1 and lines == [f"synthesize: {work / 'synthesize' / 'manifest.json'}: not a manifest (a JSON "
                                 f"list, expected an object); move the stage directory away to rerun it"], lines
    assert (work / "synthesize" / "manifest.json").read_text() == '["not", "a", "manifest"]'
    assert (work / LOCK_NAME).read_bytes() == b""  # the refused stage released the directory


@pytest.mark.multiprocess
def test_two_process_run_stops_everywhere_when_process_zero_is_refused(tmp_path):
    """Process 0 alone takes the lock; refused, it tells process 1 (broadcast), and both stop."""
    work = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    holder = fast_lock(work, "flock").acquire()
    before = snapshot(work)
    procs = [start(work, "--stage=synthesize", "--num_processes=2", f"--process_id={i}",
                   f"--coordinator_address=localhost:{port}") for i in range(2)]
    try:
        (rc0, lines0), (rc1, lines1) = finish(procs[0], timeout=180), finish(procs[1], timeout=180)
        after = snapshot(work)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        holder.release()
    assert rc0 == 1 and len(lines0) == 1, lines0
    assert re.fullmatch(rf"synthesize: {refusal(work, os.getpid(), FLOCK_HOW)}", lines0[0]), lines0
    assert rc1 == 1 and lines1 == [f"synthesize: {work}: process 0 could not take the run directory lock "
                                   f"(see its log)"], lines1
    assert after == before
    # free: process 0 takes it, both processes run the stage, and the lock is given back
    procs = [start(work, "--stage=synthesize", "--num_processes=2", f"--process_id={i}",
                   f"--coordinator_address=localhost:{port}") for i in range(2)]
    try:
        results = [finish(p, timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [rc for rc, _ in results] == [0, 0], results
    assert results[1][1] == [] and "synthesize: starting" in results[0][1]
    assert_manifest_matches_disk(work, 0)
    assert (work / LOCK_NAME).read_bytes() == b""
