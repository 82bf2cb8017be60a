"""Incremental byte-level BPE training (the algorithm behind `core.tokenizer.train_bpe`).

Two stages:

1. `count_chunks`: split every document with the pre-tokenizer regex and count unique chunks.
   This is the only pass over the corpus; memory grows with the number of unique chunks.
   Large corpora are split into batches counted by worker processes (one per core).
2. `learn_merges`: the incremental merge loop over unique chunks (as strings of token ids):
   pair counts weighted by chunk counts, an index pair -> chunks that may hold it, and a heap
   with lazy refresh. Each merge rewrites only the chunks that hold the pair and adjusts the
   counts of the pairs around each occurrence.

Ties between pairs of equal count go to the smallest pair of ids (lexicographic), which makes
the merge list identical to `rustbpe`'s (same counting of overlapping pairs, same tie rule).
"""
from __future__ import annotations

import collections
import concurrent.futures
import heapq
import multiprocessing
import os
import sys
from typing import Iterable, Iterator

import regex

# Pair (a, b) is packed into one int a << 32 | b: ints hash and compare faster than tuples, and
# the packed order is the lexicographic order of (a, b), which is the tie-break we need.
_SHIFT = 32
_LOW = (1 << _SHIFT) - 1
# Heap entries are one int too: (-count << 64) + pair. Smallest = highest count, then smallest pair.
_HEAP_SHIFT = 64
_HEAP_LOW = (1 << _HEAP_SHIFT) - 1

# Below this many characters the corpus is counted in-process (no worker start-up cost).
_PARALLEL_MIN_CHARS = 4_000_000
_BATCH_CHARS = 1_000_000
_MAX_BATCH_CHARS = 16_000_000


def _count_batch(args: tuple[str, list[str]]) -> dict[str, int]:
    """Worker: chunk counts of a batch of documents under `pattern`."""
    pattern, docs = args
    findall = regex.compile(pattern).findall
    counter: collections.Counter[str] = collections.Counter()
    for doc in docs:
        counter.update(findall(doc))
    return counter


def _batches(first: list[str], rest: Iterator[str], pattern: str) -> Iterator[tuple[str, list[str]]]:
    """Yields (pattern, docs) batches, `first` before `rest`.

    Batches start at _BATCH_CHARS characters and double every 8 batches up to _MAX_BATCH_CHARS:
    the main process merges one counter per batch, and unique chunks grow slower than text, so
    larger batches keep that merging from becoming the bottleneck on big corpora.
    """
    docs, size, n, limit = [], 0, 0, _BATCH_CHARS
    for doc in _chain(first, rest):
        docs.append(doc)
        size += len(doc)
        if size >= limit:
            yield pattern, docs
            docs, size, n = [], 0, n + 1
            if n % 8 == 0:
                limit = min(2 * limit, _MAX_BATCH_CHARS)
    if docs:
        yield pattern, docs


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _check_doc(doc) -> str:
    if not isinstance(doc, str):
        raise TypeError(f"train_bpe expects an iterable of str documents, got an item of type {type(doc).__name__}")
    return doc


def _mp_context():
    # fork is cheapest, but forking a process that has started JAX's threads can deadlock.
    if sys.platform != "win32" and "jax" not in sys.modules:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def count_chunks(texts: Iterable[str], pattern: str, num_workers: int | None = None) -> dict[str, int]:
    """Counts the regex chunks of every document.

    Args:
      texts: iterable of documents (each split on its own: chunks never span documents).
      pattern: the split regex (`regex` module syntax, as tiktoken's).
      num_workers: processes for large corpora; default: one per core, at most 8. 1 = in-process.

    Returns:
      dict chunk string -> number of occurrences.
    """
    if isinstance(texts, str):
        texts = [texts]
    findall = regex.compile(pattern).findall
    it = (_check_doc(d) for d in texts)
    num_workers = num_workers or min(8, os.cpu_count() or 1)

    # Read ahead; a small corpus never pays for worker processes.
    head, size = [], 0
    for doc in it:
        head.append(doc)
        size += len(doc)
        if size >= _PARALLEL_MIN_CHARS and num_workers > 1:
            break
    else:
        counter: collections.Counter[str] = collections.Counter()
        for doc in head:
            counter.update(findall(doc))
        return counter

    # At most 2 batches per worker in flight, so memory stays bounded on a streamed corpus.
    # ProcessPoolExecutor (unlike Pool) raises instead of hanging if a worker dies.
    counter = collections.Counter()
    batches = _batches(head, it, pattern)
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=_mp_context()) as ex:
        pending = set()
        for batch in batches:
            pending.add(ex.submit(_count_batch, batch))
            if len(pending) >= 2 * num_workers:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for f in done:
                    counter.update(f.result())
        for f in concurrent.futures.as_completed(pending):
            counter.update(f.result())
    return counter


def learn_merges(chunk_counts: dict[str, int] | dict[bytes, int], num_merges: int) -> list[tuple[int, int]]:
    """The incremental BPE merge loop.

    A chunk is held as a str with one character chr(id) per token, so that finding and merging a
    pair are str.find / str.replace in C (replace is left-to-right and non-overlapping, exactly
    BPE's rule). The pair-count updates around each occurrence follow rustbpe's accounting.

    Args:
      chunk_counts: unique chunk (str, UTF-8 encoded here, or bytes) -> count.
      num_merges: merges to learn; fewer are returned if no pair is left.

    Returns:
      merges: list of (left_id, right_id); merge i creates token id 256 + i.
    """
    if 256 + num_merges > 0x110000:
        raise ValueError(f"at most {0x110000 - 256} merges are supported, asked for {num_merges}")
    words: list[str] = []
    wcounts: list[int] = []
    for chunk, c in chunk_counts.items():
        b = chunk.encode("utf-8") if isinstance(chunk, str) else chunk
        if len(b) >= 2 and c > 0:
            words.append(b.decode("latin-1"))  # byte value v -> chr(v)
            wcounts.append(c)

    pair_counts: collections.defaultdict[int, int] = collections.defaultdict(int)
    where: dict[int, set[int]] = {}  # pair -> chunks that may hold it (a superset: never pruned)
    for wi, w in enumerate(words):
        c = wcounts[wi]
        for a, b in zip(w, w[1:]):
            key = (ord(a) << _SHIFT) | ord(b)
            pair_counts[key] += c
            s = where.get(key)
            if s is None:
                where[key] = {wi}
            else:
                s.add(wi)

    heap = [(-c << _HEAP_SHIFT) + key for key, c in pair_counts.items() if c > 0]
    heapq.heapify(heap)
    heappop, heappush = heapq.heappop, heapq.heappush

    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        entry = heappop(heap)
        key = entry & _HEAP_LOW
        count = -(entry >> _HEAP_SHIFT)
        current = pair_counts.get(key, 0)
        if count != current:  # stale: a count only falls after its push, so refresh and retry
            if current > 0:
                heappush(heap, (-current << _HEAP_SHIFT) + key)
            continue
        a, b = key >> _SHIFT, key & _LOW
        new = 256 + len(merges)
        merges.append((a, b))
        ab, cnew = chr(a) + chr(b), chr(new)
        new_hi = new << _SHIFT
        touched: dict[int, set[int]] = {}  # pairs created by this merge -> chunks
        tget = touched.get
        removed = 0
        for wi in where.pop(key, ()):
            w = words[wi]
            if ab not in w:
                continue
            c = wcounts[wi]
            nw = w.replace(ab, cnew)
            words[wi] = nw
            n = len(nw)
            # Each cnew in the new chunk is one occurrence; its neighbours give the deltas.
            k = nw.find(cnew)
            while k >= 0:
                removed += c
                if k > 0:
                    # The left neighbour, already rewritten (cnew if the previous occurrence touched).
                    x = ord(nw[k - 1])
                    pair_counts[(x << _SHIFT) | a] -= c
                    k2 = (x << _SHIFT) | new
                    pair_counts[k2] += c
                    s = tget(k2)
                    if s is None:
                        touched[k2] = {wi}
                    else:
                        s.add(wi)
                if k + 1 < n:
                    # The old right neighbour: an adjacent next occurrence began with a.
                    y = ord(nw[k + 1])
                    if y == new:
                        y = a
                    pair_counts[(b << _SHIFT) | y] -= c
                    k2 = new_hi | y
                    pair_counts[k2] += c
                    s = tget(k2)
                    if s is None:
                        touched[k2] = {wi}
                    else:
                        s.add(wi)
                k = nw.find(cnew, k + 1)
        pair_counts[key] -= removed
        for k2, s in touched.items():
            old = where.get(k2)
            if old is None:
                where[k2] = s
            else:
                old.update(s)
            c2 = pair_counts[k2]
            if c2 > 0:
                heappush(heap, (-c2 << _HEAP_SHIFT) + k2)
    return merges
