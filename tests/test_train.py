"""core/loss.py, core/optim.py, core/train.py: hand-computed losses, masking convention, AdamW
details, and the train step on 8 devices (4 meshes) == on 1 device."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import loss as loss_lib
from core import model, optim, train
from core import sharding as sh

# ----------------------------------------------------------------------------- loss


def _np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_cross_entropy_matches_hand_computed_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
    targets = rng.integers(0, 5, (2, 3))
    mask = np.array([[1, 0, 1], [1, 1, 0]], bool)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    want_ce = nll[mask].mean()
    want_z = (lse[mask] ** 2).mean()
    got, aux = loss_lib.cross_entropy(logits, targets, mask, z_loss=1e-3)
    assert float(got) == pytest.approx(want_ce + 1e-3 * want_z, rel=1e-6)
    assert float(aux["nll"]) == pytest.approx(want_ce, rel=1e-6)
    assert float(aux["tokens"]) == 4
    # One token by hand: -log softmax(logits)[target].
    assert float(loss_lib.token_nll(logits, targets)[0][0, 0]) == pytest.approx(
        -_np_log_softmax(logits[0, 0].astype(np.float64))[targets[0, 0]], rel=1e-6)
    # No mask = plain mean; an all-masked batch is 0, not NaN.
    assert float(loss_lib.cross_entropy(logits, targets)[0]) == pytest.approx(nll.mean(), rel=1e-6)
    assert float(loss_lib.cross_entropy(logits, targets, np.zeros_like(mask))[0]) == 0.0


def test_bits_per_byte():
    # Uniform over 4 tokens: ln 4 nats per token; 2 tokens of 2 bytes each -> 2*ln4 / (ln2 * 4) = 1 bit/byte.
    logits = np.zeros((1, 3, 4), np.float32)
    targets = np.array([[1, 2, 0]])
    token_bytes = np.array([0, 2, 2, 1])  # id 0 is special: 0 bytes, not scored
    nats, n_bytes = loss_lib.bits_per_byte_sums(logits, targets, token_bytes)
    assert float(n_bytes) == 4
    assert float(loss_lib.bits_per_byte(nats, n_bytes)) == pytest.approx(1.0, rel=1e-6)
    assert loss_lib.bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive byte count"):
        loss_lib.bits_per_byte(1.0, 0)


# ----------------------------------------------------------------------------- masking


def test_split_batch_masking_convention():
    # Row 0: doc 1 "a b <eot>", doc 2 "c d", then padding. Row 1: BOS-style "<eot> x y" docs.
    tokens = np.array([[10, 11, 0, 12, 13, 0, 0], [0, 20, 21, 0, 22, 23, 24]], np.int32)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 2, 2, 2, 2]], np.int32)
    x = train.split_batch({"tokens": tokens, "segment_ids": seg})
    np.testing.assert_array_equal(x["inputs"], tokens[:, :-1])
    np.testing.assert_array_equal(x["targets"], tokens[:, 1:])
    np.testing.assert_array_equal(x["segment_ids"], seg[:, :-1])
    want = np.array([
        [1, 1, 0, 1, 0, 0],  # predicts b and the closing <eot>; not c (next doc), not padding
        [1, 1, 0, 1, 1, 1],  # never predicts the BOS <eot> of doc 2 from doc 1
    ], bool)
    np.testing.assert_array_equal(x["mask"], want)
    # An explicit target mask (SFT) is ANDed with the segment mask.
    sft = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    y = train.split_batch({"tokens": tokens, "segment_ids": seg, "mask": sft})
    np.testing.assert_array_equal(y["mask"], want & sft)
    # No segment ids: everything counts.
    assert bool(train.split_batch({"tokens": tokens})["mask"].all())
    with pytest.raises(ValueError, match=r"batch\['mask'\] has shape \(2, 7\), expected \(2, 6\)"):
        train.split_batch({"tokens": tokens, "mask": np.ones((2, 7), bool)})
    with pytest.raises(ValueError, match="needs a 'tokens'"):
        train.split_batch({"inputs": tokens})


# ----------------------------------------------------------------------------- optimizer


def test_schedules():
    cos = optim.make_schedule(optim.OptimConfig(lr=1.0, warmup_steps=4, total_steps=14, final_lr_frac=0.1))
    np.testing.assert_allclose([float(cos(s)) for s in (0, 1, 3)], [0.25, 0.5, 1.0], rtol=1e-6)
    assert float(cos(4)) == pytest.approx(1.0)
    assert float(cos(9)) == pytest.approx(0.55, rel=1e-5)  # halfway down the cosine
    assert float(cos(14)) == pytest.approx(0.1, rel=1e-5) and float(cos(100)) == pytest.approx(0.1, rel=1e-5)
    lin = optim.make_schedule(optim.OptimConfig(lr=2.0, warmup_steps=0, total_steps=10, schedule="linear",
                                                warmdown_frac=0.4, final_lr_frac=0.0))
    np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 6, 8, 10)], [2, 2, 2, 1, 0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        optim.OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="warmup_steps=20"):
        optim.OptimConfig(warmup_steps=20, total_steps=10)


def test_weight_decay_mask_from_param_names():
    cfg = model.get_config("gpt2-124m", vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    mask = optim.decay_mask(model.param_shapes(cfg), optim.OptimConfig())
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == ["['layers']['attn']['wk']", "['layers']['attn']['wo']", "['layers']['attn']['wq']",
                       "['layers']['attn']['wv']", "['layers']['mlp']['w_in']", "['layers']['mlp']['w_out']"]
    everything = optim.OptimConfig(decay_embeddings=True, decay_norms=True, decay_biases=True)
    assert all(jax.tree.leaves(optim.decay_mask(model.param_shapes(cfg), everything)))
    # The smeared-key gate logits never decay (decay would pull every gate towards one half).
    tiny = model.get_config("tiny", vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    assert tiny.smear_keys
    assert not optim.decay_mask(model.param_shapes(tiny), everything)["layers"]["attn"]["smear"]


def test_adamw_clipping_decay_and_lr_by_hand():
    params = {"w": jnp.array([1.0, -2.0]), "embed": {"tokens": jnp.array([3.0])}, "n": {"scale": jnp.array([4.0])}}
    cfg = optim.OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, schedule="constant", b1=0.0, b2=0.0,
                            eps=1.0, weight_decay=0.5, clip_norm=1.0)
    opt = optim.make_optimizer(cfg, params)
    state = opt.init(params)
    # Global norm of the grads is 50 -> clipped to 1: w grads become (0.6, 0.8), the others 0.
    grads = {"w": jnp.array([30.0, 40.0]), "embed": {"tokens": jnp.array([0.0])}, "n": {"scale": jnp.array([0.0])}}
    upd, state = opt.update(grads, state, params)
    # b1 = b2 = 0, eps = 1: adam direction g / (|g| + 1); decay 0.5 * w on matrices only; times -lr.
    np.testing.assert_allclose(upd["w"], [-0.1 * (0.6 / 1.6 + 0.5), -0.1 * (0.8 / 1.8 - 1.0)], rtol=1e-6)
    np.testing.assert_allclose(upd["embed"]["tokens"], [0.0])
    np.testing.assert_allclose(upd["n"]["scale"], [0.0])
    assert float(optim.current_lr(state)) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- train step

CFG = model.get_config("tiny", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                       max_seq_len=16, zero_init_out=False)
# eps well above float noise in the tiniest gradients, so Adam's g / (|g| + eps) does not amplify
# reduction-order differences between meshes into O(lr) parameter differences.
OPT = optim.make_optimizer(optim.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10, eps=1e-4))
B, T = 16, 16


def _batch(seed):
    rng = np.random.default_rng(seed)
    seg = np.sort(rng.integers(0, 4, (B, T + 1)), axis=1)[:, ::-1].astype(np.int32)  # docs, then padding
    pos = np.zeros_like(seg)
    for r in range(B):
        for s in np.unique(seg[r]):
            idx = np.flatnonzero(seg[r] == s)
            pos[r, idx] = np.arange(len(idx))
    tokens = rng.integers(1, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


@pytest.fixture(scope="module")
def reference():
    """Initial state (on 1 device, as numpy) and two train steps on a 1-device mesh."""
    mesh1 = sh.make_mesh("data:1", devices=jax.devices()[:1])
    state = train.init_train_state(jax.random.key(0), CFG, OPT, mesh1)
    init = jax.device_get(state)
    step = train.make_train_step(CFG, OPT, mesh1)
    metrics = []
    for seed in (1, 2):
        state, m = step(state, sh.shard_batch(_batch(seed), mesh1))
        metrics.append(jax.device_get(m))
    return init, metrics, jax.device_get(state), (step, mesh1)


def _assert_trees_close(a, b, atol, rtol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def test_reference_run_is_sane(reference):
    init, metrics, final, _ = reference
    m = metrics[0]
    assert float(m["loss"]) == pytest.approx(math.log(CFG.vocab_size), rel=0.05)
    assert float(m["lr"]) == pytest.approx(1e-2) and float(metrics[1]["lr"]) == pytest.approx(1e-2)
    # Segment-masked token count: same-segment, non-padding targets.
    seg = _batch(1)["segment_ids"]
    assert float(m["tokens"]) == float(((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).sum())
    assert float(m["grad_norm"]) > 0 and int(final["step"]) == 2
    assert not np.allclose(init["params"]["lm_head"], final["params"]["lm_head"])


@pytest.mark.parametrize("spec,grad_accum", [
    ("data:8", 1), ("fsdp:8", 2), ("data:2,fsdp:2,tensor:2", 1), ("fsdp:2,tensor:4", 2)])
def test_eight_devices_match_one(reference, spec, grad_accum):
    """Same losses, gradient norms and updated params (and Adam moments) as the 1-device run,
    with the state placed by the mesh's shardings and optionally 2 microbatches per step."""
    init, ref_metrics, ref_final, _ = reference
    mesh = sh.make_mesh(spec)
    shardings = train.state_shardings(CFG, OPT, mesh)
    state = jax.device_put(init, shardings)
    step = train.make_train_step(CFG, OPT, mesh, grad_accum=grad_accum)
    for seed, ref in zip((1, 2), ref_metrics):
        state, m = step(state, sh.shard_batch(_batch(seed), mesh))
        for k in ("loss", "grad_norm", "tokens", "lr"):
            assert float(m[k]) == pytest.approx(float(ref[k]), rel=2e-6), k
    wq = state["params"]["layers"]["attn"]["wq"]
    assert wq.sharding.spec == shardings["params"]["layers"]["attn"]["wq"].spec
    if "fsdp" in spec or "tensor" in spec:
        assert wq.addressable_shards[0].data.size < wq.size  # really sharded, not replicated
    _assert_trees_close(jax.device_get(state), ref_final, atol=2e-6)


def test_init_train_state_is_sharded_and_mesh_independent(reference):
    init = reference[0]
    mesh = sh.make_mesh("fsdp:2,tensor:4")
    state = train.init_train_state(jax.random.key(0), CFG, OPT, mesh)
    assert state["params"]["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert state["params"]["lm_head"].addressable_shards[0].data.shape == (16, 32)
    mu = state["opt_state"].inner_state[1].mu["lm_head"]
    assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    _assert_trees_close(jax.device_get(state), init, atol=0, rtol=0)


def test_train_step_errors():
    mesh = sh.make_mesh("data:8")
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        train.make_train_step(CFG, OPT, mesh, grad_accum=0)
    abstract_state = jax.eval_shape(lambda: train.init_train_state(jax.random.key(0), CFG, OPT, mesh))
    bad = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch(0).items()}
    step = train.make_train_step(CFG, OPT, mesh, grad_accum=4)  # 16 rows / 4 = 4, not a multiple of 8
    with pytest.raises(ValueError, match=r"multiple of grad_accum \(4\) x data\*fsdp \(8\)"):
        step.lower(abstract_state, bad)
    with pytest.raises(ValueError, match="uses 3 devices but 8 are available"):
        sh.make_mesh("data:3")


def test_custom_loss_fn_plugs_in():
    """A loss_fn with its own batch keys and weight (as SFT/RL will use) drives the same step."""
    mesh = sh.make_mesh("data:1", devices=jax.devices()[:1])
    opt = optax.sgd(1.0)

    def loss_fn(params, batch, cfg):
        # Pull the lm_head towards batch['target'] (a [B, D, V] slab averaged over rows).
        err = params["lm_head"][None] - batch["target"]
        return jnp.sum(err ** 2), {"weight": jnp.asarray(batch["target"].shape[0], jnp.float32)}

    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), model.param_shapes(CFG))
    state = train.train_state_from_params(params, CFG, opt, mesh)
    before = np.asarray(state["params"]["lm_head"])
    target = np.ones((2, CFG.d_model, CFG.vocab_size), np.float32)
    step = train.make_train_step(CFG, opt, mesh, loss_fn=loss_fn, grad_accum=2)
    state, m = step(state, {"target": target})
    # loss = sum over 2 rows / 2 rows; grad = 2 (w - 1); SGD lr 1 -> w - 2 (w - 1).
    assert float(m["loss"]) == pytest.approx(float(((before - 1) ** 2).sum()), rel=1e-5)
    np.testing.assert_allclose(state["params"]["lm_head"], before - 2 * (before - 1), rtol=1e-5, atol=1e-6)
    assert np.isnan(float(m["lr"]))  # plain optax optimizer: no recorded learning rate


def test_two_steps_match_pytorch_adamw(reference):
    """Model, masked loss, clipping, decay groups and AdamW against an independent PyTorch
    implementation (the one experiments/bench_train.py times), from the same weights."""
    torch = pytest.importorskip("torch")
    from experiments.bench_train import torch_model_and_opt

    init, _, _, (step, mesh1) = reference
    net, opt = torch_model_and_opt(CFG, torch, T, init["params"], lr=1e-2, eps=1e-4, weight_decay=0.1)
    state = jax.device_put(init, train.state_shardings(CFG, OPT, mesh1))
    rng = np.random.default_rng(5)
    for _ in range(2):
        tokens = rng.integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
        batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),  # one document per row
                 "positions": np.tile(np.arange(T + 1, dtype=np.int32), (B, 1))}
        state, m = step(state, sh.shard_batch(batch, mesh1))
        loss = net(torch.from_numpy(tokens).long())
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        assert float(m["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
        assert float(m["grad_norm"]) == pytest.approx(float(grad_norm), rel=1e-4)
    p = jax.device_get(state["params"])
    blk = net.blocks[1]
    pairs = [(p["lm_head"], net.head.weight.detach().numpy().T),
             (p["embed"]["tokens"], net.embed.weight.detach().numpy()),
             (p["layers"]["mlp"]["w_in"][1], blk.w_in.weight.detach().numpy().T),
             (p["layers"]["attn"]["wq"][1].reshape(CFG.d_model, -1), blk.wq.weight.detach().numpy().T),
             (p["layers"]["attn"]["k_norm"][1], blk.kn.detach().numpy()),
             (p["final_norm"]["scale"], net.nf.detach().numpy())]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=2e-6)
    assert not np.allclose(p["lm_head"], init["params"]["lm_head"])


def test_cpu_train_step_remats_without_changing_values():
    """On a CPU mesh a model without remat trains with remat='dots' (core.train.training_remat):
    loss and gradients equal the saved-residuals forward's; other settings are kept."""
    mesh1 = sh.make_mesh("data:1", devices=jax.devices()[:1])
    plain = model.ModelConfig(**{**CFG.__dict__, "remat": False})
    assert train.training_remat(plain, mesh1).remat == "dots"
    for kept in ("full", "dots", True):
        assert train.training_remat(model.ModelConfig(**{**CFG.__dict__, "remat": kept}), mesh1).remat == kept
    params = model.init_params(jax.random.key(3), plain)
    batch = {k: jnp.asarray(v) for k, v in _batch(5).items()}
    lm_loss = train.make_lm_loss()

    def grads(cfg):
        return jax.jit(jax.value_and_grad(lambda p: lm_loss(p, batch, cfg)[0]))(params)

    (l0, g0), (l1, g1) = grads(plain), grads(train.training_remat(plain, mesh1))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    _assert_trees_close(g1, g0, atol=1e-6, rtol=1e-4)
