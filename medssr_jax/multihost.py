"""Arrays across the processes of a multi-controller JAX run.

In a run of several processes (hosts) every process executes the same program
and a jitted function takes *global* arrays: each process holds only the
shards on its own devices. These helpers are the few crossings between host
data and global arrays; with one process each reduces to a plain
device_put / device_get.

- `global_from_host`: every process holds the whole value (prompts, a seed).
- `local_rows` + `global_from_local_rows`: host-local data sharding, each
  process builds only the rows of a batch that its devices hold.
- `host_array`: the whole value of a global array, on every process (a
  collective when the array is sharded across processes).
- `barrier`: all processes reach the same point before any goes on.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Sharding


def host_array(x) -> np.ndarray:
    """The full value of `x` as a host array, on every process.

    Sharded across processes it is gathered (a collective: every process must
    call it for the same array); replicated, the local copy is read.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_from_host(value: np.ndarray, sharding: Sharding) -> jax.Array:
    """A global array from a host value that every process holds whole and alike."""
    value = np.asarray(value)
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def local_rows(sharding: Sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Indices (sorted) of the rows (first dimension) of a `global_shape` array in `sharding`
    that this process's devices hold: the rows it builds for `global_from_local_rows`."""
    n = global_shape[0]
    rows = [np.arange(n)[index[0]] for index in
            sharding.addressable_devices_indices_map(tuple(global_shape)).values()]
    return np.unique(np.concatenate(rows)) if rows else np.arange(0)


def global_from_local_rows(local: np.ndarray, sharding: Sharding,
                           global_shape: tuple[int, ...]) -> jax.Array:
    """A global array from this process's rows (`local_rows` of the sharding, in that order)."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` on every process (each passes an array of the same shape and dtype)."""
    if jax.process_count() == 1:
        return np.asarray(value)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
