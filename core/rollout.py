"""Rollouts for RL on verifiable rewards: prompts -> G samples each -> rewards -> advantages -> a
training batch for `core.rl.make_policy_loss_fn`.

One step's rollout (`collect`):

  1. N prompts (task items: `.prompt` messages, `.score(text) -> core.rewards.Score`) are rendered
     by the chat template and sampled G times each by `core.sampling.generate` (the G samples
     share the prompt's prefill; tool calls run inside the stream and their outputs are
     force-fed, `sampled_mask` 0).
  2. Each reply's own text (tool outputs excluded) is scored; DAPO's soft overlong penalty,
     counted in tokens, is added when `rl_cfg.overlong == 'soft'`.
  3. Dynamic sampling (`rl_cfg.dynamic_sampling`): groups whose G rewards are all equal carry no
     signal and are dropped; more prompts are drawn, at most `max_rounds` rounds in all. If the
     batch is still short, the missing groups are rows with mask 0 (they change no gradient), so
     every step has the same shape and nothing recompiles.
  4. The rows become a batch in core/loss.py's convention: tokens / segment_ids / positions
     [B, T+1] = prompt + completion + padding, and a target mask [B, T] that is 1 exactly on
     completion tokens the policy sampled (prompt tokens, force-fed tool outputs and padding are
     0; with `rl_cfg.overlong == 'mask'` truncated rows are 0 throughout).
  5. Old log-probs are recomputed with the training forward (the same scorer the loss uses, so
     the first update's ratio is exactly 1) and compared with the sampler's per token
     (`logp_diff_*`: the rollout/train mismatch that silently breaks other libraries' runs).
     With `recompute_old_logp=False` (one pass over one mini-batch: the update is on-policy)
     this pass is skipped: the update's own forward is the training forward, its detached
     log-probs are the old ones, and it reports the mismatch and entropy itself.
     Reference log-probs come from a frozen params tree, only when a KL term is on
     (`kl_coef > 0`, placed in the loss or in the reward).
  6. Advantages `core.rl.group_advantages(rewards_ng, rl_cfg.estimator)`, per row.

`minibatches` then cuts the batch into whole-group mini-batches for mu inner iterations
(experiments/rl.py runs them through `core.train.make_train_step`).

Row order is prompt-major: row n * G + g is sample g of prompt n (as in core/rl.py).
Everything here is host orchestration around jitted pieces; nothing does file I/O.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core import chat as chat_lib
from core import loss as loss_lib
from core import model as model_lib
from core import rl as rl_lib
from core import sampling
from core import sharding as sharding_lib


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ----------------------------------------------------------------------------- checks


def check_group_batch(rows: int, group_size: int, what: str = "batch") -> None:
    """Clear errors for G < 2 and a batch of `rows` that G does not divide."""
    _check(group_size >= 2, f"group size G = {group_size}: group-relative advantages need G >= 2 samples per "
                            f"prompt (a single sample has no baseline)")
    _check(rows % group_size == 0, f"{what} of {rows} rows is not a multiple of the group size G = {group_size}: "
                                   f"every group of G samples of one prompt must stay in one {what}")


def check_template(template) -> None:
    """A template RL can sample replies with: it must say where an assistant turn ends."""
    _check(template is not None, "the model has no chat template; RL samples assistant replies and needs one")
    eot = getattr(template, "end_of_turn", "n/a")  # JinjaTemplate: the end-of-turn id it found, or None
    _check(eot is not None and bool(template.stop_ids),
           f"chat template {template.name!r} has no end-of-turn token (stop ids {tuple(template.stop_ids)}): "
           f"replies could never end, so rewards and lengths would be meaningless")


# ----------------------------------------------------------------------------- text and rewards


def render_prompts(template, tasks: Sequence[Any]) -> list[list[int]]:
    """Prompt ids (ending with the assistant header) for each task's messages."""
    return [template.render_for_completion([dict(m) for m in t.prompt]) for t in tasks]


def response_text(template, ids: Sequence[int]) -> str:
    """The reply's own text (its text parts; tool calls and tool outputs left out), read up to the
    first stop id: what a reward function judges."""
    msg = template.parse_assistant(list(ids))
    return "".join(p["text"] for p in chat_lib.message_parts(msg) if p["type"] == "text")


def score_texts(tasks: Sequence[Any], texts: Sequence[str], task_index: Sequence[int]):
    """(reward_b, strict_b, lenient_b) float32 / bool arrays; row b is `tasks[task_index[b]]`'s reply.

    A reward function that raises is an error naming the task and the reply (a reward bug must
    not train silently on zeros)."""
    n = len(texts)
    reward, strict, lenient = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
    for b, (text, i) in enumerate(zip(texts, task_index)):
        task = tasks[int(i)]
        try:
            s = task.score(text)
            r = float(s.reward)
        except Exception as e:  # noqa: BLE001 - re-raised with the task and reply named
            raise ValueError(f"the reward function of task {getattr(task, 'id', i)!r} raised "
                             f"{type(e).__name__}: {e} (on the reply {text[:120]!r})") from e
        _check(np.isfinite(r), f"the reward function of task {getattr(task, 'id', i)!r} returned {r} "
                               f"(on the reply {text[:120]!r}); rewards must be finite")
        reward[b], strict[b], lenient[b] = r, bool(s.strict), bool(s.lenient)
    return reward, strict, lenient


# ----------------------------------------------------------------------------- rows -> batch


def build_rows(prompts: Sequence[Sequence[int]], res: sampling.GenerateResult, seq_len: int,
               keep_b: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Prompt + completion rows in core/loss.py's batch convention.

    Args:
      prompts: the unique prompts' ids (row b continues prompts[res.prompt_index[b]]).
      res: the sampler's result.
      seq_len: T + 1, the row length (every row is padded to it; longer is an error).
      keep_b: optional bool [B]; rows with False get mask 0 everywhere (overlong masking).

    Returns numpy arrays:
      tokens, segment_ids, positions int32 [B, T+1] (segment 1 on the row's tokens, 0 padding);
      mask int32 [B, T]: mask[b, t] = 1 iff target tokens[b, t+1] is a completion token the
        policy sampled (sampled_mask 1);
      sampler_logp float32 [B, T]: the sampler's log-prob of that target (0 elsewhere);
      completion_start int32 [B]: index in tokens of the first completion token.
    """
    n = len(res.lengths)
    tokens = np.zeros((n, seq_len), np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len - 1), np.int32)
    slogp = np.zeros((n, seq_len - 1), np.float32)
    start = np.zeros((n,), np.int32)
    for b in range(n):
        p = prompts[int(res.prompt_index[b])]
        L = int(res.lengths[b])
        total = len(p) + L
        _check(total <= seq_len, f"a rollout row has {total} tokens (prompt {len(p)} + completion {L}) but "
                                 f"rows hold {seq_len}; raise the row length")
        tokens[b, : len(p)] = p
        tokens[b, len(p): total] = res.tokens[b, :L]
        seg[b, :total] = 1
        start[b] = len(p)
        if keep_b is None or keep_b[b]:
            # target index t predicts tokens[t + 1]: completion token j sits at len(p) + j
            mask[b, len(p) - 1: total - 1] = res.sampled_mask[b, :L]
            slogp[b, len(p) - 1: total - 1] = res.sample_logprobs[b, :L]
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"tokens": tokens, "segment_ids": seg, "positions": positions, "mask": mask,
            "sampler_logp": slogp * mask, "completion_start": start}


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """n rows that count for nothing (mask 0): fill for a dynamic-sampling batch left short."""
    z = np.zeros((n, seq_len), np.int32)
    return {"tokens": z, "segment_ids": z.copy(), "positions": z.copy(), "mask": np.zeros((n, seq_len - 1), np.int32),
            "sampler_logp": np.zeros((n, seq_len - 1), np.float32), "completion_start": np.zeros((n,), np.int32)}


def concat_rows(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def take_rows(rows: Mapping[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in rows.items()}


MODEL_KEYS = ("tokens", "segment_ids", "positions", "mask")


# ----------------------------------------------------------------------------- scoring


def make_scorer(model_cfg: model_lib.ModelConfig, *, temperature: float = 1.0, with_entropy: bool = True):
    """jit (params, batch) -> (logp_bt, entropy_bt): the training forward's log-probs of a batch's
    targets (0 where masked) and the entropy of each next-token distribution (nats).

    logp is computed exactly as `core.rl.make_policy_loss_fn(temperature=...)` computes it (the
    shared scorer at temperature 1), so recomputed old log-probs give ratio 1 on the first update.
    """
    _check(temperature > 0, f"temperature must be > 0, got {temperature}")

    def score(params, batch):
        logp, mask, h = loss_lib.token_logprobs_and_hidden(params, batch, model_cfg, temperature=temperature)
        if not with_entropy:
            return logp, jnp.zeros_like(logp)
        ent = loss_lib.hidden_entropy(params, h, model_cfg, temperature=temperature)
        return logp, jnp.where(mask, ent, 0.0)

    return jax.jit(score)


def score_rows(scorer, params, rows: Mapping[str, np.ndarray], chunk: int, shard=None):
    """Runs `scorer` over the rows `chunk` at a time (bounded memory for large vocabularies).
    Returns host (logp_bt, entropy_bt) float32. `shard(batch) -> device batch` places a chunk."""
    n = rows["tokens"].shape[0]
    logps, ents = [], []
    for lo in range(0, n, chunk):
        b = {k: rows[k][lo: lo + chunk] for k in MODEL_KEYS}
        if shard is not None:
            b = shard(b)
        lp, en = sharding_lib.to_host(scorer(params, b))
        logps.append(np.asarray(lp, np.float32))
        ents.append(np.asarray(en, np.float32))
    return np.concatenate(logps), np.concatenate(ents)


def scored_metrics(logp_bt, entropy_bt, sampler_logp_bt, mask_bt) -> dict[str, float]:
    """Token means over the mask: entropy, |trainer - sampler| log-prob difference (mean, max)."""
    mask = np.asarray(mask_bt, np.float32)
    tok = max(float(mask.sum()), 1.0)
    diff = np.abs(np.asarray(logp_bt) - np.asarray(sampler_logp_bt)) * mask
    return {"entropy": float((np.asarray(entropy_bt) * mask).sum() / tok), "logp_diff_mean": float(diff.sum() / tok),
            "logp_diff_max": float(diff.max()) if diff.size else 0.0}


# ----------------------------------------------------------------------------- collect


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How a step's rollout is drawn (the loss knobs live in core.rl.RLConfig).

    n_prompts: N, prompts per step; group_size: G, samples per prompt (the batch has N * G rows).
    max_new_tokens: completion budget in tokens (tool outputs count); temperature: sampling
    temperature (the loss uses the same); seq_len: row length T + 1 (longest prompt +
    max_new_tokens at least); max_rounds: dynamic-sampling draws per step, at most;
    score_chunk: rows per scoring call; max_rows: rows the engine decodes at once (None = all
    N * G; fewer: continuous batching, a finished prompt's slot takes the next prompt);
    tool_workers: tool calls running concurrently; recompute_old_logp: score the batch with the
    training forward before the update (needed for mu > 1, several mini-batches or the KL in
    the reward); False leaves 'old_logp' out of the batch (an on-policy update, see step 5).
    """

    n_prompts: int
    group_size: int
    max_new_tokens: int
    seq_len: int
    temperature: float = 1.0
    max_rounds: int = 3
    score_chunk: int = 64
    max_rows: Optional[int] = None
    tool_workers: int = 8
    recompute_old_logp: bool = True

    def __post_init__(self):
        _check(self.n_prompts >= 1, f"prompts per step must be >= 1, got {self.n_prompts}")
        check_group_batch(self.n_prompts * self.group_size, self.group_size, "rollout batch")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature > 0, f"rollouts sample: temperature must be > 0, got {self.temperature}")
        _check(self.max_rounds >= 1, f"max_rounds must be >= 1, got {self.max_rounds}")
        _check(self.seq_len > self.max_new_tokens, f"seq_len {self.seq_len} leaves no room for a prompt")
        _check(self.max_rows is None or self.max_rows >= self.group_size,
               f"max_rows {self.max_rows} must hold one prompt's {self.group_size} samples")
        _check(self.tool_workers >= 1, f"tool_workers must be >= 1, got {self.tool_workers}")

    @property
    def rows(self) -> int:
        return self.n_prompts * self.group_size


@dataclasses.dataclass
class Rollout:
    """One step's training batch and what was measured on the way.

    batch: host numpy {'tokens', 'segment_ids', 'positions' [B, T+1], 'mask' [B, T],
      'old_logp' [B, T], 'advantages' [B], and 'ref_logp' [B, T] when the KL term is in the loss}.
    rewards_ng: the kept groups' rewards (after shaping) [N, G].
    metrics: host floats (see `collect`).
    texts: every generated reply's text, in draw order; task_ids: their task ids.
    """

    batch: dict
    rewards_ng: np.ndarray
    metrics: dict
    texts: list
    task_ids: list


def collect(params, draw: Callable[[int], Sequence[Any]], key: jax.Array, *, model_cfg, template,
            rl_cfg: rl_lib.RLConfig, rcfg: RolloutConfig, scorer, ref_params=None,
            tools: Optional[Mapping[str, Callable[[str], str]]] = None, mesh=None, shard=None) -> Rollout:
    """One step's rollout (see the module docstring).

    Args:
      params: the policy (sampled and scored).
      draw: n -> the next n task items (a resumable prompt stream; dynamic sampling draws more).
      key: PRNG key of this step; round r samples with fold_in(key, r).
      model_cfg, template: the model and its chat template.
      rl_cfg: the loss / shaping knobs (estimator, kl, dynamic_sampling, overlong, ...).
      rcfg: N, G, lengths, temperature.
      scorer: `make_scorer(model_cfg, temperature=rcfg.temperature)`.
      ref_params: the frozen reference policy; required when rl_cfg.kl_coef > 0.
      tools: tools served in the stream (their outputs get mask 0).
      mesh: sampling mesh; shard: host batch -> device batch for the scorer.

    Returns:
      Rollout. Its metrics (host floats), over every reply generated this step unless noted:
        reward_mean, reward_std, acc_strict, acc_lenient, len_mean, len_correct, len_wrong
        (tokens; lenient correctness), truncation_rate (hit max_new_tokens), zero_var_frac
        (groups with all-equal rewards), tool_calls (per reply), rounds, prompts_drawn,
        groups_kept (of N), entropy (token mean over the batch's mask), logp_diff_mean /
        logp_diff_max (|trainer - sampler| per sampled token; these three only when the batch
        is scored here, rcfg.recompute_old_logp: else the update reports entropy and
        logp_diff_mean), kl_ref (k3 to the reference, when scored here,
        token mean; when a reference exists), adv_abs_mean, rollout_tokens, rollout_s, score_s.
    """
    check_template(template)
    kl_on = rl_cfg.kl_coef > 0
    _check(not kl_on or ref_params is not None,
           f"kl_coef = {rl_cfg.kl_coef} needs the reference policy (ref_params)")
    n, g = rcfg.n_prompts, rcfg.group_size
    scfg = sampling.SamplingConfig(temperature=rcfg.temperature, max_new_tokens=rcfg.max_new_tokens,
                                   stop_ids=tuple(template.stop_ids))
    t0 = time.perf_counter()
    kept_rows, kept_rewards = [], []
    all_reward, all_strict, all_lenient, all_len, all_trunc, all_tools = [], [], [], [], [], []
    texts, task_ids = [], []
    groups_seen = zero_var = prompts_drawn = rounds = 0
    while rounds < rcfg.max_rounds and len(kept_rewards) < n:
        tasks = list(draw(n))
        _check(len(tasks) == n, f"the prompt stream gave {len(tasks)} prompts, expected {n}")
        prompts = render_prompts(template, tasks)
        res = sampling.generate(params, model_cfg, prompts, scfg, jax.random.fold_in(key, rounds), n_samples=g,
                                tools=tools or None, template=template, mesh=mesh, max_rows=rcfg.max_rows,
                                tool_workers=rcfg.tool_workers)
        rounds += 1
        prompts_drawn += n
        row_texts = [response_text(template, res.row_tokens(b)) for b in range(n * g)]
        reward, strict, lenient = score_texts(tasks, row_texts, res.prompt_index)
        lengths = res.lengths.astype(np.float32)
        truncated = np.asarray([f == "length" for f in res.finish_reason])
        if rl_cfg.overlong == "soft":
            buffer = rl_cfg.overlong_buffer or max(1, rcfg.max_new_tokens // 4)
            reward = reward + np.asarray(rl_lib.overlong_penalty(lengths, rcfg.max_new_tokens, buffer,
                                                                 rl_cfg.overlong_penalty), np.float32)
        keep_b = ~truncated if rl_cfg.overlong == "mask" else None
        rows = build_rows(prompts, res, rcfg.seq_len, keep_b)
        r_ng = reward.reshape(n, g)
        zv = np.asarray(rl_lib.zero_variance_groups(r_ng))
        groups_seen += n
        zero_var += int(zv.sum())
        keep_n = ~zv if rl_cfg.dynamic_sampling else np.ones(n, bool)
        for i in np.flatnonzero(keep_n):
            kept_rows.append(take_rows(rows, slice(i * g, (i + 1) * g)))
            kept_rewards.append(r_ng[i])
        all_reward.append(reward); all_strict.append(strict); all_lenient.append(lenient)  # noqa: E702
        all_len.append(lengths); all_trunc.append(truncated)  # noqa: E702
        all_tools.append(np.asarray([len(c) for c in res.tool_calls], np.float32))
        texts += row_texts
        task_ids += [getattr(tasks[int(i)], "id", str(i)) for i in res.prompt_index]
        if not rl_cfg.dynamic_sampling:
            break
    kept_rows, kept_rewards = kept_rows[:n], kept_rewards[:n]
    n_kept = len(kept_rows)
    if n_kept < n:  # dynamic sampling ran out of rounds: fill with rows that count for nothing
        kept_rows.append(empty_rows((n - n_kept) * g, rcfg.seq_len))
        kept_rewards += [np.zeros(g, np.float32)] * (n - n_kept)
    rows = concat_rows(kept_rows)
    rewards_ng = np.stack(kept_rewards).astype(np.float32)
    t1 = time.perf_counter()

    # KL in the reward needs the policy's log-probs before the update: score even on-policy.
    recompute = rcfg.recompute_old_logp or (kl_on and rl_cfg.kl_placement == "reward")
    old_logp = entropy = None
    if recompute:
        old_logp, entropy = score_rows(scorer, params, rows, rcfg.score_chunk, shard)
    mask = rows["mask"].astype(np.float32)
    ref_logp = None
    if kl_on:
        ref_logp, _ = score_rows(scorer, ref_params, rows, rcfg.score_chunk, shard)
        if rl_cfg.kl_placement == "reward":
            r_b = rl_lib.kl_penalised_rewards(rewards_ng.reshape(-1), old_logp, ref_logp, mask, rl_cfg.kl_coef,
                                              rl_cfg.kl_estimator)
            rewards_ng = np.asarray(r_b, np.float32).reshape(n, g)
    adv_ng = np.array(rl_lib.group_advantages(rewards_ng, rl_cfg.estimator), np.float32)
    if n_kept < n:
        adv_ng[n_kept:] = 0.0
    batch = {k: rows[k] for k in MODEL_KEYS}
    if recompute:
        batch["old_logp"] = old_logp
    else:  # the update measures the mismatch against these itself
        batch["sampler_logp"] = rows["sampler_logp"].astype(np.float32)
    batch["advantages"] = adv_ng.reshape(-1)
    if kl_on and rl_cfg.kl_placement == "loss":
        batch["ref_logp"] = ref_logp
    t2 = time.perf_counter()

    reward, lenient = np.concatenate(all_reward), np.concatenate(all_lenient)
    lengths = np.concatenate(all_len)
    tok = max(float(mask.sum()), 1.0)
    metrics = {
        "reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
        "acc_strict": float(np.concatenate(all_strict).mean()), "acc_lenient": float(lenient.mean()),
        "len_mean": float(lengths.mean()),
        "len_correct": float(lengths[lenient].mean()) if lenient.any() else float("nan"),
        "len_wrong": float(lengths[~lenient].mean()) if (~lenient).any() else float("nan"),
        "truncation_rate": float(np.concatenate(all_trunc).mean()),
        "zero_var_frac": zero_var / max(groups_seen, 1), "tool_calls": float(np.concatenate(all_tools).mean()),
        "rounds": float(rounds), "prompts_drawn": float(prompts_drawn), "groups_kept": float(n_kept),
        "adv_abs_mean": float(np.abs(adv_ng).mean()),
        "rollout_tokens": float(lengths.sum()), "completion_tokens_trained": float(mask.sum()),
        "rollout_s": t1 - t0, "score_s": t2 - t1,
    }
    if recompute:
        metrics.update(scored_metrics(old_logp, entropy, rows["sampler_logp"], mask))
    if ref_logp is not None and old_logp is not None:
        metrics["kl_ref"] = float((np.asarray(rl_lib.kl_per_token(old_logp, ref_logp, "k3")) * mask).sum() / tok)
    return Rollout(batch=batch, rewards_ng=rewards_ng, metrics=metrics, texts=texts, task_ids=task_ids)


def minibatches(batch: Mapping[str, np.ndarray], group_size: int, size: int, seed: int) -> list[dict]:
    """The batch's groups shuffled (numpy Generator(seed)) and cut into mini-batches of `size` rows
    (whole groups), for one of mu inner iterations. `size` = the batch gives it back whole."""
    b = batch["tokens"].shape[0]
    check_group_batch(size, group_size, "mini-batch")
    _check(b % size == 0, f"the rollout batch of {b} rows is not a multiple of the mini-batch size {size}")
    if size == b:
        return [dict(batch)]
    order = np.random.default_rng(seed).permutation(b // group_size)
    rows = (order[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
    return [{k: v[rows[lo: lo + size]] for k, v in batch.items()} for lo in range(0, b, size)]


# ----------------------------------------------------------------------------- evaluation


def evaluate(params, tasks: Sequence[Any], *, model_cfg, template, max_new_tokens: int, key: jax.Array,
             k: int = 0, temperature: float = 1.0, tools=None, mesh=None,
             groups: Optional[Sequence[str]] = None) -> dict:
    """Held-out accuracy: greedy pass@1 and (k > 0) sampled pass@k, strict and lenient.

    groups: optional label per task (e.g. 'unseen_template' / 'unseen_numbers'); greedy lenient
      accuracy is then also reported per label, as 'greedy_lenient/LABEL'.
    Returns {'greedy_lenient', 'greedy_strict', 'mean_len' (greedy reply tokens), 'truncation_rate',
    'pass@k_lenient', 'pass@k_strict' (a prompt passes when any of its k samples is right),
    'n', 'texts' (the greedy replies)}.
    """
    if groups is not None and len(groups) != len(tasks):
        raise ValueError(f"groups has {len(groups)} labels for {len(tasks)} tasks")
    check_template(template)
    prompts = render_prompts(template, tasks)
    greedy = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=tuple(template.stop_ids))
    res = sampling.generate(params, model_cfg, prompts, greedy, key, tools=tools or None, template=template, mesh=mesh)
    texts = [response_text(template, res.row_tokens(b)) for b in range(len(prompts))]
    _, strict, lenient = score_texts(tasks, texts, res.prompt_index)
    out = {"greedy_lenient": float(lenient.mean()), "greedy_strict": float(strict.mean()),
           "mean_len": float(res.lengths.mean()),
           "truncation_rate": float(np.mean([f == "length" for f in res.finish_reason])), "n": len(tasks),
           "texts": texts}
    for label in sorted(set(groups or ())):
        rows = np.array([g == label for g in groups])
        out[f"greedy_lenient/{label}"] = float(lenient[rows].mean())
    if k > 0:
        scfg = dataclasses.replace(greedy, temperature=temperature)
        res = sampling.generate(params, model_cfg, prompts, scfg, jax.random.fold_in(key, 1), n_samples=k,
                                tools=tools or None, template=template, mesh=mesh)
        texts_k = [response_text(template, res.row_tokens(b)) for b in range(len(prompts) * k)]
        _, s_k, l_k = score_texts(tasks, texts_k, res.prompt_index)
        out[f"pass@{k}_lenient"] = float(l_k.reshape(-1, k).any(1).mean())
        out[f"pass@{k}_strict"] = float(s_k.reshape(-1, k).any(1).mean())
        out["sampled_lenient"] = float(l_k.mean())
    return out
