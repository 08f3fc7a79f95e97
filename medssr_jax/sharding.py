"""One mesh, one rules table.

Parameters and activations carry *logical* axis names ("embed", "q_heads",
...); `ShardingRules` maps each to a physical axis of the mesh
("data", "fsdp", "tensor"). `logical_to_sharding` is the one place the two
meet, so sharding a new model is a matter of naming its axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
AxisMap = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    batch: AxisMap = ("data", "fsdp")
    sequence: AxisMap = None
    embed: AxisMap = "fsdp"
    vocab: AxisMap = "tensor"
    q_heads: AxisMap = "tensor"
    kv_heads: AxisMap = "tensor"
    head_dim: AxisMap = None
    mlp: AxisMap = "tensor"
    norm: AxisMap = None

    def physical(self, logical: str | None) -> AxisMap:
        if logical is None:
            return None
        if not hasattr(self, logical):
            raise ValueError(f"no sharding rule for logical axis {logical!r}")
        return getattr(self, logical)


DEFAULT_RULES = ShardingRules()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; -1 takes the remaining devices.

    Devices are laid out by ``jax.make_mesh`` (topology-aware: on TPU the
    innermost axes follow the physical interconnect); the axes are ``Auto``, so
    shardings are propagated by the compiler as before. Where ``jax.make_mesh``
    cannot lay a device list out (several TPU slices, a subset of a slice), the
    devices are reshaped in the order given.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"have {len(devices)}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _axis_size(mesh: Mesh, phys: AxisMap) -> int:
    if phys is None:
        return 1
    names = (phys,) if isinstance(phys, str) else phys
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES) -> P:
    """PartitionSpec for logical axes. A dimension that the mesh axis does not
    divide is replicated instead (e.g. 3 KV heads on a tensor axis of 2)."""
    spec = []
    used: set[str] = set()
    for i, name in enumerate(logical_axes):
        phys = rules.physical(name)
        names = () if phys is None else ((phys,) if isinstance(phys, str) else tuple(phys))
        names = tuple(n for n in names if n not in used)
        if mesh is not None:
            names = tuple(n for n in names if mesh.shape[n] > 1)
            if shape is not None and names and shape[i] % _axis_size(mesh, names):
                names = ()
        used.update(names)
        spec.append(None if not names else (names[0] if len(names) == 1 else names))
    while spec and spec[-1] is None:  # canonical form: P("fsdp", None) is written P("fsdp")
        spec.pop()
    return P(*spec)


def logical_to_sharding(logical_axes: Sequence[str | None], mesh: Mesh,
                        shape: Sequence[int] | None = None,
                        rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
              rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without a mesh."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(logical_axes, mesh, x.shape, rules))
