"""Masked next-token cross-entropy, z-loss, bits per byte, and the one per-token log-prob scorer.

Losses are computed in float32 (or wider) from logits of any dtype. Everything here is a pure
function of arrays; the training step decides how sums are combined across microbatches.

Batch format and the loss-mask convention (the one place it is defined; `split_batch`):

    {'tokens':      int32 [B, T+1],   # inputs = tokens[:, :-1], targets = tokens[:, 1:]
     'segment_ids': int32 [B, T+1],   # optional; 1, 2, ... per packed document, 0 = padding
     'positions':   int32 [B, T+1],   # optional; position ids (restarting per document)
     'mask':        bool/int [B, T]}  # optional; loss mask over *targets* (SFT: assistant tokens)

Target t counts iff its segment id equals its input's segment id and is not 0, AND (when given)
mask[:, t]. So nothing is predicted across a document boundary (the first token of the next
document from the last token of the previous one) nor into or out of padding. With documents
packed as `doc <|endoftext|>`, the closing <|endoftext|> is in its document's segment and IS
predicted; with `<|endoftext|> doc` (BOS style) the BOS opens the next segment, is never a
target, and the doc's first token is predicted from it. Without segment_ids every target counts
(before 'mask'). A conversation's mask comes from `core.chat` aligned with its ids (mask[i] says
whether ids[i] is trained); packed into a row it becomes the target mask `mask[:, 1:]` of the row.

`token_logprobs` is the scorer every stage shares (evaluation, bits per byte, SFT metrics, RL's
old/reference log-probs, DPO): per-token log p(target | prefix) [B, T] under given params,
computed from the final hidden states one vocabulary chunk at a time, so a 150k-token vocabulary
at long context never materialises [B, T, V] float32 logits.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from core import model as model_lib


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition.

    Args:
      logits_btv: [..., V] unnormalised scores (any float dtype; computed in >= float32).
      targets_bt: [...] int ids in [0, V).

    Returns:
      (nll [...] = logsumexp(logits) - logits[target], lse [...] = logsumexp(logits)), both in the
      promoted float dtype (float32 unless the logits are float64).
    """
    logits = logits_btv.astype(jnp.promote_types(logits_btv.dtype, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - target_logit, lse


def cross_entropy_sums(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    mask_bt: Optional[jax.Array] = None,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Sums over unmasked tokens, the additive form a microbatched step can combine exactly.

    Returns a dict of scalars: 'nll' (sum of per-token nll), 'z' (sum of logsumexp^2),
    'loss' (= nll + z_loss * z), 'tokens' (number of unmasked tokens, float).
    """
    nll, lse = token_nll(logits_btv, targets_bt)
    if mask_bt is None:
        mask = jnp.ones(nll.shape, nll.dtype)
    else:
        if mask_bt.shape != targets_bt.shape:
            raise ValueError(f"mask shape {mask_bt.shape} != targets shape {targets_bt.shape}")
        mask = mask_bt.astype(nll.dtype)
    nll_sum = jnp.sum(nll * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask)
    return {"loss": nll_sum + z_loss * z_sum, "nll": nll_sum, "z": z_sum, "tokens": jnp.sum(mask)}


def cross_entropy(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    mask_bt: Optional[jax.Array] = None,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over unmasked tokens, plus an optional z-loss.

    The z-loss (PaLM) adds z_loss * mean(logsumexp(logits)^2) to keep the softmax normaliser near 1.
    A batch with no unmasked token gives loss 0 (the count is clamped to 1), never NaN.

    Args:
      logits_btv: [B, T, V] logits.
      targets_bt: [B, T] int target ids.
      mask_bt: optional [B, T] bool/0-1 weights; True where the target counts. None = all count.
      z_loss: coefficient of the z-loss term (0 disables it).

    Returns:
      (mean_loss scalar, aux) with aux = {'nll': mean cross-entropy alone, 'z': mean lse^2,
      'tokens': number of unmasked tokens, 'nll_sum': summed nll (for bits per byte)}.
    """
    s = cross_entropy_sums(logits_btv, targets_bt, mask_bt, z_loss)
    n = jnp.maximum(s["tokens"], 1.0)
    aux = {"nll": s["nll"] / n, "z": s["z"] / n, "tokens": s["tokens"], "nll_sum": s["nll"]}
    return s["loss"] / n, aux


def bits_per_byte(sum_nats, n_bytes):
    """Bits per byte: total nats over the predicted tokens / (ln 2 * their total UTF-8 bytes).

    Tokenizer-independent, so models with different vocabularies compare. Count the bytes of the
    *target* tokens that were scored (special tokens have 0 bytes; see
    `Tokenizer.token_byte_lengths`), and exclude special-token targets from sum_nats too, as
    nanochat does.

    Args:
      sum_nats: scalar (python, numpy or jax) summed nll in nats.
      n_bytes: scalar total byte length of those targets; must be positive.
    """
    if isinstance(n_bytes, (int, float)) and n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return sum_nats / (math.log(2.0) * n_bytes)


def bits_per_byte_sums(
    logits_btv: jax.Array, targets_bt: jax.Array, token_bytes_v: jax.Array, mask_bt: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of nats, sum of bytes) over targets that are unmasked and have > 0 bytes.

    token_bytes_v: [V] int byte length of every token id (0 for special tokens).
    Accumulate both sums over an eval set, then call `bits_per_byte(nats, bytes)`.
    """
    nll, _ = token_nll(logits_btv, targets_bt)
    n_bytes = jnp.asarray(token_bytes_v)[targets_bt].astype(nll.dtype)
    keep = n_bytes > 0
    if mask_bt is not None:
        keep = keep & mask_bt.astype(bool)
    return jnp.sum(jnp.where(keep, nll, 0.0)), jnp.sum(jnp.where(keep, n_bytes, 0.0))


# ----------------------------------------------------------------------------- batches


def split_batch(batch) -> dict[str, Optional[jax.Array]]:
    """tokens/segment_ids/positions [B, T+1] (+ mask [B, T]) -> model inputs, targets, loss mask.

    Returns {'inputs', 'targets', 'segment_ids', 'positions', 'mask'}, all [B, T]; segment_ids and
    positions are None when absent from the batch. See the module docstring for the convention.
    """
    if "tokens" not in batch:
        raise ValueError(f"batch needs a 'tokens' [B, T+1] entry; got keys {sorted(batch)}")
    tokens = batch["tokens"]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"batch['tokens'] must be [B, T+1] with T >= 1, got shape {tokens.shape}")
    b, t1 = tokens.shape
    for k in ("segment_ids", "positions"):
        if k in batch and tuple(batch[k].shape) != (b, t1):
            raise ValueError(f"batch['{k}'] has shape {batch[k].shape}, expected {(b, t1)} like 'tokens'")
    if "mask" in batch and tuple(batch["mask"].shape) != (b, t1 - 1):
        raise ValueError(f"batch['mask'] has shape {batch['mask'].shape}, expected {(b, t1 - 1)} (over targets)")
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": None, "positions": None}
    mask = jnp.ones((b, t1 - 1), bool)
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        out["segment_ids"] = seg[:, :-1]
        mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    if "positions" in batch:
        out["positions"] = batch["positions"][:, :-1]
    if "mask" in batch:
        mask = mask & batch["mask"].astype(bool)
    out["mask"] = mask
    return out


# ----------------------------------------------------------------------------- the scorer

# Vocabularies up to this size are scored with one matmul (the logits of a 4k-32k vocabulary at
# training lengths fit easily); larger ones in chunks of this many columns.
DEFAULT_VOCAB_CHUNK = 32768


def _head_dv(params, cfg: model_lib.ModelConfig) -> jax.Array:
    """The LM head as [D, V] (the tied embedding transposed, or lm_head)."""
    return params["embed"]["tokens"].T if cfg.tie_embeddings else params["lm_head"]


def _cap(logits, cfg: model_lib.ModelConfig):
    logits = logits.astype(cfg.acc_dtype)
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return logits


def _head_chunks(head_dv: jax.Array, vocab_chunk: int) -> tuple[jax.Array, int]:
    """[D, V] -> ([n_chunks, D, vocab_chunk] zero-padded, n_chunks)."""
    v = head_dv.shape[1]
    n_chunks = -(-v // vocab_chunk)
    pad = n_chunks * vocab_chunk - v
    head = jnp.pad(head_dv, ((0, 0), (0, pad)))
    return head.reshape(head_dv.shape[0], n_chunks, vocab_chunk).swapaxes(0, 1), n_chunks


def _chunk_logits(x, w_dc, c, v: int, vocab_chunk: int, cfg, temperature: float):
    """Logits of vocabulary chunk c, soft-capped and divided by the temperature; padded columns
    get -inf so that they take no probability mass."""
    logits = _cap(model_lib._matmul(x, w_dc.astype(cfg.dtype)), cfg)
    if temperature != 1.0:
        logits = logits / temperature
    cols = c * vocab_chunk + jnp.arange(vocab_chunk)
    return jnp.where(cols < v, logits, -jnp.inf)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def hidden_logprobs(params, x_btd: jax.Array, targets_bt: jax.Array, cfg: model_lib.ModelConfig, *,
                    vocab_chunk: int = DEFAULT_VOCAB_CHUNK, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """log p(target) and logsumexp of the logits from final hidden states.

    Args:
      params: model params (for the LM head).
      x_btd: [B, T, D] final-normed hidden states (`core.model.forward_hidden`).
      targets_bt: [B, T] int ids.
      cfg: the model config (tied head, soft-cap, matmul dtype).
      vocab_chunk: vocabularies larger than this are processed this many columns at a time in a
        rematerialised scan (only [B, T, chunk] logits live at once, in the forward and backward).
      temperature: the (soft-capped) logits are divided by it first: the log-probs of a policy
        sampled at that temperature (RL).

    Returns:
      (logp_bt, lse_bt) in cfg.acc_dtype (float32, or float64 in numerics tests); logp = target
      logit - lse, exactly `-token_nll(forward(...) / temperature)` up to float rounding.
    """
    _check_temperature(temperature)
    head = _head_dv(params, cfg)
    dt = cfg.dtype
    v = head.shape[1]
    if v <= vocab_chunk:
        logits = _cap(model_lib._matmul(x_btd.astype(dt), head.astype(dt)), cfg)
        nll, lse = token_nll(logits / temperature if temperature != 1.0 else logits, targets_bt)
        return -nll, lse
    head_cdv, n_chunks = _head_chunks(head, vocab_chunk)
    x = x_btd.astype(dt)

    @jax.checkpoint
    def body(carry, xs):
        m_bt, s_bt, tgt_bt = carry
        w_dc, c = xs
        logits = _chunk_logits(x, w_dc, c, v, vocab_chunk, cfg, temperature)
        m_new = jnp.maximum(m_bt, logits.max(-1))
        s_bt = s_bt * jnp.exp(m_bt - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        local = targets_bt - c * vocab_chunk
        hit = (local >= 0) & (local < vocab_chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, vocab_chunk - 1)[..., None], -1)[..., 0]
        return (m_new, s_bt, jnp.where(hit, picked, tgt_bt)), None

    acc = cfg.acc_dtype
    init = (jnp.full(targets_bt.shape, -jnp.inf, acc), jnp.zeros(targets_bt.shape, acc),
            jnp.zeros(targets_bt.shape, acc))
    (m, s, tgt), _ = jax.lax.scan(body, init, (head_cdv, jnp.arange(n_chunks)))
    lse = m + jnp.log(s)
    return tgt - lse, lse


def hidden_entropy(params, x_btd: jax.Array, cfg: model_lib.ModelConfig, *,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK, temperature: float = 1.0) -> jax.Array:
    """Entropy (nats) of each next-token distribution softmax(logits / temperature), from final
    hidden states, one vocabulary chunk at a time like `hidden_logprobs` (online max: with m the
    running max, s = sum exp(z - m) and u = sum exp(z - m) z, H = m + log s - u / s). For
    metrics: no gradient is meant to flow through it.

    Args: as `hidden_logprobs`. Returns: [B, T] in cfg.acc_dtype.
    """
    _check_temperature(temperature)
    head = _head_dv(params, cfg)
    v = head.shape[1]
    chunk = min(vocab_chunk, v)
    head_cdv, n_chunks = _head_chunks(head, chunk)
    x = x_btd.astype(cfg.dtype)
    acc = cfg.acc_dtype
    shape = x_btd.shape[:-1]

    def body(carry, xs):
        m_bt, s_bt, u_bt = carry
        w_dc, c = xs
        z = _chunk_logits(x, w_dc, c, v, chunk, cfg, temperature)
        m_new = jnp.maximum(m_bt, z.max(-1))
        e = jnp.exp(z - m_new[..., None])
        scale = jnp.exp(m_bt - m_new)
        # e * z is taken as 0 where e = 0: a padded (-inf) column must not give 0 * -inf.
        ez = jnp.where(e > 0, e * z, 0.0)
        return (m_new, s_bt * scale + e.sum(-1), u_bt * scale + ez.sum(-1)), None

    init = (jnp.full(shape, -jnp.inf, acc), jnp.zeros(shape, acc), jnp.zeros(shape, acc))
    (m, s, u), _ = jax.lax.scan(body, init, (head_cdv, jnp.arange(n_chunks)))
    return m + jnp.log(s) - u / s


def token_logprobs(params, batch, cfg: model_lib.ModelConfig, *,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The scorer: per-token log-probs of a batch's targets under `params`.

    Args:
      params: model params.
      batch: {'tokens' [B, T+1], optional 'segment_ids', 'positions' [B, T+1], 'mask' [B, T]}
        (the convention of the module docstring).
      cfg: the model config.
      vocab_chunk, temperature: see `hidden_logprobs`.

    Returns:
      (logp_bt, mask_bt): logp_bt [B, T] float32 = log p(tokens[:, t+1] | tokens[:, :t+1]), set
      to 0 where the target does not count; mask_bt [B, T] bool, where it counts.
    """
    logp, mask, _ = token_logprobs_and_hidden(params, batch, cfg, vocab_chunk=vocab_chunk, temperature=temperature)
    return logp, mask


def token_logprobs_and_hidden(params, batch, cfg: model_lib.ModelConfig, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                              temperature: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`token_logprobs` plus the final hidden states [B, T, D] it scored, for a second read of the
    same forward (RL's entropy, `hidden_entropy`) without running the model again.

    Returns: (logp_bt, mask_bt, x_btd)."""
    x = split_batch(batch)
    h, _ = model_lib.forward_hidden(params, x["inputs"], cfg, positions=x["positions"],
                                    segment_ids=x["segment_ids"])
    logp, _ = hidden_logprobs(params, h, x["targets"], cfg, vocab_chunk=vocab_chunk, temperature=temperature)
    return jnp.where(x["mask"], logp, 0.0), x["mask"], h


def sequence_logprobs(params, batch, cfg: model_lib.ModelConfig, **kw) -> tuple[jax.Array, jax.Array]:
    """(sum of masked target log-probs [B], number of masked targets [B]) per row: DPO's and a
    reward model's per-sequence quantities."""
    logp, mask = token_logprobs(params, batch, cfg, **kw)
    return logp.sum(-1), mask.sum(-1).astype(logp.dtype)


def bits_per_byte_from_logprobs(logp_bt: jax.Array, targets_bt: jax.Array, token_bytes_v: jax.Array,
                                mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of nats, sum of bytes) over counted targets with > 0 bytes (special tokens excluded),
    from scorer output; accumulate both over an eval set, then `bits_per_byte(nats, bytes)`."""
    n_bytes = jnp.asarray(token_bytes_v)[targets_bt].astype(logp_bt.dtype)
    keep = (n_bytes > 0) & mask_bt.astype(bool)
    return jnp.sum(jnp.where(keep, -logp_bt, 0.0)), jnp.sum(jnp.where(keep, n_bytes, 0.0))
