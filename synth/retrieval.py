"""Dense retrieval: embed documents with a BERT encoder, index them with ScaNN, retrieve by text.

* `embed_corpus` embeds ``{id, title, text}`` documents in jitted batches, shows
  progress on stderr (a tqdm bar on a terminal, docs/s lines otherwise), and with `out_dir` writes resumable shards
  (``shard_00000.npy`` + ``shard_00000.ids.json``): a restarted run skips every
  shard already written for the same documents and settings.
* `load_embeddings` reads precomputed embeddings (one .npy + ids as JSON list or
  one per line), e.g. MedCPT's released PubMed embeddings
  (``embeds_chunk_*.npy`` / ``pmids_chunk_*.json``); `load_embedding_shards`
  reads an `embed_corpus` output directory.
* `Index` wraps a ScaNN searcher: exact (brute force) for small corpora, tree +
  asymmetric hashing + exact reordering for large ones, with parameters derived
  from the corpus size. If scann is not installed, search falls back to exact
  numpy search behind the same API (with a warning saying so).
* `Retriever` ties a query encoder, its tokenizer, an index and the documents
  together: ``retrieve(text, k) -> [(doc, score), ...]``.

Scores are inner products ("dot_product", the default: MedCPT, and cosine for
L2-normalised embeddings such as MiniLM's) or negative squared L2 distances.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from medssr_jax.atomic import atomic_open, write_text_atomic
from medssr_jax.progress import progress_bar

__all__ = [
    "embed_texts", "embed_corpus", "doc_text", "load_embeddings", "load_embedding_shards",
    "exact_search", "Index", "Retriever", "have_scann", "tree_ah_params",
]

BRUTE_FORCE_MAX = 20_000  # ScaNN's guidance: below ~20k points brute force is fast and exact
METHODS = ("auto", "brute_force", "tree_ah")
METRICS = ("dot_product", "squared_l2")
SHARD_RE = re.compile(r"^shard_(\d{5})\.npy$")


def have_scann() -> bool:
    try:
        import scann  # noqa: F401
    except ImportError:
        return False
    return True


def _scann():
    import scann
    return scann.scann_ops_pybind


# --- embedding ------------------------------------------------------------------

def doc_text(doc: Mapping) -> str:
    """The text embedded for a document: its text, prefixed by the title unless it already starts with it."""
    title, text = (doc.get("title") or "").strip(), doc["text"]
    return text if not title or text.startswith(title) else f"{title}. {text}"


def _token_ids(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids with special tokens, truncated to max_len (keeping the final [SEP])."""
    if hasattr(tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer`
        encs = tokenizer.encode_batch(list(texts))
        out = [e.ids for e in encs]
    else:  # a transformers tokenizer
        out = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [ids if len(ids) <= max_len else ids[:max_len - 1] + ids[-1:] for ids in out]


def _pad_to(n: int, multiple: int, cap: int) -> int:
    return min(cap, max(multiple, -(-n // multiple) * multiple))


def _batch_bucket(n: int, batch_size: int) -> int:
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


def _replicate(encoder, mesh):
    """The encoder's parameters copied to every device of the mesh (it is small)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    graphdef, state = nnx.split(encoder)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return nnx.merge(graphdef, state)


def embed_texts(encoder, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_len: int = 256,
                pooling: str = "cls", normalize: bool = False, pad_id: int = 0, mesh=None) -> np.ndarray:
    """[N, D] float32 embeddings of `texts` with a `models.bert` encoder.

    Texts are sorted by length so each batch pads little; lengths are padded to a
    multiple of 16 and batches to a power of two, so few shapes are compiled.
    With a `mesh`, each batch is split over its ("data", "fsdp") devices and the
    encoder is replicated.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from models import bert
    shards = 1
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        encoder = _replicate(encoder, mesh)
        batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    if max_len > encoder.config.max_position_embeddings:
        raise ValueError(f"max_len {max_len} exceeds the encoder's {encoder.config.max_position_embeddings} positions")
    n = len(texts)
    out = np.zeros((n, encoder.config.hidden_size), np.float32)
    if n == 0:
        return out
    ids = _token_ids(tokenizer, texts, max_len)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        t = _pad_to(max(len(ids[i]) for i in rows), 16, max_len)
        b = -(-_batch_bucket(len(rows), batch_size) // shards) * shards
        tok = np.full((b, t), pad_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        for j, i in enumerate(rows):
            tok[j, :len(ids[i])] = ids[i]
            mask[j, :len(ids[i])] = 1
        mask[len(rows):, 0] = 1  # padding rows attend to one token, so nothing divides by zero
        if mesh is not None:
            tok, mask = (jax.device_put(x, batch_sharding) for x in (tok, mask))
        emb = bert.encode(encoder, tok, mask, pooling=pooling, normalize=normalize)
        out[rows] = np.asarray(emb)[:len(rows)]
    return out


class _Progress:
    """Embedding progress: a tqdm bar when stderr is a terminal and the total is known,
    else a throughput line every ``every_s`` seconds (and one at the end)."""

    def __init__(self, total: int | None, every_s: float = 5.0, stream=None):
        self.total, self.every_s, self.stream = total, every_s, stream or sys.stderr
        self.start = self.last = time.perf_counter()
        self.done = self.skipped = 0
        self.bar = progress_bar(total, "embed", unit="doc", stream=self.stream)

    def update(self, embedded: int = 0, skipped: int = 0, force: bool = False):
        self.done += embedded
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(embedded + skipped)
            if self.skipped:
                self.bar.set_postfix(from_finished_shards=self.skipped, refresh=False)
            if force:
                self.bar.close()
            return
        now = time.perf_counter()
        if force or now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            total = f"/{self.total}" if self.total is not None else ""
            skip = f", {self.skipped} from finished shards" if self.skipped else ""
            print(f"embed: {self.done + self.skipped}{total} docs ({rate:.1f} docs/s{skip})",
                  file=self.stream, flush=True)


def _settings_key(encoder, pooling, normalize, max_len, texts: Sequence[str]) -> str:
    cfg = encoder.config
    h = hashlib.sha256(json.dumps([cfg.num_layers, cfg.hidden_size, cfg.vocab_size, pooling,
                                   bool(normalize), max_len]).encode())
    # a cheap fingerprint of the weights: the first row of the word embeddings
    h.update(np.asarray(encoder.word_emb[...][:1], np.float32).tobytes())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def embed_corpus(encoder, tokenizer, docs: Iterable[Mapping], *, batch_size: int = 64, max_len: int = 256,
                 pooling: str = "cls", normalize: bool = False, out_dir: str | os.PathLike | None = None,
                 shard_size: int = 4096, progress: bool = True, text_fn=doc_text, mesh=None
                 ) -> tuple[np.ndarray, list[str]]:
    """Embed documents -> ([N, D] float32, ids), streaming `docs` one shard at a time.

    With `out_dir`, shard i is written as ``shard_{i:05d}.npy`` and
    ``shard_{i:05d}.ids.json`` (ids and a fingerprint of the texts, model and
    settings), each atomically. Rerunning with the same documents reuses every
    finished shard, so an interrupted run resumes where it stopped; a shard whose
    fingerprint differs is recomputed. Progress goes to stderr (see `_Progress`);
    ``progress=False`` silences it.
    """
    total = len(docs) if hasattr(docs, "__len__") else None
    prog = _Progress(total) if progress else None
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    it = iter(docs)
    all_emb, all_ids, seen = [], [], set()
    for shard in itertools.count():
        batch = list(itertools.islice(it, shard_size))
        if not batch:
            break
        ids = [str(d["id"]) for d in batch]
        for i in ids:
            if i in seen:
                raise ValueError(f"duplicate document id {i!r}")
            seen.add(i)
        texts = [text_fn(d) for d in batch]
        emb = None
        if out is not None:
            npy, meta = out / f"shard_{shard:05d}.npy", out / f"shard_{shard:05d}.ids.json"
            key = _settings_key(encoder, pooling, normalize, max_len, texts)
            if npy.is_file() and meta.is_file():
                try:
                    m = json.loads(meta.read_text())
                    if m.get("ids") == ids and m.get("fingerprint") == key:
                        emb = np.load(npy)
                        if emb.shape != (len(ids), encoder.config.hidden_size):
                            emb = None
                except (json.JSONDecodeError, ValueError, OSError):
                    emb = None
            if emb is not None:
                if prog:
                    prog.update(skipped=len(ids))
        if emb is None:
            parts = []
            for s in range(0, len(texts), batch_size * 8):  # report progress within a shard
                parts.append(embed_texts(encoder, tokenizer, texts[s:s + batch_size * 8],
                                         batch_size=batch_size, max_len=max_len, pooling=pooling,
                                         normalize=normalize, mesh=mesh))
                if prog:
                    prog.update(embedded=len(parts[-1]))
            emb = np.concatenate(parts)
            if out is not None:
                with atomic_open(npy, "wb") as f:  # the metadata last: it vouches for the embeddings
                    np.save(f, emb)
                write_text_atomic(meta, json.dumps({"ids": ids, "fingerprint": key}))
        all_emb.append(emb)
        all_ids.extend(ids)
    if prog:
        prog.update(force=True)
    if not all_emb:
        return np.zeros((0, encoder.config.hidden_size), np.float32), []
    return np.concatenate(all_emb), all_ids


def _read_ids(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if isinstance(obj, dict) and "ids" in obj:
            obj = obj["ids"]
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a JSON list of ids")
        return [str(x) for x in obj]
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_embeddings(npy: str | os.PathLike, ids_file: str | os.PathLike, *, mmap: bool = False
                    ) -> tuple[np.ndarray, list[str]]:
    """Precomputed embeddings ([N, D] .npy) and their ids (JSON list, or one id per line).

    E.g. MedCPT's PubMed release: ``load_embeddings("embeds_chunk_0.npy", "pmids_chunk_0.json")``.
    """
    npy, ids_file = Path(npy), Path(ids_file)
    emb = np.load(npy, mmap_mode="r" if mmap else None)
    if emb.ndim != 2:
        raise ValueError(f"{npy}: expected a 2-D [num_docs, dim] array, got shape {emb.shape}")
    ids = _read_ids(ids_file)
    if len(ids) != emb.shape[0]:
        raise ValueError(f"{ids_file} has {len(ids)} ids but {npy} has {emb.shape[0]} rows")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{ids_file}: ids are not unique")
    if not mmap and emb.dtype != np.float32:
        emb = emb.astype(np.float32)
    return emb, ids


def load_embedding_shards(out_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """All shards of an `embed_corpus` directory, in order."""
    out = Path(out_dir)
    shards = sorted(p for p in out.iterdir() if SHARD_RE.match(p.name))
    if not shards:
        raise FileNotFoundError(f"{out}: no shard_*.npy files")
    parts = [load_embeddings(p, p.with_suffix(".ids.json")) for p in shards]
    return np.concatenate([e for e, _ in parts]), [i for _, ids in parts for i in ids]


# --- search -------------------------------------------------------------------------

def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int, metric: str = "dot_product",
                 block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with numpy: (indices [Q, k] int64, scores [Q, k] float32), best first."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    n = embeddings.shape[0]
    k = min(k, n)
    best_i = np.zeros((len(queries), 0), np.int64)
    best_s = np.zeros((len(queries), 0), np.float32)
    for start in range(0, n, block):
        db = np.asarray(embeddings[start:start + block], np.float32)
        s = queries @ db.T
        if metric == "squared_l2":
            s = 2 * s - (db * db).sum(1)[None] - (queries * queries).sum(1)[:, None]
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_i = np.concatenate([best_i, top + start], 1)
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        if best_i.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_i, best_s = np.take_along_axis(best_i, keep, 1), np.take_along_axis(best_s, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1).astype(np.float32)


def tree_ah_params(n: int) -> dict:
    """Tree-AH parameters from the corpus size: ~sqrt(n) leaves, ~10% of them searched but
    at least 40 (or all of them), the top 100 AH candidates re-scored exactly.

    The floor matters for small corpora: on the 4,281 HPO profiles (65 leaves)
    searching 6 leaves gave recall@10 0.72 against exact search, 40 leaves 0.97.
    """
    num_leaves = max(2, min(n, int(round(math.sqrt(n)))))
    to_search = min(num_leaves, max(40, int(round(num_leaves / 10))))
    return {"num_leaves": num_leaves, "num_leaves_to_search": to_search,
            "reorder": 100, "training_sample_size": min(n, 250_000), "dims_per_block": 2,
            "anisotropic_quantization_threshold": 0.2, "spherical": False, "soar_lambda": None}


class Index:
    """Nearest-neighbour index over embeddings with string ids. Build with `Index.build`."""

    def __init__(self, ids: Sequence[str], method: str, metric: str, params: dict, dim: int,
                 searcher=None, embeddings: np.ndarray | None = None):
        self.ids = np.asarray(list(ids), dtype=object)
        self.method, self.metric, self.params, self.dim = method, metric, dict(params), dim
        self._searcher, self._embeddings = searcher, embeddings

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def backend(self) -> str:
        return "scann" if self._searcher is not None else "numpy"

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: Sequence[str], *, method: str = "auto",
              metric: str = "dot_product", brute_force_max: int = BRUTE_FORCE_MAX, **params) -> "Index":
        """Index `embeddings` [N, D] under `ids`.

        method "auto" is "brute_force" up to `brute_force_max` points and "tree_ah"
        above. Tree-AH parameters default to `tree_ah_params(N)`; any of them
        (num_leaves, num_leaves_to_search, reorder, training_sample_size,
        dims_per_block, anisotropic_quantization_threshold, spherical k-means,
        soar_lambda for SOAR spilling) can be overridden.
        """
        emb = np.ascontiguousarray(np.asarray(embeddings, np.float32))
        ids = [str(i) for i in ids]
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {emb.shape}")
        if len(ids) != emb.shape[0]:
            raise ValueError(f"{len(ids)} ids for {emb.shape[0]} embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError("ids are not unique")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
        n, d = emb.shape
        if method == "auto":
            method = "brute_force" if n <= brute_force_max else "tree_ah"
        p = tree_ah_params(n) if method == "tree_ah" else {}
        unknown = set(params) - set(tree_ah_params(2))
        if unknown:
            raise ValueError(f"unknown index parameters {sorted(unknown)}")
        if method == "brute_force" and params:
            raise ValueError(f"brute_force takes no parameters, got {sorted(params)}")
        p.update(params)
        if method == "tree_ah" and not 1 <= p["num_leaves_to_search"] <= p["num_leaves"] <= n:
            raise ValueError(f"need 1 <= num_leaves_to_search <= num_leaves <= N, got {p} for N={n}")
        if not have_scann():
            warnings.warn("scann is not installed (pip install scann, Linux x86_64/aarch64 and macOS "
                          f"arm64); the {method} index falls back to exact numpy search", stacklevel=2)
            return cls(ids, method, metric, p, d, embeddings=emb)
        b = _scann().builder(emb, 10, metric)
        if method == "brute_force":
            b = b.score_brute_force()
        else:
            soar = {} if p["soar_lambda"] is None else {"soar_lambda": p["soar_lambda"],
                                                        "overretrieve_factor": 2.0}
            b = b.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
                       training_sample_size=p["training_sample_size"], spherical=p["spherical"], **soar)
            threshold = p["anisotropic_quantization_threshold"] if metric == "dot_product" else float("nan")
            b = b.score_ah(p["dims_per_block"], anisotropic_quantization_threshold=threshold)
            b = b.reorder(p["reorder"])
        return cls(ids, method, metric, p, d, searcher=b.build())

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[list[list[str]], np.ndarray]:
        """Top-k for each query row: (ids [Q][k], scores [Q, k] float32), best first.
        A single query vector [D] is treated as one row. k is capped at the index size."""
        q = np.atleast_2d(np.asarray(queries, np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        k = min(int(k), len(self))
        if k <= 0:
            raise ValueError("k must be positive")
        if self._searcher is None:
            idx, scores = exact_search(self._embeddings, q, k, self.metric)
        else:
            kw = {}
            if self.method == "tree_ah":
                kw["pre_reorder_num_neighbors"] = max(self.params["reorder"], k)
            idx, scores = self._searcher.search_batched(np.ascontiguousarray(q), final_num_neighbors=k, **kw)
            idx, scores = np.asarray(idx, np.int64), np.asarray(scores, np.float32)
            if self.metric == "squared_l2":
                scores = -scores  # ScaNN reports distances; larger is better everywhere here
        return [[self.ids[i] for i in row] for row in idx], scores

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index (ScaNN artifacts or embeddings, ids, metadata) into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"method": self.method, "metric": self.metric, "params": self.params, "dim": self.dim,
                "num": len(self), "backend": self.backend}
        if self._searcher is not None:
            art = out / "scann"
            art.mkdir(exist_ok=True)
            # asset paths relative to the artifact directory, so the index can be moved or copied
            self._searcher.serialize(str(art), relative_path=True)
        else:
            with atomic_open(out / "embeddings.npy", "wb") as f:
                np.save(f, self._embeddings)
        write_text_atomic(out / "ids.json", json.dumps(list(self.ids)))
        write_text_atomic(out / "index.json", json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Index":
        """Load an index written by `save` (the directory may have been moved or copied)."""
        d = Path(directory)
        meta_file = d / "index.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: missing (not an index directory)")
        meta = json.loads(meta_file.read_text())
        ids = _read_ids(d / "ids.json")
        if len(ids) != meta["num"]:
            raise ValueError(f"{d}: ids.json has {len(ids)} ids, index.json says {meta['num']}")
        if meta["backend"] == "scann":
            if not have_scann():
                raise RuntimeError(f"{d} holds a ScaNN index; install scann to load it (pip install scann)")
            art = d / "scann"
            if not (art / "scann_assets.pbtxt").is_file():
                raise FileNotFoundError(f"{art / 'scann_assets.pbtxt'}: missing (the ScaNN index is incomplete)")
            if (art / "scann_docids.pkl").exists():
                # save() never writes docids; load_searcher would unpickle this file
                raise ValueError(f"{art / 'scann_docids.pkl'}: not written by Index.save; refusing to "
                                 "unpickle it (ids live in ids.json)")
            try:
                searcher = _scann().load_searcher(str(art), assets_backcompat_shim=False)
            except (RuntimeError, ValueError, OSError) as e:
                raise RuntimeError(f"{art}: ScaNN could not load this index ({e}); an index saved with "
                                   "absolute asset paths and then moved must be rebuilt") from None
            return cls(ids, meta["method"], meta["metric"], meta["params"], meta["dim"], searcher=searcher)
        emb = np.load(d / "embeddings.npy")
        return cls(ids, meta["method"], meta["metric"], meta["params"], meta["dim"], embeddings=emb)


# --- retrieval --------------------------------------------------------------------

class Retriever:
    """Query text -> top documents. `encoder`/`tokenizer` embed queries (for MedCPT the
    query encoder, whose documents were embedded by the article encoder); `docs` is a
    mapping id -> doc or a sequence of docs with "id"."""

    def __init__(self, encoder, tokenizer, index: Index, docs: Mapping[str, Mapping] | Sequence[Mapping],
                 query_pooling: str = "cls", *, normalize: bool = False, max_len: int = 64):
        self.encoder, self.tokenizer, self.index = encoder, tokenizer, index
        self.docs = dict(docs) if isinstance(docs, Mapping) else {str(d["id"]): d for d in docs}
        missing = [i for i in index.ids[:1000] if i not in self.docs]
        if missing:
            raise ValueError(f"the index holds ids without documents, e.g. {missing[:3]}")
        self.query_pooling, self.normalize, self.max_len = query_pooling, normalize, max_len

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return embed_texts(self.encoder, self.tokenizer, texts, batch_size=64, max_len=self.max_len,
                           pooling=self.query_pooling, normalize=self.normalize)

    def retrieve_batch(self, texts: Sequence[str], k: int = 5) -> list[list[tuple[dict, float]]]:
        ids, scores = self.index.search(self.embed_queries(texts), k)
        return [[(self.docs[i], float(s)) for i, s in zip(row, srow)] for row, srow in zip(ids, scores)]

    def retrieve(self, text: str, k: int = 5) -> list[tuple[dict, float]]:
        """The k best documents for `text` as (doc, score), best first."""
        return self.retrieve_batch([text], k)[0]
