"""The inference engine: batched prefill + decode with a static-shape KV cache, stochastic
sampling (greedy, temperature, top-k, top-p, min-p), per-row stop tokens and lengths, per-token
log-probs, and tool calls spliced into the token stream.

How a batch is generated:
  1. Prompts are right-padded to a power-of-two length P and prefilled, one forward pass per
     batch of prompts, into a shared-prefix cache (model.with_prefix): each prompt's keys and
     values are stored once, and its n_samples rows keep only their own generated tokens (a
     power of two >= max_new_tokens slots). The samples of a prompt share its prefill and its
     cache: memory does not grow with n_samples for long prompts, and attention reads the prompt
     once per group (its rows are query rows of one matmul).
  2. A jitted `lax.while_loop` decodes one token per row per step. Rows that finish (a stop token
     or their length limit) stop writing; the loop ends when every row is finished. On a mesh
     that only splits rows (data / fsdp), each device runs its own loop over its own rows
     (shard_map), with no communication per step: on CPU, with one XLA host device per core
     (experiments.common.use_cpu_cores_as_devices), this is what puts both cores to work on
     batch-64 decode, whose attention matmuls XLA:CPU runs on one thread.
  3. Continuous batching (max_rows): prompts wait in a queue; when every row of a prompt has
     finished, the host takes its results and prefills the next prompt into its slot, so a
     batch does not wait for its longest row. Each row samples with its own key (the call's key
     folded with its prompt index, sample index and token count), so the tokens do not depend on
     which slot, batch or step a row ran in.
  4. Tools: when a row samples a tool's end token (e.g. `<|calculator_end|>`), it pauses. The loop
     runs in chunks of steps; between chunks the host decodes the paused row's call and starts it
     on a thread pool (tool_workers); other rows keep decoding while calls run. A finished call's
     `<|output_start|> output <|output_end|>` goes into its row's device-side forced buffer. The
     next steps feed those tokens (not sampled: `sampled_mask` 0) before the row samples again.
     Without tools, streaming or a queue the whole generation is one device call, so the host
     never syncs per token.

Shapes avoid recompiles: prompt length, cache size, output buffer and batch of stop ids are
bucketed; sampling knobs (temperature, top-p, min-p) are traced values, so only the greedy flag,
top-k and whether top-p / min-p are on are compiled in.

Row order: row r of every result array is sample r % n_samples of prompt r // n_samples.
Log-probs: `logprobs` is the model's own log-softmax (temperature 1, no truncation) of each token,
the quantity RL recomputes under the training forward; `sample_logprobs` is the log-prob under the
tempered and truncated distribution actually sampled from (0 for greedy and forced tokens).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from core import chat as chat_lib
from core import model as model_lib
from core import sharding as sharding_lib

Params = dict[str, Any]
State = dict[str, Any]

# finish_reason codes on device -> names on the host.
_RUNNING, _STOP, _LENGTH = 0, 1, 2
FINISH_REASONS = {_RUNNING: "running", _STOP: "stop", _LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn. Filters apply in this order to the logits / temperature:
    top-k, then top-p on the renormalised top-k distribution, then min-p (keep tokens whose
    probability is at least min_p times the most likely one's).

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 = off.
    top_p: nucleus, keep the smallest prefix of the sorted distribution with mass >= top_p; 1 = off.
    min_p: 0 = off.
    max_new_tokens: per-row cap on generated tokens (tool outputs count too); per-row overrides
      can only be given to `generate`.
    stop_ids: a sampled token in this set ends the row (the stop token is kept in the output).
    banned_ids: ids never sampled (their logits are -inf before any filter), e.g. the tool-call
      start tokens to measure what a model answers without tools. Log-probs stay the model's own.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()
    banned_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingConfig.min_p must be in [0, 1), got {self.min_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))
        object.__setattr__(self, "banned_ids", tuple(sorted({int(s) for s in self.banned_ids})))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def static(self) -> tuple:
        """The compiled-in part: (greedy, top_k, top_p on, min_p on, banned ids)."""
        return (self.greedy, int(self.top_k), self.top_p < 1.0, self.min_p > 0.0, self.banned_ids)

    def knobs(self) -> jax.Array:
        """The traced part: [temperature, top_p, min_p] float32."""
        return jnp.asarray([max(self.temperature, 1e-6), self.top_p, self.min_p], jnp.float32)


@dataclasses.dataclass
class GenerateResult:
    """Generated tokens of N = len(prompts) * n_samples rows (host numpy arrays).

    tokens: int32 [N, T_max] new tokens (T_max = the largest max_new_tokens), padded with 0.
    logprobs: float32 [N, T_max] model log-prob (temperature 1) of each token, 0 in padding.
    sample_logprobs: float32 [N, T_max] log-prob under the sampling distribution; 0 for greedy,
      forced tokens and padding.
    sampled_mask: int32 [N, T_max] 1 for sampled tokens, 0 for forced tool output and padding
      (SFT/RL loss masks).
    lengths: int32 [N] tokens generated per row (sampled + forced).
    finish_reason: N strings, 'stop' (a stop token was sampled) or 'length'.
    prompt_index: int32 [N] which prompt each row continues (r // n_samples).
    tool_calls: per row, a list of {'name', 'input', 'output', 'position'} in call order;
      position is the index in `tokens` of the tool's end token.
    prefill_s, decode_s: wall-clock seconds of the prefill (compile included on a first call)
      and of the decode loop (tool runs included).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    sample_logprobs: np.ndarray
    sampled_mask: np.ndarray
    lengths: np.ndarray
    finish_reason: list[str]
    prompt_index: np.ndarray
    tool_calls: list[list[dict]]
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def row_tokens(self, r: int) -> list[int]:
        """The generated tokens of row r without padding."""
        return [int(t) for t in self.tokens[r, : self.lengths[r]]]


# ----------------------------------------------------------------------------- sampling


def _argmax(x_bv: jax.Array) -> jax.Array:
    """argmax over the last axis (the first maximal index), int32 [B]: a max then a min over
    indices, two plain reductions. jnp.argmax's (value, index) reduction runs ~2x slower on
    XLA:CPU, a few percent of a decode step at batch 64. A row of NaNs gives index 0."""
    m_b1 = jnp.max(x_bv, -1, keepdims=True)
    v = x_bv.shape[-1]
    idx_b = jnp.min(jnp.where(x_bv == m_b1, jnp.arange(v, dtype=jnp.int32), v), -1)
    return jnp.where(idx_b == v, 0, idx_b)


def _sample(logits_bv: jax.Array, keys_b: jax.Array, knobs: jax.Array, static: tuple):
    """Draws one token per row, row b with its own PRNG key keys_b[b] (so a row's draw does not
    depend on the other rows). Returns (tokens_b int32, sample_logprob_b float32).

    knobs: [temperature, top_p, min_p]; static: (greedy, top_k, use_top_p, use_min_p, banned ids).
    """
    greedy, top_k, use_top_p, use_min_p, banned = static
    if banned:
        logits_bv = logits_bv.at[:, jnp.asarray(banned, jnp.int32)].set(-jnp.inf)
    if greedy:
        return _argmax(logits_bv), jnp.zeros(logits_bv.shape[0], jnp.float32)
    z_bv = logits_bv.astype(jnp.float32) / knobs[0]
    vocab = z_bv.shape[-1]
    idx_bk = None
    if top_k or use_top_p:
        # Sorted descending: top-k is a prefix, top-p a cumulative sum over it.
        z_bv, idx_bk = jax.lax.top_k(z_bv, min(top_k, vocab) if top_k else vocab)
    if use_top_p:
        p_bk = jax.nn.softmax(z_bv, -1)
        mass_before_bk = jnp.cumsum(p_bk, -1) - p_bk
        z_bv = jnp.where(mass_before_bk < knobs[1], z_bv, -jnp.inf)
    if use_min_p:
        # p_i >= min_p * p_max  <=>  z_i - z_max >= log(min_p); renormalisation cancels.
        z_max = jnp.max(z_bv, -1, keepdims=True)
        z_bv = jnp.where(z_bv - z_max >= jnp.log(knobs[2]), z_bv, -jnp.inf)
    # Gumbel-max, as jax.random.categorical draws (the same noise, so the same tokens).
    gumbel_bv = jax.vmap(lambda k, z: jax.random.gumbel(k, z.shape, z.dtype))(keys_b, z_bv)
    choice_b = _argmax(z_bv + gumbel_bv)
    logp_b = jnp.take_along_axis(jax.nn.log_softmax(z_bv, -1), choice_b[:, None], -1)[:, 0]
    if idx_bk is not None:
        choice_b = jnp.take_along_axis(idx_bk, choice_b[:, None], -1)[:, 0]
    return choice_b.astype(jnp.int32), logp_b


def sample_logits(logits_bv: jax.Array, key: jax.Array, sampling_cfg: SamplingConfig):
    """Samples one token per row of logits_bv [B, V] under `sampling_cfg`.

    Returns (tokens_b int32 [B], logprob_b float32 [B] under the sampling distribution).
    """
    keys_b = jax.random.split(key, logits_bv.shape[0])
    return _sample_jit(logits_bv, keys_b, sampling_cfg.knobs(), sampling_cfg.static())


_sample_jit = jax.jit(_sample, static_argnums=3)


# ----------------------------------------------------------------------------- shapes and sharding


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def _batch_axes(mesh) -> Optional[tuple[str, ...]]:
    """Mesh axes the rows are split over (data x fsdp, as for training batches)."""
    axes = tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes or None


def _batch_multiple(mesh) -> int:
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in _batch_axes(mesh) or ()]))


def _constrain(state: State, mesh, cfg: model_lib.ModelConfig) -> State:
    """Pins per-row arrays to the batch axes, and cache kv heads to 'tensor' when it divides them
    (the same rule as the wk/wv params, so attention needs no resharding). Cache buffers are
    [B, K, E, S] (keys) and [B, K, S, E] (values) per layer: batch first, kv heads second."""
    if mesh is None:
        return state
    b_axes = _batch_axes(mesh)
    kv = "tensor" if mesh.shape.get("tensor", 1) > 1 and cfg.k % mesh.shape["tensor"] == 0 else None

    def pin(path, x):
        keys = [getattr(q, "key", None) for q in path]
        in_cache = keys[0] == "cache" and ("k" in keys or "v" in keys)  # own or shared-prefix buffers
        if x.ndim == 0:
            spec = P()
        elif in_cache:
            spec = P(b_axes, kv, None, None)
        else:
            spec = P(b_axes, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(pin, state)


# ----------------------------------------------------------------------------- prefill and step


def for_inference(params: Params, cfg: model_lib.ModelConfig, dtype: str = "bfloat16"):
    """(params, cfg) for inference in `dtype`: 'bfloat16' halves the weights and the KV cache
    (the cache takes cfg.compute_dtype), the bytes a decode step streams; norms, softmax, scores
    and logits still accumulate in float32. 'float32' returns the inputs unchanged.

    Their logits differ from float32's by bfloat16 rounding (8-bit mantissa): tests/test_sampling.py
    bounds it and experiments/bench_decode.py reports it.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"for_inference: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if dtype == "float32" and cfg.compute_dtype == "float32":
        return params, cfg
    jdt = jnp.dtype(dtype)
    cast = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x.astype(jdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, p))
    return cast(params), dataclasses.replace(cfg, compute_dtype=dtype)


def prefill(params: Params, cfg: model_lib.ModelConfig, tokens_bp: jax.Array, lengths_b: jax.Array,
            cache_len: int):
    """Runs right-padded prompts through the model into a fresh cache.

    Args:
      tokens_bp: int32 [B, P] prompts, right-padded (any pad id).
      lengths_b: int32 [B] true prompt lengths (>= 1).
      cache_len: cache slots S >= P.

    Returns:
      (cache with lengths = lengths_b, logits_bv float32 [B, V] for each row's last prompt token).
    """
    b = tokens_bp.shape[0]
    cache = model_lib.init_cache(cfg, b, cache_len, dtype=cfg.dtype)
    x_bpd, cache = model_lib.forward_hidden(params, tokens_bp, cfg, cache=cache)
    # Only the last real token's logits are needed: [B, D] through the head, not [B, P, V].
    x_bd = jnp.take_along_axis(x_bpd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    cache = dict(cache, lengths=lengths_b.astype(jnp.int32))
    return cache, model_lib.logits_from_hidden(params, x_bd, cfg)


def decode_step(params: Params, cfg: model_lib.ModelConfig, cache, tokens_b: jax.Array,
                active_b: Optional[jax.Array] = None):
    """Feeds one token per row. Inactive rows keep their cache fill (their slot is scratch).

    Returns (cache, logits_bv float32 [B, V] predicting each row's next token).
    """
    logits_b1v, new_cache = model_lib.forward(params, tokens_b[:, None], cfg, cache=cache)
    if active_b is not None:
        new_cache = dict(new_cache, lengths=jnp.where(active_b, new_cache["lengths"], cache["lengths"]))
    return new_cache, logits_b1v[:, 0]


def _empty_state(cfg: model_lib.ModelConfig, n_groups: int, g: int, p_len: int, t_buf: int, q_buf: int,
                 n_stop: int) -> State:
    """The loop state with every group slot empty (its rows finished): n_groups shared prompt
    prefixes of p_len slots and n_groups * g rows whose own cache holds t_buf generated tokens
    (tool outputs included). `_refill` puts prompts into slots."""
    b = n_groups * g
    prefix = dict(model_lib.init_cache(cfg, n_groups, p_len, dtype=cfg.dtype), lengths=jnp.ones((n_groups,), jnp.int32))
    zeros = functools.partial(jnp.zeros, (b, t_buf))
    return {
        "cache": model_lib.with_prefix(model_lib.init_cache(cfg, b, t_buf, dtype=cfg.dtype), prefix),
        "logits": jnp.zeros((b, cfg.vocab_size), jnp.float32),
        "tokens": zeros(jnp.int32),
        "logprobs": zeros(jnp.float32),
        "sample_logprobs": zeros(jnp.float32),
        "sampled": zeros(jnp.int32),
        "out_len": jnp.zeros((b,), jnp.int32),
        "done": jnp.ones((b,), bool),
        "reason": jnp.full((b,), _LENGTH, jnp.int32),
        "paused": jnp.zeros((b,), bool),
        "forced": jnp.zeros((b, q_buf), jnp.int32),
        "forced_n": jnp.zeros((b,), jnp.int32),
        "forced_pos": jnp.zeros((b,), jnp.int32),
        "max_new": jnp.ones((b,), jnp.int32),
        "stop_ids": jnp.full((b, n_stop), -1, jnp.int32),
        "row_key": jnp.zeros((b, 2), jnp.uint32),
        "step": jnp.zeros((), jnp.int32),
    }


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _new_state(cfg, n_groups, g, p_len, t_buf, q_buf, n_stop, mesh) -> State:
    """`_empty_state` created on the devices it lives on (split over `mesh`, every process's share)."""
    return _constrain(_empty_state(cfg, n_groups, g, p_len, t_buf, q_buf, n_stop), mesh, cfg)



@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnums=(1,))
def _refill(params, state: State, key, slot_r, prompt_r, tokens_rp, lengths_r, max_new_rg, stop_rgs, *, cfg, mesh):
    """Prefills R prompts into group slots slot_r [R] (index n_groups = padding, dropped) and resets
    their G rows to start sampling. Row (prompt p, sample j) draws with key fold_in(fold_in(key,
    p), j) folded with its own token count, so its tokens do not depend on which slot or step it
    runs in (continuous batching gives the same samples as one big batch)."""
    n_groups = state["cache"]["prefix"]["lengths"].shape[0]
    b = state["out_len"].shape[0]
    g = b // n_groups
    pcache, logits_rv = prefill(params, cfg, tokens_rp, lengths_r, tokens_rp.shape[1])
    pre = state["cache"]["prefix"]

    def put_n(buf, val):
        return buf.at[slot_r].set(val.astype(buf.dtype), mode="drop")

    prefix = {"k": tuple(put_n(o, n) for o, n in zip(pre["k"], pcache["k"])),
              "v": tuple(put_n(o, n) for o, n in zip(pre["v"], pcache["v"])),
              "lengths": put_n(pre["lengths"], lengths_r)}
    rows = (slot_r[:, None] * g + jnp.arange(g, dtype=jnp.int32)[None, :]).reshape(-1)

    def put_b(buf, val):
        return buf.at[rows].set(jnp.asarray(val).astype(buf.dtype), mode="drop")

    keys = jax.vmap(lambda p: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, p), j))(
        jnp.arange(g)))(prompt_r).reshape(-1, 2)
    cache = dict(state["cache"], lengths=put_b(state["cache"]["lengths"], 0), prefix=prefix)
    new = dict(state, cache=cache, logits=put_b(state["logits"], jnp.repeat(logits_rv, g, axis=0)),
               out_len=put_b(state["out_len"], 0), done=put_b(state["done"], False),
               reason=put_b(state["reason"], _RUNNING), paused=put_b(state["paused"], False),
               forced_n=put_b(state["forced_n"], 0), forced_pos=put_b(state["forced_pos"], 0),
               max_new=put_b(state["max_new"], max_new_rg.reshape(-1)),
               stop_ids=put_b(state["stop_ids"], stop_rgs.reshape(rows.shape[0], -1)),
               row_key=put_b(state["row_key"], keys))
    return _constrain(new, mesh, cfg)


def _decode_body(params, state: State, knobs, tool_end_ids, *, cfg, static, mesh) -> State:
    """One step for every row: pick a token (forced if queued, else sampled), record it, feed it."""
    n_rows, t_buf = state["tokens"].shape
    row_n = jnp.arange(n_rows)
    keys_b = jax.vmap(jax.random.fold_in)(state["row_key"], state["out_len"])
    sampled_tok, sample_lp = _sample(state["logits"], keys_b, knobs, static)
    has_forced = state["forced_pos"] < state["forced_n"]
    forced_tok = jnp.take_along_axis(
        state["forced"], jnp.minimum(state["forced_pos"], state["forced"].shape[1] - 1)[:, None], 1)[:, 0]
    tok = jnp.where(has_forced, forced_tok, sampled_tok)
    was_sampled = ~has_forced
    model_lp = jnp.take_along_axis(jax.nn.log_softmax(state["logits"], -1), tok[:, None], -1)[:, 0]

    active = ~state["done"] & ~state["paused"]
    # Out-of-range index for inactive rows: mode='drop' skips their write.
    at = jnp.where(active, state["out_len"], t_buf)
    out_len = state["out_len"] + active

    def put(buf, val):
        return buf.at[row_n, at].set(val.astype(buf.dtype), mode="drop")

    is_stop = was_sampled & jnp.any(tok[:, None] == state["stop_ids"], -1)
    at_limit = out_len >= state["max_new"]
    finished = active & (is_stop | at_limit)
    reason = jnp.where(finished & is_stop, _STOP, jnp.where(finished, _LENGTH, state["reason"]))
    calls_tool = was_sampled & jnp.any(tok[:, None] == tool_end_ids[None, :], -1)
    cache, logits = decode_step(params, cfg, state["cache"], tok, active)
    new = dict(
        state,
        cache=cache,
        logits=jnp.where(active[:, None], logits, state["logits"]),
        tokens=put(state["tokens"], tok),
        logprobs=put(state["logprobs"], model_lp),
        sample_logprobs=put(state["sample_logprobs"], jnp.where(was_sampled, sample_lp, 0.0)),
        sampled=put(state["sampled"], was_sampled),
        out_len=out_len,
        done=state["done"] | finished,
        reason=reason,
        paused=state["paused"] | (active & calls_tool & ~finished),
        forced_pos=state["forced_pos"] + (active & has_forced),
    )
    return _constrain(new, mesh, cfg)


def _local_loop(params, state: State, knobs, tool_end_ids, n_steps, watch_n, *, cfg, static, mesh):
    """The decode while-loop over the rows in `state`; returns (state, steps run)."""
    n_groups = watch_n.shape[0]

    def cond(carry):
        s, i = carry
        group_done = s["done"].reshape(n_groups, -1).all(-1)
        return (i < n_steps) & jnp.any(~s["done"] & ~s["paused"]) & ~jnp.any(watch_n & group_done)

    def body(carry):
        s, i = carry
        return _decode_body(params, s, knobs, tool_end_ids, cfg=cfg, static=static, mesh=mesh), i + 1

    return jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))


def _rows_split_only(mesh) -> bool:
    """True when `mesh` splits rows over more than one device and nothing else (no 'tensor' or
    other model axis): then every device can decode its own rows with no communication."""
    if mesh is None or _batch_multiple(mesh) < 2:
        return False
    return all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in (_batch_axes(mesh) or ()))


@functools.partial(jax.jit, static_argnames=("cfg", "static", "mesh"), donate_argnums=(1,))
def _decode_chunk(params, state: State, knobs, tool_end_ids, n_steps, watch_n, *, cfg, static, mesh):
    """Up to n_steps decode steps; stops early once no row is running (all finished or paused), or
    once every row of a group slot in watch_n [n_groups] has finished (to refill it).

    When the mesh only splits rows, each device runs its own loop over its own rows (shard_map):
    a global loop would all-reduce its stop condition every step, which on CPU host devices costs
    more than a small model's step (batch 1 ran 2.4x slower on 2 devices). A device whose rows
    stop early idles; rows' tokens do not depend on when a loop stops (per-row keys)."""
    params = model_lib.split_layers(params)  # once per call, not per step
    if not _rows_split_only(mesh):
        state, steps = _local_loop(params, state, knobs, tool_end_ids, n_steps, watch_n,
                                   cfg=cfg, static=static, mesh=mesh)
        return dict(state, step=state["step"] + steps)
    rows = P(_batch_axes(mesh))
    state_specs = jax.tree_util.tree_map(lambda x: P() if x.ndim == 0 else rows, state)

    def local(params, state, knobs, tool_end_ids, n_steps, watch_n):
        state, steps = _local_loop(params, state, knobs, tool_end_ids, n_steps, watch_n,
                                   cfg=cfg, static=static, mesh=None)
        return state, steps[None]

    state_step = state["step"]
    state, steps_d = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), state_specs, P(), P(), P(), rows),
        out_specs=(state_specs, rows), check_vma=False)(params, state, knobs, tool_end_ids, n_steps, watch_n)
    return _constrain(dict(state, step=state_step + steps_d.max()), mesh, cfg)


# ----------------------------------------------------------------------------- tools on the host


def _tool_protocol(tools, tokenizer, template) -> Optional[chat_lib.ToolProtocol]:
    """The tool protocol the engine splices calls with: the template's, else zipchat's tokens
    looked up in `tokenizer` for just the tools given (None without tools)."""
    if not tools:
        return None
    if template is not None:
        if template.tools is None:
            raise ValueError(f"generate: the chat template {template.name!r} has no tool tokens; call without tools")
        return template.tools
    if tokenizer is None:
        raise ValueError("generate: tools need a chat template (template=) or a tokenizer")
    return chat_lib.tool_protocol(tokenizer, tuple(tools))


def _run_tool(fn: Callable[[str], str], src: str) -> str:
    """A tool error becomes the output text: the model sees it, the engine keeps going."""
    try:
        return str(fn(src))
    except Exception as e:  # noqa: BLE001 - any tool failure is data for the model
        return f"error: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- generate


def _per_row(values, n_prompts: int, n_samples: int, what: str) -> list:
    """Per-prompt (repeated over samples) or per-row values -> one per row."""
    values = list(values)
    if len(values) == n_prompts:
        return [v for v in values for _ in range(n_samples)]
    if len(values) == n_prompts * n_samples:
        return values
    raise ValueError(f"{what}: got {len(values)} entries; need one per prompt ({n_prompts}) "
                     f"or one per row ({n_prompts * n_samples})")


def _raw_key(key) -> jax.Array:
    """A typed key (jax.random.key) as its uint32[2] data, as jax.random.PRNGKey gives: the
    per-row key buffers are raw threefry keys, and both styles give the same tokens."""
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"generate: key must be a threefry key (jax.random.key or PRNGKey), got "
                         f"{key.dtype}{list(key.shape)}")
    return key


def generate(
    params: Params,
    cfg: model_lib.ModelConfig,
    prompts: Sequence[Sequence[int]],
    sampling_cfg: SamplingConfig,
    key: jax.Array,
    n_samples: int = 1,
    tools: Optional[Mapping[str, Callable[[str], str]]] = None,
    tokenizer: Any = None,
    *,
    template: Any = None,
    max_new_tokens: Optional[Sequence[int]] = None,
    stop_ids: Optional[Sequence[Sequence[int]]] = None,
    mesh=None,
    chunk_size: int = 16,
    max_tool_output_tokens: int = 256,
    on_tokens: Optional[Callable[[list[list[int]]], None]] = None,
    on_tool_call: Optional[Callable[[int, dict], None]] = None,
    max_rows: Optional[int] = None,
    refill_rows: bool = True,
    tool_workers: int = 8,
) -> GenerateResult:
    """Samples continuations of `prompts`, n_samples each.

    Args:
      params: model params (may be sharded on `mesh`).
      cfg: the model's config.
      prompts: token-id lists, each non-empty.
      sampling_cfg: temperature / filters / default max_new_tokens and stop_ids.
      key: PRNG key; the same key, inputs and chunking give the same tokens.
      n_samples: continuations per prompt; they share the prompt's prefill.
      tools: {name: fn(input text) -> output text}, e.g. {'calculator': ...}. A row that samples
        the tool's end token pauses; the text since its start token runs through fn and
        `output_start output output_end` is fed to that row (sampled_mask 0). The tokens are the
        template's tool protocol (core.chat.ToolProtocol).
      tokenizer: with tools and no template: zipchat's tool tokens are taken from it. With a
        template or tokenizer, ids past its vocabulary (a padded embedding table) are never sampled.
      template: a core.chat.ChatTemplate whose tool protocol (and tokenizer) tools use.
      max_new_tokens: per-prompt or per-row caps (default sampling_cfg.max_new_tokens).
      stop_ids: per-prompt or per-row stop-id lists, replacing sampling_cfg.stop_ids.
      mesh: a jax Mesh the params live on; per-row state is split over its non-'tensor' axes
        (the batch is padded with finished rows to divide evenly).
      chunk_size: decode steps per device call when the host has work between steps (tools,
        streaming); otherwise the whole generation is one call.
      max_tool_output_tokens: room for one tool output, delimiters included (longer is cut).
      on_tokens: called after every chunk with each row's new tokens (for streaming).
      on_tool_call: called as on_tool_call(row, call) when a tool has run, before the row resumes.
      max_rows: rows decoded at once (default: all N * n_samples). With fewer, prompts wait in a
        queue and enter the batch as earlier ones finish.
      refill_rows: with max_rows, a prompt whose rows have all finished is replaced by the next
        one at once (continuous batching); False runs batch after batch, each waiting for its
        longest row. Each row samples with its own key (from `key`, its prompt and sample index),
        so the tokens do not depend on max_rows or refilling.
      tool_workers: tool calls run concurrently on a pool of this many threads; rows waiting on a
        call pause while the other rows keep decoding.

    Returns:
      GenerateResult (see its docstring for shapes).
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("generate: prompts is empty")
    if n_samples < 1:
        raise ValueError(f"generate: n_samples must be >= 1, got {n_samples}")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty (needs at least one token, e.g. BOS)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"generate: prompt {i} has ids outside [0, {cfg.vocab_size})")
    protocol = _tool_protocol(tools, tokenizer, template)
    tok = template.tokenizer if template is not None else tokenizer
    n_tok = getattr(tok, "vocab_size", None)
    if isinstance(n_tok, int) and 0 < n_tok < cfg.vocab_size:
        # A padded embedding table (Qwen2.5: 151,936 rows for 151,665 tokens): rows past the
        # tokenizer are never sampled, since nothing could decode them.
        sampling_cfg = dataclasses.replace(
            sampling_cfg, banned_ids=tuple(sorted(set(sampling_cfg.banned_ids) | set(range(n_tok, cfg.vocab_size)))))
    if chunk_size < 1:
        raise ValueError(f"generate: chunk_size must be >= 1, got {chunk_size}")
    key = _raw_key(key)
    n_prompts = len(prompts)
    n_real = n_prompts * n_samples

    max_new = _per_row(max_new_tokens if max_new_tokens is not None else [sampling_cfg.max_new_tokens] * n_prompts,
                       n_prompts, n_samples, "max_new_tokens")
    if min(max_new) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {min(max_new)}")
    stops = _per_row(stop_ids if stop_ids is not None else [sampling_cfg.stop_ids] * n_prompts,
                     n_prompts, n_samples, "stop_ids")
    longest = max(len(p) for p in prompts)
    need = max(len(prompts[r // n_samples]) + max_new[r] for r in range(n_real))
    if need > cfg.max_seq_len:
        raise ValueError(f"generate: prompt + max_new_tokens = {need} tokens exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}; shorten the prompt or max_new_tokens")
    # Prompt prefixes and generated tokens live in separate cache parts (model.with_prefix):
    # p_len slots per prompt, stored once for its n_samples rows, and t_buf per row.
    p_len = bucket(longest)
    t_max = max(max_new)
    t_buf = bucket(t_max)
    if max_tool_output_tokens < 3:
        raise ValueError(f"generate: max_tool_output_tokens must be >= 3 (two delimiters and text), "
                         f"got {max_tool_output_tokens}")
    if max_rows is not None and max_rows < n_samples:
        raise ValueError(f"generate: max_rows={max_rows} must be >= n_samples={n_samples} (one prompt's rows)")
    if tool_workers < 1:
        raise ValueError(f"generate: tool_workers must be >= 1, got {tool_workers}")
    # Same buffer with or without tools, so turning tools on does not recompile.
    q_buf = bucket(max_tool_output_tokens)
    mult = _batch_multiple(mesh)
    n_groups = n_prompts if max_rows is None else max(1, min(n_prompts, max_rows // n_samples))
    n_groups = -(-n_groups // mult) * mult
    # At least 2 rows (a finished padding row for a single prompt): XLA:CPU turns a one-row cache
    # scatter into a select + dynamic-update-slice that it does not do in place, copying every
    # layer's cache several times per decode step (batch-1 decode at context 1024 ~1.5x slower).
    while n_groups * n_samples < 2:
        n_groups += mult
    n_stop = bucket(max((len(st) for st in stops), default=1), 1)

    t0 = time.perf_counter()
    state = _new_state(cfg, n_groups, n_samples, p_len, t_buf, q_buf, n_stop, mesh)
    queue = list(range(n_prompts))[::-1]  # pop() takes the next prompt
    slot_prompt = [-1] * n_groups  # prompt held by each group slot, -1 when empty

    def refill(state, slots):
        """Prefills the next prompts into the free group `slots` (a bucketed batch: few compiles)."""
        take = [(sl, queue.pop()) for sl in slots if queue]
        if not take:
            return state
        r = bucket(len(take), 1)
        slot_r = np.full((r,), n_groups, np.int32)
        prompt_r = np.zeros((r,), np.int32)
        tokens_rp = np.zeros((r, p_len), np.int32)
        lengths_r = np.ones((r,), np.int32)
        max_new_rg = np.ones((r, n_samples), np.int32)
        stop_rgs = np.full((r, n_samples, n_stop), -1, np.int32)
        for i, (sl, pi) in enumerate(take):
            slot_prompt[sl] = pi
            slot_r[i], prompt_r[i], lengths_r[i] = sl, pi, len(prompts[pi])
            tokens_rp[i, : len(prompts[pi])] = prompts[pi]
            for j in range(n_samples):
                max_new_rg[i, j] = max_new[pi * n_samples + j]
                stop_rgs[i, j, : len(stops[pi * n_samples + j])] = list(stops[pi * n_samples + j])
        return _refill(params, state, key, slot_r, prompt_r, tokens_rp, lengths_r, max_new_rg, stop_rgs,
                       cfg=cfg, mesh=mesh)

    state = refill(state, range(n_groups))
    jax.block_until_ready(state["logits"])
    t1 = time.perf_counter()
    tool_map = protocol.end_to_tool(tuple(tools)) if protocol is not None else {}
    # Padded with -1 (never a token) to a fixed size: the tool set does not change shapes.
    tool_end_ids = np.asarray(sorted(tool_map) + [-1] * (bucket(len(tool_map), 4) - len(tool_map)), np.int32)
    knobs = np.asarray(sampling_cfg.knobs())
    run = functools.partial(_decode_chunk, cfg=cfg, static=sampling_cfg.static(), mesh=mesh)
    tool_calls: list[list[dict]] = [[] for _ in range(n_real)]
    out = {"tokens": np.zeros((n_real, t_buf), np.int32), "logprobs": np.zeros((n_real, t_buf), np.float32),
           "sample_logprobs": np.zeros((n_real, t_buf), np.float32), "sampled": np.zeros((n_real, t_buf), np.int32),
           "out_len": np.zeros((n_real,), np.int32), "reason": np.zeros((n_real,), np.int32)}
    seen = np.zeros((n_real,), np.int64)  # tokens already streamed per result row
    host_work = bool(tools) or on_tokens is not None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=tool_workers) if tools else None
    pending: dict[int, concurrent.futures.Future] = {}  # device row -> running tool call
    try:
        while any(pi >= 0 for pi in slot_prompt):
            # Watch the live slots only while prompts wait for one (refill=False: batch by batch).
            watch = np.asarray([pi >= 0 and bool(queue) and refill_rows for pi in slot_prompt])
            steps = chunk_size if host_work else t_buf + 1
            state = run(params, state, knobs, tool_end_ids, np.int32(steps), watch)
            out_len, done, paused = sharding_lib.to_host((state["out_len"], state["done"], state["paused"]))
            group_done = done.reshape(n_groups, n_samples).all(-1)
            finished = [sl for sl, pi in enumerate(slot_prompt) if pi >= 0 and group_done[sl]]
            if not refill_rows and queue and any(pi >= 0 and not group_done[sl] for sl, pi in enumerate(slot_prompt)):
                finished = []  # static batching: the whole batch finishes before the next one starts
            toks = sharding_lib.to_host(state["tokens"]) if (host_work or finished) else None
            if on_tokens is not None:
                new = [[] for _ in range(n_real)]
                for row in range(n_groups * n_samples):
                    pi = slot_prompt[row // n_samples]
                    if pi >= 0:
                        rr = pi * n_samples + row % n_samples
                        new[rr] = toks[row, seen[rr]: out_len[row]].tolist()
                        seen[rr] = out_len[row]
                on_tokens(new)
            if tools:
                for row in np.flatnonzero(paused & ~done):
                    if row not in pending:
                        pending[int(row)] = _submit_tool(pool, toks[row, : out_len[row]].tolist(),
                                                         prompts[slot_prompt[row // n_samples]], tools, tool_map, protocol)
                ready = [row for row, f in pending.items() if f.done()]
                if not ready and pending and not finished and not (~done & ~paused).any():
                    # Every running row waits on a tool: block until the first call returns.
                    concurrent.futures.wait(list(pending.values()), return_when=concurrent.futures.FIRST_COMPLETED)
                    ready = [row for row, f in pending.items() if f.done()]
                if ready:
                    state = _serve_tools(state, {row: pending.pop(row).result() for row in ready}, max_tool_output_tokens,
                                         protocol, slot_prompt, n_samples, out_len, tool_calls, on_tool_call)
            if finished:
                got = sharding_lib.to_host({k: state[k] for k in ("logprobs", "sample_logprobs", "sampled", "reason")})
                got["tokens"], got["out_len"] = toks, out_len
                # A refilled row's buffers keep its previous prompt's tail: padding is zeroed here.
                past_end = np.arange(t_buf)[None, :] >= out_len[:, None]
                for k in ("tokens", "logprobs", "sample_logprobs", "sampled"):
                    got[k] = np.where(past_end, 0, got[k])
                for sl in finished:
                    pi = slot_prompt[sl]
                    rows = slice(sl * n_samples, (sl + 1) * n_samples)
                    res_rows = slice(pi * n_samples, (pi + 1) * n_samples)
                    for k in out:
                        out[k][res_rows] = got[k][rows]
                    slot_prompt[sl] = -1
                state = refill(state, finished)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    t2 = time.perf_counter()
    return GenerateResult(
        tokens=out["tokens"][:, :t_max],
        logprobs=out["logprobs"][:, :t_max],
        sample_logprobs=out["sample_logprobs"][:, :t_max],
        sampled_mask=out["sampled"][:, :t_max],
        lengths=out["out_len"],
        finish_reason=[FINISH_REASONS[int(c)] for c in out["reason"]],
        prompt_index=np.arange(n_real, dtype=np.int32) // n_samples,
        tool_calls=tool_calls,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
    )


def _submit_tool(pool, gen: list[int], prompt: list[int], tools, tool_map, protocol) -> concurrent.futures.Future:
    """Starts the closed call at the end of `gen` on the pool; the future gives (position, call)."""
    name, start_id = tool_map[gen[-1]]
    # The call may have been opened in the prompt (a chat template can force the start token).
    history = prompt + gen[:-1]
    starts = [i for i, t in enumerate(history) if t == start_id]
    src = protocol.tokenizer.decode(history[starts[-1] + 1:]) if starts else ""

    def call():
        output = _run_tool(tools[name], src) if starts else f"error: no {name} call was opened"
        return {"name": name, "input": src, "output": output, "position": len(gen) - 1}

    return pool.submit(call)


def _serve_tools(state, calls: dict[int, dict], limit, protocol, slot_prompt, n_samples, out_len, tool_calls,
                 on_tool_call) -> State:
    """Queues each returned call's output as forced tokens of its (paused) row, which resumes."""
    forced, forced_n, forced_pos, paused = (np.array(a) for a in sharding_lib.to_host(
        (state["forced"], state["forced_n"], state["forced_pos"], state["paused"])))
    for row, call in sorted(calls.items()):
        out_ids = protocol.render_output(call["output"], limit)
        forced[row, : len(out_ids)] = out_ids
        forced_n[row], forced_pos[row], paused[row] = len(out_ids), 0, False
        rr = slot_prompt[row // n_samples] * n_samples + row % n_samples
        tool_calls[rr].append(call)
        if on_tool_call is not None:
            on_tool_call(rr, call)
    # Host arrays (identical on every process): the next jitted call places them per the mesh.
    return dict(state, forced=forced, forced_n=forced_n, forced_pos=forced_pos, paused=paused)
