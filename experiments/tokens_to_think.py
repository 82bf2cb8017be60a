"""Models need tokens to think: the same SFT data with the answer first or the reasoning first.

    python -m experiments.tokens_to_think --base=runs/main --out_dir=runs/think

Two SFT runs from the same pretrained base on the same word problems (data/conversations.py
`short_math_problems`, no tools; two worked steps over three one-digit numbers, or three over four
with --math_steps=3): one whose replies start with 'Answer: N' and give the worked steps after
it, one that works the steps first and ends with 'Answer: N'. Each model is then asked held-out
problems (an unseen story, or number tuples never trained on), greedily; the judge reads the
'Answer: N' line. A model that must commit to the answer in its first tokens has to compute
a*b-c (or a*b+c*d) inside one forward pass; one that writes a*b = 42 first only has to do one
small step per token.

Prints a table, then a JSON line with acc_answer_first, acc_reasoning_first (all held-out
problems), the same split by kind (acc_ORDER_unseen_numbers, acc_ORDER_unseen_template), n_eval,
steps, math_steps;
writes OUT_DIR/report.md and the two run directories OUT_DIR/answer_first, OUT_DIR/reasoning_first.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Optional

from absl import app

from experiments import common, options

_f = options.field
ORDERS = ("answer_first", "reasoning_first")


@dataclasses.dataclass(frozen=True)
class ThinkConfig:
    base: Optional[str] = _f(None, "a pretraining run directory (the shared base model)")
    out_dir: Optional[str] = _f(None, "where the two SFT runs and the report go")
    n_train: int = _f(4000, "training problems (the same for both runs)")
    n_eval: int = _f(200, "held-out problems per model")
    math_steps: int = _f(2, "worked steps per problem: 2 (a*b-c over three one-digit numbers) or 3 (a*b+c*d "
                         "over four)", choices=(2, 3))
    steps: int = _f(400, "SFT steps per run")
    batch_size: int = _f(16, "rows per step")
    lr: float = _f(1e-3, "peak learning rate")
    mesh: str = _f("data:-1", "device mesh")
    seed: int = _f(0, "seed for problems and data order")
    resume: bool = _f(False, "continue interrupted runs")

    def __post_init__(self):
        if not self.base:
            raise ValueError("--base is required (a pretraining run directory)")
        if not self.out_dir:
            raise ValueError("--out_dir is required")
        from data import conversations as conv

        if self.math_steps not in conv.MATH_STEPS:
            raise ValueError(f"--math_steps must be one of {conv.MATH_STEPS}, got {self.math_steps}")
        for name in ("n_train", "n_eval", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def problems(seed: int, n_train: int, n_eval: int, order: str, steps: int = 2):
    """(train examples, held-out eval examples) in the given order; the same problems for both orders."""
    from data import conversations as conv

    train = [conv.math_example(p, order=order, tools_on=False, kind="math_short")
             for p in conv.short_math_problems(seed, "train", n_train, steps=steps)]
    evals = [conv.math_example(p, order=order, tools_on=False, kind="math_short")
             for p in conv.short_math_problems(seed + 1, "heldout", n_eval, steps=steps)]
    return train, evals


HELDOUT_KINDS = ("unseen_numbers", "unseen_template")


def heldout_kind(example) -> str:
    """'unseen_template' (a story never trained on) or 'unseen_numbers' (a trained story with a
    number triple never trained on): the second isolates the computation, the first adds
    generalisation to a new wording, which the small models mostly fail in either order."""
    from data import conversations as conv

    held = conv.SHORT_MATH_HELDOUT_TEMPLATES + conv.THREE_STEP_HELDOUT_TEMPLATES
    return "unseen_template" if example.meta["template"] in held else "unseen_numbers"


def accuracy(run_dir, examples, mesh) -> dict:
    """{'all': accuracy, 'unseen_numbers': ..., 'unseen_template': ...} (greedy, no tools)."""
    from core import sharding as sharding_lib
    from data import conversations as conv
    from experiments import assistant_eval

    m = common.load_for_inference(run_dir, mesh=sharding_lib.make_mesh(mesh))
    replies = assistant_eval.generate_replies(m.params, m.cfg, m.template, [ex.prompt for ex in examples],
                                              ban_tools=("calculator", "python", "search"), max_new_tokens=64)
    ok = [conv.judge(ex, r["text"]) for ex, r in zip(examples, replies)]
    out = {"all": sum(ok) / len(ok)}
    for kind in HELDOUT_KINDS:
        sub = [o for o, ex in zip(ok, examples) if heldout_kind(ex) == kind]
        out[kind] = sum(sub) / len(sub) if sub else None
    return out


def run(cfg: ThinkConfig) -> dict:
    from experiments import sft

    t0 = time.time()
    out = pathlib.Path(cfg.out_dir)
    if not (pathlib.Path(cfg.base) / common.MODEL_CONFIG_FILE).is_file():
        raise ValueError(f"--base={cfg.base} is not a zipchat run directory (no {common.MODEL_CONFIG_FILE})")
    results = {}
    for order in ORDERS:
        train, evals = problems(cfg.seed, cfg.n_train, cfg.n_eval, order, cfg.math_steps)
        run_dir = out / order
        common.say(f"== SFT with the {order.replace('_', ' ')} ({len(train)} problems, {cfg.steps} steps) -> {run_dir}")
        s = sft.run(sft.SFTConfig(init=cfg.base, out_dir=str(run_dir), steps=cfg.steps, batch_size=cfg.batch_size,
                                  lr=cfg.lr, mesh=cfg.mesh, seed=cfg.seed, resume=cfg.resume, eval_every=0,
                                  eval_samples=0, ckpt_every=cfg.steps, log_every=max(cfg.steps // 8, 1),
                                  data=f"think:{order},math_steps={cfg.math_steps}"), examples=train, val_examples=evals[:64])
        if s["interrupted"]:
            return {"interrupted": True}
        acc = accuracy(run_dir, evals, cfg.mesh)
        results[order] = {"acc": acc["all"], "by_kind": acc, "train_loss": s["loss"], "val_loss": s["val_loss"]}
        common.say(f"   held-out accuracy ({order}): {100 * acc['all']:.1f}%")
    a, r = results["answer_first"]["acc"], results["reasoning_first"]["acc"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    table = "\n".join([
        "| SFT data | held-out accuracy | unseen numbers | unseen story | train loss | held-out loss |",
        "|---|---|---|---|---|---|",
        *(f"| {o.replace('_', ' ')} | {pct(results[o]['acc'])} | {pct(results[o]['by_kind']['unseen_numbers'])} | "
          f"{pct(results[o]['by_kind']['unseen_template'])} | {results[o]['train_loss']:.3f} | "
          f"{results[o]['val_loss']:.3f} |" for o in ORDERS)])
    line = {"acc_answer_first": round(a, 4), "acc_reasoning_first": round(r, 4), "n_eval": cfg.n_eval,
            "steps": cfg.steps, "math_steps": cfg.math_steps, "ratio": round(r / a, 2) if a else None}
    for kind in HELDOUT_KINDS:
        for o in ORDERS:
            v = results[o]["by_kind"][kind]
            line[f"acc_{o}_{kind}"] = None if v is None else round(v, 4)
    line["wall_s"] = round(time.time() - t0, 1)
    (out / "report.md").write_text(f"# Models need tokens to think\n\nbase {cfg.base}, {cfg.n_train} {cfg.math_steps}-step "
                                   f"problems, {cfg.steps} SFT steps each, {cfg.n_eval} held-out problems "
                                   f"(greedy, no tools)\n\n{table}\n\n```json\n{json.dumps(line)}\n```\n")
    common.say(table)
    common.say(json.dumps(line))
    return line


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    run(options.from_flags(ThinkConfig))


if __name__ == "__main__":
    options.define_flags(ThinkConfig)
    app.run(common.cli(main))
