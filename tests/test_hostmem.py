"""glibc allocator settings of CPU runs (medssr_jax.hostmem)."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from medssr_jax import hostmem

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_trim")


@glibc
def test_freed_heap_memory_goes_back_to_the_system():
    assert hostmem.limit_arenas(2) is True
    blocks = [np.ones(2048, np.uint8) for _ in range(50_000)]  # 100 MB of heap blocks below mmap's threshold
    assert sum(b.nbytes for b in blocks) == 50_000 * 2048
    del blocks
    assert hostmem.release_free_memory() is True


def test_without_glibc_both_calls_do_nothing(monkeypatch):
    monkeypatch.setattr(hostmem, "_libc", lambda: None)
    assert hostmem.limit_arenas(2) is False and hostmem.release_free_memory() is False
