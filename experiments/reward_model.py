"""A reward model learned from a simulated human's comparisons (InstructGPT's recipe).

    python -m experiments.reward_model --init=runs/main/sft --out_dir=runs/main/rm
    python -m experiments.reward_model ... --n_prompts=1024 --label_noise=0.5 --resume

1. Prompts ("Tell me about <entity>", data/preferences.py) are answered K times by the --init
   SFT model at temperature 1; the labeller ranks each prompt's K responses by a Bradley-Terry
   draw from the hidden gold reward (--label_noise). The rankings are written to
   comparisons.jsonl (train) and val_comparisons.jsonl (held-out entities and phrasings).
2. The reward model is the SFT transformer plus a scalar head (core/reward_model.py) read at the
   response's final token; loss: -log sigmoid(r_w - r_l) averaged over all C(K,2) pairs of one
   prompt, whose K responses sit in one batch element ([N, K, T]). The head learns at
   --head_lr, the body at --lr (core.optim parameter groups). Trained with the shared loop
   (experiments/stage.py): checkpoints, metrics.jsonl, evals.jsonl, Ctrl-C, --resume.
3. Evaluation: pairwise accuracy on the held-out comparisons, against the labeller's rankings
   (`val_pair_acc`; pairs of token-identical responses skipped) and against the gold order
   (`val_gold_pair_acc`; pairs of equal gold skipped).
4. After training, the head's bias is shifted so the reference responses (the SFT model's
   samples of the training prompts) average reward 0, and the exported params {'model', 'head'}
   are written to the run directory (`reward_head.npz` holds the shifted head; the checkpoints
   the trained one). `load_reward_model(out_dir)` returns them ready to score.

The script's last line is JSON: val_pair_acc, val_gold_pair_acc, label_gold_agreement,
n_comparisons, reference_mean_before_shift, steps, wall_s.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Optional, Sequence

from absl import app

from experiments import common, options, stage

_f = options.field
HEAD_FILE = "reward_head.npz"
TRAIN_FILE = "comparisons.jsonl"
VAL_FILE = "val_comparisons.jsonl"


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """Everything a reward-model run depends on; its fields are the script's flags."""

    init: Optional[str] = _f(None, "the SFT run directory (its model answers the prompts and initialises the RM)")
    out_dir: Optional[str] = _f(None, "run directory of the reward model")
    n_prompts: int = _f(512, "training prompts; each gives one ranking of --k responses (C(k,2) comparisons)")
    val_prompts: int = _f(64, "held-out prompts (held-out entities and phrasings) for pairwise accuracy")
    k: int = _f(4, "responses ranked per prompt")
    label_noise: float = _f(0.5, "the labeller's Bradley-Terry temperature on gold rewards (0 = perfect)")
    max_new_tokens: int = _f(48, "response budget in tokens")
    temperature: float = _f(1.0, "sampling temperature of the responses")
    batch_size: int = _f(16, "prompts (rankings) per step")
    steps: int = _f(200, "optimizer steps")
    lr: float = _f(3e-4, "peak learning rate of the transformer body")
    head_lr: float = _f(3e-3, "peak learning rate of the scalar head")
    warmup_steps: int = _f(10, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only)")
    clip_norm: float = _f(1.0, "gradient-norm clip per parameter group (0 = off)")
    mesh: str = _f("data:-1", "device mesh, e.g. 'data:2,fsdp:2,tensor:2'")
    seed: int = _f(0, "seed for prompts, sampling, labels and data order")
    resume: bool = _f(False, "continue from the last complete checkpoint in --out_dir")
    log_every: int = _f(25, "print a progress line every N steps")
    eval_every: int = _f(50, "held-out pairwise accuracy every N steps (0 = end only)")
    ckpt_every: int = _f(100, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(1, "keep the last K checkpoints")
    async_checkpoint: bool = _f(True, "write checkpoints in the background")

    def __post_init__(self):
        need = options.need
        need(bool(self.init), "--init is required (an SFT run directory)")
        need(bool(self.out_dir), "--out_dir is required")
        need(pathlib.Path(self.init).resolve() != pathlib.Path(self.out_dir).resolve(),
             "--out_dir must differ from --init (the SFT model is never overwritten)")
        for name in ("n_prompts", "val_prompts", "batch_size", "steps", "max_new_tokens", "log_every", "ckpt_every",
                     "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
        need(self.k >= 2, f"--k must be >= 2 (a ranking needs two responses), got {self.k}")
        need(self.label_noise >= 0, f"--label_noise must be >= 0, got {self.label_noise}")
        need(self.temperature > 0, f"--temperature must be > 0 (responses are sampled), got {self.temperature}")
        need(self.eval_every >= 0, f"--eval_every must be >= 0, got {self.eval_every}")

    def optimizer(self):
        from core import optim

        def group(lr):
            return optim.OptimConfig(lr=lr, warmup_steps=min(self.warmup_steps, self.steps), total_steps=self.steps,
                                     schedule="linear", final_lr_frac=0.1, weight_decay=self.weight_decay,
                                     clip_norm=self.clip_norm or None)

        return optim.make_grouped_optimizer({"head": group(self.head_lr), "body": group(self.lr)},
                                            rules=[(r"^head/", "head")], default="body")


# ----------------------------------------------------------------------------- sampling and labels


def response_text(template, ids: Sequence[int]) -> str:
    """A response's own text (text parts, read up to the first stop id): what the judge reads."""
    from core import chat as chat_lib

    msg = template.parse_assistant(list(ids))
    return "".join(p["text"] for p in chat_lib.message_parts(msg) if p["type"] == "text")


def sample_responses(params, model_cfg, template, prompts, k: int, *, max_new_tokens: int, temperature: float,
                     key, mesh=None, chunk: int = 64) -> tuple[list[list[int]], list[str], list[list[int]]]:
    """K sampled responses per prompt (rows prompt-major, row n * K + j is sample j of prompt n).

    Returns (response ids [after the assistant header, stop token included when produced],
    their texts, each prompt's ids)."""
    import jax

    from core import sampling

    prompt_ids = [template.render_for_completion([dict(m) for m in p.messages]) for p in prompts]
    scfg = sampling.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                                   stop_ids=tuple(template.stop_ids))
    ids: list[list[int]] = []
    for lo in range(0, len(prompt_ids), chunk):
        res = sampling.generate(params, model_cfg, prompt_ids[lo: lo + chunk], scfg, jax.random.fold_in(key, lo),
                                n_samples=k, template=template, mesh=mesh)
        ids += [res.row_tokens(r) for r in range(len(res.lengths))]
    return ids, [response_text(template, r) for r in ids], prompt_ids


def make_comparisons(params, model_cfg, template, world, prompts, *, k: int, noise: float, max_new_tokens: int,
                     temperature: float, seed: int, mesh=None):
    """Sample K responses per prompt and have the simulated labeller rank them."""
    import jax

    from data import preferences as prefs

    ids, texts, _ = sample_responses(params, model_cfg, template, prompts, k, max_new_tokens=max_new_tokens,
                                     temperature=temperature, key=jax.random.PRNGKey(seed), mesh=mesh)
    return prefs.label(prompts, ids, texts, prefs.GoldJudge(world), k, noise=noise, seed=seed)


def save_comparisons(path, comparisons) -> None:
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(c.to_json()) + "\n" for c in comparisons), encoding="utf-8")
    tmp.replace(path)


def load_comparisons(path) -> list:
    from data import preferences as prefs

    return [prefs.Comparison.from_json(json.loads(line))
            for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- batches


def ranking_rows(template, comparisons, seq_len: int) -> dict:
    """Comparisons -> the ranking LossFn's arrays (numpy): tokens int32 [N, K, seq_len] (prompt +
    response, right-padded), last_index int32 [N, K] (each response's final token), valid bool
    [N, K]. Responses are listed best first by the labeller's ranking."""
    import numpy as np

    n, k = len(comparisons), len(comparisons[0].response_ids)
    tokens = np.zeros((n, k, seq_len), np.int32)
    last = np.zeros((n, k), np.int32)
    for a, c in enumerate(comparisons):
        p = template.render_for_completion([dict(m) for m in c.prompt.messages])
        for j, i in enumerate(c.ranking):
            row = (list(p) + list(c.response_ids[i]))[:seq_len]
            tokens[a, j, : len(row)] = row
            last[a, j] = len(row) - 1
    return {"tokens": tokens, "last_index": last, "valid": np.ones((n, k), bool)}


def seq_len_for(template, comparisons, max_new_tokens: int, model_cfg) -> int:
    """Row length: the longest prompt + the response budget (multiple of 8), within the context."""
    longest = max(len(template.render_for_completion([dict(m) for m in c.prompt.messages])) for c in comparisons)
    t = -(-(longest + max_new_tokens) // 8) * 8
    return min(t, model_cfg.max_seq_len)


# ----------------------------------------------------------------------------- scoring


def make_reward_fn(model_cfg):
    """jit (params {'model', 'head'}, tokens [B, T], last_index [B]) -> rewards [B] float32."""
    import jax

    from core import reward_model as rm

    return jax.jit(lambda p, tokens, last: rm.reward_model_forward(p["model"], p["head"], tokens, model_cfg, last))


def score_responses(reward_fn, params, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    seq_len: int, *, mesh=None, chunk: int = 64):
    """Rewards (numpy float64 [B]) of prompt_ids[b] + response_ids[b], `chunk` rows per call
    (the last chunk padded, so one shape compiles)."""
    import jax
    import numpy as np

    from core import sharding as sharding_lib

    b = len(response_ids)
    if mesh is not None:
        chunk = -(-chunk // sharding_lib.batch_divisor(mesh)) * sharding_lib.batch_divisor(mesh)
    out = []
    for lo in range(0, b, chunk):
        tokens = np.zeros((chunk, seq_len), np.int32)
        last = np.zeros((chunk,), np.int32)
        for r in range(lo, min(lo + chunk, b)):
            row = (list(prompt_ids[r]) + list(response_ids[r]))[:seq_len]
            tokens[r - lo, : len(row)] = row
            last[r - lo] = len(row) - 1
        batch = {"tokens": tokens, "last_index": last}
        if mesh is not None:
            batch = sharding_lib.shard_batch(batch, mesh)
        out.append(np.asarray(jax.device_get(reward_fn(params, batch["tokens"], batch["last_index"])), np.float64))
    return np.concatenate(out)[:b]


@dataclasses.dataclass(frozen=True)
class LoadedRewardModel:
    """A trained reward model: params {'model', 'head'} (head shifted), its config, template, row length."""

    params: Any
    cfg: Any
    template: Any
    seq_len: int
    path: str


def load_reward_model(out_dir, *, mesh=None) -> LoadedRewardModel:
    """The exported reward model of a run directory: the latest checkpoint's params with the
    shifted head from reward_head.npz."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from core import checkpoint as ck
    from core import reward_model as rm
    from core import sharding as sharding_lib

    out_dir = pathlib.Path(out_dir)
    if not (out_dir / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{out_dir / HEAD_FILE} not found: not a finished reward-model run directory")
    model_cfg = common.load_model_config(out_dir)
    tokenizer = common.load_tokenizer(out_dir)
    mesh = mesh if mesh is not None else sharding_lib.make_mesh("data:-1")
    spec = rm.reward_model_spec(model_cfg)
    target = {"params": ck.abstract_state(spec.shapes, spec.shardings(mesh))}
    with ck.make_manager(out_dir / common.CHECKPOINT_DIR, read_only=True) as mngr:
        state, _, _ = ck.restore(mngr, target, with_data=False, partial=True,
                                 expected_meta={"model_config": common.model_config_to_json(model_cfg)})
    head = np.load(out_dir / HEAD_FILE)
    params = dict(state["params"])
    params["head"] = jax.device_put({"w": jnp.asarray(head["w"]), "b": jnp.asarray(head["b"])},
                                    spec.shardings(mesh)["head"])
    info = common.load_run_config(out_dir)
    return LoadedRewardModel(params, model_cfg, common.load_template(out_dir, tokenizer), int(info["seq_len"]),
                             str(out_dir))


# ----------------------------------------------------------------------------- the run


def run(cfg: RewardModelConfig, *, comparisons=None, val_comparisons=None, loaded=None, world=None,
        verbose: bool = True) -> dict:
    """Trains a reward model per `cfg`. `comparisons` / `val_comparisons` (lists of
    data.preferences.Comparison) replace sampling and labelling (experiments/rlhf.py shares one
    labelled pool between reward models); `loaded` / `world` replace loading --init.

    Returns {val_pair_acc, val_gold_pair_acc, label_gold_agreement, n_comparisons, n_pairs,
    reference_mean_before_shift, steps, wall_s, out_dir, interrupted}."""
    import jax
    import numpy as np

    from core import checkpoint as ck
    from core import loop
    from core import model as model_lib
    from core import reward_model as rm
    from core import sharding as sharding_lib
    from core import train as train_lib
    from data import preferences as prefs
    from experiments import assistant_eval

    t_start = time.time()
    out_dir = pathlib.Path(cfg.out_dir)
    mesh = sharding_lib.make_mesh(cfg.mesh)
    div = sharding_lib.batch_divisor(mesh)
    if cfg.batch_size % div:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of data x fsdp = {div} for --mesh={cfg.mesh}")
    stage.check_fresh_or_resume(out_dir, cfg.resume)
    loaded = loaded or common.load_for_inference(cfg.init, mesh=mesh)
    template, model_cfg = loaded.template, loaded.cfg
    if template is None:
        raise ValueError(f"--init={cfg.init}: no chat template; the reward model scores chat responses")
    world = world or assistant_eval.world_of_run(cfg.init)
    is_main = jax.process_index() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if comparisons is None:
        if cfg.resume and (out_dir / TRAIN_FILE).is_file():
            comparisons, val_comparisons = load_comparisons(out_dir / TRAIN_FILE), load_comparisons(out_dir / VAL_FILE)
        else:
            common.say(f"reward model: sampling {cfg.k} responses to {cfg.n_prompts} + {cfg.val_prompts} prompts ...")
            comparisons = make_comparisons(loaded.params, model_cfg, template, world,
                                           prefs.preference_prompts(world, cfg.n_prompts, cfg.seed), k=cfg.k,
                                           noise=cfg.label_noise, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, seed=cfg.seed, mesh=mesh)
            val_comparisons = make_comparisons(
                loaded.params, model_cfg, template, world,
                prefs.preference_prompts(world, cfg.val_prompts, cfg.seed, split="heldout"), k=cfg.k,
                noise=cfg.label_noise, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                seed=cfg.seed + 1, mesh=mesh)
    if not comparisons or not val_comparisons:
        raise ValueError("the reward model needs training and held-out comparisons")
    seq_len = seq_len_for(template, list(comparisons) + list(val_comparisons), cfg.max_new_tokens, model_cfg)
    if is_main:
        save_comparisons(out_dir / TRAIN_FILE, comparisons)
        save_comparisons(out_dir / VAL_FILE, val_comparisons)
        loaded.tokenizer.save(out_dir / common.TOKENIZER_FILE)
        common.save_json(out_dir / common.MODEL_CONFIG_FILE, common.model_config_to_json(model_cfg))
        options.save_config(cfg, out_dir, stage="reward_model", template=template.name,
                            base=str(pathlib.Path(cfg.init).resolve()), seq_len=seq_len, n_comparisons=len(comparisons))

    spec = rm.reward_model_spec(model_cfg)
    optimizer = cfg.optimizer()
    head0 = rm.init_head(jax.random.PRNGKey(cfg.seed), model_cfg.d_model)
    # a copy: the train step donates its state, and loaded.params stays in use (the SFT reference)
    params0 = {"model": jax.tree.map(lambda x: x.copy(), loaded.params), "head": head0}
    train_rows = ranking_rows(template, comparisons, seq_len)
    n = len(comparisons)
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-cfg.steps * cfg.batch_size // n))])
    batches = [{k: v[order[s * cfg.batch_size: (s + 1) * cfg.batch_size]] for k, v in train_rows.items()}
               for s in range(cfg.steps)]
    loss_fn = rm.make_ranking_loss()
    step_fn = train_lib.make_train_step(model_cfg, optimizer, mesh, loss_fn, spec=spec)
    fingerprint = {"model_config": common.model_config_to_json(model_cfg),
                   "run": {"init": str(pathlib.Path(cfg.init).resolve()), "n_comparisons": n, "seq_len": seq_len,
                           "batch_size": cfg.batch_size, "seed": cfg.seed, "steps": cfg.steps}}

    val_rows = gold_rows(template, val_comparisons, seq_len)
    reward_fn = make_reward_fn(model_cfg)

    def evaluate(step, state) -> dict:
        label_acc, gold_acc = pair_accuracies(reward_fn, state["params"], val_comparisons, val_rows, mesh, seq_len)
        rec = {"val_pair_acc": label_acc, "val_gold_pair_acc": gold_acc}
        if verbose:
            common.say(f"eval step {step}: held-out pairwise accuracy {rec['val_pair_acc']:.3f} (labeller), "
                       f"{rec['val_gold_pair_acc']:.3f} (gold order)")
        return rec

    tokens_per_step = cfg.batch_size * cfg.k * seq_len
    peak, peak_desc = common.peak_flops_total(mesh.devices.flatten().tolist())
    progress = common.Progress(cfg.steps, tokens_per_step, model_lib.flops_per_token(model_cfg, seq_len), peak)
    if verbose:
        common.say(f"reward model: {n} rankings of {cfg.k} ({n * cfg.k * (cfg.k - 1) // 2} pairs), "
                   f"{len(val_comparisons)} held out | labeller agrees with gold on "
                   f"{prefs.label_agreement(comparisons):.1%} of pairs | batch {cfg.batch_size} x {cfg.k} x {seq_len} | "
                   f"{cfg.steps} steps on {peak_desc}")
    shardings = train_lib.state_shardings(spec, optimizer, mesh)
    io = stage.StageIO(out_dir, fingerprint, cfg.keep_checkpoints, cfg.async_checkpoint, cfg.resume)
    loop_cfg = loop.LoopConfig(total_steps=cfg.steps, log_every=cfg.log_every, eval_every=cfg.eval_every,
                               save_every=cfg.ckpt_every)

    def init_state():
        return train_lib.train_state_from_params(params0, spec, optimizer, mesh)

    result = stage.train(
        step_fn, init_state, lambda: ck.abstract_state(jax.eval_shape(init_state), shardings),
        loop.ListIterator(batches), loop_cfg, io, mesh=mesh, progress=progress, evaluate=evaluate,
        record=lambda s, m: {k: float(m[k]) for k in ("loss", "accuracy", "margin", "lr", "grad_norm") if k in m},
        t_start=t_start)

    # The trained params (latest checkpoint) -> shift the head so reference responses average 0.
    with ck.make_manager(out_dir / common.CHECKPOINT_DIR, read_only=True) as mngr:
        state, _, _ = ck.restore(mngr, ck.abstract_state(jax.eval_shape(init_state), shardings), with_data=False)
    params = state["params"]
    prompt_ids = [template.render_for_completion([dict(m) for m in c.prompt.messages]) for c in comparisons]
    ref_r = score_responses(reward_fn, params, [p for p, c in zip(prompt_ids, comparisons) for _ in c.response_ids],
                            [r for c in comparisons for r in c.response_ids], seq_len, mesh=mesh)
    mean_ref = float(ref_r.mean())
    head = jax.device_get(rm.shift_head(params["head"], mean_ref))
    if is_main:
        np.savez(out_dir / HEAD_FILE, w=np.asarray(head["w"]), b=np.asarray(head["b"]))
    evs = common.read_jsonl(out_dir / common.EVALS_FILE)
    # float(): a NaN (no held-out pair with distinct gold scores) is stored in JSON as "nan".
    summary = {"val_pair_acc": float(evs[-1]["val_pair_acc"]) if evs else None,
               "val_gold_pair_acc": float(evs[-1]["val_gold_pair_acc"]) if evs else None,
               "label_gold_agreement": prefs.label_agreement(comparisons), "n_comparisons": n,
               "n_pairs": n * cfg.k * (cfg.k - 1) // 2, "reference_mean_before_shift": mean_ref,
               "steps": result.step, "wall_s": time.time() - t_start, "out_dir": str(out_dir),
               "interrupted": result.interrupted}
    if is_main:
        common.plot_metric(common.read_jsonl(out_dir / common.METRICS_FILE), "loss", out_dir / "plots" / "loss.png",
                           title="reward model ranking loss", smooth=max(1, cfg.steps // 50))
    if verbose:
        common.say(f"reward model done: held-out pairwise accuracy {summary['val_pair_acc']:.3f} (labeller), "
                   f"{summary['val_gold_pair_acc']:.3f} (gold); reference mean {mean_ref:+.3f} shifted to 0; "
                   f"{common.format_duration(summary['wall_s'])}")
    return summary


def gold_rows(template, comparisons, seq_len: int) -> tuple[list, list, Any]:
    """(prompt ids per response, response ids, gold [N, K]) of every response, prompt-major."""
    import numpy as np

    prompts, responses = [], []
    for c in comparisons:
        p = template.render_for_completion([dict(m) for m in c.prompt.messages])
        prompts += [p] * len(c.response_ids)
        responses += [list(r) for r in c.response_ids]
    return prompts, responses, np.asarray([c.gold for c in comparisons], np.float64)


def pair_accuracies(reward_fn, params, comparisons, rows, mesh, seq_len: int) -> tuple[float, float]:
    """(labeller accuracy, gold accuracy) of the reward model on comparisons, each response
    scored once. Labeller: share of ranked pairs (winner before loser) with r_w > r_l, skipping
    pairs of token-identical responses (the SFT model often repeats its favourite sentence; no
    reward can order those). Gold: share of pairs with different gold whose reward order agrees."""
    import numpy as np

    prompts, responses, gold = rows
    r = score_responses(reward_fn, params, prompts, responses, seq_len, mesh=mesh).reshape(gold.shape)
    hits = total = 0
    for n, c in enumerate(comparisons):
        rk = c.ranking
        for a in range(len(rk)):
            for b in range(a + 1, len(rk)):
                w, lo = rk[a], rk[b]
                if tuple(c.response_ids[w]) != tuple(c.response_ids[lo]):
                    total += 1
                    hits += r[n, w] > r[n, lo]
    i, j = np.triu_indices(gold.shape[1], 1)
    dg, dr = gold[:, i] - gold[:, j], r[:, i] - r[:, j]
    ok = dg != 0
    return (float(hits) / total if total else float("nan"),
            float(((dg > 0) == (dr > 0))[ok].mean()) if ok.any() else float("nan"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    summary = run(options.from_flags(RewardModelConfig))
    print(json.dumps({k: summary[k] for k in ("val_pair_acc", "val_gold_pair_acc", "label_gold_agreement",
                                              "n_comparisons", "reference_mean_before_shift", "steps", "wall_s")}))


if __name__ == "__main__":
    options.define_flags(RewardModelConfig)
    app.run(common.cli(main))
