"""RL on verifiable rewards, the GRPO family, as pure jit-compatible functions; plus DPO.

Shapes: rewards are `[N, G]` (N prompts, G samples each). Per-token arrays are `[B, T]` over the
completion tokens with a 0/1 mask, B = N * G rows in prompt-major order (row n * G + g is sample g
of prompt n), so `adv_ng.reshape(-1)` gives the per-row advantages `adv_b`.

The pieces, each with its formula in its docstring:

  group_advantages      GRPO (std-normalised), Dr. GRPO (mean-centred), RLOO (leave-one-out)
  policy_loss           clipped surrogate (token or GSPO sequence ratio), dual clip, KL term
                        (k1 / k2 / k3), three aggregations; normalised loss + metrics
  policy_loss_sums      the same as additive sums + a 'weight' normaliser (core.train's LossFn
                        contract), so microbatched steps combine exactly; step_metrics turns a
                        train step's metrics back into token means
  make_policy_loss_fn   a core.train LossFn over a rollout batch (tokens + old/ref log-probs +
                        advantages)
  kl_penalised_rewards  the KL-in-reward placement (InstructGPT/PPO): r - beta * sum_t k(logp, ref)
  token_entropy         entropy of the next-token distribution, streamed over vocabulary chunks
  overlong_penalty, zero_variance_groups   DAPO's soft length penalty and dynamic-sampling filter
  PRESETS / get_preset  named knob settings: grpo, dr_grpo, dapo, rloo, gspo
  dpo_loss(_sums)       DPO (Rafailov et al. 2023) with reward margins and accuracy;
                        make_dpo_loss_fn, its core.train LossFn
  best_of_n_kl          analytic KL of best-of-n sampling: log n - (n-1)/n

Conventions: a "loss" here is what is minimised (the negated objective); per-token losses are
multiplied by the mask before any sum, so values at masked positions (NaN included, as long as
they are finite) never leak into the result; every function is traceable under jit (knobs are
Python values, validated at trace time with ValueError).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _f32(x) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------- advantages


def group_advantages(rewards_ng: jax.Array, estimator: str = "grpo", *, eps: float = 1e-6) -> jax.Array:
    """Per-sample advantages from the rewards of each prompt's group of G samples.

    With r_i the reward of sample i in a group of G, mean = (1/G) sum_j r_j,
    std = sqrt(sum_j (r_j - mean)^2 / (G - 1)) (Bessel, ddof=1, as TRL's `nanstd` and tunix):

      'grpo'    (DeepSeekMath): A_i = (r_i - mean) / (std + eps)
      'dr_grpo' (Dr. GRPO, Liu et al. 2025): A_i = r_i - mean
      'rloo'    (Ahmadian et al. 2024): A_i = r_i - (1/(G-1)) sum_{j != i} r_j = G/(G-1) (r_i - mean)

    A group whose rewards are all equal gets A = 0 under every estimator (no signal; see
    `zero_variance_groups` for dropping such groups instead).

    Args:
      rewards_ng: [N, G] float rewards.
      estimator: one of ESTIMATORS.
      eps: added to the std (grpo only). 1e-6 as the RL issue specifies; TRL uses 1e-4.

    Returns:
      adv_ng [N, G] float32 (float64 for float64 rewards); `.reshape(-1)` is prompt-major adv_b.
    """
    _check(estimator in ESTIMATORS, f"unknown advantage estimator {estimator!r}; choose one of {ESTIMATORS}")
    r = _f32(rewards_ng)
    _check(r.ndim == 2, f"rewards must be [N, G] (prompts x samples), got shape {r.shape}")
    g = r.shape[1]
    _check(g >= 2, f"group-relative advantages need G >= 2 samples per prompt, got G = {g} "
                   f"(rewards shape {r.shape}); a single sample has no baseline to compare against")
    mean = jnp.mean(r, axis=1, keepdims=True)
    if estimator == "grpo":
        std = jnp.std(r, axis=1, keepdims=True, ddof=1)
        return (r - mean) / (std + eps)
    if estimator == "dr_grpo":
        return r - mean
    # rloo: baseline = (sum - r_i) / (G - 1)
    return r - (jnp.sum(r, axis=1, keepdims=True) - r) / (g - 1)


def zero_variance_groups(rewards_ng: jax.Array) -> jax.Array:
    """bool [N]: True where all G rewards of a prompt are equal (DAPO's dynamic sampling drops these)."""
    r = jnp.asarray(rewards_ng)
    return jnp.all(r == r[:, :1], axis=1)


def overlong_penalty(lengths_b: jax.Array, max_len: int, buffer: int, penalty: float = 1.0) -> jax.Array:
    """DAPO's soft overlong punishment, counted in tokens (added to the reward).

      L <= max_len - buffer:            0
      max_len - buffer < L <= max_len:  penalty * ((max_len - buffer) - L) / buffer   (0 down to -penalty)
      L > max_len:                      -penalty

    Args:
      lengths_b: [B] completion lengths in tokens.
      max_len: the maximum completion length (L_max).
      buffer: the soft band width (L_cache); 0 gives a hard -penalty beyond max_len only.
    """
    _check(max_len > 0 and 0 <= buffer <= max_len,
           f"overlong_penalty needs 0 <= buffer ({buffer}) <= max_len ({max_len})")
    l = _f32(lengths_b)
    start = max_len - buffer
    soft = -penalty * (l - start) / max(buffer, 1)
    return jnp.where(l <= start, 0.0, jnp.where(l <= max_len, soft, -penalty))


# ----------------------------------------------------------------------------- KL, entropy


def kl_per_token(logp_bt: jax.Array, ref_logp_bt: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL").

    With d = ref_logp - logp (the log of pi_ref / pi at the sampled token):
      k1 = -d = logp - ref_logp                 unbiased, can be negative, high variance
      k2 = d^2 / 2                              biased, low variance, >= 0
      k3 = exp(d) - d - 1                       unbiased, low variance, >= 0 (DeepSeekMath, GRPO)

    All three are 0 where logp == ref_logp.
    """
    _check(estimator in KL_ESTIMATORS, f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    d = _f32(ref_logp_bt) - _f32(logp_bt)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return jnp.exp(d) - d - 1.0


def kl_penalised_rewards(rewards_b: jax.Array, logp_bt: jax.Array, ref_logp_bt: jax.Array,
                         mask_bt: jax.Array, kl_coef: float, kl_estimator: str = "k1") -> jax.Array:
    """The KL-in-reward placement (InstructGPT / PPO-style RLHF): a sequence-level penalty.

      r'_b = r_b - kl_coef * sum_t mask_bt * k(logp_bt, ref_logp_bt)

    with k the per-token estimator (k1 = logp - ref by default: summed over a sampled completion it
    is an unbiased estimate of the sequence KL). The result is a reward, not a loss term: it is
    wrapped in stop_gradient; compute advantages from it (reshape to [N, G] first).

    Args:
      rewards_b: [B] task rewards.
      logp_bt, ref_logp_bt: [B, T] log-probs of the sampled tokens under the policy (the sampler's
        or the old policy's) and the reference.
      mask_bt: [B, T] 1 on sampled completion tokens.
    """
    kl_b = jnp.sum(kl_per_token(logp_bt, ref_logp_bt, kl_estimator) * _f32(mask_bt), axis=-1)
    return jax.lax.stop_gradient(_f32(rewards_b) - kl_coef * kl_b)


def token_entropy(logits_btv: jax.Array, chunk_size: int = 8192) -> jax.Array:
    """Entropy H = -sum_v p_v log p_v of softmax(logits) at every position, streamed over the vocab.

      H = logsumexp(z) - sum_v softmax(z)_v z_v

    computed in one pass over vocabulary chunks of `chunk_size` with an online max (as in online
    softmax): per position keep m (running max), s = sum exp(z - m), u = sum exp(z - m) z; then
    H = m + log s - u / s. Peak extra memory is [B, T, chunk] instead of several [B, T, V] arrays.
    Divide the logits by the sampling temperature first if the policy is sampled with one.

    Args:
      logits_btv: [..., V] logits (any float dtype; computed in >= float32).
      chunk_size: vocabulary chunk; V itself when larger than V.

    Returns:
      [...] float32 entropies in nats.
    """
    z = _f32(logits_btv)
    v = z.shape[-1]
    c = max(1, min(int(chunk_size), v))
    n = -(-v // c)
    lead = z.shape[:-1]
    if n == 1:
        p = jax.nn.softmax(z, axis=-1)
        # p * z is taken as 0 where p = 0: a -inf logit (a banned token) must not give 0 * -inf.
        return jax.nn.logsumexp(z, axis=-1) - jnp.sum(jnp.where(p > 0, p * z, 0.0), axis=-1)
    pad = n * c - v
    z = jnp.pad(z, [(0, 0)] * len(lead) + [(0, pad)])
    valid = jnp.arange(n * c) < v
    chunks = jnp.moveaxis(z.reshape(lead + (n, c)), -2, 0)           # [n, ..., c]
    valid = valid.reshape(n, c)

    def body(carry, xs):
        m, s, u = carry
        zc, ok = xs
        zc = jnp.where(ok, zc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(zc, axis=-1))
        # While every logit so far is -inf, shift by 0 instead (exp(-inf - -inf) would be NaN).
        m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        scale = jnp.exp(m - m_ref)
        e = jnp.exp(zc - m_ref[..., None])                           # 0 on padding
        s = s * scale + jnp.sum(e, axis=-1)
        u = u * scale + jnp.sum(jnp.where(e > 0, e * zc, 0.0), axis=-1)  # never 0 * -inf
        return (m_new, s, u), None

    init = (jnp.full(lead, -jnp.inf, z.dtype), jnp.zeros(lead, z.dtype), jnp.zeros(lead, z.dtype))
    (m, s, u), _ = jax.lax.scan(body, init, (chunks, valid))
    return m + jnp.log(s) - u / s


# ----------------------------------------------------------------------------- policy loss


def _validate_loss_knobs(clip_low, clip_high, dual_clip, ratio_level, kl_coef, kl_estimator, agg, max_len):
    _check(clip_low >= 0 and clip_high >= 0,
           f"clip_low / clip_high must be >= 0, got {clip_low} / {clip_high}")
    _check(clip_low < 1, f"clip_low must be < 1 (the ratio floor is 1 - clip_low), got {clip_low}")
    _check(dual_clip is None or dual_clip > 1.0,
           f"dual_clip must be None or > 1 (verl's clip_ratio_c, 3.0 there), got {dual_clip}")
    _check(ratio_level in RATIO_LEVELS, f"unknown ratio_level {ratio_level!r}; choose one of {RATIO_LEVELS}")
    _check(kl_estimator in KL_ESTIMATORS,
           f"unknown kl_estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}")
    _check(kl_coef >= 0, f"kl_coef must be >= 0, got {kl_coef}")
    _check(agg in AGGREGATIONS, f"unknown loss aggregation {agg!r}; choose one of {AGGREGATIONS}")
    _check(max_len is None or max_len > 0, f"max_len must be None or positive, got {max_len}")
    if kl_coef > 0 and kl_estimator == "k1":
        warnings.warn("kl_estimator='k1' as a loss term: its gradient is not the gradient of the KL "
                      "(E[grad k1] = 0 under on-policy samples, so it does not pull towards the "
                      "reference); use 'k3' (or 'k2') in the loss, or put k1 in the reward "
                      "(kl_penalised_rewards).", stacklevel=3)


def policy_loss_terms(logp_bt, old_logp_bt, adv_b, mask_bt, *, clip_low: float = 0.2,
                      clip_high: float = 0.2, dual_clip: Optional[float] = None,
                      ratio_level: str = "token", ref_logp_bt=None, kl_coef: float = 0.0,
                      kl_estimator: str = "k3") -> dict[str, jax.Array]:
    """Per-token pieces of the clipped surrogate; see `policy_loss` for the formulas.

    Returns a dict of [B, T] float arrays (unmasked; multiply by the mask before reducing):
      'loss' (pg + kl_coef * kl), 'pg', 'kl' (0 without a reference), 'ratio',
      'clipped_low', 'clipped_high', 'dual_clipped' (0/1 indicators).
    """
    _validate_loss_knobs(clip_low, clip_high, dual_clip, ratio_level, kl_coef, kl_estimator,
                         "token_mean", None)
    logp, old = _f32(logp_bt), _f32(old_logp_bt)
    mask = _f32(mask_bt)
    _check(logp.ndim == 2 and logp.shape == old.shape == mask.shape,
           f"logp {logp.shape}, old_logp {old.shape} and mask {mask.shape} must all be [B, T]")
    adv = _f32(adv_b)
    _check(adv.shape == (logp.shape[0],), f"adv_b must be [B] = [{logp.shape[0]}], got {adv.shape}")
    a = adv[:, None]
    # Zero the inputs at masked positions before any exp: the sequence mean needs it, and a masked
    # garbage value (e.g. padding's -inf log-prob) must not become inf * 0 = NaN in the gradient.
    on = mask > 0
    logp, old = jnp.where(on, logp, 0.0), jnp.where(on, old, 0.0)
    log_ratio = logp - old
    if ratio_level == "sequence":
        # GSPO: s_b = exp(mean over the row's tokens of log_ratio), one ratio per sequence.
        n = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
        log_ratio = jnp.broadcast_to(jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / n, logp.shape)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(-a * ratio, -a * clipped)          # = -min(ratio A, clip(ratio) A)
    dual = jnp.zeros_like(pg)
    if dual_clip is not None:
        cap = -a * dual_clip                             # > 0 where A < 0
        dual = ((a < 0) & (pg > cap)).astype(pg.dtype)
        pg = jnp.where(a < 0, jnp.minimum(pg, cap), pg)
    if ref_logp_bt is not None:
        _check(jnp.shape(ref_logp_bt) == logp.shape,
               f"ref_logp {jnp.shape(ref_logp_bt)} must be [B, T] like logp {logp.shape}")
        kl = jnp.where(on, kl_per_token(logp, jnp.where(on, _f32(ref_logp_bt), 0.0), kl_estimator), 0.0)
    else:
        _check(kl_coef == 0, f"kl_coef = {kl_coef} needs ref_logp_bt (the reference model's log-probs)")
        kl = jnp.zeros_like(pg)
    return {
        "loss": pg + kl_coef * kl, "pg": pg, "kl": kl, "ratio": ratio,
        # Where clipping is active (the gradient through the ratio is cut), as TRL and verl count it.
        "clipped_low": ((ratio < 1.0 - clip_low) & (a < 0)).astype(pg.dtype),
        "clipped_high": ((ratio > 1.0 + clip_high) & (a > 0)).astype(pg.dtype),
        "dual_clipped": dual,
    }


def aggregate_sums(loss_bt: jax.Array, mask_bt: jax.Array, agg: str,
                   max_len: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, weight) with loss = loss_sum / weight; sums of microbatches combine exactly.

      'token_mean':              sum_bt m l / sum_bt m                       (DAPO, TRL 'bnpo'/'dapo')
      'seq_mean_token_mean':     sum_b [sum_t m l / sum_t m] / #rows         (GRPO, TRL 'grpo')
      'seq_mean_token_sum_norm': sum_bt m l / (B * max_len)                  (Dr. GRPO, TRL 'dr_grpo')

    #rows counts rows with at least one unmasked token (a fully masked row, e.g. an overlong
    completion masked out, has no mean to average; TRL counts it as a 0 in its mean, verl >= 0.5
    does not). max_len defaults to T; Dr. GRPO uses the fixed maximum completion length so the
    normaliser is a constant independent of the batch's lengths.
    """
    _check(agg in AGGREGATIONS, f"unknown loss aggregation {agg!r}; choose one of {AGGREGATIONS}")
    m = _f32(mask_bt)
    l = jnp.where(m > 0, _f32(loss_bt), 0.0)
    if agg == "token_mean":
        return jnp.sum(l * m), jnp.sum(m)
    if agg == "seq_mean_token_mean":
        n_b = jnp.sum(m, axis=-1)
        row = jnp.sum(l * m, axis=-1) / jnp.maximum(n_b, 1.0)
        return jnp.sum(row), jnp.sum((n_b > 0).astype(m.dtype))
    t = m.shape[-1] if max_len is None else max_len
    _check(t > 0, f"max_len must be positive, got {t}")
    return jnp.sum(l * m) / t, jnp.asarray(m.shape[0], m.dtype)


def policy_loss_sums(logp_bt, old_logp_bt, adv_b, mask_bt, *, clip_low: float = 0.2,
                     clip_high: float = 0.2, dual_clip: Optional[float] = None,
                     ratio_level: str = "token", ref_logp_bt=None, kl_coef: float = 0.0,
                     kl_estimator: str = "k3", agg: str = "seq_mean_token_mean",
                     max_len: Optional[int] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`policy_loss` as additive sums: (loss_sum, aux) in core.train's LossFn form.

    loss = loss_sum / aux['weight'] (see `aggregate_sums` for the weight of each aggregation), so
    gradient accumulation over microbatches of rows gives exactly the full batch's loss and gradient.

    aux (scalars, all additive over microbatches):
      weight        the aggregation's normaliser
      tokens        unmasked tokens (a count; core.train reports it as is)
      rows          rows with >= 1 unmasked token
      <k>_tok_sum   sum over unmasked tokens of term k, for k in pg, kl, ratio, clipped_low,
                    clipped_high, dual_clipped; the exact token mean is <k>_tok_sum / tokens.

    core.train reports every other aux entry as (summed entry) / (summed weight), the token mean
    only when weight = tokens; `step_metrics` turns a step's metrics back into exact token means
    for every aggregation.
    """
    _validate_loss_knobs(clip_low, clip_high, dual_clip, ratio_level, kl_coef, kl_estimator, agg, max_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the k1 warning was raised just above
        terms = policy_loss_terms(logp_bt, old_logp_bt, adv_b, mask_bt, clip_low=clip_low,
                                  clip_high=clip_high, dual_clip=dual_clip, ratio_level=ratio_level,
                                  ref_logp_bt=ref_logp_bt, kl_coef=kl_coef, kl_estimator=kl_estimator)
    m = _f32(mask_bt)
    loss_sum, weight = aggregate_sums(terms["loss"], m, agg, max_len)
    aux = {"weight": weight, "tokens": jnp.sum(m), "rows": jnp.sum((jnp.sum(m, -1) > 0).astype(m.dtype))}
    for k in ("pg", "kl", "ratio", "clipped_low", "clipped_high", "dual_clipped"):
        aux[f"{k}_tok_sum"] = jnp.sum(jnp.where(m > 0, terms[k], 0.0) * m)
    return loss_sum, aux


def policy_loss(logp_bt, old_logp_bt, adv_b, mask_bt, *, clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: Optional[float] = None, ratio_level: str = "token", ref_logp_bt=None,
                kl_coef: float = 0.0, kl_estimator: str = "k3", agg: str = "seq_mean_token_mean",
                max_len: Optional[int] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped policy-gradient loss of the GRPO family (minimise it).

    Per token t of row b (A_b the row's advantage, m_bt the mask):

      ratio_bt = exp(logp_bt - old_logp_bt)                                ratio_level='token'
      ratio_bt = exp( sum_t m_bt (logp_bt - old_logp_bt) / sum_t m_bt )    ratio_level='sequence' (GSPO)
      pg_bt    = -min(ratio_bt A_b, clip(ratio_bt, 1 - clip_low, 1 + clip_high) A_b)
      dual clip (dual_clip = c > 1, verl): where A_b < 0, pg_bt = min(pg_bt, -c A_b)
      kl_bt    = k(logp_bt, ref_logp_bt) with k1 = logp - ref, k2 = (logp - ref)^2 / 2,
                 k3 = exp(ref - logp) - (ref - logp) - 1                  (see `kl_per_token`)
      l_bt     = pg_bt + kl_coef * kl_bt

    then aggregated over unmasked tokens (see `aggregate_sums`):
      'token_mean'              sum m l / sum m
      'seq_mean_token_mean'     mean over rows of (sum_t m l / sum_t m)
      'seq_mean_token_sum_norm' sum m l / (B * max_len), max_len defaulting to T

    Gradients flow through logp only (old_logp, ref_logp and advantages are data). With
    old_logp = logp and no clipping active, grad l_bt = -A_b grad logp_bt: REINFORCE with a
    group baseline. With ratio_level='sequence' the gradient flows through the row's mean.

    Args:
      logp_bt: [B, T] log-probs of the sampled tokens under the current policy.
      old_logp_bt: [B, T] the same under the policy that sampled (or its recomputation).
      adv_b: [B] advantages (e.g. `group_advantages(r_ng).reshape(-1)`).
      mask_bt: [B, T] 1 on tokens the policy sampled (0 on prompt, padding, tool outputs).
      clip_low, clip_high: the ratio's clip range [1 - clip_low, 1 + clip_high] (DAPO: 0.2, 0.28).
      dual_clip: None or c > 1.
      ratio_level: 'token' or 'sequence'.
      ref_logp_bt: [B, T] reference log-probs, needed when kl_coef > 0 (KL is also logged when given).
      kl_coef: beta (GRPO: 0.04). A warning is raised for 'k1' in the loss.
      kl_estimator: 'k1' | 'k2' | 'k3'.
      agg: one of AGGREGATIONS.
      max_len: the fixed completion length for 'seq_mean_token_sum_norm'.

    Returns:
      (loss scalar, metrics) with metrics (token means over unmasked tokens unless noted):
        pg_loss, kl, ratio_mean, clip_frac_low (ratio < 1 - clip_low with A < 0), clip_frac_high
        (ratio > 1 + clip_high with A > 0), clip_frac (their sum), dual_clip_frac, loss_tok_mean
        (masked mean of pg + kl_coef * kl), tokens, rows.
    """
    loss_sum, aux = policy_loss_sums(logp_bt, old_logp_bt, adv_b, mask_bt, clip_low=clip_low,
                                     clip_high=clip_high, dual_clip=dual_clip, ratio_level=ratio_level,
                                     ref_logp_bt=ref_logp_bt, kl_coef=kl_coef, kl_estimator=kl_estimator,
                                     agg=agg, max_len=max_len)
    return loss_sum / jnp.maximum(aux["weight"], 1e-12), sums_to_metrics(aux, kl_coef)


def sums_to_metrics(aux: Mapping[str, jax.Array], kl_coef: float = 0.0) -> dict[str, jax.Array]:
    """Token means from `policy_loss_sums`' aux (after summing it over microbatches / batches)."""
    n = jnp.maximum(aux["tokens"], 1.0)
    low, high = aux["clipped_low_tok_sum"] / n, aux["clipped_high_tok_sum"] / n
    return {
        "pg_loss": aux["pg_tok_sum"] / n, "kl": aux["kl_tok_sum"] / n, "ratio_mean": aux["ratio_tok_sum"] / n,
        "clip_frac_low": low, "clip_frac_high": high, "clip_frac": low + high,
        "dual_clip_frac": aux["dual_clipped_tok_sum"] / n,
        "loss_tok_mean": (aux["pg_tok_sum"] + kl_coef * aux["kl_tok_sum"]) / n,
        "tokens": aux["tokens"], "rows": aux["rows"],
        # on-policy updates measure these in the step (make_policy_loss_fn)
        **({"entropy": aux["entropy_tok_sum"] / n} if "entropy_tok_sum" in aux else {}),
        **({"logp_diff_mean": aux["logp_diff_tok_sum"] / n} if "logp_diff_tok_sum" in aux else {}),
    }


def step_metrics(metrics: Mapping[str, jax.Array], kl_coef: float = 0.0) -> dict[str, jax.Array]:
    """Exact token means from a core.train step's metrics when the loss is `make_policy_loss_fn`.

    The step reports m[k] = sum_k / weight (sums and weight combined over microbatches) and the raw
    'weight' and 'tokens', so sum_k = m[k] * m['weight'] is recovered exactly; then as
    `sums_to_metrics`. Adds 'loss' (the aggregated loss) and any other entries unchanged.
    """
    w = metrics["weight"]
    keys = [k for k in metrics if k.endswith("_tok_sum")] + ["rows"]
    sums = {k: metrics[k] * w for k in keys if k in metrics}
    sums["tokens"] = metrics["tokens"]
    out = {k: v for k, v in metrics.items() if k not in sums}
    out.update(sums_to_metrics(sums, kl_coef))
    return out


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Every knob of the GRPO family; `PRESETS` names the published settings.

    Loss knobs (passed to `policy_loss` by `loss_kwargs()`): clip_low, clip_high, dual_clip,
    ratio_level, kl_coef, kl_estimator, agg, max_len. Rollout knobs (read by the rollout code):
    estimator (group_advantages), kl_placement ('loss' | 'reward' via kl_penalised_rewards),
    dynamic_sampling (drop zero-variance groups), overlong ('none' | 'mask' | 'soft'),
    overlong_buffer (tokens, DAPO's L_cache) and overlong_penalty.
    """

    estimator: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    ratio_level: str = "token"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_placement: str = "loss"
    agg: str = "seq_mean_token_mean"
    max_len: Optional[int] = None
    dynamic_sampling: bool = False
    overlong: str = "none"
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0

    def __post_init__(self):
        _check(self.estimator in ESTIMATORS,
               f"RLConfig: unknown estimator {self.estimator!r}; choose one of {ESTIMATORS}")
        _check(self.kl_placement in ("loss",
               "reward"), f"RLConfig: kl_placement must be 'loss' or 'reward', got {self.kl_placement!r}")
        _check(self.overlong in ("none",
               "mask", "soft"), f"RLConfig: overlong must be 'none', 'mask' or 'soft', got {self.overlong!r}")
        _check(self.overlong_buffer >= 0,
               f"RLConfig: overlong_buffer must be >= 0, got {self.overlong_buffer}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warn on use, in policy_loss, not on construction
            _validate_loss_knobs(self.clip_low, self.clip_high, self.dual_clip, self.ratio_level,
                                 self.kl_coef, self.kl_estimator, self.agg, self.max_len)

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `policy_loss` / `policy_loss_sums` (the KL term only when it is
        placed in the loss)."""
        in_loss = self.kl_placement == "loss"
        return dict(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip=self.dual_clip,
                    ratio_level=self.ratio_level, kl_coef=self.kl_coef if in_loss else 0.0,
                    kl_estimator=self.kl_estimator, agg=self.agg, max_len=self.max_len)

    def replace(self, **overrides) -> "RLConfig":
        fields = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - fields)
        _check(not bad, f"unknown RLConfig knob(s) {bad}; knobs are {sorted(fields)}")
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, RLConfig] = {
    # DeepSeekMath GRPO: std-normalised advantages, per-sequence token means, k3 KL in the loss, beta 0.04.
    "grpo": RLConfig(estimator="grpo", kl_coef=0.04, kl_estimator="k3", agg="seq_mean_token_mean"),
    # Dr. GRPO: no std, no 1/|o| (a constant normaliser), no KL.
    "dr_grpo": RLConfig(estimator="dr_grpo", kl_coef=0.0, agg="seq_mean_token_sum_norm"),
    # DAPO: clip-higher, token-level mean, dynamic sampling, soft overlong shaping, no KL.
    "dapo": RLConfig(estimator="grpo", clip_low=0.2, clip_high=0.28, kl_coef=0.0, agg="token_mean",
                     dynamic_sampling=True, overlong="soft"),
    # RLOO: leave-one-out baseline; on-policy REINFORCE-style, token mean, no KL in the loss.
    "rloo": RLConfig(estimator="rloo", kl_coef=0.0, agg="token_mean"),
    # GSPO (Zheng et al. 2025): sequence-level ratio with its small clip range (3e-4 / 4e-4).
    "gspo": RLConfig(estimator="grpo", ratio_level="sequence", clip_low=3e-4, clip_high=4e-4,
                     kl_coef=0.0, agg="seq_mean_token_mean"),
}


def get_preset(name: str, **overrides) -> RLConfig:
    """The named preset with `overrides` applied (every knob can be overridden)."""
    _check(name in PRESETS, f"unknown RL algorithm {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------- train-step adapter


def make_policy_loss_fn(rl_cfg: RLConfig, *, temperature: float = 1.0):
    """A core.train LossFn for a rollout batch: (params, batch, model_cfg) -> (loss_sum, aux).

    batch = core.train's {'tokens' [B, T+1], 'segment_ids', 'positions', 'mask' [B, T]} plus
      'advantages' [B]    float
      'old_logp'   [B, T] float   log-probs of the targets under the sampling policy, recomputed
                                  with the training forward. Absent: the update is on-policy (one
                                  pass, one mini-batch: the policy being updated is the one that
                                  sampled), and old = this forward's own log-probs, detached, so
                                  the ratio is exactly 1 (as TRL does with one iteration).
      'sampler_logp' [B, T] float optional, the engine's log-probs; on-policy, the step reports
                                  their mean absolute difference to the training forward's.
      'ref_logp'   [B, T] float   only when the KL term is in the loss
    The loss mask is core.loss.split_batch's (segments and 'mask': 1 only on sampled tokens).
    logp = log softmax(logits / temperature)[target], the distribution the sampler drew from,
    chunked over the vocabulary (core.loss.hidden_logprobs).
    aux: `policy_loss_sums`' aux (weight = the aggregation's normaliser); on-policy also
      entropy_tok_sum and (with sampler_logp) logp_diff_tok_sum, which `step_metrics` turns into
      'entropy' and 'logp_diff_mean'.
    """
    from core import loss as loss_lib  # local: keep core.rl importable without the model stack

    kw = rl_cfg.loss_kwargs()
    _check(temperature > 0, f"temperature must be > 0, got {temperature}")

    def loss_fn(params, batch, model_cfg):
        logp_bt, mask_bt, h = loss_lib.token_logprobs_and_hidden(params, batch, model_cfg, temperature=temperature)
        ref = batch.get("ref_logp") if kw["kl_coef"] > 0 else None
        _check(kw["kl_coef"] == 0 or ref is not None,
               "the KL term is in the loss but batch has no 'ref_logp'")
        on_policy = "old_logp" not in batch
        old = jax.lax.stop_gradient(logp_bt) if on_policy else batch["old_logp"]
        loss_sum, aux = policy_loss_sums(logp_bt, old, batch["advantages"], mask_bt, ref_logp_bt=ref, **kw)
        if on_policy:  # the metrics the rollout's separate scoring pass would have given
            m = _f32(mask_bt)
            ent = loss_lib.hidden_entropy(jax.lax.stop_gradient(params), jax.lax.stop_gradient(h), model_cfg,
                                          temperature=temperature)
            aux["entropy_tok_sum"] = jnp.sum(jnp.where(m > 0, ent, 0.0) * m)
            if "sampler_logp" in batch:
                diff = jnp.abs(old - _f32(batch["sampler_logp"]))
                aux["logp_diff_tok_sum"] = jnp.sum(jnp.where(m > 0, diff, 0.0) * m)
        return loss_sum, aux

    return loss_fn


# ----------------------------------------------------------------------------- DPO, best-of-n


def dpo_loss_sums(policy_chosen_logp_b, policy_rejected_logp_b, ref_chosen_logp_b,
                  ref_rejected_logp_b, beta: float, label_smoothing: float = 0.0):
    """`dpo_loss` as sums: (loss_sum, aux) with aux['weight'] = number of pairs (core.train form).

    aux: weight, reward_chosen, reward_rejected, reward_margin, accuracy (each summed over pairs).
    """
    _check(beta > 0, f"DPO beta must be > 0, got {beta}")
    _check(0 <= label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pc, pr, rc, rr = (_f32(x) for x in (policy_chosen_logp_b, policy_rejected_logp_b,
                                         ref_chosen_logp_b, ref_rejected_logp_b))
    _check(pc.shape == pr.shape == rc.shape == rr.shape and pc.ndim == 1,
           f"DPO inputs must all be [B]; got {pc.shape}, {pr.shape}, {rc.shape}, {rr.shape}")
    r_c = beta * (pc - rc)
    r_r = beta * (pr - rr)
    h = r_c - r_r
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    sg = jax.lax.stop_gradient
    aux = {"weight": jnp.asarray(pc.shape[0], pc.dtype), "reward_chosen": jnp.sum(sg(r_c)),
           "reward_rejected": jnp.sum(sg(r_r)), "reward_margin": jnp.sum(sg(h)),
           "accuracy": jnp.sum((sg(r_c) > sg(r_r)).astype(pc.dtype))}
    return jnp.sum(per_pair), aux


def dpo_loss(policy_chosen_logp_b, policy_rejected_logp_b, ref_chosen_logp_b, ref_rejected_logp_b,
             beta: float, label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Direct Preference Optimization (Rafailov et al. 2023), the 'sigmoid' loss.

    With each *_logp_b the summed log-prob of a whole response (completion tokens only):

      r_chosen   = beta (policy_chosen_logp - ref_chosen_logp)      implicit rewards
      r_rejected = beta (policy_rejected_logp - ref_rejected_logp)
      loss       = mean_b -log sigmoid(r_chosen - r_rejected)
      (label_smoothing = eps, cDPO: -(1 - eps) log sigmoid(h) - eps log sigmoid(-h))

    Returns:
      (loss, metrics): reward_chosen, reward_rejected, reward_margin (means of r_chosen,
      r_rejected, r_chosen - r_rejected) and accuracy (share of pairs with r_chosen > r_rejected).
    """
    loss_sum, aux = dpo_loss_sums(policy_chosen_logp_b, policy_rejected_logp_b, ref_chosen_logp_b,
                                  ref_rejected_logp_b, beta, label_smoothing)
    n = aux["weight"]
    return loss_sum / n, {k: v / n for k, v in aux.items() if k != "weight"}


def make_dpo_loss_fn(beta: float, label_smoothing: float = 0.0):
    """A core.train LossFn for preference pairs (policy params; the reference's log-probs are data):

      'tokens'   int32 [B, 2, T+1]   row b: (chosen, rejected) conversations
      'mask'     int   [B, 2, T]     1 on the response's target tokens
      'ref_logp' float [B, 2]        the reference policy's summed response log-probs
      ('segment_ids', 'positions' [B, 2, T+1] optional)

    A pair stays in one batch element, so microbatches never split it. Returns `dpo_loss_sums`.
    """
    from core import loss as loss_lib  # local: keep core.rl importable without the model stack

    def loss_fn(params, batch, model_cfg):
        tokens = batch["tokens"]
        if tokens.ndim != 3 or tokens.shape[1] != 2:
            raise ValueError(f"DPO batch['tokens'] must be [B, 2, T+1] (chosen, rejected), "
                             f"got {tokens.shape}")
        b = tokens.shape[0]
        flat = {k: v.reshape((2 * b,) + v.shape[2:]) for k, v in batch.items()
                if k in ("tokens", "mask", "segment_ids", "positions")}
        logp_b, _ = loss_lib.sequence_logprobs(params, flat, model_cfg)
        logp = logp_b.reshape(b, 2)
        ref = batch["ref_logp"]
        return dpo_loss_sums(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta, label_smoothing)

    return loss_fn


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020; Gao et al. 2022).

    Exact for continuous rewards with no ties; 0 for n = 1.
    """
    _check(isinstance(n, (int,)) and not isinstance(n, bool) and n >= 1,
           f"best-of-n needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n
