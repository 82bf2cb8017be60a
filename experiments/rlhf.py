"""Optimising against a learned reward model, and measuring its over-optimisation with the
hidden gold reward (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

    python -m experiments.rlhf --init=runs/main/sft --out_dir=runs/main/rlhf
    python -m experiments.rlhf ... --rm_sizes=64,256,1024 --kl_coef=0.02 --kl_placement=reward

What it does, all from one SFT policy (--init) and one labelled pool:

1. Preference data (data/preferences.py): --n_prompts open-ended prompts, K SFT samples each,
   ranked by the simulated labeller; held-out comparisons on held-out entities. Reward models
   (experiments/reward_model.py) are trained on the first N rankings for every N in --rm_sizes
   (OUT/rm_N); the largest is "the" reward model (the proxy).
2. Best-of-n, n = 1, 2, 4, ..., --bon_max_n: --bon_prompts held-out prompts, bon_max_n SFT
   samples each, scored by every reward model and by gold. The expected proxy and gold reward of
   the best-of-n (by proxy) are computed exactly from the pool: with the m samples sorted by
   proxy, sample i (0-based) is the best of a uniformly drawn n-subset with probability
   C(i, n-1) / C(m, n). KL(best-of-n || SFT) = log n - (n-1)/n (core.rl.best_of_n_kl).
3. RL against the proxy: N prompts x G samples per step, reward = the reward model's score,
   group-normalised advantages, the clipped policy loss of core/rl.py through core.train's step
   (one update per rollout: on-policy), a KL penalty to the SFT policy either in the reward
   (InstructGPT: r - beta * sum_t (logp - logp_sft), core.rl.kl_penalised_rewards) or in the loss
   (k3, GRPO), --kl_placement. Every --eval_every steps: samples of held-out prompts give the
   policy's proxy and gold reward and KL(pi || SFT) = E_pi[sum_t log pi - log pi_sft].
4. DPO (core.rl.make_dpo_loss_fn) on every C(K,2) pair of the largest reward model's
   rankings, with --dpo_beta, evaluated the same way.

For each method, proxy and gold against d = sqrt(KL) (rlhf.png), and least-squares fits of Gao
et al.'s forms to gold - gold(SFT): best-of-n R(d) = d (a - b d), RL R(d) = d (a - b log d), with
their peaks d* = a / 2b and d* = exp(a / b - 1). Varying the reward model's training
comparisons moves the gold peak: the table lists, per reward model, its held-out accuracy, the
best-of-n gold peak and d at the peak (and RL's with --rl_all_rms). report.md holds the table;
the last line is JSON with proxy_start, proxy_end, gold_start, gold_peak, gold_end and
d_at_gold_peak of the RL run (against the largest reward model), plus the fits.

Every phase that trains is a chat-ready run directory trained by the shared loop
(experiments/stage.py: checkpoints every --ckpt_every steps, metrics.jsonl, evals.jsonl with the
step-0 SFT figures): the reward models OUT/rm_N, RL OUT/rl_policy (against the main reward model;
OUT/rl_rmN against the others) and DPO OUT/dpo_policy. `--resume` continues a killed run: the
labelled pool and finished reward models are reused and RL / DPO resume exactly from their
latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Optional, Sequence

from absl import app

from experiments import common, options

_f = options.field


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    return vals


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Everything an RLHF run depends on; its fields are the script's flags."""

    init: Optional[str] = _f(None, "the SFT run directory (policy, reference and reward-model initialisation)")
    out_dir: Optional[str] = _f(None, "output directory (reward models, curves, rlhf.png, report.md)")
    n_prompts: int = _f(512, "labelled training prompts (rankings of --k) in the pool")
    val_prompts: int = _f(64, "held-out labelled prompts (reward-model accuracy)")
    k: int = _f(4, "responses ranked per prompt")
    label_noise: float = _f(0.5, "the labeller's Bradley-Terry temperature on gold rewards")
    rm_sizes: str = _f("64,512", "reward models trained on the first N rankings, comma-separated; the largest is "
                       "the proxy RL and DPO optimise")
    rm_steps: int = _f(150, "optimizer steps per reward model")
    rm_batch: int = _f(16, "rankings per reward-model step")
    rm_lr: float = _f(3e-4, "reward-model body learning rate")
    rm_head_lr: float = _f(3e-3, "reward-model head learning rate")
    max_new_tokens: int = _f(48, "response budget in tokens (everywhere)")
    bon_prompts: int = _f(16, "held-out prompts for best-of-n")
    bon_max_n: int = _f(256, "largest n of best-of-n (a power of two); the pool holds this many samples per prompt")
    rl_steps: int = _f(120, "RL steps (one rollout and one update each)")
    rl_prompts: int = _f(8, "prompts per RL step")
    rl_group: int = _f(8, "samples per prompt (G) per RL step")
    rl_lr: float = _f(2e-4, "RL learning rate (constant after warmup)")
    kl_coef: float = _f(0.01, "KL penalty to the SFT policy (beta)")
    kl_placement: str = _f("reward", "where the KL penalty goes", choices=("reward", "loss"))
    rl_all_rms: bool = _f(False, "also run RL against every smaller reward model (else best-of-n only)")
    dpo_steps: int = _f(80, "DPO steps (0 = skip DPO)")
    dpo_batch: int = _f(16, "preference pairs per DPO step")
    dpo_beta: float = _f(0.1, "DPO beta")
    dpo_lr: float = _f(3e-4, "DPO learning rate")
    eval_every: int = _f(5, "RL / DPO steps between evaluations")
    ckpt_every: int = _f(20, "RL / DPO steps between checkpoints (each phase is a resumable run directory)")
    resume: bool = _f(False, "continue an earlier run in --out_dir: reuse its labelled pool and reward models, "
                      "resume RL and DPO from their checkpoints")
    eval_prompts: int = _f(32, "held-out prompts per evaluation")
    eval_samples: int = _f(4, "samples per prompt per evaluation")
    mesh: str = _f("data:-1", "device mesh")
    seed: int = _f(0, "seed")

    def __post_init__(self):
        need = options.need
        need(bool(self.init), "--init is required (an SFT run directory)")
        need(bool(self.out_dir), "--out_dir is required")
        need(pathlib.Path(self.init).resolve() != pathlib.Path(self.out_dir).resolve(), "--out_dir must differ from --init")
        sizes = _ints(self.rm_sizes)
        need(bool(sizes) and min(sizes) >= 1, f"--rm_sizes needs positive integers, got {self.rm_sizes!r}")
        need(max(sizes) <= self.n_prompts, f"--rm_sizes {self.rm_sizes} exceeds --n_prompts={self.n_prompts}")
        need(self.bon_max_n >= 2 and self.bon_max_n & (self.bon_max_n - 1) == 0,
             f"--bon_max_n must be a power of two >= 2, got {self.bon_max_n}")
        need(self.rl_group >= 2, f"--rl_group must be >= 2 (group-relative advantages), got {self.rl_group}")
        for name in ("n_prompts", "val_prompts", "rm_steps", "rm_batch", "bon_prompts", "rl_steps", "rl_prompts",
                     "eval_every", "eval_prompts", "eval_samples", "dpo_batch", "max_new_tokens", "ckpt_every"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        need(self.k >= 2, f"--k must be >= 2, got {self.k}")
        need(self.dpo_steps >= 0, f"--dpo_steps must be >= 0, got {self.dpo_steps}")
        need(self.kl_coef >= 0, f"--kl_coef must be >= 0, got {self.kl_coef}")
        need(self.dpo_beta > 0, f"--dpo_beta must be > 0, got {self.dpo_beta}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(set(_ints(self.rm_sizes))))


def small_config(init: str, out_dir: str, **overrides) -> RLHFConfig:
    """The main job's small version: every phase, fewer prompts and steps (see the README for
    its time on a 2-core CPU)."""
    kw = dict(init=init, out_dir=out_dir, n_prompts=256, val_prompts=32, rm_sizes="32,256", rm_steps=50,
              bon_prompts=8, bon_max_n=256, rl_steps=60, rl_prompts=8, rl_group=8, dpo_steps=40, eval_every=5,
              eval_prompts=16, eval_samples=4, max_new_tokens=40)
    kw.update(overrides)
    return RLHFConfig(**kw)


# ----------------------------------------------------------------------------- pure pieces


def best_of_n_curve(proxy_pm, gold_pm, ns: Sequence[int]) -> dict:
    """Exact expected proxy and gold reward of best-of-n (selected by proxy) from a pool.

    proxy_pm, gold_pm: [P, M] rewards of M samples of each of P prompts. For each prompt the
    samples are sorted by proxy; sample i (0-based, ascending) is the maximum of a uniformly drawn
    n-subset with probability C(i, n-1) / C(M, n) (ties broken by pool order). Averaged over
    prompts. Returns {'n', 'kl' (log n - (n-1)/n), 'd' (sqrt kl), 'proxy', 'gold'} lists.
    """
    import numpy as np

    proxy = np.asarray(proxy_pm, np.float64)
    gold = np.asarray(gold_pm, np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise ValueError(f"proxy and gold must both be [P, M], got {proxy.shape} and {gold.shape}")
    m = proxy.shape[1]
    order = np.argsort(proxy, axis=1, kind="stable")
    ps = np.take_along_axis(proxy, order, 1)
    gs = np.take_along_axis(gold, order, 1)
    out = {"n": [], "kl": [], "d": [], "proxy": [], "gold": []}
    i = np.arange(m)
    for n in ns:
        if not 1 <= n <= m:
            raise ValueError(f"best-of-{n} needs 1 <= n <= pool size {m}")
        # log C(i, n-1) - log C(m, n), -inf where i < n-1
        lw = np.full(m, -np.inf)
        ok = i >= n - 1
        lw[ok] = (math.lgamma(m - n + 1) + math.lgamma(n + 1) - math.lgamma(m + 1)
                  + np.asarray([math.lgamma(x + 1) - math.lgamma(n) - math.lgamma(x - n + 2) for x in i[ok]]))
        w = np.exp(lw)
        w = w / w.sum()  # exact up to rounding: the weights sum to 1
        kl = math.log(n) - (n - 1) / n
        out["n"].append(int(n))
        out["kl"].append(kl)
        out["d"].append(math.sqrt(kl))
        out["proxy"].append(float((ps @ w).mean()))
        out["gold"].append(float((gs @ w).mean()))
    return out


def fit_gao(d, r, form: str) -> dict:
    """Least-squares fit of Gao et al.'s gold-reward forms (no intercept: R(0) = 0).

      'bon': R(d) = d (a - b d)          peak at d* = a / (2 b)        (b > 0)
      'rl':  R(d) = d (a - b log d)      peak at d* = exp(a / b - 1)   (b > 0)

    d, r: [M] distances sqrt(KL) and rewards relative to the initial policy. Returns
    {'a', 'b', 'd_peak' (None when the fit has no maximum), 'r_peak', 'rmse'}.
    """
    import numpy as np

    d = np.asarray(d, np.float64)
    r = np.asarray(r, np.float64)
    if d.shape != r.shape or d.ndim != 1:
        raise ValueError(f"d and r must be [M] vectors of one length, got {d.shape} and {r.shape}")
    if form not in ("bon", "rl"):
        raise ValueError(f"unknown form {form!r}; 'bon' or 'rl'")
    if len(d) < 2:
        return {"a": float("nan"), "b": float("nan"), "d_peak": None, "r_peak": None, "rmse": float("nan")}
    safe = np.where(d > 0, d, 1.0)
    second = -(d * d) if form == "bon" else -(d * np.log(safe))
    x = np.stack([d, second], 1)
    (a, b), *_ = np.linalg.lstsq(x, r, rcond=None)
    pred = x @ np.array([a, b])
    d_peak = None
    if b > 0:
        d_peak = a / (2 * b) if form == "bon" else math.exp(min(a / b - 1, 50.0))
    r_peak = None if d_peak is None else float(gao_curve(d_peak, a, b, form))
    return {"a": float(a), "b": float(b), "d_peak": None if d_peak is None else float(d_peak), "r_peak": r_peak,
            "rmse": float(np.sqrt(np.mean((pred - r) ** 2)))}


def gao_curve(d, a: float, b: float, form: str):
    """R(d) of a fitted form (see `fit_gao`); R(0) = 0."""
    import numpy as np

    d = np.asarray(d, np.float64)
    if form == "bon":
        return d * (a - b * d)
    return d * (a - b * np.log(np.where(d > 0, d, 1.0)))


def curve_summary(points: Sequence[dict]) -> dict:
    """proxy_start, proxy_end, gold_start, gold_peak, gold_end, d_at_gold_peak, kl_end of a
    trajectory of {'d', 'proxy', 'gold'} evaluations (in training order)."""
    if not points:
        raise ValueError("no evaluations to summarise")
    peak = max(range(len(points)), key=lambda i: points[i]["gold"])
    return {"proxy_start": points[0]["proxy"], "proxy_end": points[-1]["proxy"], "gold_start": points[0]["gold"],
            "gold_peak": points[peak]["gold"], "gold_end": points[-1]["gold"], "d_at_gold_peak": points[peak]["d"],
            "d_end": points[-1]["d"], "step_at_gold_peak": points[peak].get("step", peak)}


# ----------------------------------------------------------------------------- rows and scoring


def response_rows(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], seq_len: int) -> dict:
    """Prompt + response rows in core/loss.py's convention: tokens / segment_ids / positions int32
    [B, seq_len] and a target mask [B, seq_len - 1] that is 1 on the response's tokens."""
    import numpy as np

    n = len(response_ids)
    tokens = np.zeros((n, seq_len), np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len - 1), np.int32)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        row = list(p) + list(r)
        if len(row) > seq_len:
            raise ValueError(f"a row of {len(row)} tokens does not fit seq_len={seq_len}")
        tokens[b, : len(row)] = row
        seg[b, : len(row)] = 1
        mask[b, len(p) - 1: len(row) - 1] = 1
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"tokens": tokens, "segment_ids": seg, "positions": positions, "mask": mask}


def make_token_scorer(model_cfg):
    """jit (params, rows) -> logp_bt [B, T] of the targets (0 where masked), the shared scorer."""
    import jax

    from core import loss as loss_lib

    return jax.jit(lambda p, b: loss_lib.token_logprobs(p, b, model_cfg)[0])


def token_logps(scorer, params, rows: dict, mesh, chunk: int = 64):
    """Host float32 [B, T] log-probs of `rows`' masked targets, `chunk` rows per call (padded)."""
    import jax
    import numpy as np

    from core import sharding as sharding_lib

    n = rows["tokens"].shape[0]
    div = sharding_lib.batch_divisor(mesh)
    chunk = -(-chunk // div) * div
    out = []
    for lo in range(0, n, chunk):
        b = {k: rows[k][lo: lo + chunk] for k in ("tokens", "segment_ids", "positions", "mask")}
        pad = chunk - b["tokens"].shape[0]
        if pad:
            b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        out.append(np.asarray(jax.device_get(scorer(params, sharding_lib.shard_batch(b, mesh))), np.float32))
    return np.concatenate(out)[:n]


def row_len(template, world, max_new_tokens: int, model_cfg) -> int:
    """Row length for every prompt any phase can draw (each entity in each phrasing) plus the
    response budget, rounded up to a multiple of 8; an error when it exceeds the context."""
    from data import preferences as prefs

    longest = max(len(template.render_for_completion([{"role": "user", "content": t.format(name=e.name)}]))
                  for e in world.entities for ts in prefs.PROMPT_TEMPLATES.values() for t in ts)
    t = -(-(longest + max_new_tokens) // 8) * 8
    if min(t, longest + max_new_tokens) > model_cfg.max_seq_len:
        raise ValueError(f"prompts of up to {longest} tokens + --max_new_tokens={max_new_tokens} exceed the model's "
                         f"context of {model_cfg.max_seq_len} tokens; lower --max_new_tokens")
    return min(t, model_cfg.max_seq_len)


@dataclasses.dataclass
class Ctx:
    """What every phase shares: the SFT model, the template, the world's judge, the proxy."""

    cfg: RLHFConfig
    model_cfg: Any
    template: Any
    ref_params: Any
    judge: Any
    mesh: Any
    seq_len: int
    scorer: Any
    reward_fn: Any
    rm_params: Any
    eval_prompts: list
    loaded: Any  # common.load_for_inference(init): tokenizer, template, the SFT params


def evaluate_policy(ctx: Ctx, params, key) -> dict:
    """Samples eval_samples responses to each eval prompt from `params` (temperature 1) and
    returns {'proxy', 'gold', 'kl', 'kl_k1', 'd', 'len', 'true_facts', 'false_facts', 'sample'}:
    means over samples; KL(pi || SFT) per response = sum_t k(log pi_t, log sft_t) over its tokens,
    kl with k3 = exp(r) - r - 1 (r = log sft - log pi; d = sqrt(kl)), kl_k1 with k1 = -r."""
    import numpy as np

    from core import rl as rl_lib
    from experiments import reward_model as rmx

    c = ctx.cfg
    ids, texts, prompt_ids = rmx.sample_responses(params, ctx.model_cfg, ctx.template, ctx.eval_prompts,
                                                  c.eval_samples, max_new_tokens=c.max_new_tokens, temperature=1.0,
                                                  key=key, mesh=ctx.mesh)
    rows_p = [prompt_ids[i // c.eval_samples] for i in range(len(ids))]
    proxy = rmx.score_responses(ctx.reward_fn, ctx.rm_params, rows_p, ids, ctx.seq_len, mesh=ctx.mesh)
    entities = [ctx.eval_prompts[i // c.eval_samples].entity for i in range(len(ids))]
    scores = [ctx.judge.score(e, t) for e, t in zip(entities, texts)]
    rows = response_rows(rows_p, ids, ctx.seq_len)
    lp = token_logps(ctx.scorer, params, rows, ctx.mesh)
    lr = token_logps(ctx.scorer, ctx.ref_params, rows, ctx.mesh)
    m = rows["mask"].astype(np.float64)
    # k3 per token, summed over the response: unbiased for the sequence KL and never negative
    # (k1, the plain log-ratio, is unbiased too but noisy and can go below 0 on few samples)
    kl3 = float(np.mean(np.sum(np.asarray(rl_lib.kl_per_token(lp, lr, "k3"), np.float64) * m, axis=1)))
    kl1 = float(np.mean(np.sum((lp - lr) * m, axis=1)))
    return {"proxy": float(proxy.mean()), "gold": float(np.mean([s.total for s in scores])), "kl": kl3,
            "kl_k1": kl1, "d": math.sqrt(max(kl3, 0.0)), "len": float(np.mean([len(r) for r in ids])),
            "true_facts": float(np.mean([s.true_facts for s in scores])),
            "false_facts": float(np.mean([s.false_facts for s in scores])), "sample": texts[0][:200]}


# ----------------------------------------------------------------------------- RL and DPO


def _phase_dir(ctx: Ctx, out_dir: pathlib.Path, stage_name: str) -> None:
    """Makes `out_dir` a chat-ready run directory for one optimisation phase (tokenizer, model
    config, config.json), and starts its logs over unless it holds checkpoints to resume."""
    from experiments import sft, stage

    c = ctx.cfg
    resuming = stage.check_fresh_or_resume(out_dir, c.resume)
    sft.write_run_files(out_dir, pathlib.Path(c.init), ctx.loaded.tokenizer, ctx.model_cfg, c, stage=stage_name,
                        template=ctx.template.name, base=str(pathlib.Path(c.init).resolve()),
                        world_data=common.load_run_config(c.init).get("world_data"))
    if not resuming:  # a killed phase that never checkpointed left logs behind
        for name in (common.METRICS_FILE, common.EVALS_FILE):
            (out_dir / name).unlink(missing_ok=True)


def _train_phase(ctx: Ctx, out_dir: pathlib.Path, *, stage_name: str, label: str, step_fn, optimizer, batches,
                 steps: int, fingerprint: dict, eval_key, tokens_per_step: int) -> tuple[list[dict], Any]:
    """One phase (RL or DPO) through the shared loop (experiments/stage.py): starts from the SFT
    policy, evaluates it at step 0 (kept in evals.jsonl across resumes) and every --eval_every
    steps, checkpoints every --ckpt_every steps and resumes exactly with --resume. Returns (the
    evaluations in step order, the final params)."""
    import jax

    from core import checkpoint as ck
    from core import loop
    from core import model as model_lib
    from core import train as train_lib
    from experiments import stage

    c = ctx.cfg
    _phase_dir(ctx, out_dir, stage_name)

    def evaluate(step, params) -> dict:
        ev = evaluate_policy(ctx, params, jax.random.fold_in(eval_key, step))
        common.say(f"{label} step {step}/{steps}: proxy {ev['proxy']:+.3f} gold {ev['gold']:+.3f} KL {ev['kl']:.3f} "
                   f"len {ev['len']:.1f} | {ev['sample'][:90]!r}")
        return ev

    evals_path = out_dir / common.EVALS_FILE
    if not any(r.get("step") == 0 for r in common.read_jsonl(evals_path)):
        with common.MetricsLogger(evals_path) as lg:
            lg.log({"step": 0, **evaluate(0, ctx.ref_params)})

    def init():  # the train state's buffers are donated every update: the SFT params stay intact
        return train_lib.train_state_from_params(jax.tree.map(lambda x: x.copy(), ctx.ref_params), ctx.model_cfg,
                                                 optimizer, ctx.mesh)

    shardings = train_lib.state_shardings(ctx.model_cfg, optimizer, ctx.mesh)
    peak, _ = common.peak_flops_total(ctx.mesh.devices.flatten().tolist())
    progress = common.Progress(steps, tokens_per_step, model_lib.flops_per_token(ctx.model_cfg, ctx.seq_len), peak)
    io = stage.StageIO(out_dir, fingerprint, 1, False, c.resume)
    loop_cfg = loop.LoopConfig(total_steps=steps, log_every=c.eval_every, eval_every=c.eval_every,
                               save_every=min(c.ckpt_every, steps))
    result = stage.train(step_fn, init, lambda: ck.abstract_state(jax.eval_shape(init), shardings), batches,
                         loop_cfg, io, mesh=ctx.mesh, progress=progress,
                         evaluate=lambda s, st: evaluate(s, st["params"]))
    if result.interrupted:
        raise _Interrupted(out_dir)
    evals = sorted(common.read_jsonl(evals_path), key=lambda r: r["step"])
    return evals, result.state["params"]


class _Interrupted(Exception):
    """Ctrl-C stopped a phase (its checkpoint is saved): the run stops, --resume continues it."""


def _fingerprint(ctx: Ctx, **run) -> dict:
    c = ctx.cfg
    return {"model_config": common.model_config_to_json(ctx.model_cfg),
            "run": {"init": str(pathlib.Path(c.init).resolve()), "seed": c.seed, "seq_len": ctx.seq_len,
                    "max_new_tokens": c.max_new_tokens, **run}}


def run_rl(ctx: Ctx, out_dir: pathlib.Path, *, steps: int, label: str, rm_size: int, stage_name: str = "rlhf"
           ) -> tuple[list[dict], Any]:
    """RL against the reward model `ctx.rm_params` (module docstring, step 3) in the run
    directory `out_dir`. Returns (the evaluations, step 0 = the SFT policy, as dicts with step,
    proxy, gold, kl, d; final params)."""
    import jax
    import numpy as np

    from core import loop
    from core import optim as optim_lib
    from core import rl as rl_lib
    from core import sharding as sharding_lib
    from core import train as train_lib
    from data import preferences as prefs
    from experiments import reward_model as rmx

    c = ctx.cfg
    in_loss = c.kl_placement == "loss"
    rl_cfg = rl_lib.RLConfig(estimator="grpo", kl_coef=c.kl_coef, kl_placement=c.kl_placement,
                             kl_estimator="k3" if in_loss else "k1", agg="token_mean")
    ocfg = optim_lib.OptimConfig(lr=c.rl_lr, warmup_steps=min(5, steps), total_steps=steps, schedule="constant",
                                 clip_norm=1.0)
    opt = optim_lib.make_optimizer(ocfg)
    update = train_lib.make_train_step(ctx.model_cfg, opt, ctx.mesh, rl_lib.make_policy_loss_fn(rl_cfg))
    prompts = prefs.preference_prompts(ctx.judge.world, steps * c.rl_prompts, c.seed + 7)
    key = jax.random.PRNGKey(c.seed + 11)
    counter = loop.ListIterator([{}])  # rollouts happen in the step; the loop only counts (resumable)

    def rl_step(state, _):
        s = counter.i - 1  # 0-based: this step's prompts and rollout key
        batch_prompts = prompts[s * c.rl_prompts: (s + 1) * c.rl_prompts]
        ids, _, prompt_ids = rmx.sample_responses(state["params"], ctx.model_cfg, ctx.template, batch_prompts,
                                                  c.rl_group, max_new_tokens=c.max_new_tokens, temperature=1.0,
                                                  key=jax.random.fold_in(key, s), mesh=ctx.mesh)
        rows_p = [prompt_ids[i // c.rl_group] for i in range(len(ids))]
        r_b = rmx.score_responses(ctx.reward_fn, ctx.rm_params, rows_p, ids, ctx.seq_len, mesh=ctx.mesh)
        rows = response_rows(rows_p, ids, ctx.seq_len)
        ref = token_logps(ctx.scorer, ctx.ref_params, rows, ctx.mesh) if c.kl_coef > 0 else None
        shaped = r_b
        batch = {**rows}
        if ref is not None and not in_loss:  # the KL in the reward needs the policy's log-probs first
            old = token_logps(ctx.scorer, state["params"], rows, ctx.mesh)
            shaped = np.asarray(rl_lib.kl_penalised_rewards(r_b, old, ref, rows["mask"], c.kl_coef, "k1"))
            batch["old_logp"] = old
        # else one on-policy update: the loss takes its own detached log-probs as the old ones
        adv = np.asarray(rl_lib.group_advantages(shaped.reshape(c.rl_prompts, c.rl_group), "grpo"), np.float32)
        batch["advantages"] = adv.reshape(-1)
        if in_loss and ref is not None:
            batch["ref_logp"] = ref
        state, m = update(state, sharding_lib.shard_batch(batch, ctx.mesh))
        m = jax.device_get(m)
        return state, {"proxy_reward": float(r_b.mean()), "shaped_reward": float(np.mean(shaped)),
                       "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                       "len": float(np.mean([len(r) for r in ids]))}

    fp = _fingerprint(ctx, phase="rl", rm_size=rm_size, rl=dataclasses.asdict(rl_cfg), optim=dataclasses.asdict(ocfg),
                      rl_prompts=c.rl_prompts, rl_group=c.rl_group)
    return _train_phase(ctx, out_dir, stage_name=stage_name, label=label, step_fn=rl_step, optimizer=opt,
                        batches=counter, steps=steps, fingerprint=fp, eval_key=jax.random.fold_in(key, 10**6),
                        tokens_per_step=c.rl_prompts * c.rl_group * ctx.seq_len)


def dpo_rows(template, pairs, seq_len: int) -> dict:
    """(comparison, chosen, rejected) triples -> DPO arrays: tokens / segment_ids / positions
    [B, 2, seq_len], mask [B, 2, seq_len - 1] (1 on the response's targets)."""
    prompts, responses = [], []
    for c, w, lo in pairs:
        p = template.render_for_completion([dict(m) for m in c.prompt.messages])
        prompts += [p, p]
        responses += [list(c.response_ids[w]), list(c.response_ids[lo])]
    rows = response_rows(prompts, responses, seq_len)
    return {k: v.reshape((len(pairs), 2) + v.shape[1:]) for k, v in rows.items()}


def run_dpo(ctx: Ctx, comparisons, out_dir: pathlib.Path, *, steps: int) -> tuple[list[dict], Any]:
    """DPO on every C(K,2) pair of `comparisons` (module docstring, step 4) in the run directory
    `out_dir`; (evaluations as RL's, final params)."""
    import jax
    import numpy as np

    from core import loop
    from core import optim as optim_lib
    from core import rl as rl_lib
    from core import train as train_lib
    from data import preferences as prefs

    c = ctx.cfg
    pairs = prefs.preference_pairs(comparisons)
    rows = dpo_rows(ctx.template, pairs, ctx.seq_len)
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in rows.items()}
    # the reference's log-probs are data: computed once, before any update
    rows["ref_logp"] = token_logps(ctx.scorer, ctx.ref_params, flat, ctx.mesh).sum(1).reshape(len(pairs), 2)
    ocfg = optim_lib.OptimConfig(lr=c.dpo_lr, warmup_steps=min(5, steps), total_steps=steps, schedule="constant",
                                 clip_norm=1.0)
    opt = optim_lib.make_optimizer(ocfg)
    update = train_lib.make_train_step(ctx.model_cfg, opt, ctx.mesh, rl_lib.make_dpo_loss_fn(c.dpo_beta))
    rng = np.random.default_rng(c.seed + 3)
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-steps * c.dpo_batch // len(pairs)))])
    batches = [{k: v[order[s * c.dpo_batch: (s + 1) * c.dpo_batch]] for k, v in rows.items()} for s in range(steps)]
    fp = _fingerprint(ctx, phase="dpo", n_pairs=len(pairs), dpo_beta=c.dpo_beta, dpo_batch=c.dpo_batch,
                      optim=dataclasses.asdict(ocfg))
    return _train_phase(ctx, out_dir, stage_name="dpo", label="dpo", step_fn=update, optimizer=opt,
                        batches=loop.ListIterator(batches), steps=steps, fingerprint=fp,
                        eval_key=jax.random.PRNGKey(c.seed + 13), tokens_per_step=2 * c.dpo_batch * ctx.seq_len)


# ----------------------------------------------------------------------------- report


def plot(summary: dict, path) -> None:
    """rlhf.png: proxy and gold vs d for best-of-n, RL and DPO (with the gold fits), and gold vs d
    of best-of-n (and RL) for every reward-model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    main = str(summary["rm_main"])

    def panel(ax, pts, title, form=None, fit=None, g0=None):
        # proxy on the left axis, gold on the right: their scales differ by an order of magnitude
        d = [p["d"] for p in pts]
        ax.plot(d, [p["proxy"] for p in pts], "o-", color="tab:blue", label="proxy (reward model)")
        ax.set_ylabel("proxy reward", color="tab:blue")
        gx = ax.twinx()
        gx.plot(d, [p["gold"] for p in pts], "s-", color="tab:orange", label="gold")
        if fit and fit.get("a") is not None and np.isfinite(fit["a"]) and g0 is not None:
            xs = np.linspace(0, max(d) * 1.05 or 1, 100)
            gx.plot(xs, g0 + gao_curve(xs, fit["a"], fit["b"], form), "--", color="tab:red",
                    label=f"gold fit a={fit['a']:.2f} b={fit['b']:.2f}")
        gx.set_ylabel("gold reward", color="tab:orange")
        ax.set_title(title)
        ax.set_xlabel("d = sqrt(KL to SFT) (nats^0.5)")
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = gx.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")

    bon = summary["best_of_n"][main]
    panel(axes[0], [{"d": d, "proxy": p, "gold": g} for d, p, g in zip(bon["d"], bon["proxy"], bon["gold"])],
          f"best-of-n, n=1..{bon['n'][-1]} (RM {main})", "bon", bon["fit"], bon["gold"][0])
    rl = summary["rl"][main]
    panel(axes[1], rl["evals"], f"RL vs RM {main} (KL {summary['config']['kl_placement']} "
          f"beta={summary['config']['kl_coef']})", "rl", rl["fit"], rl["evals"][0]["gold"])
    if summary.get("dpo"):
        panel(axes[2], summary["dpo"]["evals"], f"DPO beta={summary['config']['dpo_beta']}", "rl",
              summary["dpo"]["fit"], summary["dpo"]["evals"][0]["gold"])
    else:
        axes[2].set_visible(False)
    ax = axes[3]
    for size, b in summary["best_of_n"].items():
        ax.plot(b["d"], b["gold"], "o-", label=f"best-of-n, RM on {size} rankings")
    for size, r in summary["rl"].items():
        ax.plot([p["d"] for p in r["evals"]], [p["gold"] for p in r["evals"]], "s--", label=f"RL, RM on {size}")
    ax.set_title("gold reward vs d by reward-model training data")
    ax.set_xlabel("d = sqrt(KL)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report_section(summary: dict) -> str:
    """Markdown: the over-optimisation table (per method and reward model: proxy and gold at start
    and end, gold peak and d at the peak, the fitted a, b and the fit's peak)."""
    lines = ["## RLHF: optimising a learned reward model against a hidden gold reward", "",
             f"SFT policy `{summary['config']['init']}`; {summary['n_rankings']} labelled prompts x K="
             f"{summary['config']['k']} (label noise {summary['config']['label_noise']}); "
             f"proxy = the reward model on {summary['rm_main']} rankings. d = sqrt(KL to SFT). Gold fits are "
             "Gao et al. (2022): best-of-n d(a - b d), RL and DPO d(a - b log d), on gold - gold(SFT).", "",
             "| method | RM rankings | RM held-out acc (labels / gold) | proxy start -> end | gold start | gold peak "
             "| d at gold peak | gold end | fit a | fit b | fit d* |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(method, size, pts, fit):
        s = curve_summary(pts)
        rm = summary["reward_models"][str(size)]
        lines.append(f"| {method} | {size} | {_fmt(rm['val_pair_acc'])} / {_fmt(rm['val_gold_pair_acc'])} | "
                     f"{_fmt(s['proxy_start'])} -> {_fmt(s['proxy_end'])} | {_fmt(s['gold_start'])} | "
                     f"{_fmt(s['gold_peak'])} | {_fmt(s['d_at_gold_peak'])} | {_fmt(s['gold_end'])} | "
                     f"{_fmt(fit.get('a'))} | {_fmt(fit.get('b'))} | {_fmt(fit.get('d_peak'))} |")

    for size, b in summary["best_of_n"].items():
        row(f"best-of-n (n<={b['n'][-1]})", size,
            [{"d": d, "proxy": p, "gold": g} for d, p, g in zip(b["d"], b["proxy"], b["gold"])], b["fit"])
    for size, r in summary["rl"].items():
        row(f"RL ({r['steps']} steps)", size, r["evals"], r["fit"])
    if summary.get("dpo"):
        row(f"DPO ({summary['dpo']['steps']} steps)", summary["rm_main"], summary["dpo"]["evals"], summary["dpo"]["fit"])
    h = summary["headline"]
    lines += ["", f"RL against the proxy: proxy {h['proxy_start']:+.3f} -> {h['proxy_end']:+.3f}; gold "
              f"{h['gold_start']:+.3f} -> peak {h['gold_peak']:+.3f} at d = {h['d_at_gold_peak']:.3f} -> "
              f"{h['gold_end']:+.3f} at d = {h['d_end']:.3f}. Curves: `rlhf.png`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def rl_dir_name(size: int, main_size: int) -> str:
    """The RL policy's run directory under OUT: rl_policy against the main reward model."""
    return "rl_policy" if size == main_size else f"rl_rm{size}"


def check_out_dir(cfg: RLHFConfig) -> None:
    """An earlier run in --out_dir needs --resume (nothing is overwritten); every phase's
    checkpoints are checked before any work."""
    from experiments import stage

    out = pathlib.Path(cfg.out_dir)
    if not cfg.resume and (out / "comparisons.jsonl").exists():
        raise ValueError(f"--out_dir={out} holds an earlier rlhf run; pass --resume to continue it (finished "
                         f"parts are reused) or use a fresh --out_dir")
    main_size = max(cfg.sizes)
    for d in [rl_dir_name(s, main_size) for s in cfg.sizes] + ["dpo_policy"]:
        stage.check_fresh_or_resume(out / d, cfg.resume)


def run(cfg: RLHFConfig) -> dict:
    """Runs every phase (module docstring) and returns the summary (also OUT/summary.json);
    summary['headline'] is the RL run's curve_summary plus its fit. A Ctrl-C during RL or DPO
    saves that phase's checkpoint and returns {'interrupted': True, 'out_dir': ...}."""
    try:
        return _run(cfg)
    except _Interrupted:
        return {"interrupted": True, "out_dir": cfg.out_dir}


def _run(cfg: RLHFConfig) -> dict:
    import jax
    import numpy as np

    from core import sharding as sharding_lib
    from data import preferences as prefs
    from experiments import assistant_eval
    from experiments import reward_model as rmx

    t_start = time.time()
    out = pathlib.Path(cfg.out_dir)
    mesh = sharding_lib.make_mesh(cfg.mesh)
    div = sharding_lib.batch_divisor(mesh)
    if cfg.rm_batch % div or cfg.dpo_batch % div:
        raise ValueError(f"--rm_batch and --dpo_batch must be multiples of data x fsdp = {div}")
    check_out_dir(cfg)
    loaded = common.load_for_inference(cfg.init, mesh=mesh)
    if loaded.template is None:
        raise ValueError(f"--init={cfg.init}: no chat template")
    world = assistant_eval.world_of_run(cfg.init)
    out.mkdir(parents=True, exist_ok=True)
    options.save_config(cfg, out, stage="rlhf_experiment", base=str(pathlib.Path(cfg.init).resolve()))
    template, model_cfg = loaded.template, loaded.cfg
    judge = prefs.GoldJudge(world)

    # 1. the labelled pool, then one reward model per size
    pool_file, val_file = out / "comparisons.jsonl", out / "val_comparisons.jsonl"
    if pool_file.is_file() and val_file.is_file():
        pool, val = rmx.load_comparisons(pool_file), rmx.load_comparisons(val_file)
        common.say(f"rlhf: reusing {len(pool)} + {len(val)} labelled prompts from {out}")
    else:
        common.say(f"rlhf: sampling {cfg.k} SFT responses to {cfg.n_prompts} + {cfg.val_prompts} prompts ...")
        pool = rmx.make_comparisons(loaded.params, model_cfg, template, world,
                                    prefs.preference_prompts(world, cfg.n_prompts, cfg.seed), k=cfg.k,
                                    noise=cfg.label_noise, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                    seed=cfg.seed, mesh=mesh)
        val = rmx.make_comparisons(loaded.params, model_cfg, template, world,
                                   prefs.preference_prompts(world, cfg.val_prompts, cfg.seed, split="heldout"), k=cfg.k,
                                   noise=cfg.label_noise, max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                   seed=cfg.seed + 1, mesh=mesh)
        rmx.save_comparisons(pool_file, pool)
        rmx.save_comparisons(val_file, val)
    rm_summaries, rm_params = {}, {}
    for size in cfg.sizes:
        d = out / f"rm_{size}"
        if not (d / rmx.HEAD_FILE).is_file():
            rcfg = rmx.RewardModelConfig(init=cfg.init, out_dir=str(d), n_prompts=size, val_prompts=len(val), k=cfg.k,
                                         label_noise=cfg.label_noise, max_new_tokens=cfg.max_new_tokens,
                                         batch_size=cfg.rm_batch, steps=cfg.rm_steps, lr=cfg.rm_lr,
                                         head_lr=cfg.rm_head_lr, mesh=cfg.mesh, seed=cfg.seed,
                                         eval_every=0, ckpt_every=cfg.rm_steps, log_every=max(1, cfg.rm_steps // 4),
                                         async_checkpoint=False, resume=True)
            rm_summaries[str(size)] = rmx.run(rcfg, comparisons=pool[:size], val_comparisons=val, loaded=loaded,
                                              world=world)
        else:
            evs = common.read_jsonl(d / common.EVALS_FILE)
            rm_summaries[str(size)] = {"val_pair_acc": float(evs[-1]["val_pair_acc"]),  # "nan" in JSON -> NaN
                                       "val_gold_pair_acc": float(evs[-1]["val_gold_pair_acc"])}
        rm_params[size] = rmx.load_reward_model(d, mesh=mesh).params
    main_size = max(cfg.sizes)
    seq_len = row_len(template, world, cfg.max_new_tokens, model_cfg)
    eval_prompts = prefs.preference_prompts(world, cfg.eval_prompts, cfg.seed + 5, split="heldout")
    ctx = Ctx(cfg, model_cfg, template, loaded.params, judge, mesh, seq_len, make_token_scorer(model_cfg),
              rmx.make_reward_fn(model_cfg), rm_params[main_size], eval_prompts, loaded)

    # 2. best-of-n from one pool, scored by every reward model
    t = time.time()
    bon_prompts = prefs.preference_prompts(world, cfg.bon_prompts, cfg.seed + 9, split="heldout")
    ids, texts, prompt_ids = rmx.sample_responses(loaded.params, model_cfg, template, bon_prompts, cfg.bon_max_n,
                                                  max_new_tokens=cfg.max_new_tokens, temperature=1.0,
                                                  key=jax.random.PRNGKey(cfg.seed + 9), mesh=mesh, chunk=8)
    rows_p = [prompt_ids[i // cfg.bon_max_n] for i in range(len(ids))]
    gold = judge.scores([bon_prompts[i // cfg.bon_max_n].entity for i in range(len(ids))], texts)
    gold_pm = gold.reshape(cfg.bon_prompts, cfg.bon_max_n)
    ns = [2 ** i for i in range(int(math.log2(cfg.bon_max_n)) + 1)]
    best_of_n = {}
    for size in cfg.sizes:
        proxy = rmx.score_responses(ctx.reward_fn, rm_params[size], rows_p, ids, seq_len, mesh=mesh)
        curve = best_of_n_curve(proxy.reshape(gold_pm.shape), gold_pm, ns)
        curve["fit"] = fit_gao(curve["d"], np.asarray(curve["gold"]) - curve["gold"][0], "bon")
        best_of_n[str(size)] = curve
        common.say(f"best-of-n (RM {size}): " + ", ".join(f"n={n}: proxy {p:+.2f} gold {g:+.2f}" for n, p, g in
                                                          zip(curve["n"], curve["proxy"], curve["gold"])))
    common.say(f"best-of-n: {len(ids)} samples scored in {common.format_duration(time.time() - t)}")

    # 3. RL against the largest reward model (and optionally every other)
    rl = {}
    for size in sorted(cfg.sizes, reverse=True):
        if size != main_size and not cfg.rl_all_rms:
            continue
        # the proxy reported is the reward model being optimised
        evals, _ = run_rl(dataclasses.replace(ctx, rm_params=rm_params[size]), out / rl_dir_name(size, main_size),
                          steps=cfg.rl_steps, label=f"rl (RM {size})", rm_size=size)
        rl[str(size)] = {"evals": evals, "steps": cfg.rl_steps,
                         "fit": fit_gao([e["d"] for e in evals], [e["gold"] - evals[0]["gold"] for e in evals], "rl")}

    # 4. DPO on the main reward model's rankings
    dpo = None
    if cfg.dpo_steps:
        evals, _ = run_dpo(ctx, pool[:main_size], out / "dpo_policy", steps=cfg.dpo_steps)
        dpo = {"evals": evals, "steps": cfg.dpo_steps,
               "fit": fit_gao([e["d"] for e in evals], [e["gold"] - evals[0]["gold"] for e in evals], "rl")}

    headline = {**curve_summary(rl[str(main_size)]["evals"]), "fit_a": rl[str(main_size)]["fit"]["a"],
                "fit_b": rl[str(main_size)]["fit"]["b"], "fit_d_peak": rl[str(main_size)]["fit"]["d_peak"],
                "bon_fit_a": best_of_n[str(main_size)]["fit"]["a"], "bon_fit_b": best_of_n[str(main_size)]["fit"]["b"],
                "bon_gold_peak": max(best_of_n[str(main_size)]["gold"])}
    summary = {"config": options.to_json(cfg), "rm_main": main_size, "n_rankings": len(pool),
               "reward_models": rm_summaries, "best_of_n": best_of_n, "rl": rl, "dpo": dpo, "headline": headline,
               "wall_s": time.time() - t_start}
    common.save_json(out / "summary.json", summary)
    plot(summary, out / "rlhf.png")
    (out / "report.md").write_text(report_section(summary), encoding="utf-8")
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    summary = run(options.from_flags(RLHFConfig))
    if summary.get("interrupted"):
        return
    print(report_section(summary))
    print(json.dumps({k: summary["headline"][k] for k in ("proxy_start", "proxy_end", "gold_start", "gold_peak",
                                                          "gold_end", "d_at_gold_peak", "d_end", "fit_a", "fit_b",
                                                          "fit_d_peak", "bon_gold_peak")}))


if __name__ == "__main__":
    options.define_flags(RLHFConfig)
    app.run(common.cli(main))
