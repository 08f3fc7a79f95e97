"""Multi-host support: rl_self as two JAX processes on localhost equals one process.

The pipeline runs through its real command line (`python -m launch.main`) in
subprocesses, each with its own XLA_FLAGS:

- 2 processes x 1 CPU device, joined by jax.distributed (gloo collectives);
- 1 process x 2 emulated CPU devices: the same (1, 2, 1) mesh in one process;
- 1 process x 1 device.

The two-process run computes the same SPMD program as the one-process mesh
run (a sum over two shards is exact whichever process adds it), so their
parameters agree to 1e-6. The single-device run sums in another order; see
`test_one_device_matches_within_fp32_round_off` for its tolerance.

A random tiny model never writes a readable answer, so every reward would be 0
and the comparison vacuous. The policy here is a tiny random Qwen3 whose
embedding and output head are biased into a bigram pattern: after a prompt it
writes "[X][Y][Z]..." with the letters drawn at random, so the extracted answer
(the last "[X]") matches the label one time in about five and the groups'
rewards differ; the test checks that the steps really moved the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch import distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
LEARNING_RATE = 1e-5  # the tiny preset's GRPO learning rate
TIMEOUT_S = 240       # per command: a hang fails the test instead of stalling CI

pytestmark = pytest.mark.multiprocess


# --- helpers -----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDSSR_COORDINATOR", "MEDSSR_NUM_PROCESSES", "MEDSSR_PROCESS_ID"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    return env


def _cli(stage: str, workdir: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launch.main", f"--stage={stage}", "--config=tiny",
            f"--workdir={workdir}", f"--model={model}", *extra]


def _run(cmd: list[str], devices: int, log: Path) -> None:
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=_env(devices), stdout=out, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd[3:])} did not finish in {TIMEOUT_S}s; log: {log}")
    assert rc == 0, f"{' '.join(cmd[3:])} exited with {rc}:\n{log.read_text()[-3000:]}"


def _run_processes(cmd: list[str], n: int, logs: list[Path]) -> None:
    """n processes of `cmd` joined on a free localhost port; if one fails the others are stopped."""
    address = f"localhost:{_free_port()}"
    procs = []
    for i in range(n):
        with open(logs[i], "w") as out:
            procs.append(subprocess.Popen(
                cmd + [f"--coordinator_address={address}", f"--num_processes={n}", f"--process_id={i}"],
                cwd=REPO, env=_env(1), stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    try:
        # a process that fails leaves the others waiting in a collective: stop them at once
        while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"--- process {i} (exit {p.returncode}):\n{logs[i].read_text()[-2000:]}"
                      for i, p in enumerate(procs))
    assert not timed_out, f"{n} processes did not finish in {TIMEOUT_S}s:\n{tails}"
    assert all(p.returncode == 0 for p in procs), f"a process failed:\n{tails}"


def _bigram_policy(out: Path) -> Path:
    """A tiny random Qwen3 (+ byte tokenizer) biased to write "[X][Y]..." after any prompt."""
    import jax.numpy as jnp

    import models
    from medssr_jax.tokenizers import byte_tokenizer
    cfg = models.preset("tiny", tie_word_embeddings=False, max_position_embeddings=4096)
    model = models.init_model(cfg, seed=0)
    open_, close, letters = ord("["), ord("]"), [ord(c) for c in "ABCDE"]
    # token class -> embedding dimension 0..3; the head maps each class to what follows it
    token_class = np.full(cfg.vocab_size, 3)
    token_class[open_], token_class[letters], token_class[close] = 0, 1, 2
    emb = np.array(model.embed_vd[...])
    emb[np.arange(cfg.vocab_size), token_class] += 1.0
    head = np.array(model.lm_head_dv[...])
    head[0, letters] += 1.5   # after "[": a letter, each about equally likely
    head[1, close] += 1.5     # after a letter: "]"
    head[2, open_] += 1.5     # after "]": "["
    head[3, open_] += 1.5     # after any other token (the prompt's end): "["
    model.embed_vd.value, model.lm_head_dv.value = jnp.asarray(emb), jnp.asarray(head)
    models.save_pretrained(model, cfg, out)
    byte_tokenizer().save_pretrained(out)
    return out


def _params(model_dir: Path) -> dict[str, np.ndarray]:
    from models import safetensors_io
    return {name: arr for name, arr, _ in safetensors_io.iter_tensors(model_dir)}


def _max_abs_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The prepared run directory and rl_self run three ways; returns their directories."""
    root = tmp_path_factory.mktemp("multiprocess")
    model = _bigram_policy(root / "policy")
    base = root / "base"
    for stage in ("synthesize", "label"):
        _run(_cli(stage, base, model), 1, root / f"{stage}.log")
    # Every item kept, labelled with its intended answer (the manifests chain by manifest
    # hash, so rewriting the file keeps the label stage "done"). The texts are shortened so
    # that byte-token prompts fit the tiny preset's max_prompt_len (256) with room to spare.
    votes = [json.loads(x) for x in (base / "label" / "pseudo_label_votes.jsonl").read_text().splitlines() if x]
    assert votes
    with open(base / "label" / "pseudo_labelled.jsonl", "w") as f:
        for r in votes:
            short = dict(question=r["question"][:32], options={k: v[:6] for k, v in r["options"].items()})
            f.write(json.dumps(dict(r, **short, label=r["intended_answer"], kept=True, confidence=1.0)) + "\n")

    out = {"policy": model}
    rl_self = lambda w: _cli("rl_self", w, model, f"--config.rl_self.steps={STEPS}")  # noqa: E731
    for name in ("two_processes", "one_process_two_devices", "one_device"):
        shutil.copytree(base, root / name)
        out[name] = root / name
    _run_processes(rl_self(out["two_processes"]), 2,
                   [root / "two_processes.p0.log", root / "two_processes.p1.log"])
    _run(rl_self(out["one_process_two_devices"]), 2, root / "one_process_two_devices.log")
    _run(rl_self(out["one_device"]), 1, root / "one_device.log")
    out["logs"] = root
    return out


# --- the pipeline across processes -----------------------------------------------

def test_two_processes_equal_one_process_on_the_same_mesh(runs):
    two = _params(runs["two_processes"] / "rl_self" / "model")
    one = _params(runs["one_process_two_devices"] / "rl_self" / "model")
    start = _params(runs["policy"])
    # the comparison is not vacuous: the rewards differed within groups and the weights moved
    history = json.loads((runs["two_processes"] / "rl_self" / "history.json").read_text())
    assert len(history) == STEPS and any(h["grad_norm"] > 0 for h in history), history
    assert _max_abs_diff(two, start) > LEARNING_RATE / 2
    assert _max_abs_diff(two, one) <= 1e-6


def test_one_device_matches_within_fp32_round_off(runs):
    """One device sums the batch and the sharded matmuls in another order, so the
    gradients differ by float32 round-off (~1e-7 relative). Adam divides each
    gradient by its own running RMS: where a gradient is itself round-off (a
    token or weight the batch barely touches), the normalised update can change
    by up to its full size, lr, per step. So parameters may differ by at most
    2 * lr per step (a sign flip), and almost all far less."""
    two = _params(runs["two_processes"] / "rl_self" / "model")
    single = _params(runs["one_device"] / "rl_self" / "model")
    start = _params(runs["policy"])
    bound = 2 * LEARNING_RATE * STEPS
    assert _max_abs_diff(two, single) <= bound
    moved = sum(int((np.abs(two[k] - start[k]) > LEARNING_RATE / 10).sum()) for k in two)
    off = sum(int((np.abs(two[k].astype(np.float64) - single[k]) > 1e-3 * LEARNING_RATE).sum()) for k in two)
    assert off <= 0.01 * moved, f"{off} of {moved} moved weights differ by more than 1e-3 lr"


def test_process_zero_alone_writes_logs_and_metrics(runs):
    run = runs["two_processes"] / "rl_self"
    rows = [json.loads(x) for x in (run / "metrics" / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert len(list((run / "metrics").glob("events.out.tfevents.*"))) == 1
    # the orbax checkpoint was written by both processes together and is complete
    assert (run / "checkpoints" / str(STEPS)).is_dir()
    p0 = (runs["logs"] / "two_processes.p0.log").read_text()
    p1 = (runs["logs"] / "two_processes.p1.log").read_text()
    assert f"step {STEPS}/{STEPS}" in p0 and "step 1/" not in p1
    # the same metrics as the one-process run on the same mesh
    ref = [json.loads(x) for x in (runs["one_process_two_devices"] / "rl_self" / "metrics" / "metrics.jsonl")
           .read_text().splitlines() if x]
    for a, b in zip(rows, ref):
        for k in ("reward_mean", "reward_std", "response_length", "loss", "grad_norm", "kl", "entropy"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_two_processes_resume_from_their_checkpoint(runs, tmp_path):
    """An interrupted rl_self (manifest still "running", no model yet) rerun as two processes
    restores the last orbax checkpoint collectively and saves exactly the trained weights."""
    work = tmp_path / "resumed"
    shutil.copytree(runs["two_processes"], work)
    manifest = work / "rl_self" / "manifest.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), status="running")))
    shutil.rmtree(work / "rl_self" / "model")
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    _run_processes(_cli("rl_self", work, runs["policy"], f"--config.rl_self.steps={STEPS}"), 2, logs)
    resumed = _params(work / "rl_self" / "model")
    trained = _params(runs["two_processes"] / "rl_self" / "model")
    assert _max_abs_diff(resumed, trained) == 0.0


# --- settings ---------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_from_flags_then_environment(clean_env):
    assert distributed.resolve() == (None, None, None)
    assert distributed.resolve("h:1", 2, 1) == ("h:1", 2, 1)
    assert distributed.resolve(None, 1, None) == (None, 1, 0)
    clean_env.setenv(distributed.ENV_COORDINATOR, "10.0.0.2:8476")
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "4")
    clean_env.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.resolve() == ("10.0.0.2:8476", 4, 3)
    assert distributed.resolve("h:9", None, 0) == ("h:9", 4, 0)  # a flag wins over its variable


@pytest.mark.parametrize("args, env, match", [
    (("h:1", 2, 2), {}, r"--process_id=2 is outside \[0, 2\) for --num_processes=2"),
    (("h:1", 2, None), {}, r"--num_processes=2 needs this process's index"),
    ((None, 2, 0), {}, r"--num_processes=2 needs the coordinator's host:port"),
    (("h:1", None, None), {}, r"--coordinator_address is set but the number of processes is not"),
    ((None, None, 1), {}, r"--process_id is set but the number of processes is not"),
    (("nohostport", 2, 0), {}, r"'nohostport' is not host:port"),
    ((None, 0, None), {}, r"--num_processes=0: the number of processes must be >= 1"),
    ((None, None, None), {"MEDSSR_NUM_PROCESSES": "two"}, r"\$MEDSSR_NUM_PROCESSES='two' is not an integer"),
    ((None, None, None), {"MEDSSR_NUM_PROCESSES": "2", "MEDSSR_PROCESS_ID": "5",
                          "MEDSSR_COORDINATOR_ADDRESS": "h:1"},
     r"\$MEDSSR_PROCESS_ID=5 is outside \[0, 2\) for \$MEDSSR_NUM_PROCESSES=2"),
])
def test_inconsistent_settings_fail_in_one_line(clean_env, args, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(distributed.DistributedConfigError, match=match) as e:
        distributed.resolve(*args)
    assert "\n" not in str(e.value)


def test_single_process_settings_start_nothing(clean_env):
    import jax
    distributed.initialize(None, 1, 0)
    jax.devices()  # JAX is running: too late to look for a cluster, and said so
    with pytest.warns(RuntimeWarning, match="after JAX had started"):
        distributed.initialize()
    assert jax.process_count() == 1 and distributed.is_main()


def test_no_cluster_runs_as_one_process():
    """A fresh process with no settings and no cluster around: one process, no warning."""
    env = {k: v for k, v in _env(1).items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR",
                                                                   "KUBERNETES_", "TPU_"))}
    out = subprocess.run([sys.executable, "-W", "error", "-c",
                          "from launch import distributed; distributed.initialize(); import jax; "
                          "print('processes', jax.process_count(), jax.distributed.is_initialized())"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "processes 1 False" in out.stdout


class _FakeInitialize:
    """Stands in for jax.distributed.initialize and records how it was called."""

    def __init__(self, error=None):
        self.calls, self.error = [], error

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error


def test_without_settings_jax_detects_the_cluster(clean_env):
    import jax
    clean_env.setattr(jax.distributed, "is_initialized", lambda: False)
    fake = _FakeInitialize()
    clean_env.setattr(jax.distributed, "initialize", fake)
    distributed.initialize()
    assert fake.calls == [((), {})]  # no arguments: JAX's own detection fills every setting
    # no cluster found (JAX's message when nothing was detected): one process
    none_found = _FakeInitialize(ValueError("coordinator_address should be defined."))
    clean_env.setattr(jax.distributed, "initialize", none_found)
    distributed.initialize()
    assert len(none_found.calls) == 1
    # a cluster found but unusable: one line naming the way out
    broken = _FakeInitialize(ValueError("Number of processes must be defined."))
    clean_env.setattr(jax.distributed, "initialize", broken)
    with pytest.raises(distributed.DistributedConfigError,
                       match=r"cluster auto-detection\) failed: Number of processes.*MEDSSR_NUM_PROCESSES=1"):
        distributed.initialize()
    # explicit settings win: no detection
    explicit = _FakeInitialize()
    clean_env.setattr(jax.distributed, "initialize", explicit)
    distributed.initialize("h:1", 2, 1)
    distributed.initialize(None, 1, 0)
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "1")
    distributed.initialize()
    assert explicit.calls == [(("h:1", 2, 1), {})]


def test_slurm_job_joins_without_flags(tmp_path):
    """Two processes that see only SLURM's variables (as srun sets them) join one run."""
    port = _free_port()
    script = ("from launch import distributed; distributed.initialize(); import jax; "
              "from jax.experimental import multihost_utils as mu; import numpy as np; "
              "total = mu.process_allgather(np.array([jax.process_index() + 1])).sum(); "
              "print('joined', jax.process_count(), jax.process_index(), int(total), flush=True)")
    procs = []
    for i in range(2):
        env = _env(1) | dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                             SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-2000:]
        assert f"joined 2 {i} 3" in out, out[-2000:]
