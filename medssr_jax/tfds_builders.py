"""TFDS datasets of :class:`medssr_jax.data.MCQ` records in ArrayRecord
files, and a deterministic, per-host sharded random-access reader.

Writing: :class:`MCQBuilder` (a ``tfds.core.GeneratorBasedBuilder``) takes, per
split, a list of MCQ, a :class:`medssr_jax.data.Records` reader, or a
zero-argument callable returning either, and writes
``<data_dir>/mcq_builder/<config>/<version>/`` with one or more
``mcq_builder-<split>.array_record-NNNNN-of-MMMMM`` files plus TFDS's
``dataset_info.json`` / ``features.json``. :func:`build_mcq_dataset` does it
in one call and returns that directory (the *builder dir*). Neither writing
nor reading imports TensorFlow: ``tensorflow-datasets`` (>= 4.9.6) reads
ArrayRecord through ``tfds.data_source`` without it, and ``array-record``
provides the file format.

Stored features (one example per record): ``index`` (position in the input
split, int64), ``id``, ``question``, ``source`` (text), ``letters`` and
``options`` (sequences of text, same length), ``answer`` (text, ``""`` when
unlabelled) and ``extra`` (the ``extra`` dict as JSON text). The builder
disables TFDS's write-time shuffling, so examples are stored in input order
(storage position == ``index``) and all shuffling happens at read time.

Reading: :func:`mcq_data_source` returns an :class:`MCQDataSource`:

* **Shuffling**: in epoch ``e`` the record order is the permutation
  ``numpy.random.default_rng([seed, e]).permutation(n)`` of the input indices
  (``shuffle=False``: the input order ``0..n-1``). The same seed and epoch give
  the same order on every host and every run; another seed gives another order.
* **Sharding per host** (strided): after shuffling, process ``i`` of ``k``
  takes positions ``i, i+k, i+2k, ...`` of the epoch's order. The shards of
  the ``k`` processes are disjoint and together hold every record once; their
  lengths differ by at most one. ``drop_remainder=True`` cuts every shard to
  ``n // k`` records so that all hosts run the same number of steps (the
  records cut differ from epoch to epoch because the order does).
  ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
  ``jax.process_count()``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssr_jax.data import MCQ

__all__ = ["MCQBuilder", "MCQDataSource", "build_mcq_dataset", "example_to_mcq", "mcq_data_source"]

try:  # the builder class needs tfds at definition time
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - exercised only without the data extra
    tfds = None
    _TFDS_ERROR = e
else:
    _TFDS_ERROR = None


def _need_tfds():
    if tfds is None:
        raise ImportError("medssr_jax.tfds_builders needs the 'data' extra: "
                          "pip install 'medssr-jax[data]' (tensorflow-datasets, array-record)") from _TFDS_ERROR


SplitInput = Iterable[MCQ] | Callable[[], Iterable[MCQ]]


def _mcq_to_example(index: int, m: MCQ) -> dict[str, Any]:
    return {"index": index, "id": m.id, "question": m.question, "source": m.source,
            "letters": list(m.options), "options": list(m.options.values()),
            "answer": m.answer or "", "extra": json.dumps(m.extra, ensure_ascii=False, sort_keys=True)}


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def example_to_mcq(ex: Mapping[str, Any]) -> MCQ:
    """An :class:`MCQ` from one decoded example (bytes or str fields)."""
    letters = [_text(x) for x in ex["letters"]]
    options = [_text(x) for x in ex["options"]]
    answer = _text(ex["answer"])
    return MCQ(id=_text(ex["id"]), question=_text(ex["question"]), options=dict(zip(letters, options)),
               answer=answer or None, source=_text(ex["source"]), extra=json.loads(_text(ex["extra"])))


if tfds is not None:

    class MCQBuilder(tfds.core.GeneratorBasedBuilder):
        """ArrayRecord dataset of MCQ records.

        ``MCQBuilder(splits={"test": records, ...}, config="medqa",
        data_dir=...)``: ``config`` names the dataset (any identifier; one
        builder dir per config), ``splits`` maps split names to the records
        (see the module docstring). Only needed to *build*; reading needs just
        the builder dir.
        """

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "MCQ records: index, id, question, source, letters, options, answer, extra."}

        def __init__(self, *, splits: Mapping[str, SplitInput] | None = None, config: str = "default",
                     data_dir: str | os.PathLike | None = None, **kwargs):
            self._splits = dict(splits or {})
            name = str(config)
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"config must be an identifier (letters, digits, _ or -), got {config!r}")
            kwargs.setdefault("file_format", "array_record")
            super().__init__(config=tfds.core.BuilderConfig(name=name), data_dir=data_dir, **kwargs)

        def _info(self):
            Text = tfds.features.Text
            return tfds.core.DatasetInfo(
                builder=self,
                description="Multiple-choice questions (medssr_jax.data.MCQ).",
                features=tfds.features.FeaturesDict({
                    "index": np.int64, "id": Text(), "question": Text(), "source": Text(),
                    "letters": tfds.features.Sequence(Text()), "options": tfds.features.Sequence(Text()),
                    "answer": Text(), "extra": Text(),
                }),
                supervised_keys=None,
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            if not self._splits:
                raise ValueError("MCQBuilder needs splits={name: records} to build")
            return {name: self._generate_examples(recs) for name, recs in self._splits.items()}

        def _generate_examples(self, recs):
            if callable(recs):
                recs = recs()
            for i, m in enumerate(recs):
                if not isinstance(m, MCQ):
                    raise TypeError(f"split element {i} is a {type(m).__name__}, not an MCQ")
                yield i, _mcq_to_example(i, m)

else:  # pragma: no cover
    class MCQBuilder:  # type: ignore[no-redef]
        def __init__(self, *a, **k):
            _need_tfds()


def build_mcq_dataset(splits: Mapping[str, SplitInput], data_dir: str | os.PathLike, *,
                      config: str = "default") -> Path:
    """Build (or reuse, when already built) the dataset and return its builder
    dir ``<data_dir>/mcq_builder/<config>/1.0.0``."""
    _need_tfds()
    b = MCQBuilder(splits=splits, config=config, data_dir=data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return Path(b.data_dir)


class MCQDataSource(Sequence[MCQ]):
    """One host's shard of a split, in a seeded per-epoch order.

    ``len(src)`` is this host's records per epoch; ``src[j]`` / iteration give
    epoch 0; :meth:`epoch` iterates any epoch; :meth:`indices` gives the
    input indices (the stored ``index`` feature) this host reads in an epoch.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], *, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool = False):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
        self._src, self.seed, self.shuffle = source, int(seed), bool(shuffle)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.drop_remainder = bool(drop_remainder)
        self.num_records = len(source)
        for p in {0, self.num_records - 1} if self.num_records else ():
            if int(source[p]["index"]) != p:
                raise ValueError(f"stored record {p} has index {source[p]['index']}: "
                                 "not written in input order by MCQBuilder")
        n, k = self.num_records, self.process_count
        self._len = n // k if self.drop_remainder else len(range(self.process_index, n, k))

    def order(self, epoch: int = 0) -> np.ndarray:
        """The global order of input indices in ``epoch`` (all hosts agree)."""
        if not self.shuffle:
            return np.arange(self.num_records)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_records)

    def indices(self, epoch: int = 0) -> np.ndarray:
        """Input indices this host reads in ``epoch``, in reading order."""
        return self.order(epoch)[self.process_index::self.process_count][:self._len]

    def record(self, index: int) -> MCQ:
        """The record at input position ``index`` (unshuffled, unsharded)."""
        return example_to_mcq(self._src[int(index)])

    def epoch(self, epoch: int = 0) -> Iterator[MCQ]:
        for i in self.indices(epoch):
            yield self.record(int(i))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self._len))]
        if not -self._len <= j < self._len:
            raise IndexError(j)
        return self.record(int(self.indices(0)[j]))

    def __iter__(self) -> Iterator[MCQ]:
        return self.epoch(0)


def mcq_data_source(builder_dir: str | os.PathLike, split: str, *, seed: int, shuffle: bool = True,
                    process_index: int | None = None, process_count: int | None = None,
                    drop_remainder: bool = False) -> MCQDataSource:
    """Random-access reader of one split of an :class:`MCQBuilder` dataset
    (``builder_dir`` as returned by :func:`build_mcq_dataset`), shuffled and
    sharded as the module docstring says. No TensorFlow is imported."""
    _need_tfds()
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    builder = tfds.builder_from_directory(os.fspath(builder_dir))
    src = builder.as_data_source(split=split)
    return MCQDataSource(src, seed=seed, shuffle=shuffle, process_index=process_index,
                         process_count=process_count, drop_remainder=drop_remainder)
