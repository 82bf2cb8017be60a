"""AdamW with a path-derived weight-decay mask, learning-rate schedules and global-norm clipping.

The learning rate is injected as a hyperparameter (`optax.inject_hyperparams`), so the value used
by the latest update lives in the optimizer state and `current_lr(opt_state)` reads it without
knowing the schedule. Gradient accumulation happens inside the training step (`core.train`,
flag `grad_accum`), not here, so one optimizer update is one train step.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

# Leaf names (last key of a param path, see core/model.py) that are never matrices.
_NORM_NAMES = frozenset({"scale", "q_norm", "k_norm"})
_BIAS_NAMES = frozenset({"bias", "bq", "bk", "bv", "bo", "b_in", "b_out"})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule.

    schedule: 'cosine' (warmup, then cosine from lr down to lr * final_lr_frac at total_steps),
      'linear' (warmup, constant, then a linear warm-down over the last warmdown_frac of
      total_steps to lr * final_lr_frac), or 'constant' (warmup, then lr).
    clip_norm: global-norm clipping threshold; 0 or None disables it.
    decay_*: whether weight decay also applies to embeddings (token and position tables; with
      tied embeddings this is also the LM head), norm scales and biases. Matrices always decay.
    """

    lr: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    schedule: str = "cosine"
    final_lr_frac: float = 0.1
    warmdown_frac: float = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: Optional[float] = 1.0
    decay_embeddings: bool = False
    decay_norms: bool = False
    decay_biases: bool = False

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"OptimConfig: {msg}")

        need(self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        need(self.total_steps > 0, f"total_steps must be positive, got {self.total_steps}")
        need(0 <= self.warmup_steps <= self.total_steps,
             f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]")
        need(self.schedule in ("cosine", "linear", "constant"),
             f"unknown schedule {self.schedule!r}; choose cosine, linear or constant")
        need(0 <= self.final_lr_frac <= 1, f"final_lr_frac must be in [0, 1], got {self.final_lr_frac}")
        need(0 <= self.warmdown_frac <= 1, f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.clip_norm is None or self.clip_norm >= 0, f"clip_norm must be >= 0, got {self.clip_norm}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """step (int array) -> learning rate (float32). Warmup rises linearly from lr/warmup to lr,
    so step 0 already moves the params."""
    lr, total, warm = cfg.lr, cfg.total_steps, cfg.warmup_steps
    final = lr * cfg.final_lr_frac
    # Warmup starts at lr / warmup (not 0) so that no step is wasted.
    warmup = (lambda s: lr * (s + 1.0) / warm) if warm > 0 else (lambda s: lr)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        if cfg.schedule == "cosine":
            frac = jnp.clip((s - warm) / max(total - warm, 1), 0.0, 1.0)
            after = final + (lr - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif cfg.schedule == "linear":
            n_down = cfg.warmdown_frac * total
            start = total - n_down
            frac = jnp.clip((s - start) / max(n_down, 1.0), 0.0, 1.0)
            after = lr + (final - lr) * frac
        else:
            after = jnp.asarray(lr, jnp.float32)
        return jnp.where(s < warm, warmup(s), after).astype(jnp.float32)

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decays(path_names: list[str], cfg: OptimConfig) -> bool:
    """Whether the param at this key path gets weight decay (see OptimConfig.decay_*)."""
    name = path_names[-1]
    if name in _NORM_NAMES or "norm" in name or any("norm" in p for p in path_names[:-1]):
        return cfg.decay_norms
    if name in _BIAS_NAMES:
        return cfg.decay_biases
    if name == "smear":  # a per-head gate logit: decay would pull every gate to one half
        return False
    if path_names[0] in ("embed", "pos_embed"):
        return cfg.decay_embeddings
    return True


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """Tree of bools matching `params` (arrays or ShapeDtypeStructs): True where decay applies."""
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(_path_names(p), cfg), params)


def make_optimizer(cfg: OptimConfig, params: Any = None) -> optax.GradientTransformation:
    """AdamW: clip by global norm -> Adam moments -> decoupled weight decay (masked) -> -lr.

    Args:
      cfg: OptimConfig.
      params: optional params tree; when given, the decay mask is checked against it now (it is
        otherwise derived lazily from the tree passed to `init`, so any params layout works).

    Returns:
      An optax GradientTransformation whose state records the current learning rate
      (read it with `current_lr`).
    """
    if params is not None:
        decay_mask(params, cfg)  # fails early on a tree the mask cannot walk

    def factory(learning_rate):
        parts = []
        if cfg.clip_norm:
            parts.append(optax.clip_by_global_norm(cfg.clip_norm))
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg)))
        parts.append(optax.scale_by_learning_rate(learning_rate))
        return optax.chain(*parts)

    return optax.inject_hyperparams(factory)(learning_rate=make_schedule(cfg))


def current_lr(opt_state: Any) -> jax.Array:
    """Learning rate used by the latest update (NaN when the optimizer does not record one)."""
    # hyperparams_states also has a 'learning_rate' key (the schedule's state); keep the value.
    # With parameter groups (multi_transform) there is one per group: the first one found (groups
    # are visited in sorted label order) is reported.
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, "learning_rate", filtering=lambda _, v: isinstance(v, (jax.Array, float)))
    if not found:
        return jnp.asarray(jnp.nan, jnp.float32)
    return jnp.asarray(found[0][1], jnp.float32)


def label_params(params: Any, rules: Sequence[tuple[str, str]], default: str = "default") -> Any:
    """Tree of group labels matching `params`: the label of the first rule whose regex matches
    the leaf's '/'-joined path (e.g. 'layers/attn/wq', 'head/w'), else `default`.

    rules: [(regex, label), ...], searched with re.search, in order.
    """
    compiled = [(re.compile(rx), label) for rx, label in rules]

    def label(path, _):
        name = "/".join(_path_names(path))
        for rx, lab in compiled:
            if rx.search(name):
                return lab
        return default

    return jax.tree_util.tree_map_with_path(label, params)


def make_grouped_optimizer(groups: Mapping[str, Optional[OptimConfig]],
                           rules: Sequence[tuple[str, str]] = (),
                           default: str = "default") -> optax.GradientTransformation:
    """Parameter groups through `optax.multi_transform`: each group its own AdamW and schedule
    (e.g. a fresh reward head at 10x the body's learning rate), `None` = frozen (updates are
    exactly zero, no optimizer moments are kept).

    Args:
      groups: label -> OptimConfig, or None for a frozen group. Must contain every label that
        `rules` and `default` can produce.
      rules: [(regex over the '/'-joined param path, label)], first match wins (`label_params`).
      default: label of leaves no rule matches.

    Gradient clipping happens per group (each group's clip_norm over its own leaves).
    `current_lr` reports the learning rate of the first non-frozen group in sorted label order.
    """
    labels_used = {default, *(lab for _, lab in rules)}
    missing = sorted(labels_used - set(groups))
    if missing:
        raise ValueError(f"optimizer groups {missing} are used by the rules but not configured "
                         f"(configured: {sorted(groups)})")
    transforms = {name: (optax.set_to_zero() if g is None else make_optimizer(g)) for name, g in groups.items()}
    return optax.multi_transform(transforms, lambda params: label_params(params, rules, default))
