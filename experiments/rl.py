"""RL on verifiable rewards: the GRPO family on an SFT model (ours or a Hugging Face checkpoint).

    python -m experiments.rl --algo=grpo --init=runs/main/sft --out_dir=runs/main/rl
    python -m experiments.rl --algo=dr_grpo --init=runs/main/sft --out_dir=runs/main/rl_dr
    python -m experiments.rl --algo=dapo --init=path/to/Qwen2.5-0.5B-Instruct \\
        --tasks=gsm8k:../shared/data/gsm8k,split=train,fmt=any --eval_tasks=gsm8k:../shared/data/gsm8k,split=test,n=256,fmt=any \\
        --group_size=16 --prompts_per_step=32 --max_new_tokens=512 --lr=1e-6 --out_dir=runs/qwen_rl
    python -m experiments.rl ... --resume            # after a crash or Ctrl-C: identical rewards and losses

What differs from SFT: rows come from rollouts (core/rollout.py: N prompts x G samples with the
tools in the stream, rewards, group advantages, old log-probs recomputed by the training forward,
reference log-probs only when a KL term is on), the loss is core/rl.py's clipped policy loss
(make_policy_loss_fn), and a frozen reference params tree is carried when kl_coef > 0. The train
step, loop, checkpoints and resume are SFT's (core/train.py, core/loop.py, experiments/stage.py).

--algo picks a core.rl preset (grpo, dr_grpo, dapo, rloo, gspo); every loss knob is its own flag
('none' = the preset's value). Each step: one rollout, then --mu passes over it in mini-batches of
--minibatch_size rows (whole groups).

Tasks (--tasks / --eval_tasks): data/tasks.py `open_tasks` specs (synthetic_math, short_math,
gsm8k, countdown); short_math is data/conversations.py's two-step one-digit word problems (the SFT
mixture's math_short; held-out template and number triples in 'heldout').

Evaluation on --eval_tasks at step 0 and every --eval_every steps: greedy pass@1 and sampled
pass@k, strict (the required 'Answer: N' line) and lenient. Outputs in --out_dir: checkpoints,
metrics.jsonl (per step: rewards, accuracies, lengths, truncation, entropy, KL, clip fractions,
grad norm, sampler-vs-trainer log-prob difference, rollout / train tokens per second and time
split), evals.jsonl, samples.txt, plots/heldout_accuracy.png and plots/response_length.png, and a
final JSON line (heldout_acc_start/_end, heldout_strict_start/_end, mean_len_start/_end, steps, wall_s).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Optional, Sequence

from absl import app

from experiments import common, options, stage

_f = options.field
ALGOS = ("grpo", "dr_grpo", "dapo", "rloo", "gspo")
EVAL_FILE_KEYS = ("greedy_lenient", "greedy_strict", "mean_len", "truncation_rate")


@dataclasses.dataclass(frozen=True)
class RLRunConfig:
    """Everything an RL run depends on; its fields are the script's flags."""

    algo: str = _f("grpo", "core.rl preset: the loss / advantage / shaping knobs below default to it", choices=ALGOS)
    init: Optional[str] = _f(None, "the policy to start from: an SFT run directory or a Hugging Face checkpoint")
    out_dir: Optional[str] = _f(None, "run directory of the RL-trained model")
    tasks: str = _f("synthetic_math:split=train,n=4000", "training prompts (data/tasks.py open_tasks spec)")
    eval_tasks: str = _f("synthetic_math:split=test,n=128", "held-out prompts for evaluation (templates / numbers "
                         "never trained on)")
    group_size: int = _f(8, "G: samples per prompt")
    prompts_per_step: int = _f(8, "N: prompts per step (the rollout batch has N * G rows)")
    max_new_tokens: int = _f(96, "completion budget in tokens (tool outputs count)")
    temperature: float = _f(0.7, "sampling temperature of the rollouts (the loss scores at the same temperature)")
    tools: str = _f("calculator", "tools served inside the stream, comma-separated ('' = none)")
    steps: int = _f(120, "RL steps (one rollout + mu passes each)")
    mu: int = _f(1, "inner iterations over each rollout batch (PPO epochs)")
    minibatch_size: int = _f(0, "rows per optimizer update, whole groups (0 = the whole rollout batch)")
    max_rounds: int = _f(2, "dynamic sampling: rollout rounds per step at most")
    rollout_rows: int = _f(0, "rows the engine decodes at once (0 = all N * G; fewer: continuous batching, "
                           "a prompt whose samples finished makes room for the next)")
    tool_workers: int = _f(8, "tool calls that run concurrently during rollouts")
    lr: float = _f(2e-4, "learning rate (AdamW)")
    warmup_steps: int = _f(0, "linear warmup (updates)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    clip_norm: float = _f(1.0, "global gradient-norm clip (0 = off)")
    # loss knobs: None = the --algo preset's value
    estimator: Optional[str] = _f(None, "advantages: grpo | dr_grpo | rloo")
    clip_low: Optional[float] = _f(None, "ratio clip below: 1 - clip_low")
    clip_high: Optional[float] = _f(None, "ratio clip above: 1 + clip_high (DAPO clip-higher 0.28)")
    dual_clip: Optional[float] = _f(None, "dual-clip constant c > 1 for negative advantages")
    ratio_level: Optional[str] = _f(None, "token | sequence (GSPO)")
    kl_coef: Optional[float] = _f(None, "beta of the KL to the reference (grpo: 0.04); > 0 keeps a frozen reference")
    kl_estimator: Optional[str] = _f(None, "k1 | k2 | k3")
    kl_placement: Optional[str] = _f(None, "loss | reward")
    agg: Optional[str] = _f(None, "token_mean | seq_mean_token_mean | seq_mean_token_sum_norm")
    max_len: Optional[int] = _f(None, "seq_mean_token_sum_norm's constant (default --max_new_tokens)")
    dynamic_sampling: Optional[bool] = _f(True, "drop groups whose rewards are all equal, draw more prompts (on by "
                                          "default: a small model's groups are mostly all-wrong; 'none' = the preset's)")
    overlong: Optional[str] = _f(None, "none | mask (truncated replies out of the loss) | soft (DAPO length penalty)")
    overlong_buffer: Optional[int] = _f(None, "soft overlong band in tokens (0 = max_new_tokens / 4)")
    overlong_penalty: Optional[float] = _f(None, "soft overlong penalty at the budget")
    # evaluation, bookkeeping
    eval_every: int = _f(20, "held-out evaluation every N steps (and at 0 and the end)")
    pass_k: int = _f(4, "k of sampled pass@k, at the first and the last evaluation (0 = greedy only)")
    seed: int = _f(0, "seed of the prompt order and the rollout RNG")
    mesh: str = _f("data:-1", "device mesh, e.g. 'data:2,fsdp:2,tensor:2'")
    resume: bool = _f(False, "continue from the last checkpoint in --out_dir (rollout RNG included)")
    log_every: int = _f(10, "print a progress line every N steps")
    ckpt_every: int = _f(20, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(2, "keep the last K checkpoints")
    async_checkpoint: bool = _f(True, "write checkpoints in the background")
    export_hf: bool = _f(False, "also write the final policy as a Hugging Face checkpoint to OUT_DIR/hf")
    debug_kill_at_step: int = _f(-1, "testing: SIGKILL this process right after step N")

    def __post_init__(self):
        need = options.need
        need(bool(self.init), "--init is required (an SFT run directory or a Hugging Face checkpoint)")
        need(bool(self.out_dir), "--out_dir is required")
        need(pathlib.Path(self.init).resolve() != pathlib.Path(self.out_dir).resolve(),
             "--out_dir must differ from --init (the starting model is never overwritten)")
        from core import rollout

        rollout.check_group_batch(self.prompts_per_step * self.group_size, self.group_size, "rollout batch")
        mb = self.minibatch_size or self.prompts_per_step * self.group_size
        rollout.check_group_batch(mb, self.group_size, "--minibatch_size")
        need((self.prompts_per_step * self.group_size) % mb == 0,
             f"--minibatch_size={mb} must divide the rollout batch of --prompts_per_step x --group_size = "
             f"{self.prompts_per_step * self.group_size} rows")
        for name in ("steps", "mu", "max_new_tokens", "log_every", "ckpt_every", "keep_checkpoints", "max_rounds"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        need(self.eval_every >= 0 and self.pass_k >= 0, "--eval_every and --pass_k must be >= 0")
        need(self.rollout_rows == 0 or self.rollout_rows >= self.group_size,
             f"--rollout_rows={self.rollout_rows} must be 0 (all) or hold one prompt's --group_size={self.group_size} "
             f"samples")
        need(self.tool_workers >= 1, f"--tool_workers must be >= 1, got {self.tool_workers}")
        need(self.temperature > 0, f"--temperature must be > 0 (rollouts sample), got {self.temperature}")
        need(self.lr >= 0, f"--lr must be >= 0, got {self.lr}")
        self.rl_config()  # knob errors now, naming the knob

    def rl_config(self):
        from core import rl

        knobs = ("estimator", "clip_low", "clip_high", "dual_clip", "ratio_level", "kl_coef", "kl_estimator",
                 "kl_placement", "agg", "max_len", "dynamic_sampling", "overlong", "overlong_buffer",
                 "overlong_penalty")
        over = {k: getattr(self, k) for k in knobs if getattr(self, k) is not None}
        cfg = rl.get_preset(self.algo, **over)
        if cfg.agg == "seq_mean_token_sum_norm" and cfg.max_len is None:
            cfg = cfg.replace(max_len=self.max_new_tokens)  # Dr. GRPO's constant: the completion budget
        return cfg

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.group_size

    def optim_config(self):
        from core import optim

        updates = self.steps * self.mu * (self.rows // (self.minibatch_size or self.rows))
        return optim.OptimConfig(lr=self.lr, warmup_steps=min(self.warmup_steps, updates), total_steps=updates,
                                 schedule="constant", weight_decay=self.weight_decay, clip_norm=self.clip_norm or None)


# ----------------------------------------------------------------------------- tasks


class PromptStream:
    """The RL batch source: prompt order and the rollout RNG, resumable.

    Rollouts need the current policy, so they happen inside the step; the loop's `next()` only
    counts the step (and hands it an empty batch). `draw(k)` gives the next k task indices from
    a fresh permutation per epoch (numpy Generator((seed, epoch))). The state {'drawn', 'steps'} is
    checkpointed with the model, so a resumed run draws the same prompts with the same keys."""

    def __init__(self, n_tasks: int, seed: int):
        if n_tasks < 1:
            raise ValueError("--tasks gives no prompts")
        self.n, self.seed, self.drawn, self.steps = n_tasks, seed, 0, 0
        self._perm: dict[int, Any] = {}

    def _order(self, epoch: int):
        import numpy as np

        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng((self.seed, epoch)).permutation(self.n)}
        return self._perm[epoch]

    def draw(self, k: int) -> list[int]:
        out = [int(self._order((self.drawn + j) // self.n)[(self.drawn + j) % self.n]) for j in range(k)]
        self.drawn += k
        return out

    def __next__(self):
        self.steps += 1
        return {}

    def get_state(self) -> dict:
        return {"drawn": self.drawn, "steps": self.steps}

    def set_state(self, state) -> None:
        self.drawn, self.steps = int(state["drawn"]), int(state["steps"])


def make_tools(names: str) -> dict:
    from core import tools as tools_lib

    want = [n.strip() for n in names.split(",") if n.strip()]
    if not want:
        return {}
    have = tools_lib.make_tools()
    bad = [n for n in want if n not in have]
    if bad:
        raise ValueError(f"--tools: unknown tool(s) {bad}; choose from {sorted(have)}")
    return {n: have[n] for n in want}


# ----------------------------------------------------------------------------- the run


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def run(cfg: RLRunConfig, *, train_tasks: Optional[Sequence] = None, eval_tasks: Optional[Sequence] = None) -> dict:
    """Trains per `cfg`; returns the summary (the final JSON line's keys, plus out_dir, algo,
    evals, interrupted). `train_tasks` / `eval_tasks` replace --tasks / --eval_tasks (tests)."""
    import jax
    import numpy as np

    from core import checkpoint as ck
    from core import loop
    from core import model as model_lib
    from core import optim as optim_lib
    from core import rl as rl_lib
    from core import rollout
    from core import sharding as sharding_lib
    from core import train as train_lib
    from data import tasks as tasks_lib

    t_start = time.time()
    out_dir = pathlib.Path(cfg.out_dir)
    init_dir = pathlib.Path(cfg.init)
    rl_cfg = cfg.rl_config()
    # --- every check before anything is written
    mesh = sharding_lib.make_mesh(cfg.mesh)
    div = sharding_lib.batch_divisor(mesh)
    mb = cfg.minibatch_size or cfg.rows
    if mb % div:
        raise ValueError(f"--minibatch_size={mb} rows must be a multiple of data x fsdp = {div} for --mesh={cfg.mesh}")
    resuming = stage.check_fresh_or_resume(out_dir, cfg.resume)
    loaded = common.load_for_inference(init_dir, mesh=mesh)
    tokenizer, template, model_cfg = loaded.tokenizer, loaded.template, loaded.cfg
    if template is None:
        raise ValueError(f"--init={init_dir}: its tokenizer has no chat template; RL samples assistant replies")
    rollout.check_template(template)
    tools = make_tools(cfg.tools) if template.tools is not None else {}
    train_tasks = list(train_tasks) if train_tasks is not None else tasks_lib.open_tasks(cfg.tasks)
    eval_tasks = list(eval_tasks) if eval_tasks is not None else tasks_lib.open_tasks(cfg.eval_tasks)
    if not train_tasks or not eval_tasks:
        raise ValueError("--tasks and --eval_tasks must each give at least one prompt")
    longest = max(len(p) for p in rollout.render_prompts(template, list(train_tasks) + list(eval_tasks)))
    seq_len = longest + cfg.max_new_tokens
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) + --max_new_tokens={cfg.max_new_tokens} exceeds "
                         f"the model's max_seq_len {model_cfg.max_seq_len}")
    seq_len = min(-(-seq_len // 8) * 8, model_cfg.max_seq_len)  # T+1, one shape for the whole run
    rcfg = rollout.RolloutConfig(n_prompts=cfg.prompts_per_step, group_size=cfg.group_size,
                                 max_new_tokens=cfg.max_new_tokens, seq_len=seq_len, temperature=cfg.temperature,
                                 max_rounds=cfg.max_rounds, max_rows=cfg.rollout_rows or None,
                                 tool_workers=cfg.tool_workers,
                                 # one pass over one mini-batch is on-policy: no separate scoring
                                 recompute_old_logp=not (cfg.mu == 1 and mb == cfg.rows))
    optimizer = optim_lib.make_optimizer(cfg.optim_config())
    fingerprint = {"model_config": common.model_config_to_json(model_cfg),
                   "run": {"init": str(init_dir.resolve()), "algo": cfg.algo, "rl": dataclasses.asdict(rl_cfg),
                           "tasks": [cfg.tasks, len(train_tasks)], "seq_len": seq_len,
                           "group_size": cfg.group_size, "prompts_per_step": cfg.prompts_per_step, "mu": cfg.mu,
                           "minibatch_size": mb, "seed": cfg.seed, "optim": dataclasses.asdict(cfg.optim_config())}}
    is_main = jax.process_index() == 0
    if is_main:
        from experiments import sft

        sft.write_run_files(out_dir, init_dir, tokenizer, model_cfg, cfg, stage="rl", template=template.name,
                            base=str(init_dir.resolve()), base_stage=loaded.stage, rl=dataclasses.asdict(rl_cfg),
                            seq_len=seq_len, world_data=common.world_spec(init_dir))
        if not resuming:  # a killed run that never checkpointed left logs behind: start them over
            for name in (common.METRICS_FILE, common.EVALS_FILE, "samples.txt"):
                (out_dir / name).unlink(missing_ok=True)

    params = loaded.params
    # The reference is a separate copy: the train state's buffers are donated every update.
    ref_params = jax.tree.map(lambda x: x.copy(), params) if rl_cfg.kl_coef > 0 else None
    scorer = rollout.make_scorer(model_cfg, temperature=cfg.temperature)
    loss_fn = rl_lib.make_policy_loss_fn(rl_cfg, temperature=cfg.temperature)
    train_step = train_lib.make_train_step(model_cfg, optimizer, mesh, loss_fn)
    stream = PromptStream(len(train_tasks), cfg.seed)
    base_key = jax.random.PRNGKey(cfg.seed)
    # Every process holds the whole rollout batch (the engine gathers it): each places its rows.
    shard = functools.partial(sharding_lib.shard_global_batch, mesh=mesh)
    n_params = model_lib.count_params(model_lib.param_shapes(model_cfg))
    peak, peak_desc = common.peak_flops_total(mesh.devices.flatten().tolist())
    progress = common.Progress(cfg.steps, cfg.rows * seq_len, model_lib.flops_per_token(model_cfg, seq_len), peak)
    common.say(f"rl ({cfg.algo}): {init_dir} ({loaded.stage}, {n_params / 1e6:.2f}M params, template {template.name}) | "
               f"{len(train_tasks)} train / {len(eval_tasks)} held-out prompts | N={cfg.prompts_per_step} x "
               f"G={cfg.group_size}, {cfg.max_new_tokens} new tokens, rows of {seq_len} | mu={cfg.mu}, mini-batch "
               f"{mb} | {cfg.steps} steps on {peak_desc}\n  knobs: {dataclasses.asdict(rl_cfg)}")

    # synthetic math's held-out split mixes unseen templates and unseen numbers: report each
    eval_groups = ([("unseen_template" if t.info["heldout_template"] else "unseen_numbers") for t in eval_tasks]
                   if all("heldout_template" in t.info for t in eval_tasks) else None)

    def evaluate(step, params_) -> dict:
        res = rollout.evaluate(params_, eval_tasks, model_cfg=model_cfg, template=template,
                               max_new_tokens=cfg.max_new_tokens, key=jax.random.fold_in(base_key, 10**9 + step),
                               k=cfg.pass_k if step in (0, cfg.steps) else 0, temperature=cfg.temperature, tools=tools,
                               mesh=mesh, groups=eval_groups)
        texts = res.pop("texts")
        if is_main:
            with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"=== step {step}\n")
                for t, text in list(zip(eval_tasks, texts))[:3]:
                    q = t.prompt[-1]["content"]
                    f.write(f"--- {q[:120]!r} (answer {t.answer})\n    -> {text[:300]!r}\n")
        common.say(f"eval step {step}: held-out greedy {100 * res['greedy_lenient']:.1f}% lenient, "
                   f"{100 * res['greedy_strict']:.1f}% strict" +
                   (f", pass@{cfg.pass_k} {100 * res[f'pass@{cfg.pass_k}_lenient']:.1f}%"
                    if f"pass@{cfg.pass_k}_lenient" in res else "") +
                   f", mean length {res['mean_len']:.1f} tokens" +
                   "".join(f", {k.split('/', 1)[1].replace('_', ' ')} {100 * v:.1f}%"
                           for k, v in res.items() if k.startswith("greedy_lenient/")))
        progress.pause()
        return res

    # Step 0: the starting policy's held-out figures (kept in evals.jsonl across resumes).
    evals_path = out_dir / common.EVALS_FILE
    start_eval = next((r for r in common.read_jsonl(evals_path) if r.get("step") == 0), None) \
        if evals_path.exists() else None
    if start_eval is None:
        start_eval = {"step": 0, **evaluate(0, params)}
        if is_main:
            with common.MetricsLogger(evals_path) as lg:
                lg.log(start_eval)

    stream_start = [None]

    def rl_step(state, _):
        step = stream.steps  # already counted by next()
        if stream_start[0] is None:
            stream_start[0] = step - 1
        key = jax.random.fold_in(base_key, step)
        roll = rollout.collect(state["params"], lambda k: [train_tasks[i] for i in stream.draw(k)], key,
                               model_cfg=model_cfg, template=template, rl_cfg=rl_cfg, rcfg=rcfg, scorer=scorer,
                               ref_params=ref_params, tools=tools, mesh=mesh, shard=shard)
        t0 = time.perf_counter()
        ms = []
        # A batch without signal (every advantage 0: all groups all-right or all-wrong, and no KL
        # term) is not an update: Adam would still move the weights by its momentum.
        signal = bool(np.any(roll.batch["advantages"])) or rl_cfg.kl_coef > 0
        for epoch in range(cfg.mu if signal else 0):
            for batch in rollout.minibatches(roll.batch, cfg.group_size, mb, seed=(cfg.seed * 1_000_003 + step) * 131 + epoch):
                state, m = train_step(state, shard(batch))
                ms.append(m)
        ms = [rl_lib.step_metrics(m, rl_cfg.loss_kwargs()["kl_coef"]) for m in sharding_lib.to_host(ms)]
        train_s = time.perf_counter() - t0
        out = dict(roll.metrics)
        for k in ("loss", "pg_loss", "kl", "ratio_mean", "clip_frac_low", "clip_frac_high", "clip_frac",
                  "dual_clip_frac", "grad_norm", "lr"):
            out[k] = float(np.mean([float(m[k]) for m in ms])) if ms else 0.0
        for k in ("entropy", "logp_diff_mean"):  # an on-policy update measured them
            if k not in out and ms and k in ms[0]:
                out[k] = float(np.mean([float(m[k]) for m in ms]))
        if "entropy" not in out:  # on-policy rollouts without an update (no signal): score them
            lp, ent = rollout.score_rows(scorer, state["params"], roll.batch, rcfg.score_chunk, shard)
            out.update(rollout.scored_metrics(lp, ent, roll.batch["sampler_logp"], roll.batch["mask"]))
        real_tokens = float(np.sum(roll.batch["segment_ids"] != 0)) * cfg.mu  # forward + backward, per pass
        gen_s = out["rollout_s"] + out["score_s"]
        out.update(train_s=train_s, rollout_tokens_per_s=out["rollout_tokens"] / max(out["rollout_s"], 1e-9),
                   train_tokens_per_s=real_tokens / max(train_s, 1e-9),
                   rollout_frac=gen_s / max(gen_s + train_s, 1e-9), updates=float(len(ms)))
        if step % cfg.log_every == 0 or step in (stream_start[0] + 1, cfg.steps):
            common.say(f"  rollouts: reward {out['reward_mean']:.3f}, acc {100 * out['acc_lenient']:.1f}% lenient / "
                       f"{100 * out['acc_strict']:.1f}% strict, length {out['len_mean']:.1f}, zero-var groups "
                       f"{100 * out['zero_var_frac']:.0f}%, clip {100 * out['clip_frac']:.1f}%, kl {out['kl']:.4f}, "
                       f"|logp diff| {out.get('logp_diff_mean', float('nan')):.1e}, {100 * out['rollout_frac']:.0f}% of the "
                       "step sampling")
        return state, out

    shardings = train_lib.state_shardings(model_cfg, optimizer, mesh)
    io = stage.StageIO(out_dir, fingerprint, cfg.keep_checkpoints, cfg.async_checkpoint, cfg.resume,
                       cfg.debug_kill_at_step)
    loop_cfg = loop.LoopConfig(total_steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
                               save_every=cfg.ckpt_every)

    def record(step, m):
        return {k: float(v) for k, v in m.items()}

    result = stage.train(
        rl_step, lambda: train_lib.train_state_from_params(params, model_cfg, optimizer, mesh),
        lambda: ck.abstract_state(jax.eval_shape(
            lambda: train_lib.train_state_from_params(params, model_cfg, optimizer, mesh)), shardings),
        stream, loop_cfg, io, mesh=mesh, progress=progress, evaluate=lambda s, st: evaluate(s, st["params"]),
        record=record, t_start=t_start)
    if cfg.export_hf and not result.interrupted:
        export_hf(result.state["params"], model_cfg, init_dir, out_dir / "hf", tokenizer)
    evals = common.read_jsonl(evals_path)
    recs = common.read_jsonl(out_dir / common.METRICS_FILE)
    if is_main:
        plot(out_dir, evals, recs, cfg.algo)
    end = evals[-1] if evals else start_eval
    summary = {
        "algo": cfg.algo,
        "heldout_acc_start": start_eval["greedy_lenient"], "heldout_acc_end": end["greedy_lenient"],
        "heldout_strict_start": start_eval["greedy_strict"], "heldout_strict_end": end["greedy_strict"],
        "mean_len_start": start_eval["mean_len"], "mean_len_end": end["mean_len"],
        **({f"pass@{cfg.pass_k}_start": start_eval.get(f"pass@{cfg.pass_k}_lenient"),
            f"pass@{cfg.pass_k}_end": end.get(f"pass@{cfg.pass_k}_lenient")} if cfg.pass_k else {}),
        "steps": result.step, "wall_s": time.time() - t_start,
        "train_reward_last10": _mean([r.get("reward_mean") for r in recs[-10:]]),
        "rollout_frac": _mean([r.get("rollout_frac") for r in recs]),
        "n_eval": len(eval_tasks), "out_dir": str(out_dir), "interrupted": result.interrupted,
        "evals": [{k: e[k] for k in ("step", *EVAL_FILE_KEYS) if k in e} for e in evals],
    }
    for key in sorted(k for k in start_eval if k.startswith("greedy_lenient/")):
        label = key.split("/", 1)[1]  # e.g. heldout_acc_unseen_template_start / _end
        summary[f"heldout_acc_{label}_start"], summary[f"heldout_acc_{label}_end"] = start_eval[key], end.get(key)
    common.say(f"rl done: step {result.step}, held-out greedy {100 * summary['heldout_acc_start']:.1f}% -> "
               f"{100 * summary['heldout_acc_end']:.1f}% (strict {100 * summary['heldout_strict_start']:.1f}% -> "
               f"{100 * summary['heldout_strict_end']:.1f}%), mean length {summary['mean_len_start']:.1f} -> "
               f"{summary['mean_len_end']:.1f} tokens, {common.format_duration(summary['wall_s'])}")
    return summary


def export_hf(params, model_cfg, init_dir: pathlib.Path, path: pathlib.Path, tokenizer) -> None:
    """The policy as a Hugging Face checkpoint (core/hf.py), with the init's tokenizer files."""
    from core import hf
    from experiments import sft

    path.mkdir(parents=True, exist_ok=True)
    extra = {}
    if common.is_hf_checkpoint(init_dir):
        src = common.load_json(init_dir / "config.json", "config")
        extra = {k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src}
    hf.save_checkpoint(params, model_cfg, path, extra_config=extra or None)
    sft.copy_tokenizer_files(init_dir, path)
    common.say(f"exported the policy as a Hugging Face checkpoint: {path}")


def plot(out_dir: pathlib.Path, evals: list, recs: list, algo: str) -> None:
    """plots/heldout_accuracy.png and plots/response_length.png (the DeepSeek-R1 figure pair), and
    plots/reward.png."""
    steps = [e["step"] for e in evals]
    common.plot_curves({"greedy, lenient": (steps, [e["greedy_lenient"] for e in evals]),
                        "greedy, strict": (steps, [e["greedy_strict"] for e in evals])},
                       out_dir / "plots" / "heldout_accuracy.png", title=f"held-out accuracy ({algo})",
                       ylabel="accuracy")
    rs = [r["step"] for r in recs if "len_mean" in r]
    common.plot_curves({"rollouts (train prompts)": (rs, [r["len_mean"] for r in recs if "len_mean" in r]),
                        "held-out greedy": (steps, [e["mean_len"] for e in evals])},
                       out_dir / "plots" / "response_length.png", title=f"mean response length ({algo})",
                       ylabel="tokens")
    common.plot_curves({"reward": (rs, [r["reward_mean"] for r in recs if "reward_mean" in r])},
                       out_dir / "plots" / "reward.png", title=f"mean rollout reward ({algo})", ylabel="reward")


def report_section(summary: dict, rel_dir: str = "rl") -> str:
    """Markdown for the main job's report.md: the held-out table and the two curves."""
    k = next((key[len("pass@"):-len("_start")] for key in summary if key.startswith("pass@") and key.endswith("_start")),
             None)
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"## RL ({summary['algo']}, {summary['steps']} steps, {common.format_duration(summary['wall_s'])})", "",
             f"Held-out prompts (n = {summary['n_eval']}; templates and numbers never trained on), greedy:", "",
             "| | start (SFT) | end (RL) |", "|---|---|---|",
             f"| accuracy, lenient | {pct(summary['heldout_acc_start'])} | {pct(summary['heldout_acc_end'])} |",
             f"| accuracy, strict ('Answer: N' line) | {pct(summary['heldout_strict_start'])} | "
             f"{pct(summary['heldout_strict_end'])} |"]
    for key in sorted(x for x in summary if x.startswith("heldout_acc_unseen_") and x.endswith("_start")):
        label = key[len("heldout_acc_"):-len("_start")]
        lines.append(f"| accuracy, lenient, {label.replace('_', ' ')} | {pct(summary[key])} | "
                     f"{pct(summary.get(f'heldout_acc_{label}_end'))} |")
    if k:
        lines.append(f"| sampled pass@{k}, lenient | {pct(summary.get(f'pass@{k}_start'))} | "
                     f"{pct(summary.get(f'pass@{k}_end'))} |")
    lines += [f"| mean response length (tokens) | {summary['mean_len_start']:.1f} | {summary['mean_len_end']:.1f} |",
              "", f"![held-out accuracy]({rel_dir}/plots/heldout_accuracy.png) "
                  f"![response length]({rel_dir}/plots/response_length.png)", ""]
    return "\n".join(lines)


FINAL_KEYS = ("heldout_acc_start", "heldout_acc_end", "heldout_strict_start", "heldout_strict_end", "mean_len_start",
              "mean_len_end", "steps", "wall_s")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    summary = run(options.from_flags(RLRunConfig))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("evals", "out_dir")}), flush=True)


if __name__ == "__main__":
    options.define_flags(RLRunConfig)
    app.run(common.cli(main))
