"""Evaluates a trained base model. Mode `phenomena` measures what base models are known to do,
on a model trained on the synthetic world (whose ground truth we know):

  1. regurgitation: documents seen many times are continued verbatim, documents seen once are
     not (greedy exact-match rate of a continuation, by number of copies in the corpus);
  2. knowledge by frequency: a continuation about an entity states its true facts more often
     when the entity was written about often (by tier: held out / once / few / popular / famous);
  3. few-shot: prompts of k examples of a task in a form the corpus never shows
     ('word -> word word': the corpus's pattern drills apply such rules with many separators,
     made-up ones included, but never '->') are followed far more often than the bare query
     (0-shot). The mechanism behind it is measured too: the loss on the second copy of a random
     word sequence (in-context copying, as by induction heads);
  4. sampling: the same prompt gives different samples at temperature 1 (one at temperature 0).

    python -m experiments.evaluate --out_dir=runs/tiny            # prints the table, writes phenomena.md
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import statistics
from typing import Any, Optional, Sequence

from absl import app

from experiments import assistant_eval, common, options


_f = options.field


@dataclasses.dataclass(frozen=True)
class PhenomenaConfig:
    """The evaluation's options (its fields are the flags). Phenomena mode: docs_per_group
    canonical documents per copies-group (regurgitation), prompt_tokens / cont_tokens of the
    document given / compared, entities_per_tier for facts, fewshot_queries / shots per task,
    diversity_prompts x diversity_samples at temperature 1. Assistant mode:
    experiments/assistant_eval.py with n_per_row prompts per row."""

    out_dir: Optional[str] = _f(None, "run directory (or a Hugging Face checkpoint directory)")
    mode: str = _f("phenomena", "phenomena: a base model's phenomena table; assistant: what SFT must show "
                   "(experiments/assistant_eval.py)", choices=("phenomena", "assistant"))
    step: Optional[int] = _f(None, "checkpoint step (default: the latest)")
    n_per_row: int = _f(50, "assistant mode: prompts per row")
    compare_base: bool = _f(False, "assistant mode: also evaluate the run's base model (base_ keys)")
    reply_tokens: int = _f(assistant_eval.REPLY_BUDGET, "assistant mode: token budget per reply, tool outputs "
                           "included")
    docs_per_group: int = _f(32, "phenomena: documents per copies-group (regurgitation)")
    prompt_tokens: int = _f(8, "phenomena: document tokens given")
    cont_tokens: int = _f(24, "phenomena: continuation tokens compared")
    entities_per_tier: int = _f(40, "phenomena: entities per tier (facts)")
    fact_tokens: int = _f(64, "phenomena: tokens sampled per fact continuation")
    fewshot_queries: int = _f(40, "phenomena: queries per few-shot task")
    shots: int = _f(4, "phenomena: examples per k-shot prompt")
    diversity_prompts: int = _f(4, "phenomena: prompts for sampling diversity")
    diversity_samples: int = _f(8, "phenomena: samples per prompt")
    seed: int = _f(0, "seed for prompts and sampling")
    mesh: str = _f("data:-1", "device mesh")

    def __post_init__(self):
        if not self.out_dir:
            raise ValueError("--out_dir is required")
        for name in ("n_per_row", "docs_per_group", "entities_per_tier", "fewshot_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


Row = dict[str, Any]


def _world_and_corpus(out_dir: pathlib.Path):
    from data import readers

    run_cfg = common.load_run_config(out_dir)
    from experiments import pretrain

    source = readers.open_source(pretrain.data_spec(run_cfg["data"]))
    if getattr(source, "world", None) is None:
        raise ValueError(f"{out_dir} was trained on --data={run_cfg['data']}; the phenomena need the "
                         f"synthetic world's ground truth (train with --data=synthetic...)")
    return source.world, source, run_cfg


def passes_over_corpus(corpus, tokenizer, run_cfg: dict, sample_docs: int = 256) -> float:
    """Approximate number of passes the run made over the corpus (tokens trained / corpus tokens)."""
    n = len(corpus)
    rng = random.Random(0)
    idx = [rng.randrange(n) for _ in range(min(sample_docs, n))]
    docs = [corpus[i] for i in idx]
    toks = sum(len(t) + 1 for t in tokenizer.encode_batch(docs))
    corpus_tokens = toks / len(docs) * n
    trained = run_cfg["total_steps"] * run_cfg["batch_size"] * run_cfg["seq_len"]
    return trained / corpus_tokens


def regurgitation(model, world, cfg: PhenomenaConfig, passes: float) -> list[Row]:
    """Greedy continuation of the first prompt_tokens of canonical articles, by copies."""
    tokenizer, mcfg, params, mesh = model
    eot = tokenizer.eot_id
    groups: dict[int, list[int]] = {}
    for d in world.edition:
        if d.variant == 0 and d.copies > 0:
            groups.setdefault(d.copies, []).append(d.doc_id)
    rng = random.Random(cfg.seed)
    rows = []
    prompts, refs, keys = [], [], []
    for copies in sorted(groups):
        ids = groups[copies]
        for doc_id in rng.sample(ids, min(cfg.docs_per_group, len(ids))):
            toks = [eot] + tokenizer.encode(world.document(doc_id)) + [eot]
            if len(toks) <= cfg.prompt_tokens + 2:
                continue
            prompts.append(toks[: cfg.prompt_tokens + 1])
            refs.append(toks[cfg.prompt_tokens + 1: cfg.prompt_tokens + 1 + cfg.cont_tokens])
            keys.append(copies)
    outs = common.sample_tokens(params, mcfg, tokenizer, prompts, max_new_tokens=cfg.cont_tokens,
                                temperature=0.0, keep_stop=True, mesh=mesh)
    per: dict[int, list[tuple[bool, float]]] = {}
    for key, ref, out in zip(keys, refs, outs):
        gen = out[0][: len(ref)]
        match = 0
        while match < len(ref) and match < len(gen) and gen[match] == ref[match]:
            match += 1
        per.setdefault(key, []).append((match == len(ref), match / len(ref)))
    for copies in sorted(per):
        v = per[copies]
        rows.append({"phenomenon": "regurgitation", "condition": f"article in {copies} cop{'y' if copies == 1 else 'ies'} "
                     f"(seen ~{copies * passes:.0f}x)", "n": len(v),
                     "metric": f"exact {cfg.cont_tokens}-token continuation",
                     "value": sum(e for e, _ in v) / len(v),
                     "extra": f"mean matched prefix {100 * statistics.mean(f for _, f in v):.0f}%"})
    return rows


def knowledge_by_frequency(model, world, cfg: PhenomenaConfig, passes: float) -> list[Row]:
    """Continue '<name>\\n\\n' (how every canonical article opens); a fact counts as stated if
    its value appears in the greedy continuation."""
    from data import synthetic

    tokenizer, mcfg, params, mesh = model
    by_entity: dict[str, list[dict]] = {}
    for f in synthetic.facts(world):
        by_entity.setdefault(f["entity"], []).append(f)
    rng = random.Random(cfg.seed + 1)
    chosen = []
    for tier in synthetic.TIERS:
        ents = [e for e in world.entities if e.tier == tier]
        chosen += rng.sample(ents, min(cfg.entities_per_tier, len(ents)))
    outs = common.sample_texts(params, mcfg, tokenizer, [f"{e.name}\n\n" for e in chosen],
                               max_new_tokens=cfg.fact_tokens, temperature=0.0, mesh=mesh)
    per: dict[str, list[tuple[bool, int]]] = {}
    for e, out in zip(chosen, outs):
        for f in by_entity.get(e.name, []):
            per.setdefault(e.tier, []).append((f["value"] in out[0], f["times_seen"]))
    rows = []
    for tier in synthetic.TIERS:
        v = per.get(tier)
        if not v:
            continue
        seen = statistics.median(t for _, t in v) * passes
        rows.append({"phenomenon": "facts by frequency", "condition": f"{tier} entities (fact seen ~{seen:.0f}x)",
                     "n": len(v), "metric": "true value stated", "value": sum(ok for ok, _ in v) / len(v),
                     "extra": ""})
    return rows


def _fewshot_tasks(rng: random.Random, words: Sequence[str]):
    def repeat(r):
        w = r.choice(words)
        return w, f"{w} {w}"

    def swap(r):
        a, b = r.sample(list(words), 2)
        return f"{a} {b}", f"{b} {a}"

    def upper(r):
        w = r.choice(words)
        return w, w.upper()

    return {"repeat ('w -> w w')": repeat, "swap ('a b -> b a')": swap, "capitalise ('w -> W')": upper}


def few_shot(model, cfg: PhenomenaConfig) -> list[Row]:
    """k-shot vs 0-shot accuracy of exact answers in the 'x -> y' format, absent from the corpus
    (tests/test_synthetic.py checks that no '->' appears in it). All tasks share one generate
    call per prompt style (fewer compiled shapes)."""
    from data import synthetic

    tokenizer, mcfg, params, mesh = model
    rng = random.Random(cfg.seed + 2)
    words = [w for w in synthetic.WORDS if len(w) <= 8]
    names, prompts0, promptsk, answers = [], [], [], []
    for name, task in _fewshot_tasks(rng, words).items():
        for _ in range(cfg.fewshot_queries):
            q, a = task(rng)
            shots = [task(rng) for _ in range(cfg.shots)]
            promptsk.append("".join(f"{x} -> {y}\n" for x, y in shots) + f"{q} ->")
            prompts0.append(f"{q} ->")
            answers.append(a)
            names.append(name)
    n_new = max(len(tokenizer.encode(" " + a)) for a in answers) + 2
    rows = []
    for label, prompts in (("0-shot", prompts0), (f"{cfg.shots}-shot", promptsk)):
        outs = common.sample_texts(params, mcfg, tokenizer, prompts, max_new_tokens=n_new, temperature=0.0,
                                   mesh=mesh)
        ok = [o[0].split("\n", 1)[0].strip() == a for o, a in zip(outs, answers)]
        for name in dict.fromkeys(names):
            v = [k for k, n in zip(ok, names) if n == name]
            rows.append({"phenomenon": "few-shot", "condition": f"{name}, {label}", "n": len(v),
                         "metric": "exact answer", "value": sum(v) / len(v), "extra": ""})
    order = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return sorted(rows, key=lambda r: order[r["condition"].rsplit(", ", 1)[0]])


def induction(model, cfg: PhenomenaConfig, n_rows: int = 16, n_words: int = 16) -> list[Row]:
    """In-context copying, the mechanism few-shot prompting rests on: the loss on the second
    copy of a random sequence of common words vs on its first copy (induction heads make the
    second nearly free). Common words, not random vocabulary ids: a small model has barely
    trained the embeddings of its rare tokens, which would measure that instead."""
    import jax
    import numpy as np

    from core import loss as loss_lib
    from data import synthetic

    tokenizer, mcfg, params, _ = model
    rng = random.Random(cfg.seed + 4)
    rows = [tokenizer.encode(" ".join(rng.choices(synthetic.WORDS, k=n_words))) for _ in range(n_rows)]
    length = min(len(r) for r in rows)
    seq = np.array([r[:length] for r in rows])
    x = np.concatenate([np.full((n_rows, 1), tokenizer.eot_id), seq, seq], axis=1).astype(np.int32)
    nll = -np.asarray(jax.jit(lambda p, t: loss_lib.token_logprobs(p, {"tokens": t}, mcfg)[0])(params, x))
    # Skip the first token of each copy: nothing in context predicts it.
    first, second = float(nll[:, 1:length].mean()), float(nll[:, length + 1:].mean())
    return [{"phenomenon": "in-context copying", "condition": f"{n_words} random common words shown twice",
             "n": n_rows, "metric": "loss drop on the 2nd copy", "value": max(0.0, 1 - second / first),
             "extra": f"nats/token {first:.2f} -> {second:.2f}"}]


def diversity(model, world, cfg: PhenomenaConfig) -> list[Row]:
    """Distinct samples among diversity_samples draws of one prompt, at temperature 1 and 0."""
    tokenizer, mcfg, params, mesh = model
    famous = [e.name for e in world.entities if e.tier == "famous"][: max(1, cfg.diversity_prompts - 2)]
    prompts = (famous + ["Questions and answers about", "The word"])[: cfg.diversity_prompts]
    rows = []
    for temp in (1.0, 0.0):
        outs = common.sample_texts(params, mcfg, tokenizer, prompts, n_samples=cfg.diversity_samples,
                                   max_new_tokens=24, temperature=temp, seed=cfg.seed + 3, mesh=mesh)
        distinct = [len(set(o)) for o in outs]
        rows.append({"phenomenon": "sampling", "condition": f"temperature {temp:g}, {len(prompts)} prompts",
                     "n": len(prompts) * cfg.diversity_samples,
                     "metric": f"distinct samples of {cfg.diversity_samples}",
                     "value": statistics.mean(distinct), "extra": f"per prompt {distinct}"})
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table (readable as plain text too)."""
    head = ["phenomenon", "condition", "n", "metric", "value", "notes"]
    body = []
    for r in rows:
        v = r["value"]
        val = f"{v:.2f}" if r["metric"].startswith("distinct") else f"{100 * v:.0f}%"
        body.append([r["phenomenon"], r["condition"], str(r["n"]), r["metric"], val, r.get("extra", "")])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def run(cfg: PhenomenaConfig, loaded=None, verbose: bool = True) -> list[Row]:
    """Measures all four phenomena; prints the table and writes out_dir/phenomena.{md,json}."""
    from core import sharding as sharding_lib

    out_dir = pathlib.Path(cfg.out_dir)
    world, corpus, run_cfg = _world_and_corpus(out_dir)
    mesh = sharding_lib.make_mesh(cfg.mesh)
    tokenizer, mcfg, params, step = loaded or common.load_model(out_dir, mesh=mesh, step=cfg.step)
    model = (tokenizer, mcfg, params, mesh)
    passes = passes_over_corpus(corpus, tokenizer, run_cfg)
    rows = (regurgitation(model, world, cfg, passes) + knowledge_by_frequency(model, world, cfg, passes)
            + few_shot(model, cfg) + induction(model, cfg) + diversity(model, world, cfg))
    table = format_table(rows)
    header = (f"Base-model phenomena: {out_dir} step {step}, {len(world.entities)} entities, "
              f"~{passes:.1f} passes over the corpus")
    (out_dir / "phenomena.md").write_text(f"{header}\n\n{table}\n")
    (out_dir / "phenomena.json").write_text(json.dumps({"step": step, "passes": passes, "rows": rows}, indent=1))
    if verbose:
        common.say(header)
        common.say(table)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    cfg = options.from_flags(PhenomenaConfig)
    if cfg.mode == "assistant":
        assistant_eval.run(cfg.out_dir, n=cfg.n_per_row, seed=cfg.seed, mesh=cfg.mesh, compare_base=cfg.compare_base,
                           max_new_tokens=cfg.reply_tokens)
        return
    run(cfg)


if __name__ == "__main__":
    options.define_flags(PhenomenaConfig)
    app.run(common.cli(main))
