"""One functional decoder-only transformer for the GPT-2, Llama 3 and Qwen2 families.

Params are a plain nested dict of float32 arrays; the per-layer weights are stacked on a leading
`layers` axis and run with `jax.lax.scan`, so compile time does not grow with depth. A parallel
tree from `param_axes` names the logical axis of every dimension; `core/sharding.py` maps those
names onto a device mesh.

Shape letters: B batch, T query time, S cache slots / key time, D d_model, H query heads,
K kv heads, G = H // K query heads per kv head, E head_dim, F d_ff, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

Params = dict[str, Any]
Cache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model; every family is a choice of switches.

    head_dim defaults to d_model // n_heads. `rope_scaling` is None or a tuple of
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) for
    Llama 3's frequency scaling (a tuple, not a dict, so the config stays hashable for jit).
    `smear_keys` mixes each key with its predecessor's through a learned per-head gate (see
    `_smear`); `tiny` uses it so that in-context copying forms within a CPU-sized budget.
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    max_seq_len: int = 256
    norm: str = "rmsnorm"  # 'rmsnorm' | 'layernorm'
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # 'swiglu' | 'gelu' | 'relu2'
    pos: str = "rope"  # 'rope' | 'learned'
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple[float, float, float, int]] = None
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    qk_norm: bool = False
    logit_softcap: Optional[float] = None
    smear_keys: bool = False
    zero_init_out: bool = False
    init_std: float = 0.02
    compute_dtype: str = "float32"  # matmul dtype: 'float32' | 'bfloat16' | 'float64' (numerics tests, needs x64)
    remat: Union[bool, str] = False  # False | True / 'full' (recompute the block) | 'dots' (keep matmul outputs)

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        need(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        need(self.n_layers > 0, f"n_layers must be positive, got {self.n_layers}")
        need(self.n_heads > 0, f"n_heads must be positive, got {self.n_heads}")
        if self.head_dim is None:
            need(
                self.d_model % self.n_heads == 0,
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}",
            )
        kv = self.n_kv_heads if self.n_kv_heads is not None else self.n_heads
        need(kv > 0, f"n_kv_heads must be positive, got {kv}")
        need(self.n_heads % kv == 0, f"n_kv_heads={kv} does not divide n_heads={self.n_heads}")
        need(self.norm in ("rmsnorm", "layernorm"), f"unknown norm {self.norm!r}")
        need(self.mlp in ("swiglu", "gelu", "relu2"), f"unknown mlp {self.mlp!r}")
        need(self.pos in ("rope", "learned"), f"unknown pos {self.pos!r}")
        need(self.compute_dtype in ("float32", "bfloat16", "float64"), f"unknown compute_dtype {self.compute_dtype!r}")
        need(self.remat in (False, True, "full", "dots"), f"remat must be False, True, 'full' or 'dots', got {self.remat!r}")
        need(self.pos != "rope" or self.e % 2 == 0, f"rope needs an even head_dim, got {self.e}")
        if self.rope_scaling is not None:
            need(len(self.rope_scaling) == 4, "rope_scaling is (factor, low_freq_factor, high_freq_factor, original_max_pos)")

    # Short derived sizes used throughout.
    @property
    def k(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def e(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def f(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def dtype(self):
        return {"bfloat16": jnp.bfloat16, "float64": jnp.float64}.get(self.compute_dtype, jnp.float32)

    @property
    def acc_dtype(self):
        """Residual stream / norm / logits dtype: float32, or float64 when computing in float64."""
        return _acc(self.dtype)


def _acc(dtype):
    # float32 for float32/bfloat16 inputs; float64 stays float64 (finite-difference tests).
    return jnp.promote_types(dtype, jnp.float32)


# The "modern small model" recipe (nanochat-like): RoPE, RMSNorm, ReLU^2, QK-norm, soft-capped
# logits, zero-initialised output projections, untied head.
_MODERN = dict(
    norm="rmsnorm", mlp="relu2", pos="rope", qk_norm=True, logit_softcap=15.0,
    zero_init_out=True, tie_embeddings=False,
)

PRESETS: dict[str, ModelConfig] = {
    # Laptop CPU in minutes; vocab_size is normally overridden by the tokenizer's.
    "tiny": ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, d_ff=512,
                        max_seq_len=256, smear_keys=True, remat="dots", **_MODERN),
    # ~4.5x tiny's compute per token (d_model 256, 6 layers): the CPU size for the assistant
    # rows tiny is too small for (see the README's SFT section for the size/time trade-off).
    "mini": ModelConfig(vocab_size=4096, d_model=256, n_layers=6, n_heads=4, d_ff=1024,
                        max_seq_len=256, smear_keys=True, remat="dots", **_MODERN),
    "gpt2-124m": ModelConfig(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                             max_seq_len=1024, norm="layernorm", mlp="gelu", pos="learned",
                             qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
    # nanochat's d20 shape (~560M params with a 65k vocab).
    "d20": ModelConfig(vocab_size=65536, d_model=1280, n_layers=20, n_heads=10, d_ff=5120,
                       max_seq_len=2048, **_MODERN),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                                d_ff=4864, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6,
                                mlp="swiglu", qkv_bias=True, tie_embeddings=True),
    "qwen2.5-1.5b": ModelConfig(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                                d_ff=8960, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6,
                                mlp="swiglu", qkv_bias=True, tie_embeddings=True),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                head_dim=64, d_ff=8192, max_seq_len=131072, rope_theta=500000.0,
                                rope_scaling=(32.0, 1.0, 4.0, 8192), mlp="swiglu", tie_embeddings=True),
}


def get_config(preset: str, **overrides) -> ModelConfig:
    """Returns the named preset with `overrides` applied; ValueError names unknown presets/fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown ModelConfig field(s) {bad}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 * matmul params + attention."""
    d, e, L = cfg.d_model, cfg.e, cfg.n_layers
    attn_proj = d * e * (2 * cfg.n_heads + 2 * cfg.k)
    mlp = d * cfg.f * (3 if cfg.mlp == "swiglu" else 2)
    head = d * cfg.vocab_size
    matmul_params = L * (attn_proj + mlp) + head
    attn_scores = L * 2 * cfg.n_heads * e * seq_len  # QK^T and AV, causal average ~ seq_len/2 each, x2 mults
    return 6.0 * matmul_params + 6.0 * attn_scores / 2


# ----------------------------------------------------------------------------- params


def _norm_shapes(cfg: ModelConfig, lead: tuple[int, ...]) -> dict[str, tuple]:
    shapes = {"scale": lead + (cfg.d_model,)}
    if cfg.norm == "layernorm":
        shapes["bias"] = lead + (cfg.d_model,)
    return shapes


def _shapes_and_axes(cfg: ModelConfig) -> tuple[dict, dict]:
    """(shape tree, logical-axes tree); the single source of truth for the param layout."""
    L, D, H, K, E, F, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.k, cfg.e, cfg.f, cfg.vocab_size
    shapes: dict[str, Any] = {"embed": {"tokens": (V, D)}}
    axes: dict[str, Any] = {"embed": {"tokens": ("vocab", "embed")}}
    if cfg.pos == "learned":
        shapes["pos_embed"] = (cfg.max_seq_len, D)
        axes["pos_embed"] = (None, "embed")

    def norm(lead_shape, lead_axes):
        s = _norm_shapes(cfg, lead_shape)
        return s, {k: lead_axes + ("embed",) for k in s}

    attn_s = {"wq": (L, D, H, E), "wk": (L, D, K, E), "wv": (L, D, K, E), "wo": (L, H, E, D)}
    attn_a = {
        "wq": ("layers", "embed", "heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "heads", "head_dim", "embed"),
    }
    if cfg.qkv_bias:
        attn_s.update(bq=(L, H, E), bk=(L, K, E), bv=(L, K, E))
        attn_a.update(bq=("layers", "heads", "head_dim"), bk=("layers", "kv_heads", "head_dim"),
                      bv=("layers", "kv_heads", "head_dim"))
    if cfg.attn_out_bias:
        attn_s["bo"] = (L, D)
        attn_a["bo"] = ("layers", "embed")
    if cfg.qk_norm:
        attn_s.update(q_norm=(L, E), k_norm=(L, E))
        attn_a.update(q_norm=("layers", "head_dim"), k_norm=("layers", "head_dim"))
    if cfg.smear_keys:
        attn_s["smear"] = (L, K)
        attn_a["smear"] = ("layers", "kv_heads")

    mlp_s = {"w_in": (L, D, F), "w_out": (L, F, D)}
    mlp_a = {"w_in": ("layers", "embed", "mlp"), "w_out": ("layers", "mlp", "embed")}
    if cfg.mlp == "swiglu":
        mlp_s["w_gate"] = (L, D, F)
        mlp_a["w_gate"] = ("layers", "embed", "mlp")
    if cfg.mlp_bias:
        mlp_s.update(b_in=(L, F), b_out=(L, D))
        mlp_a.update(b_in=("layers", "mlp"), b_out=("layers", "embed"))

    an_s, an_a = norm((L,), ("layers",))
    mn_s, mn_a = norm((L,), ("layers",))
    fn_s, fn_a = norm((), ())
    shapes["layers"] = {"attn_norm": an_s, "attn": attn_s, "mlp_norm": mn_s, "mlp": mlp_s}
    axes["layers"] = {"attn_norm": an_a, "attn": attn_a, "mlp_norm": mn_a, "mlp": mlp_a}
    shapes["final_norm"], axes["final_norm"] = fn_s, fn_a
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
        axes["lm_head"] = ("embed", "vocab")
    return shapes, axes


def param_axes(cfg: ModelConfig) -> dict:
    """Tree matching `init_params` whose leaves are tuples of logical axis names."""
    return _shapes_and_axes(cfg)[1]


def param_shapes(cfg: ModelConfig) -> dict:
    """Tree matching `init_params` whose leaves are jax.ShapeDtypeStruct (float32); no allocation."""
    shapes = _shapes_and_axes(cfg)[0]
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                                  is_leaf=lambda s: isinstance(s, tuple))


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
    """Random float32 params. Norm scales are 1, biases 0; output projections are zero when
    `cfg.zero_init_out` (so every block starts as the identity), else scaled by 1/sqrt(2L)."""
    shapes = _shapes_and_axes(cfg)[0]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(flat))
    out_std = 0.0 if cfg.zero_init_out else cfg.init_std / math.sqrt(2 * cfg.n_layers)
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name in ("scale", "q_norm", "k_norm"):
            leaves.append(jnp.ones(shape, jnp.float32))
        elif name.startswith("b") or name in ("bias", "smear"):  # smear: gates start at one half
            leaves.append(jnp.zeros(shape, jnp.float32))
        elif name in ("wo", "w_out"):
            leaves.append(out_std * jax.random.normal(k, shape, jnp.float32))
        else:
            leaves.append(cfg.init_std * jax.random.normal(k, shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An empty KV cache: per layer (tuples of L arrays), keys k [B, K, E, S] and values
    v [B, K, S, E], plus per-row fill `lengths` [B] int32.

    Why this layout (decode on XLA:CPU is bound by reading the cache once per step):
      - one array per layer: a decode step reads and writes each layer's buffer in place, where
        slicing layer l out of an [L, ...] stack (inside a scan) copies [B, S, K, E] per layer;
      - kv heads before slots: (b, k) are the batch dims of the score and value matmuls, so no
        transpose of the cache is needed to feed them;
      - keys with slots minor ([E, S]): q.k then streams over S in vectors (3x faster than
        reducing over a minor E of 64 at batch 64, 512 slots); values keep E minor for p @ v.
    Keys are stored raw (before smearing): smearing is applied to the scores (see
    `_cached_attention`), so a right-padded prefill can still set `lengths` afterwards.
    """
    k = tuple(jnp.zeros((batch, cfg.k, cfg.e, max_len), dtype) for _ in range(cfg.n_layers))
    v = tuple(jnp.zeros((batch, cfg.k, max_len, cfg.e), dtype) for _ in range(cfg.n_layers))
    return {"k": k, "v": v, "lengths": jnp.zeros((batch,), jnp.int32)}


def with_prefix(own: Cache, prefix: Cache) -> Cache:
    """A cache whose B = N * G rows continue N shared prefixes, G rows each (row b continues
    prefix b // G): `own` from `init_cache(cfg, B, S)` holds the rows' own tokens, `prefix` (N
    rows, e.g. a prefilled prompt cache) is read by all G rows and stored once, so memory does
    not grow with G for long prompts. Own tokens take positions prefix_len + own slot."""
    return dict(own, prefix={"k": prefix["k"], "v": prefix["v"], "lengths": prefix["lengths"]})


def cache_slots(cache: Cache) -> int:
    """S, the number of slots of a cache from `init_cache`."""
    return cache["v"][0].shape[2]


# ----------------------------------------------------------------------------- layers


def _norm(x_btd: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis, computed in float32."""
    x = x_btd.astype(cfg.acc_dtype)
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(_acc(x.dtype))
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps) * scale).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """[E/2] inverse frequencies, with Llama 3's low/high-frequency scaling when configured."""
    e = cfg.e
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    if cfg.rope_scaling is None:
        return inv
    factor, low, high, old_len = cfg.rope_scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def _rope(x_bthe: jax.Array, cos_bte: jax.Array, sin_bte: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + E/2): the 'rotate_half' convention of Hugging Face Llama/Qwen2."""
    half = x_bthe.shape[-1] // 2
    x1, x2 = x_bthe[..., :half], x_bthe[..., half:]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    xf = x_bthe.astype(_acc(x_bthe.dtype))
    out = xf * cos_bte[:, :, None, :] + rot.astype(xf.dtype) * sin_bte[:, :, None, :]
    return out.astype(x_bthe.dtype)


def _matmul(x, w, n_contract: int = 1):
    """Contracts the last n_contract dims of x with the first n_contract dims of w as ONE 2-D
    matmul [rows, K] @ [K, N], then restores the shapes. Same math as the einsum; on XLA:CPU the
    gradient of a batched 'btd,df->btf' einsum materialises transposes that this avoids (about a
    third of a width-256 train step)."""
    k = math.prod(w.shape[:n_contract])
    lead = x.shape[: x.ndim - n_contract]
    return (x.reshape(-1, k) @ w.reshape(k, -1)).reshape(lead + w.shape[n_contract:])


def _attention(q_bthe, k_bske, v_bske, mask_bts, cfg: ModelConfig) -> jax.Array:
    """Grouped-query attention through jax.nn.dot_product_attention (cuDNN flash on GPU when
    the mask allows, XLA elsewhere). mask_bts: True where query t may see key s, or None for
    plain causal attention (no [B, T, S] mask is built, nor saved per layer for the backward)."""
    if mask_bts is None:
        if cfg.compute_dtype != "float64":
            return jax.nn.dot_product_attention(q_bthe, k_bske, v_bske, is_causal=True,
                                                scale=1.0 / math.sqrt(cfg.e))
        mask_bts = jnp.tril(jnp.ones((q_bthe.shape[1], k_bske.shape[1]), bool))[None]
    if cfg.compute_dtype == "float64":
        # dot_product_attention computes its softmax in float32; keep float64 end to end.
        b, t, h, e = q_bthe.shape
        k_heads = k_bske.shape[2]
        q_btkge = q_bthe.reshape(b, t, k_heads, h // k_heads, e)
        s_bkgts = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske) / math.sqrt(cfg.e)
        s_bkgts = jnp.where(mask_bts[:, None, None], s_bkgts, -jnp.inf)
        p_bkgts = jax.nn.softmax(s_bkgts, axis=-1)
        return jnp.einsum("bkgts,bske->btkge", p_bkgts, v_bske).reshape(b, t, h, e)
    return jax.nn.dot_product_attention(
        q_bthe, k_bske, v_bske, mask=mask_bts[:, None, :, :], scale=1.0 / math.sqrt(cfg.e)
    )


def _smear(k_bske: jax.Array, logit_k: jax.Array, has_prev_bs: jax.Array) -> jax.Array:
    """Smeared keys (Olsson et al., 2022): key s becomes (1 - g) k_s + g k_{s-1}, with a learned
    gate g = sigmoid(logit) per kv head and k_{s-1} = 0 at a document's first token. A key then
    carries its predecessor, so one layer can do in-context copying (match the current token
    against the token *before* s, read token s), which otherwise needs a previous-token head and
    an induction head in two layers and forms only after a long plateau."""
    prev = jnp.pad(k_bske[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
    prev = jnp.where(has_prev_bs[:, :, None, None], prev, jnp.zeros((), prev.dtype))
    g = jax.nn.sigmoid(logit_k.astype(_acc(k_bske.dtype))).astype(k_bske.dtype)[None, None, :, None]
    return k_bske + g * (prev - k_bske)


def _scatter_bits(buf, index, values):
    """buf.at[index].set(values) (mode 'drop'), done on the raw bits for 16-bit floats: XLA:CPU
    has no bfloat16 scatter and would convert the whole buffer to float32 and back around it
    (the full cache, every step); a uint16 scatter of the same bits is native and in place."""
    values = values.astype(buf.dtype)
    if buf.dtype.itemsize != 2:
        return buf.at[index].set(values, mode="drop")
    bits = jax.lax.bitcast_convert_type(buf, jnp.uint16)
    bits = bits.at[index].set(jax.lax.bitcast_convert_type(values, jnp.uint16), mode="drop")
    return jax.lax.bitcast_convert_type(bits, buf.dtype)


def _group_rows(x_bkqx: jax.Array, n: int) -> jax.Array:
    """[B, K, Q, X] -> [N, K, G*Q, X] with B = N*G: the G rows of a prefix become query rows of
    one matmul against the prefix (one read of it per group, not per row)."""
    b, kh, q, x = x_bkqx.shape
    g = b // n
    return x_bkqx.reshape(n, g, kh, q, x).transpose(0, 2, 1, 3, 4).reshape(n, kh, g * q, x)


def _ungroup_rows(x_nkqx: jax.Array, g: int) -> jax.Array:
    """Inverse of `_group_rows`: [N, K, G*Q, X] -> [N*G, K, Q, X]."""
    n, kh, gq, x = x_nkqx.shape
    q = gq // g
    return x_nkqx.reshape(n, kh, g, q, x).transpose(0, 2, 1, 3, 4).reshape(n * g, kh, q, x)


def _attend_dots(q_bkqe, ck_bkes, cv_bkse, acc):
    """(scores fn, values fn) for one cache part: batched float32 dots, or for a bfloat16 cache
    read by few query rows a multiply-and-reduce that XLA:CPU fuses with the upcast and streams
    over S (its batched bfloat16 dots are ~10x slower than float32 ones; a long query block would
    materialise [B, K, Q, E, S], so prefills upcast the cache once and use float32 dots)."""
    if ck_bkes.dtype == jnp.bfloat16 and q_bkqe.shape[2] <= 8:
        return (lambda: jnp.sum(q_bkqe.astype(acc)[..., None] * ck_bkes[:, :, None].astype(acc), axis=3),
                lambda p_bkqs: jnp.sum(p_bkqs[..., None] * cv_bkse[:, :, None].astype(acc), axis=3))
    ck, cv = ck_bkes.astype(acc), cv_bkse.astype(acc)
    return (lambda: jnp.einsum("bkqe,bkes->bkqs", q_bkqe.astype(acc), ck),
            lambda p_bkqs: jnp.einsum("bkqs,bkse->bkqe", p_bkqs, cv))


def _cached_attention(q_bthe, k_btke, v_btke, ck_bkes, cv_bkse, slots_bt, smear_k, cfg: ModelConfig,
                      prefix=None):
    """Writes T new raw keys / values at slots slots_bt [B, T] of one layer's cache, then attends
    every query to the cache slots up to its own. Returns (o_bthe, (ck_bkes, cv_bkse)).

    Scores are one batched matmul per (b, k) over the cache in its stored layout (no copy or
    transpose of a float32 cache), accumulated in float32 (or float64) whatever the cache dtype.
    Smeared keys act on scores: q . ((1 - g) k_s + g k_{s-1}) = (1 - g) (q . k_s) + g (q . k_{s-1}),
    so the stored keys stay raw and only the [B, K, T*G, S] scores are shifted by one slot (slot
    0 has no predecessor: rows hold one document each, from slot 0).

    prefix: None, or (pk_nkep, pv_npke, plen_n) of a shared prefix (see `with_prefix`): row b also
    attends to slots < plen_n[b // G] of prefix row b // G, which precede its own slot 0 (whose
    smearing predecessor is the prefix's last token). One softmax spans both parts.
    """
    b, t, h, e = q_bthe.shape
    kh = ck_bkes.shape[1]
    rows_b1 = jnp.arange(b, dtype=jnp.int32)[:, None]
    # In-place scatters into this layer's buffer; slots past the end are dropped, not clamped.
    ck_bkes = _scatter_bits(ck_bkes, (rows_b1, slice(None), slice(None), slots_bt), k_btke)
    cv_bkse = _scatter_bits(cv_bkse, (rows_b1, slice(None), slots_bt), v_btke)
    acc = _acc(q_bthe.dtype)
    g = h // kh
    # Rank-4 batched matmuls with (b, k) leading: [B, K, T*G, E] x [B, K, E, S]. The same
    # contraction written as a rank-5 einsum ('btkge,bkes->bkgts') runs ~10x slower on XLA:CPU.
    q_bkqe = q_bthe.reshape(b, t, kh, g, e).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, e)
    scores, values = _attend_dots(q_bkqe, ck_bkes, cv_bkse, acc)
    scale = 1.0 / math.sqrt(cfg.e)
    s_bkqs = scores() * scale
    n_slots = cv_bkse.shape[2]
    mask_bts = jnp.arange(n_slots, dtype=jnp.int32)[None, None, :] <= slots_bt[:, :, None]
    gate = None if smear_k is None else jax.nn.sigmoid(smear_k.astype(acc))[None, :, None, None]
    if prefix is None:
        if gate is not None:
            prev = jnp.pad(s_bkqs[..., :-1], [(0, 0)] * 3 + [(1, 0)])
            s_bkqs = s_bkqs + gate * (prev - s_bkqs)
        s_bktgs = jnp.where(mask_bts[:, None, :, None], s_bkqs.reshape(b, kh, t, g, n_slots), -jnp.inf)
        p_bkqs = jax.nn.softmax(s_bktgs, axis=-1).reshape(b, kh, t * g, n_slots)
        o_bkqe = values(p_bkqs)
    else:
        pk_nkep, pv_npke, plen_n = prefix
        n, p_slots = pk_nkep.shape[0], pk_nkep.shape[3]
        q_nkqe = _group_rows(q_bkqe, n)
        p_scores, p_values = _attend_dots(q_nkqe, pk_nkep, pv_npke, acc)
        sp_bkqp = _ungroup_rows(p_scores(), b // n) * scale
        plen_b = jnp.repeat(plen_n, b // n)
        if gate is not None:
            last_bkq1 = jnp.take_along_axis(sp_bkqp, jnp.maximum(plen_b - 1, 0)[:, None, None, None], -1)
            prev = jnp.concatenate([last_bkq1, s_bkqs[..., :-1]], -1)
            s_bkqs = s_bkqs + gate * (prev - s_bkqs)
            prev_p = jnp.pad(sp_bkqp[..., :-1], [(0, 0)] * 3 + [(1, 0)])
            sp_bkqp = sp_bkqp + gate * (prev_p - sp_bkqp)
        sp_bkqp = jnp.where((jnp.arange(p_slots)[None, :] < plen_b[:, None])[:, None, None, :], sp_bkqp, -jnp.inf)
        s_bkqs = jnp.where(mask_bts[:, None, :, None], s_bkqs.reshape(b, kh, t, g, n_slots),
                           -jnp.inf).reshape(b, kh, t * g, n_slots)
        # One softmax over both parts without concatenating them: a shared max, two exp-sums.
        m_bkq1 = jnp.maximum(sp_bkqp.max(-1, keepdims=True), s_bkqs.max(-1, keepdims=True))
        ep_bkqp, es_bkqs = jnp.exp(sp_bkqp - m_bkq1), jnp.exp(s_bkqs - m_bkq1)
        inv_bkq1 = 1.0 / (ep_bkqp.sum(-1, keepdims=True) + es_bkqs.sum(-1, keepdims=True))
        o_bkqe = (values(es_bkqs * inv_bkq1)
                  + _ungroup_rows(p_values(_group_rows(ep_bkqp * inv_bkq1, n)), b // n))
    o_btkge = o_bkqe.reshape(b, kh, t, g, e).transpose(0, 2, 1, 3, 4)
    return o_btkge.reshape(b, t, h, e).astype(q_bthe.dtype), (ck_bkes, cv_bkse)


def _block(x_btd, lp, cfg: ModelConfig, cos_bte, sin_bte, mask_bts, kv_cache, slots_bt, has_prev_bs,
           prefix=None):
    """One transformer block. kv_cache is None or (k_bkes, v_bkse): this layer's cache; the new
    keys (before smearing) and values go to slots slots_bt [B, T] and the updated buffers are
    returned. has_prev_bs [B, T]: key t has a predecessor in its document (smear_keys; unused
    with a cache). prefix: this layer's shared-prefix (k, v, lengths) or None (`with_prefix`)."""
    dt = cfg.dtype
    h = _norm(x_btd, lp["attn_norm"], cfg).astype(dt)
    a = lp["attn"]
    q = _matmul(h, a["wq"].astype(dt))  # [B, T, H, E]
    k = _matmul(h, a["wk"].astype(dt))  # [B, T, K, E]
    v = _matmul(h, a["wv"].astype(dt))
    if cfg.qkv_bias:
        q, k, v = q + a["bq"].astype(dt), k + a["bk"].astype(dt), v + a["bv"].astype(dt)
    if cfg.qk_norm:
        q, k = _rms(q, a["q_norm"], cfg.norm_eps), _rms(k, a["k_norm"], cfg.norm_eps)
    if cfg.pos == "rope":
        q, k = _rope(q, cos_bte, sin_bte), _rope(k, cos_bte, sin_bte)
    new_kv = None
    if kv_cache is not None:
        o, new_kv = _cached_attention(q, k, v, kv_cache[0], kv_cache[1], slots_bt,
                                      a["smear"] if cfg.smear_keys else None, cfg, prefix)
    else:
        if cfg.smear_keys:
            k = _smear(k, a["smear"], has_prev_bs)
        o = _attention(q, k, v, mask_bts, cfg)
    o = _matmul(o, a["wo"].astype(dt), 2).astype(cfg.acc_dtype)  # [B, T, H, E] x [H, E, D]
    if cfg.attn_out_bias:
        o = o + a["bo"]
    x_btd = x_btd + o

    h = _norm(x_btd, lp["mlp_norm"], cfg).astype(dt)
    m = lp["mlp"]
    up = _matmul(h, m["w_in"].astype(dt))
    if cfg.mlp_bias:
        up = up + m["b_in"].astype(dt)
    if cfg.mlp == "swiglu":
        act = jax.nn.silu(_matmul(h, m["w_gate"].astype(dt))) * up
    elif cfg.mlp == "gelu":
        act = jax.nn.gelu(up, approximate=True)
    else:
        act = jnp.square(jax.nn.relu(up))
    y = _matmul(act, m["w_out"].astype(dt)).astype(cfg.acc_dtype)
    if cfg.mlp_bias:
        y = y + m["b_out"]
    return x_btd + y, new_kv


# Up to this depth, training on XLA:CPU runs the layers as straight-line code instead of a scan:
# the scan's saved residuals become zero-filled [L, ...] stacks written and read back by a
# dynamic-update-slice / dynamic-slice per layer, which cost XLA:CPU 5-8% of a small model's
# train step; deeper models keep the scan so that compile time stays flat in depth.
_CPU_UNROLL_MAX_LAYERS = 8


def _unroll_layers(cfg: ModelConfig, layers) -> bool:
    """Whether the uncached forward runs its layers one by one (always for `split_layers` params)."""
    return isinstance(layers, (list, tuple)) or (cfg.n_layers <= _CPU_UNROLL_MAX_LAYERS
                                                 and jax.default_backend() == "cpu")


def _layer_params(layers, i: int):
    """Layer i's params from [L, ...] stacks or from a `split_layers` tuple."""
    return layers[i] if isinstance(layers, (list, tuple)) else jax.tree_util.tree_map(lambda w: w[i], layers)


def forward_hidden(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, *, positions=None,
                   segment_ids=None, cache: Optional[Cache] = None):
    """Runs embeddings and all blocks; returns (final-normed hidden x_btd float32, new cache).

    See `forward` for the arguments. Heads other than the LM head (a reward model's scalar head)
    start from here.
    """
    b, t = tokens_bt.shape
    if cache is not None:
        # Query at slot q sees every slot <= q (masked in _cached_attention); slots past a
        # row's fill are never attended.
        slots_bt = cache["lengths"][:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        mask_bts = has_prev_bs = None
        if positions is None:
            positions = slots_bt
            if "prefix" in cache:  # own slot 0 follows the prefix's last token
                plen_n = cache["prefix"]["lengths"]
                positions = slots_bt + jnp.repeat(plen_n, b // plen_n.shape[0])[:, None]
    else:
        slots_bt = None
        idx = jnp.arange(t, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(idx[None, :], (b, t))
        mask_bts = None  # causal
        has_prev_bs = jnp.broadcast_to(idx[None, :] > 0, (b, t))
        if segment_ids is not None:
            causal = idx[None, :, None] >= idx[None, None, :]
            mask_bts = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
            same = segment_ids[:, 1:] == segment_ids[:, :-1]
            has_prev_bs = has_prev_bs & jnp.pad(same, ((0, 0), (1, 0)))

    x = params["embed"]["tokens"][tokens_bt].astype(cfg.acc_dtype)
    if cfg.pos == "learned":
        x = x + params["pos_embed"][positions]
        cos = sin = None
    else:
        ang = positions.astype(jnp.float32)[:, :, None] * rope_inv_freq(cfg)[None, None, :]
        cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)
        sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)

    if cache is None:
        def layer(x_btd, lp):
            return _block(x_btd, lp, cfg, cos, sin, mask_bts, None, None, has_prev_bs)[0], None

        if cfg.remat:
            # 'dots' keeps matmul outputs and recomputes the elementwise ops in the backward: on
            # XLA:CPU that beats saving them through the layer scan (tiny train step ~7% faster).
            policy = jax.checkpoint_policies.dots_saveable if cfg.remat == "dots" else None
            layer = jax.checkpoint(layer, prevent_cse=False, policy=policy)
        if _unroll_layers(cfg, params["layers"]):
            for i in range(cfg.n_layers):
                x, _ = layer(x, _layer_params(params["layers"], i))
        else:
            x, _ = jax.lax.scan(layer, x, params["layers"])
        return _norm(x, params["final_norm"], cfg), None

    # With a cache the layers are unrolled over the per-layer buffers: each is updated in place
    # and read by its layer's attention directly. A scan would carry one [L, ...] stack and slice
    # layer l out of it (a copy of that layer's cache, several times the step's useful reads on
    # XLA:CPU); ys would rebuild the whole cache every step. Only the small decode/prefill graph
    # grows with depth; training (no cache) keeps the scan.
    ks, vs = list(cache["k"]), list(cache["v"])
    layers = params["layers"]
    for i in range(cfg.n_layers):
        lp = _layer_params(layers, i)
        pre = cache.get("prefix")
        pre = None if pre is None else (pre["k"][i], pre["v"][i], pre["lengths"])
        x, (ks[i], vs[i]) = _block(x, lp, cfg, cos, sin, None, (ks[i], vs[i]), slots_bt, None, pre)
    new_cache = dict(cache, k=tuple(ks), v=tuple(vs), lengths=cache["lengths"] + t)
    return _norm(x, params["final_norm"], cfg), new_cache


def split_layers(params: Params) -> Params:
    """params with `layers` as a tuple of per-layer trees instead of [L, ...] stacks. The cached
    forward accepts both; a decode loop splits once outside its loop so that each step does not
    slice (copy) every layer's weights out of the stacks."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return dict(params, layers=tuple(jax.tree_util.tree_map(lambda w, i=i: w[i], layers) for i in range(n)))


def logits_from_hidden(params: Params, x_btd: jax.Array, cfg: ModelConfig) -> jax.Array:
    """LM head (tied or untied) and optional tanh soft-cap; returns float32 logits [..., V]."""
    dt = cfg.dtype
    if cfg.tie_embeddings:
        logits = _matmul(x_btd.astype(dt), params["embed"]["tokens"].astype(dt).T)
    else:
        logits = _matmul(x_btd.astype(dt), params["lm_head"].astype(dt))
    logits = logits.astype(cfg.acc_dtype)
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return logits


def forward(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, *, positions=None,
            segment_ids=None, cache: Optional[Cache] = None):
    """The model: token ids -> next-token logits.

    Args:
      params: tree from `init_params` (or `core.hf.load_checkpoint`).
      tokens_bt: int32 [B, T].
      positions: int32 [B, T] position ids for RoPE / learned embeddings. Default: 0..T-1, or the
        cache slots being written when a cache is given. Packed rows pass per-document positions.
      segment_ids: int32 [B, T]; tokens attend only to earlier tokens of the same segment
        (packed documents; padding as its own segment). Ignored when a cache is given.
      cache: None, or a dict from `init_cache`. Row b's T new tokens are written at slots
        lengths[b] .. lengths[b]+T-1 and attend to all slots up to their own; the returned cache
        has lengths += T. After a right-padded prefill, set cache['lengths'] to the prompt lengths.
        A cache from `with_prefix` also attends to each row's shared prefix first.

    Returns:
      (logits_btv float32 [B, T, V], new cache or None).
    """
    x, cache = forward_hidden(params, tokens_bt, cfg, positions=positions, segment_ids=segment_ids,
                              cache=cache)
    return logits_from_hidden(params, x, cfg), cache
