"""One full RL step (rollout of N prompts x G samples, then the update) against TRL's GRPOTrainer.

    python -m experiments.bench_rl [--prompts=4 --group=8 --completion=64 --d_model=128 --n_layers=4]

Both sides start from the same Hugging Face checkpoint directory, written once by core/hf.py (a
Qwen2-shaped model with random weights, a small byte-level BPE and a ChatML template): TRL loads
it with transformers, zipchat with `common.load_for_inference` (same weights, tokenizer and chat
template). Same N prompts, G samples each, completion budget, temperature 1, beta 0 (no
reference model), one optimizer update per step (GRPO loss, std-normalised advantages), the same
cheap reward (odd reply length). Both are on-policy (one pass over one batch): neither runs a
separate forward for old log-probs (zipchat's update takes its own, detached, and reports the
sampler/trainer mismatch and the entropy from that forward, as experiments/rl.py does with mu=1).

Timing: TRL runs `trainer.train()`; a callback times each of its steps and, every --steps TRL
steps, runs a block of --steps zipchat steps, so the contenders alternate in blocks in one process
on the same cores. The first step of each (compilation, warm-up) is not timed. Reports the median
seconds per step and the spread (min-max over timed steps) of each, then a JSON line with
steps_per_s, trl_steps_per_s, speedup_vs_trl, rollout_tokens_per_s, train_tokens_per_s (ours).

Continuous batching (engine only, after the RL steps): --cb_prompts prompts x G samples with
skewed lengths through --cb_rows rows at a time, refilling finished rows vs batch after batch,
alternated --cb_repeats times; JSON keys rollout_tokens_per_s_refill, rollout_tokens_per_s_no_refill,
refill_speedup (median per-round ratio) and refill_speedup_spread.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time

from absl import app, flags

from experiments import common

flags.DEFINE_integer("prompts", 4, "N: prompts per step")
flags.DEFINE_integer("group", 8, "G: samples per prompt")
flags.DEFINE_integer("completion", 64, "max completion tokens")
flags.DEFINE_integer("d_model", 128, "model width")
flags.DEFINE_integer("n_layers", 4, "layers")
flags.DEFINE_integer("n_heads", 4, "attention heads (2 kv heads)")
flags.DEFINE_integer("vocab", 1024, "BPE vocabulary of the benchmark tokenizer")
flags.DEFINE_integer("steps", 3, "timed steps per block")
flags.DEFINE_integer("blocks", 3, "blocks per contender (alternating)")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = the CPU count)")
flags.DEFINE_integer("cb_prompts", 32, "continuous batching: prompts per rollout (G samples each)")
flags.DEFINE_integer("cb_rows", 32, "continuous batching: rows decoded at once")
flags.DEFINE_integer("cb_repeats", 3, "continuous batching: alternated rounds per contender")
flags.DEFINE_string("out_dir", None, "where the checkpoint and TRL's output go (default: a temp dir)")
FLAGS = flags.FLAGS

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("apple river stone cloud seven orange market little window number answer garden yellow quiet "
         "thirty bottle teacher morning silver paper").split()


def _corpus(n: int = 4000) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.randint(0, 999)}." for _ in range(n)]


def write_checkpoint(path: pathlib.Path, d_model: int, n_layers: int, n_heads: int, vocab: int) -> None:
    """A Qwen2-shaped random model + byte-level BPE + ChatML template, as an HF checkpoint dir."""
    import jax
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from core import hf
    from core import model as model_lib

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 1024}))
    cfg = model_lib.ModelConfig(vocab_size=tok.get_vocab_size(), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                n_kv_heads=max(1, n_heads // 2), d_ff=4 * d_model, max_seq_len=512, qkv_bias=True,
                                zero_init_out=False)
    params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    eos = tok.token_to_id("<|im_end|>")
    hf.save_checkpoint(params, cfg, path, extra_config={"eos_token_id": eos, "pad_token_id": tok.token_to_id(
        "<|endoftext|>"), "bos_token_id": None})


def questions(n: int) -> list[str]:
    # equal-length prompts: both sides prefill the same tokens
    return [f"Question {i % 10}: what is {WORDS[i % len(WORDS)]} plus {WORDS[(3 * i) % len(WORDS)]}?" for i in range(n)]


def odd_length(text: str) -> float:
    return float(len(text) % 2)


class Ours:
    """zipchat's RL step: core.rollout.collect + one core.train update."""

    def __init__(self, ckpt: pathlib.Path, n: int, g: int, completion: int, lr: float):
        import jax
        import optax

        from core import rl as rl_lib
        from core import rollout
        from core import sharding
        from core import train as train_lib
        from core.rewards import Score

        self.jax, self.rollout, self.sharding = jax, rollout, sharding
        self.mesh = sharding.make_mesh("data:-1")
        ld = common.load_for_inference(ckpt, mesh=self.mesh)
        self.cfg, self.template = ld.cfg, ld.template
        self.rl_cfg = rl_lib.get_preset("grpo", kl_coef=0.0)

        class Task:
            def __init__(self, i, q):
                self.id, self.prompt = f"q{i}", ({"role": "user", "content": q},)

            def score(self, text):
                v = odd_length(text)
                return Score(reward=v, strict=bool(v), lenient=bool(v), format_ok=True)

        self.tasks = [Task(i, q) for i, q in enumerate(questions(64))]
        longest = max(len(p) for p in rollout.render_prompts(self.template, self.tasks))
        self.rcfg = rollout.RolloutConfig(n_prompts=n, group_size=g, max_new_tokens=completion,
                                          seq_len=-(-(longest + completion) // 8) * 8,
                                          recompute_old_logp=False)
        opt = optax.adamw(lr, weight_decay=0.0)
        self.step_fn = train_lib.make_train_step(self.cfg, opt, self.mesh, rl_lib.make_policy_loss_fn(self.rl_cfg))
        self.state = train_lib.train_state_from_params(ld.params, self.cfg, opt, self.mesh)
        self.scorer = rollout.make_scorer(self.cfg)
        self.i = 0
        self.times, self.rollout_s, self.train_s, self.gen_tokens, self.train_tokens = [], [], [], [], []

    def draw(self, k):
        out = [self.tasks[(self.i + j) % len(self.tasks)] for j in range(k)]
        self.i += k
        return out

    def step(self, timed: bool) -> None:
        jax = self.jax
        t0 = time.perf_counter()
        roll = self.rollout.collect(self.state["params"], self.draw, jax.random.PRNGKey(self.i), model_cfg=self.cfg,
                                    template=self.template, rl_cfg=self.rl_cfg, rcfg=self.rcfg, scorer=self.scorer,
                                    mesh=self.mesh, shard=lambda b: self.sharding.shard_batch(b, self.mesh))
        t1 = time.perf_counter()
        self.state, m = self.step_fn(self.state, self.sharding.shard_batch(roll.batch, self.mesh))
        jax.block_until_ready(m)
        t2 = time.perf_counter()
        if timed:
            self.times.append(t2 - t0)
            self.rollout_s.append(t1 - t0)
            self.train_s.append(t2 - t1)
            self.gen_tokens.append(roll.metrics["rollout_tokens"])
            self.train_tokens.append(float((roll.batch["segment_ids"] != 0).sum()))


def run_trl(ckpt: pathlib.Path, out: pathlib.Path, n: int, g: int, completion: int, lr: float, steps: int,
            blocks: int, between) -> list[float]:
    """TRL's GRPOTrainer for 1 + steps * blocks steps; `between()` runs after every `steps` timed
    steps (the other contender's block). Returns TRL's timed seconds per step."""
    import datasets
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(FLAGS.torch_threads or os.cpu_count() or 1)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    total = 1 + steps * blocks
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions(n * total)])

    def reward(prompts, completions, **kw):
        return [odd_length(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=n * g, num_generations=g,
                      max_completion_length=completion, beta=0.0, num_iterations=1, loss_type="grpo",
                      learning_rate=lr, max_steps=total, logging_steps=1000, save_strategy="no", report_to="none",
                      use_cpu=True, bf16=False, temperature=1.0, shuffle_dataset=False, disable_dropout=True,
                      gradient_accumulation_steps=1)
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        t = None

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > 1:  # the first step warms up
                times.append(time.perf_counter() - self.t)
                if (state.global_step - 1) % steps == 0:
                    between()

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    return times


def bench_refill(ours: "Ours", n_prompts: int, g: int, rows: int, completion: int, repeats: int) -> dict:
    """Rollout tokens/s through `rows` rows at a time, with and without refilling finished rows,
    on a skewed length distribution (per-prompt caps: most short, one in eight the full budget,
    as RL replies are). Same prompts, keys and tokens for both (per-row keys); alternated rounds."""
    import jax

    from core import sampling

    prompts = ours.rollout.render_prompts(ours.template, ours.draw(n_prompts))
    caps = [completion if i % 8 == 0 else max(2, completion // 8) for i in range(n_prompts)]
    scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=completion)  # no stop: lengths = caps

    def once(refill: bool) -> float:
        res = sampling.generate(ours.state["params"], ours.cfg, prompts, scfg, jax.random.PRNGKey(0), n_samples=g,
                                max_new_tokens=caps, max_rows=rows, refill_rows=refill, mesh=ours.mesh)
        return float(res.lengths.sum()) / res.decode_s

    once(True), once(False)  # compile
    tps = {True: [], False: []}
    for _ in range(repeats):
        for refill in (True, False):
            tps[refill].append(once(refill))
    ratios = [a / b for a, b in zip(tps[True], tps[False])]
    return {"refill": tps[True], "no_refill": tps[False], "ratios": ratios,
            "rollout_tokens_per_s_refill": statistics.median(tps[True]),
            "rollout_tokens_per_s_no_refill": statistics.median(tps[False]),
            "refill_speedup": statistics.median(ratios), "refill_speedup_spread": [min(ratios), max(ratios)]}


def _fmt(ts: list[float]) -> str:
    return f"{statistics.median(ts):.3f} s (min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("prompts", "group", "completion", "steps", "blocks"):
        if getattr(FLAGS, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if FLAGS.group < 2:
        raise ValueError(f"--group must be >= 2 (GRPO compares samples of one prompt), got {FLAGS.group}")
    out = pathlib.Path(FLAGS.out_dir or tempfile.mkdtemp(prefix="bench_rl_"))
    ckpt = out / "checkpoint"
    load0 = os.getloadavg()
    write_checkpoint(ckpt, FLAGS.d_model, FLAGS.n_layers, FLAGS.n_heads, FLAGS.vocab)
    n, g, c, lr = FLAGS.prompts, FLAGS.group, FLAGS.completion, 1e-6
    ours = Ours(ckpt, n, g, c, lr)
    ours.step(timed=False)  # compile
    common.say(f"bench_rl: N={n} x G={g}, {c} completion tokens, d{FLAGS.d_model} x {FLAGS.n_layers} layers, "
               f"vocab {ours.cfg.vocab_size}; {FLAGS.blocks} alternating blocks of {FLAGS.steps} steps")

    def our_block():
        for _ in range(FLAGS.steps):
            ours.step(timed=True)

    trl_times = run_trl(ckpt, out / "trl", n, g, c, lr, FLAGS.steps, FLAGS.blocks, our_block)
    cb = bench_refill(ours, FLAGS.cb_prompts, g, FLAGS.cb_rows, c, FLAGS.cb_repeats)
    load1 = os.getloadavg()
    med, trl_med = statistics.median(ours.times), statistics.median(trl_times)
    rollout_tps = sum(ours.gen_tokens) / sum(ours.rollout_s)
    train_tps = sum(ours.train_tokens) / sum(ours.train_s)
    rows = [("zipchat (JAX): one RL step", _fmt(ours.times)), ("  of which rollout + scoring", _fmt(ours.rollout_s)),
            ("  of which the update", _fmt(ours.train_s)), ("TRL GRPOTrainer (torch): one step", _fmt(trl_times))]
    print("\n| contender | seconds per step, median (spread) |\n|---|---|")
    for name, v in rows:
        print(f"| {name} | {v} |")
    print(f"\nspeedup {trl_med / med:.2f}x; ours: {rollout_tps:.0f} generated tokens/s in rollouts, {train_tps:.0f} "
          f"tokens/s in the update; load average {load0[0]:.1f} -> {load1[0]:.1f}\n")
    print(f"continuous batching: {FLAGS.cb_prompts} prompts x G={g} through {FLAGS.cb_rows} rows, lengths skewed "
          f"(1 in 8 prompts gets {c} tokens, the rest {max(2, c // 8)}):\n"
          f"| rollout | generated tokens/s, median (min..max) |\n|---|---|\n"
          f"| refilling finished rows | {cb['rollout_tokens_per_s_refill']:.0f} ({min(cb['refill']):.0f}..{max(cb['refill']):.0f}) |\n"
          f"| batch after batch | {cb['rollout_tokens_per_s_no_refill']:.0f} ({min(cb['no_refill']):.0f}..{max(cb['no_refill']):.0f}) |\n"
          f"refilling: {cb['refill_speedup']:.2f}x (per-round ratios {cb['refill_speedup_spread'][0]:.2f}.."
          f"{cb['refill_speedup_spread'][1]:.2f})\n")
    print(json.dumps({"steps_per_s": 1 / med, "trl_steps_per_s": 1 / trl_med, "speedup_vs_trl": trl_med / med,
                      "rollout_tokens_per_s": rollout_tps, "train_tokens_per_s": train_tps,
                      "ours_step_s_min": min(ours.times), "ours_step_s_max": max(ours.times),
                      "trl_step_s_min": min(trl_times), "trl_step_s_max": max(trl_times),
                      "n": n, "g": g, "completion": c, "d_model": FLAGS.d_model, "n_layers": FLAGS.n_layers,
                      "vocab": ours.cfg.vocab_size, "load_avg_start": load0[0], "load_avg_end": load1[0],
                      **{k: v for k, v in cb.items() if k not in ("refill", "no_refill", "ratios")}}), flush=True)


if __name__ == "__main__":
    app.run(common.cli(main))
