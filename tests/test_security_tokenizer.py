"""Tokenizer files from outside and text from anywhere: plain encode never yields a special id
whatever the file; lone surrogates become U+FFFD (tiktoken's rule) in every encoder; malformed
files are ValueErrors that name the file, checked before tables are allocated."""
import json

import pytest

from core import tokenizer

pytest.importorskip("tokenizers")

SPECIAL = "<|im_end|>"


def _crafted_tokenizer_json(special_id_in_vocab: bool = True) -> dict:
    """A byte-level BPE whose merges spell SPECIAL one character at a time, and whose split
    pattern keeps the whole text as one piece: the vocabulary reaches the special token."""
    b2u = tokenizer.bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    merges = []
    current = SPECIAL[0]
    for ch in SPECIAL[1:]:
        merges.append(f"{current} {ch}")
        current += ch
        vocab.setdefault(current, len(vocab))
    special_id = vocab[SPECIAL] if special_id_in_vocab else len(vocab)
    return {
        "version": "1.0",
        "added_tokens": [{"id": special_id, "content": SPECIAL, "special": True, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": ".+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_plain_encode_never_yields_a_special_id(tmp_path, ignore_merges):
    d = _crafted_tokenizer_json()
    d["model"]["ignore_merges"] = ignore_merges
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(d))
    # the raw file does reach the special id through merges (so this test can fail)
    import tokenizers
    raw = tokenizers.Tokenizer.from_str(json.dumps({**d, "added_tokens": []}))
    special_id = d["added_tokens"][0]["id"]
    assert special_id in raw.encode(SPECIAL, add_special_tokens=False).ids
    tok = tokenizer.load(path)
    assert tok.backend == "hf"
    for text in (SPECIAL, "x" + SPECIAL, SPECIAL * 3):
        for ids in (tok.encode(text), tok.encode_python(text), tok.encode_batch([text])[0]):
            assert special_id not in ids and not any(tok.is_special(i) for i in ids)
            assert tok.decode(ids) == text
        assert tok.encode(text) == tok.encode_python(text)
    assert tok.encode_with_special_tokens(SPECIAL) == [special_id]  # trusted template text only


def test_fast_backend_guard_falls_back(tmp_path):
    # even if a fast backend returned a special id, encode() would not pass it on
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_crafted_tokenizer_json()))
    tok = tokenizer.load(path)
    special_id = tok.special_tokens[SPECIAL]
    assert tok._no_special([1, special_id, 2], SPECIAL) == tok.encode_python(SPECIAL)


def _trained():
    return tokenizer.train_bpe(["hello world, surrogates are not text " * 20], 300)


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "ok \ud83d", "\ud83d\ude00 lone \udc00"])
def test_lone_surrogates_become_replacement_characters(tmp_path, text):
    expected = tokenizer.normalize_text(text)
    assert "\ufffd" in expected and expected.encode("utf-8")
    tok = _trained()
    want = tok.encode(expected)
    assert tok.encode(text) == want
    assert tok.encode_python(text) == want
    assert tok.encode_batch([text, text])[0] == want
    assert tok.encode_with_special_tokens(text + "<|endoftext|>") == want + [tok.eot_id]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_crafted_tokenizer_json(special_id_in_vocab=False)))
    hf_tok = tokenizer.load(path)
    assert hf_tok.encode(text) == hf_tok.encode_python(text) == hf_tok.encode(expected)


def test_normalize_text_matches_tiktoken_rule():
    import tiktoken
    enc = tiktoken.Encoding("t", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={})
    for text in ["plain", "a\ud800b", "\ud83d\ude00", "\udc00\ud800"]:
        assert enc.encode_ordinary(text) == list(tokenizer.normalize_text(text).encode("utf-8"))


@pytest.mark.parametrize("content, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("\xff\xfe", "not valid JSON"),
    ("[1, 2]", "neither a zipchat nor a Hugging Face tokenizer"),
    ('{"model": {"type": "BPE", "vocab": {"a": 1}, "merges": []}, "pre_tokenizer": null}', "pre_tokenizer"),
    ('{"model": {"type": "BPE", "vocab": {"a": [1]}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}}',
     "malformed tokenizer file"),
    ('{"model": {"type": "BPE", "vocab": {"a": 4000000000}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}}',
     "not an integer in [0, 4194304)"),
    ('{"format": "zipchat-bpe", "version": 1, "tokens": ["a"], "pattern": ".", "special_tokens": {"<s>": 10000000000}}',
     "not an integer in [0, 4194304)"),
    ('{"format": "zipchat-bpe", "version": 1, "tokens": 5, "pattern": ".", "special_tokens": {}}',
     "malformed tokenizer file"),
])
def test_malformed_tokenizer_files_name_the_file(tmp_path, content, fragment):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape") if "\xff" not in content else b"\xff\xfe")
    with pytest.raises(ValueError) as info:
        tokenizer.load(path)
    assert str(path) in str(info.value) and fragment in str(info.value), str(info.value)


def test_huge_tiktoken_rank_is_refused_before_allocation(tmp_path):
    path = tmp_path / "mine.tiktoken"
    path.write_text("YQ== 0\nYg== 99999999999\n")
    with pytest.raises(ValueError, match="not an integer in"):
        tokenizer.load(path, pattern=r"\S+")


def test_gpt2_files_errors_name_the_file(tmp_path):
    (tmp_path / "encoder.json").write_text("[" * 100_000)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="encoder.json") as info:
        tokenizer.load(tmp_path / "vocab.bpe")
    assert "nested too deeply" in str(info.value)
    (tmp_path / "encoder.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        tokenizer.load(tmp_path)
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=str(tmp_path)):
        tokenizer.load(tmp_path / "vocab.bpe")


def test_oversized_tokenizer_file_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "MAX_TOKENIZER_FILE_BYTES", 100)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_crafted_tokenizer_json()))
    with pytest.raises(ValueError, match=f"tokenizer file {path}: .* more than 100"):
        tokenizer.load(path)
