"""Readers for real text sources, each a random-access sequence of documents (str).

Every reader builds a small index when constructed (byte offsets, row-group sizes) and reads a
document only when it is asked for, so multi-gigabyte corpora never sit in memory. All of them
pickle cheaply (open files are reopened lazily), so grain can ship them to worker processes.

    TextFiles(path, split=None)           plain text: one document per file, or per paragraph/line
    JsonlFiles(path, text_field="text")   one JSON object per line
    ParquetFiles(path, column="text")     directories of parquet shards (FineWeb / FineWeb-Edu)
    read_gsm8k(path)                      GSM8K problems as dicts (question, solution, answer)
    ConcatSource([a, b, ...])             sources one after another
    open_source("parquet:/data/fineweb")  the same from a flag string (see open_source)

A source may expose `block_sizes` (np.ndarray of ints summing to len): runs of documents that
are cheap to read together (a parquet row group). The pipeline shuffles and shards whole blocks
then, instead of single documents, so each row group is decoded once per epoch.

Errors: a missing path, a directory without matching files, an empty corpus or a missing text
field raise ValueError naming the file.
"""

from __future__ import annotations

import bisect
import json
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

PathLike = str | os.PathLike


def _expand(paths: PathLike | Sequence[PathLike], suffixes: tuple[str, ...], what: str) -> list[pathlib.Path]:
    """Files named by `paths`: files as given, directories searched recursively for `suffixes`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError(f"{what}: no paths given")
    files: list[pathlib.Path] = []
    for p in paths:
        p = pathlib.Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"{what}: directory {p} holds no files ending in {', '.join(suffixes)}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{what}: path {p} does not exist")
    return files


class _Indexed(Sequence):
    """Documents addressed by (file number, byte start, byte end); subclasses decode the bytes."""

    _what = "source"

    def __init__(self, files: list[pathlib.Path], file_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        if len(starts) == 0:
            raise ValueError(f"{self._what}: no documents found in {', '.join(map(str, files))}")
        self.files = files
        self._file_ids, self._starts, self._ends = file_ids, starts, ends
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._starts)

    def _bytes(self, i: int) -> tuple[bytes, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range [0, {n})")
        fid = int(self._file_ids[i])
        f = self._handles.get(fid)
        if f is None:
            f = self._handles[fid] = open(self.files[fid], "rb")
        f.seek(int(self._starts[i]))
        return f.read(int(self._ends[i] - self._starts[i])), fid

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        raw, fid = self._bytes(int(i))
        return self._decode(raw, fid, int(i))

    def _decode(self, raw: bytes, fid: int, i: int) -> str:
        return raw.decode("utf-8", errors="replace")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __del__(self):
        for f in getattr(self, "_handles", {}).values():
            f.close()


_SPLITS = {None: None, "file": None, "paragraph": re.compile(rb"(?:\r?\n[ \t]*){2,}"), "line": re.compile(rb"\r?\n")}


class TextFiles(_Indexed):
    """Plain UTF-8 text files as documents.

    Args:
      paths: a file, a directory (searched recursively for `suffixes`), or a list of them.
      split: None or 'file' (each file is one document), 'paragraph' (blank-line separated) or 'line'.
        Whitespace-only pieces are dropped.
      suffixes: file name endings to pick up inside directories.
    """

    _what = "text reader"

    def __init__(self, paths: PathLike | Sequence[PathLike], split: str | None = None,
                 suffixes: tuple[str, ...] = (".txt", ".md")):
        if split not in _SPLITS:
            raise ValueError(f"text reader: split must be 'file', 'paragraph' or 'line', got {split!r}")
        files = _expand(paths, suffixes, self._what)
        fids, starts, ends = [], [], []
        for fid, path in enumerate(files):
            data = path.read_bytes()
            pattern = _SPLITS[split]
            bounds = [0] + [x for m in pattern.finditer(data) for x in m.span()] + [len(data)] \
                if pattern is not None else [0, len(data)]
            for s, e in zip(bounds[::2], bounds[1::2]):
                if data[s:e].strip():
                    fids.append(fid)
                    starts.append(s)
                    ends.append(e)
        super().__init__(files, np.asarray(fids, np.int32), np.asarray(starts, np.int64),
                         np.asarray(ends, np.int64))


class JsonlFiles(_Indexed):
    """JSON-lines files, one document per non-empty line, text taken from `text_field`.

    Args:
      paths: a file, a directory (searched recursively for .jsonl / .json), or a list of them.
      text_field: key holding the text; dots descend into nested objects ('meta.body').
    """

    _what = "jsonl reader"

    def __init__(self, paths: PathLike | Sequence[PathLike], text_field: str = "text",
                 suffixes: tuple[str, ...] = (".jsonl", ".json", ".jsonl.txt")):
        files = _expand(paths, suffixes, self._what)
        self.text_field = text_field
        self._keys = text_field.split(".")
        fids, starts, ends = [], [], []
        for fid, path in enumerate(files):
            pos = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        fids.append(fid)
                        starts.append(pos)
                        ends.append(pos + len(line))
                    pos += len(line)
        super().__init__(files, np.asarray(fids, np.int32), np.asarray(starts, np.int64),
                         np.asarray(ends, np.int64))
        self[0]  # fail early on a missing field rather than deep inside a worker

    def _decode(self, raw: bytes, fid: int, i: int) -> str:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{self._what}: {self.files[fid]}: document {i} is not valid JSON: {err}") from None
        for k in self._keys:
            if not isinstance(obj, dict) or k not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{self._what}: {self.files[fid]}: document {i} has no field "
                                 f"{self.text_field!r} (keys: {keys})")
            obj = obj[k]
        if not isinstance(obj, str):
            raise ValueError(f"{self._what}: {self.files[fid]}: field {self.text_field!r} of document {i} "
                             f"is {type(obj).__name__}, not str")
        return obj


class ParquetFiles(Sequence):
    """Parquet shards with a text column, e.g. FineWeb's `data/CC-MAIN-*/000_00000.parquet`.

    Row groups are the unit of reading: `block_sizes` lists their row counts so the pipeline can
    shuffle and shard whole row groups. The last `cache_row_groups` decoded row groups are kept.

    Args:
      paths: a .parquet file, a directory searched recursively for .parquet, or a list.
      column: the text column ('text' in FineWeb / FineWeb-Edu).
    """

    _what = "parquet reader"

    def __init__(self, paths: PathLike | Sequence[PathLike], column: str = "text", cache_row_groups: int = 2):
        import pyarrow.parquet as pq

        self.files = _expand(paths, (".parquet",), self._what)
        self.column = column
        self._cache_size = max(1, cache_row_groups)
        groups = []  # (file id, row group) per block
        sizes = []
        for fid, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            names = meta.schema.names
            if column not in names:
                raise ValueError(f"{self._what}: {path} has no column {column!r} (columns: {names})")
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    groups.append((fid, g))
                    sizes.append(rows)
        if not sizes:
            raise ValueError(f"{self._what}: no rows found in {', '.join(map(str, self.files))}")
        self._groups = groups
        self.block_sizes = np.asarray(sizes, np.int64)
        self._block_starts = np.concatenate([[0], np.cumsum(self.block_sizes)])
        self._open: dict[int, object] = {}
        self._cache: dict[int, list] = {}

    def __len__(self) -> int:
        return int(self._block_starts[-1])

    def _row_group(self, b: int) -> list:
        if b in self._cache:
            return self._cache[b]
        import pyarrow.parquet as pq

        fid, g = self._groups[b]
        f = self._open.get(fid)
        if f is None:
            f = self._open[fid] = pq.ParquetFile(self.files[fid])
        rows = f.read_row_group(g, columns=[self.column]).column(0).to_pylist()
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[b] = rows
        return rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range [0, {n})")
        b = bisect.bisect_right(self._block_starts, i) - 1
        text = self._row_group(b)[i - int(self._block_starts[b])]
        return "" if text is None else text

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"], state["_cache"] = {}, {}
        return state


def read_gsm8k(path: PathLike) -> list[dict]:
    """GSM8K jsonl (question / answer with '#### n') -> dicts like synthetic.math_problems.

    Returns:
      list of dicts: question, solution (GSM8K's worked answer, ending '#### n'), answer (the
      final number as written after '####', thousands separators removed).
    """
    files = _expand(path, (".jsonl",), "gsm8k reader")
    out = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if "question" not in obj or "answer" not in obj:
                    raise ValueError(f"gsm8k reader: {f}:{lineno} needs 'question' and 'answer' fields")
                sol = obj["answer"]
                if "####" not in sol:
                    raise ValueError(f"gsm8k reader: {f}:{lineno} answer has no '#### <number>' line")
                final = sol.rsplit("####", 1)[1].strip().replace(",", "")
                out.append(dict(question=obj["question"], solution=sol, answer=final))
    if not out:
        raise ValueError(f"gsm8k reader: no problems found in {path}")
    return out


def problems_as_documents(problems: Sequence[dict]) -> list[str]:
    """'Question: ...\\nAnswer: <solution>\\n' texts, for mixing problems into pretraining."""
    return [f"Question: {p['question']}\nAnswer: {p['solution']}\n" for p in problems]


class ConcatSource(Sequence):
    """Several sources one after another; block sizes are kept where a part has them."""

    def __init__(self, sources: Sequence[Sequence[str]]):
        if not sources:
            raise ValueError("ConcatSource: no sources given")
        self.sources = list(sources)
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])])
        if self._starts[-1] == 0:
            raise ValueError("ConcatSource: all sources are empty")
        if any(hasattr(s, "block_sizes") for s in self.sources):
            self.block_sizes = np.concatenate([
                np.asarray(getattr(s, "block_sizes", np.ones(len(s), np.int64)), np.int64)
                for s in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        k = bisect.bisect_right(self._starts, i) - 1
        return self.sources[k][i - int(self._starts[k])]


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgKMG]?)[bB]?$")


def parse_bytes(text: str) -> int:
    """'10M' -> 10_000_000, '1.5G' -> 1_500_000_000, '4096' -> 4096 (decimal units)."""
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ValueError(f"cannot parse a byte size from {text!r} (try 1M, 500K, 2G)")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])


def open_source(spec: str) -> Sequence[str]:
    """A document source from a flag string; several joined with '+' are concatenated.

    Forms (options after commas):
      synthetic[:seed=0,entities=1000,bytes=100M]   the embedded synthetic world (default data)
      text:PATH[,split=paragraph|line|file]           paragraphs by default, as train_tokenizer splits text
      jsonl:PATH[,field=text]
      parquet:PATH[,column=text]
      gsm8k:PATH                                      GSM8K problems as 'Question/Answer' texts
    """
    parts = [p for p in spec.split("+") if p.strip()]
    if not parts:
        raise ValueError("data source spec is empty (try --data=synthetic)")
    sources = [_open_one(p.strip()) for p in parts]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def _open_one(spec: str) -> Sequence[str]:
    kind, _, rest = spec.partition(":")
    fields = [f for f in rest.split(",") if f] if rest else []
    path = None
    if kind != "synthetic":
        if not fields or "=" in fields[0]:
            raise ValueError(f"data source {spec!r}: {kind} needs a path, e.g. {kind}:/data/dir")
        path, fields = fields[0], fields[1:]
    opts = {}
    for f in fields:
        k, eq, v = f.partition("=")
        if not eq:
            raise ValueError(f"data source {spec!r}: option {f!r} is not key=value")
        opts[k.strip()] = v.strip()

    def take(allowed):
        unknown = set(opts) - set(allowed)
        if unknown:
            raise ValueError(f"data source {spec!r}: unknown option(s) {sorted(unknown)}; allowed: {allowed}")
        return {k: opts[k] for k in allowed if k in opts}

    if kind == "synthetic":
        from data import synthetic

        o = take(["seed", "entities", "bytes"])
        seed = int(o.get("seed", 0))
        world = synthetic.make_world(seed, int(o.get("entities", 1000)))
        return synthetic.Corpus(world, seed, parse_bytes(o.get("bytes", "100M")))
    if kind == "text":
        # Paragraphs by default (train_tokenizer reads text the same way): a whole file as one
        # document would leave a single-file corpus with nothing to hold out for validation.
        o = take(["split"])
        return TextFiles(path, split=o.get("split", "paragraph"))
    if kind == "jsonl":
        return JsonlFiles(path, text_field=take(["field"]).get("field", "text"))
    if kind == "parquet":
        return ParquetFiles(path, column=take(["column"]).get("column", "text"))
    if kind == "gsm8k":
        take([])
        return problems_as_documents(read_gsm8k(path))
    raise ValueError(f"data source {spec!r}: unknown kind {kind!r} (synthetic, text, jsonl, parquet, gsm8k)")
