"""core/hf.py against Hugging Face transformers (torch, CPU): tiny random Llama, Qwen2 and GPT-2
models made by transformers must give the same logits through our loader and forward, and our
exported checkpoints must give transformers the same logits as our forward."""
import gc
import json
import pathlib
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core import hf, model, sharding  # noqa: E402

LENGTHS = np.array([12, 7, 3])  # right-padded batch: rows of 12, 7 and 3 real tokens
B, T = len(LENGTHS), int(LENGTHS.max())
VOCAB = 100

# Tiny configs covering grouped-query attention, tied and untied heads, Llama 3 rope scaling,
# attention biases, an explicit head_dim != hidden/heads, Qwen2's qkv-only bias and GPT-2.
HF_CONFIGS = {
    "llama_gqa_scaled": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=64,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16, rope_theta=500000.0)),
    "llama_bias_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=32, attention_bias=True, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0),
}
HF_CLASSES = {"llama_gqa_scaled": "LlamaForCausalLM", "llama_bias_tied": "LlamaForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _batch():
    tokens_bt = np.random.default_rng(0).integers(0, VOCAB, (B, T)).astype(np.int32)
    segment_ids_bt = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.int32)  # 1 real, 0 pad
    return tokens_bt, segment_ids_bt


def _hf_logits(hf_model, tokens_bt, segment_ids_bt) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(tokens_bt.astype(np.int64)),
                       attention_mask=torch.from_numpy(segment_ids_bt.astype(np.int64)))
    return out.logits.float().numpy()


def _our_logits(params, cfg, tokens_bt, segment_ids_bt) -> np.ndarray:
    logits, _ = model.forward(params, jnp.asarray(tokens_bt), cfg, segment_ids=jnp.asarray(segment_ids_bt))
    return np.asarray(logits)


def _assert_close_on_real_tokens(ours_btv, ref_btv, segment_ids_bt, tol=1e-4):
    real = segment_ids_bt.astype(bool)
    a, b = ours_btv[real], ref_btv[real]
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert rel < tol, f"max |ours - ref| / max |ref| = {rel:.2e} >= {tol}"


def _perturb_torch(hf_model, seed: int):
    """Adds noise to every weight so that zero-initialised biases and unit norm scales differ
    from their defaults and a mis-mapped tensor cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """{family: (saved transformers model directory, transformers model)} for every HF_CONFIGS entry."""
    out = {}
    for i, name in enumerate(sorted(HF_CONFIGS)):
        torch.manual_seed(i)
        hf_model = getattr(transformers, HF_CLASSES[name])(HF_CONFIGS[name]()).eval()
        _perturb_torch(hf_model, seed=100 + i)
        directory = tmp_path_factory.mktemp(name)
        # One family is written as a sharded checkpoint (index + several files) by transformers itself.
        hf_model.save_pretrained(directory, max_shard_size="40KB" if name == "llama_gqa_scaled" else "1GB")
        out[name] = directory, hf_model
    return out


def _random_params(cfg, seed: int):
    """Random float32 numpy params for `cfg` (norm scales near 1, every bias non-zero)."""
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(model.param_shapes(cfg))
    leaves = [rng.normal(0.0, 0.05, s.shape).astype(np.float32) + (path[-1].key == "scale")
              for path, s in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_load_matches_transformers(hf_checkpoints, name):
    directory, hf_model = hf_checkpoints[name]
    if name == "llama_gqa_scaled":
        assert (directory / hf.INDEX_FILE).is_file() and len(list(directory.glob("*.safetensors"))) > 2
    params, cfg = hf.load_checkpoint(directory)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(model.param_shapes(cfg))
    expected = {
        "llama_gqa_scaled": dict(n_kv_heads=2, tie_embeddings=False, rope_scaling=(8.0, 1.0, 4.0, 16),
                                 rope_theta=500000.0),
        "llama_bias_tied": dict(head_dim=32, qkv_bias=True, attn_out_bias=True, tie_embeddings=True),
        "qwen2": dict(n_kv_heads=2, qkv_bias=True, attn_out_bias=False, tie_embeddings=True, rope_theta=1e6),
        "gpt2": dict(norm="layernorm", mlp="gelu", pos="learned", d_ff=256, tie_embeddings=True),
    }[name]
    assert {k: getattr(cfg, k) for k in expected} == expected
    tokens_bt, segment_ids_bt = _batch()
    ours = _our_logits(params, cfg, tokens_bt, segment_ids_bt)
    _assert_close_on_real_tokens(ours, _hf_logits(hf_model, tokens_bt, segment_ids_bt), segment_ids_bt)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_export_loads_in_transformers(hf_checkpoints, name, tmp_path):
    """Random params of our own (not from transformers) -> save_checkpoint -> transformers gives
    our logits; and our loader reads our (sharded) output back bit-exactly."""
    directory, _ = hf_checkpoints[name]
    cfg = hf.config_from_hf(json.loads((directory / hf.CONFIG_FILE).read_text()))
    params = _random_params(cfg, seed=2)
    out = tmp_path / "export"
    shard = 30_000 if name in ("qwen2", "gpt2") else hf.DEFAULT_MAX_SHARD_BYTES
    hf.save_checkpoint(params, cfg, out, max_shard_bytes=shard)
    if shard < hf.DEFAULT_MAX_SHARD_BYTES:
        assert (out / hf.INDEX_FILE).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    else:
        assert (out / hf.WEIGHTS_FILE).is_file()

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == HF_CLASSES[name]
    tokens_bt, segment_ids_bt = _batch()
    _assert_close_on_real_tokens(_our_logits(params, cfg, tokens_bt, segment_ids_bt),
                                 _hf_logits(theirs, tokens_bt, segment_ids_bt), segment_ids_bt)

    back, cfg_back = hf.load_checkpoint(out)
    assert cfg_back == cfg
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back, params)


def _local_rules_shardings(mesh):
    """Our own logical -> mesh table, independent of core/sharding.py, as a callable cfg -> tree."""
    rules = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}

    def one(axes):
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(rules.get(a) for a in axes)))
    return lambda cfg: jax.tree_util.tree_map(one, model.param_axes(cfg), is_leaf=lambda a: isinstance(a, tuple))


def test_load_onto_mesh_same_logits(hf_checkpoints, tmp_path):
    """Loading the sharded checkpoint straight onto the 8 devices, via core/sharding.py (mesh=) or
    an explicit shardings callable, gives the single-device logits; saving sharded params works."""
    directory, hf_model = hf_checkpoints["llama_gqa_scaled"]
    single, cfg = hf.load_checkpoint(directory)
    tokens_bt, segment_ids_bt = _batch()
    fwd = jax.jit(lambda p, t, s: model.forward(p, t, cfg, segment_ids=s)[0])
    reference = np.asarray(fwd(single, tokens_bt, segment_ids_bt))

    mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
    via_mesh, _ = hf.load_checkpoint(directory, mesh=mesh)
    want = sharding.param_shardings(model.param_axes(cfg), mesh, model.param_shapes(cfg))
    for x, s in zip(jax.tree_util.tree_leaves(via_mesh), jax.tree_util.tree_leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    wq = via_mesh["layers"]["attn"]["wq"]  # [L, D, H, E] split over fsdp (D) and tensor (H)
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)
    np.testing.assert_allclose(np.asarray(fwd(via_mesh, tokens_bt, segment_ids_bt)), reference,
                               rtol=1e-5, atol=1e-5)

    fsdp8 = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    via_tree, _ = hf.load_checkpoint(directory, shardings=_local_rules_shardings(fsdp8))
    assert via_tree["embed"]["tokens"].addressable_shards[0].data.shape == (VOCAB, 64 // 8)
    np.testing.assert_allclose(np.asarray(fwd(via_tree, tokens_bt, segment_ids_bt)), reference,
                               rtol=1e-5, atol=1e-5)
    _assert_close_on_real_tokens(reference, _hf_logits(hf_model, tokens_bt, segment_ids_bt), segment_ids_bt)

    hf.save_checkpoint(via_mesh, cfg, tmp_path)
    back, _ = hf.load_checkpoint(tmp_path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, single)


def test_bfloat16_checkpoint(tmp_path):
    """Released checkpoints store bf16 (numpy has no such dtype): values arrive exactly."""
    hf_model = transformers.Qwen2ForCausalLM(HF_CONFIGS["qwen2"]()).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    params, cfg = hf.load_checkpoint(tmp_path)
    q_proj = hf_model.model.layers[1].self_attn.q_proj.weight.float().detach().numpy()  # [H*E, D]
    ours = np.asarray(params["layers"]["attn"]["wq"][1])  # [D, H, E]
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.reshape(cfg.d_model, -1), q_proj.T)
    low, _ = hf.load_checkpoint(tmp_path, dtype=jnp.bfloat16)
    assert low["embed"]["tokens"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(low["embed"]["tokens"], np.float32),
                                  hf_model.model.embed_tokens.weight.float().detach().numpy())


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "llama-3.2-1b", "gpt2-124m"])
def test_config_round_trip(preset):
    cfg = model.get_config(preset)
    d = hf.config_to_hf(cfg)
    assert hf.config_from_hf(d) == cfg
    # transformers reads the same numbers out of our dict.
    theirs = transformers.AutoConfig.for_model(**d)
    assert type(theirs).__name__ == {"qwen2.5-0.5b": "Qwen2Config", "llama-3.2-1b": "LlamaConfig",
                                     "gpt2-124m": "GPT2Config"}[preset]
    assert (theirs.num_hidden_layers, theirs.hidden_size, theirs.vocab_size) == (cfg.n_layers, cfg.d_model,
                                                                               cfg.vocab_size)


def test_real_release_config_fields():
    """A config.json in the legacy (transformers 4) style of a released Llama 3.2 checkpoint."""
    d = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
         "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 16, "head_dim": 64,
         "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
         "rope_theta": 500000.0, "tie_word_embeddings": True, "mlp_bias": False, "attention_bias": False,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert hf.config_from_hf(d) == model.get_config("llama-3.2-1b")


def test_unexportable_config():
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        hf.config_to_hf(model.get_config("tiny"))
    # Llama in every other respect, but smeared keys have no Hugging Face counterpart.
    with pytest.raises(ValueError, match="smear_keys=True"):
        hf.config_to_hf(model.get_config("llama-3.2-1b", smear_keys=True))


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory: pathlib.Path, **changes):
    path = directory / hf.CONFIG_FILE
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_clear_errors(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["qwen2"]
    with pytest.raises(ValueError, match="does not exist"):
        hf.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.config\.json not found"):
        hf.load_checkpoint(tmp_path / "empty")

    mistral = _copy(directory, tmp_path / "mistral")
    _edit_config(mistral, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match=r"mistral.config\.json: unsupported architecture.*MistralForCausalLM"):
        hf.load_checkpoint(mistral)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(directory / hf.CONFIG_FILE, no_weights)
    with pytest.raises(ValueError, match=r"no_weights: no model\.safetensors"):
        hf.load_checkpoint(no_weights)

    # Qwen2 weights read as Llama without biases: the q/k/v biases would be silently dropped.
    as_llama = _copy(directory, tmp_path / "as_llama")
    _edit_config(as_llama, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ValueError, match=r"does not explain.*q_proj\.bias"):
        hf.load_checkpoint(as_llama)

    wrong_ff = _copy(directory, tmp_path / "wrong_ff")
    _edit_config(wrong_ff, intermediate_size=128)
    with pytest.raises(ValueError, match=r"gate_proj\.weight' has shape \[96, 64\].*implies \[128, 64\]"):
        hf.load_checkpoint(wrong_ff)

    untied = _copy(directory, tmp_path / "untied")
    _edit_config(untied, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*lm_head\.weight"):
        hf.load_checkpoint(untied)

    sliding = _copy(directory, tmp_path / "sliding")
    _edit_config(sliding, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding-window"):
        hf.load_checkpoint(sliding)


def test_missing_shard_file(tmp_path):
    cfg = model.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
    hf.save_checkpoint(_random_params(cfg, seed=0), cfg, tmp_path, max_shard_bytes=10_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ValueError, match=rf"names shard file\(s\) that do not exist.*{shards[-1].name}"):
        hf.load_checkpoint(tmp_path)


def test_bfloat16_export_read_by_safetensors(tmp_path):
    """Our streaming writer's bf16 output as read by the official safetensors reader (torch)."""
    cfg = model.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                            max_seq_len=16, qkv_bias=True)
    params = _random_params(cfg, seed=5)
    hf.save_checkpoint(params, cfg, tmp_path, dtype="bfloat16", extra_config={"eos_token_id": 3})
    config = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["eos_token_id"] == 3
    with safe_open(tmp_path / hf.WEIGHTS_FILE, framework="pt") as f:
        k_proj = f.get_tensor("model.layers.1.self_attn.k_proj.weight")  # [K*E, D]
        assert k_proj.dtype == torch.bfloat16
        wk = params["layers"]["attn"]["wk"][1].astype(jnp.bfloat16).astype(np.float32)  # [D, K, E]
        np.testing.assert_array_equal(k_proj.float().numpy(), wk.reshape(cfg.d_model, -1).T)
    back, _ = hf.load_checkpoint(tmp_path)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), b.astype(jnp.bfloat16).astype(np.float32)),
        back, params)


def test_original_gpt2_naming(hf_checkpoints, tmp_path):
    """The original GPT-2 release names tensors without 'transformer.' and stores attention-mask
    buffers: same params as the prefixed checkpoint."""
    directory, _ = hf_checkpoints["gpt2"]
    reference, _ = hf.load_checkpoint(directory)
    with safe_open(directory / hf.WEIGHTS_FILE, framework="np") as f:
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    save_file(tensors, str(tmp_path / hf.WEIGHTS_FILE), metadata={"format": "pt"})
    shutil.copy(directory / hf.CONFIG_FILE, tmp_path)
    params, _ = hf.load_checkpoint(tmp_path)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           params, reference)


def test_load_holds_one_leaf_on_host(tmp_path):
    """Peak host (numpy) memory while loading onto fsdp:8 stays near the largest single leaf, far
    below the whole model: leaves go to the devices one by one and are freed."""
    cfg = model.ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=1024,
                            max_seq_len=64)
    params = _random_params(cfg, seed=6)
    largest = max(x.nbytes for x in jax.tree_util.tree_leaves(params))
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    hf.save_checkpoint(params, cfg, tmp_path, max_shard_bytes=total // 3)
    del params
    tracemalloc.start()
    try:
        loaded, _ = hf.load_checkpoint(tmp_path, mesh=sharding.make_mesh("fsdp:8"))
        gc.collect()
        # On CPU, jax may adopt a host buffer as the device array itself (zero-copy); what is
        # still alive at the end is such device memory, not a host copy.
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 4 * largest
    transient = peak - retained
    assert transient < 1.6 * largest, f"host peak {transient / 2**20:.1f} MiB, largest leaf {largest / 2**20:.1f} MiB"
    assert sum(x.nbytes for x in jax.tree_util.tree_leaves(loaded)) == total
