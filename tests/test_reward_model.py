"""core/reward_model.py: the InstructGPT ranking loss and its gradient against numpy (K = 4), the
scalar head on the last hidden state, and learning a separable toy ranking to 100% accuracy."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import model, train
from core import reward_model as rm
from core import sharding as sh


def np_sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def np_ranking(r_nk, valid=None):
    """Per prompt: mean over ranked pairs i < j (both valid) of -log sigmoid(r_i - r_j); its
    gradient wrt r; the pairwise accuracy. Written with loops."""
    n, k = r_nk.shape
    valid = np.ones((n, k), bool) if valid is None else valid
    losses, grad, accs = [], np.zeros_like(r_nk), []
    used = 0
    for a in range(n):
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if valid[a, i] and valid[a, j]]
        if not pairs:
            continue
        used += 1
        losses.append(sum(-math.log(np_sigmoid(r_nk[a, i] - r_nk[a, j])) for i, j in pairs) / len(pairs))
        accs.append(sum(r_nk[a, i] > r_nk[a, j] for i, j in pairs) / len(pairs))
        for i, j in pairs:
            g = -(1 - np_sigmoid(r_nk[a, i] - r_nk[a, j])) / len(pairs)   # d/d r_i of -log sigma(r_i - r_j)
            grad[a, i] += g
            grad[a, j] -= g
    return sum(losses) / used, grad / used, sum(accs) / used


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def test_ranking_pairs():
    w, l = rm.ranking_pairs(4)
    assert list(zip(w, l)) == list(itertools.combinations(range(4), 2)) and len(w) == 6
    with pytest.raises(ValueError, match="K >= 2"):
        rm.ranking_pairs(1)


def test_ranking_loss_and_gradient_vs_numpy_k4():
    r = np.random.default_rng(0).normal(0, 2, (5, 4))
    want_loss, want_grad, want_acc = np_ranking(r)
    loss, m = rm.ranking_loss(r)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(m["accuracy"], want_acc, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(lambda x: rm.ranking_loss(x)[0])(jnp.asarray(r)), want_grad, rtol=1e-10)
    # one hand value: K = 2, r = (1, 0): -log sigmoid(1)
    np.testing.assert_allclose(rm.ranking_loss(np.array([[1.0, 0.0]]))[0], math.log(1 + math.exp(-1)), rtol=1e-12)


def test_ranking_loss_with_padding_responses():
    r = np.random.default_rng(1).normal(0, 1, (4, 4))
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], bool)  # row 2 has no pair
    want_loss, want_grad, want_acc = np_ranking(r, valid)
    s, aux = rm.ranking_loss_sums(r, valid)
    assert float(aux["weight"]) == 3 and float(aux["pairs"]) == 6 + 1 + 3
    np.testing.assert_allclose(s / aux["weight"], want_loss, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(lambda x: rm.ranking_loss(x, valid)[0])(jnp.asarray(r)), want_grad, rtol=1e-10)
    np.testing.assert_allclose(aux["accuracy"] / aux["weight"], want_acc, rtol=1e-12)


def test_sums_combine_over_prompt_microbatches():
    r = np.random.default_rng(2).normal(0, 1, (6, 4))
    s1, a1 = rm.ranking_loss_sums(r[:2])
    s2, a2 = rm.ranking_loss_sums(r[2:])
    np.testing.assert_allclose((s1 + s2) / (a1["weight"] + a2["weight"]), rm.ranking_loss(r)[0], rtol=1e-12)


CFG = model.get_config("tiny", vocab_size=32, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16,
                       zero_init_out=False, remat=False)


def test_reward_model_forward_reads_the_final_token():
    params = model.init_params(jax.random.key(0), CFG)
    head = rm.init_head(jax.random.key(1), CFG.d_model)
    tokens = np.random.default_rng(3).integers(1, 32, (3, 10)).astype(np.int32)
    last = np.array([9, 4, 6])
    r = rm.reward_model_forward(params, head, tokens, CFG, last)
    x, _ = model.forward_hidden(params, tokens, CFG)
    want = [float(np.asarray(x)[b, last[b]] @ np.asarray(head["w"]) + float(head["b"])) for b in range(3)]
    np.testing.assert_allclose(r, want, rtol=1e-5)
    # padding after the final token does not change the reward (causal attention)
    padded = tokens.copy()
    padded[1, 5:] = 0
    np.testing.assert_allclose(rm.reward_model_forward(params, head, padded, CFG, last)[1], r[1], rtol=1e-5)
    # shift_head centres the rewards of a reference set
    shifted = rm.shift_head(head, jnp.mean(r))
    np.testing.assert_allclose(jnp.mean(rm.reward_model_forward(params, shifted, tokens, CFG, last)), 0.0, atol=1e-6)


def _toy_rankings(seed, n, k=4, t=8):
    """Separable toy preferences: a response's quality is decided by its final token (5 > 6 > 7 >
    8); contexts are random. Responses are listed best first."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(9, 32, (n, k, t)).astype(np.int32)
    lengths = rng.integers(4, t + 1, (n, k))
    for a in range(n):
        finals = np.sort(rng.choice([5, 6, 7, 8], size=k, replace=False))  # best (5) first
        for i in range(k):
            tokens[a, i, lengths[a, i] - 1] = finals[i]
            tokens[a, i, lengths[a, i]:] = 0
    return {"tokens": tokens, "last_index": (lengths - 1).astype(np.int32)}


def test_pairwise_accuracy_reaches_100_percent_with_the_shared_train_step():
    """Through core.train (ParamSpec {'model', 'head'}, the ranking LossFn, 2 microbatches on a
    2-device mesh): held-out pairwise accuracy goes from chance to 100% in a few steps."""
    with jax.enable_x64(False):
        spec = rm.reward_model_spec(CFG)
        mesh = sh.make_mesh("data:2", devices=jax.devices()[:2])
        opt = optax.adam(3e-3)
        params = {"model": model.init_params(jax.random.key(0), CFG), "head": rm.init_head(jax.random.key(1), CFG.d_model)}
        state = train.train_state_from_params(params, spec, opt, mesh)
        step = train.make_train_step(CFG, opt, mesh, loss_fn=rm.make_ranking_loss(), grad_accum=2, spec=spec)
        evaluate = jax.jit(lambda p, b: rm.ranking_loss(rm.reward_model_forward(
            p["model"], p["head"], b["tokens"].reshape(-1, 8), CFG, b["last_index"].reshape(-1)).reshape(-1, 4)))
        held = _toy_rankings(99, 64)
        acc0 = float(evaluate(state["params"], held)[1]["pair_accuracy"])
        losses = []
        for s in range(40):
            state, m = step(state, sh.shard_batch(_toy_rankings(s, 16), mesh))
            losses.append(float(m["loss"]))
        loss, met = evaluate(state["params"], held)
        assert acc0 < 0.9
        assert float(met["pair_accuracy"]) == 1.0, (acc0, losses[::5], float(met["pair_accuracy"]))
        assert losses[-1] < losses[0]
