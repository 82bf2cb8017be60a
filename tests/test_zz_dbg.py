import tracemalloc, jax
from core import hf, model
import tests.test_hf as t

def test_dbg(tmp_path, monkeypatch):
    cfg = model.ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=1024, max_seq_len=64)
    params = t._random_params(cfg, 6)
    hf.save_checkpoint(params, cfg, tmp_path, max_shard_bytes=6*2**20)
    del params
    orig = hf._place
    def place(x, s):
        cur, peak = tracemalloc.get_traced_memory()
        out = orig(x, s)
        cur2, peak2 = tracemalloc.get_traced_memory()
        print(x.shape, "before place cur %.1f peak %.1f | after cur %.1f peak %.1f" % (cur/2**20, peak/2**20, cur2/2**20, peak2/2**20))
        tracemalloc.reset_peak()
        return out
    monkeypatch.setattr(hf, "_place", place)
    tracemalloc.start()
    hf.load_checkpoint(tmp_path)
    print(tracemalloc.get_traced_memory())
    snap = tracemalloc.take_snapshot()
    for st in snap.statistics("lineno")[:5]: print(st)
