"""Many hosts on one machine: N JAX processes joined by `jax.distributed.initialize` over a loopback
coordinator, CPU collectives (gloo), 4 fake CPU devices each, one mesh over all 8 global devices.

The harness (reusable for every stage):
  `launch(job, config, n_processes, devices_per_process)` starts `python -m tests.test_multihost
  JOB SPEC` once per process and returns each process's result dict (process order). A job is a
  function in `JOBS`, config -> JSON-able dict, run inside an initialised process. Pretraining
  SFT and the cross-topology restore are jobs here (a stage's `run(Config(...))` as
  a black box, see `_pretrain_job`).

What is checked:
  - 2 processes x 4 devices give the same per-step losses and validation bits per byte as
    1 process x 8 devices, with each process reading only its own share of the data (grain's
    per-process sharding: process p owns documents p, p + P, ...). The 1-process reference is fed
    the same global batches: its data iterator is the concatenation of the P per-process
    iterators (`data_processes`), which is what the P processes together feed;
  - params written by 2 processes restore on 1 process and the other way round, bit for bit;
  - resuming *training* across process counts is refused with a clear error (each process's
    data-iterator state is its own shard's position).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: str, config: dict, n_processes: int, devices_per_process: int, work_dir, *,
           timeout: float = 900, cache_dir=None) -> list[dict]:
    """Runs JOBS[job](config) in n_processes JAX processes of devices_per_process CPU devices each
    and returns their results in process order. Raises with every process's output on failure."""
    work_dir = pathlib.Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port() if n_processes > 1 else 0
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = []
    for i in range(n_processes):
        spec = {"process_id": i, "num_processes": n_processes, "local_devices": devices_per_process,
                "coordinator": f"127.0.0.1:{port}", "config": config,
                "result": str(work_dir / f"{job}_result_{i}.json")}
        spec_path = work_dir / f"{job}_spec_{i}.json"
        spec_path.write_text(json.dumps(spec))
        log = open(work_dir / f"{job}_log_{i}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.test_multihost", job, str(spec_path)],
                                       cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for i, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(i)
    if failed:
        logs = "\n".join(f"--- process {i}:\n" + (work_dir / f"{job}_log_{i}.txt").read_text()[-3000:]
                         for i in range(n_processes))
        raise RuntimeError(f"job {job!r} failed in process(es) {failed} of {n_processes}\n{logs}")
    return [json.loads((work_dir / f"{job}_result_{i}.json").read_text()) for i in range(n_processes)]


def _entry(job: str, spec_path: str) -> None:
    """One process of `launch`: configure devices and collectives, join the others, run the job."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    import jax

    # Before any device is touched: the fake device count and gloo for cross-process
    # collectives on CPU (jax 0.10: 'gloo' is also the default; set so the intent is explicit).
    jax.config.update("jax_num_cpu_devices", spec["local_devices"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if spec["num_processes"] > 1:
        jax.distributed.initialize(coordinator_address=spec["coordinator"], num_processes=spec["num_processes"],
                                   process_id=spec["process_id"], initialization_timeout=300)
    assert jax.process_count() == spec["num_processes"] and jax.local_device_count() == spec["local_devices"]
    result = JOBS[job](spec["config"])
    result.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  global_devices=jax.device_count())
    pathlib.Path(spec["result"]).write_text(json.dumps(result))
    if spec["num_processes"] > 1:
        jax.distributed.shutdown()


# ----------------------------------------------------------------------------- jobs


class _ConcatIterator:
    """The batches P processes feed together, built in one process: row blocks of the P
    per-process iterators, in process order (`sharding.shard_batch`'s global row order)."""

    def __init__(self, its):
        self.its = its

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"processes": [it.get_state() for it in self.its]}

    def set_state(self, state):
        for it, s in zip(self.its, state["processes"]):
            it.set_state(s)

    def close(self):
        for it in self.its:
            it.close()


def _emulate_data_processes(n: int) -> None:
    """Makes this single process read its data as n processes would together (see the module
    docstring); patches data.pipeline.make_train_iterator, the one door to the data."""
    from data import pipeline

    original = pipeline.make_train_iterator

    def make(doc_source, tokenizer, seq_len, batch_size, *args, **kwargs):
        if batch_size % n:
            raise ValueError(f"batch {batch_size} does not split over {n} emulated processes")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("process_index", "process_count")}
        return _ConcatIterator([original(doc_source, tokenizer, seq_len, batch_size // n, *args,
                                         process_index=p, process_count=n, **kwargs) for p in range(n)])

    pipeline.make_train_iterator = make


def _run_stage(config: dict, run) -> tuple[object, list[dict], pathlib.Path]:
    """Runs a stage's `run(config)` as a black box in every process (config may add
    data_processes: emulated data sharding, 1 process only); returns (its summary, metrics.jsonl
    records, out_dir). Process 0 alone writes metrics.jsonl; every process reads it once all have
    finished."""
    from jax.experimental import multihost_utils

    from experiments import common

    config = dict(config)
    n = config.pop("data_processes", 1)
    if n > 1:
        _emulate_data_processes(n)
    summary = run(config)
    multihost_utils.sync_global_devices("stage done")
    out_dir = pathlib.Path(config["out_dir"])
    return summary, common.read_jsonl(out_dir / common.METRICS_FILE), out_dir


def _pretrain_job(config: dict) -> dict:
    """experiments.pretrain.run; returns its per-step losses and evals."""
    from experiments import common
    from experiments import pretrain

    summary, recs, out_dir = _run_stage(config, lambda c: pretrain.run(pretrain.PretrainConfig(**c)))
    evals = common.read_jsonl(out_dir / common.EVALS_FILE) if (out_dir / common.EVALS_FILE).exists() else []
    return {"losses": [r["loss"] for r in recs], "steps": [r["step"] for r in recs],
            "val_bpb": [e["val_bpb"] for e in evals], "final_val_bpb": summary.get("val_bpb")}


def _sft_job(config: dict) -> dict:
    """experiments.sft.run from a pretraining run; returns its per-step losses."""
    from experiments import sft

    _, recs, _ = _run_stage(config, lambda c: sft.run(sft.SFTConfig(**c)))
    return {"losses": [r["loss"] for r in recs], "steps": [r["step"] for r in recs]}


def _rl_job(config: dict) -> dict:
    """experiments.rl.run from an SFT run: rollouts with the engine on the global mesh, rewards,
    the GRPO update; returns its per-step losses and rewards."""
    from experiments import rl

    _, recs, _ = _run_stage(config, lambda c: rl.run(rl.RLRunConfig(**c)))
    return {"losses": [r["loss"] for r in recs], "rewards": [r["reward_mean"] for r in recs],
            "steps": [r["step"] for r in recs]}


def _restore_job(config: dict) -> dict:
    """Restores the params of the checkpoint in config['out_dir'] onto a mesh over all global
    devices; writes them (gathered) to config['npz'] from process 0. Then tries to restore this
    process's data-iterator state too, and reports the error if that is refused."""
    import jax
    from jax.experimental import multihost_utils

    from core import checkpoint as ck
    from core import sharding as sharding_lib
    from experiments import common

    mesh = sharding_lib.make_mesh(config["mesh"])
    _, cfg, params, step = common.load_model(config["out_dir"], mesh=mesh)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    host = multihost_utils.process_allgather(flat, tiled=True)
    if jax.process_index() == 0:
        np.savez(config["npz"], **{k: np.asarray(v) for k, v in host.items()})
    data_error = None
    try:
        with ck.make_manager(pathlib.Path(config["out_dir"]) / common.CHECKPOINT_DIR, read_only=True) as mngr:
            target = {"params": ck.abstract_state(jax.eval_shape(lambda: params))}
            ck.restore(mngr, target, step=step, with_data=True, partial=True)
    except Exception as e:  # noqa: BLE001 - the message is the result
        data_error = f"{type(e).__name__}: {e}"
    return {"step": step, "data_error": data_error,
            "shardings": sorted({str(x.sharding.spec) for x in flat.values()})}


# The jobs a process can run; SFT and RL steps go here (config -> JSON-able result).
JOBS: dict[str, Callable[[dict], dict]] = {"pretrain": _pretrain_job, "sft": _sft_job, "rl": _rl_job,
                                            "restore": _restore_job}


# ----------------------------------------------------------------------------- tests

DATA = "synthetic:entities=20,bytes=300K"
STEPS, CKPT_EVERY = 6, 3
MESH = "data:2,fsdp:2,tensor:2"


def _pretrain_config(out_dir, tokenizer_path, **extra) -> dict:
    base = dict(out_dir=str(out_dir), tokenizer=str(tokenizer_path), data=DATA, d_model=32, n_layers=2,
                n_heads=2, d_ff=64, seq_len=32, batch_size=8, steps=STEPS, ckpt_every=CKPT_EVERY,
                keep_checkpoints=2, eval_every=CKPT_EVERY, eval_batches=2, eval_samples=0, log_every=1,
                warmup_steps=2, mesh=MESH, async_checkpoint=False)
    return {**base, **extra}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from core import tokenizer as tok_lib
    from data import readers

    docs = readers.open_source(DATA)
    tok = tok_lib.train_bpe((docs[i] for i in range(300)), vocab_size=300)
    return tok.save(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("multihost")
    cache = root / "jax_cache"
    two = launch("pretrain", _pretrain_config(root / "two", tokenizer_path), 2, 4, root / "w_two",
                 cache_dir=cache)
    one = launch("pretrain", _pretrain_config(root / "one", tokenizer_path, data_processes=2), 1, 8,
                 root / "w_one", cache_dir=cache)
    return root, two, one


def test_two_processes_train_like_one(runs):
    _, two, one = runs
    assert [r["process_count"] for r in two] == [2, 2] and two[0]["global_devices"] == 8
    assert one[0]["process_count"] == 1 and one[0]["global_devices"] == 8
    ref = one[0]
    assert ref["steps"] == list(range(1, STEPS + 1))
    for r in two:  # every process sees the same global losses
        # Equal up to the order of float sums in the cross-process all-reduce.
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=2e-5, atol=0)
    np.testing.assert_allclose(two[0]["val_bpb"], ref["val_bpb"], rtol=2e-5)
    assert len(ref["val_bpb"]) == 2


def test_each_process_reads_only_its_share(runs, tokenizer_path, tmp_path):
    """The reference fed the 2-process layout matches; a single process reading everything
    itself (its own 1-process shard) sees other batches, so the match above is not vacuous."""
    root, two, one = runs
    plain = launch("pretrain", _pretrain_config(tmp_path / "plain", tokenizer_path, steps=2, eval_every=0), 1, 8,
                   tmp_path / "w", cache_dir=root / "jax_cache")
    assert not np.allclose(plain[0]["losses"][:1], one[0]["losses"][:1], rtol=1e-4)  # step 1: same init


@pytest.fixture(scope="module")
def sft_runs(runs):
    """SFT from the pretraining run on 2 processes and on 1 fed the same global batches."""
    root, _, _ = runs
    cfg = dict(init=str(root / "one"), n_conversations=200, val_conversations=32, seq_len=96, batch_size=8, steps=4,
               eval_every=0, eval_samples=0, ckpt_every=4, log_every=1, warmup_steps=1, mesh=MESH,
               async_checkpoint=False)
    two = launch("sft", dict(cfg, out_dir=str(root / "sft_two")), 2, 4, root / "w_sft_two", cache_dir=root / "jax_cache")
    one = launch("sft", dict(cfg, out_dir=str(root / "sft_one"), data_processes=2), 1, 8, root / "w_sft_one",
                 cache_dir=root / "jax_cache")
    return root, two, one


def test_sft_on_two_processes_like_one(sft_runs):
    """Packed, masked conversation rows split over 2 processes give the losses of 1 process."""
    _, two, one = sft_runs
    assert one[0]["steps"] == [1, 2, 3, 4]
    for r in two:
        np.testing.assert_allclose(r["losses"], one[0]["losses"], rtol=2e-5, atol=0)


def test_rl_steps_on_two_processes_like_one(sft_runs):
    """Rollouts (the engine's state sharded over both processes' devices), rewards and GRPO
    updates: 2 processes give 1 process's rewards and losses."""
    root, _, _ = sft_runs
    cfg = dict(init=str(root / "sft_one"), tasks="short_math:n=40", eval_tasks="short_math:split=heldout,n=4",
               group_size=4, prompts_per_step=2, max_new_tokens=12, steps=2, eval_every=0, pass_k=0, ckpt_every=2,
               log_every=1, mesh=MESH, async_checkpoint=False, lr=1e-2, dynamic_sampling=None)
    two = launch("rl", dict(cfg, out_dir=str(root / "rl_two")), 2, 4, root / "w_rl_two", cache_dir=root / "jax_cache")
    one = launch("rl", dict(cfg, out_dir=str(root / "rl_one")), 1, 8, root / "w_rl_one", cache_dir=root / "jax_cache")
    assert one[0]["steps"] == [1, 2]
    for r in two:
        np.testing.assert_allclose(r["rewards"], one[0]["rewards"], rtol=1e-6)
        np.testing.assert_allclose(r["losses"], one[0]["losses"], rtol=2e-5, atol=1e-7)


def test_checkpoints_restore_across_process_counts(runs):
    root, _, _ = runs
    out = {}
    for writer in ("two", "one"):
        for n, d in ((1, 8), (2, 4)):
            npz = root / f"params_{writer}_on_{n}.npz"
            res = launch("restore", {"out_dir": str(root / writer), "mesh": MESH, "npz": str(npz)}, n, d,
                         root / f"w_restore_{writer}_{n}")
            assert res[0]["step"] == STEPS
            out[writer, n] = (np.load(npz), res)
    for writer in ("two", "one"):
        a, b = out[writer, 1][0], out[writer, 2][0]
        assert sorted(a.files) == sorted(b.files) and len(a.files) > 5
        for k in a.files:  # the same bytes, whoever wrote and whoever reads
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in out["two", 1][0].files:  # and the two runs trained the same params
        np.testing.assert_allclose(out["two", 1][0][k], out["one", 1][0][k], rtol=1e-4, atol=1e-6, err_msg=k)
    # Training state proper (the data position) is per process: a different count is refused.
    assert "different number of processes" in (out["two", 1][1][0]["data_error"] or "")
    assert "different number of processes" in (out["one", 2][1][0]["data_error"] or "")
    assert out["two", 2][1][0]["data_error"] is None


if __name__ == "__main__":
    _entry(sys.argv[1], sys.argv[2])
