"""Masked next-token cross-entropy, z-loss and bits per byte.

Losses are computed in float32 (or wider) from logits of any dtype. Everything here is a pure
function of arrays; the training step decides how sums are combined across microbatches.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


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
