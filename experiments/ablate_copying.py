"""Ablation: how fast does the `tiny` model learn in-context copying, with and without smeared keys?

    python -m experiments.ablate_copying                  # ~4 min on a 2-core CPU
    python -m experiments.ablate_copying --steps=600 --vocab=2048

Trains the tiny preset (--model_vocab ids) from scratch on rows made of one random token sequence
repeated until the row is full (`<|endoftext|> s s s ...`, --period tokens per copy, ids drawn
from --vocab), once
with `smear_keys=True` (the preset) and once with `smear_keys=False`, same seed, same batches.
Every --eval_every steps it measures, on fresh sequences shown twice, the loss on the first copy
(nothing to copy from: about log(vocab)) and on the second (copyable). The gap is in-context
copying, the mechanism few-shot prompting rests on; the main job's phenomena table measures the
same thing on common words after pretraining on the synthetic corpus.

Prints a table and a final JSON line.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a script, so tests can import this module beside others."""
    flags.DEFINE_integer("steps", 300, "optimizer steps per variant")
    flags.DEFINE_integer("vocab", 300, "token ids drawn from [16, vocab)")
    flags.DEFINE_integer("model_vocab", 2048, "the model's vocabulary (the main job's); >= --vocab")
    flags.DEFINE_integer("period", 32, "tokens per copy of the random sequence")
    flags.DEFINE_integer("batch", 16, "rows per step")
    flags.DEFINE_integer("seq_len", 256, "tokens per row")
    flags.DEFINE_integer("eval_every", 50, "steps between copying evaluations")
    flags.DEFINE_float("lr", 3e-3, "peak learning rate")
    flags.DEFINE_integer("seed", 0, "params and data seed")



def repeated_rows(rng: np.random.Generator, n_rows: int, row_len: int, period: int, vocab: int,
                  bos: int = 0) -> np.ndarray:
    """int32 [n_rows, row_len]: BOS, then one random sequence of `period` ids repeated."""
    seq = rng.integers(16, vocab, size=(n_rows, period))
    reps = -(-(row_len - 1) // period)
    body = np.tile(seq, (1, reps))[:, : row_len - 1]
    return np.concatenate([np.full((n_rows, 1), bos), body], axis=1).astype(np.int32)


def train_and_probe(smear_keys: bool, *, steps: int, vocab: int, model_vocab: int, period: int, batch: int,
                    seq_len: int, eval_every: int, lr: float, seed: int, mesh: str = "data:-1") -> list[dict]:
    """Trains one variant (batch split over `mesh`); returns [{'step', 'loss', 'first_copy',
    'second_copy'}] per evaluation."""
    import jax

    from core import loss as loss_lib
    from core import model as model_lib
    from core import optim as optim_lib
    from core import sharding as sharding_lib
    from core import train as train_lib

    cfg = model_lib.get_config("tiny", vocab_size=model_vocab, max_seq_len=seq_len, smear_keys=smear_keys)
    mesh = sharding_lib.make_mesh(mesh)
    opt = optim_lib.make_optimizer(optim_lib.OptimConfig(lr=lr, warmup_steps=min(50, steps // 4),
                                                         total_steps=steps))
    state = train_lib.init_train_state(jax.random.PRNGKey(seed), cfg, opt, mesh)
    step_fn = train_lib.make_train_step(cfg, opt, mesh)
    score = jax.jit(lambda p, t: loss_lib.token_logprobs(p, {"tokens": t}, cfg)[0])
    data_rng, probe_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    probe = repeated_rows(probe_rng, 16, 2 * period + 1, period, vocab)

    def evaluate(step: int, loss: float) -> dict:
        nll = -np.asarray(score(state["params"], probe))
        # Skip each copy's first token: nothing in context predicts it.
        return {"step": step, "loss": loss, "first_copy": float(nll[:, 1:period].mean()),
                "second_copy": float(nll[:, period + 1:].mean())}

    rows = [evaluate(0, float("nan"))]
    for i in range(1, steps + 1):
        batch_np = {"tokens": repeated_rows(data_rng, batch, seq_len + 1, period, vocab)}
        state, metrics = step_fn(state, batch_np)
        if i % eval_every == 0 or i == steps:
            rows.append(evaluate(i, float(metrics["loss"])))
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name in ("steps", "period", "batch", "seq_len", "eval_every"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name} must be >= 1")
    if FLAGS.vocab <= 16:
        raise app.UsageError("--vocab must be > 16 (ids below 16 are kept out of the sequences)")
    if FLAGS.model_vocab < FLAGS.vocab:
        raise app.UsageError("--model_vocab must be >= --vocab")
    if 2 * FLAGS.period + 1 > FLAGS.seq_len:
        raise app.UsageError("--seq_len must hold two copies: seq_len >= 2 * period + 1")
    kw = dict(steps=FLAGS.steps, vocab=FLAGS.vocab, model_vocab=FLAGS.model_vocab, period=FLAGS.period, batch=FLAGS.batch,
              seq_len=FLAGS.seq_len, eval_every=FLAGS.eval_every, lr=FLAGS.lr, seed=FLAGS.seed)
    results, seconds = {}, {}
    for smear in (True, False):
        t = time.perf_counter()
        results[smear] = train_and_probe(smear, **kw)
        seconds[smear] = time.perf_counter() - t
    chance = math.log(FLAGS.vocab - 16)
    print(f"in-context copying of a random {FLAGS.period}-token sequence (ids < {FLAGS.vocab}, chance "
          f"{chance:.2f} nats): loss on the 2nd copy (1st copy)")
    print(f"{'step':>6}  {'smeared keys':>16}  {'plain keys':>16}")
    for a, b in zip(results[True], results[False]):
        print(f"{a['step']:>6}  {a['second_copy']:>7.2f} ({a['first_copy']:5.2f})  "
              f"{b['second_copy']:>7.2f} ({b['first_copy']:5.2f})")
    out = {"steps": FLAGS.steps, "vocab": FLAGS.vocab, "model_vocab": FLAGS.model_vocab, "period": FLAGS.period, "chance_nats": chance,
           "second_copy_smeared": results[True][-1]["second_copy"],
           "second_copy_plain": results[False][-1]["second_copy"],
           "first_copy_smeared": results[True][-1]["first_copy"],
           "first_copy_plain": results[False][-1]["first_copy"],
           "seconds_smeared": seconds[True], "seconds_plain": seconds[False]}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    define_flags()
    app.run(common.cli(main))
