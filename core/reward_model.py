"""A scalar reward model: the transformer's last hidden state at a response's final token, then a
linear head; trained with the InstructGPT ranking loss over all pairs of a ranking.

Params are {'model': <core.model params>, 'head': {'w': [D], 'b': []}}; `reward_model_spec` gives
core.train the matching ParamSpec (so the shared train state, step and checkpointing apply), and
`make_ranking_loss` the LossFn.

Ranking loss (Ouyang et al. 2022, eq. 1): a prompt x with K responses ranked best first
(y_1 > y_2 > ... > y_K) contributes the mean over its C(K,2) ordered pairs

    loss(x) = -1/C(K,2) * sum_{i < j} log sigmoid(r(x, y_i) - r(x, y_j))

and the batch loss is the mean over prompts. All pairs of one prompt sit in one batch element
(tokens [N, K, T]), so each response's forward pass is shared by its K-1 pairs and microbatches
split prompts, never a prompt's pairs. Returned as sums and counts (loss_sum over prompts,
weight = prompts), so microbatched steps combine exactly.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from core import model as model_lib

Head = dict[str, jax.Array]


def init_head(key: jax.Array, d_model: int, std: Optional[float] = None) -> Head:
    """{'w': [D] ~ N(0, std^2), 'b': 0}; std defaults to 1/sqrt(D), so rewards start O(1) on
    final-normed (unit-RMS) hidden states."""
    std = 1.0 / math.sqrt(d_model) if std is None else std
    return {"w": std * jax.random.normal(key, (d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def head_axes() -> dict:
    return {"w": ("embed",), "b": ()}


def reward_model_spec(cfg: model_lib.ModelConfig):
    """core.train.ParamSpec for {'model', 'head'}: the model's shapes/axes plus the head's; init
    draws both (normally you build the state around an SFT model's params instead:
    `train_state_from_params({'model': sft_params, 'head': init_head(key, D)}, spec, ...)`)."""
    from core import train as train_lib  # local: core.train is heavier than this module needs

    shapes = {"model": model_lib.param_shapes(cfg),
              "head": {"w": jax.ShapeDtypeStruct((cfg.d_model,), jnp.float32),
                       "b": jax.ShapeDtypeStruct((), jnp.float32)}}
    axes = {"model": model_lib.param_axes(cfg), "head": head_axes()}

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"model": model_lib.init_params(k1, cfg), "head": init_head(k2, cfg.d_model)}

    return train_lib.ParamSpec(shapes, axes, init)


def reward_from_hidden(head: Head, x_btd: jax.Array, last_index_b: jax.Array) -> jax.Array:
    """r_b = <x[b, last_index_b], w> + b, in float32 (or float64 for float64 hidden states)."""
    x = x_btd.astype(jnp.promote_types(x_btd.dtype, jnp.float32))
    idx = jnp.asarray(last_index_b, jnp.int32)
    h_bd = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    return h_bd @ head["w"].astype(x.dtype) + head["b"].astype(x.dtype)


def reward_model_forward(params, head: Head, tokens: jax.Array, cfg: model_lib.ModelConfig,
                         last_index_b: jax.Array, *, positions=None, segment_ids=None) -> jax.Array:
    """Scalar rewards of B sequences.

    Args:
      params: the transformer's params (core.model).
      head: {'w': [D], 'b': []}.
      tokens: int32 [B, T] prompt + response (right padding after the response is fine: attention
        is causal, so it never reaches the final token's hidden state).
      cfg: the model config.
      last_index_b: int32 [B], the position of each row's final response token (e.g. its
        <|im_end|>); the reward is read from the final-normed hidden state there.
      positions, segment_ids: as in `core.model.forward`.

    Returns:
      r_b [B] float32.
    """
    x_btd, _ = model_lib.forward_hidden(params, tokens, cfg, positions=positions, segment_ids=segment_ids)
    return reward_from_hidden(head, x_btd, last_index_b)


def shift_head(head: Head, mean_reward) -> Head:
    """The head with b -= mean_reward: InstructGPT shifts the rewards so reference responses
    (e.g. the SFT model's samples) average 0 before RL."""
    return {"w": head["w"], "b": head["b"] - jnp.asarray(mean_reward, head["b"].dtype)}


# ----------------------------------------------------------------------------- ranking loss


def ranking_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(winner, loser) indices of the C(K,2) pairs of a ranking of K listed best first (i < j)."""
    if k < 2:
        raise ValueError(f"a ranking needs K >= 2 responses, got K = {k}")
    pairs = np.array(list(itertools.combinations(range(k), 2)), np.int32)
    return pairs[:, 0], pairs[:, 1]


def ranking_loss_sums(rewards_nk: jax.Array, valid_nk: Optional[jax.Array] = None):
    """The ranking loss as sums: (loss_sum, aux) in core.train's LossFn form.

    rewards_nk [N, K]: rewards of K responses per prompt, listed best first. valid_nk [N, K]
    (optional, bool): False for padding responses (a prompt with fewer than K), whose pairs are
    dropped. For prompt n with P_n valid pairs:

      loss_n     = (1/P_n) sum_{i<j valid} -log sigmoid(r_ni - r_nj)
      accuracy_n = (1/P_n) sum_{i<j valid} [r_ni > r_nj]

    aux (sums over prompts with P_n > 0): weight (= number of such prompts), accuracy
    (sum of accuracy_n), pairs (sum of P_n), correct_pairs, margin (sum of mean r_ni - r_nj).
    loss = loss_sum / weight; with equal P_n, accuracy / weight is also the pairwise accuracy.
    """
    r = jnp.asarray(rewards_nk)
    r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
    if r.ndim != 2:
        raise ValueError(f"rewards must be [N, K] (prompts x ranked responses), got shape {r.shape}")
    win, lose = ranking_pairs(r.shape[1])
    d_np = r[:, win] - r[:, lose]                               # [N, P]
    if valid_nk is None:
        ok = jnp.ones(d_np.shape, r.dtype)
    else:
        v = jnp.asarray(valid_nk).astype(bool)
        ok = (v[:, win] & v[:, lose]).astype(r.dtype)
    p_n = jnp.sum(ok, axis=1)
    has = (p_n > 0).astype(r.dtype)
    denom = jnp.maximum(p_n, 1.0)
    loss_n = jnp.sum(-jax.nn.log_sigmoid(d_np) * ok, axis=1) / denom
    d = jax.lax.stop_gradient(d_np)
    correct_n = jnp.sum((d > 0).astype(r.dtype) * ok, axis=1)
    aux = {"weight": jnp.sum(has), "accuracy": jnp.sum(correct_n / denom), "pairs": jnp.sum(p_n),
           "correct_pairs": jnp.sum(correct_n), "margin": jnp.sum(jnp.sum(d * ok, axis=1) / denom)}
    return jnp.sum(loss_n), aux


def ranking_loss(rewards_nk: jax.Array, valid_nk: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Mean ranking loss over prompts and metrics: accuracy (mean per-prompt pairwise accuracy),
    pair_accuracy (correct pairs / pairs), margin (mean winner - loser reward)."""
    s, aux = ranking_loss_sums(rewards_nk, valid_nk)
    w = jnp.maximum(aux["weight"], 1.0)
    return s / w, {"accuracy": aux["accuracy"] / w, "margin": aux["margin"] / w,
                   "pair_accuracy": aux["correct_pairs"] / jnp.maximum(aux["pairs"], 1.0),
                   "pairs": aux["pairs"]}


def make_ranking_loss():
    """A core.train LossFn for params {'model', 'head'} and batches of rankings:

      'tokens'     int32 [N, K, T]   K responses (prompt + response) per prompt, best first
      'last_index' int32 [N, K]      each response's final token position
      'valid'      bool  [N, K]      optional; False for padding responses
      'positions'  int32 [N, K, T]   optional

    Returns (loss_sum, aux) from `ranking_loss_sums` (weight = prompts).
    """

    def loss_fn(params: Any, batch, cfg: model_lib.ModelConfig):
        tokens = batch["tokens"]
        if tokens.ndim != 3:
            raise ValueError(f"ranking batch['tokens'] must be [N, K, T], got shape {tokens.shape}")
        n, k, t = tokens.shape
        pos = batch.get("positions")
        r_b = reward_model_forward(params["model"], params["head"], tokens.reshape(n * k, t), cfg,
                                   batch["last_index"].reshape(n * k),
                                   positions=None if pos is None else pos.reshape(n * k, t))
        return ranking_loss_sums(r_b.reshape(n, k), batch.get("valid"))

    return loss_fn
