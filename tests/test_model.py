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


def random_params(cfg, seed, std=0.1, dtype=np.float32):
    """Params drawn with numpy (no PRNG compiles): norm scales near 1, everything else, biases
    included, random, so that every term of the forward pass matters."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        ones = path[-1].key in ("scale", "q_norm", "k_norm")
        return (float(ones) + std * rng.standard_normal(x.shape)).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg))


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
        params = jax.eval_shape(lambda k: model.init_params(k, cfg), jax.random.key(0))
        shapes = model.param_shapes(cfg)
        axes = model.param_axes(cfg)
        assert jax.tree.structure(params) == jax.tree.structure(shapes)
        for p, s, a in zip(jax.tree.leaves(params), jax.tree.leaves(shapes),
                           jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
            assert p.shape == s.shape and len(a) == len(p.shape)
        assert model.count_params(params) == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


# ----------------------------------------------------------------------------- cache


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_cached_decode_matches_full_forward(preset):
    """Right-padded prefill of two prompts of different lengths, then token-by-token decode: every
    logit equals the full (uncached) forward at the same position."""
    cfg = small_config(preset)
    params = random_params(cfg, 1)
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
    cfg = small_config("tiny")
    return cfg, random_params(cfg, 3)


def test_packed_documents_do_not_see_each_other(tiny):
    """Two documents packed in one row with segment ids and restarted positions give the same
    logits as each document alone (rows 1 and 2: each document followed by junk that, being
    later in time, cannot affect it)."""
    cfg, params = tiny
    a = jax.random.randint(jax.random.key(4), (5,), 0, cfg.vocab_size)
    b = jax.random.randint(jax.random.key(5), (7,), 0, cfg.vocab_size)
    junk = jax.random.randint(jax.random.key(12), (12,), 0, cfg.vocab_size)
    tokens = jnp.stack([jnp.concatenate([a, b]), jnp.concatenate([a, junk[:7]]), jnp.concatenate([b, junk[:5]])])
    seg = jnp.array([[1] * 5 + [2] * 7, [1] * 12, [1] * 12])
    pos = jnp.array([list(range(5)) + list(range(7)), list(range(12)), list(range(12))])
    out = jax.jit(lambda p: model.forward(p, tokens, cfg, segment_ids=seg, positions=pos)[0])(params)
    np.testing.assert_allclose(out[0, :5], out[1, :5], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out[0, 5:], out[2, :7], atol=2e-5, rtol=1e-4)
    # Without segment ids the second document does see the first.
    leak = jax.jit(lambda p: model.forward(p, tokens[:1], cfg, positions=pos[:1])[0])(params)
    assert float(jnp.abs(leak[0, 5:] - out[2, :7]).max()) > 1e-3


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
    """Directional derivatives of the masked loss (with z-loss) along random directions: reverse-
    mode autodiff vs central differences, all in float64 (x64 switched on only inside this test)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        cfg = model.get_config(preset, vocab_size=23, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                               max_seq_len=8, zero_init_out=False, compute_dtype="float64")
        # Bumpier weights than init (std 0.02) so that every block contributes; numpy keeps the
        # perturbations free of compiles.
        params = random_params(cfg, 1, std=0.2, dtype=np.float64)
        tokens = rng.integers(0, cfg.vocab_size, (2, 7))
        seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0]])
        mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)

        @jax.jit
        def f(p):
            logits, _ = model.forward(p, tokens[:, :-1], cfg, segment_ids=seg[:, :-1])
            assert logits.dtype == jnp.float64
            return loss_lib.cross_entropy(logits, tokens[:, 1:], mask, z_loss=1e-2)[0]

        grads = jax.jit(jax.grad(f))(params)
        eps = 1e-6  # central-difference error is O(eps^2) in float64
        for _ in range(3):
            d = jax.tree.map(lambda x: rng.standard_normal(x.shape), params)
            ad = sum(float(np.vdot(g, y)) for g, y in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
            plus = f(jax.tree.map(lambda x, y: x + eps * y, params, d))
            minus = f(jax.tree.map(lambda x, y: x - eps * y, params, d))
            fd = float(plus - minus) / (2 * eps)
            assert abs(ad) > 1e-2
            assert fd == pytest.approx(ad, rel=1e-7, abs=1e-9)
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


def test_remat_policies_give_the_same_gradients():
    """Rematerialisation changes what is stored for the backward, never the gradients."""
    cfg0 = small_config("tiny", remat=False)
    params = random_params(cfg0, 6)
    tokens = jax.random.randint(jax.random.key(7), (2, 9), 0, cfg0.vocab_size)

    def grads(remat):
        cfg = small_config("tiny", remat=remat)
        f = lambda p: loss_lib.cross_entropy(model.forward(p, tokens[:, :-1], cfg)[0], tokens[:, 1:])[0]  # noqa: E731
        return jax.jit(jax.grad(f))(params)

    ref = grads(False)
    for remat in ("dots", True):
        for a, b in zip(jax.tree.leaves(grads(remat)), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        small_config("tiny", remat="sometimes")


def test_unrolled_layers_match_the_layer_scan(monkeypatch):
    """On CPU, models up to model._CPU_UNROLL_MAX_LAYERS deep run their layers unrolled, deeper
    ones through lax.scan: both paths give the same logits and gradients."""
    cfg = small_config("tiny", remat="dots")
    params = random_params(cfg, 8)
    tokens = jax.random.randint(jax.random.key(9), (2, 9), 0, cfg.vocab_size)

    def run():
        f = lambda p: loss_lib.cross_entropy(model.forward(p, tokens[:, :-1], cfg)[0], tokens[:, 1:])[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    assert model._unroll_layers(cfg, params["layers"])
    unrolled = run()
    monkeypatch.setattr(model, "_CPU_UNROLL_MAX_LAYERS", 0)
    assert not model._unroll_layers(cfg, params["layers"])
    scanned = run()
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
