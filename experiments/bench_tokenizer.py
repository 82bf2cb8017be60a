"""Benchmark the tokenizer: BPE training time against Hugging Face tokenizers and rustbpe, and
encoding throughput against tiktoken and Hugging Face tokenizers, on one corpus in one run.

    python -m experiments.bench_tokenizer                      # tinyshakespeare repeated to 17 MB
    python -m experiments.bench_tokenizer --files=corpus.jsonl --vocab_size=32768

The Rust trainers run with --rust_threads threads (RAYON_NUM_THREADS, default 1, set before
they are imported); our trainer counts chunks in up to 2 processes and merges in one. Encoding
is measured single-threaded (one document at a time) for every library, plus our batch
encoder (all cores) and the pure-Python fallback (on a slice). Prints a table, then one JSON
line with train_s, hf_train_s, rustbpe_train_s, encode_mb_s, tiktoken_mb_s, hf_encode_mb_s,
corpus_mb, vocab_size and more.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def define_flags() -> None:
    flags.DEFINE_list("files", [], "corpus files (.txt/.md paragraphs, .jsonl 'text', .parquet 'text'); "
                      "default: ../shared/data/tinyshakespeare repeated")
    flags.DEFINE_float("corpus_mb", 17.0, "corpus size in MB (the default corpus is repeated up to it; "
                       "given files are read up to it)")
    flags.DEFINE_integer("vocab_size", 32768, "vocabulary size (ours includes the special tokens)")
    flags.DEFINE_integer("rust_threads", 1, "threads for HF tokenizers and rustbpe (RAYON_NUM_THREADS)")
    flags.DEFINE_float("python_encode_mb", 1.0, "MB encoded by the pure-Python fallback (0 = skip)")
    flags.DEFINE_bool("skip_rust", False, "skip HF tokenizers and rustbpe (if not installed)")


def load_corpus(files, corpus_mb: float) -> tuple[list[str], str]:
    """Documents of about corpus_mb MB, and a description."""
    limit = int(corpus_mb * 1e6)
    if files:
        from experiments.train_tokenizer import _source_for

        docs, total = [], 0
        for f in files:
            src = _source_for(pathlib.Path(f))
            for i in range(len(src)):
                if total >= limit:
                    break
                docs.append(src[i])
                total += len(docs[-1].encode("utf-8"))
        return docs, f"{len(files)} file(s)"
    path = _SHARED / "tinyshakespeare" / "input.txt"
    if path.is_file():
        base = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        what = "tinyshakespeare, repeated"
    else:
        from data import synthetic

        base = list(synthetic.iter_documents(synthetic.make_world(0, 1000), 0, 5_000_000))
        what = "synthetic world (tinyshakespeare not found), repeated"
    docs, total = [], 0
    while total < limit:
        for d in base:
            docs.append(d)
            total += len(d.encode("utf-8"))
            if total >= limit:
                break
    return docs, what


def _mb_s(n_bytes: int, seconds: float) -> float:
    return n_bytes / 1e6 / max(seconds, 1e-9)


def run(files, corpus_mb, vocab_size, python_encode_mb=1.0, skip_rust=False) -> dict:
    from core import bpe_train
    from core import tokenizer as tok_lib

    docs, what = load_corpus(files, corpus_mb)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"corpus: {what}: {n_bytes / 1e6:.2f} MB, {len(docs):,} documents; vocab {vocab_size:,}", flush=True)
    res: dict = {"corpus_mb": n_bytes / 1e6, "vocab_size": vocab_size, "n_docs": len(docs)}

    # ---- training ----
    n_special = len(tok_lib.SPECIAL_TOKENS)
    t0 = time.perf_counter()
    counts = bpe_train.count_chunks(docs, tok_lib.GPT4_PATTERN)
    t1 = time.perf_counter()
    merges = bpe_train.learn_merges(counts, vocab_size - 256 - n_special)
    t2 = time.perf_counter()
    ours = tok_lib.from_merges(merges, tok_lib.GPT4_PATTERN)
    res.update(train_s=t2 - t0, count_s=t1 - t0, merge_s=t2 - t1, unique_chunks=len(counts), merges=len(merges))
    del counts
    print(f"ours: {res['train_s']:.2f} s (count chunks {res['count_s']:.2f} s, merges {res['merge_s']:.2f} s), "
          f"{res['unique_chunks']:,} unique chunks, {len(merges):,} merges", flush=True)

    hf = None
    if not skip_rust:
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(tok_lib.GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=list(tok_lib.SPECIAL_TOKENS))
        t0 = time.perf_counter()
        hf.train_from_iterator(docs, trainer)
        res["hf_train_s"] = time.perf_counter() - t0
        print(f"HF tokenizers: {res['hf_train_s']:.2f} s", flush=True)

        import logging

        import rustbpe

        logging.getLogger("rustbpe").setLevel(logging.WARNING)  # its per-percent progress lines
        rb = rustbpe.Tokenizer()
        t0 = time.perf_counter()
        rb.train_from_iterator(iter(docs), vocab_size - n_special, pattern=tok_lib.GPT4_PATTERN)
        res["rustbpe_train_s"] = time.perf_counter() - t0
        rb_vocab = [bytes(b) for b, _ in sorted(rb.get_mergeable_ranks(), key=lambda x: x[1])]
        vocab = [bytes([i]) for i in range(256)]
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
        res["merges_equal_rustbpe"] = rb_vocab == vocab
        print(f"rustbpe: {res['rustbpe_train_s']:.2f} s; merge lists identical: {res['merges_equal_rustbpe']}",
              flush=True)

    # ---- encoding (one document at a time, one thread) ----
    import tiktoken

    ref = tiktoken.Encoding(name="bench", pat_str=ours.pattern, mergeable_ranks=ours.mergeable_ranks,
                            special_tokens=ours.special_tokens)
    ref.encode_ordinary(docs[0])  # warm-up (regex compilation)
    ours.encode(docs[0])

    t0 = time.perf_counter()
    ours_ids = [ours.encode(d) for d in docs]
    res["encode_mb_s"] = _mb_s(n_bytes, time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref_ids = [ref.encode_ordinary(d) for d in docs]
    res["tiktoken_mb_s"] = _mb_s(n_bytes, time.perf_counter() - t0)
    res["encode_equals_tiktoken"] = ours_ids == ref_ids
    n_tokens = sum(map(len, ours_ids))
    res["bytes_per_token"] = n_bytes / max(n_tokens, 1)
    del ours_ids, ref_ids
    t0 = time.perf_counter()
    ours.encode_batch(docs)
    res["encode_batch_mb_s"] = _mb_s(n_bytes, time.perf_counter() - t0)
    if hf is not None:
        hf.encode(docs[0], add_special_tokens=False)
        t0 = time.perf_counter()
        for d in docs:
            hf.encode(d, add_special_tokens=False)
        res["hf_encode_mb_s"] = _mb_s(n_bytes, time.perf_counter() - t0)
    if python_encode_mb > 0:
        sub, size = [], 0
        for d in docs:
            sub.append(d)
            size += len(d.encode("utf-8"))
            if size >= python_encode_mb * 1e6:
                break
        ours._cache.clear()
        t0 = time.perf_counter()
        py_ids = [ours.encode_python(d) for d in sub]
        res["python_encode_mb_s"] = _mb_s(size, time.perf_counter() - t0)
        res["python_equals_tiktoken"] = py_ids == [ref.encode_ordinary(d) for d in sub]

    if "hf_train_s" in res:
        res["train_vs_hf"] = res["train_s"] / res["hf_train_s"]
        res["train_vs_rustbpe"] = res["train_s"] / res["rustbpe_train_s"]
    print()
    print(table(res))
    return res


def table(res: dict) -> str:
    def g(k, fmt="{:.2f}"):
        return fmt.format(res[k]) if k in res else "-"

    rows = [
        ("train: ours (pure Python, s)", g("train_s"), "1.00"),
        ("train: HF tokenizers (s)", g("hf_train_s"), g("train_vs_hf", "ours is {:.2f}x")),
        ("train: rustbpe (s)", g("rustbpe_train_s"), g("train_vs_rustbpe", "ours is {:.2f}x")),
        ("encode: ours .encode (MB/s)", g("encode_mb_s"), ""),
        ("encode: tiktoken (MB/s)", g("tiktoken_mb_s"), ""),
        ("encode: HF tokenizers (MB/s)", g("hf_encode_mb_s"), ""),
        ("encode: ours .encode_batch, all cores (MB/s)", g("encode_batch_mb_s"), ""),
        ("encode: ours pure-Python fallback (MB/s)", g("python_encode_mb_s"), ""),
    ]
    lines = ["| measure | value | ratio |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(f"\ncorpus {res['corpus_mb']:.2f} MB, vocab {res['vocab_size']:,}, "
                 f"{res.get('unique_chunks', 0):,} unique chunks, {res.get('bytes_per_token', 0):.3f} bytes/token; "
                 f"merges == rustbpe: {res.get('merges_equal_rustbpe', '-')}, "
                 f"encode == tiktoken: {res.get('encode_equals_tiktoken', '-')}, "
                 f"fallback == tiktoken: {res.get('python_equals_tiktoken', '-')}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.corpus_mb <= 0:
        print("error: --corpus_mb must be > 0", file=sys.stderr)
        sys.exit(2)
    try:
        res = run(FLAGS.files, FLAGS.corpus_mb, FLAGS.vocab_size, FLAGS.python_encode_mb, FLAGS.skip_rust)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    define_flags()
    # Must precede the import of tokenizers / rustbpe (rayon reads it once).
    # absl parses here too (known_only: app.run reports the rest), so '--rust_threads 4' and
    # '--rust_threads=4' both count.
    flags.FLAGS(sys.argv, known_only=True)
    if flags.FLAGS.rust_threads < 1:
        sys.exit(f"--rust_threads must be >= 1, got {flags.FLAGS.rust_threads}")
    _threads = str(flags.FLAGS.rust_threads)
    os.environ["RAYON_NUM_THREADS"] = _threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false" if _threads == "1" else "true")
    app.run(common.cli(main))
