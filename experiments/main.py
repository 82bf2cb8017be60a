"""The README's main job: a tokenizer and a `tiny` base model trained on the synthetic world on a
2-core laptop CPU in 6-12 minutes, then samples and the table of base-model phenomena.

    python -m experiments.main                          # -> runs/main
    python -m experiments.main --out_dir=/tmp/m --steps=500 --corpus_bytes=1M   # half the time

Stages (each is also its own script):
  1. tokenizer  core.tokenizer.train_bpe on a sample of the synthetic corpus
  2. pretrain   experiments/pretrain.py (checkpoints, metrics.jsonl, plots, samples.txt)
  3. sample     experiments/sample.py on a few prompts
  4. evaluate   experiments/evaluate.py phenomena mode (phenomena.md)
and writes out_dir/report.md with the timings and the table.

The world is small (--entities) and the run makes a few passes over its corpus, so the table
reports how often each document was seen (copies x passes): articles of famous entities (16-32
copies) are memorised, articles with one copy are not.
"""
from __future__ import annotations

import pathlib
import time

from absl import app, flags

from experiments import common

# Tuned for a 2-core CPU (~12k tokens/s for `tiny` on an idle machine, ~5k on a loaded one): ~4M
# training tokens, ~6 passes over a 2 MB corpus whose encyclopedia (300 entities) is an eighth of
# it. In-context learning (few-shot rows of the table) appears only in the second half of the
# 1000 steps; 500 steps still show regurgitation and facts by frequency.
_DEFAULTS = dict(entities=300, corpus_bytes="2M", vocab_size=2048, tokenizer_bytes="1M", seq_len=256,
                 batch_size=16, steps=1000, lr=3e-3, warmup_steps=50)


def define_flags() -> None:
    common.define_common_flags(default_out_dir="runs/main")
    flags.DEFINE_integer("entities", _DEFAULTS["entities"], "entities in the synthetic world")
    flags.DEFINE_string("corpus_bytes", _DEFAULTS["corpus_bytes"], "size of one pass over the corpus")
    flags.DEFINE_integer("vocab_size", _DEFAULTS["vocab_size"], "BPE vocabulary (with special tokens)")
    flags.DEFINE_string("tokenizer_bytes", _DEFAULTS["tokenizer_bytes"], "text the tokenizer is trained on")
    flags.DEFINE_integer("seq_len", _DEFAULTS["seq_len"], "tokens per row")
    flags.DEFINE_integer("batch_size", _DEFAULTS["batch_size"], "rows per step")
    flags.DEFINE_integer("steps", _DEFAULTS["steps"], "optimizer steps")
    flags.DEFINE_float("lr", _DEFAULTS["lr"], "peak learning rate")
    flags.DEFINE_bool("resume", False, "continue an interrupted main job in --out_dir")


def run(out_dir: str, *, entities: int, corpus_bytes: str, vocab_size: int, tokenizer_bytes: str, seq_len: int,
        batch_size: int, steps: int, lr: float, seed: int = 0, preset: str = "tiny", mesh: str = "data:-1",
        resume: bool = False) -> dict:
    from core import tokenizer as tok_lib
    from data import readers
    from experiments import evaluate, pretrain, sample

    t0 = time.time()
    out = pathlib.Path(out_dir)
    data = f"synthetic:seed={seed},entities={entities},bytes={corpus_bytes}"
    timings = {}

    # 1. tokenizer
    tok_file = out / common.TOKENIZER_FILE
    if resume and tok_file.exists():
        common.say(f"[1/4] tokenizer: reusing {tok_file}")
    else:
        docs = readers.open_source(data)
        common.say(f"[1/4] tokenizer: training a {vocab_size}-token BPE on {tokenizer_bytes} of {data}")
        tok = tok_lib.train_bpe(pretrain._sample_text(docs, readers.parse_bytes(tokenizer_bytes)), vocab_size)
        tok.save(tok_file)
        sample_text = docs[0]
        ids = tok.encode(sample_text)
        common.say(f"      {tok.vocab_size} tokens; '{sample_text[:40]!s}...' -> {len(ids)} tokens, "
                   f"{len(sample_text.encode()) / max(len(ids), 1):.2f} bytes/token")
    timings["tokenizer"] = time.time() - t0

    # 2. pretraining
    t1 = time.time()
    common.say(f"[2/4] pretraining the {preset} model for {steps} steps of {batch_size} x {seq_len} tokens")
    cfg = pretrain.PretrainConfig(out_dir=str(out), preset=preset, data=data, tokenizer=str(tok_file),
                                  seq_len=seq_len, batch_size=batch_size, steps=steps, lr=lr,
                                  warmup_steps=_DEFAULTS["warmup_steps"], mesh=mesh, seed=seed, resume=resume,
                                  eval_every=max(steps // 4, 1), ckpt_every=max(steps // 4, 1), log_every=25,
                                  eval_batches=4, eval_samples=2)
    summary = pretrain.run(cfg)
    timings["pretrain"] = time.time() - t1

    # 3. samples
    t2 = time.time()
    from core import sharding as sharding_lib

    loaded = common.load_model(out, mesh=sharding_lib.make_mesh(mesh))
    world = readers.open_source(data).world
    famous = [e.name for e in world.entities if e.tier == "famous"][:2]
    once = [e.name for e in world.entities if e.tier == "once"][:1]
    prompts = tuple(famous + once + ["Question: Emily has 3 apples", "The word \"banana\""])
    common.say(f"[3/4] samples (temperature 0.8, top-k 50) from step {loaded[3]}")
    texts = sample.run(sample.SampleConfig(out_dir=str(out), prompts=prompts, n_samples=1, temperature=0.8,
                                           top_k=50, max_new_tokens=64, seed=seed, mesh=mesh),
                       loaded=loaded, verbose=False)
    sample_lines = []
    for p, s in zip(prompts, texts):
        sample_lines.append(f"--- {p!r}\n{p}{s[0].rstrip()}")
    common.say("\n".join(sample_lines))
    timings["sample"] = time.time() - t2

    # 4. phenomena
    t3 = time.time()
    common.say("[4/4] base-model phenomena")
    rows = evaluate.run(evaluate.PhenomenaConfig(out_dir=str(out), seed=seed, mesh=mesh), loaded=loaded)
    timings["phenomena"] = time.time() - t3
    timings["total"] = time.time() - t0

    table = evaluate.format_table(rows)
    report = [
        "# zipchat main job", "",
        f"tiny base model on the synthetic world ({entities} entities, {corpus_bytes} corpus), "
        f"{summary['n_params'] / 1e6:.2f}M params, {steps} steps x {batch_size} x {seq_len} tokens.", "",
        f"- final train loss {summary['loss']:.3f} nats/token, validation {summary['val_bpb']:.3f} bits/byte",
        f"- training throughput {summary['tokens_per_s']:.0f} tokens/s",
        "- wall time: " + ", ".join(f"{k} {common.format_duration(v)}" for k, v in timings.items()), "",
        "## samples", "", "```", *sample_lines, "```", "", "## phenomena", "", table, "",
    ]
    (out / "report.md").write_text("\n".join(report))
    common.say(f"done in {common.format_duration(timings['total'])} "
               f"({', '.join(f'{k} {common.format_duration(v)}' for k, v in timings.items() if k != 'total')}); "
               f"report: {out / 'report.md'}")
    return {"summary": summary, "rows": rows, "timings": timings, "samples": texts}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    F = flags.FLAGS
    run(common.require_out_dir(F.out_dir), entities=F.entities, corpus_bytes=F.corpus_bytes,
        vocab_size=F.vocab_size, tokenizer_bytes=F.tokenizer_bytes, seq_len=F.seq_len, batch_size=F.batch_size,
        steps=F.steps, lr=F.lr, seed=F.seed, preset=F.preset, mesh=F.mesh, resume=F.resume)


if __name__ == "__main__":
    define_flags()
    app.run(main)
