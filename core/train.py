"""The training step: sharded train state, a generic jit-compiled step, next-token LM loss.

Batch format (numpy from data/pipeline.py, or jax arrays from `core.sharding.shard_batch`):

    {'tokens':      int32 [B, T+1],   # inputs = tokens[:, :-1], targets = tokens[:, 1:]
     'segment_ids': int32 [B, T+1],   # optional; 1, 2, ... per packed document, 0 = padding
     'positions':   int32 [B, T+1],   # optional; position ids (restarting per document)
     'mask':        bool/int [B, T]}  # optional; loss mask over *targets* (SFT: assistant tokens)

Loss-masking convention: target t counts iff its segment id equals its input's segment id and
is not 0, AND (when given) mask[:, t]. So we never predict across a document boundary (the first
token of the next document from the last token of the previous one) nor into or out of padding.
With documents packed as `doc <|endoftext|>`, the closing <|endoftext|> is in its document's
segment and IS predicted (the model learns where documents end); with `<|endoftext|> doc` (BOS
style) the BOS opens the next segment, is never a target, and the doc's first token is predicted
from it. Without segment_ids every target counts (before 'mask').

State is a plain dict {'params', 'opt_state', 'step'}: a pytree that orbax saves as is.

Gradient accumulation (`grad_accum=A`) runs A microbatches of B/A rows through `lax.scan` inside
one step and makes one optimizer update, so loss, gradients and the update equal those of the
full batch (sums over tokens are combined before dividing by the total token count). Microbatch m
takes rows m, m+A, m+2A, ... so every device keeps its own rows and nothing moves between devices.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core import loss as loss_lib
from core import model as model_lib
from core import optim as optim_lib
from core import sharding as sharding_lib

State = dict[str, Any]
Batch = Mapping[str, jax.Array]
# loss_fn(params, batch, model_cfg) -> (loss_sum scalar, aux dict of scalar sums). aux['weight']
# is the normaliser: the step reports and differentiates loss_sum / weight, summed over
# microbatches first. Other aux entries are reported as sum / weight, except 'tokens' (a count).
LossFn = Callable[[Any, Batch, model_lib.ModelConfig], tuple[jax.Array, dict[str, jax.Array]]]


def split_batch(batch: Batch) -> dict[str, Optional[jax.Array]]:
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


def make_lm_loss(z_loss: float = 0.0) -> LossFn:
    """Next-token cross-entropy (+ z_loss * lse^2) summed over unmasked targets; weight = tokens."""

    def lm_loss(params, batch: Batch, cfg: model_lib.ModelConfig):
        x = split_batch(batch)
        logits_btv, _ = model_lib.forward(params, x["inputs"], cfg, positions=x["positions"],
                                          segment_ids=x["segment_ids"])
        s = loss_lib.cross_entropy_sums(logits_btv, x["targets"], x["mask"], z_loss)
        aux = {"weight": s["tokens"], "tokens": s["tokens"], "nll": s["nll"]}
        if z_loss:
            aux["z"] = s["z"]
        return s["loss"], aux

    return lm_loss


# ----------------------------------------------------------------------------- state


def state_shardings(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> State:
    """NamedSharding tree matching the train state (for jit and for checkpoint restore)."""
    p_shapes = model_lib.param_shapes(model_cfg)
    p_sh = sharding_lib.param_shardings(model_lib.param_axes(model_cfg), mesh, p_shapes)
    return {
        "params": p_sh,
        "opt_state": sharding_lib.opt_state_shardings(optimizer, p_shapes, p_sh, mesh),
        "step": sharding_lib.replicated(mesh),
    }


def init_train_state(key: jax.Array, model_cfg: model_lib.ModelConfig,
                     optimizer: optax.GradientTransformation, mesh: Mesh) -> State:
    """Fresh params and optimizer state, created directly in their shards (no device ever holds
    the whole model). Values do not depend on the mesh (partitionable threefry)."""
    shardings = state_shardings(model_cfg, optimizer, mesh)

    def init(k):
        params = model_lib.init_params(k, model_cfg)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=shardings)(key)


def train_state_from_params(params: Any, model_cfg: model_lib.ModelConfig,
                            optimizer: optax.GradientTransformation, mesh: Mesh) -> State:
    """Train state around existing params (a loaded checkpoint, an HF import): params are moved
    to their shardings, the optimizer state is created sharded, step = 0."""
    shardings = state_shardings(model_cfg, optimizer, mesh)
    params = jax.device_put(params, shardings["params"])

    def init(p):
        return {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, in_shardings=(shardings["params"],), out_shardings=shardings)(params)


# ----------------------------------------------------------------------------- step


def _microbatches(batch: Batch, n: int, mesh: Mesh) -> Batch:
    """[B, ...] -> [n, B/n, ...] with microbatch m = rows m, m+n, ...: a local regrouping when
    B/n is a multiple of the batch shards (each device's contiguous rows stay on it)."""
    axes = tuple(a for a in sharding_lib.BATCH_AXES if mesh.shape[a] > 1) or None

    def split(x):
        b = x.shape[0]
        y = x.reshape((b // n, n) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, axes)))

    return {k: split(v) for k, v in batch.items()}


def _check_batch(batch: Batch, grad_accum: int, mesh: Mesh) -> None:
    div = sharding_lib.batch_divisor(mesh)
    for k, v in batch.items():
        b = v.shape[0]
        if b % grad_accum or (b // grad_accum) % div:
            raise ValueError(
                f"batch['{k}'] has batch size {b}; it must be a multiple of grad_accum ({grad_accum}) "
                f"x data*fsdp ({div}) of mesh {dict(mesh.shape)}")


def _normalise(loss_sum, aux):
    w = aux["weight"]
    w_safe = jnp.where(w > 0, w, 1.0)
    metrics = {"loss": loss_sum / w_safe}
    for k, v in aux.items():
        metrics[k] = v if k in ("weight", "tokens") else v / w_safe
    return w_safe, metrics


def make_train_step(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, loss_fn: Optional[LossFn] = None, *, grad_accum: int = 1,
                    donate: bool = True) -> Callable[[State, Batch], tuple[State, dict]]:
    """One jit-compiled `step(state, batch) -> (new_state, metrics)`.

    Args:
      model_cfg: the model.
      optimizer: e.g. `core.optim.make_optimizer(cfg)`.
      mesh: from `core.sharding.make_mesh`; the state is sharded by `state_shardings`, the batch
        over data x fsdp.
      loss_fn: see LossFn; default `make_lm_loss()`.
      grad_accum: microbatches per step (B must be a multiple of grad_accum x data x fsdp).
      donate: donate the input state's buffers (do not reuse `state` after the call).

    Metrics (replicated scalars): loss, grad_norm (before clipping), lr (used by this update),
    tokens (unmasked targets), weight, plus the loss_fn's other aux entries as means.
    """
    if grad_accum < 1:
        raise ValueError(f"--grad_accum must be >= 1, got {grad_accum}")
    loss_fn = loss_fn or make_lm_loss()
    st_sh = state_shardings(model_cfg, optimizer, mesh)
    p_sh = st_sh["params"]
    b_sh = sharding_lib.batch_sharding(mesh)
    rep = sharding_lib.replicated(mesh)

    def loss_and_grads(params, mb):
        (l, aux), g = jax.value_and_grad(lambda p: loss_fn(p, mb, model_cfg), has_aux=True)(params)
        return l, aux, jax.lax.with_sharding_constraint(g, p_sh)

    def step(state: State, batch: Batch):
        _check_batch(batch, grad_accum, mesh)
        params = state["params"]
        if grad_accum == 1:
            loss_sum, aux, grads = loss_and_grads(params, batch)
        else:
            micro = _microbatches(batch, grad_accum, mesh)
            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(loss_and_grads, params, first))
            zeros = (zeros[0], zeros[1], jax.lax.with_sharding_constraint(zeros[2], p_sh))

            def body(acc, mb):
                return jax.tree.map(jnp.add, acc, loss_and_grads(params, mb)), None

            (loss_sum, aux, grads), _ = jax.lax.scan(body, zeros, micro)
        if "weight" not in aux:
            raise ValueError("loss_fn must return aux with a 'weight' entry (the loss normaliser)")
        w, metrics = _normalise(loss_sum, aux)
        grads = jax.tree.map(lambda g: g / w, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        metrics.update(grad_norm=optax.tree.norm(grads), lr=optim_lib.current_lr(opt_state))
        return new_state, metrics

    return jax.jit(step, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, rep),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(model_cfg: model_lib.ModelConfig, mesh: Mesh,
                   loss_fn: Optional[LossFn] = None) -> Callable[[Any, Batch], dict]:
    """jit `eval(params, batch) -> aux sums` (add 'loss_sum'); accumulate over batches, then
    divide by the summed 'weight'. Params must already carry their shardings."""
    loss_fn = loss_fn or make_lm_loss()
    p_sh = sharding_lib.model_shardings(model_cfg, mesh)

    def ev(params, batch):
        l, aux = loss_fn(params, batch, model_cfg)
        return {"loss_sum": l, **aux}

    return jax.jit(ev, in_shardings=(p_sh, sharding_lib.batch_sharding(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
