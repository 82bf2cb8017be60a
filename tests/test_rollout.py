"""core/rollout.py: rows and masks (prompt and force-fed tool outputs excluded), recomputed old
log-probs against the sampler's, dynamic sampling, reference log-probs only with a KL term, the
clear errors, and a tiny policy that learns through rollouts + core.train."""
import dataclasses
import warnings

import jax
import numpy as np
import optax
import pytest

from core import chat as chat_lib
from core import model as model_lib
from core import rl as rl_lib
from core import rollout
from core import sampling
from core import sharding
from core import tokenizer as tok_lib
from core import train as train_lib
from core.rewards import Score

TEXTS = ["Tom has 3 apples and buys 4 more. How many apples? Answer: 7", "the cat sat on the mat and ate",
         "What is 12 * 3? Let me compute. It is 36.", "hello there, how are you today? fine thanks"] * 20


@pytest.fixture(scope="module")
def template():
    tok = tok_lib.train_bpe(TEXTS, vocab_size=300)
    return chat_lib.zipchat_template(tok)


@pytest.fixture(scope="module")
def model(template):
    cfg = model_lib.get_config("tiny", vocab_size=template.tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                               d_ff=64, max_seq_len=128)
    params = model_lib.init_params(jax.random.PRNGKey(0), cfg)
    return cfg, params


@dataclasses.dataclass(frozen=True)
class Task:
    id: str
    prompt: tuple
    fn: object

    def score(self, text):
        return self.fn(text)


def _task(i, fn, q="What is 3 + 4?"):
    return Task(f"t{i}", ({"role": "user", "content": f"{q} ({i})"},), fn)


def _const(v):
    return lambda text: Score(reward=v, strict=v > 0, lenient=v > 0, format_ok=True)


def _has_e(text):
    v = float("e" in text)
    return Score(reward=v, strict=bool(v), lenient=bool(v), format_ok=True)


def _odd_length(text):
    v = float(len(text) % 2)
    return Score(reward=v, strict=bool(v), lenient=bool(v), format_ok=True)


# one rollout shape for most tests: one compilation of the sampler and the scorer
RC = rollout.RolloutConfig(n_prompts=2, group_size=4, max_new_tokens=6, seq_len=40)


def _draw_from(tasks):
    state = {"i": 0}

    def draw(k):
        out = [tasks[(state["i"] + j) % len(tasks)] for j in range(k)]
        state["i"] += k
        return out

    return draw, state


def test_rows_mask_only_sampled_completion_tokens():
    # prompt of 3 tokens, completions: row 0 = 2 sampled, 3 forced (a tool output), 1 sampled; row 1 = 1 token
    res = sampling.GenerateResult(
        tokens=np.array([[5, 6, 7, 8, 9, 10], [11, 0, 0, 0, 0, 0]], np.int32),
        logprobs=np.zeros((2, 6), np.float32),
        sample_logprobs=np.array([[-1, -2, 0, 0, 0, -3], [-4, 0, 0, 0, 0, 0]], np.float32),
        sampled_mask=np.array([[1, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]], np.int32),
        lengths=np.array([6, 1], np.int32), finish_reason=["stop", "stop"], prompt_index=np.array([0, 0]),
        tool_calls=[[], []])
    rows = rollout.build_rows([[1, 2, 3]], res, seq_len=12)
    np.testing.assert_array_equal(rows["tokens"][0], [1, 2, 3, 5, 6, 7, 8, 9, 10, 0, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1] * 4 + [0] * 8)
    # mask[t] is about target tokens[t + 1]: 5 and 6 (sampled), 7-9 forced -> 0, 10 sampled
    np.testing.assert_array_equal(rows["mask"][0], [0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(rows["mask"][1], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows["sampler_logp"][0], [0, 0, -1, -2, 0, 0, 0, -3, 0, 0, 0])
    masked = rollout.build_rows([[1, 2, 3]], res, seq_len=12, keep_b=np.array([False, True]))
    assert masked["mask"][0].sum() == 0 and masked["mask"][1].sum() == 1
    with pytest.raises(ValueError, match="rows hold 8"):
        rollout.build_rows([[1, 2, 3]], res, seq_len=8)


def test_tool_outputs_in_a_real_stream_are_masked(template, model):
    """A calculator call opened in the prompt: the engine serves it; its output tokens are in the
    row but never in the mask."""
    cfg, params = model
    t = template.tools
    prompt = template.render_for_completion([{"role": "user", "content": "2+3?"}]) + [t.start["calculator"]] + \
        template.tokenizer.encode("2+3")
    # make the first sampled token the calculator's end token: ban everything else for one token
    scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=12, stop_ids=template.stop_ids,
                                   banned_ids=tuple(i for i in range(cfg.vocab_size) if i != t.end["calculator"]))
    res = sampling.generate(params, cfg, [prompt], scfg, jax.random.PRNGKey(1),
                            tools={"calculator": lambda s: str(eval(s))}, template=template)
    assert res.tool_calls[0] and res.tool_calls[0][0]["output"] == "5"
    rows = rollout.build_rows([prompt], res, seq_len=64)
    toks, mask = rows["tokens"][0], rows["mask"][0]
    out_ids = t.render_output("5")
    start = len(prompt) + 1  # after the sampled end token
    np.testing.assert_array_equal(toks[start: start + len(out_ids)], out_ids)
    assert mask[len(prompt) - 1] == 1                                    # the sampled end token
    assert not mask[start - 1: start - 1 + len(out_ids)].any()           # forced output: never trained
    assert not mask[: len(prompt) - 1].any()                             # prompt: never trained
    assert mask.sum() == res.sampled_mask[0].sum()


def test_recomputed_old_logp_matches_the_sampler(template, model):
    cfg, params = model
    tasks = [_task(i, _has_e) for i in range(2)]
    draw, _ = _draw_from(tasks)
    roll = rollout.collect(params, draw, jax.random.PRNGKey(0), model_cfg=cfg, template=template,
                           rl_cfg=rl_lib.get_preset("dr_grpo"), rcfg=RC, scorer=rollout.make_scorer(cfg))
    m = roll.metrics
    assert m["completion_tokens_trained"] > 0
    assert m["logp_diff_mean"] < 1e-4 and m["logp_diff_max"] < 1e-3, m
    assert 0 < m["entropy"] < np.log(cfg.vocab_size) + 1e-3
    assert "ref_logp" not in roll.batch and "kl_ref" not in m          # no KL term: no reference pass
    np.testing.assert_allclose(roll.batch["advantages"].reshape(2, 4),
                               roll.rewards_ng - roll.rewards_ng.mean(1, keepdims=True), atol=1e-6)
    assert roll.batch["old_logp"].shape == roll.batch["mask"].shape == (8, 39)
    assert np.all(roll.batch["old_logp"][roll.batch["mask"] == 0] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_update_measures_what_the_scoring_pass_would(template, model, temperature):
    """recompute_old_logp=False skips the scoring pass: same rows and advantages, no 'old_logp';
    the update's loss and gradient equal those with the recomputed old log-probs (ratio 1), and
    it reports the same entropy and sampler mismatch the scoring pass gives."""
    from core import train as train_lib

    cfg, params = model
    rc = dataclasses.replace(RC, temperature=temperature)
    rl_cfg = rl_lib.get_preset("dr_grpo")
    rolls = []
    for recompute in (True, False):
        draw, _ = _draw_from([_task(i, _odd_length) for i in range(2)])
        rolls.append(rollout.collect(params, draw, jax.random.PRNGKey(3), model_cfg=cfg, template=template,
                                     rl_cfg=rl_cfg, rcfg=dataclasses.replace(rc, recompute_old_logp=recompute),
                                     scorer=rollout.make_scorer(cfg, temperature=temperature)))
    full, fast = rolls
    assert "old_logp" not in fast.batch and "entropy" not in fast.metrics
    for k in ("tokens", "mask", "advantages"):
        np.testing.assert_array_equal(full.batch[k], fast.batch[k])
    np.testing.assert_array_equal(fast.batch["sampler_logp"][fast.batch["mask"] == 0], 0)
    loss_fn = rl_lib.make_policy_loss_fn(rl_cfg, temperature=temperature)
    # jitted: eagerly, value_and_grad compiles each of its ~300 primitives (10 s of the test)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=2)
    (l_full, _), g_full = grad_fn(params, full.batch, cfg)
    (l_fast, aux), g_fast = grad_fn(params, fast.batch, cfg)
    np.testing.assert_allclose(l_fast, l_full, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_fast)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    tok = aux["tokens"]
    assert abs(float(aux["ratio_tok_sum"] / tok) - 1.0) < 1e-6
    np.testing.assert_allclose(float(aux["entropy_tok_sum"] / tok), full.metrics["entropy"], rtol=1e-4)
    np.testing.assert_allclose(float(aux["logp_diff_tok_sum"] / tok), full.metrics["logp_diff_mean"], atol=1e-6)
    # through core.train: step_metrics turns the sums into the rollout's metric names
    import optax

    from core import sharding as sh
    mesh = sh.make_mesh("data:1", devices=jax.devices()[:1])
    opt = optax.sgd(0.0)
    step = train_lib.make_train_step(cfg, opt, mesh, loss_fn=loss_fn, donate=False)
    _, m = step(train_lib.train_state_from_params(params, cfg, opt, mesh), sh.shard_batch(fast.batch, mesh))
    tm = rl_lib.step_metrics(jax.device_get(m))
    np.testing.assert_allclose(tm["entropy"], full.metrics["entropy"], rtol=1e-4)
    assert tm["logp_diff_mean"] < 1e-4


def test_reference_logp_only_with_kl_and_zero_kl_at_start(template, model):
    cfg, params = model
    draw, _ = _draw_from([_task(0, _has_e)])
    rcfg = RC
    grpo = rl_lib.get_preset("grpo")
    with pytest.raises(ValueError, match="reference"):
        rollout.collect(params, draw, jax.random.PRNGKey(0), model_cfg=cfg, template=template, rl_cfg=grpo,
                        rcfg=rcfg, scorer=rollout.make_scorer(cfg))
    roll = rollout.collect(params, draw, jax.random.PRNGKey(0), model_cfg=cfg, template=template, rl_cfg=grpo,
                           rcfg=rcfg, scorer=rollout.make_scorer(cfg), ref_params=params)
    np.testing.assert_array_equal(roll.batch["ref_logp"], roll.batch["old_logp"])
    assert roll.metrics["kl_ref"] == 0.0


def test_dynamic_sampling_drops_zero_variance_groups(template, model):
    cfg, params = model
    # tasks 0, 2, 4, ...: constant reward (zero variance); odd ones: reward = odd reply length
    tasks = [_task(i, _const(1.0) if i % 2 == 0 else _odd_length) for i in range(40)]
    draw, state = _draw_from(tasks)
    rcfg = dataclasses.replace(RC, max_rounds=6)
    roll = rollout.collect(params, draw, jax.random.PRNGKey(3), model_cfg=cfg, template=template,
                           rl_cfg=rl_lib.get_preset("dapo", overlong="none"), rcfg=rcfg, scorer=rollout.make_scorer(cfg))
    m = roll.metrics
    assert m["groups_kept"] == 2 and m["rounds"] >= 2 and state["i"] == m["prompts_drawn"] == 2 * m["rounds"], (m, state)
    assert 0.5 <= m["zero_var_frac"] < 1
    assert not np.asarray(rl_lib.zero_variance_groups(roll.rewards_ng)).any()
    # every group constant: bounded rounds, rows that count for nothing, zero advantages
    draw, state = _draw_from([_task(i, _const(0.0)) for i in range(8)])
    roll = rollout.collect(params, draw, jax.random.PRNGKey(3), model_cfg=cfg, template=template,
                           rl_cfg=rl_lib.get_preset("dapo", overlong="none"), rcfg=dataclasses.replace(rcfg, max_rounds=2),
                           scorer=rollout.make_scorer(cfg))
    assert roll.metrics["rounds"] == 2 and roll.metrics["groups_kept"] == 0 and state["i"] == 4
    assert roll.batch["mask"].sum() == 0 and not roll.batch["advantages"].any()
    assert roll.metrics["zero_var_frac"] == 1.0
    # without dynamic sampling the constant groups stay (advantage 0) and one round is drawn
    roll = rollout.collect(params, draw, jax.random.PRNGKey(3), model_cfg=cfg, template=template,
                           rl_cfg=rl_lib.get_preset("dr_grpo"), rcfg=rcfg, scorer=rollout.make_scorer(cfg))
    assert roll.metrics["rounds"] == 1 and roll.batch["mask"].sum() > 0 and not roll.batch["advantages"].any()


def test_overlong_soft_penalty_and_mask(template, model):
    cfg, params = model
    draw, _ = _draw_from([_task(0, _const(1.0))])
    rcfg = RC
    soft = rl_lib.get_preset("dr_grpo", overlong="soft", overlong_buffer=2, overlong_penalty=0.5)
    roll = rollout.collect(params, draw, jax.random.PRNGKey(0), model_cfg=cfg, template=template, rl_cfg=soft,
                           rcfg=rcfg, scorer=rollout.make_scorer(cfg))
    lengths = roll.batch["mask"].sum(1)  # no tools: mask = the completion's tokens
    assert roll.metrics["truncation_rate"] == np.mean(lengths == 6) > 0
    want = 1.0 + np.where(lengths <= 4, 0.0, -0.5 * (lengths - 4) / 2)
    np.testing.assert_allclose(roll.rewards_ng.reshape(-1), want, atol=1e-6)
    masked = rl_lib.get_preset("dr_grpo", overlong="mask")
    roll = rollout.collect(params, draw, jax.random.PRNGKey(0), model_cfg=cfg, template=template, rl_cfg=masked,
                           rcfg=rcfg, scorer=rollout.make_scorer(cfg))
    np.testing.assert_array_equal(roll.batch["mask"].sum(1) > 0, lengths < 6)


def test_clear_errors(template, model):
    cfg, params = model
    with pytest.raises(ValueError, match="G >= 2"):
        rollout.RolloutConfig(n_prompts=2, group_size=1, max_new_tokens=4, seq_len=40)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        rollout.check_group_batch(10, 4, "mini-batch")
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        rollout.minibatches({"tokens": np.zeros((8, 3))}, 4, 6, seed=0)
    no_eot = dataclasses.replace(template, stop_ids=())
    with pytest.raises(ValueError, match="no end-of-turn token"):
        rollout.check_template(no_eot)
    # a Jinja template that writes nothing after a reply: where would a reply end?
    jinja = chat_lib.JinjaTemplate(name="plain", tokenizer=template.tokenizer, stop_ids=(1,), bos_ids=(), eos_ids=(),
                                   tools=None, source="{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                   variables={}, end_of_turn=None)
    with pytest.raises(ValueError, match="no end-of-turn token"):
        rollout.check_template(jinja)

    def boom(text):
        raise KeyError("answer")

    draw, _ = _draw_from([_task(0, boom)])
    rcfg = RC
    with pytest.raises(ValueError, match=r"reward function of task 't0' raised KeyError"):
        rollout.collect(params, draw, jax.random.PRNGKey(0), model_cfg=cfg, template=template,
                        rl_cfg=rl_lib.get_preset("dr_grpo"), rcfg=rcfg, scorer=rollout.make_scorer(cfg))


def test_minibatches_keep_whole_groups():
    b = {"tokens": np.arange(12)[:, None] * np.ones((1, 3), int), "advantages": np.arange(12.0)}
    mbs = rollout.minibatches(b, 3, 6, seed=1)
    assert len(mbs) == 2
    rows = np.concatenate([m["advantages"] for m in mbs]).astype(int)
    assert sorted(rows.tolist()) == list(range(12))
    for m in mbs:
        groups = m["advantages"].astype(int).reshape(-1, 3) // 3
        assert (groups == groups[:, :1]).all()                     # each group stays together
    assert rollout.minibatches(b, 3, 12, seed=1)[0] is not b and len(rollout.minibatches(b, 3, 12, seed=1)) == 1


def test_policy_learns_through_rollouts(template, model):
    """A reward for replies that contain the letter 'e': rollouts + the policy loss in core.train's
    step raise the on-policy reward from its start within 15 steps."""
    cfg, params = model
    mesh = sharding.make_mesh("data:-1")
    rl_cfg = rl_lib.get_preset("dr_grpo")
    opt = optax.adam(3e-2)
    step = train_lib.make_train_step(cfg, opt, mesh, rl_lib.make_policy_loss_fn(rl_cfg))
    state = train_lib.train_state_from_params(jax.tree.map(lambda x: x.copy(), params), cfg, opt, mesh)
    draw, _ = _draw_from([_task(i, _has_e) for i in range(8)])
    rcfg = rollout.RolloutConfig(n_prompts=4, group_size=8, max_new_tokens=4, seq_len=40)
    scorer = rollout.make_scorer(cfg)
    rewards = []
    for s in range(15):
        roll = rollout.collect(state["params"], draw, jax.random.PRNGKey(s), model_cfg=cfg, template=template,
                               rl_cfg=rl_cfg, rcfg=rcfg, scorer=scorer)
        rewards.append(roll.metrics["reward_mean"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state, m = step(state, sharding.shard_batch(roll.batch, mesh))
        if s == 0:
            assert abs(float(jax.device_get(rl_lib.step_metrics(m)["ratio_mean"])) - 1.0) < 1e-5
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25 and np.mean(rewards[-3:]) > 0.8, rewards
