"""Train-step throughput: our jit-compiled JAX step vs the same model and optimizer in PyTorch.

    python -m experiments.bench_train                     # tiny family at width 512, CPU, ~3 min
    python -m experiments.bench_train --width=256         # the tiny family's width-256 point
    python -m experiments.bench_train --preset=gpt2-124m --width=0 --depth=0 --bf16 \
        --batch=16 --seq_len=1024                         # GPU: the preset's own sizes

Measures, in one process:
- peak: the best float32 (bfloat16 with --bf16) n x n x n matmul rate through jnp;
- JAX: tokens/s of `core.train.make_train_step` (AdamW, clipping, masked loss) and MFU =
  model FLOPs/token (core.model.flops_per_token) x tokens/s / peak;
- PyTorch (CPU backend only): an independent implementation of the same architecture and AdamW
  with the same decay groups, eager and torch.compile'd, same batch and sequence length;
- the compile time of the JAX step at depth 4 and depth 24 (layers run under lax.scan, so it
  should stay flat).
All contenders are built and warmed up first, then timed round-robin, --block consecutive steps
each per round after one untimed step, so load from other processes on a shared machine hits
them alike. (A contender just switched to runs its first step beside the previous one's
still-busy worker threads; with one-step rounds that cost JAX 1.5x in its median.) The
headline numbers use each one's best step (like the peak, a best-of), medians are printed next
to them. The 'cores' column is CPU time / wall time: well below the core count means other
processes took the cores, and the wall-clock numbers (MFU most of all, since the short peak
matmul finds quiet moments more easily than a whole train step) understate what the code does
on a quiet machine.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags

from experiments import common

flags.DEFINE_string("preset", "tiny", "model preset (core.model.PRESETS); its family switches are kept")
flags.DEFINE_integer("width", 512, "d_model (0 = the preset's)")
flags.DEFINE_integer("depth", 4, "n_layers (0 = the preset's)")
flags.DEFINE_integer("head_dim", 64, "head size when --width overrides the preset (heads = width / head_dim)")
flags.DEFINE_integer("vocab_size", 0, "vocabulary size (0 = the preset's)")
flags.DEFINE_integer("batch", 8, "sequences per step")
flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
flags.DEFINE_integer("steps", 10, "timed steps per implementation, after warm-up")
flags.DEFINE_integer("block", 2, "consecutive timed steps per contender per round (after an untimed one)")
flags.DEFINE_string("mesh", "data:-1", "device mesh for the JAX step (core.sharding spec)")
flags.DEFINE_bool("bf16", False, "bfloat16 matmuls (JAX compute_dtype; peak measured in bfloat16)")
flags.DEFINE_bool("torch", True, "also time the PyTorch reference (CPU backend only)")
flags.DEFINE_bool("torch_compile", True, "also time torch.compile (needs a C++ compiler)")
flags.DEFINE_string("compile_depths", "4,24", "depths whose JAX step compile time is measured ('' = skip)")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- JAX side


def model_config(model_lib):
    """The --preset with --width/--depth/--vocab_size applied (heads of --head_dim, same MLP ratio)."""
    base = model_lib.get_config(FLAGS.preset)
    over = {"compute_dtype": "bfloat16" if FLAGS.bf16 else "float32",
            "max_seq_len": max(base.max_seq_len if base.pos == "learned" else 0, FLAGS.seq_len)}
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
    return model_lib.get_config(FLAGS.preset, **over)


class matmul_runner:
    """One n x n x n matmul per call (n = 2048 on CPU, 8192 on accelerators): the peak."""

    def __init__(self, jax, jnp, dtype):
        n = 2048 if jax.default_backend() == "cpu" else 8192
        self.a = jnp.asarray(jax.random.normal(jax.random.key(0), (n, n)), dtype)
        self.b = jnp.asarray(jax.random.normal(jax.random.key(1), (n, n)), dtype)
        self.f = jax.jit(lambda x, y: x @ y)
        self.flops = 2.0 * n ** 3
        for _ in range(2):
            self()

    def __call__(self):
        self.f(self.a, self.b).block_until_ready()


class jax_runner:
    """core.train.make_train_step with AdamW (clipping, decay mask) on --mesh; one step per call."""

    def __init__(self, cfg, tokens_np):
        import jax

        from core import optim, sharding, train

        self.jax = jax
        opt = optim.make_optimizer(optim.OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
        mesh = sharding.make_mesh(FLAGS.mesh)
        self.state = train.init_train_state(jax.random.key(0), cfg, opt, mesh)
        self.step = train.make_train_step(cfg, opt, mesh)
        self.batch = sharding.shard_batch({"tokens": tokens_np}, mesh)
        self.metrics = None
        for _ in range(2):
            self()

    def __call__(self):
        self.state, self.metrics = self.step(self.state, self.batch)
        self.jax.block_until_ready(self.metrics)

    def loss(self) -> float:
        return float(self.metrics["loss"])


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


def torch_model_and_opt(cfg, torch, seq_len: int, params=None, lr: float = 1e-3, eps: float = 1e-8,
                        weight_decay: float = 0.1):
    """The same network as core.model for the switches the CPU presets use (RMSNorm, RoPE
    rotate-half, QK-norm, ReLU^2 / GELU / SwiGLU MLP, soft-capped untied or tied head), written
    independently in PyTorch, plus AdamW (betas 0.9, 0.95) with the same no-decay groups as
    core.optim (decay on matrices, not on embeddings, norms or biases). `params`, a core.model
    params tree (numpy), sets the weights; else torch's own init with the same stds."""
    nn, F = torch.nn, torch.nn.functional
    d, h, k, e, f, v = cfg.d_model, cfg.n_heads, cfg.k, cfg.e, cfg.f, cfg.vocab_size
    checks = (("layernorm", cfg.norm != "rmsnorm"), ("learned positions", cfg.pos != "rope"),
              ("biases", cfg.qkv_bias or cfg.mlp_bias or cfg.attn_out_bias),
              ("rope scaling", cfg.rope_scaling is not None))
    unsupported = [name for name, bad in checks if bad]
    if unsupported:
        raise NotImplementedError(f"PyTorch reference skipped: it covers the RMSNorm/RoPE bias-free family "
                                  f"(tiny, d20), and this config has {', '.join(unsupported)}")

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float32) / e))
    ang = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv[None]
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
            self.smear = nn.Parameter(torch.zeros(k))  # no weight decay: 1-D, like ours
            self.w_in = nn.Linear(d, f * (2 if cfg.mlp == "swiglu" else 1), bias=False)
            self.w_out = nn.Linear(f, d, bias=False)
            out_std = 0.0 if cfg.zero_init_out else cfg.init_std / math.sqrt(2 * cfg.n_layers)
            for lin in (self.wq, self.wkv, self.w_in):
                nn.init.normal_(lin.weight, std=cfg.init_std)
            for lin in (self.wo, self.w_out):
                nn.init.normal_(lin.weight, std=out_std)

        def forward(self, x):
            b, t, _ = x.shape
            y = rms(x, self.n1)
            q = self.wq(y).view(b, t, h, e).transpose(1, 2)
            kv = self.wkv(y).view(b, t, 2, k, e)
            kk, vv = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            if cfg.qk_norm:
                q, kk = rms(q, self.qn), rms(kk, self.kn)
            q, kk = rope(q), rope(kk)
            if cfg.smear_keys:  # key s mixes in key s-1 (none before the first)
                g = torch.sigmoid(self.smear)[None, :, None, None]
                kk = kk + g * (F.pad(kk[:, :, :-1], (0, 0, 1, 0)) - kk)
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
    if params is not None:
        load_params(net, params, cfg, torch)
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=eps)
    return net, opt


def load_params(net, params, cfg, torch) -> None:
    """Copies a core.model params tree (numpy arrays) into the PyTorch reference."""
    import numpy as np

    d = cfg.d_model
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731  (copy: writable)
    lay, at, ml = params["layers"], params["layers"]["attn"], params["layers"]["mlp"]
    with torch.no_grad():
        net.embed.weight.copy_(t(params["embed"]["tokens"]))
        if net.head is not None:
            net.head.weight.copy_(t(params["lm_head"]).T)
        net.nf.copy_(t(params["final_norm"]["scale"]))
        for i, blk in enumerate(net.blocks):
            blk.n1.copy_(t(lay["attn_norm"]["scale"][i]))
            blk.n2.copy_(t(lay["mlp_norm"]["scale"][i]))
            blk.wq.weight.copy_(t(at["wq"][i].reshape(d, -1)).T)
            kv = np.concatenate([at["wk"][i].reshape(d, -1), at["wv"][i].reshape(d, -1)], 1)
            blk.wkv.weight.copy_(t(kv).T)
            blk.wo.weight.copy_(t(at["wo"][i].reshape(-1, d)).T)
            if cfg.qk_norm:
                blk.qn.copy_(t(at["q_norm"][i]))
                blk.kn.copy_(t(at["k_norm"][i]))
            if cfg.smear_keys:
                blk.smear.copy_(t(at["smear"][i]))
            w_in = ml["w_in"][i] if cfg.mlp != "swiglu" else np.concatenate([ml["w_in"][i], ml["w_gate"][i]], 1)
            blk.w_in.weight.copy_(t(w_in).T)
            blk.w_out.weight.copy_(t(ml["w_out"][i]).T)


class torch_runner:
    """The PyTorch reference: forward, backward, clip, AdamW step per call (eager or compiled)."""

    def __init__(self, cfg, tokens_np, compiled: bool):
        import torch

        import jax
        import numpy as np

        from core import model as model_lib

        # Same initial weights as the JAX run (key 0), so the loss columns are comparable.
        params = jax.tree.map(np.asarray, model_lib.init_params(jax.random.key(0), cfg))
        self.net, self.opt = torch_model_and_opt(cfg, torch, tokens_np.shape[1] - 1, params)
        self.tokens = torch.from_numpy(tokens_np).long()
        self.torch = torch
        self.fn = torch.compile(self._step) if compiled else self._step
        self.last = None
        for _ in range(2):  # the first call compiles when torch.compile'd
            self()

    def _step(self):
        loss = self.net(self.tokens)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        return loss.detach()

    def __call__(self):
        self.last = self.fn()

    def loss(self) -> float:
        return float(self.last)


# ----------------------------------------------------------------------------- main


def main(argv):
    del argv
    if FLAGS.steps < 1 or FLAGS.block < 1:
        raise app.UsageError(f"--steps and --block must be >= 1, got {FLAGS.steps} and {FLAGS.block}")
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
    flops_step = fpt * tok_per_step
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(model_lib.param_shapes(cfg)))
    print(f"backend={backend} devices={n_dev} cores={os.cpu_count()} preset={FLAGS.preset} d_model={cfg.d_model} "
          f"layers={cfg.n_layers} heads={cfg.n_heads} d_ff={cfg.f} vocab={cfg.vocab_size} params={n_params / 1e6:.2f}M "
          f"batch={FLAGS.batch}x{FLAGS.seq_len} dtype={cfg.compute_dtype} flops/token={fpt / 1e6:.1f}M", flush=True)

    # Every contender is built and warmed up first, then timed round-robin, one step each per
    # round, so that load from other processes hits all of them alike.
    runners = {"peak matmul": matmul_runner(jax, jnp, jnp.bfloat16 if FLAGS.bf16 else jnp.float32)}
    runners["jax jit (ours)"] = jax_runner(cfg, tokens_np)
    first_s = {}
    torch_note = None
    if FLAGS.torch and backend == "cpu":
        import torch

        try:
            runners["torch eager"] = torch_runner(cfg, tokens_np, compiled=False)
            if FLAGS.torch_compile:
                t = time.perf_counter()
                try:
                    runners["torch.compile"] = torch_runner(cfg, tokens_np, compiled=True)
                    first_s["torch.compile"] = time.perf_counter() - t
                except Exception as exc:  # a missing C++ compiler must not lose the other numbers
                    torch_note = f"torch.compile failed: {type(exc).__name__}: {exc}"
        except NotImplementedError as exc:
            torch_note = str(exc)
    elif FLAGS.torch:
        torch_note = f"PyTorch reference skipped on backend {backend!r} (CPU only)"
    if torch_note:
        print(torch_note)

    times: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(-(-FLAGS.steps // FLAGS.block)):
        for name, run in runners.items():
            run()  # untimed: the switch from the previous contender
            for _ in range(FLAGS.block):
                t, c = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    best = {k: min(v) for k, v in times.items()}
    n_timed = len(times["peak matmul"])  # --steps rounded up to whole blocks
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    # Fake CPU devices (--xla_force_host_platform_device_count) share the same cores.
    peak = runners["peak matmul"].flops / best["peak matmul"] / 1e9 * (1 if backend == "cpu" else n_dev)
    losses = {k: r.loss() for k, r in runners.items() if hasattr(r, "loss")}
    cores = {k: sorted(c / w for c, w in zip(cpu[k], times[k]))[len(times[k]) // 2] for k in runners}

    out = {"tokens_per_s": tok_per_step / best["jax jit (ours)"],
           "tokens_per_s_median": tok_per_step / median["jax jit (ours)"],
           "mfu": flops_step / best["jax jit (ours)"] / (peak * 1e9),
           "mfu_median": flops_step / median["jax jit (ours)"] / (peak * 1e9),
           "peak_gflops": peak, "step_s": best["jax jit (ours)"],
           "jax_cores_used": cores["jax jit (ours)"],
           "torch_eager_tokens_per_s": tok_per_step / best["torch eager"] if "torch eager" in best else None,
           "torch_compile_tokens_per_s": tok_per_step / best["torch.compile"] if "torch.compile" in best else None}
    for d in [int(x) for x in FLAGS.compile_depths.split(",") if x.strip()]:
        out[f"compile_s_depth{d}"] = compile_seconds(cfg, d)

    print(f"\npeak matmul: {peak:.1f} GFLOP/s ({'bf16' if FLAGS.bf16 else 'f32'}, best of {n_timed}, "
          f"{n_dev} device(s)); steps timed round-robin, best (median) of {n_timed}")
    print(f"{'implementation':<16}{'step ms':>16}{'tokens/s':>16}{'GFLOP/s':>9}{'MFU':>7}{'cores':>7}{'loss':>8}"
          f"{'compile s':>11}")
    for name in runners:
        if name == "peak matmul":
            continue
        b, m = best[name], median[name]
        gf = flops_step / b / 1e9
        step_ms = f"{b * 1e3:.0f} ({m * 1e3:.0f})"
        tok_s = f"{tok_per_step / b:.0f} ({tok_per_step / m:.0f})"
        print(f"{name:<16}{step_ms:>16}{tok_s:>16}"
              f"{gf:>9.1f}{gf / peak:>7.1%}{cores[name]:>7.2f}{losses[name]:>8.3f}"
              f"{(f'{first_s[name]:.1f}' if name in first_s else ''):>11}")
    if out["torch_eager_tokens_per_s"]:
        out["speedup_vs_torch_eager"] = out["tokens_per_s"] / out["torch_eager_tokens_per_s"]
        out["speedup_vs_torch_eager_median"] = median["torch eager"] / median["jax jit (ours)"]
        print(f"jax / torch eager: {out['speedup_vs_torch_eager']:.2f}x "
              f"(median {out['speedup_vs_torch_eager_median']:.2f}x)")
    if out["torch_compile_tokens_per_s"]:
        out["speedup_vs_torch_compile"] = out["tokens_per_s"] / out["torch_compile_tokens_per_s"]
        print(f"jax / torch.compile: {out['speedup_vs_torch_compile']:.2f}x")
    comp = {k: v for k, v in out.items() if k.startswith("compile_s_depth")}
    if comp:
        print("jit compile of the train step: " + ", ".join(f"depth {k[15:]}: {v:.1f}s" for k, v in comp.items()))
    out.update(preset=FLAGS.preset, d_model=cfg.d_model, n_layers=cfg.n_layers, batch=FLAGS.batch,
               seq_len=FLAGS.seq_len, backend=backend, dtype=cfg.compute_dtype, flops_per_token=fpt,
               malloc_hugetlb="glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    app.run(common.cli(main))
