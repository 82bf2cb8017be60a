"""The training step: sharded train state, a generic jit-compiled step, next-token LM loss.

Batches follow the format and loss-mask convention of `core.loss` (`split_batch`): tokens,
segment_ids, positions [B, T+1] and an optional target mask [B, T].

State is a plain dict {'params', 'opt_state', 'step'}: a pytree that orbax saves as is. Its
params may be any tree with a matching tree of logical axes (`ParamSpec`): the language model's
params (`model_spec(cfg)`), or a larger tree such as {'model': ..., 'head': ...} for a reward
model. Whatever else a stage needs (a frozen reference policy) is another params tree outside the
state, passed to the loss through the batch or a closure.

Gradient accumulation (`grad_accum=A`) runs A microbatches of B/A rows through `lax.scan` inside
one step and makes one optimizer update, so loss, gradients and the update equal those of the
full batch (sums over tokens are combined before dividing by the total token count). Microbatch m
takes rows m, m+A, m+2A, ... so every device keeps its own rows and nothing moves between devices.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

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


split_batch = loss_lib.split_batch  # the convention lives in core/loss.py


def make_lm_loss(z_loss: float = 0.0, vocab_chunk: int = loss_lib.DEFAULT_VOCAB_CHUNK) -> LossFn:
    """Next-token cross-entropy (+ z_loss * lse^2) summed over unmasked targets; weight = tokens.

    The same function trains pretraining and SFT: SFT batches carry a 'mask' over the assistant's
    tokens. Computed by the shared scorer (`core.loss.hidden_logprobs`), chunked over the
    vocabulary when it is larger than `vocab_chunk`.
    """

    def lm_loss(params, batch: Batch, cfg: model_lib.ModelConfig):
        x = split_batch(batch)
        h, _ = model_lib.forward_hidden(params, x["inputs"], cfg, positions=x["positions"],
                                        segment_ids=x["segment_ids"])
        logp, lse = loss_lib.hidden_logprobs(params, h, x["targets"], cfg, vocab_chunk=vocab_chunk)
        m = x["mask"].astype(logp.dtype)
        nll = jnp.sum(-logp * m)
        tokens = jnp.sum(m)
        aux = {"weight": tokens, "tokens": tokens, "nll": nll}
        loss = nll
        if z_loss:
            aux["z"] = jnp.sum(jnp.square(lse) * m)
            loss = nll + z_loss * aux["z"]
        return loss, aux

    return lm_loss


# ----------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What a train state is built from: a params tree's shapes, its logical axes, its init.

    shapes: tree of jax.ShapeDtypeStruct; axes: the same tree with tuples of logical axis names
    (`core.sharding` maps them to mesh axes); init: key -> params (None: only for states built
    around existing params).
    """

    shapes: Any
    axes: Any
    init: Optional[Callable[[jax.Array], Any]] = None

    def shardings(self, mesh: Mesh) -> Any:
        return sharding_lib.param_shardings(self.axes, mesh, self.shapes)


def model_spec(cfg: model_lib.ModelConfig) -> ParamSpec:
    """The language model's params as a ParamSpec."""
    return ParamSpec(model_lib.param_shapes(cfg), model_lib.param_axes(cfg),
                     lambda k: model_lib.init_params(k, cfg))


SpecLike = Union[ParamSpec, model_lib.ModelConfig]


def as_spec(spec: SpecLike) -> ParamSpec:
    """A ModelConfig stands for its model's ParamSpec."""
    return model_spec(spec) if isinstance(spec, model_lib.ModelConfig) else spec


def state_shardings(spec: SpecLike, optimizer: optax.GradientTransformation, mesh: Mesh) -> State:
    """NamedSharding tree matching the train state (for jit and for checkpoint restore)."""
    spec = as_spec(spec)
    p_sh = spec.shardings(mesh)
    return {
        "params": p_sh,
        "opt_state": sharding_lib.opt_state_shardings(optimizer, spec.shapes, p_sh, mesh),
        "step": sharding_lib.replicated(mesh),
    }


def init_train_state(key: jax.Array, spec: SpecLike, optimizer: optax.GradientTransformation,
                     mesh: Mesh) -> State:
    """Fresh params and optimizer state, created directly in their shards (no device ever holds
    the whole model). Values do not depend on the mesh (partitionable threefry)."""
    spec = as_spec(spec)
    if spec.init is None:
        raise ValueError("this ParamSpec has no init function; use train_state_from_params")
    shardings = state_shardings(spec, optimizer, mesh)

    def init(k):
        params = spec.init(k)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=shardings)(key)


def train_state_from_params(params: Any, spec: SpecLike, optimizer: optax.GradientTransformation,
                            mesh: Mesh) -> State:
    """Train state around existing params (a loaded checkpoint, an HF import, an SFT model plus a
    fresh head): params are moved to their shardings, the optimizer state is created sharded,
    step = 0."""
    shardings = state_shardings(spec, optimizer, mesh)
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


def training_remat(model_cfg: model_lib.ModelConfig, mesh: Mesh) -> model_lib.ModelConfig:
    """The config the train step runs: on a CPU mesh, a model without remat gets remat='dots'
    (keep matmul outputs, recompute elementwise work in the backward). On XLA:CPU the layer scan's
    saved residuals cost more than that recomputation: zero-filled [L, ...] stacks, a
    dynamic-update-slice per layer and a dynamic-slice back, ~40% of a small model's update
    (measured with bench_rl's Qwen2-shaped d128 model: update 0.284 -> 0.232 s; 'full' 0.229).
    Other backends, and models that set remat, are left as they are. Values are unchanged."""
    if not model_cfg.remat and mesh.devices.flat[0].platform == "cpu":
        return dataclasses.replace(model_cfg, remat="dots")
    return model_cfg


def make_train_step(model_cfg: model_lib.ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, loss_fn: Optional[LossFn] = None, *, grad_accum: int = 1,
                    donate: bool = True, spec: Optional[ParamSpec] = None
                    ) -> Callable[[State, Batch], tuple[State, dict]]:
    """One jit-compiled `step(state, batch) -> (new_state, metrics)`.

    Args:
      model_cfg: the model.
      optimizer: e.g. `core.optim.make_optimizer(cfg)`.
      mesh: from `core.sharding.make_mesh`; the state is sharded by `state_shardings`, the batch
        over data x fsdp.
      loss_fn: see LossFn; default `make_lm_loss()`.
      grad_accum: microbatches per step (B must be a multiple of grad_accum x data x fsdp).
      donate: donate the input state's buffers (do not reuse `state` after the call).
      spec: the params tree of the state when it is not the language model's alone (a reward
        head, LoRA adapters); `loss_fn` still receives `model_cfg`.

    Metrics (replicated scalars): loss, grad_norm (before clipping), lr (used by this update),
    tokens (unmasked targets), weight, plus the loss_fn's other aux entries as means.
    """
    if grad_accum < 1:
        raise ValueError(f"--grad_accum must be >= 1, got {grad_accum}")
    loss_fn = loss_fn or make_lm_loss()
    model_cfg = training_remat(model_cfg, mesh)
    st_sh = state_shardings(spec or model_cfg, optimizer, mesh)
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
                   loss_fn: Optional[LossFn] = None, spec: Optional[ParamSpec] = None
                   ) -> Callable[[Any, Batch], dict]:
    """jit `eval(params, batch) -> aux sums` (add 'loss_sum'); accumulate over batches, then
    divide by the summed 'weight'. Params must already carry their shardings."""
    loss_fn = loss_fn or make_lm_loss()
    p_sh = as_spec(spec or model_cfg).shardings(mesh)

    def ev(params, batch):
        l, aux = loss_fn(params, batch, model_cfg)
        return {"loss_sum": l, **aux}

    return jax.jit(ev, in_shardings=(p_sh, sharding_lib.batch_sharding(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))
