"""experiments/rl.py end to end on micro models: the run directory (metrics every step with the
issue's keys, evaluations, curves, final summary, a chat-ready 'rl' stage), exact resume after a
SIGKILL (identical rewards and losses), the clear errors, and the Hugging Face path on a small
random Qwen2 checkpoint that transformers writes (load, native template, rollouts, rewards,
update, save, export back to HF)."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from core.rewards import Score

REPO = pathlib.Path(__file__).resolve().parents[1]
WORLD = "synthetic:seed=0,entities=40,bytes=200K"
# What metrics.jsonl must hold every step (issue 10, section 4).
METRIC_KEYS = ("reward_mean", "reward_std", "acc_strict", "acc_lenient", "zero_var_frac", "len_mean", "len_correct",
               "len_wrong", "truncation_rate", "entropy", "kl", "clip_frac_low", "clip_frac_high", "grad_norm",
               "logp_diff_mean", "rollout_tokens_per_s", "train_tokens_per_s", "rollout_s", "train_s", "rollout_frac",
               "loss", "pg_loss", "ratio_mean")
SAME_KEYS = ("reward_mean", "acc_lenient", "len_mean", "loss", "pg_loss", "kl", "grad_norm", "entropy",
             "clip_frac", "ratio_mean")


def _odd_length(text, answer, info):
    v = float(len(text) % 2)
    return Score(reward=v, strict=bool(v), lenient=bool(v), format_ok=True)


def _zero(text, answer, info):
    return Score(reward=0.0, strict=False, lenient=False, format_ok=True)


def _raises(text, answer, info):
    raise ZeroDivisionError("bad reward")


def _tasks(fn, n=6):
    from data import tasks as tasks_lib

    return [tasks_lib.TaskItem(f"odd/{i}", ({"role": "user", "content": f"Say something odd ({i})."},), "1", fn, {})
            for i in range(n)]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A micro base (pretrain, 3 steps) and an SFT run from it (6 steps)."""
    from experiments import pretrain, sft

    root = tmp_path_factory.mktemp("rl")
    base = pretrain.run(pretrain.PretrainConfig(
        out_dir=str(root / "base"), data=WORLD, vocab_size=400, tokenizer_bytes=200_000, d_model=32, n_layers=1,
        n_heads=2, d_ff=64, seq_len=64, batch_size=8, steps=3, eval_every=0, eval_samples=0, ckpt_every=3,
        warmup_steps=1, async_checkpoint=False))
    sft.run(sft.SFTConfig(init=base["out_dir"], out_dir=str(root / "sft"), n_conversations=200, val_conversations=16,
                          seq_len=255, batch_size=8, steps=6, eval_every=0, ckpt_every=6, eval_samples=0,
                          warmup_steps=1, async_checkpoint=False))
    return root / "sft"


def _cfg(init, out, **kw):
    from experiments import rl

    base = dict(init=str(init), out_dir=str(out), algo="grpo", tasks="short_math:n=40",
                eval_tasks="short_math:split=heldout,n=4", group_size=4, prompts_per_step=2, max_new_tokens=12,
                steps=4, eval_every=2, ckpt_every=2, log_every=1, pass_k=2, async_checkpoint=False, lr=1e-2,
                dynamic_sampling=None)  # the preset's (grpo: off), so every row trains
    base.update(kw)
    return rl.RLRunConfig(**base)


@pytest.fixture(scope="module")
def rl_run(sft_dir):
    from experiments import rl

    out = sft_dir.parent / "rl"
    cfg = _cfg(sft_dir, out)
    return out, cfg, rl.run(cfg)


def test_run_directory(rl_run):
    from experiments import common, rl

    out, cfg, summary = rl_run
    for k in rl.FINAL_KEYS:
        assert k in summary, k
    assert summary["steps"] == 4 and not summary["interrupted"]
    recs = common.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, missing
        assert r["logp_diff_mean"] < 1e-4            # trainer and sampler agree on the sampled tokens
        assert r["kl"] >= 0 and 0 <= r["acc_strict"] <= r["acc_lenient"] <= 1
    # The first step that updates (a step whose groups all tie is skipped, updates 0): policy ==
    # reference == old there, so the KL is 0 and every ratio is 1.
    first = next((r for r in recs if r["updates"] > 0), None)
    assert first is not None, [r["updates"] for r in recs]
    assert first["kl"] < 1e-9 and abs(first["ratio_mean"] - 1) < 1e-5
    evals = common.read_jsonl(out / "evals.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(k in evals[0] for k in ("greedy_lenient", "greedy_strict", "pass@2_lenient", "pass@2_strict",
                                       "mean_len"))
    assert summary["heldout_acc_start"] == evals[0]["greedy_lenient"]
    # held-out accuracy split into unseen templates and unseen numbers, weighted back to the whole
    from data import tasks as tasks_lib
    held = tasks_lib.short_math_tasks(0, "heldout", 4)
    share = sum(t.info["heldout_template"] for t in held) / len(held)
    assert 0 < share < 1, "the held-out prompts must hold both kinds for this check"
    parts = {g: evals[0].get(f"greedy_lenient/unseen_{g}") for g in ("template", "numbers")}
    assert None not in parts.values(), evals[0]
    assert abs(share * parts["template"] + (1 - share) * parts["numbers"] - evals[0]["greedy_lenient"]) < 1e-9
    assert summary["heldout_acc_unseen_template_end"] == evals[-1]["greedy_lenient/unseen_template"]
    assert summary["mean_len_end"] == evals[-1]["mean_len"]
    for name in ("heldout_accuracy.png", "response_length.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    saved = json.loads((out / "config.json").read_text())
    assert saved["stage"] == "rl" and saved["algo"] == "grpo" and saved["rl"]["kl_coef"] == 0.04
    ld = common.load_for_inference(out)
    assert ld.kind == "chat-tuned" and ld.step == 4
    md = rl.report_section(summary)
    assert "| accuracy, lenient |" in md and "rl/plots/response_length.png" in md


@pytest.mark.parametrize("case", ["no_signal", "mu2"])
def test_entropy_and_mismatch_logged_every_step(sft_dir, tmp_path, case):
    """The default update is on-policy and measures entropy and the sampler mismatch itself; a
    step with no update (every group tied, no KL) scores its rollouts instead, and mu = 2 scores
    old log-probs before its passes: every record has both, and they agree with the sampler."""
    from experiments import common, rl

    if case == "no_signal":
        cfg = _cfg(sft_dir, tmp_path / case, algo="dr_grpo", steps=2, pass_k=0)
        summary = rl.run(cfg, train_tasks=_tasks(_zero))
    else:
        cfg = _cfg(sft_dir, tmp_path / case, mu=2, steps=2, pass_k=0)
        summary = rl.run(cfg, train_tasks=_tasks(_odd_length))
    assert not [k for k in summary if k.startswith("pass@")]  # --pass_k=0: greedy only, no 'pass@0' keys
    recs = common.read_jsonl(tmp_path / case / "metrics.jsonl")
    assert [r["updates"] for r in recs] == ([0, 0] if case == "no_signal" else [2, 2])
    for r in recs:
        assert 0 < r["entropy"] < np.log(512) and r["logp_diff_mean"] < 1e-4, r


def test_resume_after_kill_is_identical(rl_run, sft_dir):
    from experiments import common, rl

    out_ref, cfg, _ = rl_run
    out = sft_dir.parent / "rl_killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")  # the same mesh as this process
    flags = [f"--{f.name}={'none' if getattr(cfg, f.name) is None else getattr(cfg, f.name)}"
             for f in dataclasses.fields(cfg) if f.name not in ("out_dir", "debug_kill_at_step")]
    proc = subprocess.run([sys.executable, "-m", "experiments.rl", *flags, f"--out_dir={out}",
                           "--debug_kill_at_step=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [r["step"] for r in common.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        rl.run(dataclasses.replace(cfg, out_dir=str(out)))
    summary = rl.run(dataclasses.replace(cfg, out_dir=str(out), resume=True))
    assert summary["steps"] == 4
    got, want = common.read_jsonl(out / "metrics.jsonl"), common.read_jsonl(out_ref / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        for k in SAME_KEYS:
            assert g[k] == w[k] or (np.isnan(g[k]) and np.isnan(w[k])), (g["step"], k, g[k], w[k])
    assert [e["greedy_lenient"] for e in common.read_jsonl(out / "evals.jsonl")] == \
        [e["greedy_lenient"] for e in common.read_jsonl(out_ref / "evals.jsonl")]


def test_clear_errors(sft_dir, tmp_path):
    from experiments import rl

    with pytest.raises(ValueError, match="G >= 2"):
        _cfg(sft_dir, tmp_path / "a", group_size=1)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        _cfg(sft_dir, tmp_path / "a", minibatch_size=6)
    with pytest.raises(ValueError, match="must divide the rollout batch"):
        _cfg(sft_dir, tmp_path / "a", minibatch_size=12, prompts_per_step=2, group_size=4)
    with pytest.raises(ValueError, match="unknown RL algorithm|clip_low"):
        _cfg(sft_dir, tmp_path / "a", clip_low=1.5)
    with pytest.raises(ValueError, match=r"reward function of task 'odd/0' raised ZeroDivisionError"):
        rl.run(_cfg(sft_dir, tmp_path / "b", steps=1), train_tasks=_tasks(_raises), eval_tasks=_tasks(_raises, 2))


def test_hf_qwen2_path(tmp_path):
    """A random Qwen2 checkpoint written by transformers: RL in its own ChatML template, then the
    policy exported back to HF reads in transformers with our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from core import model as model_lib
    from experiments import common, rl
    from tests import test_chat_template as tct

    hf_dir = tct.write_random_qwen2(tmp_path / "qwen")
    out = tmp_path / "rl"
    summary = rl.run(_cfg(hf_dir, out, steps=2, eval_every=0, pass_k=0, export_hf=True, max_new_tokens=8),
                     train_tasks=_tasks(_odd_length), eval_tasks=_tasks(_odd_length, 2))
    assert summary["steps"] == 2
    recs = common.read_jsonl(out / "metrics.jsonl")
    assert recs[0]["grad_norm"] > 0 and recs[0]["logp_diff_mean"] < 1e-4
    ld = common.load_for_inference(out)                      # the RL run: native template, chat-tuned
    assert ld.template.name != "zipchat" and ld.kind == "chat-tuned"
    assert ld.template.end_of_turn == ld.tokenizer.special_tokens["<|im_end|>"]
    start = common.load_for_inference(hf_dir).params
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ld.params), jax.tree.leaves(start)))  # updated
    # the export reads in transformers and gives our logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    ids = np.asarray([ld.template.render_for_completion([{"role": "user", "content": "Hello there"}])], np.int32)
    ours, _ = model_lib.forward(ld.params, ids, ld.cfg)
    with torch.no_grad():
        ref = theirs(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4, rtol=1e-4)
    assert (out / "hf" / "tokenizer_config.json").is_file()
