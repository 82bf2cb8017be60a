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
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Optional

from absl import app, flags

from experiments import common, options, stage

# ----------------------------------------------------------------------------- config


def _bytes(text: str) -> int:
    from data import readers

    return readers.parse_bytes(text)


def _overrides(text: str):
    return parse_model_overrides(text)


_f = options.field


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on; its fields are the script's flags.

    Model: `preset`, then the size fields (0 = the preset's) and `model_overrides` (ModelConfig
    fields such as qk_norm=false); vocab_size always comes from the tokenizer and max_seq_len
    grows to seq_len if needed. Length: `steps`, or `tokens` (a budget; steps = ceil(tokens /
    (batch_size * seq_len))). batch_size is global (all processes together).
    """

    out_dir: Optional[str] = _f(None, "run directory: tokenizer, checkpoints, metrics, plots")
    preset: str = _f("tiny", "model size preset (core.model.PRESETS)")
    d_model: int = _f(0, "override the preset's d_model (0 = keep)")
    n_layers: int = _f(0, "override the preset's n_layers (0 = keep)")
    n_heads: int = _f(0, "override the preset's n_heads (0 = keep)")
    n_kv_heads: int = _f(0, "override the preset's n_kv_heads (0 = keep)")
    d_ff: int = _f(0, "override the preset's d_ff (0 = keep)")
    compute_dtype: Optional[str] = _f(None, "override the preset's matmul dtype (float32 | bfloat16)")
    model_overrides: tuple = _f((), "more ModelConfig overrides, e.g. 'qk_norm=false,logit_softcap=none'",
                                parse=_overrides)
    data: str = _f("synthetic", "'synthetic[:seed=,entities=,bytes=]', a reader spec "
                   "(text:/jsonl:/parquet:PATH) or a plain path")
    tokenizer: Optional[str] = _f(None, "tokenizer file/dir; default: the run's own, else train one")
    vocab_size: int = _f(4096, "vocabulary of the tokenizer trained when none is given")
    tokenizer_bytes: int = _f(5_000_000, "text used to train that tokenizer, e.g. 5M", parse=_bytes)
    seq_len: int = _f(256, "tokens per training row")
    batch_size: int = _f(32, "global batch (rows)")
    steps: int = _f(0, "optimizer steps (or use --tokens)")
    tokens: int = _f(0, "token budget instead of --steps, e.g. 20M", parse=_bytes)
    grad_accum: int = _f(1, "microbatches per step")
    lr: float = _f(3e-3, "peak learning rate")
    warmup_steps: int = _f(50, "linear warmup steps")
    schedule: str = _f("cosine", "lr schedule after warmup", choices=("cosine", "linear", "constant"))
    final_lr_frac: float = _f(0.1, "final lr as a fraction of --lr")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices only)")
    clip_norm: float = _f(1.0, "global gradient-norm clip (0 = off)")
    z_loss: float = _f(0.0, "z-loss coefficient")
    mesh: str = _f("data:-1", "device mesh, e.g. 'data:2,fsdp:2,tensor:2'; -1 = the rest")
    seed: int = _f(0, "seed for params, data order and sampling")
    resume: bool = _f(False, "continue from the last complete checkpoint in --out_dir")
    log_every: int = _f(10, "print a progress line every N steps")
    eval_every: int = _f(100, "validation bits per byte + samples every N steps (0 = end only)")
    eval_batches: int = _f(8, "validation batches per eval")
    val_docs: int = _f(512, "documents held out for validation")
    eval_samples: int = _f(3, "sampled continuations printed per eval")
    sample_tokens: int = _f(48, "tokens per sampled continuation")
    ckpt_every: int = _f(100, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(3, "keep the last K checkpoints")
    async_checkpoint: bool = _f(True, "write checkpoints in the background")
    num_workers: int = _f(0, "grain worker processes for tokenizing")
    debug_kill_at_step: int = _f(-1, "testing: SIGKILL this process right after step N "
                                 "(during its checkpoint write if N is a checkpoint step)")

    def __post_init__(self):
        need = options.need
        need(bool(self.out_dir), "--out_dir is required")
        need(self.lr >= 0, f"--lr must be >= 0, got {self.lr}")
        need(self.grad_accum >= 1, f"--grad_accum must be >= 1, got {self.grad_accum}")
        for name in _MODEL_FLAGS:
            need(getattr(self, name) >= 0, f"--{name} must be >= 0 (0 = the preset's), got {getattr(self, name)}")
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
    def all_model_overrides(self) -> tuple:
        """The size fields, compute_dtype and model_overrides as (field, value) pairs."""
        out = tuple((n, getattr(self, n)) for n in _MODEL_FLAGS if getattr(self, n))
        if self.compute_dtype:
            out += (("compute_dtype", self.compute_dtype),)
        return out + tuple(self.model_overrides)

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
    overrides = dict(cfg.all_model_overrides)
    overrides["vocab_size"] = tokenizer.vocab_size
    overrides.setdefault("max_seq_len", max(base.max_seq_len, cfg.seq_len))
    return model_lib.get_config(cfg.preset, **overrides)


# ----------------------------------------------------------------------------- evaluation


def make_bpb_fn(model_cfg, mesh, token_bytes_v):
    """jit (params, batch) -> (sum of nats, sum of bytes) over a batch's scored targets."""
    import jax
    import jax.numpy as jnp

    from core import loss as loss_lib
    from core import sharding as sharding_lib

    tb = jnp.asarray(token_bytes_v)

    def fn(params, batch):
        logp, mask = loss_lib.token_logprobs(params, batch, model_cfg)
        return loss_lib.bits_per_byte_from_logprobs(logp, batch["tokens"][:, 1:], tb, mask)

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


def _log_record(step: int, m: dict) -> dict:
    return {k: float(m[k]) for k in ("loss", "lr", "grad_norm", "tokens") if k in m}


def check_config(cfg: PretrainConfig):
    """Every check that needs no data and no compile: mesh, batch divisibility, the run
    directory. Returns the mesh. Nothing is written before it passes."""
    import jax

    from core import model as model_lib
    from core import sharding as sharding_lib

    if cfg.preset not in model_lib.PRESETS:
        raise ValueError(f"--preset={cfg.preset!r} is not one of {sorted(model_lib.PRESETS)}")
    mesh = sharding_lib.make_mesh(cfg.mesh)
    div = sharding_lib.batch_divisor(mesh) * cfg.grad_accum
    if cfg.batch_size % div:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of grad_accum x data x fsdp "
                         f"= {div} for --mesh={cfg.mesh}")
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of the process count "
                         f"{jax.process_count()}")
    stage.check_fresh_or_resume(cfg.out_dir, cfg.resume)
    return mesh


def run(cfg: PretrainConfig) -> dict:
    """Trains per `cfg`; returns a summary {step, loss, val_bpb, wall_s, train_s, tokens_per_s, mfu,
    out_dir, n_params, interrupted}."""
    import jax

    from core import checkpoint as ck
    from core import loop
    from core import model as model_lib
    from core import optim as optim_lib
    from core import sharding as sharding_lib
    from core import train as train_lib
    from data import pipeline

    t_start = time.time()
    out_dir = pathlib.Path(cfg.out_dir)
    # --- validate everything before any compile or write
    mesh = check_config(cfg)
    has_ckpt = stage.has_checkpoints(out_dir)
    train_docs, val_docs = open_data(cfg)
    tokenizer = get_tokenizer(cfg, train_docs)
    model_cfg = _model_config(cfg, tokenizer)
    if (out_dir / common.MODEL_CONFIG_FILE).exists() and has_ckpt:
        saved = common.load_json(out_dir / common.MODEL_CONFIG_FILE, "model config")
        ck.check_meta(saved, common.model_config_to_json(model_cfg),
                      where=f"--out_dir={out_dir} (model_config.json)")
        common.check_tokenizer_belongs(out_dir, tokenizer)
    optimizer = optim_lib.make_optimizer(cfg.optim_config())
    fingerprint = cfg.resume_fingerprint(model_cfg)
    total = cfg.total_steps
    is_main = jax.process_index() == 0
    if is_main:
        tokenizer.save(out_dir / common.TOKENIZER_FILE)
        common.save_json(out_dir / common.MODEL_CONFIG_FILE, common.model_config_to_json(model_cfg))
        options.save_config(cfg, out_dir, total_steps=total, stage="pretrain",
                            tokenizer_sha256=common.tokenizer_sha256(tokenizer))

    per_process_batch = cfg.batch_size // jax.process_count()
    it = pipeline.make_train_iterator(train_docs, tokenizer, cfg.seq_len, per_process_batch, seed=cfg.seed,
                                      num_workers=cfg.num_workers)
    # Validation batches: fixed once, so every eval scores the same tokens.
    val_it = pipeline.make_train_iterator(val_docs, tokenizer, cfg.seq_len, per_process_batch, seed=0,
                                          shuffle=False)
    val_batches = [next(val_it) for _ in range(cfg.eval_batches)]
    val_it.close()
    train_step = train_lib.make_train_step(model_cfg, optimizer, mesh, train_lib.make_lm_loss(cfg.z_loss),
                                           grad_accum=cfg.grad_accum)
    bpb_fn = make_bpb_fn(model_cfg, mesh, token_bytes(tokenizer, model_cfg.vocab_size))
    prompts = sample_prompts(val_docs, cfg.eval_samples) if cfg.eval_samples else []

    n_params = model_lib.count_params(model_lib.param_shapes(model_cfg))
    peak, peak_desc = common.peak_flops_total(mesh.devices.flatten().tolist())
    progress = common.Progress(total, cfg.batch_size * cfg.seq_len,
                               model_lib.flops_per_token(model_cfg, cfg.seq_len), peak)
    common.say(f"model: {cfg.preset} {n_params / 1e6:.2f}M params, vocab {model_cfg.vocab_size}, "
               f"d_model {model_cfg.d_model}, layers {model_cfg.n_layers} | mesh {dict(mesh.shape)} on "
               f"{peak_desc} | batch {cfg.batch_size} x {cfg.seq_len} tokens | {total} steps")

    def evaluate(step: int, state) -> dict:
        nats = nbytes = 0.0
        for b in val_batches:
            n, nb = jax.device_get(bpb_fn(state["params"], sharding_lib.shard_batch(b, mesh)))
            nats, nbytes = nats + float(n), nbytes + float(nb)
        rec = {"val_bpb": nats / (math.log(2) * max(nbytes, 1.0)), "val_loss_per_byte_nats": nats / max(nbytes, 1.0)}
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
        common.say(f"eval step {step}: val bits/byte {rec['val_bpb']:.4f}")
        for p, s in zip(prompts, samples):
            common.say(f"  sample | {(p + s[0]).strip()[:160]!r}")
        return rec

    shardings = train_lib.state_shardings(model_cfg, optimizer, mesh)
    io = stage.StageIO(out_dir, fingerprint, cfg.keep_checkpoints, cfg.async_checkpoint, cfg.resume,
                       cfg.debug_kill_at_step)
    loop_cfg = loop.LoopConfig(total_steps=total, log_every=cfg.log_every, eval_every=cfg.eval_every,
                               save_every=cfg.ckpt_every)
    t_loop = time.time()
    try:
        result = stage.train(
            train_step, lambda: train_lib.init_train_state(jax.random.PRNGKey(cfg.seed), model_cfg, optimizer, mesh),
            lambda: ck.abstract_state(jax.eval_shape(
                lambda: train_lib.init_train_state(jax.random.PRNGKey(0), model_cfg, optimizer, mesh)), shardings),
            it, loop_cfg, io, mesh=mesh, progress=progress, evaluate=evaluate, record=_log_record, t_start=t_start)
    finally:
        it.close()
    plots(out_dir, is_main)
    return _summary(result, out_dir, t_start, t_loop, progress, n_params)


def _summary(result, out_dir: pathlib.Path, t_start: float, t_loop: float, progress, n_params: int) -> dict:
    """The run's summary; for a run resumed after it had finished, the last logged figures."""
    wall, train_s = time.time() - t_start, time.time() - t_loop
    loss = result.last_metrics.get("loss")
    val = result.last_eval.get("val_bpb")
    if loss is None:
        recs = common.read_jsonl(out_dir / common.METRICS_FILE)
        loss = recs[-1].get("loss") if recs else None
    if val is None:
        evs = common.read_jsonl(out_dir / common.EVALS_FILE)
        val = evs[-1].get("val_bpb") if evs else None
    summary = {"step": result.step, "loss": None if loss is None else float(loss), "val_bpb": val,
               "wall_s": wall, "train_s": train_s,
               # steady-state training rate (compiles, evals and saves excluded)
               "tokens_per_s": progress.tokens_per_s, "mfu": progress.mfu,
               "out_dir": str(out_dir), "n_params": n_params, "interrupted": result.interrupted}
    if result.start_step == result.step and not result.interrupted:
        common.say(f"{out_dir}: already trained to step {result.step}; nothing to do")
    else:
        common.say(f"done: step {result.step}, loss {summary['loss']}, val bits/byte "
                   f"{'-' if val is None else f'{val:.4f}'}, {common.format_duration(wall)} wall")
    return summary


def plots(out_dir: pathlib.Path, is_main: bool = True) -> None:
    if not is_main:
        return
    recs = common.read_jsonl(out_dir / common.METRICS_FILE)
    common.plot_metric(recs, "loss", out_dir / "plots" / "loss.png", title="train loss (nats/token)",
                       smooth=max(1, len(recs) // 50))
    common.plot_metric(recs, "lr", out_dir / "plots" / "lr.png", title="learning rate")
    common.plot_metric(common.read_jsonl(out_dir / common.EVALS_FILE), "val_bpb",
                       out_dir / "plots" / "bpb.png", title="validation bits per byte")


# ----------------------------------------------------------------------------- flags

_MODEL_FLAGS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


def define_flags() -> None:
    options.define_flags(PretrainConfig)
    if "distributed" not in flags.FLAGS:
        flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")


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
    return options.from_flags(PretrainConfig, FLAGS)


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
    app.run(common.cli(main))
