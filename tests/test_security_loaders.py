"""Files from outside (safetensors, the shard index, config.json) that are malformed or hostile:
each gets a ValueError naming the file (and the tensor or key) before memory is allocated, and
nothing is loaded from outside the directory given."""
import json
import pathlib
import shutil
import struct
import tracemalloc

import jax
import pytest

from core import hf, model

GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 16, "n_embd": 8,
        "n_layer": 1, "n_head": 2, "n_positions": 16}


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> pathlib.Path:
    """A valid, tiny GPT-2 checkpoint written by our own saver."""
    cfg = hf.config_from_hf(GPT2)
    params = model.init_params(jax.random.PRNGKey(0), cfg)
    d = tmp_path_factory.mktemp("good")
    hf.save_checkpoint(params, cfg, d)
    return d


def _copy(good_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    d = tmp_path / "ckpt"
    shutil.copytree(good_dir, d)
    return d


def _write_st(path: pathlib.Path, header, data: bytes = b"", raw_header: bytes | None = None,
              length: int | None = None) -> None:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _expect(directory: pathlib.Path, *fragments: str) -> str:
    """load_checkpoint fails with a ValueError containing every fragment; peak memory stays small."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            hf.load_checkpoint(directory)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert peak < 32 * 2**20, f"{peak} bytes allocated before refusing"
    return message


def test_good_checkpoint_loads(good_dir):
    params, cfg = hf.load_checkpoint(good_dir)
    assert cfg.n_layers == 1 and cfg.vocab_size == 16 and len(jax.tree_util.tree_leaves(params)) > 4


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("case, header, data, raw, length, fragment", [
    ("absurd header length", None, b"", b"{}", 2**63, "header length"),
    ("header length past the file", None, b"", b"{}", 10**6, "header length"),
    ("header is a list", [1, 2], b"", None, None, "must be a JSON object"),
    ("deeply nested header", None, b"", b"[" * 200_000 + b"]" * 200_000, None, "nested too deeply"),
    ("not json", None, b"", b"\xff\xfe{", None, "not a readable safetensors file"),
    ("missing keys", {"w": {"dtype": "F32"}}, b"", None, None, "tensor 'w': entry must be an object"),
    ("entry not an object", {"w": [1]}, b"", None, None, "tensor 'w'"),
    ("unknown dtype", {"w": {**F32_4, "dtype": "F33"}}, b"\0" * 16, None, None, "unsupported dtype"),
    ("string shape", {"w": {**F32_4, "shape": ["4"]}}, b"\0" * 16, None, None, "shape must be"),
    ("negative shape", {"w": {**F32_4, "shape": [-4]}}, b"\0" * 16, None, None, "shape must be"),
    ("float offsets", {"w": {**F32_4, "data_offsets": [0.0, 16.0]}}, b"\0" * 16, None, None, "two integers"),
    ("negative offset", {"w": {**F32_4, "data_offsets": [-16, 0]}}, b"\0" * 16, None, None, "outside the data"),
    ("reversed offsets", {"w": {**F32_4, "data_offsets": [16, 0]}}, b"\0" * 16, None, None, "outside the data"),
    ("past the end", {"w": {**F32_4, "data_offsets": [0, 2**40]}}, b"\0" * 16, None, None, "outside the data"),
    ("misaligned", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8, None, None,
     "not aligned"),
    ("bytes disagree with shape", {"w": {**F32_4, "shape": [3]}}, b"\0" * 16, None, None, "needs 12 bytes"),
    ("huge shape", {"w": {**F32_4, "shape": [2**20, 2**20]}}, b"\0" * 16, None, None, "needs"),
    ("overlapping", {"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24]}}, b"\0" * 24, None, None, "overlap"),
])
def test_hostile_safetensors_headers(good_dir, tmp_path, case, header, data, raw, length, fragment):
    d = _copy(good_dir, tmp_path)
    _write_st(d / hf.WEIGHTS_FILE, header, data, raw, length)
    _expect(d, str(d / hf.WEIGHTS_FILE), fragment)


def test_short_file_is_refused(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    (d / hf.WEIGHTS_FILE).write_bytes(b"\x01\x02")
    _expect(d, str(d / hf.WEIGHTS_FILE), "no header length")


@pytest.mark.parametrize("target", ["/ABS", "../outside/model.safetensors", "sub/../model.safetensors", ".."])
def test_index_cannot_point_outside_the_directory(good_dir, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(good_dir / hf.WEIGHTS_FILE, outside / hf.WEIGHTS_FILE)  # a valid file: must not load
    d = _copy(good_dir, tmp_path)
    names = list(json.loads((d / hf.WEIGHTS_FILE).read_bytes()[8:8 + struct.unpack(
        "<Q", (d / hf.WEIGHTS_FILE).read_bytes()[:8])[0]]))
    names = [n for n in names if n != "__metadata__"]
    target = str(outside / hf.WEIGHTS_FILE) if target == "/ABS" else target
    (d / hf.WEIGHTS_FILE).rename(d / "model-00001-of-00001.safetensors")
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    weight_map[names[0]] = target
    (d / hf.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    _expect(d, str(d / hf.INDEX_FILE), repr(names[0]), "not a file name inside")


@pytest.mark.parametrize("index, fragment", [
    ([1, 2], "expected a JSON object"),
    ({"weight_map": ["a"]}, "weight_map must be an object"),
    ({"weight_map": {"a": 3}}, "weight_map must be an object"),
])
def test_malformed_index(good_dir, tmp_path, index, fragment):
    d = _copy(good_dir, tmp_path)
    (d / hf.INDEX_FILE).write_text(json.dumps(index))
    _expect(d, str(d / hf.INDEX_FILE), fragment)


@pytest.mark.parametrize("change, fragment", [
    ({"vocab_size": "16"}, "vocab_size must be an integer"),
    ({"n_embd": 8.0}, "n_embd must be an integer"),
    ({"n_layer": True}, "n_layer must be an integer"),
    ({"n_layer": 10**7}, "n_layer=10000000 is out of range"),
    ({"vocab_size": 10**9}, "vocab_size=1000000000 is out of range"),
    ({"n_head": 0}, "out of range"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be a positive finite number"),
    ({"architectures": "GPT2LMHeadModel"}, "architectures must be a list"),
    ({"n_layer": 1000, "n_embd": 8192, "n_head": 64}, "implies"),  # bounded, but not in the files
])
def test_hostile_config_json(good_dir, tmp_path, change, fragment):
    d = _copy(good_dir, tmp_path)
    config = json.loads((d / hf.CONFIG_FILE).read_text())
    config.update(change)
    (d / hf.CONFIG_FILE).write_text(json.dumps(config))
    _expect(d, str(d / hf.CONFIG_FILE), fragment)


@pytest.mark.parametrize("text, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ('{"a":' * 100 + "1" + "}" * 100, "nested more than"),
    ("[1, 2]", "expected a JSON object"),
    ("\xff", "not valid JSON"),
])
def test_config_json_shape(good_dir, tmp_path, text, fragment):
    d = _copy(good_dir, tmp_path)
    (d / hf.CONFIG_FILE).write_text(text)
    _expect(d, str(d / hf.CONFIG_FILE), fragment)


def test_config_json_size_is_bounded(good_dir, tmp_path):
    d = _copy(good_dir, tmp_path)
    (d / hf.CONFIG_FILE).write_text(json.dumps({**GPT2, "pad": "x" * (5 * 2**20)}))
    _expect(d, str(d / hf.CONFIG_FILE), "bytes, more than")


@pytest.mark.parametrize("change, fragment", [
    ({"n_layers": 10**7}, "n_layers must be an integer in [1, 1024]"),
    ({"vocab_size": "300"}, "vocab_size must be an integer"),
    ({"d_model": 32.0}, "d_model must be an integer"),
    ({"max_seq_len": 0}, "max_seq_len must be an integer"),
    ({"tie_embeddings": "yes"}, "tie_embeddings must be true or false"),
    ({"norm_eps": float("nan")}, "norm_eps must be a finite number"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be null or 4 numbers"),
    ({"norm": 3}, "norm must be a string"),
])
def test_our_model_config_json_is_checked(change, fragment):
    d = json.loads(json.dumps(__import__("dataclasses").asdict(model.ModelConfig())))
    hf.check_model_config_json(d, "run/model_config.json")  # the defaults pass
    d.update(change)
    with pytest.raises(ValueError) as info:
        hf.check_model_config_json(d, "run/model_config.json")
    assert str(info.value).startswith("run/model_config.json: ") and fragment in str(info.value)
    with pytest.raises(ValueError, match="expected a JSON object"):
        hf.check_model_config_json([1], "run/model_config.json")
