"""core/loop.py (order of events, stop and resume), experiments/options.py (one source of
options), the optimizer's parameter groups and the chunked scorer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from core import loop
from core import loss as loss_lib
from core import model as model_lib
from core import optim
from core import train


def _counter_step(state, batch):
    """A deterministic 'train step': state accumulates the batch; metrics say what was seen."""
    new = {"x": state["x"] + batch["v"], "n": state["n"] + 1}
    return new, {"loss": new["x"], "seen": batch["v"]}


def _batches(n=50):
    return loop.ListIterator([{"v": jnp.asarray(float(i))} for i in range(n)])


class _Recorder:
    def __init__(self, stop_at=None, saved=None):
        self.events, self.logged, self.saved = [], [], saved if saved is not None else {}
        self.stop_at = stop_at
        self.step = 0

    def hooks(self, restore=None):
        def log(step, m, verbose):
            self.logged.append((step, float(m["seen"]), float(m["loss"])))
            self.events.append(("log", step))

        def save(step, state, data_state, final):
            self.saved[step] = (jax.device_get(state), data_state)
            self.events.append(("save", step, final))

        def evaluate(step, state):
            self.events.append(("eval", step))
            return {"x": float(state["x"])}

        def after_step(step, is_save):
            self.step = step

        return loop.Hooks(restore=restore, log=log, evaluate=evaluate, save=save, after_step=after_step,
                          should_stop=(lambda: self.step + 1 == self.stop_at) if self.stop_at else None)


def _init():
    return {"x": jnp.zeros(()), "n": jnp.zeros((), jnp.int32)}


def test_loop_order_of_events_and_one_log_per_step():
    rec = _Recorder()
    cfg = loop.LoopConfig(total_steps=10, log_every=3, eval_every=4, save_every=5)
    res = loop.run(_counter_step, _init, _batches(), cfg, rec.hooks())
    assert [s for s, _, _ in rec.logged] == list(range(1, 11))  # each step logged once, in order
    assert [v for _, v, _ in rec.logged] == [float(i) for i in range(10)]  # batches in order
    assert float(res.state["x"]) == sum(range(10)) and res.step == 10 and not res.interrupted
    evals = [e for e in rec.events if e[0] == "eval"]
    saves = [e for e in rec.events if e[0] == "save"]
    assert evals == [("eval", 4), ("eval", 8), ("eval", 10)]  # intervals, then the final one
    assert saves == [("save", 5, False), ("save", 10, False)]  # step 10 is a save step: no extra final
    # the eval at step 4 comes after step 4 is logged (metrics flushed first)
    assert rec.events.index(("eval", 4)) > rec.events.index(("log", 4))
    assert res.last_eval == {"x": float(sum(range(10)))}


def test_loop_final_save_when_last_step_is_not_a_save_step():
    rec = _Recorder()
    loop.run(_counter_step, _init, _batches(), loop.LoopConfig(total_steps=7, save_every=5), rec.hooks())
    assert [e for e in rec.events if e[0] == "save"] == [("save", 5, False), ("save", 7, True)]


def test_stop_saves_then_resume_continues_exactly():
    cfg = loop.LoopConfig(total_steps=12, log_every=100, eval_every=0, save_every=5)
    full = _Recorder()
    loop.run(_counter_step, _init, _batches(), cfg, full.hooks())

    first = _Recorder(stop_at=7)  # Ctrl-C during step 7
    res = loop.run(_counter_step, _init, _batches(), cfg, first.hooks())
    assert res.interrupted and res.step == 7 and 7 in first.saved
    assert [e for e in first.events if e[0] == "save"] == [("save", 5, False), ("save", 7, True)]
    assert not any(e[0] == "eval" for e in first.events)  # no final eval on an interrupt

    state7, data7 = first.saved[7]
    second = _Recorder()
    res2 = loop.run(_counter_step, lambda: pytest.fail("init must not run on resume"), _batches(), cfg,
                    second.hooks(restore=lambda: (7, state7, data7)))
    assert res2.start_step == 7 and res2.step == 12
    assert first.logged + second.logged == full.logged  # same batches, same metrics
    # a finished run resumed does nothing (no save, no eval)
    third = _Recorder()
    res3 = loop.run(_counter_step, _init, _batches(), cfg,
                    third.hooks(restore=lambda: (12, jax.device_get(res2.state), {"i": 12})))
    assert res3.step == 12 and third.events == []


def test_loop_config_errors():
    with pytest.raises(ValueError, match="total steps"):
        loop.LoopConfig(total_steps=0)
    with pytest.raises(ValueError, match="save_every"):
        loop.LoopConfig(total_steps=3, save_every=0)


# ----------------------------------------------------------------------------- options


def test_options_flags_from_one_dataclass(tmp_path):
    import dataclasses
    from typing import Optional

    from experiments import options
    from data import readers

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        out_dir: Optional[str] = options.field(None, "where")
        lr: float = options.field(1e-3, "learning rate")
        steps: int = options.field(10, "steps")
        fast: bool = options.field(False, "go fast")
        tokens: int = options.field(0, "budget", parse=readers.parse_bytes)
        mode: str = options.field("a", "mode", choices=("a", "b"))
        depth: int = options.field(2, "an int with choices", choices=(2, 3))

        def __post_init__(self):
            if self.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {self.steps}")

    fv = flags.FlagValues()
    options.define_flags(Cfg, flag_values=fv)
    assert {"out_dir", "lr", "steps", "fast", "tokens", "mode", "config"} <= set(fv)
    fv(["prog", "--lr=0.5", "--tokens=2M", "--fast", "--mode=b", "--depth=3"])
    cfg = options.from_flags(Cfg, fv)
    assert cfg == Cfg(out_dir=None, lr=0.5, steps=10, fast=True, tokens=2_000_000, mode="b", depth=3)
    assert isinstance(cfg.depth, int)
    with pytest.raises(flags.IllegalFlagValueError):
        options.define_flags(Cfg, flag_values=(bad := flags.FlagValues()))
        bad(["prog", "--depth=4"])
    options.save_config(cfg, tmp_path, total=3)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tokens"] == 2_000_000 and saved["total"] == 3

    # --config gives the defaults; flags on the command line win
    fv2 = flags.FlagValues()
    options.define_flags(Cfg, flag_values=fv2)
    fv2(["prog", f"--config={tmp_path}/config.json", "--steps=4"])
    assert options.from_flags(Cfg, fv2) == Cfg(lr=0.5, steps=4, fast=True, tokens=2_000_000, mode="b", depth=3)

    fv3 = flags.FlagValues()
    options.define_flags(Cfg, flag_values=fv3)
    fv3(["prog", "--steps=0"])
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        options.from_flags(Cfg, fv3)
    fv4 = flags.FlagValues()
    options.define_flags(Cfg, flag_values=fv4)
    fv4(["prog", "--tokens=lots"])
    with pytest.raises(ValueError, match="--tokens"):
        options.from_flags(Cfg, fv4)


# ----------------------------------------------------------------------------- optimizer groups


def test_optimizer_groups_freeze_and_scale():
    params = {"body": {"w": jnp.ones((3, 3))}, "head": {"w": jnp.ones((3,)), "b": jnp.zeros(())}}
    fast = optim.OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, schedule="constant", weight_decay=0.0)
    opt = optim.make_grouped_optimizer({"default": None, "head": fast}, [(r"^head/", "head")])
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    updates, state = opt.update(grads, state, params)
    np.testing.assert_array_equal(np.asarray(updates["body"]["w"]), 0.0)  # frozen: exactly zero
    # Adam's first step moves each coordinate by lr (m / sqrt(v) = 1)
    np.testing.assert_allclose(np.asarray(updates["head"]["w"]), -0.1, rtol=1e-5)
    assert float(optim.current_lr(state)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not configured"):
        optim.make_grouped_optimizer({"default": fast}, [(r"^head/", "head")])


def test_train_state_from_any_params_tree():
    """A reward-model-like tree (LM params + a scalar head) trains through the same step."""
    from core import sharding

    cfg = model_lib.get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    lm = train.model_spec(cfg)
    spec = train.ParamSpec(
        shapes={"model": lm.shapes, "head": {"w": jax.ShapeDtypeStruct((32,), jnp.float32)}},
        axes={"model": lm.axes, "head": {"w": ("embed",)}},
        init=lambda k: {"model": lm.init(k), "head": {"w": jnp.zeros((32,))}})
    opt = optim.make_grouped_optimizer({"default": None, "head": optim.OptimConfig(lr=0.1, warmup_steps=0, total_steps=5)},
                                       [(r"^head/", "head")])
    mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")

    def loss_fn(params, batch, model_cfg):
        h, _ = model_lib.forward_hidden(params["model"], batch["tokens"], model_cfg)
        r = h[:, -1] @ params["head"]["w"]
        return jnp.sum((r - 1.0) ** 2), {"weight": jnp.asarray(r.shape[0], jnp.float32)}

    state = train.init_train_state(jax.random.key(0), spec, opt, mesh)
    before = jax.device_get(state["params"])
    step = train.make_train_step(cfg, opt, mesh, loss_fn, spec=spec)
    batch = {"tokens": np.arange(64, dtype=np.int32).reshape(8, 8) % 64}
    for _ in range(3):
        state, m = step(state, sharding.shard_batch(batch, mesh))
    after = jax.device_get(state["params"])
    for a, b in zip(jax.tree.leaves(before["model"]), jax.tree.leaves(after["model"])):
        np.testing.assert_array_equal(a, b)  # frozen body
    assert np.abs(after["head"]["w"] - before["head"]["w"]).max() > 0.1


# ----------------------------------------------------------------------------- the scorer


@pytest.mark.parametrize("tie,cap", [(False, None), (True, 15.0)])
def test_chunked_scorer_equals_full_logits(tie, cap):
    cfg = model_lib.get_config("tiny", vocab_size=1000, d_model=32, n_layers=1, n_heads=2, tie_embeddings=tie,
                               logit_softcap=cap, max_seq_len=32)
    params = model_lib.init_params(jax.random.key(0), cfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 17), 0, 1000), np.int32)
    seg = np.ones_like(tokens)
    seg[1, 9:] = 2  # a packed second document
    seg[2, 12:] = 0  # padding
    batch = {"tokens": tokens, "segment_ids": seg,
             "positions": np.concatenate([np.arange(17)[None]] * 3).astype(np.int32)}
    full, mask = loss_lib.token_logprobs(params, batch, cfg)
    chunked, _ = loss_lib.token_logprobs(params, batch, cfg, vocab_chunk=96)  # 11 chunks, the last padded
    x = loss_lib.split_batch(batch)
    logits, _ = model_lib.forward(params, x["inputs"], cfg, positions=x["positions"], segment_ids=x["segment_ids"])
    ref = np.asarray(jax.nn.log_softmax(logits, -1))
    ref = np.take_along_axis(ref, tokens[:, 1:, None], -1)[..., 0]
    ref = np.where(np.asarray(mask), ref, 0.0)
    np.testing.assert_allclose(np.asarray(full), ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(chunked), ref, atol=2e-5)
    assert not bool(mask[1, 8]) and not bool(mask[2, 12:].any())  # boundary and padding targets excluded
    # at a sampling temperature (RL), and the entropy of the same distribution, chunked or not
    from core import rl as rl_lib
    logits_t = logits / 0.7
    ref_t = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits_t, -1)), tokens[:, 1:, None], -1)[..., 0]
    for chunk in (loss_lib.DEFAULT_VOCAB_CHUNK, 96):
        got_t, _ = loss_lib.token_logprobs(params, batch, cfg, vocab_chunk=chunk, temperature=0.7)
        np.testing.assert_allclose(np.asarray(got_t), np.where(np.asarray(mask), ref_t, 0.0), atol=2e-5)
        h, _ = model_lib.forward_hidden(params, x["inputs"], cfg, positions=x["positions"],
                                        segment_ids=x["segment_ids"])
        for t, lg in ((1.0, logits), (0.7, logits_t)):
            np.testing.assert_allclose(np.asarray(loss_lib.hidden_entropy(params, h, cfg, vocab_chunk=chunk,
                                                                          temperature=t)),
                                       np.asarray(rl_lib.token_entropy(lg)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        loss_lib.token_logprobs(params, batch, cfg, temperature=0.0)
    # jitted: eagerly, grad compiles every primitive of the chunk loop separately (seconds each)
    g_full = jax.jit(jax.grad(lambda p: loss_lib.token_logprobs(p, batch, cfg)[0].sum()))(params)
    g_chunk = jax.jit(jax.grad(lambda p: loss_lib.token_logprobs(p, batch, cfg, vocab_chunk=96)[0].sum()))(params)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)
