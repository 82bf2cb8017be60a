"""The inference engine: batched prefill + decode with a static-shape KV cache, stochastic
sampling (greedy, temperature, top-k, top-p, min-p), per-row stop tokens and lengths, per-token
log-probs, and tool calls spliced into the token stream.

How a batch is generated:
  1. Prompts are right-padded to a power-of-two length and prefilled in one forward pass into a
     cache of `S` slots (a power of two >= longest prompt + max_new_tokens, at most
     cfg.max_seq_len). With n_samples > 1 each prompt is prefilled once and its cache rows are
     repeated, so the samples of one prompt share its prefill.
  2. A jitted `lax.while_loop` decodes one token per row per step. Rows that finish (a stop token
     or their length limit) stop writing; the loop ends when every row is finished.
  3. Tools: when a row samples a tool's end token (e.g. `<|calculator_end|>`), it pauses. The loop
     runs in chunks of steps; between chunks the host decodes the paused row's call, runs the
     tool and writes `<|output_start|> output <|output_end|>` into that row's device-side forced
     buffer. The next steps feed those tokens (not sampled: `sampled_mask` 0) before the row
     samples again. Other rows keep decoding meanwhile. Without tools or streaming the whole
     generation is one device call, so the host never syncs per token.

Shapes avoid recompiles: prompt length, cache size, output buffer and batch of stop ids are
bucketed; sampling knobs (temperature, top-p, min-p) are traced values, so only the greedy flag,
top-k and whether top-p / min-p are on are compiled in.

Row order: row r of every result array is sample r % n_samples of prompt r // n_samples.
Log-probs: `logprobs` is the model's own log-softmax (temperature 1, no truncation) of each token,
the quantity RL recomputes under the training forward; `sample_logprobs` is the log-prob under the
tempered and truncated distribution actually sampled from (0 for greedy and forced tokens).
"""
from __future__ import annotations

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


def _sample(logits_bv: jax.Array, key: jax.Array, knobs: jax.Array, static: tuple):
    """Draws one token per row. Returns (tokens_b int32, sample_logprob_b float32).

    knobs: [temperature, top_p, min_p]; static: (greedy, top_k, use_top_p, use_min_p, banned ids).
    """
    greedy, top_k, use_top_p, use_min_p, banned = static
    if banned:
        logits_bv = logits_bv.at[:, jnp.asarray(banned, jnp.int32)].set(-jnp.inf)
    if greedy:
        return jnp.argmax(logits_bv, -1).astype(jnp.int32), jnp.zeros(logits_bv.shape[0], jnp.float32)
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
    choice_b = jax.random.categorical(key, z_bv, axis=-1)
    logp_b = jnp.take_along_axis(jax.nn.log_softmax(z_bv, -1), choice_b[:, None], -1)[:, 0]
    if idx_bk is not None:
        choice_b = jnp.take_along_axis(idx_bk, choice_b[:, None], -1)[:, 0]
    return choice_b.astype(jnp.int32), logp_b


def sample_logits(logits_bv: jax.Array, key: jax.Array, sampling_cfg: SamplingConfig):
    """Samples one token per row of logits_bv [B, V] under `sampling_cfg`.

    Returns (tokens_b int32 [B], logprob_b float32 [B] under the sampling distribution).
    """
    return _sample_jit(logits_bv, key, sampling_cfg.knobs(), sampling_cfg.static())


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
        in_cache = getattr(path[0], "key", "") == "cache" and getattr(path[1], "key", "") in ("k", "v")
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


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "n_samples", "n_rows", "mesh", "t_buf",
                                             "q_buf"))
def _prefill_state(params, tokens_bp, lengths_b, max_new_n, stop_ns, *, cfg, cache_len, n_samples,
                   n_rows, mesh, t_buf, q_buf):
    """Prefill of the unique prompts, repeated n_samples times, padded to n_rows; the loop state."""
    cache, logits_bv = prefill(params, cfg, tokens_bp, lengths_b, cache_len)
    n_real = tokens_bp.shape[0] * n_samples

    def rows(x, axis=0):
        x = jnp.repeat(x, n_samples, axis=axis) if n_samples > 1 else x
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, n_rows - n_real)
        return jnp.pad(x, pad)

    cache = {"k": tuple(rows(k) for k in cache["k"]), "v": tuple(rows(v) for v in cache["v"]),
             "lengths": jnp.pad(jnp.repeat(cache["lengths"], n_samples), (0, n_rows - n_real),
                                constant_values=1)}
    real_n = jnp.arange(n_rows) < n_real
    state = {
        "cache": cache,
        "logits": rows(logits_bv),
        "tokens": jnp.zeros((n_rows, t_buf), jnp.int32),
        "logprobs": jnp.zeros((n_rows, t_buf), jnp.float32),
        "sample_logprobs": jnp.zeros((n_rows, t_buf), jnp.float32),
        "sampled": jnp.zeros((n_rows, t_buf), jnp.int32),
        "out_len": jnp.zeros((n_rows,), jnp.int32),
        # Padding rows (for an even split over the mesh) start finished.
        "done": ~real_n,
        "reason": jnp.where(real_n, _RUNNING, _LENGTH).astype(jnp.int32),
        "paused": jnp.zeros((n_rows,), bool),
        "forced": jnp.zeros((n_rows, q_buf), jnp.int32),
        "forced_n": jnp.zeros((n_rows,), jnp.int32),
        "forced_pos": jnp.zeros((n_rows,), jnp.int32),
        "max_new": max_new_n,
        "stop_ids": stop_ns,
        "step": jnp.zeros((), jnp.int32),
    }
    return _constrain(state, mesh, cfg)


def _decode_body(params, state: State, key, knobs, tool_end_ids, *, cfg, static, mesh) -> State:
    """One step for every row: pick a token (forced if queued, else sampled), record it, feed it."""
    n_rows, t_buf = state["tokens"].shape
    row_n = jnp.arange(n_rows)
    step_key = jax.random.fold_in(key, state["step"])
    sampled_tok, sample_lp = _sample(state["logits"], step_key, knobs, static)
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
        step=state["step"] + 1,
    )
    return _constrain(new, mesh, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "static", "mesh"), donate_argnums=(1,))
def _decode_chunk(params, state: State, key, knobs, tool_end_ids, n_steps, *, cfg, static, mesh):
    """Up to n_steps decode steps; stops early once no row is running (all finished or paused)."""
    params = model_lib.split_layers(params)  # once per call, not per step

    def cond(carry):
        s, i = carry
        return (i < n_steps) & jnp.any(~s["done"] & ~s["paused"])

    def body(carry):
        s, i = carry
        return _decode_body(params, s, key, knobs, tool_end_ids, cfg=cfg, static=static, mesh=mesh), i + 1

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
    return state


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
      tokenizer: with tools and no template: zipchat's tool tokens are taken from it.
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
    if chunk_size < 1:
        raise ValueError(f"generate: chunk_size must be >= 1, got {chunk_size}")
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
    cache_len = min(bucket(need), cfg.max_seq_len)
    p_len = min(bucket(longest), cache_len)
    t_max = max(max_new)
    t_buf = bucket(t_max)
    if max_tool_output_tokens < 3:
        raise ValueError(f"generate: max_tool_output_tokens must be >= 3 (two delimiters and text), "
                         f"got {max_tool_output_tokens}")
    # Same buffer with or without tools, so turning tools on does not recompile.
    q_buf = bucket(max_tool_output_tokens)
    n_rows = -(-n_real // _batch_multiple(mesh)) * _batch_multiple(mesh)
    # At least 2 rows (a finished padding row for a single prompt): XLA:CPU turns a one-row cache
    # scatter into a select + dynamic-update-slice that it does not do in place, copying every
    # layer's cache several times per decode step (batch-1 decode at context 1024 ~1.5x slower).
    n_rows = max(n_rows, 2)

    tokens_bp = np.zeros((n_prompts, p_len), np.int32)
    for i, p in enumerate(prompts):
        tokens_bp[i, : len(p)] = p
    lengths_b = np.asarray([len(p) for p in prompts], np.int32)
    max_new_n = np.ones((n_rows,), np.int32)
    max_new_n[:n_real] = max_new
    stop_ns = np.full((n_rows, bucket(max((len(s) for s in stops), default=1), 1)), -1, np.int32)
    for r, s in enumerate(stops):
        stop_ns[r, : len(s)] = list(s)

    t0 = time.perf_counter()
    state = _prefill_state(params, tokens_bp, lengths_b, max_new_n, stop_ns, cfg=cfg, cache_len=cache_len,
                           n_samples=n_samples, n_rows=n_rows, mesh=mesh, t_buf=t_buf, q_buf=q_buf)
    jax.block_until_ready(state["logits"])
    t1 = time.perf_counter()
    tool_map = protocol.end_to_tool(tuple(tools)) if protocol is not None else {}
    # Padded with -1 (never a token) to a fixed size: the tool set does not change shapes.
    tool_end_ids = jnp.asarray(sorted(tool_map) + [-1] * (bucket(len(tool_map), 4) - len(tool_map)), jnp.int32)
    knobs = sampling_cfg.knobs()
    run = functools.partial(_decode_chunk, cfg=cfg, static=sampling_cfg.static(), mesh=mesh)
    tool_calls: list[list[dict]] = [[] for _ in range(n_real)]

    if not tools and on_tokens is None:
        state = run(params, state, key, knobs, tool_end_ids, jnp.int32(t_buf + 1))
    else:
        seen = np.zeros((n_real,), np.int64)
        while True:
            state = run(params, state, key, knobs, tool_end_ids, jnp.int32(chunk_size))
            out_len, done, paused, toks = jax.device_get(
                (state["out_len"], state["done"], state["paused"], state["tokens"]))
            if on_tokens is not None:
                on_tokens([toks[r, seen[r]: out_len[r]].tolist() for r in range(n_real)])
                seen = out_len[:n_real].astype(np.int64)
            waiting = [r for r in range(n_real) if paused[r] and not done[r]]
            if waiting:
                state = _serve_tools(state, waiting, toks, out_len, prompts, n_samples, tools, tool_map,
                                     protocol, max_tool_output_tokens, tool_calls, on_tool_call)
            elif done[:n_real].all():
                break

    out = jax.device_get({k: state[k] for k in ("tokens", "logprobs", "sample_logprobs", "sampled",
                                                "out_len", "reason")})
    t2 = time.perf_counter()
    return GenerateResult(
        tokens=out["tokens"][:n_real, :t_max],
        logprobs=out["logprobs"][:n_real, :t_max],
        sample_logprobs=out["sample_logprobs"][:n_real, :t_max],
        sampled_mask=out["sampled"][:n_real, :t_max],
        lengths=out["out_len"][:n_real],
        finish_reason=[FINISH_REASONS[int(c)] for c in out["reason"][:n_real]],
        prompt_index=np.arange(n_real, dtype=np.int32) // n_samples,
        tool_calls=tool_calls,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
    )


def _serve_tools(state, waiting, toks, out_len, prompts, n_samples, tools, tool_map, protocol, limit,
                 tool_calls, on_tool_call) -> State:
    """Runs the closed tool call of every paused row and queues its output as forced tokens."""
    forced, forced_n, forced_pos, paused = jax.device_get(
        (state["forced"], state["forced_n"], state["forced_pos"], state["paused"]))
    forced, forced_n, forced_pos, paused = (np.array(a) for a in (forced, forced_n, forced_pos, paused))
    for r in waiting:
        gen = toks[r, : out_len[r]].tolist()
        name, start_id = tool_map[gen[-1]]
        # The call may have been opened in the prompt (a chat template can force the start token).
        history = prompts[r // n_samples] + gen[:-1]
        starts = [i for i, t in enumerate(history) if t == start_id]
        src_ids = history[starts[-1] + 1:] if starts else []
        src = protocol.tokenizer.decode(src_ids)
        output = _run_tool(tools[name], src) if starts else f"error: no {name} call was opened"
        out_ids = protocol.render_output(output, limit)
        forced[r, : len(out_ids)] = out_ids
        forced_n[r], forced_pos[r], paused[r] = len(out_ids), 0, False
        call = {"name": name, "input": src, "output": output, "position": len(gen) - 1}
        tool_calls[r].append(call)
        if on_tool_call is not None:
            on_tool_call(r, call)
    return dict(state, forced=jnp.asarray(forced), forced_n=jnp.asarray(forced_n),
                forced_pos=jnp.asarray(forced_pos), paused=jnp.asarray(paused))
