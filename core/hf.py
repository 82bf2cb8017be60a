"""Hugging Face checkpoints in and out: a directory of config.json + safetensors.

Supported architectures: LlamaForCausalLM (Llama 2 / 3 / 3.x),
Qwen2ForCausalLM (Qwen2 / Qwen2.5) and GPT2LMHeadModel. Loading works tensor by tensor: each of
our leaves is assembled on the host (stacked leaves layer by layer into one preallocated buffer),
placed on its devices with its sharding, and freed before the next leaf is read, so a host never
holds more than one leaf beyond what already sits on the devices. Everything (missing or
unexpected tensors, wrong shapes) is checked from the file headers before any data is read.

Safetensors files are read through numpy memory maps with our own ~20-line header parser rather
than `safetensors.safe_open(framework="np")`, because numpy has no bfloat16 and that reader
refuses BF16 tensors, which is what every released Llama/Qwen checkpoint contains; `ml_dtypes`
(a JAX dependency) supplies the dtype here. Writing uses the same format in a streaming way, one
tensor at a time, so the host never holds a whole shard either.

Public API:
  config_from_hf(config_dict, source=...) -> ModelConfig
  config_to_hf(cfg) -> dict
  hf_architecture(cfg) -> str
  load_checkpoint(path, *, mesh=None, shardings=None, dtype=jnp.float32) -> (params, cfg)
  save_checkpoint(params, cfg, path, *, max_shard_bytes=..., dtype="float32", extra_config=None)
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import pathlib
import struct
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from core.model import ModelConfig, Params, param_axes, param_shapes

LLAMA, QWEN2, GPT2 = "LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"
ARCHITECTURES = (LLAMA, QWEN2, GPT2)
_MODEL_TYPES = {"llama": LLAMA, "qwen2": QWEN2, "gpt2": GPT2}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Buffers some exporters store that carry no learned weights (GPT-2's causal-mask constants,
# cached RoPE frequencies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation

# Bounds on what a file from outside may declare, checked before anything is allocated. They are
# far above every released model (Llama 3.1 405B: 126 layers, d 16384, vocab 128256) and far
# below what would exhaust a host.
MAX_JSON_BYTES = 64 * 2**20          # config.json, the shard index
MAX_JSON_DEPTH = 64
MAX_HEADER_BYTES = 100 * 2**20       # a safetensors header (the reference library's own limit)
MAX_TENSOR_RANK = 8
CONFIG_BOUNDS = {  # config.json integer fields -> inclusive upper bound (all must be >= 1)
    "vocab_size": 2**22, "hidden_size": 2**16, "n_embd": 2**16, "num_hidden_layers": 1024,
    "n_layer": 1024, "num_attention_heads": 1024, "n_head": 1024, "num_key_value_heads": 1024,
    "head_dim": 2**13, "intermediate_size": 2**20, "n_inner": 2**20,
    "max_position_embeddings": 2**22, "n_positions": 2**22,
}
CONFIG_FLOATS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")  # positive, finite numbers


def _json_depth(x, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping (returning limit + 1) once past `limit`."""
    depth, level = 0, [x]
    while level:
        depth += 1
        if depth > limit:
            return depth
        level = [v for c in level if isinstance(c, (dict, list))
                 for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (dict, list))]
    return depth


def read_json_object(path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A JSON file that must hold an object, read defensively.

    Args:
      path: the file.
      max_bytes: larger files are refused before they are read.
      max_depth: deeper nesting is refused (the parser's recursion would otherwise crash).
    Returns:
      The parsed object.
    Raises:
      ValueError naming the file: missing, too large, not UTF-8, not JSON, too deep, not an object.
    """
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes, more than the {max_bytes} accepted for a JSON file")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if _json_depth(data, max_depth) > max_depth:
        raise ValueError(f"{path}: JSON nested more than {max_depth} levels deep")
    return data


MODEL_CONFIG_BOUNDS = {  # our model_config.json (core.model.ModelConfig) -> inclusive upper bound
    "vocab_size": 2**22, "d_model": 2**16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
    "head_dim": 2**13, "d_ff": 2**20, "max_seq_len": 2**22,
}


def check_model_config_json(d, source: str) -> None:
    """Types and bounds of our own model config (model_config.json) before ModelConfig(**d).

    Raises:
      ValueError naming `source` and the key: not an object, a size that is not an integer or is
      out of range (see MODEL_CONFIG_BOUNDS; optional sizes may be null), a flag that is not a
      boolean, a number that is not finite, a name that is not a string.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    for key, value in d.items():
        if key in MODEL_CONFIG_BOUNDS:
            if value is None and key in ("n_kv_heads", "head_dim", "d_ff"):
                continue
            if type(value) is not int or not 1 <= value <= MODEL_CONFIG_BOUNDS[key]:
                raise ValueError(f"{source}: {key} must be an integer in [1, {MODEL_CONFIG_BOUNDS[key]}], "
                                 f"got {value!r:.40}")
        elif key in ("norm", "mlp", "pos", "compute_dtype"):
            if not isinstance(value, str):
                raise ValueError(f"{source}: {key} must be a string, got {value!r:.40}")
        elif key in ("norm_eps", "rope_theta", "init_std", "logit_softcap"):
            if value is None and key == "logit_softcap":
                continue
            if type(value) not in (int, float) or not math.isfinite(value):
                raise ValueError(f"{source}: {key} must be a finite number, got {value!r:.40}")
        elif key in ("qkv_bias", "attn_out_bias", "mlp_bias", "tie_embeddings", "qk_norm", "smear_keys",
                     "zero_init_out"):
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {key} must be true or false, got {value!r:.40}")
        elif key == "rope_scaling" and value is not None:
            if not (isinstance(value, (list, tuple)) and len(value) == 4
                    and all(type(v) in (int, float) and math.isfinite(v) for v in value)):
                raise ValueError(f"{source}: rope_scaling must be null or 4 numbers, got {value!r:.60}")


def check_config_fields(config: dict, source: str) -> None:
    """Types and bounds of the size fields of a config.json (see CONFIG_BOUNDS, CONFIG_FLOATS).

    Raises:
      ValueError naming `source` and the key: a size that is not an integer (strings, floats and
      booleans included), below 1 or above its bound; a non-numeric or non-positive float field.
    """
    for key, bound in CONFIG_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        if type(value) is not int:
            raise ValueError(f"{source}: {key} must be an integer, got {type(value).__name__} {value!r:.40}")
        if not 1 <= value <= bound:
            raise ValueError(f"{source}: {key}={value} is out of range [1, {bound}]")
    for key in CONFIG_FLOATS:
        value = config.get(key)
        if value is None:
            continue
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{source}: {key} must be a positive finite number, got {value!r:.40}")
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ValueError(f"{source}: {key} must be an object, got {type(config[key]).__name__}")
    if config.get("architectures") is not None and not (
            isinstance(config["architectures"], list) and all(isinstance(a, str) for a in config["architectures"])):
        raise ValueError(f"{source}: architectures must be a list of strings")


# ----------------------------------------------------------------------------- configs


def _architecture(config: dict, source: str) -> str:
    archs = list(config.get("architectures") or [])
    if not archs and config.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[config["model_type"]]]
    for a in archs:
        if a in ARCHITECTURES:
            return a
    found = archs or config.get("model_type")
    raise ValueError(f"{source}: unsupported architecture {found!r}; supported: {', '.join(ARCHITECTURES)}")


def _rope_from_hf(config: dict, source: str) -> tuple[float, Optional[tuple]]:
    """(rope_theta, our rope_scaling tuple) from either transformers>=5 `rope_parameters` or the
    legacy top-level `rope_theta` + `rope_scaling` that released checkpoints use."""
    rope = dict(config.get("rope_parameters") or {})
    rope.update(config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        old_len = rope.get("original_max_position_embeddings", config.get("max_position_embeddings"))
        return theta, (float(rope["factor"]), float(rope["low_freq_factor"]),
                       float(rope["high_freq_factor"]), int(old_len))
    raise ValueError(f"{source}: rope type {kind!r} is not supported (only 'default' and 'llama3')")


def _llama_like_from_hf(config: dict, arch: str, source: str) -> dict:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={config['hidden_act']!r} is not supported (only 'silu')")
    if config.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported (no gate-projection bias in our layout)")
    sliding = "sliding_attention" in (config.get("layer_types") or []) or (
        config.get("use_sliding_window") and config.get("max_window_layers", 0) < config["num_hidden_layers"])
    if sliding:
        raise ValueError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
    theta, scaling = _rope_from_hf(config, source)
    if arch == QWEN2:  # q/k/v always carry a bias in Qwen2, the output projection never
        qkv_bias, out_bias = True, False
    else:
        qkv_bias = out_bias = bool(config.get("attention_bias", False))
    return dict(
        vocab_size=config["vocab_size"], d_model=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=config.get("head_dim"), d_ff=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), mlp="swiglu", pos="rope", rope_theta=theta,
        rope_scaling=scaling, qkv_bias=qkv_bias, attn_out_bias=out_bias, mlp_bias=False,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _gpt2_from_hf(config: dict, source: str) -> dict:
    act = config.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise ValueError(f"{source}: activation_function={act!r} is not supported (only {_GELU_TANH})")
    if config.get("scale_attn_by_inverse_layer_idx") or not config.get("scale_attn_weights", True):
        raise ValueError(f"{source}: only the standard 1/sqrt(head_dim) attention scale is supported")
    if config.get("add_cross_attention"):
        raise ValueError(f"{source}: cross-attention is not supported")
    d = config["n_embd"]
    return dict(
        vocab_size=config["vocab_size"], d_model=d, n_layers=config["n_layer"], n_heads=config["n_head"],
        d_ff=config.get("n_inner") or 4 * d, max_seq_len=config.get("n_positions", 1024), norm="layernorm",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)), mlp="gelu", pos="learned", qkv_bias=True,
        attn_out_bias=True, mlp_bias=True, tie_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def config_from_hf(config: dict, *, source: str = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json dict.

    Args:
      config: the parsed config.json of a Llama, Qwen2 or GPT-2 causal LM.
      source: file name used in error messages.
    Raises:
      ValueError naming `source` for an unsupported architecture or feature, or a missing field.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    check_config_fields(config, source)
    arch = _architecture(config, source)
    try:
        fields = _gpt2_from_hf(config, source) if arch == GPT2 else _llama_like_from_hf(config, arch, source)
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r} for {arch}") from None
    except (TypeError, ValueError) as e:  # e.g. a rope_scaling field of the wrong type
        raise ValueError(f"{source}: {e}") from None
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def hf_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that computes exactly what `cfg` computes; ValueError if none."""
    plain = not cfg.qk_norm and cfg.logit_softcap is None and not cfg.smear_keys
    if plain and (cfg.norm, cfg.mlp, cfg.pos) == ("rmsnorm", "swiglu", "rope") and not cfg.mlp_bias:
        if cfg.qkv_bias and not cfg.attn_out_bias:
            return QWEN2
        if cfg.qkv_bias == cfg.attn_out_bias:
            return LLAMA
    if (plain and (cfg.norm, cfg.mlp, cfg.pos) == ("layernorm", "gelu", "learned")
            and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias
            and cfg.k == cfg.n_heads and cfg.e * cfg.n_heads == cfg.d_model):
        return GPT2
    raise ValueError(
        "no Hugging Face architecture matches this ModelConfig "
        f"(norm={cfg.norm}, mlp={cfg.mlp}, pos={cfg.pos}, qk_norm={cfg.qk_norm}, "
        f"logit_softcap={cfg.logit_softcap}, smear_keys={cfg.smear_keys}, qkv_bias={cfg.qkv_bias}, "
        f"attn_out_bias={cfg.attn_out_bias}, mlp_bias={cfg.mlp_bias}); exportable are Llama/Qwen2 (rmsnorm, swiglu, rope, no qk_norm or "
        "softcap, no mlp bias) and GPT-2 (layernorm, gelu, learned positions, all biases, no GQA)")


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict that transformers (v4 and v5) loads as the model `cfg` describes.

    Token ids (bos/eos/pad) are left unset (None) rather than given the HF class defaults, which
    belong to other vocabularies; pass them to `save_checkpoint(extra_config=...)`.
    """
    arch = hf_architecture(cfg)
    no_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if arch == GPT2:
        return {**no_ids,
            "architectures": [GPT2], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.f,
            "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    rope_scaling = None
    if cfg.rope_scaling is not None:
        factor, low, high, old_len = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old_len}
    out = {
        **no_ids, "architectures": [arch], "model_type": "qwen2" if arch == QWEN2 else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.f,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.k, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        # transformers<5 reads rope_theta/rope_scaling, >=5 prefers rope_parameters: write both.
        "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rope_scaling or {})},
    }
    if cfg.head_dim is not None:
        out["head_dim"] = cfg.head_dim
    if arch == LLAMA:
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


# ----------------------------------------------------------------------------- weight layout


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one of our leaves lives in a Hugging Face checkpoint (per layer for stacked leaves).

    layout: 'linear' torch Linear weight [out, in]; 'conv1d' GPT-2 Conv1D weight [in, out];
      'flat' a 1-D vector (biases); 'same' identical shape (embeddings, norm scales).
    n_in: how many leading dims of our (per-layer) array form the matmul input (2 for wo [H,E,D]).
    part: (j, n): ours is the j-th of n equal chunks of the HF tensor's last axis (GPT-2's fused qkv).
    """

    ours: tuple[str, ...]
    hf: str  # '{i}' stands for the layer index
    layout: str = "same"
    n_in: int = 1
    part: tuple[int, int] = (0, 1)


def _tensor_map(cfg: ModelConfig, arch: str) -> list[_Tensor]:
    T = _Tensor
    if arch == GPT2:
        h = "transformer.h.{i}."
        m = [T(("embed", "tokens"), "transformer.wte.weight"), T(("pos_embed",), "transformer.wpe.weight")]
        for ours, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            m += [T(("layers", ours, "scale"), h + hf + ".weight"), T(("layers", ours, "bias"), h + hf + ".bias")]
        for j, n in enumerate("qkv"):
            m += [T(("layers", "attn", "w" + n), h + "attn.c_attn.weight", "conv1d", part=(j, 3)),
                  T(("layers", "attn", "b" + n), h + "attn.c_attn.bias", "flat", part=(j, 3))]
        m += [T(("layers", "attn", "wo"), h + "attn.c_proj.weight", "conv1d", n_in=2),
              T(("layers", "attn", "bo"), h + "attn.c_proj.bias", "flat"),
              T(("layers", "mlp", "w_in"), h + "mlp.c_fc.weight", "conv1d"),
              T(("layers", "mlp", "b_in"), h + "mlp.c_fc.bias", "flat"),
              T(("layers", "mlp", "w_out"), h + "mlp.c_proj.weight", "conv1d"),
              T(("layers", "mlp", "b_out"), h + "mlp.c_proj.bias", "flat"),
              T(("final_norm", "scale"), "transformer.ln_f.weight"),
              T(("final_norm", "bias"), "transformer.ln_f.bias")]
    else:
        h = "model.layers.{i}."
        m = [T(("embed", "tokens"), "model.embed_tokens.weight"),
             T(("layers", "attn_norm", "scale"), h + "input_layernorm.weight"),
             T(("layers", "mlp_norm", "scale"), h + "post_attention_layernorm.weight")]
        for n in "qkv":
            m.append(T(("layers", "attn", "w" + n), h + f"self_attn.{n}_proj.weight", "linear"))
            if cfg.qkv_bias:
                m.append(T(("layers", "attn", "b" + n), h + f"self_attn.{n}_proj.bias", "flat"))
        m.append(T(("layers", "attn", "wo"), h + "self_attn.o_proj.weight", "linear", n_in=2))
        if cfg.attn_out_bias:
            m.append(T(("layers", "attn", "bo"), h + "self_attn.o_proj.bias", "flat"))
        m += [T(("layers", "mlp", "w_gate"), h + "mlp.gate_proj.weight", "linear"),
              T(("layers", "mlp", "w_in"), h + "mlp.up_proj.weight", "linear"),
              T(("layers", "mlp", "w_out"), h + "mlp.down_proj.weight", "linear"),
              T(("final_norm", "scale"), "model.norm.weight")]
    if not cfg.tie_embeddings:
        m.append(T(("lm_head",), "lm_head.weight", "linear"))
    return m


def _hf_shape(t: _Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape given our (per-layer) shape."""
    n_in, n_out = math.prod(shape[:t.n_in]), math.prod(shape[t.n_in:])
    j, n = t.part
    if t.layout == "linear":
        return (n_out * n, n_in)
    if t.layout == "conv1d":
        return (n_in, n_out * n)
    if t.layout == "flat":
        return (math.prod(shape) * n,)
    return tuple(shape)


def _to_ours(x: np.ndarray, t: _Tensor, shape: tuple[int, ...]) -> np.ndarray:
    j, n = t.part
    if n > 1:
        size = x.shape[-1] // n
        x = x[..., j * size:(j + 1) * size]
    if t.layout == "linear":
        x = x.T
    return x.reshape(shape)


def _to_hf(x: np.ndarray, t: _Tensor) -> np.ndarray:
    """Inverse of `_to_ours` for one part (parts are concatenated by the caller)."""
    n_in = math.prod(x.shape[:t.n_in])
    if t.layout == "linear":
        return x.reshape(n_in, -1).T
    if t.layout == "conv1d":
        return x.reshape(n_in, -1)
    if t.layout == "flat":
        return x.reshape(-1)
    return x


def _flat_shapes(cfg: ModelConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))
    return [(tuple(k.key for k in path), tuple(s.shape)) for path, s in flat]


def _hf_names(t: _Tensor, n_layers: int) -> list[str]:
    return [t.hf.format(i=i) for i in range(n_layers)] if "{i}" in t.hf else [t.hf]


# ----------------------------------------------------------------------------- safetensors I/O


class _SafetensorsFile:
    """Lazy reader of one .safetensors file: header parsed and checked eagerly, tensors as memmap
    views. Every malformed header is a ValueError naming the file (and tensor) before any data
    is mapped: absurd header length, a header that is not an object, missing or mistyped keys,
    an unknown dtype, negative, reversed, overlapping or misaligned offsets, a byte range that
    disagrees with dtype x shape, or one past the end of the file."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            size = os.stat(path).st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", head)
                if n > min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"{path}: safetensors header length {n} exceeds the file "
                                     f"({size} bytes) or the {MAX_HEADER_BYTES}-byte limit")
                header = json.loads(f.read(n).decode("utf-8"))
        except RecursionError:
            raise ValueError(f"{path}: safetensors header nested too deeply") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
        header.pop("__metadata__", None)
        self._offset = 8 + n
        self.header: dict[str, dict] = _checked_header(header, path, size - self._offset)
        self._data: Optional[np.memmap] = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        if end == start:
            return np.zeros(info["shape"], _ST_DTYPES[info["dtype"]])
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._offset)
        if end > self._data.size:  # the file shrank since its header was checked
            raise ValueError(f"{self.path}: truncated file (tensor {name!r} ends at byte {end} of the data "
                             f"section, which holds {self._data.size})")
        return self._data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _checked_header(header: dict, path: pathlib.Path, data_bytes: int) -> dict:
    """The tensor entries of a safetensors header, each checked against the data section.

    Args:
      header: parsed header without `__metadata__`.
      path: the file (for messages).
      data_bytes: size of the data section (file size minus 8 minus the header length).
    Returns:
      `header`, unchanged, once every entry is valid.
    Raises:
      ValueError naming the file and the tensor.
    """
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{where}: entry must be an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r:.40} (known: {', '.join(_ST_DTYPES)})")
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_RANK
                and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{where}: shape must be a list of at most {MAX_TENSOR_RANK} "
                             f"non-negative integers, got {shape!r:.80}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{where}: data_offsets must be two integers, got {offsets!r:.80}")
        start, end = offsets
        itemsize = _ST_DTYPES[dtype].itemsize
        if not 0 <= start <= end <= data_bytes:
            raise ValueError(f"{where}: data_offsets {offsets} outside the data section [0, {data_bytes}] "
                             "(negative, reversed or past the end of the file)")
        if start % itemsize:
            raise ValueError(f"{where}: data offset {start} is not aligned to its {itemsize}-byte dtype {dtype}")
        if end - start != math.prod(shape) * itemsize:
            raise ValueError(f"{where}: {dtype} {shape} needs {math.prod(shape) * itemsize} bytes but "
                             f"data_offsets {offsets} hold {end - start}")
        spans.append((start, end, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0 and e1 > s1:
            raise ValueError(f"{path}: tensors {n0!r} and {n1!r} overlap (bytes {s1}..{min(e0, e1)})")
    return header


class _CheckpointReader:
    """All tensors of a checkpoint directory, single-file or sharded with an index."""

    def __init__(self, directory: pathlib.Path):
        index, single = directory / INDEX_FILE, directory / WEIGHTS_FILE
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError(f"{index}: weight_map must be an object of tensor name -> file name")
            for name, fname in weight_map.items():
                # a shard is a plain file of this directory: no absolute path, no '..', no subdir
                if (fname in ("", ".", "..") or "/" in fname or "\\" in fname or "\0" in fname
                        or os.path.isabs(fname)):
                    raise ValueError(f"{index}: tensor {name!r} points to {fname!r}, which is not a "
                                     f"file name inside {directory}")
            missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing:
                raise ValueError(f"{index} names shard file(s) that do not exist in {directory}: {missing}")
        elif single.is_file():
            weight_map = None
        else:
            raise ValueError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors "
                             "checkpoints are supported)")
        self._files: dict[str, _SafetensorsFile] = {}
        if weight_map is None:
            self._files[WEIGHTS_FILE] = _SafetensorsFile(single)
            weight_map = {k: WEIGHTS_FILE for k in self._files[WEIGHTS_FILE].header}
        else:
            for fname in sorted(set(weight_map.values())):
                self._files[fname] = _SafetensorsFile(directory / fname)
        for name, fname in weight_map.items():
            if name not in self._files[fname].header:
                raise ValueError(f"{index}: tensor {name!r} is not in {directory / fname}")
        self.weight_map: dict[str, str] = weight_map

    def resolve(self, name: str) -> Optional[str]:
        """The stored name for `name`; original GPT-2 checkpoints lack the 'transformer.' prefix."""
        if name in self.weight_map:
            return name
        short = name.removeprefix("transformer.")
        return short if short != name and short in self.weight_map else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self.weight_map[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._files[self.weight_map[name]].get(name)

    def where(self, name: str) -> pathlib.Path:
        return self._files[self.weight_map[name]].path

    def files(self) -> list[_SafetensorsFile]:
        return list(self._files.values())


def _write_safetensors(path: pathlib.Path, items: list[tuple[str, tuple, np.dtype, Callable]],
                       write: bool) -> None:
    """Streams tensors into one safetensors file. items: (name, shape, dtype, produce) where
    produce() returns the array; it is called even when `write` is False (other processes must
    join the collectives that fetch sharded params)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in items:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    f = open(path, "wb") if write else None
    try:
        if f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, produce in items:
            x = np.ascontiguousarray(produce(), dtype=dtype)
            if x.shape != tuple(shape):
                raise AssertionError(f"{name}: produced {x.shape}, planned {shape}")
            if f:
                f.write(x.reshape(-1).view(np.uint8).data)
    finally:
        if f:
            f.close()


# ----------------------------------------------------------------------------- load


def _read_config(directory: pathlib.Path) -> tuple[ModelConfig, str]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} not found: a Hugging Face checkpoint directory needs a config.json")
    config = read_json_object(path, max_bytes=4 * 2**20)
    return config_from_hf(config, source=str(path)), _architecture(config, str(path))


ShardingsArg = Union[None, Any, Callable[[ModelConfig], Any]]


def _resolve_shardings(cfg: ModelConfig, mesh, shardings: ShardingsArg) -> Optional[dict]:
    """{leaf path: Sharding} or None (default device)."""
    if mesh is not None and shardings is not None:
        raise ValueError("load_checkpoint: pass mesh= or shardings=, not both")
    if callable(shardings):
        shardings = shardings(cfg)
    if shardings is None and mesh is not None:
        try:
            from core import sharding as sharding_lib
        except ImportError:
            raise ValueError("load_checkpoint(mesh=...) needs core/sharding.py; pass shardings= "
                             "(a tree of jax.sharding.Sharding matching the params) instead") from None
        shardings = sharding_lib.param_shardings(param_axes(cfg), mesh, param_shapes(cfg))
    if shardings is None:
        return None
    want = jax.tree_util.tree_structure(param_shapes(cfg))
    got = jax.tree_util.tree_structure(shardings)
    if want != got:
        raise ValueError(f"load_checkpoint: shardings tree {got} does not match the params tree {want}")
    flat, _ = jax.tree_util.tree_flatten_with_path(shardings)
    return {tuple(k.key for k in path): s for path, s in flat}


def _place(x: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        out = jax.device_put(x)
    else:
        # Each process builds only the shards of its own devices (multi-host safe).
        out = jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    # Wait before the host buffer is dropped, so host copies never pile up behind async transfers.
    return out.block_until_ready()


def load_checkpoint(path, *, mesh=None, shardings: ShardingsArg = None,
                    dtype=jnp.float32) -> tuple[Params, ModelConfig]:
    """Reads a Hugging Face checkpoint directory into our params layout.

    Args:
      path: directory with config.json and model.safetensors, or sharded
        model-XXXXX-of-YYYYY.safetensors files with model.safetensors.index.json.
      mesh: a jax.sharding.Mesh (e.g. `core.sharding.make_mesh("fsdp:8")`); params get
        `core.sharding.param_shardings(param_axes(cfg), mesh, param_shapes(cfg))`.
      shardings: instead of mesh, a tree of jax.sharding.Sharding matching the params, or a
        callable cfg -> such a tree (the config is only known once config.json is read).
        With neither, params go to the default device.
      dtype: dtype of the returned params (float32 by default, whatever the file stores).

    Returns:
      (params, cfg): params as `core.model.init_params` would lay them out; cfg its ModelConfig.

    Raises:
      ValueError naming the file for a missing config.json or weights, an unsupported
      architecture, missing or unexpected tensors, or shapes that contradict config.json.
    """
    directory = pathlib.Path(path)
    cfg, arch = _read_config(directory)
    reader = _CheckpointReader(directory)
    tensor_of = {t.ours: t for t in _tensor_map(cfg, arch)}
    leaves = _flat_shapes(cfg)
    out_of_sync = set(tensor_of) ^ {p for p, _ in leaves}
    if out_of_sync:
        raise AssertionError(f"core/hf.py tensor map out of sync with core/model.py's layout: {out_of_sync}")

    # The bytes config.json implies must be in the files (at least one byte per parameter)
    # before names are enumerated or anything is allocated.
    n_params = sum(math.prod(shape) for _, shape in leaves)
    stored_bytes = sum(os.stat(f.path).st_size for f in reader.files())
    if n_params > stored_bytes:
        raise ValueError(f"{directory / CONFIG_FILE}: implies {n_params:,} parameters but the weight "
                         f"files hold only {stored_bytes:,} bytes")
    # Validate every name and shape from the headers before reading any data.
    used, missing = set(), []
    for ours, shape in leaves:
        t = tensor_of[ours]
        want = _hf_shape(t, shape[1:] if ours[0] == "layers" else shape)
        for name in _hf_names(t, cfg.n_layers):
            stored = reader.resolve(name)
            if stored is None:
                missing.append(name)
                continue
            used.add(stored)
            if reader.shape(stored) != want:
                raise ValueError(f"{reader.where(stored)}: tensor {stored!r} has shape "
                                 f"{list(reader.shape(stored))} but {directory / CONFIG_FILE} implies {list(want)}")
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {len(missing)} tensor(s) that {CONFIG_FILE} "
                         f"implies, e.g. {missing[:4]}")
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in reader.weight_map
                        if n not in used and n not in tied_head and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{directory}: checkpoint has {len(unexpected)} tensor(s) that {CONFIG_FILE} does not "
                         f"explain (would be silently dropped), e.g. {unexpected[:4]}")

    shard_of = _resolve_shardings(cfg, mesh, shardings)
    np_dtype = np.dtype(jnp.dtype(dtype))
    placed = []
    for ours, shape in leaves:
        t = tensor_of[ours]
        buf = np.empty(shape, np_dtype)
        if ours[0] == "layers":
            for i in range(cfg.n_layers):
                buf[i] = _to_ours(reader.get(reader.resolve(t.hf.format(i=i))), t, shape[1:])
        else:
            buf[...] = _to_ours(reader.get(reader.resolve(t.hf)), t, shape)
        placed.append(_place(buf, shard_of[ours] if shard_of else None))
        # jax releases its reference to a transferred host buffer only when its gc callback runs;
        # a (cheap) young-generation collection runs it now, so this leaf is freed before the next
        # is built instead of sitting next to it on the host.
        del buf
        gc.collect(0)
    treedef = jax.tree_util.tree_structure(param_shapes(cfg))
    return jax.tree_util.tree_unflatten(treedef, placed), cfg


# ----------------------------------------------------------------------------- save


# The layer index is traced, so slicing compiles once per leaf shape rather than once per layer.
_take_layer = jax.jit(lambda x_l, i: jax.lax.dynamic_index_in_dim(x_l, i, keepdims=False))


def _host(leaf, i: Optional[int]) -> np.ndarray:
    """A host copy of leaf (or its layer i), gathered across processes when sharded over hosts."""
    if not isinstance(leaf, jax.Array):
        return np.asarray(leaf if i is None else leaf[i])
    x = leaf if i is None else _take_layer(leaf, jnp.int32(i))
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_checkpoint(params: Params, cfg: ModelConfig, path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    dtype: str = "float32", extra_config: Optional[dict] = None) -> None:
    """Writes params as a Hugging Face checkpoint directory that transformers loads.

    The host holds one layer's slice of one leaf at a time. Sharded (multi-host) params are
    gathered slice by slice; every process must call this, process 0 writes.

    Args:
      params: tree from `init_params` / `load_checkpoint` for `cfg` (jax or numpy arrays).
      cfg: its config; must map to Llama, Qwen2 or GPT-2 (see `hf_architecture`).
      path: output directory (created). Writes config.json and model.safetensors, or
        model-00001-of-0000N.safetensors files plus model.safetensors.index.json when the
        tensors exceed `max_shard_bytes`.
      dtype: 'float32', 'bfloat16' or 'float16' for the stored tensors.
      extra_config: merged into config.json (e.g. bos_token_id, eos_token_id).
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save_checkpoint: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"save_checkpoint: max_shard_bytes must be positive, got {max_shard_bytes}")
    arch = hf_architecture(cfg)
    want = jax.tree_util.tree_structure(param_shapes(cfg))
    if jax.tree_util.tree_structure(params) != want:
        raise ValueError(f"save_checkpoint: params tree does not match cfg's layout {want}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    leaf_of = {}
    for (ours, shape), leaf in zip(_flat_shapes(cfg), jax.tree_util.tree_leaves(params)):
        if tuple(leaf.shape) != shape:
            raise ValueError(f"save_checkpoint: param {'/'.join(ours)} has shape {tuple(leaf.shape)}, "
                             f"cfg implies {shape}")
        leaf_of[ours] = (leaf, shape)

    # One entry per HF tensor: its parts in order (several only for GPT-2's fused qkv).
    groups: dict[str, list[tuple[_Tensor, Optional[int]]]] = {}
    tmap = _tensor_map(cfg, arch)
    for i in [None] + list(range(cfg.n_layers)):
        for t in tmap:
            if (i is None) == ("{i}" in t.hf):
                continue
            groups.setdefault(t.hf.format(i=i), []).append((t, i))
    for parts in groups.values():
        parts.sort(key=lambda p: p[0].part[0])

    def produce(parts):
        def run():
            pieces = []
            for t, i in parts:
                leaf, _ = leaf_of[t.ours]
                pieces.append(_to_hf(_host(leaf, i), t))
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)
        return run

    items = []
    for name, parts in groups.items():
        t, i = parts[0]
        shape = leaf_of[t.ours][1]
        items.append((name, _hf_shape(t, shape[1:] if i is not None else shape), np_dtype, produce(parts)))

    # Greedy packing in order, as transformers does; a tensor larger than the limit gets its own file.
    shards: list[list] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item[1]) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes

    write = jax.process_index() == 0
    directory = pathlib.Path(path)
    if write:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in [directory / WEIGHTS_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
            stale.unlink(missing_ok=True)
    names = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for fname, shard in zip(names, shards):
        _write_safetensors(directory / fname, shard, write)
    if not write:
        return
    if len(shards) > 1:
        total = sum(math.prod(s) * np_dtype.itemsize for _, s, _, _ in items)
        index = {"metadata": {"total_size": total},
                 "weight_map": {item[0]: f for f, shard in zip(names, shards) for item in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = config_to_hf(cfg)
    config["torch_dtype"] = dtype
    config.update(extra_config or {})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
