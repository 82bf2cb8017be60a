"""core/model.py: config errors, cached decode == full forward per family, packed documents are
isolated, masked targets do not matter, gradients match float64 finite differences, and the
model can memorise one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import loss as loss_lib
from core import model

# Each family preset shrunk to a few thousand params, keeping its switches (norm, mlp, pos,
# biases, tying, qk-norm, soft-cap, GQA ratio, rope scaling).
SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
FAMILIES = {
    "tiny": dict(SMALL),
    "gpt2-124m": dict(SMALL),
    "d20": dict(SMALL),
    "qwen2.5-0.5b": dict(SMALL, n_kv_heads=2),
    "llama-3.2-1b": dict(SMALL, n_kv_heads=2, head_dim=8, rope_scaling=(4.0, 1.0, 4.0, 8)),
}


def small_config(preset, **kw):
    return model.get_config(preset, **{**FAMILIES[preset], **kw})


# ----------------------------------------------------------------------------- errors


def test_head_count_must_divide_width():
    with pytest.raises(ValueError, match="n_heads=3 does not divide d_model=32"):
        model.get_config("tiny", d_model=32, n_heads=3)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="n_kv_heads=3 does not divide n_heads=4"):
        model.get_config("tiny", n_heads=4, n_kv_heads=3)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        model.get_config("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        model.get_config("tiny", d_modle=64)


def test_param_shapes_axes_and_init_agree():
    for preset in FAMILIES:
        cfg = small_config(preset)
        params = model.init_params(jax.random.key(0), cfg)
        shapes = model.param_shapes(cfg)
        axes = model.param_axes(cfg)
        assert jax.tree.structure(params) == jax.tree.structure(shapes)
        for p, s, a in zip(jax.tree.leaves(params), jax.tree.leaves(shapes),
                           jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
            assert p.shape == s.shape and len(a) == p.ndim
        assert model.count_params(params) == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


# ----------------------------------------------------------------------------- cache


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_cached_decode_matches_full_forward(preset):
    """Right-padded prefill of two prompts of different lengths, then token-by-token decode: every
    logit equals the full (uncached) forward at the same position."""
    cfg = small_config(preset, zero_init_out=False)
    params = model.init_params(jax.random.key(1), cfg)
    n, p_len, n_dec = 12, 6, 5
    seqs = jax.random.randint(jax.random.key(2), (2, n), 0, cfg.vocab_size)
    prompt_lens = jnp.array([p_len, p_len - 2], jnp.int32)
    rows = jnp.arange(2)

    @jax.jit
    def run(params, seqs):
        full, _ = model.forward(params, seqs, cfg)
        cache = model.init_cache(cfg, 2, 16)
        pre, cache = model.forward(params, seqs[:, :p_len], cfg, cache=cache)
        cache = dict(cache, lengths=prompt_lens)

        def dec(cache, i):
            tok = seqs[rows, prompt_lens + i][:, None]
            logits, cache = model.forward(params, tok, cfg, cache=cache)
            return cache, logits[:, 0]

        _, dec_logits = jax.lax.scan(dec, cache, jnp.arange(n_dec))
        return full, pre, dec_logits

    full, pre, dec_logits = run(params, seqs)
    last = prompt_lens - 1
    np.testing.assert_allclose(pre[rows, last], full[rows, last], atol=2e-5, rtol=1e-4)
    for i in range(n_dec):
        np.testing.assert_allclose(dec_logits[i], full[rows, prompt_lens + i], atol=2e-5, rtol=1e-4)
    assert float(jnp.abs(full).max()) > 1e-3  # the comparison is not between zeros


# ----------------------------------------------------------------------------- packing / masking


@pytest.fixture(scope="module")
def tiny():
    cfg = small_config("tiny", zero_init_out=False)
    return cfg, model.init_params(jax.random.key(3), cfg)


def test_packed_documents_do_not_see_each_other(tiny):
    """Two documents packed in one row with segment ids and restarted positions give the same
    logits as each document alone."""
    cfg, params = tiny
    a = jax.random.randint(jax.random.key(4), (1, 5), 0, cfg.vocab_size)
    b = jax.random.randint(jax.random.key(5), (1, 7), 0, cfg.vocab_size)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    fwd = jax.jit(lambda p, t, s, q: model.forward(p, t, cfg, segment_ids=s, positions=q)[0])
    out = fwd(params, packed, seg, pos)
    alone_a = model.forward(params, a, cfg)[0]
    alone_b = model.forward(params, b, cfg)[0]
    np.testing.assert_allclose(out[:, :5], alone_a, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out[:, 5:], alone_b, atol=2e-5, rtol=1e-4)


def test_masked_targets_do_not_change_loss(tiny):
    cfg, params = tiny
    tokens = jax.random.randint(jax.random.key(6), (2, 9), 0, cfg.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = jnp.array([[1, 1, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1]], bool)
    loss_at = jax.jit(lambda t: loss_lib.cross_entropy(model.forward(params, inputs, cfg)[0], t, mask)[0])
    base = loss_at(targets)
    scrambled = jnp.where(mask, targets, (targets + 17) % cfg.vocab_size)
    changed = jnp.where(mask, (targets + 17) % cfg.vocab_size, targets)
    assert float(loss_at(scrambled)) == pytest.approx(float(base), abs=1e-6)
    assert abs(float(loss_at(changed)) - float(base)) > 1e-3


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("preset", ["tiny", "gpt2-124m"])
def test_gradients_match_float64_finite_differences(preset):
    """Directional derivatives of the masked loss along random directions: autodiff vs central
    differences, all in float64 (x64 switched on only inside this test)."""
    with jax.enable_x64(True):
        cfg = model.get_config(preset, vocab_size=23, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                               max_seq_len=8, zero_init_out=False, compute_dtype="float64")
        params = jax.tree.map(lambda x: x.astype(jnp.float64) * 5.0,  # larger weights: a non-trivial loss surface
                              model.init_params(jax.random.key(7), cfg))
        params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(8), x.shape, x.dtype), params)
        tokens = jax.random.randint(jax.random.key(9), (2, 7), 0, cfg.vocab_size)
        seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
        mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)

        def f(p):
            logits, _ = model.forward(p, tokens[:, :-1], cfg, segment_ids=seg[:, :-1])
            assert logits.dtype == jnp.float64
            return loss_lib.cross_entropy(logits, tokens[:, 1:], mask, z_loss=1e-2)[0]

        f = jax.jit(f)
        grads = jax.jit(jax.grad(f))(params)
        leaves, treedef = jax.tree.flatten(params)
        eps = 1e-5
        for i in range(3):
            keys = jax.random.split(jax.random.key(100 + i), len(leaves))
            d = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
            plus = jax.tree.map(lambda x, y: x + eps * y, params, d)
            minus = jax.tree.map(lambda x, y: x - eps * y, params, d)
            fd = (f(plus) - f(minus)) / (2 * eps)
            ad = sum(jnp.vdot(g, y) for g, y in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
            assert abs(float(ad)) > 1e-3
            assert float(fd) == pytest.approx(float(ad), rel=1e-6, abs=1e-9)
    assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak out of the test


# ----------------------------------------------------------------------------- overfitting


def test_overfits_one_batch():
    cfg = small_config("tiny", vocab_size=64, max_seq_len=16)
    params = model.init_params(jax.random.key(10), cfg)
    tokens = jax.random.randint(jax.random.key(11), (4, 17), 0, cfg.vocab_size)
    opt = optax.adam(1e-2)

    def loss_fn(p):
        logits, _ = model.forward(p, tokens[:, :-1], cfg)
        return loss_lib.cross_entropy(logits, tokens[:, 1:])[0]

    @jax.jit
    def train(params):
        def step(carry, _):
            p, s = carry
            l, g = jax.value_and_grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), l

        (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=150)
        return losses, loss_fn(p)

    losses, final = train(params)
    assert float(losses[0]) == pytest.approx(np.log(cfg.vocab_size), rel=0.05)
    assert float(final) < 0.05, f"loss after 150 steps: {float(final)}"
