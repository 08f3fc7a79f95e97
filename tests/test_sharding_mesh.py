"""make_mesh: jax.make_mesh's device layout under the ("data", "fsdp", "tensor") axes."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from medssr_jax.sharding import MESH_AXES, logical_to_sharding, make_mesh


def test_mesh_axes_sizes_and_layout():
    assert jax.device_count() == 8
    mesh = make_mesh(2, -1, 2)
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3  # compiler-propagated shardings, as before
    ref = jax.make_mesh((2, 2, 2), MESH_AXES, (AxisType.Auto,) * 3)
    assert (mesh.devices == ref.devices).all()  # the topology-aware order of jax.make_mesh
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    sub = make_mesh(1, -1, 1, devices=jax.devices()[4:6])
    assert [d.id for d in sub.devices.flat] == [4, 5]


def test_mesh_shards_a_parameter():
    mesh = make_mesh(1, 4, 2)
    x = jax.device_put(np.arange(64.0).reshape(8, 8), logical_to_sharding(("embed", "mlp"), mesh))
    assert x.sharding.shard_shape(x.shape) == (2, 4)
    np.testing.assert_array_equal(np.asarray(x), np.arange(64.0).reshape(8, 8))


@pytest.mark.parametrize("shape, match", [
    ((3, -1, 1), r"8 devices do not divide into mesh \[3, -1, 1\]"),
    ((-1, -1, 1), "at most one mesh axis may be -1"),
    ((2, 2, 1), r"needs 4 devices, have 8"),
])
def test_mesh_errors_name_the_shape(shape, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(*shape)
