"""Train-step throughput: our jit-compiled JAX step vs the same model and optimizer in PyTorch.

    python -m experiments.bench_train                      # tiny family at width 256, CPU
    python -m experiments.bench_train --preset=gpt2-124m --bf16 --batch=16 --seq_len=1024  # GPU

Measures, in one process:
- peak: the best float32 (bfloat16 with --bf16) matmul rate of this machine through jnp;
- JAX: tokens/s of `core.train.make_train_step` (AdamW, clipping, masked loss) and MFU =
  model FLOPs/token (core.model.flops_per_token) x tokens/s / peak;
- PyTorch (CPU only): an independent implementation of the same architecture and AdamW with
  the same decay mask, eager and torch.compile'd, same batch and sequence length;
- the compile time of the JAX step at depth 4 and depth 24 (layers run under lax.scan, so it
  should stay flat).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import app, flags

flags.DEFINE_string("preset", "tiny", "model preset (core.model.PRESETS); its family switches are kept")
flags.DEFINE_integer("width", 256, "d_model (0 = the preset's)")
flags.DEFINE_integer("depth", 4, "n_layers (0 = the preset's)")
flags.DEFINE_integer("head_dim", 64, "head size when --width overrides the preset (heads = width / head_dim)")
flags.DEFINE_integer("vocab_size", 0, "vocabulary size (0 = the preset's)")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
flags.DEFINE_integer("steps", 6, "timed steps per implementation (after 2 warm-up steps)")
flags.DEFINE_string("mesh", "data:-1", "device mesh for the JAX step (core.sharding spec)")
flags.DEFINE_bool("bf16", False, "bfloat16 matmuls (JAX compute_dtype; peak measured in bfloat16)")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference (CPU backend only)")
flags.DEFINE_bool("torch_compile", True, "also time torch.compile (needs a C++ compiler)")
flags.DEFINE_string("compile_depths", "4,24", "depths whose JAX step compile time is measured ('' = skip)")
flags.DEFINE_bool("tune_cpu", True, "on CPU, start XLA with flags that help small training steps "
                  "(set before JAX starts; see CPU_XLA_FLAGS)")
FLAGS = flags.FLAGS

# See the lab notes in this file's report: on XLA:CPU these cut the step time of the width-256
# model without changing its numerics beyond float reassociation.
CPU_XLA_FLAGS: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- JAX side


def model_config(model_lib):
    over = {"max_seq_len": max(FLAGS.seq_len, 1)}
    base = model_lib.get_config(FLAGS.preset)
    if FLAGS.width:
        if FLAGS.width % FLAGS.head_dim:
            raise ValueError(f"--head_dim={FLAGS.head_dim} does not divide --width={FLAGS.width}")
        heads = FLAGS.width // FLAGS.head_dim
        kv = base.k if base.k < base.n_heads and heads % base.k == 0 else None
        over.update(d_model=FLAGS.width, n_heads=heads, n_kv_heads=kv, head_dim=None,
                    d_ff=FLAGS.width * base.f // base.d_model)
    if FLAGS.depth:
        over["n_layers"] = FLAGS.depth
    if FLAGS.vocab_size:
        over["vocab_size"] = FLAGS.vocab_size
    over["compute_dtype"] = "bfloat16" if FLAGS.bf16 else "float32"
    over["max_seq_len"] = max(base.max_seq_len if base.pos == "learned" else 0, FLAGS.seq_len)
    return model_lib.get_config(FLAGS.preset, **over)


def matmul_peak_gflops(jax, jnp, dtype, n=None, reps=8) -> float:
    """Best-of-reps rate of one n x n x n matmul (n = 2048 on CPU, 8192 on accelerators)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.asarray(jax.random.normal(jax.random.key(0), (n, n)), dtype)
    b = jnp.asarray(jax.random.normal(jax.random.key(1), (n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def time_steps(fn, n_warm: int, n: int) -> float:
    """Seconds per call of fn() (fn blocks until its step is done), median of n after warm-up."""
    for _ in range(n_warm):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def jax_bench(cfg, tokens_np):
    import jax
    import numpy as np

    from core import optim, sharding, train

    opt = optim.make_optimizer(optim.OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    mesh = sharding.make_mesh(FLAGS.mesh)
    state = train.init_train_state(jax.random.key(0), cfg, opt, mesh)
    step = train.make_train_step(cfg, opt, mesh)
    batch = sharding.shard_batch({"tokens": tokens_np}, mesh)
    box = {"state": state, "m": None}

    def run():
        box["state"], box["m"] = step(box["state"], batch)
        jax.block_until_ready(box["m"])

    dt = time_steps(run, 2, FLAGS.steps)
    return dt, float(np.asarray(box["m"]["loss"]))


def compile_seconds(cfg, depth: int) -> float:
    """Wall time to trace, lower and compile the full train step at this depth (no allocation)."""
    import dataclasses

    import jax
    import numpy as np

    from core import optim, sharding, train

    cfg = dataclasses.replace(cfg, n_layers=depth)
    opt = optim.make_optimizer(optim.OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    mesh = sharding.make_mesh(FLAGS.mesh)
    t = time.perf_counter()
    state = jax.eval_shape(lambda: train.init_train_state(jax.random.key(0), cfg, opt, mesh))
    step = train.make_train_step(cfg, opt, mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((FLAGS.batch, FLAGS.seq_len + 1), np.int32)}
    step.lower(state, batch).compile()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- PyTorch side


def torch_model_and_opt(cfg, torch):
    """The same network as core.model for the switches the CPU presets use (RMSNorm, RoPE
    rotate-half, QK-norm, ReLU^2 / GELU / SwiGLU MLP, soft-capped untied or tied head), written
    independently in PyTorch, plus AdamW with the same no-decay groups and clipping."""
    nn, F = torch.nn, torch.nn.functional
    d, h, k, e, f, v = cfg.d_model, cfg.n_heads, cfg.k, cfg.e, cfg.f, cfg.vocab_size
    if cfg.norm != "rmsnorm" or cfg.pos != "rope" or cfg.qkv_bias or cfg.mlp_bias or cfg.attn_out_bias:
        raise ValueError(f"--preset={FLAGS.preset}: the PyTorch reference covers the RMSNorm/RoPE "
                         "bias-free family only; pass --notorch")

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float32) / e))
    ang = torch.arange(FLAGS.seq_len, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # [T, E]

    def rope(x):  # x [B, H, T, E]
        x1, x2 = x[..., : e // 2], x[..., e // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
            self.wq = nn.Linear(d, h * e, bias=False)
            self.wkv = nn.Linear(d, 2 * k * e, bias=False)
            self.wo = nn.Linear(h * e, d, bias=False)
            self.qn, self.kn = nn.Parameter(torch.ones(e)), nn.Parameter(torch.ones(e))
            self.w_in = nn.Linear(d, f * (2 if cfg.mlp == "swiglu" else 1), bias=False)
            self.w_out = nn.Linear(f, d, bias=False)
            for lin in (self.wq, self.wkv, self.wo, self.w_in, self.w_out):
                nn.init.normal_(lin.weight, std=cfg.init_std)

        def forward(self, x):
            b, t, _ = x.shape
            y = rms(x, self.n1)
            q = self.wq(y).view(b, t, h, e).transpose(1, 2)
            kv = self.wkv(y).view(b, t, 2, k, e)
            kk, vv = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            if cfg.qk_norm:
                q, kk = rms(q, self.qn), rms(kk, self.kn)
            q, kk = rope(q), rope(kk)
            o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=k != h)
            x = x + self.wo(o.transpose(1, 2).reshape(b, t, h * e))
            u = self.w_in(rms(x, self.n2))
            if cfg.mlp == "swiglu":
                up, gate = u.chunk(2, -1)
                a = F.silu(gate) * up
            elif cfg.mlp == "gelu":
                a = F.gelu(u, approximate="tanh")
            else:
                a = F.relu(u).square()
            return x + self.w_out(a)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(v, d)
            nn.init.normal_(self.embed.weight, std=cfg.init_std)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.nf = nn.Parameter(torch.ones(d))
            self.head = None if cfg.tie_embeddings else nn.Linear(d, v, bias=False)
            if self.head is not None:
                nn.init.normal_(self.head.weight, std=cfg.init_std)

        def forward(self, tokens):
            x = self.embed(tokens[:, :-1])
            for blk in self.blocks:
                x = blk(x)
            x = rms(x, self.nf)
            logits = x @ (self.embed.weight if self.head is None else self.head.weight).T
            if cfg.logit_softcap:
                logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
            return F.cross_entropy(logits.reshape(-1, v), tokens[:, 1:].reshape(-1))

    net = Model()
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    return net, opt


def torch_bench(cfg, tokens_np, compiled: bool):
    import torch

    torch.manual_seed(0)
    net, opt = torch_model_and_opt(cfg, torch)
    tokens = torch.from_numpy(tokens_np).long()

    def step():
        loss = net(tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss

    if compiled:
        step = torch.compile(step)
    box = {}

    def run():
        box["loss"] = float(step())

    t = time.perf_counter()
    run()  # compiles when torch.compile'd
    first = time.perf_counter() - t
    return time_steps(run, 1, FLAGS.steps), box["loss"], first


# ----------------------------------------------------------------------------- main


def main(argv):
    del argv
    if FLAGS.tune_cpu and CPU_XLA_FLAGS and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *CPU_XLA_FLAGS]).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from core import model as model_lib

    cfg = model_config(model_lib)
    backend = jax.default_backend()
    n_dev = jax.device_count()
    tokens_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (FLAGS.batch, FLAGS.seq_len + 1)).astype(np.int32)
    tok_per_step = FLAGS.batch * FLAGS.seq_len
    fpt = model_lib.flops_per_token(cfg, FLAGS.seq_len)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(model_lib.param_shapes(cfg)))
    print(f"backend={backend} devices={n_dev} cores={os.cpu_count()} preset={FLAGS.preset} d_model={cfg.d_model} "
          f"layers={cfg.n_layers} heads={cfg.n_heads} d_ff={cfg.f} vocab={cfg.vocab_size} params={n_params / 1e6:.2f}M "
          f"batch={FLAGS.batch}x{FLAGS.seq_len} dtype={cfg.compute_dtype} flops/token={fpt / 1e6:.1f}M", flush=True)

    peak = matmul_peak_gflops(jax, jnp, jnp.bfloat16 if FLAGS.bf16 else jnp.float32) * n_dev
    dt, loss = jax_bench(cfg, tokens_np)
    rows = [("jax jit (ours)", dt, loss, None)]
    out = {"tokens_per_s": tok_per_step / dt, "step_s": dt, "mfu": fpt * tok_per_step / dt / (peak * 1e9),
           "peak_gflops": peak, "model_gflops": fpt * tok_per_step / dt / 1e9,
           "torch_eager_tokens_per_s": None, "torch_compile_tokens_per_s": None}
    if FLAGS.torch and backend == "cpu":
        import torch

        t_dt, t_loss, _ = torch_bench(cfg, tokens_np, compiled=False)
        rows.append(("torch eager", t_dt, t_loss, None))
        out["torch_eager_tokens_per_s"] = tok_per_step / t_dt
        if FLAGS.torch_compile:
            try:
                c_dt, c_loss, c_first = torch_bench(cfg, tokens_np, compiled=True)
                rows.append(("torch.compile", c_dt, c_loss, c_first))
                out["torch_compile_tokens_per_s"] = tok_per_step / c_dt
            except Exception as exc:  # a missing compiler should not lose the other numbers
                print(f"torch.compile failed: {type(exc).__name__}: {exc}")
        out["torch_threads"] = torch.get_num_threads()
    for d in [int(x) for x in FLAGS.compile_depths.split(",") if x.strip()]:
        out[f"compile_s_depth{d}"] = compile_seconds(cfg, d)

    print(f"\npeak matmul: {peak:.1f} GFLOP/s ({'bf16' if FLAGS.bf16 else 'f32'}, {n_dev} device(s))")
    print(f"{'implementation':<18}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>8}{'loss':>9}{'1st step s':>12}")
    for name, s, l, first in rows:
        gf = fpt * tok_per_step / s / 1e9
        print(f"{name:<18}{s * 1e3:>10.1f}{tok_per_step / s:>12.0f}{gf:>10.1f}{gf / peak:>8.1%}{l:>9.3f}"
              f"{'' if first is None else f'{first:.1f}':>12}")
    if out["torch_eager_tokens_per_s"]:
        out["speedup_vs_torch_eager"] = out["tokens_per_s"] / out["torch_eager_tokens_per_s"]
        print(f"jax / torch eager: {out['speedup_vs_torch_eager']:.2f}x")
    if out["torch_compile_tokens_per_s"]:
        out["speedup_vs_torch_compile"] = out["tokens_per_s"] / out["torch_compile_tokens_per_s"]
        print(f"jax / torch.compile: {out['speedup_vs_torch_compile']:.2f}x")
    comp = {k: v for k, v in out.items() if k.startswith("compile_s_depth")}
    if comp:
        print("jit compile of the train step: " + ", ".join(f"depth {k[15:]}: {v:.1f}s" for k, v in comp.items()))
    out.update(preset=FLAGS.preset, d_model=cfg.d_model, n_layers=cfg.n_layers, batch=FLAGS.batch,
               seq_len=FLAGS.seq_len, backend=backend, dtype=cfg.compute_dtype, flops_per_token=fpt)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    app.run(main)
