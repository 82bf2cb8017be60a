"""Supervised fine-tuning: a base model becomes an assistant by training on conversations.

    python -m experiments.sft --init=runs/main --out_dir=runs/main/sft
    python -m experiments.sft --init=path/to/Qwen2.5-0.5B-Instruct --data=messages:smoltalk.jsonl --out_dir=runs/qwen_sft
    python -m experiments.sft ... --resume            # after a crash or Ctrl-C

What differs from pretraining is only where rows come from: conversations rendered by the chat
template (zipchat's own, or a Hugging Face checkpoint's Jinja template), packed whole into rows
(best-fit; segment ids keep conversations from attending to each other) with a loss mask that is
1 only on the assistant's own tokens (its text, its tool calls, its end-of-turn token; headers,
system/user turns and tool outputs are 0). The loss, the train step, the loop, checkpoints and
resume are pretraining's (core/train.py, core/loop.py, experiments/stage.py).

--data: `synthetic[:n=,seed=]` (data/conversations.py's mixture over the world the --init run was
pretrained on), `messages:PATH` (jsonl/json/parquet with `messages`, as SmolTalk and UltraChat
ship), `sharegpt:PATH`, `gsm8k:PATH` (worked solutions with calculator calls), joined with '+'.

The output is a chat-ready run directory: tokenizer, model_config.json, config.json with
"stage": "sft" (the chat banner reads it), checkpoints; `experiments/chat.py`, `sample.py` and
`evaluate.py --mode=assistant` take it as --out_dir. Validation: the assistant-token loss on
held-out conversations (held-out entities, templates and numbers) every --eval_every steps, and
a few greedy replies (tools on) printed and written to samples.txt.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from typing import Optional

from absl import app

from experiments import common, options, stage

_f = options.field


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Everything an SFT run depends on; its fields are the script's flags."""

    init: Optional[str] = _f(None, "the model to fine-tune: a pretraining run directory or a Hugging Face "
                             "checkpoint directory")
    out_dir: Optional[str] = _f(None, "run directory of the fine-tuned model")
    data: str = _f("synthetic", "'synthetic[:n=,seed=]', 'messages:PATH', 'sharegpt:PATH', 'gsm8k:PATH', joined "
                   "with + (data/conversations.py open_conversations)")
    world: Optional[str] = _f(None, "synthetic world spec when --init is not a synthetic pretraining run, "
                              "e.g. 'synthetic:seed=0,entities=300'")
    n_conversations: int = _f(20000, "synthetic conversations to draw (each used ~steps*batch/n times)")
    val_conversations: int = _f(256, "held-out conversations for the validation loss")
    seq_len: int = _f(0, "tokens per row (0 = the model's max_seq_len)")
    batch_size: int = _f(16, "global batch (rows)")
    steps: int = _f(600, "optimizer steps")
    lr: float = _f(1e-3, "peak learning rate")
    warmup_steps: int = _f(30, "linear warmup steps")
    schedule: str = _f("linear", "lr schedule after warmup", choices=("cosine", "linear", "constant"))
    final_lr_frac: float = _f(0.0, "final lr as a fraction of --lr")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only)")
    clip_norm: float = _f(1.0, "global gradient-norm clip (0 = off)")
    mesh: str = _f("data:-1", "device mesh, e.g. 'data:2,fsdp:2,tensor:2'; -1 = the rest")
    seed: int = _f(0, "seed for data order and sampling")
    resume: bool = _f(False, "continue from the last complete checkpoint in --out_dir")
    log_every: int = _f(25, "print a progress line every N steps")
    eval_every: int = _f(200, "validation loss + sample replies every N steps (0 = end only)")
    eval_samples: int = _f(3, "held-out prompts answered (greedy, tools on) per eval")
    ckpt_every: int = _f(200, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(2, "keep the last K checkpoints")
    async_checkpoint: bool = _f(True, "write checkpoints in the background")
    debug_kill_at_step: int = _f(-1, "testing: SIGKILL this process right after step N")

    def __post_init__(self):
        need = options.need
        need(bool(self.init), "--init is required (a pretraining run directory or an HF checkpoint)")
        need(bool(self.out_dir), "--out_dir is required")
        need(pathlib.Path(self.init).resolve() != pathlib.Path(self.out_dir).resolve(),
             "--out_dir must differ from --init (the base model is never overwritten)")
        for name in ("batch_size", "steps", "log_every", "ckpt_every", "keep_checkpoints", "n_conversations",
                     "val_conversations"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        need(self.seq_len >= 0, f"--seq_len must be >= 0, got {self.seq_len}")
        need(self.eval_every >= 0, f"--eval_every must be >= 0, got {self.eval_every}")
        need(self.lr >= 0, f"--lr must be >= 0, got {self.lr}")

    def optim_config(self):
        from core import optim

        return optim.OptimConfig(lr=self.lr, warmup_steps=min(self.warmup_steps, self.steps), total_steps=self.steps,
                                 schedule=self.schedule, final_lr_frac=self.final_lr_frac,
                                 weight_decay=self.weight_decay, clip_norm=self.clip_norm or None)


# ----------------------------------------------------------------------------- data


def world_for(cfg: SFTConfig) -> tuple[Optional[str], object]:
    """(spec, world): the synthetic world the base model was pretrained on (--world, else the
    one --init's run records), or (None, None) when neither names one."""
    from data import readers

    spec = cfg.world or common.world_spec(cfg.init)
    if not spec or not str(spec).startswith("synthetic"):
        return None, None
    return spec, getattr(readers.open_source(spec), "world", None)


def load_examples(cfg: SFTConfig, world) -> tuple[list, list]:
    """(train examples, held-out validation examples) per --data (data.conversations.open_conversations).

    Validation: held-out synthetic conversations (entities, templates and numbers never in the
    training mixture) when a world is known, else the last 10% of the read conversations."""
    from data import conversations as conv

    spec = "+".join(f"synthetic:n={cfg.n_conversations},seed={cfg.seed}" if p.strip() == "synthetic" else p.strip()
                    for p in cfg.data.split("+") if p.strip())
    if "synthetic" in spec and world is None:
        raise ValueError("--data=synthetic needs the synthetic world: --init must be a run pretrained on "
                         "--data=synthetic..., or pass --world=synthetic:seed=S,entities=N")
    train = conv.open_conversations(spec, world)
    if world is not None:
        val = conv.sft_mixture(world, cfg.val_conversations, cfg.seed + 1, split="heldout")
    else:
        if len(train) < 2:
            raise ValueError(f"--data={cfg.data!r} holds {len(train)} conversation(s); need at least 2")
        n_val = max(1, min(cfg.val_conversations, len(train) // 10))
        train, val = train[:-n_val], train[-n_val:]
    if not train:
        raise ValueError(f"--data={cfg.data!r} gives no conversations")
    return train, val


class Renderer:
    """example -> (ids, mask) through the chat template, cut to one row (picklable)."""

    def __init__(self, template, row_len: int):
        self.template, self.row_len = template, row_len

    def __call__(self, example):
        ids, mask = self.template.render(example.messages)
        return ids[: self.row_len], mask[: self.row_len]


def fits(examples, template, row_len: int) -> tuple[list, int]:
    """(examples whose rendering fits one row, how many were dropped): a conversation cut in
    two would train its second half without its question."""
    keep = [ex for ex in examples if len(template.render(ex.messages)[0]) <= row_len]
    return keep, len(examples) - len(keep)


def val_batches(examples, template, seq_len: int, batch_size: int, max_batches: int = 8) -> list:
    """Fixed validation batches (every eval scores the same tokens); the last one is filled up
    with empty rows (segment 0, mask 0), which count for nothing."""
    import numpy as np

    from data import pipeline

    it = pipeline.make_train_iterator(examples, template.tokenizer, seq_len, batch_size, seed=0, shuffle=False,
                                      packing="bestfit", num_epochs=1, drop_remainder=False,
                                      render=Renderer(template, seq_len + 1))
    out = []
    for b in it:
        if len(b["tokens"]) < batch_size:  # pad the last batch with empty rows (mask 0)
            pad = batch_size - len(b["tokens"])
            b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        out.append(b)
        if len(out) >= max_batches:
            break
    it.close()
    return out


# ----------------------------------------------------------------------------- the run


def copy_tokenizer_files(init: pathlib.Path, out_dir: pathlib.Path) -> None:
    """An HF-initialised run keeps the checkpoint's tokenizer files (its chat template lives in
    tokenizer_config.json), so the fine-tuned run directory chats in its native format."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "generation_config.json"):
        if (init / name).is_file():
            shutil.copyfile(init / name, out_dir / name)


def write_run_files(out_dir: pathlib.Path, init_dir: pathlib.Path, tokenizer, model_cfg, cfg, **config) -> None:
    """A fine-tuned run directory's files, so chat/sample/evaluate load it: the tokenizer (and an
    HF init's tokenizer files), the model config, config.json (cfg's options plus `config`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir / common.TOKENIZER_FILE)
    copy_tokenizer_files(init_dir, out_dir)
    common.save_json(out_dir / common.MODEL_CONFIG_FILE, common.model_config_to_json(model_cfg))
    options.save_config(cfg, out_dir, **config)


def run(cfg: SFTConfig, *, examples: Optional[list] = None, val_examples: Optional[list] = None) -> dict:
    """Fine-tunes per `cfg`; returns {step, loss, val_loss, wall_s, tokens_per_s, out_dir, n_train,
    dropped, interrupted}. `examples` / `val_examples` replace --data (tokens_to_think)."""
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
    init_dir = pathlib.Path(cfg.init)
    # --- every check before anything is written
    mesh = sharding_lib.make_mesh(cfg.mesh)
    if cfg.batch_size % sharding_lib.batch_divisor(mesh):
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of data x fsdp = "
                         f"{sharding_lib.batch_divisor(mesh)} for --mesh={cfg.mesh}")
    stage.check_fresh_or_resume(out_dir, cfg.resume)
    loaded = common.load_for_inference(init_dir, mesh=mesh)
    tokenizer, template, model_cfg, params = loaded.tokenizer, loaded.template, loaded.cfg, loaded.params
    if template is None:
        raise ValueError(f"--init={init_dir}: its tokenizer has no chat template (no zipchat template tokens, no "
                         f"chat_template in tokenizer_config.json); SFT needs one")
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"--seq_len={seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    world_data, world = world_for(cfg)
    if examples is None:
        examples, val_examples = load_examples(cfg, world)
    examples, dropped = fits(examples, template, seq_len + 1)
    val_examples, _ = fits(val_examples or [], template, seq_len + 1)
    if not examples:
        raise ValueError(f"no conversation fits in --seq_len={seq_len} tokens")
    optimizer = optim_lib.make_optimizer(cfg.optim_config())
    fingerprint = {"model_config": common.model_config_to_json(model_cfg),
                   "run": {"init": str(init_dir.resolve()), "data": cfg.data, "seq_len": seq_len,
                           "batch_size": cfg.batch_size, "seed": cfg.seed, "n_train": len(examples),
                           "optim": dataclasses.asdict(cfg.optim_config())}}
    is_main = jax.process_index() == 0
    if is_main:
        write_run_files(out_dir, init_dir, tokenizer, model_cfg, cfg, stage="sft", template=template.name,
                        base=str(init_dir.resolve()), base_stage=loaded.stage, world_data=world_data,
                        n_train=len(examples), tokenizer_sha256=common.tokenizer_sha256(tokenizer),
                        dropped_too_long=dropped)

    render = Renderer(template, seq_len + 1)
    per_process = cfg.batch_size // jax.process_count()
    it = pipeline.make_train_iterator(examples, tokenizer, seq_len, per_process, seed=cfg.seed, packing="bestfit",
                                      render=render)
    vb = val_batches(val_examples, template, seq_len, per_process) if val_examples else []
    step_fn = train_lib.make_train_step(model_cfg, optimizer, mesh, train_lib.make_lm_loss())
    eval_fn = train_lib.make_eval_step(model_cfg, mesh, train_lib.make_lm_loss())
    probes = [ex for ex in val_examples if ex.answer][: cfg.eval_samples]
    n_params = model_lib.count_params(model_lib.param_shapes(model_cfg))
    peak, peak_desc = common.peak_flops_total(mesh.devices.flatten().tolist())
    progress = common.Progress(cfg.steps, cfg.batch_size * seq_len, model_lib.flops_per_token(model_cfg, seq_len), peak)
    common.say(f"sft: {init_dir} ({loaded.stage}, {n_params / 1e6:.2f}M params, template {template.name}) | "
               f"{len(examples)} conversations ({dropped} longer than {seq_len + 1} tokens dropped), "
               f"{len(val_examples)} held out | batch {cfg.batch_size} x {seq_len} | {cfg.steps} steps on {peak_desc}")

    def evaluate(step, state) -> dict:
        rec = {}
        if vb:
            sums = None
            for b in vb:
                m = jax.device_get(eval_fn(state["params"], sharding_lib.shard_batch(b, mesh)))
                sums = m if sums is None else {k: sums[k] + m[k] for k in m}
            rec["val_loss"] = float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0)
            rec["val_tokens"] = float(sums["weight"])
        lines = []
        if probes:
            from experiments import assistant_eval

            replies = assistant_eval.generate_replies(state["params"], model_cfg, template, [p.prompt for p in probes],
                                                      mesh=mesh, tools=assistant_eval.default_tools(world),
                                                      max_new_tokens=96)
            for ex, r in zip(probes, replies):
                q = ex.prompt[-1]["content"]
                lines.append(f"--- {ex.kind}: {q if isinstance(q, str) else q!r:.100}\n    -> {r['text'][:200]!r}")
            if is_main:
                with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
                    f.write(f"=== step {step}\n" + "\n".join(lines) + "\n")
        if "val_loss" in rec:
            common.say(f"eval step {step}: held-out assistant-token loss {rec['val_loss']:.4f} nats")
        for line in lines:
            common.say(line)
        return rec

    shardings = train_lib.state_shardings(model_cfg, optimizer, mesh)
    io = stage.StageIO(out_dir, fingerprint, cfg.keep_checkpoints, cfg.async_checkpoint, cfg.resume,
                       cfg.debug_kill_at_step)
    loop_cfg = loop.LoopConfig(total_steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
                               save_every=cfg.ckpt_every)
    try:
        result = stage.train(
            step_fn, lambda: train_lib.train_state_from_params(params, model_cfg, optimizer, mesh),
            lambda: ck.abstract_state(jax.eval_shape(
                lambda: train_lib.train_state_from_params(params, model_cfg, optimizer, mesh)), shardings),
            it, loop_cfg, io, mesh=mesh, progress=progress, evaluate=evaluate,
            record=lambda s, m: {k: float(m[k]) for k in ("loss", "lr", "grad_norm", "tokens") if k in m},
            t_start=t_start)
    finally:
        it.close()
    if is_main:
        recs = common.read_jsonl(out_dir / common.METRICS_FILE)
        common.plot_metric(recs, "loss", out_dir / "plots" / "loss.png", title="SFT loss (nats per assistant token)",
                           smooth=max(1, len(recs) // 50))
        common.plot_metric(common.read_jsonl(out_dir / common.EVALS_FILE), "val_loss", out_dir / "plots" / "val_loss.png",
                           title="held-out assistant-token loss")
    evs = common.read_jsonl(out_dir / common.EVALS_FILE)
    recs = common.read_jsonl(out_dir / common.METRICS_FILE)
    summary = {"step": result.step, "loss": recs[-1].get("loss") if recs else None,
               "val_loss": evs[-1].get("val_loss") if evs else None, "wall_s": time.time() - t_start,
               "tokens_per_s": progress.tokens_per_s, "out_dir": str(out_dir), "n_train": len(examples),
               "dropped": dropped, "interrupted": result.interrupted}
    common.say(f"sft done: step {result.step}, loss {summary['loss']}, held-out loss {summary['val_loss']}, "
               f"{common.format_duration(summary['wall_s'])}")
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    run(options.from_flags(SFTConfig))


if __name__ == "__main__":
    options.define_flags(SFTConfig)
    app.run(common.cli(main))
