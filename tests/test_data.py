"""Readers and the grain pipeline: exact coverage, correct packing, sharding, resumption."""
import collections
import itertools
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import tokenizer as tokenizer_lib
from data import pipeline, readers, synthetic


@pytest.fixture(scope="module")
def world():
    return synthetic.make_world(seed=1, n_entities=100)


@pytest.fixture(scope="module")
def tok(world):
    return tokenizer_lib.train_bpe(synthetic.Corpus(world, 0, 400_000)[:300], vocab_size=400)


def _docs(n, seed=0):
    """Distinct documents of very different lengths, including empty and longer-than-a-row ones."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "lambda"]
    out = []
    for i in range(n):
        k = int(rng.choice([0, 1, 3, 10, 40, 120]))
        out.append(f"doc {i}: " + " ".join(rng.choice(words, k)) if k else "")
    return out


def _drain(it):
    out = list(it)
    it.close()
    return out


def _rows(batches):
    return [{k: b[k][r] for k in b} for b in batches for r in range(len(b["tokens"]))]


def _check_rows(rows, row_len, eot, concat=True):
    """Row invariants: segments 1..k contiguous, positions restart per segment, padding at the end."""
    for row in rows:
        seg, pos, tokens = row["segment_ids"], row["positions"], row["tokens"]
        assert seg.shape == pos.shape == tokens.shape == (row_len,)
        assert seg.dtype == pos.dtype == tokens.dtype == np.int32
        live = seg > 0
        n = int(live.sum())
        assert live[:n].all() and not live[n:].any(), "padding only at the end of a row"
        assert (tokens[n:] == 0).all() and (pos[n:] == 0).all()
        starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
        assert list(seg[starts]) == list(range(1, len(starts) + 1))
        expect_pos = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
        assert np.array_equal(pos[:n], expect_pos)
        # A new segment begins at each <|endoftext|>; with concat packing only there and at the
        # row start (best-fit may also place the tail of an over-long document mid-row).
        assert set(np.flatnonzero(tokens[:n] == eot)) <= set(starts)
        if concat:
            assert set(starts) - {0} <= set(np.flatnonzero(tokens[:n] == eot))


def _expected(docs, tok):
    return [[tok.eot_id] + ids for ids in tok.encode_batch(docs)]


def _split_at_eot(stream, eot):
    stream = list(stream)
    cuts = [i for i, t in enumerate(stream) if t == eot] + [len(stream)]
    assert cuts[0] == 0
    return [stream[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _sorted(seqs):
    return sorted(tuple(s) for s in seqs)


# ----------------------------------------------------------------------------------------------
# Pipeline


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_packing_loses_and_duplicates_no_token(tok, packing):
    docs = _docs(300)
    seq_len = 63
    it = pipeline.make_train_iterator(docs, tok, seq_len, batch_size=5, seed=3, process_index=0, process_count=1,
                                      packing=packing, num_epochs=1, drop_remainder=False, bestfit_window=64)
    rows = _rows(_drain(it))
    _check_rows(rows, seq_len + 1, tok.eot_id, concat=packing == "concat")
    expected = _expected(docs, tok)
    if packing == "concat":
        live = [r["tokens"][r["segment_ids"] > 0] for r in rows]
        assert all(len(x) == seq_len + 1 for x in live[:-1]), "concat rows are full"
        assert _sorted(_split_at_eot(np.concatenate(live), tok.eot_id)) == _sorted(expected)
    else:
        # Every row starts at a document start or with a piece of an over-long document, and the
        # pieces are exactly the documents cut into row-sized parts.
        r = seq_len + 1
        pieces = [d[k:k + r] for d in expected for k in range(0, len(d), r)]
        got = [row["tokens"][row["segment_ids"] == s] for row in rows for s in range(1, row["segment_ids"].max() + 1)]
        assert _sorted(got) == _sorted(pieces)
        pad = np.mean([(row["segment_ids"] == 0).mean() for row in rows])
        assert pad < 0.15, pad


def test_per_process_sharding_covers_data_exactly_once(tok):
    docs = _docs(203, seed=1)
    seen = []
    first_batches = []
    for p in range(4):
        it = pipeline.make_train_iterator(docs, tok, 31, batch_size=2, seed=5, process_index=p, process_count=4,
                                          num_epochs=1, drop_remainder=False)
        batches = _drain(it)
        first_batches.append(batches[0]["tokens"])
        live = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in _rows(batches)])
        seen += _split_at_eot(live, tok.eot_id)
    assert _sorted(seen) == _sorted(_expected(docs, tok))
    assert not np.array_equal(first_batches[0], first_batches[1])


@pytest.mark.parametrize("blocks", [None, [5, 1, 7, 3, 3, 9, 2, 4]])
def test_doc_order_epochs_and_processes(blocks):
    n = 34 if blocks is None else sum(blocks)
    pc = 3
    orders = [pipeline.DocOrder(n, None if blocks is None else np.array(blocks), seed=9, shuffle=True,
                                process_index=p, process_count=pc, num_epochs=2) for p in range(pc)]
    for epoch in range(2):
        got = [orders[p][epoch * orders[p].per_epoch + j] for p in range(pc) for j in range(orders[p].per_epoch)]
        assert sorted(got) == list(range(n)), "each epoch covers every document once"
    e0 = [orders[0][j] for j in range(orders[0].per_epoch)]
    e1 = [orders[0][orders[0].per_epoch + j] for j in range(orders[0].per_epoch)]
    assert sorted(e0) == sorted(e1) and e0 != e1, "the same shard, reshuffled each epoch"
    if blocks is not None:
        # Documents of one block are visited consecutively (one row-group read per visit).
        starts = np.cumsum([0] + blocks)
        block_of = np.searchsorted(starts, e0, side="right") - 1
        assert len([k for k, _ in itertools.groupby(block_of)]) == len(set(block_of))
    plain = pipeline.DocOrder(n, None, seed=9, shuffle=False, process_index=1, process_count=pc, num_epochs=1)
    assert [plain[j] for j in range(plain.per_epoch)] == list(range(1, n, pc))


def test_shuffle_depends_on_seed(tok):
    docs = _docs(100, seed=2)

    def first(seed):
        it = pipeline.make_train_iterator(docs, tok, 31, 4, seed=seed, process_index=0, process_count=1)
        b = next(it)["tokens"]
        it.close()
        return b

    assert np.array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_resume_gives_identical_batches(tok, packing):
    docs = _docs(60, seed=3)  # small, so the stream wraps around epochs

    def make():
        return pipeline.make_train_iterator(docs, tok, 47, 3, seed=11, process_index=0, process_count=1,
                                            packing=packing, bestfit_window=16)

    it = make()
    for _ in range(9):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(25)]
    it.close()
    resumed = make()
    resumed.set_state(state)
    again = [next(resumed) for _ in range(25)]
    for a, b in zip(after, again):
        for k in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(a[k], b[k])
    resumed.close()
    other = pipeline.make_train_iterator(docs, tok, 48, 3, seed=11, process_index=0, process_count=1, packing=packing)
    with pytest.raises(ValueError, match="seq_len"):
        other.set_state(state)
    other.close()


def test_worker_processes_resume_and_cover_the_epoch(tok):
    docs = _docs(120, seed=4)

    def make():
        return pipeline.make_train_iterator(docs, tok, 63, 16, seed=1, process_index=0, process_count=1,
                                            num_epochs=1, drop_remainder=False, num_workers=2)

    it = make()
    head = [next(it) for _ in range(2)]
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    it.close()
    resumed = make()
    resumed.set_state(json.loads(json.dumps(state)))
    tail = _drain(resumed)  # the rest of the epoch
    assert len(tail) > len(after)
    for a, b in zip(after, tail):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    rows = _rows(head + tail)
    _check_rows(rows, 64, tok.eot_id)
    # Each worker packs its own slice of the documents, so every document is a run of segments
    # that starts with <|endoftext|> inside one worker's rows; compare the multisets of tokens.
    got = collections.Counter(np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows]).tolist())
    assert got == collections.Counter(t for d in _expected(docs, tok) for t in d)


def test_end_to_end_on_synthetic_world_decodes_to_corpus_text(tok, world):
    corpus = synthetic.Corpus(world, seed=0, max_bytes=200_000)
    it = pipeline.make_train_iterator(corpus, tok, 127, 2, seed=0, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    text = "\n".join(corpus)
    row = batch["tokens"][0]
    seg = batch["segment_ids"][0]
    for s in range(1, seg.max() + 1):
        piece = [t for t in row[seg == s] if t != tok.eot_id]
        assert tok.decode(piece) in text


def test_pipeline_errors(tok):
    with pytest.raises(ValueError, match="empty"):
        pipeline.make_train_iterator([], tok, 16, 2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no documents"):
        pipeline.make_train_iterator(["a", "b"], tok, 16, 2, process_index=3, process_count=4)
    with pytest.raises(ValueError, match="packing"):
        pipeline.make_train_iterator(["a"], tok, 16, 2, process_index=0, process_count=1, packing="greedy")
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_train_iterator(["a"], tok, 16, 2, process_index=2, process_count=2)


def test_bestfit_pack_is_tight():
    rows = pipeline.bestfit_pack([5, 5, 3, 7, 2, 10, 1, 23], row_len=10)
    assert all(sum(b - a for _, a, b in r) <= 10 for r in rows)
    pieces = sorted((d, a, b) for r in rows for d, a, b in r)
    assert pieces == [(0, 0, 5), (1, 0, 5), (2, 0, 3), (3, 0, 7), (4, 0, 2), (5, 0, 10), (6, 0, 1),
                      (7, 0, 10), (7, 10, 20), (7, 20, 23)]
    assert len(rows) == 6  # 61 tokens: 3 full rows + [7,3] [5,5] [3,2,1] -> optimal


# ----------------------------------------------------------------------------------------------
# Readers


def test_text_reader(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
    (tmp_path / "sub" / "b.txt").write_text("only one")
    (tmp_path / "skip.bin").write_text("not text")
    files = readers.TextFiles(tmp_path)
    assert list(files) == ["first para\nline two\n\n\nsecond para\n", "only one"]
    paras = readers.TextFiles(tmp_path, split="paragraph")
    assert list(paras) == ["first para\nline two", "second para\n", "only one"]
    lines = readers.TextFiles(tmp_path / "a.txt", split="line")
    assert list(lines) == ["first para", "line two", "second para"]
    assert pickle.loads(pickle.dumps(paras))[1] == "second para\n"
    with pytest.raises(ValueError, match="does not exist"):
        readers.TextFiles(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        readers.TextFiles(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="no documents"):
        readers.TextFiles(tmp_path / "empty")


def test_jsonl_reader(tmp_path):
    rows = [{"text": "héllo", "id": 1}, {"text": "world\nwide", "id": 2}, {"text": "", "id": 3}]
    path = tmp_path / "part-0.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    docs = readers.JsonlFiles(path)
    assert list(docs) == ["héllo", "world\nwide", ""] and docs[-1] == ""
    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps({"meta": {"body": "deep"}}) + "\n")
    assert list(readers.JsonlFiles(nested, text_field="meta.body")) == ["deep"]
    with pytest.raises(ValueError, match=r"part-0\.jsonl.*no field 'body'"):
        readers.JsonlFiles(path, text_field="body")
    with pytest.raises(ValueError, match="does not exist"):
        readers.JsonlFiles(tmp_path / "nope.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        readers.JsonlFiles(tmp_path / "blank.jsonl")


def test_parquet_reader_fineweb_layout(tmp_path, tok):
    texts = [f"web page {i} " + "words " * (i % 7) for i in range(50)]
    root = tmp_path / "fineweb" / "data"
    for shard, (lo, hi) in enumerate([(0, 23), (23, 50)]):
        d = root / f"CC-MAIN-2024-1{shard}"
        d.mkdir(parents=True)
        table = pa.table({"text": texts[lo:hi], "id": list(range(lo, hi)), "url": ["u"] * (hi - lo)})
        pq.write_table(table, d / "000_00000.parquet", row_group_size=6)
    src = readers.ParquetFiles(tmp_path / "fineweb")
    assert len(src) == 50 and list(src) == texts
    assert list(src.block_sizes) == [6, 6, 6, 5, 6, 6, 6, 6, 3]
    assert src[-1] == texts[-1] and pickle.loads(pickle.dumps(src))[30] == texts[30]
    # Through the pipeline with row-group shards: every document exactly once over 2 processes.
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(src, tok, 15, 2, seed=0, process_index=p, process_count=2,
                                          num_epochs=1, drop_remainder=False)
        live = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in _rows(_drain(it))])
        seen += _split_at_eot(live, tok.eot_id)
    assert _sorted(seen) == _sorted(_expected(texts, tok))
    assert readers.open_source(f"parquet:{root}")[0] == texts[0]
    with pytest.raises(ValueError, match="no column 'content'"):
        readers.ParquetFiles(root, column="content")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(ValueError, match="no rows"):
        readers.ParquetFiles(empty)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        readers.ParquetFiles(tmp_path / "empty_dir")


def test_gsm8k_reader_and_open_source(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"question": "Q1?", "answer": "3+4 = <<3+4=7>>7\n#### 7"}) + "\n"
        + json.dumps({"question": "Q2?", "answer": "a\n#### 1,234"}) + "\n")
    probs = readers.read_gsm8k(path)
    assert [p["answer"] for p in probs] == ["7", "1234"] and probs[0]["solution"].endswith("#### 7")
    docs = readers.open_source(f"gsm8k:{path}")
    assert docs[0] == "Question: Q1?\nAnswer: 3+4 = <<3+4=7>>7\n#### 7\n"
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"body": "x"}) + "\n")
    both = readers.open_source(f"jsonl:{jl},field=body + gsm8k:{path}")
    assert len(both) == 3 and both[0] == "x" and both[2].startswith("Question: Q2?")
    synth = readers.open_source("synthetic:seed=1,entities=100,bytes=300K")
    assert abs(sum(len(d.encode()) for d in synth) - 300_000) < 15_000
    for bad, msg in [("csv:/x", "unknown kind"), ("jsonl:" + str(jl) + ",colour=red", "unknown option"),
                     ("parquet", "needs a path"), ("", "empty"), ("synthetic:bytes=lots", "byte size")]:
        with pytest.raises(ValueError, match=msg):
            readers.open_source(bad)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q", "answer": "no final line"}) + "\n")
    with pytest.raises(ValueError, match="####"):
        readers.read_gsm8k(bad)


def test_gsm8k_reader_on_real_file(shared_data):
    train = readers.read_gsm8k(shared_data / "gsm8k" / "train.jsonl")
    test = readers.read_gsm8k(shared_data / "gsm8k" / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0]["answer"] == "72"
    assert all(float(p["answer"]) == float(p["answer"]) for p in train)  # every answer parses as a number
