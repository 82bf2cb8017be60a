"""The assistant evaluation: what SFT must show, on held-out questions, greedy, with and without
tools (`python -m experiments.evaluate --mode=assistant --out_dir=RUN [--compare_base]`).

Rows (each n = --n_per_row prompts from data/conversations.py's held-out split: entities,
question templates, numbers and words never in SFT data; judged by `conversations.judge` on the
reply's own text, tool outputs excluded):

  format          the reply ends with the end-of-turn token within the budget and never opens
                  another message (no <|im_start|> / header token generated)
  identity        who it is / who made it
  facts by tier   chat-form fact questions, search banned, by tier of the entity
  mult            products with 4-6 digits in their operands: answer-only (tool tokens banned)
                  vs with the calculator
  count           letter counting: answer-only vs with the python tool
  held-out        questions about held-out entities: without search (and how often the reply is
                  a confident wrong answer: the hallucination rate) vs with search

"Answer-only" bans the tool-call start tokens during sampling, so the model must answer from its
own tokens; "with tools" runs the real tools (calculator, the sandboxed python, BM25 search over
the world's documents) inside the token stream.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence

from experiments import common

# Product sizes of the mult rows: (digits of a, digits of b), 4 to 6 digits in all.
MULT_SHAPES = ((2, 2), (2, 3), (3, 3))
FACT_TIERS = ("famous", "popular", "few", "once", "held_out")
# Tokens per reply, tool outputs included: a search reply (call, a ~70-token snippet, the answer)
# takes 90 tokens at the median and 130 at most with the main job's vocabulary, so a budget of 96
# cut most of them off before the answer.
REPLY_BUDGET = 192
MIN_REPLY = 32  # a prompt longer than the context minus the budget shrinks the budget to this, then is cut


def default_tools(world=None, *, python: bool = True) -> dict:
    """calculator, python (sandboxed) and search over the world's documents (when given)."""
    from core import tools as tools_lib

    index = None
    if world is not None:
        from data import conversations as conv

        index = conv.search_index(world)
        search_k = conv.SEARCH_K
    else:
        search_k = 3
    out = tools_lib.make_tools(search_index=index, search_k=search_k)
    if not python:
        out.pop("python")
    return out


def generate_replies(params, cfg, template, prompts: Sequence[Sequence[dict]], *, mesh=None,
                     tools: Optional[dict] = None, ban_tools: Sequence[str] = (), max_new_tokens: int = REPLY_BUDGET,
                     temperature: float = 0.0, seed: int = 0, batch: int = 64) -> list[dict]:
    """Greedy (or sampled) assistant replies to conversations.

    Args:
      prompts: message lists, each ending with the turn to answer.
      tools: name -> fn; tool calls the model makes run and their output enters the stream.
      ban_tools: tool names whose start tokens are never sampled (answer-only evaluation).
      max_new_tokens: budget per reply (tool outputs included); where a batch's longest prompt
        leaves less room in the context, the budget shrinks to fit it (down to MIN_REPLY tokens),
        and only then are prompts cut from the left.

    Returns:
      one dict per prompt: text (the reply's own text parts), message (parsed), ids (generated),
      finished (the end-of-turn token was produced), opened_role (a new message header was
      generated), tool_calls.
    """
    import jax

    from core import chat as chat_lib
    from core import sampling

    banned = ()
    if ban_tools:
        if template.tools is None:
            raise ValueError(f"template {template.name!r} has no tool tokens to ban")
        banned = tuple(template.tools.start[n] for n in ban_tools if n in template.tools.start)
    header_ids = _header_ids(template)
    out: list[dict] = []
    budget = max(1, min(max_new_tokens, cfg.max_seq_len - 8))
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo: lo + batch]
        ids = [template.render_for_completion(list(p)) for p in chunk]
        # The budget gives way to long prompts (down to MIN_REPLY tokens); only then are prompts cut.
        room = min(budget, max(cfg.max_seq_len - max(len(i) for i in ids), min(budget, MIN_REPLY)))
        ids = [i[-(cfg.max_seq_len - room):] for i in ids]
        scfg = sampling.SamplingConfig(temperature=temperature, max_new_tokens=room, stop_ids=template.stop_ids,
                                       banned_ids=banned)
        res = sampling.generate(params, cfg, ids, scfg, jax.random.PRNGKey(seed + lo), tools=tools or None,
                                template=template, mesh=mesh)
        for r in range(len(chunk)):
            gen = res.row_tokens(r)
            msg = template.parse_assistant(gen)
            out.append({"ids": gen, "message": msg,
                        "text": "".join(p["text"] for p in chat_lib.message_parts(msg) if p["type"] == "text"),
                        "finished": res.finish_reason[r] == "stop" and bool(gen) and gen[-1] in template.stop_ids,
                        "opened_role": any(t in header_ids for t in gen),
                        "tool_calls": res.tool_calls[r]})
    return out


def _header_ids(template) -> frozenset:
    """Ids that open a new message in this template (generated, they mean the model ran on)."""
    tok = template.tokenizer
    names = ("<|im_start|>", "<|start_header_id|>")
    out = set()
    for n in names:
        try:
            out.add(tok.special_id(n))
        except (KeyError, ValueError):
            pass
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    condition: str
    n: int
    value: float
    key: Optional[str] = None  # JSON key
    extra: str = ""


def evaluate_model(params, cfg, template, world, *, n: int, seed: int = 0, mesh=None,
                   max_new_tokens: int = REPLY_BUDGET, progress: bool = True) -> tuple[list[Row], dict]:
    """Runs every row on one model; returns (rows, JSON figures)."""
    from data import conversations as conv

    tools = default_tools(world)
    has_tools = template.tools is not None
    rows: list[Row] = []
    figures: dict[str, Any] = {"n_per_row": n}
    all_replies: list[dict] = []
    bar = _bar(progress)

    def ask(examples, *, use_tools: bool, ban=()):
        replies = generate_replies(params, cfg, template, [ex.prompt for ex in examples], mesh=mesh,
                                   tools=tools if (use_tools and has_tools) else None,
                                   ban_tools=ban if has_tools else (), max_new_tokens=max_new_tokens, seed=seed)
        all_replies.extend(replies)
        bar.update(len(examples))
        return [conv.judge(ex, r["text"]) for ex, r in zip(examples, replies)], replies

    def rate(oks) -> float:
        return sum(oks) / max(len(oks), 1)

    ident = conv.eval_set(world, "identity", n, seed)
    oks, _ = ask(ident, use_tools=False, ban=("calculator", "python", "search"))
    rows.append(Row("identity", "who are you / who made you", len(oks), rate(oks), "identity_rate"))

    for tier in FACT_TIERS:
        try:
            ex = conv.eval_set(world, "fact", n, seed, tier=tier)
        except ValueError:  # a small world may have no held-out entity of this tier
            ex = []
        if not ex:
            continue
        oks, _ = ask(ex, use_tools=False, ban=("search",))
        rows.append(Row("facts (chat, no search)", tier, len(oks), rate(oks), f"fact_{tier}"))

    per_shape = max(1, -(-n // len(MULT_SHAPES)))
    mult = [e for shape in MULT_SHAPES for e in conv.eval_set(world, "mult", per_shape, seed, digits=shape)]
    for label, use, ban, key in (("answer only", False, ("calculator", "python", "search"), "mult_no_tool"),
                                 ("with the calculator", True, (), "mult_tool")):
        oks, _ = ask(mult, use_tools=use, ban=ban)
        rows.append(Row("4-6 digit products", label, len(oks), rate(oks), key))

    count = conv.eval_set(world, "count_letters", n, seed)
    for label, use, ban, key in (("answer only", False, ("calculator", "python", "search"), "count_no_tool"),
                                 ("with python", True, (), "count_tool")):
        oks, _ = ask(count, use_tools=use, ban=ban)
        rows.append(Row("letter counting", label, len(oks), rate(oks), key))

    held = conv.eval_set(world, "search", n, seed, tier="held_out")
    oks, replies = ask(held, use_tools=False, ban=("calculator", "python", "search"))
    halluc = [not ok and not conv.abstains(r["text"]) for ok, r in zip(oks, replies)]
    rows.append(Row("held-out entities", "no search", len(oks), rate(oks), "heldout_no_search"))
    rows.append(Row("held-out entities", "no search: confident wrong answers (hallucination)", len(oks),
                    rate(halluc), "hallucination_rate"))
    oks, _ = ask(held, use_tools=True)
    rows.append(Row("held-out entities", "with search", len(oks), rate(oks), "heldout_search"))
    bar.close()

    fmt = [r["finished"] and not r["opened_role"] for r in all_replies]
    rows.insert(0, Row("format", "ends with end-of-turn, opens no other role (all replies)", len(fmt), rate(fmt),
                       "format_rate"))
    for r in rows:
        if r.key:
            figures[r.key] = r.value
    return rows, figures


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(desc="assistant eval (prompts)", unit="prompt", leave=False, dynamic_ncols=True, mininterval=2.0)


def format_table(rows: Sequence[Row], base_rows: Optional[Sequence[Row]] = None) -> str:
    """Markdown table; with base rows, a column for the base model (same template, same prompts)."""
    base = {(r.name, r.condition): r for r in base_rows or ()}
    head = "| row | condition | n | SFT |" + (" base |" if base_rows else "")
    lines = [head, "|---|---|---|---|" + ("---|" if base_rows else "")]
    for r in rows:
        b = base.get((r.name, r.condition))
        cell = f" {100 * b.value:.0f}% |" if b else (" - |" if base_rows else "")
        lines.append(f"| {r.name} | {r.condition} | {r.n} | {100 * r.value:.0f}% |" + cell)
    return "\n".join(lines)


def figures_json(figures: dict, base_figures: Optional[dict] = None) -> str:
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}
    for k, v in (base_figures or {}).items():
        if k != "n_per_row":
            out[f"base_{k}"] = round(v, 4) if isinstance(v, float) else v
    return json.dumps(out)


def world_of_run(out_dir):
    """The synthetic world a run (or the base run it was fine-tuned from) was trained on."""
    from data import readers

    spec = common.world_spec(out_dir)
    if spec is None:
        raise ValueError(f"{out_dir}: not trained on the synthetic world; the assistant evaluation needs its "
                         f"ground truth")
    return readers.open_source(spec).world


def run(out_dir, *, n: int = 50, seed: int = 0, mesh: str = "data:-1", compare_base: bool = False,
        max_new_tokens: int = REPLY_BUDGET, verbose: bool = True) -> dict:
    """Evaluates the run in `out_dir` (and with compare_base its base model, same template and
    prompts); prints the table, then the JSON line; writes assistant.md / assistant.json."""
    import pathlib

    from core import sharding as sharding_lib
    from core import tools as tools_lib

    out_dir = pathlib.Path(out_dir)
    if n < 1:
        raise ValueError(f"--n_per_row must be >= 1, got {n}")
    no_python = tools_lib.python_unavailable()
    if verbose and no_python:
        common.say(f"warning: {no_python}")
    if max_new_tokens < 1:
        raise ValueError(f"--reply_tokens must be >= 1, got {max_new_tokens}")
    world = world_of_run(out_dir)
    mesh_ = sharding_lib.make_mesh(mesh)
    m = common.load_for_inference(out_dir, mesh=mesh_)
    cfg, params, step, template = m.cfg, m.params, m.step, m.template
    if template is None:
        raise ValueError(f"{out_dir}: its tokenizer has no chat template to evaluate an assistant with")
    rows, figures = evaluate_model(params, cfg, template, world, n=n, seed=seed, mesh=mesh_,
                                   max_new_tokens=max_new_tokens, progress=verbose)
    base_rows = base_figures = None
    if compare_base:
        base_dir = common.load_run_config(out_dir).get("base")
        if not base_dir:
            raise ValueError(f"--compare_base: {out_dir}/config.json names no base model")
        b = common.load_for_inference(base_dir, mesh=mesh_)
        base_rows, base_figures = evaluate_model(b.params, b.cfg, b.template or template, world, n=n,
                                                 seed=seed, mesh=mesh_, max_new_tokens=max_new_tokens,
                                                 progress=verbose)
    table = format_table(rows, base_rows)
    if no_python:  # the letter rows then measure the refusal, not the model
        table += f"\n\nwarning: {no_python}; the 'with python' row is not a measurement of the model."
    line = figures_json(figures, base_figures)
    (out_dir / "assistant.md").write_text(f"Assistant evaluation: {out_dir} step {step}, greedy, held-out "
                                          f"prompts\n\n{table}\n")
    (out_dir / "assistant.json").write_text(line + "\n")
    if verbose:
        common.say(table)
        common.say(line)
    return {"rows": rows, "figures": json.loads(line), "table": table}
