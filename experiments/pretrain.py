"""Pretrains a base model: text -> tokens -> packed batches -> AdamW steps, resumable at any moment.

    python -m experiments.pretrain --preset=tiny --out_dir=runs/tiny --steps=600
    python -m experiments.pretrain --preset=tiny --out_dir=runs/tiny --steps=600 --resume   # after a crash
    python -m experiments.pretrain --data=parquet:/data/fineweb --tokens=2G --mesh=data:-1,fsdp:4 ...

Writes into --out_dir (see experiments/common.py for the layout): the tokenizer (trained on the
data if --tokenizer is not given), model_config.json, orbax checkpoints of params + optimizer
state + step + data-iterator state every --ckpt_every steps and at the end (asynchronous, last
--keep_checkpoints kept), metrics.jsonl (one line per step), evals.jsonl (validation bits per
byte every --eval_every steps), samples.txt (a few sampled continuations per eval) and PNG plots.

A run killed at any point (even during a save) continues with --resume from the last complete
checkpoint and logs exactly the losses the uninterrupted run would have: the data iterator is
restored to the batch after that checkpoint and metrics.jsonl is cut back to it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import signal
import time
from collections.abc import Sequence
from typing import Any, Optional

from absl import app, flags

from experiments import common

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on (the flags, as a value).

    Model: `preset` plus `model_overrides` (ModelConfig fields such as d_model, n_layers);
    vocab_size always comes from the tokenizer and max_seq_len grows to seq_len if needed.
    Length: `steps`, or `tokens` (a budget; steps = ceil(tokens / (batch_size * seq_len))).
    batch_size is global (all processes together).
    """

    out_dir: str
    preset: str = "tiny"
    model_overrides: tuple[tuple[str, Any], ...] = ()
    data: str = "synthetic"
    tokenizer: Optional[str] = None
    vocab_size: int = 4096
    tokenizer_bytes: int = 5_000_000
    seq_len: int = 256
    batch_size: int = 32
    steps: int = 0
    tokens: int = 0
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 50
    schedule: str = "cosine"
    final_lr_frac: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    z_loss: float = 0.0
    mesh: str = "data:-1"
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    val_docs: int = 512
    eval_samples: int = 3
    sample_tokens: int = 48
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    num_workers: int = 0
    debug_kill_at_step: int = -1

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(bool(self.out_dir), "--out_dir is required")
        need(self.seq_len >= 1, f"--seq_len must be >= 1, got {self.seq_len}")
        need(self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}")
        need(self.steps >= 0 and self.tokens >= 0, "--steps and --tokens must be >= 0")
        need((self.steps > 0) != (self.tokens > 0), "give exactly one of --steps or --tokens "
             f"(got --steps={self.steps}, --tokens={self.tokens})")
        need(self.log_every >= 1, f"--log_every must be >= 1, got {self.log_every}")
        need(self.eval_every >= 0, f"--eval_every must be >= 0 (0 = only at the end), got {self.eval_every}")
        need(self.ckpt_every >= 1, f"--ckpt_every must be >= 1, got {self.ckpt_every}")
        need(self.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.eval_batches >= 1, f"--eval_batches must be >= 1, got {self.eval_batches}")
        need(self.val_docs >= 1, f"--val_docs must be >= 1, got {self.val_docs}")

    @property
    def total_steps(self) -> int:
        if self.steps:
            return self.steps
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def optim_config(self):
        from core import optim

        total = self.total_steps
        return optim.OptimConfig(lr=self.lr, warmup_steps=min(self.warmup_steps, total), total_steps=total,
                                 schedule=self.schedule, final_lr_frac=self.final_lr_frac,
                                 weight_decay=self.weight_decay, clip_norm=self.clip_norm or None)

    def resume_fingerprint(self, model_cfg) -> dict:
        """What a checkpoint must agree with to be resumed by this config (the mesh may differ)."""
        return {
            "model_config": common.model_config_to_json(model_cfg),
            "run": {"seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
                    "data": self.data, "grad_accum": self.grad_accum, "z_loss": self.z_loss,
                    "optim": dataclasses.asdict(self.optim_config())},
        }


# ----------------------------------------------------------------------------- data


class _Slice(Sequence):
    """A contiguous range of a document source (picklable, for grain workers)."""

    def __init__(self, source: Sequence[str], start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + (i % len(self))]


def data_spec(flag_value: str) -> str:
    """--data value -> a data.readers.open_source spec. A bare path picks the reader from its
    suffix (.parquet / .jsonl / text); a missing path is an error naming the flag."""
    v = (flag_value or "").strip()
    if not v:
        raise ValueError("--data is empty; use 'synthetic' or a path")
    kinds = ("synthetic", "text", "jsonl", "parquet", "gsm8k")
    if v.split(":", 1)[0] in kinds or "+" in v:
        return v
    p = pathlib.Path(v)
    if not p.exists():
        raise ValueError(f"--data: path {p} does not exist (or use --data=synthetic)")
    names = [p.name] if p.is_file() else [f.name for f in p.rglob("*") if f.is_file()]
    if any(n.endswith(".parquet") for n in names):
        return f"parquet:{p}"
    if any(n.endswith(".jsonl") for n in names):
        return f"jsonl:{p}"
    return f"text:{p}"


def open_data(cfg: PretrainConfig) -> tuple[Sequence[str], Sequence[str]]:
    """(train documents, validation documents).

    Synthetic world: validation is fresh math/arithmetic/spelling text from another seed (the
    encyclopedia is the same world's, so holding some of it out would change how often each
    document is seen). Other sources: the last `val_docs` documents (at most 10%) are held out.
    """
    from data import readers

    source = readers.open_source(data_spec(cfg.data))
    n = len(source)
    if n == 0:
        raise ValueError(f"--data={cfg.data}: the corpus is empty")
    world = getattr(source, "world", None)
    if world is not None:
        from data import synthetic

        other = synthetic.Corpus(world, source.seed + 7919, source.max_bytes)
        val = []
        for i in range(len(other)):
            if other.edition_doc(i) is None:
                val.append(other[i])
                if len(val) >= cfg.val_docs:
                    break
        if not val:
            raise ValueError(f"--data={cfg.data}: the synthetic corpus has no room for validation text; "
                             f"raise its bytes=")
        return source, val
    if n < 2:
        raise ValueError(f"--data={cfg.data}: the corpus has only {n} document; need at least 2 "
                         f"(one is held out for validation)")
    n_val = max(1, min(cfg.val_docs, n // 10))
    return _Slice(source, 0, n - n_val), _Slice(source, n - n_val, n)


def _sample_text(docs: Sequence[str], max_bytes: int):
    total = 0
    for i in range(len(docs)):
        d = docs[i]
        yield d
        total += len(d.encode("utf-8"))
        if total >= max_bytes:
            return


def get_tokenizer(cfg: PretrainConfig, train_docs: Sequence[str]):
    """--tokenizer if given; else the run's own (resume); else a BPE trained on the data."""
    from core import tokenizer as tok_lib

    out_dir = pathlib.Path(cfg.out_dir)
    if cfg.tokenizer:
        p = pathlib.Path(cfg.tokenizer)
        if not p.exists():
            raise ValueError(f"--tokenizer: path {p} does not exist")
        return tok_lib.load(p)
    if (out_dir / common.TOKENIZER_FILE).exists():
        return tok_lib.load(out_dir / common.TOKENIZER_FILE)
    common.say(f"training a {cfg.vocab_size}-token BPE on {cfg.tokenizer_bytes / 1e6:.1f} MB of the data ...")
    t0 = time.time()
    tok = tok_lib.train_bpe(_sample_text(train_docs, cfg.tokenizer_bytes), cfg.vocab_size)
    common.say(f"  tokenizer trained in {time.time() - t0:.1f}s ({tok.vocab_size} tokens)")
    return tok


def _model_config(cfg: PretrainConfig, tokenizer):
    from core import model as model_lib

    base = model_lib.get_config(cfg.preset)
    overrides = dict(cfg.model_overrides)
    overrides["vocab_size"] = tokenizer.vocab_size
    overrides.setdefault("max_seq_len", max(base.max_seq_len, cfg.seq_len))
    return model_lib.get_config(cfg.preset, **overrides)


# ----------------------------------------------------------------------------- evaluation


def make_bpb_fn(model_cfg, mesh, token_bytes_v):
    """jit (params, batch) -> (sum of nats, sum of bytes) over a batch's scored targets."""
    import jax
    import jax.numpy as jnp

    from core import loss as loss_lib
    from core import model as model_lib
    from core import sharding as sharding_lib
    from core import train as train_lib

    tb = jnp.asarray(token_bytes_v)

    def fn(params, batch):
        x = train_lib.split_batch(batch)
        logits, _ = model_lib.forward(params, x["inputs"], model_cfg, positions=x["positions"],
                                      segment_ids=x["segment_ids"])
        return loss_lib.bits_per_byte_sums(logits, x["targets"], tb, x["mask"])

    return jax.jit(fn, in_shardings=(sharding_lib.model_shardings(model_cfg, mesh),
                                     sharding_lib.batch_sharding(mesh)),
                   out_shardings=sharding_lib.replicated(mesh))


def token_bytes(tokenizer, vocab_size: int):
    import numpy as np

    tb = np.zeros((vocab_size,), np.int32)
    lens = tokenizer.token_byte_lengths()
    tb[: len(lens)] = lens
    return tb


def sample_prompts(val_docs: Sequence[str], n: int) -> list[str]:
    """The first line (at most 40 characters) of the first n validation documents."""
    out = []
    for i in range(min(n, len(val_docs))):
        out.append(val_docs[i].split("\n", 1)[0][:40])
    return out


# ----------------------------------------------------------------------------- the run


def _log_record(step: int, m: dict, progress: common.Progress, t0: float) -> dict:
    rec = {"step": step}
    for k in ("loss", "lr", "grad_norm", "tokens"):
        if k in m:
            rec[k] = float(m[k])
    rec.update(tokens_per_s=progress.tokens_per_s, mfu=progress.mfu, step_time=progress.step_time,
               elapsed=time.time() - t0)
    return rec


def run(cfg: PretrainConfig) -> dict:
    """Trains per `cfg`; returns a summary {step, loss, val_bpb, wall_s, train_s, tokens_per_s, mfu,
    out_dir, n_params}."""
    import jax

    from core import checkpoint as ck
    from core import model as model_lib
    from core import optim as optim_lib
    from core import sharding as sharding_lib
    from core import train as train_lib
    from data import pipeline

    t_start = time.time()
    out_dir = pathlib.Path(cfg.out_dir)
    ckpt_dir = out_dir / common.CHECKPOINT_DIR
    # --- validate everything before any compile
    mesh = sharding_lib.make_mesh(cfg.mesh)
    div = sharding_lib.batch_divisor(mesh) * cfg.grad_accum
    if cfg.batch_size % div:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of grad_accum x data x fsdp "
                         f"= {div} for --mesh={cfg.mesh}")
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of the process count "
                         f"{jax.process_count()}")
    has_ckpt = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_ckpt and not cfg.resume:
        raise ValueError(f"--out_dir={out_dir} already holds checkpoints; pass --resume to continue "
                         f"that run or use a fresh --out_dir")
    train_docs, val_docs = open_data(cfg)
    tokenizer = get_tokenizer(cfg, train_docs)
    model_cfg = _model_config(cfg, tokenizer)
    if (out_dir / common.MODEL_CONFIG_FILE).exists() and has_ckpt:
        saved = common.load_json(out_dir / common.MODEL_CONFIG_FILE, "model config")
        ck.check_meta(saved, common.model_config_to_json(model_cfg),
                      where=f"--out_dir={out_dir} (model_config.json)")
    optimizer = optim_lib.make_optimizer(cfg.optim_config())
    fingerprint = cfg.resume_fingerprint(model_cfg)
    total = cfg.total_steps

    shardings = train_lib.state_shardings(model_cfg, optimizer, mesh)
    start_step, state, data_state = None, None, None
    if cfg.resume and has_ckpt:
        with ck.make_manager(ckpt_dir, read_only=True) as ro:
            start_step = ck.latest_step(ro)
            if start_step is not None:
                # The small JSON record first: a mismatched run fails before any array is read.
                ck.check_meta(ck.read_meta(ro, start_step), fingerprint,
                              where=f"checkpoint {ckpt_dir}/{start_step}")
                target = ck.abstract_state(jax.eval_shape(
                    lambda: train_lib.init_train_state(jax.random.PRNGKey(0), model_cfg, optimizer, mesh)),
                    shardings)
                state, data_state, _ = ck.restore(ro, target, step=start_step, expected_meta=fingerprint)
                if data_state is None:
                    raise ValueError(f"checkpoint {ckpt_dir}/{start_step} has no data-iterator state; "
                                     f"cannot resume exactly")

    if jax.process_index() == 0:
        tokenizer.save(out_dir / common.TOKENIZER_FILE)
        common.save_json(out_dir / common.MODEL_CONFIG_FILE, common.model_config_to_json(model_cfg))
        common.save_json(out_dir / common.RUN_CONFIG_FILE, {**dataclasses.asdict(cfg), "total_steps": total})

    per_process_batch = cfg.batch_size // jax.process_count()
    it = pipeline.make_train_iterator(train_docs, tokenizer, cfg.seq_len, per_process_batch, seed=cfg.seed,
                                      num_workers=cfg.num_workers)
    if start_step is not None:
        it.set_state(data_state)
        common.say(f"resumed from {ckpt_dir}/{start_step}")
    else:
        if cfg.resume:
            common.say(f"--resume: no checkpoint in {ckpt_dir} yet; starting from scratch")
        start_step = 0
        state = train_lib.init_train_state(jax.random.PRNGKey(cfg.seed), model_cfg, optimizer, mesh)
    is_main = jax.process_index() == 0
    common.truncate_jsonl(out_dir / common.METRICS_FILE, start_step)
    common.truncate_jsonl(out_dir / common.EVALS_FILE, start_step)

    # Validation batches: fixed once, so every eval scores the same tokens.
    val_it = pipeline.make_train_iterator(val_docs, tokenizer, cfg.seq_len, per_process_batch, seed=0,
                                          shuffle=False)
    val_batches = [next(val_it) for _ in range(cfg.eval_batches)]
    val_it.close()
    train_step = train_lib.make_train_step(model_cfg, optimizer, mesh, train_lib.make_lm_loss(cfg.z_loss),
                                           grad_accum=cfg.grad_accum)
    bpb_fn = make_bpb_fn(model_cfg, mesh, token_bytes(tokenizer, model_cfg.vocab_size))
    prompts = sample_prompts(val_docs, cfg.eval_samples) if cfg.eval_samples else []

    n_params = model_lib.count_params(jax.eval_shape(lambda: model_lib.init_params(jax.random.PRNGKey(0), model_cfg)))
    peak, peak_desc = common.peak_flops_total(mesh.devices.flatten().tolist())
    progress = common.Progress(total, cfg.batch_size * cfg.seq_len,
                               model_lib.flops_per_token(model_cfg, cfg.seq_len), peak, start_step)
    common.say(f"model: {cfg.preset} {n_params / 1e6:.2f}M params, vocab {model_cfg.vocab_size}, "
               f"d_model {model_cfg.d_model}, layers {model_cfg.n_layers} | mesh {dict(mesh.shape)} on "
               f"{peak_desc} | batch {cfg.batch_size} x {cfg.seq_len} tokens | steps {start_step}->{total}")

    metrics_log = common.MetricsLogger(out_dir / common.METRICS_FILE, enabled=is_main)
    evals_log = common.MetricsLogger(out_dir / common.EVALS_FILE, enabled=is_main)
    last_eval: dict = {}

    def evaluate(step: int) -> dict:
        nats = nbytes = 0.0
        for b in val_batches:
            n, nb = jax.device_get(bpb_fn(state["params"], sharding_lib.shard_batch(b, mesh)))
            nats, nbytes = nats + float(n), nbytes + float(nb)
        rec = {"step": step, "val_bpb": nats / (math.log(2) * max(nbytes, 1.0)),
               "val_loss_per_byte_nats": nats / max(nbytes, 1.0)}
        samples = []
        if prompts:
            samples = common.sample_texts(state["params"], model_cfg, tokenizer, prompts, mesh=mesh,
                                          max_new_tokens=cfg.sample_tokens, temperature=1.0, top_k=50,
                                          seed=cfg.seed * 1000 + step)
            if is_main:
                with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
                    f.write(f"=== step {step}\n")
                    for p, s in zip(prompts, samples):
                        f.write(f"--- {p!r}\n{p}{s[0]}\n")
        evals_log.log(rec)
        common.say(f"eval step {step}: val bits/byte {rec['val_bpb']:.4f}")
        for p, s in zip(prompts, samples):
            common.say(f"  sample | {(p + s[0]).strip()[:160]!r}")
        progress.pause()
        return rec

    def plots():
        if not is_main:
            return
        recs = common.read_jsonl(out_dir / common.METRICS_FILE)
        common.plot_metric(recs, "loss", out_dir / "plots" / "loss.png", title="train loss (nats/token)",
                           smooth=max(1, len(recs) // 50))
        common.plot_metric(recs, "lr", out_dir / "plots" / "lr.png", title="learning rate")
        common.plot_metric(common.read_jsonl(out_dir / common.EVALS_FILE), "val_bpb",
                           out_dir / "plots" / "bpb.png", title="validation bits per byte")

    saved_steps = [start_step]

    def save(step: int, force: bool = False):
        if ck.save(mngr, step, state, data_state=it.get_state(), meta=fingerprint, force=force):
            saved_steps.append(step)
        progress.pause()

    # --- the loop. Step s's metrics are fetched after step s+1 is dispatched (the host never
    # waits for the device on ordinary steps); evals, saves and the debug kill flush first.
    step = start_step
    pending = None
    t_loop = time.time()

    def flush(p):
        step_p, m = p
        m = jax.device_get(m)
        rec = _log_record(step_p, m, progress, t_start)
        metrics_log.log(rec)
        if step_p % cfg.log_every == 0 or step_p in (start_step + 1, total):
            common.say(progress.line(step_p, rec))
        return rec

    last_rec: dict = {}
    mngr = ck.make_manager(ckpt_dir, max_to_keep=cfg.keep_checkpoints, save_interval_steps=cfg.ckpt_every,
                           async_save=cfg.async_checkpoint)
    try:
        while step < total:
            batch = sharding_lib.shard_batch(next(it), mesh)
            state, m = train_step(state, batch)
            step += 1
            if pending is not None:
                last_rec = flush(pending)
            pending = (step, m)
            is_save = step % cfg.ckpt_every == 0
            is_eval = cfg.eval_every and step % cfg.eval_every == 0
            if is_save or is_eval or step == total or step == cfg.debug_kill_at_step or step % cfg.log_every == 0:
                jax.block_until_ready(m)
                progress.tick()
                last_rec = flush(pending)
                pending = None
            else:
                progress.tick()
            if is_eval and step != total:
                last_eval = evaluate(step)
                plots()
            if is_save:
                save(step)
            if step == cfg.debug_kill_at_step:
                common.say(f"DEBUG: SIGKILL at step {step}"
                           + (" while its checkpoint is being written" if is_save else ""))
                os.kill(os.getpid(), signal.SIGKILL)
        if pending is not None:
            last_rec = flush(pending)
        if saved_steps[-1] != total:
            save(total, force=True)
        last_eval = evaluate(total)
        mngr.wait_until_finished()
    finally:
        metrics_log.close()
        evals_log.close()
        it.close()
        mngr.close()
    plots()
    wall = time.time() - t_start
    train_s = time.time() - t_loop
    summary = {"step": step, "loss": last_rec.get("loss"), "val_bpb": last_eval.get("val_bpb"),
               "wall_s": wall, "train_s": train_s,
               # steady-state training rate (compiles, evals and saves excluded)
               "tokens_per_s": progress.tokens_per_s, "mfu": progress.mfu,
               "out_dir": str(out_dir), "n_params": n_params}
    common.say(f"done: step {step}, loss {summary['loss']}, val bits/byte {summary['val_bpb']:.4f}, "
               f"{common.format_duration(wall)} wall")
    return summary


# ----------------------------------------------------------------------------- flags

_MODEL_FLAGS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


def define_flags() -> None:
    common.define_common_flags()
    f = flags
    f.DEFINE_string("data", "synthetic", "'synthetic[:seed=,entities=,bytes=]', a reader spec "
                    "(text:/jsonl:/parquet:PATH) or a plain path")
    f.DEFINE_string("tokenizer", None, "tokenizer file/dir; default: the run's own, else train one")
    f.DEFINE_integer("vocab_size", 4096, "vocabulary of the tokenizer trained when none is given")
    f.DEFINE_string("tokenizer_bytes", "5M", "text used to train that tokenizer")
    for name in _MODEL_FLAGS:
        f.DEFINE_integer(name, 0, f"override the preset's {name} (0 = keep)")
    f.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "override the preset's matmul dtype")
    f.DEFINE_string("model_overrides", "", "more ModelConfig overrides, e.g. 'qk_norm=false,logit_softcap=none'")
    f.DEFINE_integer("seq_len", 256, "tokens per training row")
    f.DEFINE_integer("batch_size", 32, "global batch (rows)")
    f.DEFINE_integer("steps", 0, "optimizer steps (or use --tokens)")
    f.DEFINE_string("tokens", "0", "token budget instead of --steps, e.g. 20M")
    f.DEFINE_integer("grad_accum", 1, "microbatches per step")
    f.DEFINE_float("lr", 3e-3, "peak learning rate")
    f.DEFINE_integer("warmup_steps", 50, "linear warmup steps")
    f.DEFINE_enum("schedule", "cosine", ["cosine", "linear", "constant"], "lr schedule after warmup")
    f.DEFINE_float("final_lr_frac", 0.1, "final lr as a fraction of --lr")
    f.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only)")
    f.DEFINE_float("clip_norm", 1.0, "global gradient-norm clip (0 = off)")
    f.DEFINE_float("z_loss", 0.0, "z-loss coefficient")
    f.DEFINE_bool("resume", False, "continue from the last complete checkpoint in --out_dir")
    f.DEFINE_integer("log_every", 10, "print a progress line every N steps")
    f.DEFINE_integer("eval_every", 100, "validation bits per byte + samples every N steps (0 = end only)")
    f.DEFINE_integer("eval_batches", 8, "validation batches per eval")
    f.DEFINE_integer("val_docs", 512, "documents held out for validation")
    f.DEFINE_integer("eval_samples", 3, "sampled continuations printed per eval")
    f.DEFINE_integer("sample_tokens", 48, "tokens per sampled continuation")
    f.DEFINE_integer("ckpt_every", 100, "checkpoint every N steps (and at the end)")
    f.DEFINE_integer("keep_checkpoints", 3, "keep the last K checkpoints")
    f.DEFINE_bool("async_checkpoint", True, "write checkpoints in the background")
    f.DEFINE_integer("num_workers", 0, "grain worker processes for tokenizing")
    f.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
    f.DEFINE_integer("debug_kill_at_step", -1, "testing: SIGKILL this process right after step N "
                     "(during its checkpoint write if N is a checkpoint step)")


def parse_model_overrides(text: str) -> tuple[tuple[str, Any], ...]:
    """'qk_norm=false,logit_softcap=none,rope_theta=1e4' -> typed (field, value) pairs; values are
    parsed by the type of the ModelConfig field's default (none/null -> None)."""
    from core import model as model_lib

    defaults = {f.name: f.default for f in dataclasses.fields(model_lib.ModelConfig)}
    out = []
    for item in (t.strip() for t in (text or "").split(",")):
        if not item:
            continue
        key, eq, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or key not in defaults:
            raise ValueError(f"--model_overrides: {item!r} is not FIELD=VALUE with FIELD one of {sorted(defaults)}")
        if val.lower() in ("none", "null"):
            out.append((key, None))
        elif isinstance(defaults[key], bool):
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--model_overrides: {key} takes true/false, got {val!r}")
            out.append((key, val.lower() in ("true", "1")))
        elif isinstance(defaults[key], int):
            out.append((key, int(val)))
        elif isinstance(defaults[key], float):
            out.append((key, float(val)))
        elif defaults[key] is None:  # Optional numbers (n_kv_heads, head_dim, d_ff, logit_softcap)
            try:
                out.append((key, int(val)))
            except ValueError:
                out.append((key, float(val)))
        else:
            out.append((key, val))
    return tuple(out)


def config_from_flags(FLAGS) -> PretrainConfig:
    from data import readers

    overrides = tuple((n, getattr(FLAGS, n)) for n in _MODEL_FLAGS if getattr(FLAGS, n))
    if FLAGS.compute_dtype:
        overrides += (("compute_dtype", FLAGS.compute_dtype),)
    overrides += parse_model_overrides(FLAGS.model_overrides)
    return PretrainConfig(
        out_dir=FLAGS.out_dir, preset=FLAGS.preset, model_overrides=overrides, data=FLAGS.data,
        tokenizer=FLAGS.tokenizer, vocab_size=FLAGS.vocab_size,
        tokenizer_bytes=readers.parse_bytes(FLAGS.tokenizer_bytes), seq_len=FLAGS.seq_len,
        batch_size=FLAGS.batch_size, steps=FLAGS.steps, tokens=readers.parse_bytes(FLAGS.tokens),
        grad_accum=FLAGS.grad_accum, lr=FLAGS.lr, warmup_steps=FLAGS.warmup_steps, schedule=FLAGS.schedule,
        final_lr_frac=FLAGS.final_lr_frac, weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm,
        z_loss=FLAGS.z_loss, mesh=FLAGS.mesh, seed=FLAGS.seed, resume=FLAGS.resume,
        log_every=FLAGS.log_every, eval_every=FLAGS.eval_every, eval_batches=FLAGS.eval_batches,
        val_docs=FLAGS.val_docs, eval_samples=FLAGS.eval_samples, sample_tokens=FLAGS.sample_tokens,
        ckpt_every=FLAGS.ckpt_every, keep_checkpoints=FLAGS.keep_checkpoints,
        async_checkpoint=FLAGS.async_checkpoint, num_workers=FLAGS.num_workers,
        debug_kill_at_step=FLAGS.debug_kill_at_step)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    common.quiet_logging()
    from core import sharding as sharding_lib

    sharding_lib.initialize_distributed(FLAGS.distributed)
    run(config_from_flags(FLAGS))


if __name__ == "__main__":
    define_flags()
    app.run(main)
