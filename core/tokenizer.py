"""Byte-level BPE tokenizer: training, encoding, decoding, special tokens, pretrained vocabularies.

A `Tokenizer` is a map `mergeable_ranks: dict[bytes, int]` (token bytes -> id; the id is also the
merge priority, as in tiktoken), a split regex `pattern`, and a registry of special tokens
(name -> id). Encoding follows tiktoken exactly: split the text with the pattern, then inside each
piece repeatedly merge the adjacent pair whose concatenation has the lowest rank (leftmost on
ties). tiktoken is the fast backend; a pure-Python fallback gives identical ids.

Special tokens: `encode` treats its input as untrusted text and never yields a special id (text
that spells "<|im_end|>" becomes ordinary byte tokens). Only `special_id` and
`encode_with_special_tokens` (for trusted templates) produce special ids.

Saved format (`save`, file `tokenizer.zipchat.json`): one JSON object, one entry per line
    {"format": "zipchat-bpe", "version": 1, "name": str, "pattern": str,
     "special_tokens": {name: id},
     "tokens": [escaped token bytes, indexed by id; null for an unused id],
     "merges": [[left_id, right_id], ...] (merge i made id 256 + i) or null,
     "hf_tokenizer_json": null, or the source tokenizer.json (Hugging Face merge semantics)}
Token bytes are escaped so that the file reads as text: printable characters stand for their UTF-8
bytes, "\\\\" is a backslash, and "\\xNN" is one raw byte (invalid UTF-8, control characters).

`load(path)` also reads tiktoken `.tiktoken` files (cl100k_base, o200k_base, r50k_base, p50k_base
with their official patterns and special tokens), GPT-2's `encoder.json` + `vocab.bpe`, and
Hugging Face `tokenizer.json` files with a byte-level BPE model (GPT-2, Qwen2, Llama 3 style).
For a tokenizer.json the encoder follows Hugging Face semantics (merge priority of the pair), with
`tokenizers` as the fast backend when importable.
"""
from __future__ import annotations

import base64
import codecs
import concurrent.futures
import dataclasses
import heapq
import json
import logging
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import regex

from core import bpe_train, chat

# The GPT-4 (cl100k) split pattern in the form rustbpe and nanochat use (rustbpe's default, so
# train_bpe's merges equal rustbpe's with no pattern given). It differs from tiktoken's official
# string (CL100K_PATTERN, used when loading cl100k_base) only at the very end of a text: a final
# whitespace run that holds a newline is one chunk there ("\n " -> ["\n "]) and two here.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# tiktoken's official pattern strings (tiktoken_ext/openai_public.py).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# Hugging Face ByteLevel pre-tokenizer's built-in regex (use_regex=True), GPT-2's original.
HF_BYTELEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The special tokens zipchat's tokenizers reserve (in id order) are the chat template's and the
# tool protocol's, defined once in core/chat.py.
SPECIAL_TOKENS: tuple[str, ...] = chat.SPECIAL_TOKENS

SAVE_FILENAME = "tokenizer.zipchat.json"
_FORMAT = "zipchat-bpe"
_FORMAT_VERSION = 1

# Names under which pretrained vocabularies spell the end-of-text token.
_EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")

_OFFICIAL_TIKTOKEN = {
    "r50k_base": (R50K_PATTERN, {"<|endoftext|>": 50256}),
    "gpt2": (R50K_PATTERN, {"<|endoftext|>": 50256}),
    "p50k_base": (R50K_PATTERN, {"<|endoftext|>": 50256}),
    "cl100k_base": (
        CL100K_PATTERN,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": (O200K_PATTERN, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}

log = logging.getLogger(__name__)

# The pure-Python encoder spreads a batch over processes from this many characters on.
_PARALLEL_ENCODE_MIN_CHARS = 1_000_000
# Bounds on what a tokenizer file may declare, checked before tables are allocated: far above
# every released vocabulary (o200k: 200k ids; Gemma: 256k) and far below a host's memory.
MAX_VOCAB_SIZE = 2**22
MAX_TOKENIZER_FILE_BYTES = 512 * 2**20


def normalize_text(text: str) -> str:
    """`text` with lone surrogates (e.g. "\\ud800", which no UTF-8 can hold) replaced by U+FFFD.

    The rule tiktoken applies before encoding; every encoder here applies it, and so should any
    code that writes user or model text to a UTF-8 file. Text without surrogates is returned as is.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def gpt4_pattern(max_digits: int = 3) -> str:
    """The GPT-4 split pattern with numbers grouped in runs of 1..max_digits digits (GPT-4: 3)."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    return GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}{1,%d}" % max_digits)


# ------------------------------------------------------------------------------------------
# Pure-Python BPE (fallback encoders). Both are heap-based: O(n log n) in the piece length.


def bpe_merge_piece(piece: bytes, ranks: dict[bytes, int], stats: dict | None = None) -> list[int]:
    """tiktoken's byte-pair merge of one piece: lowest-rank concatenation first, leftmost on ties.

    Args:
      piece: the bytes of one regex chunk.
      ranks: token bytes -> rank (= id).
      stats: if given, stats["ops"] is incremented by the heap operations done (for tests).

    Returns:
      token ids of the piece.
    """
    rank = ranks.get(piece)
    if rank is not None:
        return [rank]
    n = len(piece)
    # Parts are byte ranges [start, nxt[start]); a linked list over part starts.
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        r = ranks.get(piece[i : i + 2])
        if r is not None:
            heap.append((r, i, i + 2))
    heapq.heapify(heap)
    ops = len(heap)
    while heap:
        r, i, end = heapq.heappop(heap)
        ops += 1
        # Stale if the left part was absorbed or either part changed since the push.
        if not alive[i]:
            continue
        j = nxt[i]
        if j >= n or nxt[j] != end:
            continue
        # Merge part j into part i.
        alive[j] = False
        nxt[i] = end
        if end < n:
            prv[end] = i
        p = prv[i]
        if p >= 0:
            rp = ranks.get(piece[p:end])
            if rp is not None:
                heapq.heappush(heap, (rp, p, end))
                ops += 1
        if end < n:
            e2 = nxt[end]
            rn = ranks.get(piece[i:e2])
            if rn is not None:
                heapq.heappush(heap, (rn, i, e2))
                ops += 1
    if stats is not None:
        stats["ops"] = stats.get("ops", 0) + ops
    out = []
    i = 0
    while i < n:
        out.append(ranks[piece[i : nxt[i]]])
        i = nxt[i]
    return out


def hf_merge_piece(
    piece_ids: list[int], merges: dict[tuple[int, int], tuple[int, int]], stats: dict | None = None
) -> list[int]:
    """Hugging Face BPE merge of one word: the adjacent pair with the lowest merge priority first.

    Args:
      piece_ids: initial symbol ids (one per byte).
      merges: (left_id, right_id) -> (priority, merged_id).

    Returns:
      token ids.
    """
    n = len(piece_ids)
    sym = list(piece_ids)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        m = merges.get((sym[i], sym[i + 1]))
        if m is not None:
            heap.append((m[0], i, m[1]))
    heapq.heapify(heap)
    ops = len(heap)
    while heap:
        pri, i, new = heapq.heappop(heap)
        ops += 1
        if not alive[i]:
            continue
        j = nxt[i]
        if j >= n:
            continue
        m = merges.get((sym[i], sym[j]))
        if m is None or m[0] != pri:
            continue
        sym[i] = new
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        p = prv[i]
        if p >= 0:
            mp = merges.get((sym[p], new))
            if mp is not None:
                heapq.heappush(heap, (mp[0], p, mp[1]))
                ops += 1
        k = nxt[i]
        if k < n:
            mn = merges.get((new, sym[k]))
            if mn is not None:
                heapq.heappush(heap, (mn[0], i, mn[1]))
                ops += 1
    if stats is not None:
        stats["ops"] = stats.get("ops", 0) + ops
    out = []
    i = 0
    while i < n:
        out.append(sym[i])
        i = nxt[i]
    return out


# ------------------------------------------------------------------------------------------
# Hugging Face byte-level alphabet.


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by encoder.json, tokenizer.json)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


# ------------------------------------------------------------------------------------------
# Escaping token bytes for the human-readable saved format.


def escape_token(b: bytes) -> str:
    """Bytes -> readable text: printable characters as they are, "\\\\" for "\\", "\\xNN" otherwise."""
    out = []
    for ch in b.decode("utf-8", errors="surrogateescape"):
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":  # an undecodable byte
            out.append("\\x%02x" % (ord(ch) - 0xDC00))
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend("\\x%02x" % x for x in ch.encode("utf-8"))
    return "".join(out)


def unescape_token(s: str) -> bytes:
    """Inverse of `escape_token`; ValueError on a malformed escape."""
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            if s.startswith("\\\\", i):
                out.append(0x5C)
                i += 2
            elif s.startswith("\\x", i) and i + 4 <= n:
                try:
                    out.append(int(s[i + 2 : i + 4], 16))
                except ValueError:
                    raise ValueError(f"bad escape {s[i:i + 4]!r} in token {s!r}") from None
                i += 4
            else:
                raise ValueError(f"bad escape in token {s!r}")
        else:
            out += ch.encode("utf-8")
            i += 1
    return bytes(out)


# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _HFModel:
    """What a Hugging Face byte-level BPE tokenizer.json needs besides ranks: merge priorities."""

    merges: dict  # (left_id, right_id) -> (priority, merged_id)
    byte_ids: tuple  # byte value -> id (or -1 when the byte is absent: HF drops it)
    ignore_merges: bool
    add_prefix_space: bool
    nfc: bool
    json_str: str  # the tokenizer.json without added tokens and post-processing


class StreamDecoder:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    `push(id)` returns the text that became complete (possibly ""), `flush()` the remainder
    (incomplete bytes become U+FFFD).
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class Tokenizer:
    """A byte-level BPE tokenizer (see the module docstring).

    Attributes:
      mergeable_ranks: dict token bytes -> id (id = merge priority).
      pattern: split regex.
      special_tokens: dict name -> id.
      vocab_size: 1 + the largest id (ordinary or special).
      name: free text (e.g. "cl100k_base").
      merges: list of (left_id, right_id) for tokenizers trained here, else None.
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pattern: str,
        special_tokens: dict[str, int] | None = None,
        *,
        name: str = "zipchat",
        merges: list[tuple[int, int]] | None = None,
        _hf: _HFModel | None = None,
    ):
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self.merges = None if merges is None else [tuple(m) for m in merges]
        self._hf = _hf
        for what, ids in (("token", self.mergeable_ranks), ("special token", self.special_tokens)):
            for key, r in ids.items():
                if type(r) is not int or not 0 <= r < MAX_VOCAB_SIZE:
                    raise ValueError(f"{what} {key!r:.60} has id {r!r:.40}: not an integer in "
                                     f"[0, {MAX_VOCAB_SIZE})")
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"invalid split pattern {pattern!r}: {e}") from None
        max_rank = max(self.mergeable_ranks.values(), default=-1)
        max_special = max(self.special_tokens.values(), default=-1)
        self.vocab_size = max(max_rank, max_special) + 1
        table: list[bytes | None] = [None] * self.vocab_size
        for b, r in self.mergeable_ranks.items():
            if r < 0:
                raise ValueError(f"negative token id {r} for {b!r}")
            if table[r] is not None:
                raise ValueError(f"token id {r} is used twice ({table[r]!r} and {b!r})")
            table[r] = b
        self._special_by_id = {}
        for s, r in self.special_tokens.items():
            if r < 0 or table[r] is not None or r in self._special_by_id:
                raise ValueError(f"special token {s!r} has id {r}, which is negative or already taken")
            self._special_by_id[r] = s
        self._ordinary = table
        self._decode_table = [
            (b if b is not None else self._special_by_id.get(i, "").encode("utf-8")) for i, b in enumerate(table)
        ]
        self._backend = None  # built lazily (and dropped on pickling)
        self._cache: dict = {}
        self._regex = None
        self._special_splitter = None

    # ----- backends -------------------------------------------------------------------------

    def _get_backend(self):
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    def _make_backend(self):
        if self._hf is not None:
            try:
                import tokenizers  # noqa: F401
            except ImportError:
                return ("python-hf", None)
            return ("hf", tokenizers.Tokenizer.from_str(self._hf.json_str))
        try:
            import tiktoken
        except ImportError:
            return ("python", None)
        if not all(bytes([i]) in self.mergeable_ranks for i in range(256)):
            return ("python", None)  # tiktoken panics without all 256 single bytes
        enc = tiktoken.Encoding(
            name=self.name or "zipchat",
            pat_str=self.pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        return ("tiktoken", enc)

    @property
    def backend(self) -> str:
        """'tiktoken', 'hf' (Hugging Face tokenizers), 'python' or 'python-hf'."""
        return self._get_backend()[0]

    def __getstate__(self):
        # Only what the constructor needs: backends, caches and tables are rebuilt on arrival
        # (grain ships tokenizers to worker processes).
        return {
            "mergeable_ranks": self.mergeable_ranks,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "name": self.name,
            "merges": self.merges,
            "_hf": self._hf,
        }

    def __setstate__(self, state):
        self.__init__(
            state["mergeable_ranks"],
            state["pattern"],
            state["special_tokens"],
            name=state["name"],
            merges=state["merges"],
            _hf=state["_hf"],
        )

    def __repr__(self):
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"ordinary={len(self.mergeable_ranks)}, special={len(self.special_tokens)})"
        )

    # ----- encoding ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ordinary text. Never yields a special id: "<|im_end|>" in `text` is plain bytes."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        text = normalize_text(text)
        kind, impl = self._get_backend()
        if kind == "tiktoken":
            return impl.encode_ordinary(text)
        if kind == "hf":
            return self._no_special(impl.encode(text, add_special_tokens=False).ids, text)
        return self.encode_python(text)

    def _no_special(self, ids: list[int], text: str) -> list[int]:
        """Fast-backend ids, checked: a special id there (a crafted file whose vocabulary reaches
        a special token's text) sends the text to the Python encoder, which cannot yield one."""
        if self._special_by_id and not self._special_by_id.keys().isdisjoint(ids):
            logging.getLogger(__name__).warning(
                "tokenizer %s: fast backend produced a special id from plain text; using the "
                "Python encoder", self.name)
            return self.encode_python(text)
        return ids

    def encode_python(self, text: str) -> list[int]:
        """The pure-Python encoder (same ids as the fast backend)."""
        text = normalize_text(text)
        if self._hf is not None:
            return self._encode_python_hf(text)
        ranks = self.mergeable_ranks
        cache = self._cache
        if len(cache) > 200_000:
            cache.clear()
        out: list[int] = []
        for piece in self._compiled().findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = bpe_merge_piece(piece.encode("utf-8"), ranks)
                if len(piece) < 256:
                    cache[piece] = ids
            out.extend(ids)
        return out

    def _compiled(self):
        if self._regex is None:
            self._regex = regex.compile(self.pattern)
        return self._regex

    def _encode_python_hf(self, text: str) -> list[int]:
        import unicodedata

        hf = self._hf
        if hf.nfc:
            text = unicodedata.normalize("NFC", text)
        if hf.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        cache = self._cache
        if len(cache) > 200_000:
            cache.clear()
        out: list[int] = []
        for piece in _split_isolated(self._compiled(), text):
            ids = cache.get(piece)
            if ids is None:
                b = piece.encode("utf-8")
                whole = self.mergeable_ranks.get(b) if hf.ignore_merges else None
                if whole is not None:
                    ids = [whole]
                else:
                    ids = hf_merge_piece([hf.byte_ids[x] for x in b if hf.byte_ids[x] >= 0], hf.merges)
                if len(piece) < 256:
                    cache[piece] = ids
            out.extend(ids)
        return out

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """`encode` of many documents, spread over all cores."""
        texts = [normalize_text(t) for t in texts]
        workers = num_threads or os.cpu_count() or 1
        kind, impl = self._get_backend()
        if kind == "tiktoken":
            # tiktoken releases the GIL while encoding, so threads use all cores. One task per
            # thread over a contiguous slice: per-document tasks cost more than short documents.
            if workers < 2 or len(texts) < 2 or sum(map(len, texts)) < 100_000:
                return [impl.encode_ordinary(t) for t in texts]
            step = -(-len(texts) // workers)
            slices = [texts[i : i + step] for i in range(0, len(texts), step)]
            enc = impl.encode_ordinary
            with concurrent.futures.ThreadPoolExecutor(len(slices)) as ex:
                parts = list(ex.map(lambda ts: [enc(t) for t in ts], slices))
            return [ids for part in parts for ids in part]
        if kind == "hf":
            return [self._no_special(e.ids, t)
                    for e, t in zip(impl.encode_batch(texts, add_special_tokens=False), texts)]
        total = sum(len(t) for t in texts)
        if workers < 2 or total < _PARALLEL_ENCODE_MIN_CHARS:
            return [self.encode_python(t) for t in texts]
        chunks = [texts[i::workers] for i in range(workers)]
        ctx = bpe_train._mp_context()
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            parts = list(ex.map(_encode_many, [self] * workers, chunks))
        out: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
        for i, part in enumerate(parts):
            out[i::workers] = part
        return out

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """For TRUSTED template text only: spelled special tokens become their special ids."""
        if not self.special_tokens:
            return self.encode(text)
        text = normalize_text(text)
        if self._special_splitter is None:
            names = sorted(self.special_tokens, key=len, reverse=True)  # longest first
            self._special_splitter = regex.compile("(" + "|".join(regex.escape(s) for s in names) + ")")
        out: list[int] = []
        for i, part in enumerate(self._special_splitter.split(text)):
            if i % 2:
                out.append(self.special_tokens[part])
            elif part:
                out.extend(self.encode(part))
        return out

    # ----- special tokens ---------------------------------------------------------------------

    def special_id(self, name: str) -> int:
        """Id of a special token, e.g. special_id("<|im_start|>"); KeyError naming the known ones."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(
                f"special token {name!r} is not in tokenizer {self.name!r}; it has {sorted(self.special_tokens)}"
            ) from None

    @property
    def eot_id(self) -> int:
        """Id of <|endoftext|> (document boundary, also used as BOS)."""
        for name in _EOT_NAMES:
            if name in self.special_tokens:
                return self.special_tokens[name]
        return self.special_id("<|endoftext|>")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_by_id

    def with_special_tokens(self, names: Iterable[str] = SPECIAL_TOKENS) -> "Tokenizer":
        """A copy that also has `names` as special tokens (new ids after the current vocabulary)."""
        specials = dict(self.special_tokens)
        nxt = self.vocab_size
        for s in names:
            if s not in specials:
                specials[s] = nxt
                nxt += 1
        return Tokenizer(
            self.mergeable_ranks, self.pattern, specials, name=self.name, merges=self.merges, _hf=self._hf
        )

    # ----- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids) -> bytes:
        """Bytes of a token sequence; special tokens give their names' bytes."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        table = self._decode_table
        try:
            if ids and min(ids) < 0:  # table[-1] would silently decode
                raise IndexError
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < len(table))]
            raise ValueError(f"token ids out of range [0, {len(table)}): {bad[:5]}") from None

    def decode(self, ids) -> str:
        """Text of a token sequence (invalid UTF-8 becomes U+FFFD, as tiktoken does)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def id_to_bytes(self, token_id: int) -> bytes:
        return self._decode_table[token_id]

    def token_byte_lengths(self) -> np.ndarray:
        """[vocab_size] int32 bytes per token; special tokens (and unused ids) count 0 bytes."""
        return np.array([0 if b is None else len(b) for b in self._ordinary], dtype=np.int32)

    # ----- save / load -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        tokens = [None if b is None else escape_token(b) for b in self._ordinary]
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "tokens": tokens,
            "merges": None if self.merges is None else [list(m) for m in self.merges],
            "hf_tokenizer_json": None if self._hf is None else self._hf.json_str,
        }

    def save(self, path) -> pathlib.Path:
        """Writes the tokenizer; `path` is a file, or a directory that gets `tokenizer.zipchat.json`."""
        path = pathlib.Path(path)
        if path.is_dir() or path.suffix == "":
            path.mkdir(parents=True, exist_ok=True)
            path = path / SAVE_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dumps_readable(self.to_dict()), encoding="utf-8")
        return path


def _dumps_readable(d: dict) -> str:
    """JSON with one token (or merge, or special token) per line, so the file reads as a table."""

    def dump(v):
        return json.dumps(v, ensure_ascii=False)

    parts = []
    for k, v in d.items():
        if isinstance(v, list) and v:
            body = ",\n".join(dump(x) for x in v)
            parts.append(f"{dump(k)}: [\n{body}\n]")
        elif isinstance(v, dict) and v:
            body = ",\n".join(f"{dump(a)}: {dump(b)}" for a, b in v.items())
            parts.append(f"{dump(k)}: {{\n{body}\n}}")
        else:
            parts.append(f"{dump(k)}: {dump(v)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _split_isolated(compiled, text: str):
    """Hugging Face Split(behavior="Isolated"): the matches and the unmatched gaps between them."""
    pos = 0
    for m in compiled.finditer(text):
        s, e = m.span()
        if s > pos:
            yield text[pos:s]
        if e > s:
            yield text[s:e]
        pos = e
    if pos < len(text):
        yield text[pos:]


def _encode_many(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode_python(t) for t in texts]


# ------------------------------------------------------------------------------------------
# Training.


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = GPT4_PATTERN,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    *,
    num_workers: int | None = None,
    name: str = "zipchat",
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (merge list identical to rustbpe's for the same input).

    Args:
      texts: iterable of documents; read once, streamed.
      vocab_size: total vocabulary including the 256 byte tokens and the special tokens.
      pattern: split regex (GPT-4's by default; see `gpt4_pattern` for the digit grouping).
      special_tokens: names; they get the ids after the merges, in order.
      num_workers: processes counting chunks on large corpora (default: one per core, up to 8).

    Returns:
      Tokenizer with 256 + n_merges ordinary tokens and the special tokens. If the corpus runs out
      of pairs, fewer merges are learned (logged), so vocab_size is smaller than asked.
    """
    special_tokens = tuple(special_tokens)
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}")
    min_size = 256 + len(special_tokens)
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least 256 byte tokens + "
            f"{len(special_tokens)} special tokens = {min_size}"
        )
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"invalid split pattern {pattern!r}: {e}") from None
    num_merges = int(vocab_size) - min_size
    counts = bpe_train.count_chunks(texts, pattern, num_workers=num_workers)
    merges = bpe_train.learn_merges(counts, num_merges)
    if len(merges) < num_merges:
        log.warning("corpus ran out of pairs: learned %d of %d merges", len(merges), num_merges)
    return from_merges(merges, pattern, special_tokens, name=name)


def from_merges(
    merges: Sequence[tuple[int, int]], pattern: str, special_tokens: Sequence[str] = SPECIAL_TOKENS, *, name="zipchat"
) -> Tokenizer:
    """Tokenizer from a merge list (merge i creates id 256 + i); specials follow the merges.

    Two merges can spell the same bytes (e.g. (ab, c) and (a, bc)); the ranks keep the first,
    as tiktoken-style encoding can only ever produce the lowest rank of a byte string.
    """
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    for i, (a, b) in enumerate(merges):
        if not (0 <= a < len(vocab) and 0 <= b < len(vocab)):
            raise ValueError(f"merge {i} refers to unknown ids ({a}, {b})")
        tok = vocab[a] + vocab[b]
        vocab.append(tok)
        ranks.setdefault(tok, 256 + i)
    base = 256 + len(merges)
    specials = {s: base + i for i, s in enumerate(special_tokens)}
    return Tokenizer(ranks, pattern, specials, name=name, merges=list(merges))


# ------------------------------------------------------------------------------------------
# Loading.


def load(path, *, pattern: str | None = None, special_tokens: dict[str, int] | None = None) -> Tokenizer:
    """Reads a tokenizer from `path`: a file or a directory holding one.

    Formats: our `tokenizer.zipchat.json`; tiktoken `*.tiktoken` (official names get their
    pattern and special tokens); GPT-2 `encoder.json` + `vocab.bpe`; Hugging Face `tokenizer.json`
    (byte-level BPE). `pattern` / `special_tokens` override what the file implies.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file or directory not found: {path}")
    if path.is_dir():
        path = _find_in_dir(path)
    try:
        return _load_file(path, pattern, special_tokens)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError, UnicodeDecodeError) as e:
        text = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
        raise ValueError(text if str(path) in text else f"malformed tokenizer file {path}: {text}") from None


def _load_file(path: pathlib.Path, pattern, special_tokens) -> Tokenizer:
    """`load` of one file; any error here is turned into a ValueError naming the file."""
    for p in (path, path.parent / "encoder.json", path.parent / "vocab.bpe") if path.name in (
            "vocab.bpe", "encoder.json") else (path,):
        if p.is_file() and p.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
            raise ValueError(f"tokenizer file {p}: {p.stat().st_size} bytes, more than {MAX_TOKENIZER_FILE_BYTES}")
    suffix = path.suffix.lower()
    if suffix == ".tiktoken":
        tok = _load_tiktoken(path, pattern, special_tokens)
    elif path.name == "vocab.bpe" or path.name == "encoder.json":
        tok = _load_gpt2(path.parent / "encoder.json", path.parent / "vocab.bpe", pattern, special_tokens)
    elif suffix == ".json":
        d = _read_json(path)
        if isinstance(d, dict) and d.get("format") == _FORMAT:
            tok = _from_dict(d, path)
        elif isinstance(d, dict) and isinstance(d.get("model"), dict):
            tok = _load_hf(d, path)
        else:
            raise ValueError(f"malformed tokenizer file {path}: neither a zipchat nor a Hugging Face tokenizer")
        if pattern is not None or special_tokens is not None:
            tok = Tokenizer(
                tok.mergeable_ranks,
                pattern or tok.pattern,
                special_tokens if special_tokens is not None else tok.special_tokens,
                name=tok.name,
                merges=tok.merges,
                _hf=tok._hf,
            )
    else:
        raise ValueError(f"unknown tokenizer file type: {path} (expected .tiktoken, .json, vocab.bpe)")
    return tok


def _read_json(path: pathlib.Path):
    """Parsed JSON of a tokenizer file; ValueError naming it when too large, not UTF-8 or JSON."""
    size = path.stat().st_size
    if size > MAX_TOKENIZER_FILE_BYTES:
        raise ValueError(f"tokenizer file {path}: {size} bytes, more than {MAX_TOKENIZER_FILE_BYTES}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"malformed tokenizer file {path}: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed tokenizer file {path}: not valid JSON ({e})") from None


def _find_in_dir(d: pathlib.Path) -> pathlib.Path:
    for name in (SAVE_FILENAME, "tokenizer.json", "encoder.json"):
        if (d / name).is_file():
            return d / name
    tk = sorted(d.glob("*.tiktoken"))
    if len(tk) == 1:
        return tk[0]
    if len(tk) > 1:
        raise ValueError(f"{d} holds several .tiktoken files; pass one: {[p.name for p in tk]}")
    raise FileNotFoundError(
        f"no tokenizer in {d} (looked for {SAVE_FILENAME}, tokenizer.json, encoder.json, *.tiktoken)"
    )


def _from_dict(d: dict, path) -> Tokenizer:
    try:
        if d.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported version {d.get('version')}")
        ranks = {}
        for i, t in enumerate(d["tokens"]):
            if t is not None:
                ranks[unescape_token(t)] = i
        hf = None
        if d.get("hf_tokenizer_json"):
            hf = _load_hf(json.loads(d["hf_tokenizer_json"]), path)._hf
        return Tokenizer(
            ranks,
            d["pattern"],
            {str(k): int(v) for k, v in d["special_tokens"].items()},
            name=d.get("name", "zipchat"),
            merges=d.get("merges"),
            _hf=hf,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed tokenizer file {path}: {e!r}") from None


def _load_tiktoken(path: pathlib.Path, pattern, special_tokens) -> Tokenizer:
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok_b64, rank = line.split()
                ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"malformed tiktoken file {path}, line {lineno}: {line[:80]!r} ({e})") from None
    stem = path.name[: -len(".tiktoken")]
    if stem in _OFFICIAL_TIKTOKEN:
        off_pattern, off_special = _OFFICIAL_TIKTOKEN[stem]
    else:
        off_pattern, off_special = None, None
    pattern = pattern or off_pattern
    if pattern is None:
        raise ValueError(
            f"{path}: not an official tiktoken name ({sorted(_OFFICIAL_TIKTOKEN)}); pass pattern= to load()"
        )
    if special_tokens is None:
        special_tokens = off_special if off_special is not None else {"<|endoftext|>": max(ranks.values()) + 1}
    return Tokenizer(ranks, pattern, special_tokens, name=stem)


def _load_gpt2(encoder_path: pathlib.Path, bpe_path: pathlib.Path, pattern, special_tokens) -> Tokenizer:
    for p in (encoder_path, bpe_path):
        if not p.is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer needs both encoder.json and vocab.bpe; missing {p}")
    u2b = _unicode_to_bytes()
    encoder = _read_json(encoder_path)
    if not isinstance(encoder, dict):
        raise ValueError(f"malformed {encoder_path}: expected a JSON object of token -> id")
    lines = bpe_path.read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [ln.split() for ln in lines if ln.strip()]

    def to_bytes(s, where):
        try:
            return bytes(u2b[c] for c in s)
        except KeyError:
            raise ValueError(f"malformed {where}: token {s!r} is not in the byte-level alphabet") from None

    # Ranks as tiktoken builds them: 256 bytes in the alphabet's order, then one per merge.
    order = list(bytes_to_unicode())
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    for i, m in enumerate(merges):
        if len(m) != 2:
            raise ValueError(f"malformed {bpe_path}, merge {i + 1}: {' '.join(m)!r}")
        ranks[to_bytes(m[0], bpe_path) + to_bytes(m[1], bpe_path)] = 256 + i
    specials = {}
    for s, i in encoder.items():
        b = bytes(u2b[c] for c in s) if all(c in u2b for c in s) else None
        if s == "<|endoftext|>" or b is None:
            specials[s] = i
        elif ranks.get(b) != i:
            raise ValueError(f"{encoder_path} disagrees with {bpe_path} on token {s!r}: {i} vs {ranks.get(b)}")
    if len(ranks) + len(specials) != len(encoder):
        raise ValueError(f"{encoder_path} and {bpe_path} have different sizes ({len(encoder)} vs {len(ranks)})")
    return Tokenizer(
        ranks,
        pattern or R50K_PATTERN,
        special_tokens if special_tokens is not None else specials,
        name="gpt2",
    )


def _hf_pre_tokenizer(pre: dict | None, path) -> tuple[str, bool]:
    """(split pattern, add_prefix_space) of a byte-level pre-tokenizer; ValueError otherwise."""
    if pre is None:
        raise ValueError(f"{path}: tokenizer.json without a pre_tokenizer is not byte-level BPE")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if not pre.get("use_regex", True):
            raise ValueError(f"{path}: ByteLevel pre-tokenizer without a split regex is not supported")
        return HF_BYTELEVEL_PATTERN, bool(pre.get("add_prefix_space", False))
    if kind == "Sequence":
        items = pre.get("pretokenizers", [])
        if (
            len(items) == 2
            and items[0].get("type") == "Split"
            and items[1].get("type") == "ByteLevel"
            and not items[1].get("use_regex", True)
            and items[0].get("behavior") == "Isolated"
            and not items[0].get("invert", False)
            and "Regex" in items[0].get("pattern", {})
        ):
            return items[0]["pattern"]["Regex"], bool(items[1].get("add_prefix_space", False))
        if len(items) == 1:
            return _hf_pre_tokenizer(items[0], path)
    raise ValueError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:200]}")


def _load_hf(d: dict, path) -> Tokenizer:
    model = d["model"]
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: only byte-level BPE models are supported, got model type {model.get('type')!r}")
    for opt in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(opt):
            raise ValueError(f"{path}: BPE option {opt}={model[opt]!r} is not byte-level BPE (unsupported)")
    if model.get("dropout"):
        raise ValueError(f"{path}: BPE dropout={model['dropout']} makes encoding random (unsupported)")
    pattern, add_prefix_space = _hf_pre_tokenizer(d.get("pre_tokenizer"), path)
    norm = d.get("normalizer")
    nfc = False
    if norm is not None:
        if norm.get("type") == "NFC":
            nfc = True
        else:
            raise ValueError(f"{path}: unsupported normalizer {norm.get('type')!r}")
    u2b = _unicode_to_bytes()
    added = {t["content"]: int(t["id"]) for t in d.get("added_tokens", [])}
    ranks: dict[bytes, int] = {}
    for s, i in model["vocab"].items():
        if s in added:
            continue
        try:
            b = bytes(u2b[c] for c in s)
        except KeyError:
            raise ValueError(f"malformed {path}: vocab entry {s!r} is not in the byte-level alphabet") from None
        ranks[b] = int(i)
    vocab = model["vocab"]
    merges = {}
    for pri, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ") if isinstance(m, str) else m
        try:
            merged = vocab[left + right]
            if left + right not in added:  # a merge must never produce a special token
                merges[(vocab[left], vocab[right])] = (pri, merged)
        except KeyError:
            raise ValueError(f"malformed {path}: merge {pri} {m!r} uses a token that is not in the vocab") from None
    byte_ids = tuple(ranks.get(bytes([x]), -1) for x in range(256))
    # The fast backend: the same file without added tokens (so text never yields them), without
    # post-processing (no BOS/EOS added), and without any vocabulary entry that is a special
    # token (by text or id) or merge that reaches or uses one: a crafted file could otherwise
    # spell a special token through ordinary merges.
    special_ids = set(added.values())
    keep = {s: i for s, i in vocab.items() if s not in added and int(i) not in special_ids}
    d_plain = dict(d)
    d_plain["added_tokens"] = []
    d_plain["post_processor"] = None
    d_plain["model"] = dict(model, vocab=keep, merges=[
        m for m in model.get("merges", [])
        if all(p in keep for p in ((m.split(" ") if isinstance(m, str) else list(m)) + [
            "".join(m.split(" ") if isinstance(m, str) else m)]))])
    hf = _HFModel(
        merges=merges,
        byte_ids=byte_ids,
        ignore_merges=bool(model.get("ignore_merges", False)),
        add_prefix_space=add_prefix_space,
        nfc=nfc,
        json_str=json.dumps(d_plain, ensure_ascii=False),
    )
    return Tokenizer(ranks, pattern, added, name=pathlib.Path(path).stem, _hf=hf)
