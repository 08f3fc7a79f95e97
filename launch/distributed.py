"""Multi-process JAX set-up: join the processes of one run with jax.distributed.

    initialize(coordinator_address, num_processes, process_id)

Each setting comes from its argument (the command-line flag), else from the
environment (MEDSSR_COORDINATOR_ADDRESS, MEDSSR_NUM_PROCESSES,
MEDSSR_PROCESS_ID); explicit settings always win, and MEDSSR_NUM_PROCESSES=1
runs as one process whatever the cluster. With none of them given,
`jax.distributed.initialize()` detects the cluster itself (Cloud TPU slices,
SLURM, Open MPI, GKE / Kubernetes, and JAX's own JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), so a multi-host GPU or TPU job never runs
as independent single processes; where it finds none, the run is one process.
CPU processes exchange data through gloo collectives.

Only process 0 (`is_main()`) writes logs, metrics, manifests and reports;
checkpoints are written collectively (orbax) or gathered to process 0
(models.save_pretrained).
"""

from __future__ import annotations

import os
import warnings

import jax

ENV_COORDINATOR = "MEDSSR_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MEDSSR_NUM_PROCESSES"
ENV_PROCESS_ID = "MEDSSR_PROCESS_ID"


class DistributedConfigError(ValueError):
    """Inconsistent multi-process settings; the message names the flag or variable at fault."""


def _int_setting(value: int | None, flag: str, env: str) -> tuple[int | None, str]:
    """The flag's value, else the environment variable's, with where it came from."""
    if value is not None:
        return int(value), f"--{flag}"
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None, f"--{flag}"
    try:
        return int(raw), f"${env}"
    except ValueError:
        raise DistributedConfigError(f"${env}={raw!r} is not an integer") from None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> tuple[str | None, int | None, int | None]:
    """(coordinator, num_processes, process_id) from arguments and environment, checked.

    All None: nothing was given (one process, or a TPU slice to detect). Raises
    DistributedConfigError, in one line, for settings that cannot describe a run.
    """
    coordinator = coordinator_address or os.environ.get(ENV_COORDINATOR, "").strip() or None
    coord_src = "--coordinator_address" if coordinator_address else f"${ENV_COORDINATOR}"
    num, num_src = _int_setting(num_processes, "num_processes", ENV_NUM_PROCESSES)
    pid, pid_src = _int_setting(process_id, "process_id", ENV_PROCESS_ID)
    if num is None:
        if coordinator is not None or pid is not None:
            given = coord_src if coordinator is not None else pid_src
            raise DistributedConfigError(f"{given} is set but the number of processes is not: pass "
                                         f"--num_processes or set ${ENV_NUM_PROCESSES}")
        return None, None, None
    if num < 1:
        raise DistributedConfigError(f"{num_src}={num}: the number of processes must be >= 1")
    if pid is not None and not 0 <= pid < num:
        raise DistributedConfigError(f"{pid_src}={pid} is outside [0, {num}) for {num_src}={num}")
    if num > 1:
        if pid is None:
            raise DistributedConfigError(f"{num_src}={num} needs this process's index: pass --process_id "
                                         f"or set ${ENV_PROCESS_ID}")
        if coordinator is None:
            raise DistributedConfigError(f"{num_src}={num} needs the coordinator's host:port: pass "
                                         f"--coordinator_address or set ${ENV_COORDINATOR}")
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedConfigError(f"{coord_src}={coordinator!r} is not host:port")
    return coordinator, num, (0 if pid is None else pid)


def _enable_cpu_collectives():
    """Cross-process collectives for CPU devices (gloo); a no-op for TPU and GPU backends.
    Returns a function that restores the previous setting."""
    try:
        before = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # older JAX: a boolean switch
        jax.config.update("jax_cpu_enable_gloo_collectives", True)
        return lambda: jax.config.update("jax_cpu_enable_gloo_collectives", False)
    if before in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    return lambda: jax.config.update("jax_cpu_collectives_implementation", before)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _auto_initialize() -> None:
    """jax.distributed.initialize() with JAX's own cluster detection; one process where
    it finds no cluster."""
    restore = _enable_cpu_collectives()
    try:
        jax.distributed.initialize()
    except ValueError as e:
        restore()
        # JAX's detection found no cluster environment and no JAX_COORDINATOR_ADDRESS
        if "coordinator_address" in str(e):
            return
        raise DistributedConfigError(
            f"jax.distributed.initialize() (cluster auto-detection) failed: {_first_line(e)}; pass "
            f"--num_processes/--process_id/--coordinator_address, or ${ENV_NUM_PROCESSES}=1 to run "
            "as one process") from None
    except RuntimeError as e:
        restore()
        if "before" in str(e) and "JAX" in str(e):  # the backend is already running in this process
            warnings.warn("launch.distributed.initialize() was called after JAX had started, so no "
                          "cluster was looked for; this process runs alone", RuntimeWarning, stacklevel=3)
            return
        raise DistributedConfigError(
            f"jax.distributed.initialize() (cluster auto-detection) failed: {_first_line(e)}") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start jax.distributed when more than one process takes part (no-op otherwise).

    Must run before the first JAX computation. Settings come from the arguments,
    else the MEDSSR_* environment variables; with none given, JAX's cluster
    detection decides (see the module docstring).
    """
    coordinator, num, pid = resolve(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        if num is not None and (jax.process_count(), jax.process_index()) != (num, pid):
            raise DistributedConfigError(
                f"jax.distributed is already running as process {jax.process_index()} of "
                f"{jax.process_count()}, not {pid} of {num}")
        return
    if num is None:
        _auto_initialize()
        return
    if num == 1:
        return
    _enable_cpu_collectives()
    try:
        jax.distributed.initialize(coordinator, num, pid)
    except RuntimeError as e:
        raise DistributedConfigError(f"jax.distributed.initialize({coordinator}, {num}, {pid}) failed: "
                                     f"{_first_line(e)}") from None


def is_main() -> bool:
    """True on the process that writes logs, manifests and reports."""
    return jax.process_index() == 0


CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def prefer_memory_on_cpu() -> None:
    """Turn off XLA's concurrency-optimized scheduler for CPU compilations (unless XLA_FLAGS
    already sets it). It runs independent ops early, so in a remat backward every layer's
    recomputed attention scores are live at once: for a SmolLM2-135M micro-batch of 2 x 512
    tokens the compiled update's temporaries are 3.6 GB with it and 0.6 GB without, at the
    same speed on 2 cores. XLA reads XLA_FLAGS when the first backend starts, so this runs
    before anything touches a device; the option concerns the CPU backend only."""
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in current:
        os.environ["XLA_FLAGS"] = f"{current} {CPU_SCHEDULER_FLAG}".strip()


def limit_host_fragmentation() -> None:
    """On the CPU backend, at most two glibc malloc arenas from here on (medssr_jax.hostmem):
    the pipeline's stages alternate sampling and updates whose temporaries would otherwise
    leave freed fragments in one arena per XLA thread."""
    if jax.default_backend() == "cpu":
        from medssr_jax import hostmem
        hostmem.limit_arenas(2)
