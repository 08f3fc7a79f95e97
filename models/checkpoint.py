"""Load and save HF-format checkpoints (safetensors directories, GGUF files).

Loading builds the model abstractly (shapes only), then streams tensors one at
a time from disk straight into their target sharding: the host never holds
two full copies of the model.

In a run of several processes every process loads the same files and keeps
the shards of its own devices; saving gathers one tensor at a time on every
process (a collective), process 0 writes, and the others wait until the
directory is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medssr_jax import multihost
from medssr_jax.sharding import logical_to_sharding
from models import params as hf_params
from models import safetensors_io
from models.config import ModelConfig
from models.transformer import Transformer


def _get(obj, path):
    for key in path:
        obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    return obj


def param_items(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Param]]:
    """(path, Param) for every parameter, in a stable order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield tuple(path), node


def _sharding_for(var: nnx.Param, mesh: Mesh | None):
    if mesh is None:  # this process's first device (jax.devices()[0] may belong to another process)
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return logical_to_sharding(var.axes, mesh, var.shape)


def _place(host: np.ndarray, sharding) -> jax.Array:
    """Host array -> device array in its sharding; each device gets only its shard."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _reshard(x: jax.Array, sharding) -> jax.Array:
    if sharding.is_fully_addressable or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    # A process-local array onto devices of several processes: every process holds the
    # same full value (same seed or same file) and contributes the shards of its devices.
    return _place(np.asarray(x), sharding)


def abstract_model(cfg: ModelConfig, mesh: Mesh | None = None) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh))


def shard_model(model: nnx.Module, mesh: Mesh | None) -> nnx.Module:
    """Place every parameter in the sharding its logical axes map to, in place.

    The model's own `mesh` (activation sharding, the sampler's prompt sharding)
    is set to `mesh` as well, so parameters and computation agree.
    """
    for _, var in param_items(model):
        var.value = _reshard(var[...], _sharding_for(var, mesh))
    if hasattr(model, "mesh"):
        model.mesh = mesh
    return model


def init_model(cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None) -> Transformer:
    """A random-weight model (N(0, 0.02) matrices, unit norms), sharded on `mesh`."""
    return shard_model(Transformer(cfg, rngs=nnx.Rngs(seed), mesh=mesh), mesh)


def _shape_after(transform, shape: tuple, cfg: ModelConfig) -> tuple | None:
    """Shape of transform(tensor of `shape`), computed on a zero-strided view (no memory)."""
    try:
        return tuple(transform(np.broadcast_to(np.zeros((), np.int8), shape), cfg).shape)
    except ValueError:
        return None


def _place_lazy(lazy, transform, shape: tuple, dtype, sharding, cfg: ModelConfig) -> jax.Array:
    """Each device's shard read from the file on its own (safetensors get_slice); a shard
    that several devices hold (replicated axes) is read once."""
    parts: dict[tuple, np.ndarray] = {}

    def shard(index):
        key = tuple((s.start, s.stop) for s in index)
        if key not in parts:
            parts[key] = np.asarray(hf_params.read_part(transform, lazy.read, index, shape, cfg),
                                    dtype)
        return parts[key]

    return jax.make_array_from_callback(shape, sharding, shard)


def load_tensors(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray, str]],
                 mesh: Mesh | None = None, source: str = "checkpoint") -> Transformer:
    """Fill a model from (HF name, tensor, file) triples, checking every tensor.

    A tensor is a host array, or a lazy one (``shape``, ``dtype``, ``read(index)``, as
    safetensors_io.LazyTensor): a parameter sharded over several devices then reads only each
    device's part of it from the file."""
    model = abstract_model(cfg, mesh)
    expected = set(hf_params.expected_hf_names(cfg))
    seen: set[str] = set()
    for name, host, where in tensors:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        if name in seen:
            raise ValueError(f"{where}: tensor {name!r} appears twice")
        mapped = hf_params.hf_to_path(name)
        if mapped is None or name not in expected:
            raise ValueError(f"{where}: unexpected tensor {name!r} for a {cfg.family} model "
                             f"with {cfg.num_layers} layers")
        path, transform = mapped
        var = _get(model, path)
        dtype = np.dtype(host.dtype)
        if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
            raise ValueError(f"{where}: tensor {name!r} has non-float dtype {dtype}")
        shape = _shape_after(transform, tuple(host.shape), cfg)
        if shape != tuple(var.shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(host.shape)}, which does not "
                             f"fit parameter {'/'.join(map(str, path))} of shape {tuple(var.shape)}")
        sharding = _sharding_for(var, mesh)
        lazy = hasattr(host, "read") and not isinstance(host, np.ndarray)
        if lazy and not sharding.is_fully_replicated:
            var.value = _place_lazy(host, transform, shape, var.dtype, sharding, cfg)
        else:
            arr = transform(np.asarray(host.read() if lazy else host), cfg)
            var.value = _place(arr.astype(var.dtype), sharding)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {missing[:5]}{more}")
    return model


def dtype_name(value, setting: str = "dtype") -> str:
    """A floating dtype given as a name ("bfloat16"), a NumPy dtype or a JAX/NumPy scalar
    type (jnp.bfloat16, np.float32) -> its name, as configs and config.json store it."""
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt is None or not (np.issubdtype(dt, np.floating) or dt.name == "bfloat16"):
        raise ValueError(f"{setting}={value!r} is not a floating-point dtype "
                         "(for example 'float32', 'bfloat16' or jnp.bfloat16)")
    return dt.name


def from_pretrained(path: str | os.PathLike, *, dtype="float32", param_dtype=None,
                    mesh: Mesh | None = None, **config_overrides) -> tuple[Transformer, ModelConfig]:
    """Load an HF directory (config.json + safetensors) or a Llama-architecture .gguf file.

    dtype / param_dtype: compute and stored-weight dtypes, as names or JAX/NumPy dtypes.
    """
    path = Path(path)
    dtype = dtype_name(dtype, "dtype")
    param_dtype = dtype_name(param_dtype, "param_dtype") if param_dtype is not None else dtype
    overrides = dict(dtype=dtype, param_dtype=param_dtype, **config_overrides)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".gguf":
        from models import gguf
        g = gguf.GGUFFile(path)
        jinja = g.metadata.get("tokenizer.chat_template")
        cfg = ModelConfig.from_hf(gguf.hf_config_from_gguf(g), source=str(path),
                                  chat_template_text=jinja if isinstance(jinja, str) else None, **overrides)
        if "chat_template" not in config_overrides and "smollm" in str(g.metadata.get("general.name", "")).lower():
            cfg = cfg.replace(chat_template="smollm2")
        tensors = ((name, arr, str(path)) for name, arr in gguf.iter_hf_tensors(g))
        return load_tensors(cfg, tensors, mesh, str(path)), cfg
    if not path.is_dir():
        raise ValueError(f"{path}: expected an HF checkpoint directory or a .gguf file")
    hf, config_file = safetensors_io.read_config(path, "the model")
    _check_layer_count(hf, config_file, path)
    from medssr_jax.tokenizers import checkpoint_chat_template
    cfg = ModelConfig.from_hf(hf, source=str(config_file), chat_template_text=checkpoint_chat_template(path),
                              **overrides)
    tensors = ((name, t, str(f)) for name, t, f in safetensors_io.iter_lazy_tensors(path))
    return load_tensors(cfg, tensors, mesh, str(path)), cfg


def _check_layer_count(hf: dict, config_file: Path, directory: Path) -> None:
    """num_hidden_layers against the layers the checkpoint holds, before anything is built
    (a corrupt count would otherwise build a huge abstract model first)."""
    n = hf.get("num_hidden_layers", hf.get("text_config", {}).get("num_hidden_layers")
               if isinstance(hf.get("text_config"), dict) else None)
    if n is None:
        return  # ModelConfig.from_hf names the missing field
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{config_file}: num_hidden_layers must be a positive integer, got {n!r}")
    found = safetensors_io.layer_count(directory)
    if n > found:
        raise ValueError(f"{config_file}: num_hidden_layers={n}, but the checkpoint in {directory} "
                         f"holds tensors for {found} layers")


def save_pretrained(model: Transformer, config: ModelConfig, out_dir: str | os.PathLike, *,
                    dtype=None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF directory (config.json + safetensors) that transformers loads.

    Written into a temporary directory and renamed, so a crash leaves no
    half-written checkpoint. `dtype` overrides the stored dtype (default: the
    parameters' own).

    With several processes every process must call it: each tensor is gathered
    on every process (a collective), process 0 writes, and all return once the
    directory is in place (or all raise if process 0 failed to write it).
    """
    out = Path(out_dir)
    items = {hf_params.path_to_hf(path)[0]: (path, var) for path, var in param_items(model)}
    target = np.dtype(dtype_name(dtype)) if dtype is not None else None
    hf_cfg = config.to_hf()
    specs = []
    for name, (path, var) in items.items():
        shape = hf_params.path_to_hf(path)[1](np.empty(var.shape, np.int8), config).shape
        dt = target or np.dtype(var.dtype)
        specs.append((name, shape, dt))
    if target is not None:
        hf_cfg["torch_dtype"] = target.name
    if jax.process_index() != 0:
        # Take part in the gathers, in the order process 0 writes the tensors, then wait
        # for process 0's verdict; a process that stopped early would leave 0 waiting.
        for name, _, _ in specs:
            multihost.host_array(items[name][1][...])
        if not multihost.broadcast_from_main(np.int32(0)):
            raise RuntimeError(f"{out}: process 0 failed to write the checkpoint (see its log)")
        return out

    gathered = 0  # write_sharded fetches the tensors in the order of `specs`

    def fetch(name):
        nonlocal gathered
        path, var = items[name]
        host = multihost.host_array(var[...])
        gathered += 1
        return hf_params.path_to_hf(path)[1](host, config)

    written = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            safetensors_io.write_sharded(tmp, specs, fetch, max_shard_bytes)
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
            written = True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if jax.process_count() > 1:
            for name, _, _ in specs[gathered:]:  # a failed write still joins the other processes' gathers
                multihost.host_array(items[name][1][...])
            multihost.broadcast_from_main(np.int32(written))
    return out
