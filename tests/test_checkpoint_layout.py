"""GRPO checkpoints: one orbax composite per step with named items, readable by orbax alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import models
from rl.loop import Checkpointer, named_tree
from rl.train_step import OptimConfig, TrainState, init_train_state, make_optimizer

TX = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10))


def _state(seed: int) -> TrainState:
    """A tiny model's train state with every leaf distinct (moments and count filled in)."""
    _, state = init_train_state(models.init_model(models.preset("tiny"), seed=seed), TX)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    noisy = jax.tree.map(lambda x: x + jax.random.normal(next(keys), x.shape).astype(x.dtype)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x + 7, state)
    return noisy._replace(step=jnp.asarray(5, jnp.int32))


def _assert_same(a: TrainState, b: TrainState) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_round_trips_and_reads_without_this_code(tmp_path):
    state = _state(0)
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, keep=2)
    ckpt.save(5, state, force=True)
    ckpt.close()
    step_dir = tmp_path / "ckpt" / "5"
    assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == ["opt_state", "params", "step"]

    # orbax alone, no target, no code of this project: names, not numbered leaves
    params = ocp.StandardCheckpointer().restore(step_dir / "params")
    assert set(params) == set(named_tree(state.params)) >= {"embed_vd", "final_norm", "layers"}
    np.testing.assert_array_equal(params["embed_vd"], np.asarray(state.params["embed_vd"].value))
    np.testing.assert_array_equal(params["layers"]["1"]["q_dnh"], np.asarray(state.params["layers"][1]["q_dnh"].value))
    opt = ocp.StandardCheckpointer().restore(step_dir / "opt_state")
    adam = opt["1"]["0"]  # chain(clip_by_global_norm, adamw(scale_by_adam, ...))
    assert set(adam) == {"count", "mu", "nu"}
    np.testing.assert_array_equal(adam["nu"]["embed_vd"], np.asarray(state.opt_state[1][0].nu["embed_vd"].value))
    assert int(ocp.StandardCheckpointer().restore(step_dir / "step")["step"]) == 5

    # and back into the train state, leaf for leaf
    like = _state(1)
    restored = Checkpointer(tmp_path / "ckpt", every=1, keep=2).restore(5, like)
    _assert_same(restored, state)


def test_checkpoints_of_the_numbered_layout_still_restore(tmp_path):
    """Run directories written before the named layout resume: one item of numbered leaves."""
    state = _state(2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.StandardSave({str(i): x for i, x in enumerate(jax.tree.leaves(state))}))
    manager.wait_until_finished()
    manager.close()
    assert (tmp_path / "ckpt" / "3" / "default").is_dir()
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, keep=2)
    assert ckpt.latest_step() == 3
    _assert_same(ckpt.restore(3, _state(3)), state)
    ckpt.save(4, _state(4), force=True)  # the resumed run goes on in its directory's layout
    ckpt.close()
    assert (tmp_path / "ckpt" / "4" / "default").is_dir()
    _assert_same(Checkpointer(tmp_path / "ckpt", every=1, keep=2).restore(4, state), _state(4))
