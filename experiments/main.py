"""The README's main job: every built stage at small scale on a 2-core laptop CPU, then report.md.

    python -m experiments.main                          # -> runs/main
    python -m experiments.main --resume                 # continue an interrupted job
    python -m experiments.main --out_dir=/tmp/m --steps=500 --corpus_bytes=1M --sft_steps=300   # quicker

Stages (each is also its own script):
  1. tokenizer   core.tokenizer.train_bpe on a sample of the synthetic corpus
  2. pretrain    experiments/pretrain.py: the `tiny` base model (OUT_DIR)
  3. sample      experiments/sample.py on a few prompts
  4. phenomena   experiments/evaluate.py --mode=phenomena (phenomena.md)
  5. sft         experiments/sft.py: conversations from the same world (OUT_DIR/sft)
  6. assistant   experiments/evaluate.py --mode=assistant --compare_base (sft/assistant.md)
  7. rl          experiments/rl.py --algo=grpo on held-out synthetic math (OUT_DIR/rl)
  8. rlhf        experiments/rlhf.py, small: reward model, best-of-n, RL vs the RM, DPO (OUT_DIR/rlhf)
  9. honesty     experiments/honesty.py --preset=small (OUT_DIR/honesty)
and writes OUT_DIR/report.md with the timings and the tables. --rl_steps=0, --rlhf=false and
--honesty=false leave stages out; --sft_steps=0 stops after the base model.

Every check runs before anything is written: an existing run directory needs --resume. With
--resume, finished stages are not redone (main_state.json records them and their results), so
resuming a finished job only rewrites the report.

The world is small (--entities) and the run makes a few passes over its corpus, so the table
reports how often each document was seen (copies x passes): articles of famous entities (16-32
copies) are memorised, articles with one copy are not.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Optional

from absl import app

from experiments import common, options

# Tuned for a 2-core CPU (~12k tokens/s for `tiny` on an idle machine, ~5k on a loaded one): ~4M
# training tokens, ~6 passes over a 2 MB corpus whose encyclopedia (300 entities) is an eighth of
# it. In-context learning (few-shot rows of the table) appears only in the second half of the
# 1000 steps; 500 steps still show regurgitation and facts by frequency.
_DEFAULTS = dict(entities=300, corpus_bytes="2M", vocab_size=2048, tokenizer_bytes="1M", seq_len=256,
                 batch_size=16, steps=1000, lr=3e-3, warmup_steps=50, sft_steps=600, sft_conversations=20000,
                 n_per_row=50)
STATE_FILE = "main_state.json"
STAGES = ("tokenizer", "pretrain", "sample", "phenomena", "sft", "assistant", "rl", "rlhf", "honesty")


_f = options.field


@dataclasses.dataclass(frozen=True)
class MainConfig:
    """The main job's options (its fields are the flags)."""

    out_dir: Optional[str] = _f("runs/main", "run directory: the base model; sft/ (and later stages) inside it")
    preset: str = _f("tiny", "model size preset (core.model.PRESETS)")
    mesh: str = _f("data:-1", "device mesh, e.g. 'data:2,fsdp:2,tensor:2'; -1 = the rest")
    seed: int = _f(0, "seed for the world, params, data order and sampling")
    entities: int = _f(_DEFAULTS["entities"], "entities in the synthetic world")
    corpus_bytes: str = _f(_DEFAULTS["corpus_bytes"], "size of one pass over the corpus, e.g. 2M")
    vocab_size: int = _f(_DEFAULTS["vocab_size"], "BPE vocabulary (with special tokens)")
    tokenizer_bytes: str = _f(_DEFAULTS["tokenizer_bytes"], "text the tokenizer is trained on")
    seq_len: int = _f(_DEFAULTS["seq_len"], "tokens per row")
    batch_size: int = _f(_DEFAULTS["batch_size"], "rows per step")
    steps: int = _f(_DEFAULTS["steps"], "pretraining steps")
    lr: float = _f(_DEFAULTS["lr"], "peak pretraining learning rate")
    sft_steps: int = _f(_DEFAULTS["sft_steps"], "SFT steps (0 = stop after the base model)")
    sft_conversations: int = _f(_DEFAULTS["sft_conversations"], "synthetic SFT conversations")
    n_per_row: int = _f(_DEFAULTS["n_per_row"], "prompts per row of the assistant evaluation")
    rl_steps: int = _f(30, "GRPO steps after SFT (0 = no RL stage)")
    rlhf: bool = _f(True, "run the small RLHF stage (reward model, best-of-n, RL vs the RM, DPO)")
    honesty: bool = _f(True, "run the small honesty stage (probe, refusals, fine-tune, before/after)")
    resume: bool = _f(False, "continue an interrupted main job in --out_dir")

    def __post_init__(self):
        from data import readers

        if not self.out_dir:
            raise ValueError("--out_dir is required")
        for name in ("steps", "batch_size", "n_per_row", "seq_len", "entities", "vocab_size", "sft_conversations"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.sft_steps < 0 or self.rl_steps < 0:
            raise ValueError(f"--sft_steps and --rl_steps must be >= 0, got {self.sft_steps}, {self.rl_steps}")
        if self.lr < 0:
            raise ValueError(f"--lr must be >= 0, got {self.lr}")
        for name in ("corpus_bytes", "tokenizer_bytes"):
            try:
                readers.parse_bytes(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"--{name}: {e}") from None


class _State:
    """main_state.json: finished stages and what they returned (JSON), written atomically."""

    def __init__(self, out: pathlib.Path, resume: bool):
        self.path = out / STATE_FILE
        self.done = common.load_json(self.path, "main state") if (resume and self.path.exists()) else {}

    def finished(self, stage: str) -> bool:
        return stage in self.done

    def record(self, stage: str, result) -> None:
        self.done[stage] = result
        common.save_json(self.path, self.done)


def pretrain_config(cfg: MainConfig, *, resume: bool):
    """The pretraining stage's options (its checks are pretrain.check_config's)."""
    from experiments import pretrain

    out = pathlib.Path(cfg.out_dir)
    steps = cfg.steps
    return pretrain.PretrainConfig(
        out_dir=str(out), preset=cfg.preset, data=_data_spec(cfg), tokenizer=str(out / common.TOKENIZER_FILE),
        seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=steps, lr=cfg.lr,
        warmup_steps=_DEFAULTS["warmup_steps"], mesh=cfg.mesh, seed=cfg.seed, resume=resume,
        eval_every=max(steps // 4, 1), ckpt_every=max(steps // 4, 1), log_every=25, eval_batches=4, eval_samples=2)


def _data_spec(cfg: MainConfig) -> str:
    return f"synthetic:seed={cfg.seed},entities={cfg.entities},bytes={cfg.corpus_bytes}"


def check(cfg: MainConfig) -> None:
    """Every check before anything is written or trained (a bad flag costs nothing)."""
    from experiments import pretrain, stage

    out = pathlib.Path(cfg.out_dir)
    pretrain.check_config(pretrain_config(cfg, resume=cfg.resume))  # preset, mesh, batch, checkpoints
    if not cfg.resume and (out / common.TOKENIZER_FILE).exists():
        raise ValueError(f"--out_dir={out} already holds a run; pass --resume to continue it or use a fresh --out_dir")
    for sub in ("sft", "rl", "rlhf", "honesty"):
        stage.check_fresh_or_resume(out / sub, cfg.resume)
        if not cfg.resume and (out / sub).exists():
            raise ValueError(f"{out / sub} already exists; pass --resume or use a fresh --out_dir")


def run(cfg: MainConfig) -> dict:
    """Runs every stage per `cfg` (see the module docstring); returns {summary, timings, state}."""
    from core import tokenizer as tok_lib
    from data import readers
    from experiments import evaluate, pretrain, sample

    out = pathlib.Path(cfg.out_dir)
    check(cfg)
    if cfg.sft_steps:
        from core import tools

        no_python = tools.python_unavailable()
        if no_python:  # said before the 20 minutes, not found in the report after
            common.say(f"warning: {no_python} (the assistant evaluation's python row will be 0)")
    seed, mesh, steps, sft_steps = cfg.seed, cfg.mesh, cfg.steps, cfg.sft_steps
    batch_size, seq_len, n_per_row = cfg.batch_size, cfg.seq_len, cfg.n_per_row
    data = _data_spec(cfg)
    state = _State(out, cfg.resume)
    timings = dict(state.done.get("timings", {}))
    n_stages = 4 + (2 + bool(cfg.rl_steps) + cfg.rlhf + cfg.honesty if sft_steps else 0)

    def begin(i: int, name: str, what: str) -> bool:
        if state.finished(name):
            common.say(f"[{i}/{n_stages}] {name}: done earlier ({STATE_FILE})")
            return False
        common.say(f"[{i}/{n_stages}] {what}")
        return True

    def finish(name: str, t: float, result=None) -> None:
        timings[name] = time.time() - t
        state.done["timings"] = timings
        state.record(name, result if result is not None else True)

    # 1. tokenizer
    t = time.time()
    tok_file = out / common.TOKENIZER_FILE
    if begin(1, "tokenizer", f"tokenizer: training a {cfg.vocab_size}-token BPE on {cfg.tokenizer_bytes} of {data}"):
        docs = readers.open_source(data)
        tok = tok_lib.train_bpe(pretrain._sample_text(docs, readers.parse_bytes(cfg.tokenizer_bytes)), cfg.vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(tok_file)
        ids = tok.encode(docs[0])
        common.say(f"      {tok.vocab_size} tokens; '{docs[0][:40]!s}...' -> {len(ids)} tokens, "
                   f"{len(docs[0].encode()) / max(len(ids), 1):.2f} bytes/token")
        finish("tokenizer", t)

    # 2. pretraining
    t = time.time()
    if begin(2, "pretrain", f"pretraining the {cfg.preset} model for {steps} steps of {batch_size} x {seq_len} tokens"):
        summary = pretrain.run(pretrain_config(cfg, resume=cfg.resume or (out / common.CHECKPOINT_DIR).exists()))
        if summary["interrupted"]:
            return {"interrupted": True}
        finish("pretrain", t, {k: summary[k] for k in ("loss", "val_bpb", "tokens_per_s", "n_params", "step")})
    pre = state.done["pretrain"]

    # 3. samples
    from core import sharding as sharding_lib

    t = time.time()
    loaded = None
    if begin(3, "sample", "samples (temperature 0.8, top-k 50)"):
        loaded = common.load_model(out, mesh=sharding_lib.make_mesh(mesh))
        world = readers.open_source(data).world
        famous = [e.name for e in world.entities if e.tier == "famous"][:2]
        once = [e.name for e in world.entities if e.tier == "once"][:1]
        prompts = tuple(famous + once + ["Question: Emily has 3 apples", "The word \"banana\""])
        texts = sample.run(sample.SampleConfig(out_dir=str(out), prompts=prompts, n_samples=1, temperature=0.8,
                                               top_k=50, max_new_tokens=64, seed=seed, mesh=mesh),
                           loaded=loaded, verbose=False)
        lines = [f"--- {p!r}\n{p}{s[0].rstrip()}" for p, s in zip(prompts, texts)]
        common.say(common.visible("\n".join(lines)))
        finish("sample", t, lines)

    # 4. phenomena
    t = time.time()
    if begin(4, "phenomena", "base-model phenomena"):
        loaded = loaded or common.load_model(out, mesh=sharding_lib.make_mesh(mesh))
        rows = evaluate.run(evaluate.PhenomenaConfig(out_dir=str(out), seed=seed, mesh=mesh), loaded=loaded)
        finish("phenomena", t, evaluate.format_table(rows))

    # 5-6. SFT and the assistant evaluation
    if sft_steps:
        from experiments import assistant_eval, sft

        t = time.time()
        if begin(5, "sft", f"SFT: {sft_steps} steps on {cfg.sft_conversations} synthetic conversations -> {out / 'sft'}"):
            s = sft.run(sft.SFTConfig(init=str(out), out_dir=str(out / "sft"), n_conversations=cfg.sft_conversations,
                                      steps=sft_steps, batch_size=batch_size, mesh=mesh, seed=seed,
                                      resume=cfg.resume or (out / "sft" / common.CHECKPOINT_DIR).exists(),
                                      eval_every=max(sft_steps // 2, 1), ckpt_every=max(sft_steps // 4, 1)))
            if s["interrupted"]:
                return {"interrupted": True}
            finish("sft", t, {k: s[k] for k in ("loss", "val_loss", "tokens_per_s", "n_train", "step")})
        t = time.time()
        if begin(6, "assistant", f"assistant evaluation ({n_per_row} held-out prompts per row; SFT vs base)"):
            res = assistant_eval.run(out / "sft", n=n_per_row, seed=seed, mesh=mesh, compare_base=True)
            finish("assistant", t, {"table": res["table"], "figures": res["figures"]})
        i = 7
        if cfg.rl_steps:
            from experiments import rl

            t = time.time()
            if begin(i, "rl", f"RL (GRPO, {cfg.rl_steps} steps) on synthetic math from the SFT model -> {out / 'rl'}"):
                r = rl.run(rl.RLRunConfig(init=str(out / "sft"), out_dir=str(out / "rl"), steps=cfg.rl_steps,
                                          seed=seed, mesh=mesh, eval_every=max(cfg.rl_steps // 2, 1),
                                          resume=cfg.resume or (out / "rl" / common.CHECKPOINT_DIR).exists()))
                if r.get("interrupted"):
                    return {"interrupted": True}
                finish("rl", t, {"section": rl.report_section(r, "rl"), **{k: r.get(k) for k in rl.FINAL_KEYS}})
            i += 1
        if cfg.rlhf:
            from experiments import rlhf

            t = time.time()
            if begin(i, "rlhf", f"RLHF (small): reward model, best-of-n, RL vs the RM, DPO -> {out / 'rlhf'}"):
                r = rlhf.run(rlhf.small_config(str(out / "sft"), str(out / "rlhf"), seed=seed, mesh=mesh,
                                               resume=cfg.resume))
                if r.get("interrupted"):
                    return {"interrupted": True}
                finish("rlhf", t, {"section": rlhf.report_section(r)})
            i += 1
        if cfg.honesty:
            from experiments import honesty

            t = time.time()
            if begin(i, "honesty", f"honesty (small): probe, refusals, fine-tune, before/after -> {out / 'honesty'}"):
                h = honesty.run(honesty.HonestyConfig(init=str(out / "sft"), out_dir=str(out / "honesty"),
                                                      preset="small", seed=seed, mesh=mesh, resume=cfg.resume))
                finish("honesty", t, {"section": honesty.report_section(h)})

    total = sum(timings.values())
    report = _report(out, state.done, timings, entities=cfg.entities, corpus_bytes=cfg.corpus_bytes, steps=steps,
                     batch_size=batch_size, seq_len=seq_len, sft_steps=sft_steps)
    (out / "report.md").write_text(report)
    common.say(f"done in {common.format_duration(total)} "
               f"({', '.join(f'{k} {common.format_duration(v)}' for k, v in timings.items())}); "
               f"report: {out / 'report.md'}")
    return {"summary": pre, "timings": timings, "state": state.done}


def _report(out: pathlib.Path, done: dict, timings: dict, *, entities, corpus_bytes, steps, batch_size, seq_len,
            sft_steps) -> str:
    pre = done["pretrain"]
    lines = [
        "# zipchat main job", "",
        f"tiny base model on the synthetic world ({entities} entities, {corpus_bytes} corpus), "
        f"{pre['n_params'] / 1e6:.2f}M params, {steps} steps x {batch_size} x {seq_len} tokens.", "",
        f"- final train loss {pre['loss']:.3f} nats/token, validation {pre['val_bpb']:.3f} bits/byte",
        f"- training throughput {pre['tokens_per_s']:.0f} tokens/s",
        "- wall time: " + ", ".join(f"{k} {common.format_duration(v)}" for k, v in timings.items()), "",
        "## samples", "", "```", *done.get("sample", []), "```", "",
        "## phenomena", "", done.get("phenomena", ""), "",
    ]
    if "sft" in done:
        s = done["sft"]
        lines += ["## SFT", "",
                  f"{sft_steps} steps on {s['n_train']} synthetic conversations (assistant tokens only): final train "
                  f"loss {s['loss']:.3f}, held-out conversations {s['val_loss']:.3f} nats per assistant token.", ""]
    if "assistant" in done:
        a = done["assistant"]
        lines += ["## assistant evaluation (held-out prompts, greedy; base = the same template on the base model)",
                  "", a["table"], "", "```json", json.dumps(a["figures"]), "```", ""]
    for name in ("rl", "rlhf", "honesty"):
        if isinstance(done.get(name), dict) and done[name].get("section"):
            lines += [done[name]["section"], ""]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    cfg = options.from_flags(MainConfig)
    run(cfg)


if __name__ == "__main__":
    options.define_flags(MainConfig)
    app.run(common.cli(main))
