"""core/sharding.py: mesh specs, the rules table and its divisibility fallback, batch sharding."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from core import model
from core import sharding as sh


def test_mesh_from_spec_fills_missing_axes_and_wildcard():
    assert jax.device_count() == 8
    m = sh.make_mesh("data:2,fsdp:2,tensor:2")
    assert m.axis_names == ("data", "fsdp", "tensor") and dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    m = sh.make_mesh("tensor:2,data:-1")
    assert dict(m.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    m = sh.make_mesh("data:1", devices=jax.devices()[5:6])
    assert m.devices.ravel().tolist() == [jax.devices()[5]]
    assert sh.parse_mesh_spec(" fsdp : -1 ", 8) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("spec,msg", [
    ("data:3", "uses 3 devices but 8 are available"),
    ("data:2,fsdp:2", "uses 4 devices but 8"),
    ("data:3,fsdp:-1", "does not divide the 8 devices"),
    ("data:-1,tensor:-1", "only one axis may be -1"),
    ("data", "malformed entry 'data'"),
    ("data:2;fsdp:4", "malformed entry"),
    ("pipeline:8", "unknown axis 'pipeline'"),
    ("data:2,data:4", "repeated"),
    ("data:0,fsdp:8", "size 0"),
    ("", "empty mesh spec"),
])
def test_bad_mesh_specs_raise(spec, msg):
    with pytest.raises(ValueError, match=msg):
        sh.make_mesh(spec)


def test_rules_and_divisibility_fallback():
    mesh = sh.make_mesh("fsdp:2,tensor:4")
    # Divisible dims follow the table; size-1 mesh axes (data) never appear.
    wq_axes = ("layers", "embed", "heads", "head_dim")
    assert sh.logical_to_spec(wq_axes, (2, 64, 8, 8), mesh) == P(None, "fsdp", "tensor")
    assert sh.logical_to_spec(("vocab", "embed"), (100, 64), mesh) == P("tensor", "fsdp")
    # 2 kv heads cannot split 4 ways -> replicated; 3 (odd) embed cannot split 2 ways either.
    assert sh.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 8), mesh) == P(None, "fsdp")
    assert sh.logical_to_spec(("embed", "mlp"), (3, 12), mesh) == P(None, "tensor")
    # A mesh axis is used at most once per array.
    assert sh.logical_to_spec(("mlp", "heads"), (8, 8), mesh) == P("tensor")
    # The batch rule is a pair of axes; a batch that only data divides keeps just data.
    mesh3 = sh.make_mesh("data:2,fsdp:2,tensor:2")
    assert sh.logical_to_spec(("batch", None), (8, 5), mesh3) == P(("data", "fsdp"))
    assert sh.logical_to_spec(("batch", None), (6, 5), mesh3) == P("data")
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'pipeline'"):
        sh.logical_to_spec(("pipeline",), (4,), mesh)


def test_model_shardings_cover_every_param_and_place_shards():
    cfg = model.get_config("qwen2.5-0.5b", vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_ff=128, max_seq_len=32)
    mesh = sh.make_mesh("fsdp:2,tensor:4")
    shardings = sh.model_shardings(cfg, mesh)
    specs = sh.describe(shardings)
    assert specs["layers/attn/wq"] == str(P(None, "fsdp", "tensor"))
    assert specs["layers/attn/wk"] == str(P(None, "fsdp"))  # kv_heads=2 on tensor:4: replicated
    assert specs["layers/attn/bk"] == str(P())
    assert specs["layers/mlp/w_out"] == str(P(None, "tensor", "fsdp"))
    assert specs["embed/tokens"] == str(P("tensor", "fsdp"))
    # Shard shapes are what the specs say: wq [2, 64, 4, 16] -> [2, 32, 1, 16] per device.
    assert shardings["layers"]["attn"]["wq"].shard_shape((2, 64, 4, 16)) == (2, 32, 1, 16)


def test_shard_batch_splits_rows_and_checks_divisibility():
    mesh = sh.make_mesh("data:2,fsdp:2,tensor:2")
    batch = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    out = sh.shard_batch(batch, mesh)["tokens"]
    assert out.shape == (8, 5)
    np.testing.assert_array_equal(np.asarray(out), batch["tokens"])
    # 4 batch shards, each replicated over the 2 tensor devices.
    shard_rows = sorted({tuple(s.index[0].indices(8)) for s in out.addressable_shards})
    assert shard_rows == [(0, 2, 1), (2, 4, 1), (4, 6, 1), (6, 8, 1)]
    with pytest.raises(ValueError, match="not a multiple of data x fsdp = 4"):
        sh.shard_batch({"tokens": np.zeros((6, 5), np.int32)}, mesh)
