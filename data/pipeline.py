"""The grain pipeline: documents -> tokens -> packed rows -> batches, per JAX process, resumable.

    it = make_train_iterator(docs, tokenizer, seq_len=1024, batch_size=32, seed=0)
    batch = next(it)            # dict of numpy int32 arrays, each [batch_size, seq_len + 1]
    state = it.get_state()      # JSON-serializable dict: save it with the checkpoint
    it.set_state(state)         # a restored run then sees exactly the batches the original saw

Batches (B = per-process batch_size, T = seq_len; rows hold T + 1 tokens so that one row gives
T inputs and T targets):

    tokens       int32 [B, T+1]  token ids; every document starts with <|endoftext|> (= BOS)
    segment_ids  int32 [B, T+1]  1, 2, 3, ... per document piece within a row; 0 = padding
    positions    int32 [B, T+1]  0, 1, 2, ... restarting at each segment start; 0 on padding
    mask         int32 [B, T]    only for rendered examples (`render=`, e.g. SFT conversations):
                                 the loss mask over *targets* (core/loss.py's convention)

Rendered examples: with `render=fn`, each source item goes through fn(item) -> (ids, mask)
instead of the tokenizer (e.g. a conversation through a chat template; ids carry their own BOS)
where mask[i] = 1 when ids[i] is a token to train on. The per-token mask is packed with its
tokens (0 on padding), and the batch's `mask` is that of the targets, row_mask[:, 1:].

The training step slices them: inputs = tokens[:, :-1], targets = tokens[:, 1:],
segment_ids[:, :-1] and positions[:, :-1] go to the model with the inputs, and the loss mask is
segment_ids[:, 1:] != 0. A target may be the <|endoftext|> that opens the next document: that
teaches the model where documents end, and it is kept. Padding tokens are 0.

Stages (all deterministic from the seed):
 1. order: each process owns every process_count-th document (or row-group block) of the source;
    each epoch visits its documents in a fresh seeded permutation. So the processes of one epoch
    cover the corpus exactly once between them.
 2. tokenize: chunks of `docs_per_chunk` documents are tokenized with `tokenizer.encode_batch`,
    in the worker processes when num_workers > 0 (grain's mp_prefetch).
 3. pack: 'concat' concatenates documents and cuts rows of exactly T+1 tokens; a document that
    does not fit continues in the next row as a new segment, so no token is dropped and there is
    no padding (except in the very last row of a finite run). 'bestfit' keeps documents whole:
    the documents of a window of `bestfit_window` are placed by best-fit-decreasing, the rest of
    a row is padding (~2% on the synthetic corpus at T=1024), and every segment is a whole
    document opening with <|endoftext|>, except for documents longer than a row: those are cut
    into full rows plus a tail that is packed like a short document. Nothing is dropped in
    either mode.
 4. batch: `batch_size` rows are stacked.
 5. workers (num_workers > 0): stages 2-4 run in grain worker processes, each on its own slice of
    chunks, and batches come round-robin from the workers. Deterministic, but a different stream
    than num_workers=0, so a state only restores into a pipeline with the same num_workers.

A resumable state is a few integers: the source position before the current chunk or best-fit
window and how far into it the packer was; restoring replays that one chunk or window.

Finite runs (num_epochs) on several processes: with row-group blocks (parquet) processes may get
slightly different numbers of documents, hence of batches; training normally runs the endless
stream (num_epochs=None) for a fixed number of steps, where this does not matter.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np
from grain.experimental import index_shuffle

_STATE_VERSION = 1


class TokenizerLike(Protocol):
    """What the pipeline needs from core.tokenizer.Tokenizer."""

    eot_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline settings.

    Attributes:
      seq_len: T; rows hold T + 1 tokens.
      batch_size: rows per batch on this process.
      seed: shuffling seed.
      packing: 'concat' (no padding, documents may straddle rows) or 'bestfit' (whole documents).
      shuffle: permute documents each epoch (False keeps source order, for debugging).
      num_epochs: passes over this process's shard; None = forever.
      process_index, process_count: this process's shard; None = jax.process_index() / count().
      num_workers: grain worker processes for reading + tokenizing + packing (0 = in-process).
      read_threads: threads tokenizing chunks inside each process (0 = none).
      docs_per_chunk: documents tokenized per encode_batch call.
      bestfit_window: documents packed together by 'bestfit'.
      drop_remainder: drop a final batch with fewer than batch_size rows (finite runs only).
    """

    seq_len: int
    batch_size: int
    seed: int = 0
    packing: str = "concat"
    shuffle: bool = True
    num_epochs: int | None = None
    process_index: int | None = None
    process_count: int | None = None
    num_workers: int = 0
    read_threads: int = 2
    docs_per_chunk: int = 32
    bestfit_window: int = 256
    drop_remainder: bool = True

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.packing not in ("concat", "bestfit"):
            raise ValueError(f"packing must be 'concat' or 'bestfit', got {self.packing!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.num_workers < 0 or self.read_threads < 0:
            raise ValueError("num_workers and read_threads must be >= 0")
        if self.docs_per_chunk < 1 or self.bestfit_window < 1:
            raise ValueError("docs_per_chunk and bestfit_window must be >= 1")

    def resolved(self) -> PipelineConfig:
        """The config with process_index / process_count filled in from JAX when None."""
        pi, pc = self.process_index, self.process_count
        if pi is None or pc is None:
            import jax

            pi = jax.process_index() if pi is None else pi
            pc = jax.process_count() if pc is None else pc
        if not 0 <= pi < pc:
            raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
        return dataclasses.replace(self, process_index=pi, process_count=pc)


# ----------------------------------------------------------------------------------------------
# 1. Order: position k in this process's stream -> source document index.


def _seed32(*parts: int) -> int:
    x = 0
    for p in parts:
        x = (x * 1_000_003 + int(p) + 7) % (2**31 - 1)
    return x


class DocOrder:
    """This process's document order over all epochs, as pure index arithmetic.

    Without block_sizes: process p owns documents p, p + P, p + 2P, ...; epoch e visits them in
    the permutation index_shuffle(., seed, e) (a Feistel network, O(1) memory). With block_sizes
    (parquet row groups), the same is done with blocks, and documents inside a block are
    permuted too, so a row group is decoded once per visit.
    """

    def __init__(self, n_docs: int, block_sizes: np.ndarray | None, seed: int, shuffle: bool,
                 process_index: int, process_count: int, num_epochs: int | None):
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        p, pc = process_index, process_count
        if block_sizes is not None and len(block_sizes) < pc:
            block_sizes = None  # too few blocks to give every process one: shard documents
        self._blocks = None
        if block_sizes is None:
            self.per_epoch = len(range(p, n_docs, pc))
            self._p, self._pc = p, pc
        else:
            sizes = np.asarray(block_sizes, np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            own = np.arange(p, len(sizes), pc)
            self._blocks = (starts[own], sizes[own])
            self.per_epoch = int(sizes[own].sum())
            self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        if self.per_epoch == 0:
            raise ValueError(f"process {p} of {pc} gets no documents: the source has only "
                             f"{n_docs} documents; use fewer processes or a bigger corpus")

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.per_epoch * self.num_epochs

    def _perm(self, j: int, n: int, *salt: int) -> int:
        return index_shuffle(j, n - 1, _seed32(self.seed, *salt), 4) if self.shuffle and n > 1 else j

    def __getitem__(self, k: int) -> int:
        epoch, j = divmod(int(k), self.per_epoch)
        if self._blocks is None:
            return self._p + self._pc * self._perm(j, self.per_epoch, epoch)
        starts, sizes = self._blocks
        cache = self._epoch_cache  # read once: reader threads may swap it concurrently
        if cache is None or cache[0] != epoch:
            order = np.arange(len(sizes))
            if self.shuffle:
                order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(len(sizes))
            cache = self._epoch_cache = (epoch, order, np.cumsum(sizes[order]))
        _, order, ends = cache
        b = bisect.bisect_right(ends, j)
        blk = int(order[b])
        offset = j - (int(ends[b - 1]) if b else 0)
        return int(starts[blk]) + self._perm(offset, int(sizes[blk]), epoch, blk + 1)


# ----------------------------------------------------------------------------------------------
# 2. Tokenize chunks of documents.


class _TokenizeChunk:
    """chunk index -> {'tokens': int32 [n], 'lengths': int32 [docs]}; each doc = [eot] + ids.
    With `render`, each doc is render(item) = (ids, mask) and the chunk has 'mask' int32 [n]."""

    def __init__(self, source: Sequence[str], order: DocOrder, tokenizer: TokenizerLike, docs_per_chunk: int,
                 render=None):
        self.source, self.order, self.tokenizer, self.docs_per_chunk = source, order, tokenizer, docs_per_chunk
        self.render = render

    def __call__(self, chunk: int) -> dict[str, np.ndarray]:
        lo = chunk * self.docs_per_chunk
        hi = min(lo + self.docs_per_chunk, len(self.order))
        if self.render is not None:
            pairs = [self.render(self.source[self.order[k]]) for k in range(lo, hi)]
            lengths = np.fromiter((len(ids) for ids, _ in pairs), np.int32, len(pairs))
            if (lengths == 0).any() or any(len(ids) != len(m) for ids, m in pairs):
                raise ValueError("render() must return non-empty (ids, mask) of equal lengths")
            return {"tokens": np.concatenate([np.asarray(ids, np.int32) for ids, _ in pairs]),
                    "mask": np.concatenate([np.asarray(m, np.int32) for _, m in pairs]),
                    "lengths": lengths}
        texts = [self.source[self.order[k]] for k in range(lo, hi)]
        ids = self.tokenizer.encode_batch(texts)
        eot = self.tokenizer.eot_id
        lengths = np.fromiter((len(x) + 1 for x in ids), np.int32, len(ids))
        flat = np.empty(int(lengths.sum()), np.int32)
        pos = 0
        for x in ids:
            flat[pos] = eot
            flat[pos + 1:pos + 1 + len(x)] = x
            pos += len(x) + 1
        return {"tokens": flat, "lengths": lengths}


# ----------------------------------------------------------------------------------------------
# 3. Packing.


def _empty_row(row_len: int, with_mask: bool = False) -> dict[str, np.ndarray]:
    keys = ("tokens", "segment_ids", "positions") + (("row_mask",) if with_mask else ())
    return {k: np.zeros(row_len, np.int32) for k in keys}


class _ConcatPackIterator(grain.DatasetIterator):
    """Rows of exactly row_len tokens cut from the concatenated document stream."""

    def __init__(self, parent: grain.DatasetIterator, row_len: int):
        super().__init__(parent)
        self._row_len = row_len
        self._chunk_state = None   # parent state before the current chunk
        self._chunk = None         # (tokens, doc starts, lengths)
        self._doc = 0              # current document within the chunk
        self._offset = 0           # tokens of it already emitted
        self._done = False

    def _load_chunk(self) -> bool:
        self._chunk_state = self._parent.get_state()
        try:
            c = next(self._parent)
        except StopIteration:
            self._chunk, self._done = None, True
            return False
        starts = np.concatenate([[0], np.cumsum(c["lengths"])[:-1]]).astype(np.int64)
        self._chunk, self._doc, self._offset = (c["tokens"], starts, c["lengths"], c.get("mask")), 0, 0
        self._with_mask = "mask" in c
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        row = None
        filled, seg = 0, 0
        while filled < self._row_len:
            if self._chunk is None or self._doc >= len(self._chunk[2]):
                if not self._load_chunk():
                    break
                continue
            tokens, starts, lengths, mask = self._chunk
            if row is None:
                row = _empty_row(self._row_len, mask is not None)
            n = min(self._row_len - filled, int(lengths[self._doc]) - self._offset)
            if n > 0:
                seg += 1
                s = int(starts[self._doc]) + self._offset
                row["tokens"][filled:filled + n] = tokens[s:s + n]
                if mask is not None:
                    row["row_mask"][filled:filled + n] = mask[s:s + n]
                row["segment_ids"][filled:filled + n] = seg
                row["positions"][filled:filled + n] = np.arange(n, dtype=np.int32)
                filled += n
                self._offset += n
            if self._offset >= int(lengths[self._doc]):
                self._doc, self._offset = self._doc + 1, 0
        if filled == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._chunk is None:
            return {"parent": self._parent.get_state(), "doc": -1, "offset": 0, "done": self._done}
        return {"parent": copy.deepcopy(self._chunk_state), "doc": self._doc, "offset": self._offset,
                "done": self._done}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._chunk, self._done = None, bool(state["done"])
        if state["doc"] >= 0:
            if not self._load_chunk():
                raise ValueError("data iterator state points past the end of the data")
            self._doc, self._offset = int(state["doc"]), int(state["offset"])


def bestfit_pack(lengths: Sequence[int], row_len: int) -> list[list[tuple[int, int, int]]]:
    """Best-fit-decreasing bin packing of documents into rows.

    Args:
      lengths: token count of each document.
      row_len: tokens per row.
    Returns:
      rows; each row is a list of (doc, start, stop) pieces whose lengths sum to <= row_len.
      Documents longer than row_len are first cut into full-row pieces plus a remainder.
    """
    rows: list[list[tuple[int, int, int]]] = []
    pieces = []
    for d, n in enumerate(lengths):
        n = int(n)
        full = n // row_len
        for k in range(full):
            rows.append([(d, k * row_len, (k + 1) * row_len)])
        if n % row_len:
            pieces.append((n % row_len, d, full * row_len, n))
    pieces.sort(key=lambda x: (-x[0], x[1]))
    free: list[tuple[int, int]] = []  # sorted (space left, row number) of rows with space left
    for size, d, start, stop in pieces:
        i = bisect.bisect_left(free, (size, -1))
        if i < len(free):
            space, r = free.pop(i)
        else:
            space, r = row_len, len(rows)
            rows.append([])
        rows[r].append((d, start, stop))
        if space - size > 0:
            bisect.insort(free, (space - size, r))
    return rows


class _BestFitPackIterator(grain.DatasetIterator):
    """Rows of whole documents (over-long ones cut), packed best-fit-decreasing per window."""

    def __init__(self, parent: grain.DatasetIterator, row_len: int, window: int, seed: int):
        super().__init__(parent)
        self._row_len, self._window, self._seed = row_len, window, seed
        self._window_state = None
        self._window_index = 0
        self._rows: list | None = None
        self._emitted = 0

    def _load_window(self) -> bool:
        self._window_state = self._parent.get_state()
        docs = []
        while len(docs) < self._window:
            try:
                c = next(self._parent)
            except StopIteration:
                break
            starts = np.concatenate([[0], np.cumsum(c["lengths"])])
            docs.extend((c["tokens"][starts[i]:starts[i + 1]],
                         None if "mask" not in c else c["mask"][starts[i]:starts[i + 1]])
                        for i in range(len(c["lengths"])))
        if not docs:
            self._rows = None
            return False
        rows = bestfit_pack([len(d) for d, _ in docs], self._row_len)
        perm = np.random.default_rng([self._seed & 0xFFFFFFFF, self._window_index]).permutation(len(rows))
        self._rows = [(docs, rows[i]) for i in perm]
        self._emitted = 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows is None or self._emitted >= len(self._rows):
            if self._rows is not None:
                self._window_index += 1
            if not self._load_window():
                raise StopIteration
        docs, pieces = self._rows[self._emitted]
        self._emitted += 1
        row = _empty_row(self._row_len, docs[0][1] is not None)
        filled = 0
        for seg, (d, start, stop) in enumerate(pieces, 1):
            n = stop - start
            row["tokens"][filled:filled + n] = docs[d][0][start:stop]
            if docs[d][1] is not None:
                row["row_mask"][filled:filled + n] = docs[d][1][start:stop]
            row["segment_ids"][filled:filled + n] = seg
            row["positions"][filled:filled + n] = np.arange(n, dtype=np.int32)
            filled += n
        return row

    def get_state(self) -> dict[str, Any]:
        if self._rows is None or self._emitted >= len(self._rows):
            # Between windows: the next window starts at the parent's current position.
            nxt = self._window_index + (self._rows is not None)
            return {"parent": self._parent.get_state(), "window": nxt, "emitted": -1}
        return {"parent": copy.deepcopy(self._window_state), "window": self._window_index,
                "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._window_index, self._rows = int(state["window"]), None
        if state["emitted"] >= 0:
            if not self._load_window():
                raise ValueError("data iterator state points past the end of the data")
            self._emitted = int(state["emitted"])


class _PackIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, cfg: PipelineConfig):
        super().__init__(parent)
        self._cfg = cfg

    def __iter__(self) -> grain.DatasetIterator:
        row_len = self._cfg.seq_len + 1
        if self._cfg.packing == "concat":
            return _ConcatPackIterator(self._parent.__iter__(), row_len)
        return _BestFitPackIterator(self._parent.__iter__(), row_len, self._cfg.bestfit_window,
                                    self._cfg.seed)

    def __str__(self) -> str:
        return f"PackIterDataset(packing={self._cfg.packing}, row_len={self._cfg.seq_len + 1})"


# ----------------------------------------------------------------------------------------------
# 4. Assembly.


def make_dataset(doc_source: Sequence[str], tokenizer: TokenizerLike, cfg: PipelineConfig,
                 render=None) -> grain.IterDataset:
    """The grain IterDataset of batches for this process (see the module docstring)."""
    cfg = cfg.resolved()
    n_docs = len(doc_source)
    if n_docs == 0:
        raise ValueError("the document source is empty: nothing to train on")
    order = DocOrder(n_docs, getattr(doc_source, "block_sizes", None), cfg.seed, cfg.shuffle,
                     cfg.process_index, cfg.process_count, cfg.num_epochs)
    n_chunks = -(-len(order) // cfg.docs_per_chunk)
    ds = grain.MapDataset.range(n_chunks).map(_TokenizeChunk(doc_source, order, tokenizer, cfg.docs_per_chunk, render))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=max(2, 2 * cfg.read_threads)))
    ds = _PackIterDataset(ds, cfg)
    ds = ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder)
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain's worker pool reads its absl flags; outside an absl app (tests, notebooks)
            # nobody parsed them, so take their defaults.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=2))
    return ds


def _jsonable(x):
    """grain states are plain dicts, but may hold numpy scalars or bytes; make them JSON-safe."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return {"__bytes__": x.decode("latin-1")}
    return x


def _from_jsonable(x):
    if isinstance(x, dict):
        if set(x) == {"__bytes__"}:
            return x["__bytes__"].encode("latin-1")
        return {k: _from_jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


class TrainIterator:
    """An endless (or num_epochs-long) iterator of batches with a saveable position.

    get_state() returns a JSON-serializable dict (save it next to the model checkpoint);
    set_state(state) on an iterator built with the same source, tokenizer and config continues
    exactly where the saved one was. A state from a different config raises ValueError.
    """

    def __init__(self, dataset: grain.IterDataset, cfg: PipelineConfig, n_docs: int, rendered: bool = False):
        self.config = cfg
        self._fingerprint = {
            "version": _STATE_VERSION, "n_docs": n_docs, **({"rendered": True} if rendered else {}),
            **{k: getattr(cfg, k) for k in ("seq_len", "batch_size", "seed", "packing", "shuffle",
                                              "num_epochs", "process_index", "process_count",
                                              "num_workers", "docs_per_chunk", "bestfit_window")}}
        self._it = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        # Worker processes hand over shared-memory arrays; copying into plain arrays frees that
        # shared memory right away instead of at interpreter exit.
        out = {k: np.array(v, dtype=np.int32) for k, v in batch.items()}
        if "row_mask" in out:  # per-token mask -> the mask over targets (core/loss.py)
            out["mask"] = out.pop("row_mask")[:, 1:]
        return out

    def get_state(self) -> dict[str, Any]:
        state = {"pipeline": self._fingerprint, "grain": _jsonable(self._it.get_state())}
        json.dumps(state)  # fail here, not in the checkpointer, if grain ever changes its format
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("pipeline") if isinstance(state, dict) else None
        if saved != self._fingerprint:
            diff = {k: (saved.get(k) if saved else None, v) for k, v in self._fingerprint.items()
                    if not saved or saved.get(k) != v}
            raise ValueError(f"data iterator state was saved with a different pipeline "
                             f"(saved, now): {diff}")
        self._it.set_state(_from_jsonable(state["grain"]))

    def close(self) -> None:
        """Stops worker processes and threads; the iterator is unusable afterwards."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        # Dropped now so grain's own finaliser does not run again during interpreter shutdown.
        self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_train_iterator(doc_source: Sequence[str], tokenizer: TokenizerLike, seq_len: int, batch_size: int,
                        seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                        render=None, **options) -> TrainIterator:
    """Batches for this JAX process; see the module docstring for their layout.

    Args:
      doc_source: random-access sequence of documents (str): a list, synthetic.Corpus, or a
        reader from data.readers.
      tokenizer: has encode_batch(list[str]) -> list[list[int]] and eot_id (core.tokenizer).
      seq_len: T; rows hold T + 1 tokens.
      batch_size: rows per batch on this process (the global batch / process_count).
      seed: shuffling seed.
      process_index, process_count: default jax.process_index() / jax.process_count().
      render: None, or item -> (ids, mask) for rendered examples (the items of doc_source are then
        anything render accepts, e.g. conversations; picklable for num_workers > 0).
      **options: any other PipelineConfig field (packing, num_epochs, num_workers, ...).
    Returns:
      TrainIterator yielding {'tokens', 'segment_ids', 'positions'} int32 [batch_size, seq_len+1]
      (+ 'mask' int32 [batch_size, seq_len] with render).
    """
    cfg = PipelineConfig(seq_len=seq_len, batch_size=batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, **options).resolved()
    return TrainIterator(make_dataset(doc_source, tokenizer, cfg, render), cfg, len(doc_source),
                         rendered=render is not None)
