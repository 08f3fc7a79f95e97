"""Multi-process JAX set-up (stub; filled in with jax.distributed initialisation)."""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start jax.distributed when more than one process takes part (no-op otherwise)."""
    if num_processes and num_processes > 1:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main() -> bool:
    """True on the process that writes logs, manifests and reports."""
    return jax.process_index() == 0
