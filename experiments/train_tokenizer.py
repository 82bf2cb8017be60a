"""Train a byte-level BPE tokenizer and compare its compression with other tokenizers.

    python -m experiments.train_tokenizer --out_dir=runs/tok                      # synthetic world
    python -m experiments.train_tokenizer --files=data/fineweb/ --vocab_size=32768 --max_bytes=50M \
        --compare=../shared/data/tokenizers/r50k_base.tiktoken,../shared/data/tokenizers/cl100k_base.tiktoken

Reads --files (.txt/.md: one document per paragraph; .jsonl: field "text"; .parquet: column
"text"; directories are searched) or, by default, the embedded synthetic world (--seed,
--synthetic_bytes). The last documents (about --heldout_bytes, at most 10%) are held out; the
tokenizer is trained on up to --max_bytes of the rest. Writes --out_dir/tokenizer.zipchat.json
and tokenizer_report.json, and prints the training time and a table of bytes per token on the
held-out text, with every tokenizer given in --compare (any file core.tokenizer.load reads)
side by side.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Iterator, Sequence

from absl import app, flags

from core import tokenizer as tok_lib
from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    # --out_dir and --seed (here: the synthetic world's seed) are the shared ones; --preset and
    # --mesh come along and are ignored, a tokenizer has no model size or device mesh.
    common.define_common_flags(default_out_dir="runs/tokenizer")
    flags.DEFINE_list("files", [], "training text: files or directories (.txt/.md, .jsonl, .parquet); "
                      "default: the synthetic world")
    flags.DEFINE_integer("vocab_size", 4096, "vocabulary size, including 256 bytes and the special tokens")
    flags.DEFINE_list("compare", [], "other tokenizers to compare (.tiktoken, GPT-2 dir, tokenizer.json, ours)")
    flags.DEFINE_string("max_bytes", "10M", "training text budget, e.g. 500K, 20M, 1G")
    flags.DEFINE_string("heldout_bytes", "1M", "held-out text for the compression table")
    flags.DEFINE_integer("max_digits", 3, "split numbers into runs of at most this many digits (GPT-4: 3)")
    flags.DEFINE_string("synthetic_bytes", "30M", "size of the synthetic corpus (default data only)")


def _source_for(path: pathlib.Path):
    from data import readers

    if not path.exists():
        raise ValueError(f"--files: {path} does not exist")
    names = [path.name] if path.is_file() else [f.name for f in path.rglob("*") if f.is_file()]
    if any(n.endswith(".parquet") for n in names):
        return readers.ParquetFiles(path, column="text")
    if any(n.endswith((".jsonl", ".json")) for n in names):
        return readers.JsonlFiles(path, text_field="text")
    if any(n.endswith((".txt", ".md")) for n in names) or path.is_file():
        return readers.TextFiles(path, split="paragraph")
    raise ValueError(f"--files: no .txt/.md/.jsonl/.parquet files in {path}")


def open_documents(files: Sequence[str], seed: int, synthetic_bytes: int) -> tuple[Sequence[str], Sequence[str] | None]:
    """(training documents, held-out documents or None to hold out the tail of the first)."""
    if files:
        from data import readers

        sources = [_source_for(pathlib.Path(f)) for f in files]
        return (sources[0] if len(sources) == 1 else readers.ConcatSource(sources)), None
    from data import synthetic

    world = synthetic.make_world(seed, 1000)
    train = synthetic.Corpus(world, seed, synthetic_bytes)
    # Fresh text from another seed: the same world's style, never trained on.
    heldout = synthetic.Corpus(world, seed + 7919, synthetic_bytes)
    return train, heldout


def take_bytes(docs: Sequence[str], start: int, stop: int, max_bytes: int) -> Iterator[str]:
    """Documents docs[start:stop] until max_bytes of UTF-8 have been yielded."""
    total = 0
    for i in range(start, stop):
        if total >= max_bytes:
            return
        d = docs[i]
        total += len(d.encode("utf-8"))
        yield d


def split_heldout(docs: Sequence[str], heldout_bytes: int) -> int:
    """Index where the held-out tail starts: about heldout_bytes, at most 10% of the documents."""
    n = len(docs)
    if n < 2:
        raise ValueError(f"--files: need at least 2 documents (one is held out), got {n}")
    i, total = n, 0
    while i > n - max(1, n // 10) and total < heldout_bytes:
        i -= 1
        total += len(docs[i].encode("utf-8"))
    return i


def compression_table(rows: list[dict]) -> str:
    """Markdown table of tokenizers' compression on the held-out text."""
    ours = rows[0]["tokens"]
    lines = ["| tokenizer | vocab | tokens | bytes/token | tokens vs ours |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['vocab_size']:,} | {r['tokens']:,} | {r['bytes_per_token']:.3f} | "
            f"{r['tokens'] / max(ours, 1):.3f} |"
        )
    return "\n".join(lines)


def measure(tok: tok_lib.Tokenizer, name: str, heldout: list[str], n_bytes: int) -> dict:
    t0 = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(heldout))
    dt = time.perf_counter() - t0
    return {
        "name": name,
        "vocab_size": tok.vocab_size,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "encode_mb_s": n_bytes / 1e6 / max(dt, 1e-9),
    }


def run(files, vocab_size, out_dir, compare, max_bytes, heldout_bytes, max_digits=3, seed=0,
        synthetic_bytes=30_000_000) -> dict:
    # Check everything the user typed before the slow part.
    compare_toks = []
    for path in compare:
        try:
            compare_toks.append((path, tok_lib.load(path)))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--compare: cannot load {path}: {e}") from None
    n_special = len(tok_lib.SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"--vocab_size={vocab_size}: need at least 256 + {n_special} special tokens")
    docs, heldout_docs = open_documents(files, seed, synthetic_bytes)
    if heldout_docs is None:
        cut = split_heldout(docs, heldout_bytes)
        heldout = list(take_bytes(docs, cut, len(docs), heldout_bytes))
    else:
        cut = len(docs)
        heldout = list(take_bytes(heldout_docs, 0, len(heldout_docs), heldout_bytes))
    n_heldout = sum(len(d.encode("utf-8")) for d in heldout)

    stats = {"bytes": 0, "docs": 0}

    def counted(it):
        for d in it:
            stats["bytes"] += len(d.encode("utf-8"))
            stats["docs"] += 1
            yield d

    print(f"training a {vocab_size:,}-token BPE on up to {max_bytes / 1e6:.1f} MB ...", flush=True)
    t0 = time.perf_counter()
    tok = tok_lib.train_bpe(counted(take_bytes(docs, 0, cut, max_bytes)), vocab_size,
                            pattern=tok_lib.gpt4_pattern(max_digits))
    train_s = time.perf_counter() - t0
    out = pathlib.Path(out_dir)
    path = tok.save(out / tok_lib.SAVE_FILENAME)
    print(f"trained on {stats['bytes'] / 1e6:.2f} MB ({stats['docs']:,} documents) in {train_s:.2f} s "
          f"-> {tok.vocab_size:,} tokens, saved to {path}")

    rows = [measure(tok, "ours", heldout, n_heldout)]
    rows += [measure(t, t.name or pathlib.Path(p).name, heldout, n_heldout) for p, t in compare_toks]
    print(f"\ncompression on {n_heldout / 1e6:.2f} MB of held-out text ({len(heldout):,} documents):")
    print(compression_table(rows))
    report = {
        "train_s": train_s,
        "train_bytes": stats["bytes"],
        "vocab_size": tok.vocab_size,
        "heldout_bytes": n_heldout,
        "tokenizer": str(path),
        "compression": rows,
    }
    (out / "tokenizer_report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from data import readers

    try:
        run(
            files=FLAGS.files,
            vocab_size=FLAGS.vocab_size,
            out_dir=FLAGS.out_dir,
            compare=FLAGS.compare,
            max_bytes=readers.parse_bytes(FLAGS.max_bytes),
            heldout_bytes=readers.parse_bytes(FLAGS.heldout_bytes),
            max_digits=FLAGS.max_digits,
            seed=FLAGS.seed,
            synthetic_bytes=readers.parse_bytes(FLAGS.synthetic_bytes),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(common.cli(main))
