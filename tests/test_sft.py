"""SFT: masked conversation rows through the grain pipeline, overfitting a handful of
conversations, and experiments/sft.py end to end (a chat-ready run directory the chat CLI and the
assistant evaluation accept)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from core import chat as chat_lib
from core import model as model_lib
from core import optim
from core import sharding
from core import tokenizer as tok_lib
from core import train
from data import conversations as conv
from data import pipeline
from data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
WORLD = "synthetic:seed=0,entities=40,bytes=200K"


@pytest.fixture(scope="module")
def world():
    return synthetic.make_world(seed=0, n_entities=40)


@pytest.fixture(scope="module")
def template(world):
    from data import readers

    docs = readers.open_source(WORLD)
    tok = tok_lib.train_bpe((docs[i] for i in range(200)), vocab_size=512)
    return chat_lib.zipchat_template(tok)


def _tool_conversation():
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 123 * 456?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me compute."},
                {"type": "tool_call", "tool": "calculator", "text": "123*456"},
                {"type": "tool_output", "text": "56088"},
                {"type": "text", "text": "It is 56088."}]}]


def test_packed_rows_mask_only_assistant_tokens(template, world):
    from experiments import sft

    examples = conv.sft_mixture(world, 24, seed=3)
    examples.append(conv.Example("chat", tuple(_tool_conversation()), "56088", {}))
    seq_len = 255
    it = pipeline.make_train_iterator(examples, template.tokenizer, seq_len, 4, seed=0, shuffle=False,
                                      packing="bestfit", num_epochs=1, drop_remainder=False,
                                      render=sft.Renderer(template, seq_len + 1))
    rendered = {tuple(template.render(ex.messages)[0]): template.render(ex.messages)[1] for ex in examples}
    t = template.tools
    seen = 0
    for batch in it:
        assert batch["mask"].shape == (batch["tokens"].shape[0], seq_len)
        for r in range(len(batch["tokens"])):
            seg = batch["segment_ids"][r]
            row_mask = np.concatenate([[0], batch["mask"][r]])  # back to per-token alignment
            for s in set(seg.tolist()) - {0}:
                idx = np.flatnonzero(seg == s)
                ids = tuple(batch["tokens"][r, idx].tolist())
                assert ids in rendered  # whole conversations, never cut
                want = np.asarray(rendered[ids])
                got = row_mask[idx].copy()
                got[0] = want[0]  # a segment's first token is never a target (nothing predicts it)
                np.testing.assert_array_equal(got, want)
                seen += 1
                # tool outputs and headers are 0; tool-call tokens and <|im_end|> of the assistant are 1
                toks = np.asarray(ids)
                assert not want[toks == t.output_start].any() and not want[toks == t.output_end].any()
                assert want[toks == t.start["calculator"]].all() if (toks == t.start["calculator"]).any() else True
            assert not row_mask[seg == 0].any()  # padding is never trained
    it.close()
    assert seen == len(examples)
    # the hand-written tool conversation: exactly its assistant-produced tokens carry mask 1
    ids, mask = template.render(_tool_conversation())
    tok = template.tokenizer
    trained = tok.decode([i for i, m in zip(ids, mask) if m and not tok.is_special(i)])
    assert trained == "Let me compute.123*456It is 56088."
    assert "56088" not in tok.decode([i for i, m in zip(ids, mask) if m][:8])  # the output is not trained


def test_no_attention_across_packed_conversations(template, world):
    tok = template.tokenizer
    cfg = model_lib.get_config("tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=256)
    params = model_lib.init_params(jax.random.key(0), cfg)
    a, _ = template.render(conv.sft_mixture(world, 1, seed=1)[0].messages)
    b, _ = template.render(conv.sft_mixture(world, 1, seed=2)[0].messages)
    row = np.asarray(a + b, np.int32)[None]
    seg = np.asarray([1] * len(a) + [2] * len(b), np.int32)[None]
    pos = np.asarray(list(range(len(a))) + list(range(len(b))), np.int32)[None]
    packed, _ = model_lib.forward(params, row, cfg, positions=pos, segment_ids=seg)
    alone, _ = model_lib.forward(params, np.asarray(b, np.int32)[None], cfg)
    np.testing.assert_allclose(np.asarray(packed[0, len(a):]), np.asarray(alone[0]), atol=1e-4)


def test_sft_overfits_a_handful_of_conversations(template, world):
    tok = template.tokenizer
    cfg = model_lib.get_config("tiny", vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)
    fit = [ex for ex in conv.sft_mixture(world, 60, seed=5) if len(template.render(ex.messages)[0]) <= 100]
    # three of any kind, and one without tool calls (its reply is checked by greedy decoding below)
    plain = next(ex for ex in fit if isinstance(ex.messages[-1]["content"], str))
    examples = [plain] + [ex for ex in fit if ex is not plain][:3]
    rows = [template.render(ex.messages) for ex in examples]
    T = 101
    tokens = np.zeros((4, T), np.int32)
    seg = np.zeros((4, T), np.int32)
    pos = np.zeros((4, T), np.int32)
    tmask = np.zeros((4, T), np.int32)
    for r, (ids, m) in enumerate(rows):
        tokens[r, :len(ids)], seg[r, :len(ids)], tmask[r, :len(ids)] = ids, 1, m
        pos[r, :len(ids)] = np.arange(len(ids))
    batch = {"tokens": tokens, "segment_ids": seg, "positions": pos, "mask": tmask[:, 1:]}
    mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
    opt = optim.make_optimizer(optim.OptimConfig(lr=3e-3, warmup_steps=5, total_steps=150, schedule="constant",
                                                 weight_decay=0.0))
    state = train.init_train_state(jax.random.key(0), cfg, opt, mesh)
    step = train.make_train_step(cfg, opt, mesh)
    sharded = sharding.shard_batch(batch, mesh)
    losses = []
    for _ in range(150):
        state, m = step(state, sharded)
        losses.append(float(m["loss"]))
    assert losses[0] > 3.0 and losses[-1] < 0.05, (losses[0], losses[-1])
    assert float(m["tokens"]) == float(tmask[:, 1:].sum())  # the loss counts assistant tokens only
    # greedy decoding from the prompt reproduces the memorised reply
    ex = plain
    prompt = template.render_for_completion(ex.prompt)
    from experiments import assistant_eval

    reply = assistant_eval.generate_replies(state["params"], cfg, template, [ex.prompt], max_new_tokens=60)[0]
    assert reply["finished"] and not reply["opened_role"]
    assert chat_lib.normalize_message(reply["message"]) == chat_lib.normalize_message(dict(ex.messages[-1])), prompt


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A micro base (pretrain, 3 steps) and an SFT run from it (6 steps), through the scripts."""
    from experiments import pretrain, sft

    root = tmp_path_factory.mktemp("sft")
    base = pretrain.run(pretrain.PretrainConfig(
        out_dir=str(root / "base"), data=WORLD, vocab_size=400, tokenizer_bytes=200_000, d_model=32, n_layers=1,
        n_heads=2, d_ff=64, seq_len=64, batch_size=8, steps=3, eval_every=0, eval_samples=0, ckpt_every=3,
        warmup_steps=1, async_checkpoint=False))
    cfg = sft.SFTConfig(init=base["out_dir"], out_dir=str(root / "sft"), n_conversations=200, val_conversations=16,
                        seq_len=255, batch_size=8, steps=6, eval_every=3, ckpt_every=3, eval_samples=1,
                        warmup_steps=1, async_checkpoint=False)
    return root, sft.run(cfg), cfg


def test_sft_run_directory_is_chat_ready(sft_run):
    root, summary, cfg = sft_run
    out = root / "sft"
    saved = json.loads((out / "config.json").read_text())
    assert saved["stage"] == "sft" and saved["template"] == "zipchat" and saved["world_data"] == WORLD
    assert summary["step"] == 6 and summary["val_loss"] is not None and summary["n_train"] > 150
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 6] and all("val_loss" in e for e in evals)
    assert (out / "samples.txt").read_text().count("=== step") == 2
    # the chat CLI answers from it
    proc = subprocess.run([sys.executable, "-m", "experiments.chat", f"--out_dir={out}", "--prompt=Who are you?",
                           "--temperature=0", "--max_new_tokens=8", "--tools=calculator,search",
                           f"--memory_file={root / 'm.json'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_sft_refuses_to_overwrite_and_resumes(sft_run):
    from experiments import sft

    root, summary, cfg = sft_run
    import dataclasses

    with pytest.raises(ValueError, match="already holds checkpoints"):
        sft.run(cfg)
    again = sft.run(dataclasses.replace(cfg, resume=True))  # finished: nothing to do, same figures
    assert again["step"] == 6 and again["loss"] == summary["loss"]
    with pytest.raises(ValueError, match="--out_dir must differ from --init"):
        sft.SFTConfig(init=str(root / "base"), out_dir=str(root / "base"))


def test_assistant_eval_on_the_sft_run(sft_run):
    from experiments import assistant_eval

    root, _, _ = sft_run
    res = assistant_eval.run(root / "sft", n=2, verbose=False)
    f = res["figures"]
    for key in ("format_rate", "identity_rate", "mult_no_tool", "mult_tool", "count_no_tool", "count_tool",
                "heldout_no_search", "heldout_search", "hallucination_rate", "n_per_row"):
        assert key in f, key
    assert (root / "sft" / "assistant.md").exists()



def test_sft_from_a_hugging_face_checkpoint_in_its_own_template(tmp_path):
    """A random Qwen2 checkpoint written by transformers, fine-tuned on messages-jsonl data in its
    ChatML template: the run directory keeps the template and is chat-tuned."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from experiments import common, sft
    from tests import test_chat_template as tct

    hf_dir = tct.write_random_qwen2(tmp_path / "qwen")
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
            for w in ("hello", "there", "cat", "dog", "sun", "moon", "tea", "sea", "red", "blue", "one", "two")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    summary = sft.run(sft.SFTConfig(init=str(hf_dir), out_dir=str(out), data=f"messages:{data}", seq_len=128,
                                    batch_size=8, steps=20, lr=3e-3, warmup_steps=2, eval_every=0, eval_samples=0,
                                    ckpt_every=20, async_checkpoint=False))
    assert summary["step"] == 20 and summary["n_train"] == 11  # the last 10% (one) is held out
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]
    loaded = common.load_for_inference(out)
    assert loaded.template.name != "zipchat" and loaded.kind == "chat-tuned"
    assert (out / "tokenizer_config.json").is_file()
    # the loss covered only the replies in the native template: the rendered mask of one example
    ids, mask = loaded.template.render(rows[0]["messages"])
    assert loaded.tokenizer.decode([i for i, m in zip(ids, mask) if m]).startswith("hello!")


def test_tokens_to_think_runs_both_orders_and_splits_held_out_kinds(sft_run):
    """Two micro SFT runs (answer first / reasoning first) from the same base; the JSON line's
    per-kind accuracies average (weighted by their counts) to the overall one."""
    from experiments import tokens_to_think as ttt

    root = sft_run[0]
    base, out = root / "base", root / "think"
    line = ttt.run(ttt.ThinkConfig(base=str(base), out_dir=str(out), n_train=32, n_eval=16, steps=2, batch_size=8))
    for o in ttt.ORDERS:
        assert (out / o / "config.json").is_file()
        _, evals = ttt.problems(0, 1, 16, o)
        kinds = [ttt.heldout_kind(e) for e in evals]
        parts = [line[f"acc_{o}_{k}"] * kinds.count(k) for k in ttt.HELDOUT_KINDS if kinds.count(k)]
        assert sum(parts) / 16 == pytest.approx(line[f"acc_{o}"], abs=1e-3)
        assert set(kinds) == set(ttt.HELDOUT_KINDS)
    train, _ = ttt.problems(0, 32, 1, "answer_first")
    assert all(ttt.heldout_kind(e) == "unseen_numbers" for e in train)  # no held-out story in training
    assert "| reasoning first |" in (out / "report.md").read_text()
