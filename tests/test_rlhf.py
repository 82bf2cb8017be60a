"""RLHF (experiments/reward_model.py, experiments/rlhf.py): the best-of-n order-statistic
expectation against brute force, Gao et al.'s fits on synthetic numbers with known coefficients,
DPO through the shared train step on a micro SFT model, and the whole pipeline end to end on that
model (reward-model run directory with its shifted head, best-of-n, RL, DPO, plot, report).
The best-of-n KL formula itself is tested in tests/test_rl.py (test_best_of_n_kl)."""
import dataclasses
import itertools
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from core import rl as rl_lib
from core import sharding
from core import train
from data import preferences as prefs
from experiments import reward_model as rmx
from experiments import rlhf

WORLD = "synthetic:seed=0,entities=40,bytes=200K"


# ----------------------------------------------------------------------------- pure pieces


def test_best_of_n_curve_matches_brute_force_over_subsets():
    rng = np.random.default_rng(0)
    p, m = 3, 7
    proxy = rng.normal(size=(p, m))
    gold = rng.normal(size=(p, m))
    ns = [1, 2, 3, 5, 7]
    curve = rlhf.best_of_n_curve(proxy, gold, ns)
    for n, gp, gg in zip(ns, curve["proxy"], curve["gold"]):
        bp, bg = [], []
        for a in range(p):
            subsets = list(itertools.combinations(range(m), n))
            best = [max(s, key=lambda i: proxy[a, i]) for s in subsets]
            bp.append(np.mean([proxy[a, i] for i in best]))
            bg.append(np.mean([gold[a, i] for i in best]))
        assert gp == pytest.approx(np.mean(bp), abs=1e-9)
        assert gg == pytest.approx(np.mean(bg), abs=1e-9)
    assert curve["kl"] == pytest.approx([rl_lib.best_of_n_kl(n) for n in ns])
    assert curve["d"][0] == 0.0 and curve["proxy"][0] == pytest.approx(proxy.mean())
    # the proxy of best-of-n rises with n (it is what is selected on)
    assert all(b >= a - 1e-12 for a, b in zip(curve["proxy"], curve["proxy"][1:]))
    with pytest.raises(ValueError, match="pool size"):
        rlhf.best_of_n_curve(proxy, gold, [8])


@pytest.mark.parametrize("form,a,b", [("bon", 1.5, 0.4), ("rl", 0.8, 0.5)])
def test_gao_fits_recover_known_coefficients_and_peaks(form, a, b):
    d = np.linspace(0.05, 4.0, 30)
    r = rlhf.gao_curve(d, a, b, form)
    fit = rlhf.fit_gao(d, r, form)
    assert fit["a"] == pytest.approx(a, rel=1e-9) and fit["b"] == pytest.approx(b, rel=1e-9)
    want_peak = a / (2 * b) if form == "bon" else math.exp(a / b - 1)
    assert fit["d_peak"] == pytest.approx(want_peak, rel=1e-9)
    grid = np.linspace(1e-3, 10, 20001)
    assert fit["d_peak"] == pytest.approx(grid[np.argmax(rlhf.gao_curve(grid, a, b, form))], abs=1e-3)
    # with noise the fit is still close
    noisy = r + np.random.default_rng(1).normal(0, 0.01, r.shape)
    f2 = rlhf.fit_gao(d, noisy, form)
    assert f2["a"] == pytest.approx(a, abs=0.05) and f2["b"] == pytest.approx(b, abs=0.05)
    # a rising-only curve has no peak
    assert rlhf.fit_gao(d, 0.5 * d + 0.1 * d * d, "bon")["d_peak"] is None


def test_curve_summary_reads_the_gold_peak():
    pts = [{"step": 0, "d": 0.0, "proxy": 0.0, "gold": 1.0}, {"step": 10, "d": 1.0, "proxy": 1.0, "gold": 2.0},
           {"step": 20, "d": 2.0, "proxy": 2.0, "gold": 0.5}]
    s = rlhf.curve_summary(pts)
    assert (s["proxy_start"], s["proxy_end"], s["gold_start"], s["gold_peak"], s["gold_end"], s["d_at_gold_peak"]) == \
        (0.0, 2.0, 1.0, 2.0, 0.5, 1.0)


def test_response_rows_mask_only_the_response():
    rows = rlhf.response_rows([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], 8)
    assert rows["tokens"][0].tolist() == [1, 2, 3, 5, 6, 0, 0, 0]
    # target t predicts tokens[t + 1]: the response's tokens are targets 2, 3 (row 0) and 0..2 (row 1)
    assert rows["mask"][0].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert rows["mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="does not fit"):
        rlhf.response_rows([[1] * 7], [[2, 3]], 8)


# ----------------------------------------------------------------------------- on a micro SFT model


@pytest.fixture(scope="module")
def micro_sft(tmp_path_factory):
    from experiments import pretrain, sft

    root = tmp_path_factory.mktemp("rlhf")
    base = pretrain.run(pretrain.PretrainConfig(
        out_dir=str(root / "base"), data=WORLD, vocab_size=400, tokenizer_bytes=200_000, d_model=32, n_layers=1,
        n_heads=2, d_ff=64, seq_len=64, batch_size=8, steps=2, eval_every=0, eval_samples=0, ckpt_every=2,
        warmup_steps=1, async_checkpoint=False))
    sft.run(sft.SFTConfig(init=base["out_dir"], out_dir=str(root / "sft"), n_conversations=100, val_conversations=8,
                          seq_len=127, batch_size=8, steps=2, eval_every=0, ckpt_every=2, eval_samples=0,
                          warmup_steps=1, async_checkpoint=False))
    return root


def _hand_comparisons(world, template, n=8):
    """Rankings where the best response is a true fact sentence and the worst is junk."""
    judge = prefs.GoldJudge(world)
    prompts = prefs.preference_prompts(world, n, seed=0)
    tok = template.tokenizer
    end = list(template.stop_ids[:1])
    ids, texts = [], []
    for p in prompts:
        attr, value = next(iter(judge.truth(p.entity).items()))
        e = world.entity(p.entity)
        good = prefs.conv.fact_sentence(e, attr, value)
        for t in (good, f"{p.entity} is nice.", "blah blah blah blah"):
            texts.append(t)
            ids.append(tok.encode(t) + end)
    return prefs.label(prompts, ids, texts, judge, 3, noise=0.0, seed=0)


def test_dpo_through_the_shared_train_step(micro_sft):
    from experiments import assistant_eval, common

    mesh = sharding.make_mesh("data:-1")
    loaded = common.load_for_inference(micro_sft / "sft", mesh=mesh)
    world = assistant_eval.world_of_run(micro_sft / "sft")
    comps = _hand_comparisons(world, loaded.template)
    pairs = prefs.preference_pairs(comps)
    assert len(pairs) == 3 * len(comps)
    seq_len = rlhf.row_len(loaded.template, world, 16, loaded.cfg)
    rows = rlhf.dpo_rows(loaded.template, pairs[:8], seq_len)
    scorer = rlhf.make_token_scorer(loaded.cfg)
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in rows.items()}
    rows["ref_logp"] = rlhf.token_logps(scorer, loaded.params, flat, mesh).sum(1).reshape(8, 2)
    import optax

    opt = optax.adam(3e-3)
    step = train.make_train_step(loaded.cfg, opt, mesh, rl_lib.make_dpo_loss_fn(0.5))
    state = train.train_state_from_params(jax.tree.map(lambda x: x.copy(), loaded.params), loaded.cfg, opt, mesh)
    batch = sharding.shard_batch(rows, mesh)
    state, m0 = step(state, batch)
    assert float(m0["loss"]) == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    for _ in range(15):
        state, m = step(state, batch)
    assert float(m["loss"]) < 0.5 * math.log(2) and float(m["accuracy"]) == 1.0 and float(m["reward_margin"]) > 0


@pytest.fixture(scope="module")
def rlhf_run(micro_sft):
    cfg = _rlhf_cfg(micro_sft)
    return pathlib.Path(cfg.out_dir), rlhf.run(cfg)


def _rlhf_cfg(micro_sft):
    return rlhf.RLHFConfig(init=str(micro_sft / "sft"), out_dir=str(micro_sft / "rlhf"), n_prompts=16,
                           val_prompts=8, k=3, rm_sizes="16", rm_steps=3, rm_batch=8, max_new_tokens=8, bon_prompts=2,
                           bon_max_n=8, rl_steps=2, rl_prompts=2, rl_group=4, dpo_steps=2, dpo_batch=8, eval_every=2,
                           eval_prompts=4, eval_samples=2, ckpt_every=1)


def test_reward_model_run_directory_and_shifted_head(rlhf_run):
    out, summary = rlhf_run
    d = out / "rm_16"
    assert (d / rmx.HEAD_FILE).is_file() and (d / "evals.jsonl").is_file()
    saved = json.loads((d / "config.json").read_text())
    assert saved["stage"] == "reward_model" and saved["n_comparisons"] == 16
    rm = rmx.load_reward_model(d)
    assert set(rm.params) == {"model", "head"}
    # the exported head is shifted: the reference responses (the training comparisons) average 0
    comps = rmx.load_comparisons(d / rmx.TRAIN_FILE)
    prompts, responses, gold = rmx.gold_rows(rm.template, comps, rm.seq_len)
    r = rmx.score_responses(rmx.make_reward_fn(rm.cfg), rm.params, prompts, responses, rm.seq_len)
    assert abs(r.mean()) < 1e-4 and r.std() > 0
    acc = summary["reward_models"]["16"]
    # NaN when no held-out pair has distinct gold scores (the micro model's 8-token replies often tie).
    assert 0 <= acc["val_pair_acc"] <= 1
    assert math.isnan(acc["val_gold_pair_acc"]) or 0 <= acc["val_gold_pair_acc"] <= 1


def test_rlhf_summary_plot_and_report(rlhf_run):
    out, summary = rlhf_run
    h = summary["headline"]
    for k in ("proxy_start", "proxy_end", "gold_start", "gold_peak", "gold_end", "d_at_gold_peak"):
        assert isinstance(h[k], float), k
    rl = summary["rl"]["16"]["evals"]
    assert [e["step"] for e in rl] == [0, 2] and rl[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert h["gold_peak"] == max(e["gold"] for e in rl)
    bon = summary["best_of_n"]["16"]
    assert bon["n"] == [1, 2, 4, 8] and len(summary["dpo"]["evals"]) == 2
    assert (out / "rlhf.png").stat().st_size > 10_000
    md = rlhf.report_section(summary)
    assert "| best-of-n (n<=8) | 16 |" in md and "| RL (2 steps) | 16 |" in md and "| DPO (2 steps)" in md
    assert (out / "rl_policy" / "checkpoints").is_dir() and (out / "dpo_policy" / "checkpoints").is_dir()
    assert json.loads((out / "rl_policy" / "config.json").read_text())["stage"] == "rlhf"
    # each phase is a run directory of the shared loop: per-step metrics, evaluations from step 0
    steps = [r["step"] for r in map(json.loads, (out / "rl_policy" / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2]
    evals = [json.loads(x) for x in (out / "dpo_policy" / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and evals[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_rlhf_needs_resume_for_an_earlier_run(rlhf_run):
    out, _ = rlhf_run
    cfg = dataclasses.replace(_rlhf_cfg(out.parent), resume=False)
    with pytest.raises(ValueError, match="--resume"):
        rlhf.run(cfg)


def test_rlhf_phases_resume_exactly_after_a_stop(rlhf_run, tmp_path, monkeypatch):
    """Stopped (as by Ctrl-C) after RL step 1, then --resume: the RL losses, rewards and the
    evaluations equal the uninterrupted run's."""
    import shutil

    from experiments import stage

    out, summary = rlhf_run
    new = tmp_path / "rlhf"
    shutil.copytree(out, new, ignore=shutil.ignore_patterns("rl_policy", "dpo_policy"))  # pool + RM reused
    cfg = dataclasses.replace(_rlhf_cfg(out.parent), out_dir=str(new), resume=True)
    polls = []
    monkeypatch.setattr(stage.StopFlag, "__call__", lambda self: polls.append(1) or len(polls) == 1)
    first = rlhf.run(cfg)
    assert first["interrupted"] and (new / "rl_policy" / "checkpoints" / "1").is_dir()
    assert not (new / "dpo_policy").exists()
    monkeypatch.setattr(stage.StopFlag, "__call__", lambda self: False)
    second = rlhf.run(cfg)

    def records(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    for phase in ("rl_policy", "dpo_policy"):
        a, b = records(out / phase), records(new / phase)
        assert [r["step"] for r in b] == [r["step"] for r in a]
        np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    np.testing.assert_allclose([r["proxy_reward"] for r in records(new / "rl_policy")],
                               [r["proxy_reward"] for r in records(out / "rl_policy")], rtol=1e-5)
    ga = [e["gold"] for e in summary["rl"]["16"]["evals"]]
    gb = [e["gold"] for e in second["rl"]["16"]["evals"]]
    np.testing.assert_allclose(gb, ga, rtol=1e-6)
