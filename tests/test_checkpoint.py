"""core/checkpoint.py: round trips, re-sharding, killed saves, keep-last-K, config mismatches."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from core import checkpoint as ck

REPO = pathlib.Path(__file__).resolve().parents[1]


def _state(seed: int = 0):
    """A small train state: params, an optax state with namedtuples and a hyperparams dict, step."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"embed": {"tokens": jax.random.normal(k1, (16, 8))},
              "layers": {"w": jax.random.normal(k2, (2, 8, 8))}}
    opt = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)
    opt_state = opt.init(params)
    # One real update so that the moments are non-trivial.
    grads = jax.tree_util.tree_map(lambda p: p * 0.5 + 1.0, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32)}


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"model_config": {"d_model": 8, "n_layers": 2, "vocab_size": 16}, "seq_len": 32}


def test_round_trip_state_step_and_data_state(tmp_path):
    state = _state()
    data_state = {"epoch": 1, "position": 123, "nested": {"rng": [1, 2, 3]}}
    with ck.make_manager(tmp_path / "ck") as mngr:
        assert ck.save(mngr, 7, state, data_state=data_state, meta=META)
        mngr.wait_until_finished()
    with ck.make_manager(tmp_path / "ck", read_only=True) as mngr:
        assert ck.latest_step(mngr) == 7
        got, got_data, got_meta = ck.restore(mngr, ck.abstract_state(state), expected_meta=META)
    _assert_trees_equal(got, state)  # also checks that optax namedtuple types came back
    assert got_data == data_state
    assert got_meta == META
    assert int(got["step"]) == 7


def test_relative_directory(tmp_path, monkeypatch):
    """A relative run directory (the README's `runs/main`) saves and restores; orbax's writer
    itself refuses relative paths, and only in its async thread."""
    monkeypatch.chdir(tmp_path)
    state = _state()
    with ck.make_manager("runs/ck") as mngr:
        assert ck.save(mngr, 7, state, meta=META)
        mngr.wait_until_finished()
    assert (tmp_path / "runs" / "ck" / "7").is_dir()
    with ck.make_manager("runs/ck", read_only=True) as mngr:
        got, _, _ = ck.restore(mngr, ck.abstract_state(state), expected_meta=META)
    _assert_trees_equal(got, state)


def test_bytes_data_state_and_params_only_restore(tmp_path):
    state = _state(1)
    blob = b'{"grain": "DataLoader state as bytes"}\x00\xff'
    with ck.make_manager(tmp_path / "ck", async_save=False) as mngr:
        ck.save(mngr, 3, state, data_state=blob, meta=META)
        params_only, data, _ = ck.restore(mngr, {"params": ck.abstract_state(state["params"])},
                                          partial=True)
    assert data == blob
    assert set(params_only) == {"params"}
    _assert_trees_equal(params_only["params"], state["params"])


def test_restore_onto_a_different_mesh(tmp_path):
    devices = np.array(jax.devices())
    assert devices.size == 8, "conftest sets 8 fake devices"
    mesh_a = jax.sharding.Mesh(devices.reshape(8), ("x",))
    mesh_b = jax.sharding.Mesh(devices.reshape(2, 4), ("data", "model"))
    state = _state(2)

    def shard_a(x):
        spec = P("x") if x.ndim >= 1 and x.shape[0] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh_a, spec))

    sharded = jax.tree_util.tree_map(shard_a, state)
    with ck.make_manager(tmp_path / "ck") as mngr:
        ck.save(mngr, 1, sharded, meta=META)
        mngr.wait_until_finished()

        def spec_b(x):
            if x.ndim >= 2 and x.shape[-1] % 4 == 0 and x.shape[-2] % 2 == 0:
                return NamedSharding(mesh_b, P(*([None] * (x.ndim - 2)), "data", "model"))
            return NamedSharding(mesh_b, P())

        target = ck.abstract_state(state, jax.tree_util.tree_map(spec_b, state))
        got, _, _ = ck.restore(mngr, target)
    _assert_trees_equal(got, state)
    w = got["params"]["layers"]["w"]
    assert w.sharding.mesh.shape == {"data": 2, "model": 4}
    assert w.sharding.spec == P(None, "data", "model")
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, 4, 2)


def test_keep_last_k(tmp_path):
    state = _state()
    with ck.make_manager(tmp_path / "ck", max_to_keep=2) as mngr:
        for step in range(1, 6):
            ck.save(mngr, step, jax.tree_util.tree_map(lambda x: x + step, state), meta=META)
        mngr.wait_until_finished()
    with ck.make_manager(tmp_path / "ck") as mngr:
        assert list(mngr.all_steps()) == [4, 5]
        got, _, _ = ck.restore(mngr, ck.abstract_state(state))
    np.testing.assert_array_equal(got["params"]["layers"]["w"], state["params"]["layers"]["w"] + 5)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name[0].isdigit()) == ["4", "5"]


def test_save_interval_skips_and_force_saves(tmp_path):
    state = _state()
    with ck.make_manager(tmp_path / "ck", save_interval_steps=3, async_save=False) as mngr:
        saved = [ck.save(mngr, s, state) for s in range(1, 8)]
        assert ck.save(mngr, 8, state, force=True)
        assert saved == [False, False, True, False, False, True, False]
        assert list(mngr.all_steps()) == [3, 6, 8]


def test_handcrafted_partial_checkpoint_is_ignored(tmp_path):
    """A step directory still under its temporary name (the rename never happened) is not a step."""
    state = _state()
    with ck.make_manager(tmp_path / "ck", async_save=False) as mngr:
        ck.save(mngr, 2, state, data_state={"pos": 2}, meta=META)
    partial = tmp_path / "ck" / "9.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "ck" / "2", partial)
    shutil.rmtree(partial / "state")
    with ck.make_manager(tmp_path / "ck", read_only=True) as mngr:
        assert ck.latest_step(mngr) == 2
        got, data, _ = ck.restore(mngr, ck.abstract_state(state))
    assert data == {"pos": 2}
    _assert_trees_equal(got, state)
    with ck.make_manager(tmp_path / "ck", async_save=False) as mngr:  # a writer cleans leftovers up
        ck.save(mngr, 3, state)
        assert list(mngr.all_steps()) == [2, 3]
    assert not partial.exists()


_KILLED_SAVER = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from core import checkpoint as ck
    mngr = ck.make_manager(sys.argv[1], async_save=True)
    small = {"w": jnp.full((4,), 1.0)}
    ck.save(mngr, 1, small, data_state={"pos": 1}); mngr.wait_until_finished()
    big = {"w": jnp.full((4096, 4096), 2.0)}  # 64 MiB: still being written when we die
    ck.save(mngr, 2, big, data_state={"pos": 2})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_process_killed_during_async_save_resumes_from_last_complete(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVER, str(tmp_path / "ck")], env=env,
                          cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in (tmp_path / "ck").iterdir() if "tmp" in p.name]
    assert leftovers, "the kill landed after the save finished; the test did not exercise a partial save"
    with ck.make_manager(tmp_path / "ck", read_only=True) as mngr:
        assert ck.latest_step(mngr) == 1
        got, data, _ = ck.restore(mngr, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(got["w"], np.ones(4))
    assert data == {"pos": 1}


def test_mismatched_config_fails_clearly(tmp_path):
    state = _state()
    with ck.make_manager(tmp_path / "ck", async_save=False) as mngr:
        ck.save(mngr, 1, state, meta=META)
        other = {**META, "model_config": {**META["model_config"], "d_model": 16}}
        with pytest.raises(ck.CheckpointMismatchError, match=r"d_model: checkpoint has 8, this run has 16"):
            ck.restore(mngr, ck.abstract_state(state), expected_meta=other)
        # Even without meta, differently shaped arrays are named instead of silently loaded.
        wider = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[:-1] + (x.shape[-1] * 2,), x.dtype)
                                       if x.ndim else x, state)
        with pytest.raises(ck.CheckpointMismatchError, match=r"params/layers/w: checkpoint shape \(2, 8, 8\)"):
            ck.restore(mngr, ck.abstract_state(wider))


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.make_manager(tmp_path / "nope", read_only=True)
    with ck.make_manager(tmp_path / "empty") as mngr:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ck.restore(mngr, {})
    with pytest.raises(ValueError, match="max_to_keep"):
        ck.make_manager(tmp_path / "x", max_to_keep=0)


def test_check_meta_compares_only_expected_keys():
    saved = {"model_config": {"d_model": 8, "rope_scaling": [1.0, 2.0]}, "batch_size": 4}
    ck.check_meta(saved, {"model_config": {"rope_scaling": (1.0, 2.0)}})  # tuple == JSON list
    with pytest.raises(ck.CheckpointMismatchError, match="batch_size: checkpoint has 4, this run has 8"):
        ck.check_meta(saved, {"batch_size": 8})
    with pytest.raises(ck.CheckpointMismatchError, match="seq_len: checkpoint has '<missing>'"):
        ck.check_meta(saved, {"seq_len": 32})


# ----------------------------------------------------------------------------- damaged steps


def _two_steps(tmp_path):
    old, new = _state(0), _state(1)
    with ck.make_manager(tmp_path / "ck", async_save=False) as mngr:
        ck.save(mngr, 1, old, data_state={"pos": 1}, meta=META)
        ck.save(mngr, 2, new, data_state={"pos": 2}, meta=META)
    return old, tmp_path / "ck"


@pytest.mark.parametrize("damage", ["no state", "no meta", "no step metadata", "empty dir"])
def test_incomplete_newest_step_falls_back_to_older(tmp_path, damage):
    old, d = _two_steps(tmp_path)
    if damage == "no state":
        shutil.rmtree(d / "2" / "state")
    elif damage == "no meta":
        shutil.rmtree(d / "2" / "meta")
    elif damage == "no step metadata":
        (d / "2" / "_CHECKPOINT_METADATA").unlink()
    else:
        shutil.rmtree(d / "2")
        (d / "2").mkdir()
    with ck.make_manager(d, read_only=True) as mngr:
        assert ck.latest_step(mngr) == 1
        assert ck.read_meta(mngr) == META
        got, data, meta = ck.restore(mngr, ck.abstract_state(old), expected_meta=META)
        with pytest.raises(ValueError, match=f"incomplete checkpoint {d}/2: lacks"):
            ck.restore(mngr, ck.abstract_state(old), step=2)
    _assert_trees_equal(got, old)
    assert data == {"pos": 1} and meta == META


@pytest.mark.parametrize("damage", ["arrays", "meta"])
def test_corrupt_newest_step_names_its_path_and_falls_back(tmp_path, damage):
    old, d = _two_steps(tmp_path)
    if damage == "arrays":
        garbled = 0
        for f in (d / "2" / "state").rglob("*"):  # every data file garbled, the layout intact
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(b"\0garbage" * 10)
                garbled += 1
        assert garbled
    else:
        (d / "2" / "meta" / "metadata").write_text("{not json")
    with ck.make_manager(d, read_only=True) as mngr:
        with pytest.raises(ValueError, match=f"corrupt checkpoint {d}/2"):
            ck.restore(mngr, ck.abstract_state(old), step=2)
        got, data, _ = ck.restore(mngr, ck.abstract_state(old))
    _assert_trees_equal(got, old)
    assert data == {"pos": 1}


def test_every_step_corrupt_is_a_value_error_naming_them(tmp_path):
    old, d = _two_steps(tmp_path)
    for step in ("1", "2"):
        (d / step / "meta" / "metadata").write_text("[")
    with ck.make_manager(d, read_only=True) as mngr:
        with pytest.raises(ValueError, match=f"no readable checkpoint in {d}") as info:
            ck.restore(mngr, ck.abstract_state(old))
    assert f"{d}/1" in str(info.value) and f"{d}/2" in str(info.value)
