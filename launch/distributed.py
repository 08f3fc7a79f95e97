"""Multi-process JAX set-up: join the processes of one run with jax.distributed.

    initialize(coordinator_address, num_processes, process_id)

Each setting comes from its argument (the command-line flag), else from the
environment (MEDSSR_COORDINATOR_ADDRESS, MEDSSR_NUM_PROCESSES,
MEDSSR_PROCESS_ID). With none of them given, a Cloud TPU VM that belongs to
a multi-host slice joins its slice through `jax.distributed.initialize()`,
which reads the topology from the TPU metadata; anything else runs as one
process. CPU processes exchange data through gloo collectives.

Only process 0 (`is_main()`) writes logs, metrics, manifests and reports;
checkpoints are written collectively (orbax) or gathered to process 0
(models.save_pretrained).
"""

from __future__ import annotations

import glob
import os
import urllib.request

import jax

ENV_COORDINATOR = "MEDSSR_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MEDSSR_NUM_PROCESSES"
ENV_PROCESS_ID = "MEDSSR_PROCESS_ID"

_METADATA_URL = "http://{host}/computeMetadata/v1/instance/attributes/{key}"


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


def _tpu_metadata(key: str, timeout: float = 5.0) -> str | None:
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    req = urllib.request.Request(_METADATA_URL.format(host=host, key=key),
                                 headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode() if r.status == 200 else None
    except OSError:
        return None


def _has_tpu_chips() -> bool:
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def tpu_slice_hosts() -> int:
    """Hosts in this Cloud TPU slice (times the slices of a multislice run); 0 off a TPU VM.

    GKE and multislice set TPU_WORKER_HOSTNAMES / MEGASCALE_NUM_SLICES; a TPU VM
    created directly lists its workers in the GCE metadata.
    """
    if os.environ.get("TPU_SKIP_MDS_QUERY") is not None:
        return 0
    workers = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    if workers is None:
        if not _has_tpu_chips():
            return 0
        workers = _tpu_metadata("worker-network-endpoints")
        if workers is None:
            return 0
    slices = os.environ.get("MEGASCALE_NUM_SLICES", "").strip()
    return len([w for w in workers.split(",") if w.strip()]) * (int(slices) if slices.isdigit() else 1)


def _enable_cpu_collectives() -> None:
    """Cross-process collectives for CPU devices (gloo); a no-op for TPU and GPU backends."""
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # older JAX: a boolean switch
        jax.config.update("jax_cpu_enable_gloo_collectives", True)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start jax.distributed when more than one process takes part (no-op otherwise).

    Must run before the first JAX computation. Settings come from the arguments,
    else the MEDSSR_* environment variables; with none given, a multi-host Cloud
    TPU slice is detected and joined.
    """
    coordinator, num, pid = resolve(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        if num is not None and (jax.process_count(), jax.process_index()) != (num, pid):
            raise DistributedConfigError(
                f"jax.distributed is already running as process {jax.process_index()} of "
                f"{jax.process_count()}, not {pid} of {num}")
        return
    if num is None:
        hosts = tpu_slice_hosts()
        if hosts > 1:
            jax.distributed.initialize()  # the TPU cluster detection fills in every setting
        return
    if num == 1:
        return
    _enable_cpu_collectives()
    try:
        jax.distributed.initialize(coordinator, num, pid)
    except RuntimeError as e:
        raise DistributedConfigError(f"jax.distributed.initialize({coordinator}, {num}, {pid}) failed: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def is_main() -> bool:
    """True on the process that writes logs, manifests and reports."""
    return jax.process_index() == 0
