"""Decode throughput of the inference engine (core/sampling.py) on this machine.

    python -m experiments.bench_decode                       # the default table (~5-8 min on 2 CPU cores)
    python -m experiments.bench_decode --batch_sizes=1 --contexts=512 --hf=false
    python -m experiments.bench_decode --bf16                # also our engine in bfloat16

For every batch size and context length, three ways to decode the same greedy tokens from the
same random Llama-shaped weights:
  kv cache  our engine: one prefill, then a jitted on-device loop over a static KV cache;
  no cache  the same jitted loop but recomputing the full forward over the whole (static) window
            every step, the baseline a KV cache exists to beat;
  HF        Hugging Face transformers `generate` (PyTorch, DynamicCache, same CPU threads) on the
            same weights, exported with core/hf.save_checkpoint.

"Context" is the number of tokens in the window when the last token is produced: the prompt holds
context - new_tokens tokens. Decode tokens/s counts only the decode phase (batch x tokens /
seconds after the prefill): our engine times its prefill separately; transformers is timed with a
streamer from its first generated token to its last. Prefill and compile are excluded everywhere.

Timing is interleaved: each of --repeats rounds runs one generate call of each contender back to
back (the order alternating between rounds), and the ratio is taken per round, so load from other
processes hits both sides of a ratio alike; a cell reports the median tok/s of each contender and
the median ratio with its spread (min..max over rounds). The 1-minute load average is recorded
at the start and the end.

MFU-style figure: `flops_fraction_b64` = achieved model FLOP/s at batch 64 (headline context) /
the best float32 n x n x n matmul rate measured in the same run (before and after the table).
Model FLOPs per decoded token: 2 x matmul params (attention and MLP projections, LM head) + 4 x
layers x heads x head_dim x attended positions (q.k and p.v over the filled context, averaged
over the decoded tokens).

Prints a table, then one JSON line with tokens_per_s_b1, tokens_per_s_b64 (at --headline_context),
speedup_vs_nocache_512 (batch 1), speedup_vs_hf_b1 and speedup_vs_hf_b64 (median ratios; their
min..max in *_spread), flops_fraction_b64, peak_gflops, the load averages, bf16 figures with
--bf16, speedup_vs_hf_group (batch 64 as 64/G prompts x G samples at temperature 1, --group: our
samples share one stored prompt cache, HF's num_return_sequences repeats it), plus every cell.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
import time
from typing import Optional

from absl import app, flags

from experiments import common


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 64)
    contexts: tuple[int, ...] = (128, 256, 512, 1024)
    new_tokens: int = 32
    nocache_tokens: int = 8
    nocache_max_batch: int = 1
    headline_context: int = 512
    hf: bool = True
    hf_threads: int = 0
    repeats: int = 3
    bf16: bool = False
    arch: str = "llama"
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 768
    seed: int = 0
    group: int = 8

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch_sizes must be positive integers, got {self.batch_sizes}")
        if not self.contexts:
            raise ValueError("--contexts is empty")
        if self.new_tokens < 2 or self.nocache_tokens < 1:
            raise ValueError("--new_tokens must be >= 2 and --nocache_tokens >= 1")
        if min(self.contexts) <= self.new_tokens:
            raise ValueError(f"--contexts must exceed --new_tokens={self.new_tokens} (the prompt is "
                             f"context - new_tokens), got {self.contexts}")
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"--arch must be llama or qwen2, got {self.arch!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.group < 1 or 64 % self.group:
            raise ValueError(f"--group must divide 64 (batch 64 = 64/G prompts x G samples), got {self.group}")

    def model_config(self):
        from core import model as model_lib

        return model_lib.ModelConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, max_seq_len=max(2048, max(self.contexts)),
            norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=self.arch == "qwen2",
            tie_embeddings=False, zero_init_out=False, rope_theta=10000.0 if self.arch == "llama" else 1e6)


# ----------------------------------------------------------------------------- the three decoders


def _prompts(rng, batch: int, length: int, vocab: int) -> list[list[int]]:
    return rng.integers(1, vocab, (batch, length)).tolist()


def bench_kv_cache(params, cfg, prompts, new_tokens: int, n_samples: int = 1, mesh=None) -> tuple[float, list[list[int]]]:
    """(decode tokens/s, generated tokens) of core.sampling.generate, no stop tokens: greedy, or
    with n_samples > 1 sampled at temperature 1 (the samples share their prompt's cache). With a
    mesh, rows are split over its devices (params must live on it)."""
    import jax

    from core import sampling

    sc = sampling.SamplingConfig(temperature=0.0 if n_samples == 1 else 1.0, max_new_tokens=new_tokens)
    res = sampling.generate(params, cfg, prompts, sc, jax.random.PRNGKey(0), n_samples=n_samples, mesh=mesh)
    rows = len(prompts) * n_samples
    return rows * new_tokens / res.decode_s, [res.row_tokens(r) for r in range(rows)]


@functools.lru_cache(maxsize=None)
def _nocache_loop(cfg):
    """Greedy decode that re-runs the whole window [B, S] through the model every step."""
    import jax
    import jax.numpy as jnp

    from core import model as model_lib

    @jax.jit
    def loop(params, window_bs, start, n_steps):
        def body(i, win):
            pos = start + i  # the slot the next token goes to
            x_bsd, _ = model_lib.forward_hidden(params, win, cfg)
            logits_bv = model_lib.logits_from_hidden(params, x_bsd[:, pos - 1], cfg)
            tok_b = jnp.argmax(logits_bv, -1).astype(win.dtype)
            return jax.lax.dynamic_update_slice(win, tok_b[:, None], (jnp.zeros((), pos.dtype), pos))

        return jax.lax.fori_loop(0, n_steps, body, window_bs)

    return loop


def bench_no_cache(params, cfg, prompts, context: int, steps: int) -> float:
    """Decode tokens/s recomputing the full forward over the static window of `context` slots
    (causal: the empty slots after the current token do not change its logits)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    loop = _nocache_loop(cfg)
    p = len(prompts[0])
    window = np.zeros((len(prompts), context), np.int32)
    window[:, :p] = prompts
    window = jnp.asarray(window)
    jax.block_until_ready(loop(params, window, jnp.int32(p), jnp.int32(1)))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(loop(params, window, jnp.int32(p), jnp.int32(steps)))
    return len(prompts) * steps / (time.perf_counter() - t0)


def load_hf(params, cfg, directory: str):
    """Exports through core/hf.py and loads it back with transformers (float32, eval mode)."""
    import torch
    import transformers

    from core import hf

    hf.save_checkpoint(params, cfg, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def bench_hf(model, prompts, new_tokens: int, n_samples: int = 1) -> tuple[float, list[list[int]]]:
    """(decode tokens/s, generated tokens) of transformers' greedy `generate`, timed from the
    first generated token to the last (the prefill is excluded, as for our engine)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(prompts, dtype=torch.long)
    clock = Clock()
    with torch.inference_mode():
        # n_samples > 1: num_return_sequences repeats each prompt (and its cache) n_samples times.
        sampled = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n_samples)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None, streamer=clock,
                             **(sampled if n_samples > 1 else dict(do_sample=False)))
    # times[0]: the prompt is pushed; times[1]: first new token (after the prefill); times[-1]: last.
    if len(clock.times) != new_tokens + 1:
        raise RuntimeError(f"transformers streamer saw {len(clock.times)} pushes, expected {new_tokens + 1}")
    seconds = clock.times[-1] - clock.times[1]
    return len(prompts) * n_samples * (new_tokens - 1) / seconds, out[:, ids.shape[1]:].tolist()


def hf_logit_gap(params, cfg, model, tokens: list[int]) -> float:
    """Largest |our logits - transformers' logits| on one sequence: the weights are the same."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from core import model as model_lib

    ours = np.asarray(model_lib.forward(params, jnp.asarray([tokens]), cfg)[0][0])
    with torch.inference_mode():
        theirs = model(torch.tensor([tokens])).logits[0].numpy()
    return float(np.abs(ours - theirs).max())


# ----------------------------------------------------------------------------- FLOPs, peak, bf16


def decode_flops_per_token(cfg, context: int, new_tokens: int) -> float:
    """Model FLOPs of one decoded token: 2 x matmul params + q.k and p.v over the attended
    positions (prompt + tokens so far, averaged over the new tokens); see the module docstring."""
    d, e, L = cfg.d_model, cfg.e, cfg.n_layers
    matmul_params = L * (d * e * (2 * cfg.n_heads + 2 * cfg.k) + d * cfg.f * (3 if cfg.mlp == "swiglu" else 2))
    matmul_params += d * cfg.vocab_size
    attended = context - new_tokens / 2  # mean over the decoded tokens
    return 2.0 * matmul_params + 4.0 * L * cfg.n_heads * e * attended


def peak_matmul_flops(n: int = 2048, calls: int = 5) -> float:
    """Best float32 n x n x n matmul FLOP/s through jnp (the bench_train peak)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def bf16_logit_gap(params, cfg, params_bf, cfg_bf, prompt: list[int], steps: int = 16) -> dict:
    """Largest |bfloat16 - float32| logit over a prefill and `steps` cached decode steps feeding the
    float32 greedy tokens to both (so the two see the same sequence), absolute and relative to the
    largest float32 logit; and how often the greedy tokens agree."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from core import sampling

    def run(p, c, feed):
        pre = jax.jit(sampling.prefill, static_argnums=(1, 4))
        step = jax.jit(sampling.decode_step, static_argnums=1)
        n = len(prompt)
        cache, logits = pre(p, c, jnp.asarray([prompt], jnp.int32), jnp.asarray([n], jnp.int32),
                            sampling.bucket(n + steps))
        out = [np.asarray(logits[0])]
        for t in range(steps):
            tok = int(np.argmax(out[-1])) if feed is None else feed[t]
            cache, logits = step(p, c, cache, jnp.asarray([tok], jnp.int32))
            out.append(np.asarray(logits[0]))
        return np.stack(out)

    ref = run(params, cfg, None)
    feed = [int(t) for t in ref.argmax(-1)[:steps]]
    got = run(params_bf, cfg_bf, feed)
    gap = float(np.abs(got - ref).max())
    return {"bf16_max_logit_diff": gap, "bf16_rel_logit_diff": gap / float(np.abs(ref).max()),
            "bf16_greedy_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


# ----------------------------------------------------------------------------- the run


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _median(xs):
    import numpy as np

    return float(np.median(xs)) if xs else None


def _spread(xs):
    return [float(min(xs)), float(max(xs))] if xs else None


def time_cell(contenders: dict, repeats: int) -> dict:
    """{name: [tok/s per round]}: every round runs each contender once, back to back, the order
    reversed on odd rounds (so a drift in machine load does not favour whoever goes first)."""
    names = list(contenders)
    out = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(contenders[n]())
    return out


def run(bc: BenchConfig) -> dict:
    """Runs the table; returns the summary dict that is printed as the final JSON line."""
    import os

    import jax
    import numpy as np

    from core import model as model_lib
    from core import sampling
    from core import sharding as sharding_lib

    load_start = os.getloadavg()[0]
    cfg = bc.model_config()
    params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.PRNGKey(bc.seed), cfg)
    # Our engine splits rows over every device (on CPU: one per core, --cpu_devices).
    mesh = sharding_lib.make_mesh("data:-1") if jax.device_count() > 1 else None
    on_mesh = (lambda p, c: jax.device_put(p, sharding_lib.model_shardings(c, mesh))) if mesh else (lambda p, c: p)
    params_m = on_mesh(params, cfg)
    n_params = model_lib.count_params(params)
    common.say(f"model: {bc.arch}-shaped, {n_params / 1e6:.2f}M params (d_model {cfg.d_model}, layers "
               f"{cfg.n_layers}, heads {cfg.n_heads}/{cfg.k} kv, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}), "
               f"float32 | jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()} | "
               f"load average {load_start:.2f}")
    peaks = [peak_matmul_flops()]
    rng = np.random.default_rng(bc.seed)
    hf_model, tmp = None, None
    if bc.hf:
        import torch
        import transformers

        if bc.hf_threads:
            # On a loaded machine torch's OpenMP team stalls whenever one of its threads is
            # descheduled; one thread shows what HF does per core there (see the README).
            torch.set_num_threads(bc.hf_threads)
        tmp = tempfile.TemporaryDirectory(prefix="bench_decode_hf_")
        transformers.utils.logging.disable_progress_bar()
        hf_model = load_hf(params, cfg, tmp.name)
        gap = hf_logit_gap(params, cfg, hf_model, _prompts(rng, 1, 64, cfg.vocab_size)[0])
        common.say(f"transformers {transformers.__version__} (torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads): same weights via core/hf.py, max |logit diff| {gap:.2e}")
    params_bf = cfg_bf = None
    bf16 = {}
    if bc.bf16:
        params_bf, cfg_bf = sampling.for_inference(params, cfg, "bfloat16")
        bf16 = bf16_logit_gap(params, cfg, params_bf, cfg_bf, _prompts(rng, 1, 64, cfg.vocab_size)[0])
        common.say(f"bfloat16 weights + cache vs float32 (prefill + 16 decode steps): max |logit diff| "
                   f"{bf16['bf16_max_logit_diff']:.3e} ({100 * bf16['bf16_rel_logit_diff']:.2f}% of the largest "
                   f"logit), greedy tokens agree {100 * bf16['bf16_greedy_agreement']:.0f}%")

    cells = []
    header = (f"{'batch':>5} {'context':>7} | {'kv cache tok/s':>14} {'bf16 tok/s':>10} {'no cache tok/s':>14} "
              f"{'HF tok/s':>10} | {'x no-cache':>10} {'x HF (min..max)':>17} {'same tokens':>11}")
    common.say(f"timing: {bc.repeats} interleaved rounds per cell; tok/s are medians, x HF the median "
               f"per-round ratio")
    common.say(header)
    common.say("-" * len(header))
    for b in bc.batch_sizes:
        for ctx in bc.contexts:
            prompts = _prompts(rng, b, ctx - bc.new_tokens, cfg.vocab_size)
            toks = {}

            def ours(p=params_m, c=cfg, tag="f32"):
                tps, toks[tag] = bench_kv_cache(p, c, prompts, bc.new_tokens, mesh=mesh)
                return tps

            contenders = {"kv_cache": ours}
            ours()  # compile
            if params_bf is not None:
                contenders["bf16"] = functools.partial(ours, on_mesh(params_bf, cfg_bf), cfg_bf, "bf16")
                contenders["bf16"]()  # compile
            if hf_model is not None:
                def theirs():
                    tps, toks["hf"] = bench_hf(hf_model, prompts, bc.new_tokens)
                    return tps

                contenders["hf"] = theirs
            rounds = time_cell(contenders, bc.repeats)
            nocache = None
            if b <= bc.nocache_max_batch:
                nocache = max(bench_no_cache(params, cfg, prompts, ctx, bc.nocache_tokens) for _ in range(bc.repeats))
            kv = _median(rounds["kv_cache"])
            hf_tps = _median(rounds.get("hf", []))
            ratios = [o / h for o, h in zip(rounds["kv_cache"], rounds.get("hf", []))]
            same = None
            if "hf" in toks:
                # Greedy on random weights has near-ties; report agreement, do not require it.
                same = float(np.mean([a == h for a, h in zip(toks["f32"][0], toks["hf"][0])]))
            cell = {"batch": b, "context": ctx, "kv_cache": kv, "no_cache": nocache, "hf": hf_tps,
                    "speedup_vs_nocache": kv / nocache if nocache else None,
                    "speedup_vs_hf": _median(ratios), "speedup_vs_hf_spread": _spread(ratios),
                    "kv_cache_rounds": rounds["kv_cache"], "hf_rounds": rounds.get("hf"),
                    "bf16": _median(rounds.get("bf16", [])),
                    "flops_fraction": kv * decode_flops_per_token(cfg, ctx, bc.new_tokens),  # / peak below
                    "first_row_token_agreement": same}
            cells.append(cell)
            xhf = "-" if not ratios else f"{_median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})"
            common.say(f"{b:>5} {ctx:>7} | {_fmt(kv):>14} {_fmt(cell['bf16']):>10} {_fmt(nocache):>14} "
                       f"{_fmt(hf_tps):>10} | {(f'{kv / nocache:.1f}x' if nocache else '-'):>10} {xhf:>17} "
                       f"{('-' if same is None else f'{100 * same:.0f}%'):>11}")
    group_cells = []
    if bc.group > 1 and 64 in bc.batch_sizes:
        # RL's shape: batch 64 as 64/G prompts x G samples. Ours stores each prompt's cache once;
        # HF's num_return_sequences expands it G times.
        for ctx in bc.contexts:
            prompts = _prompts(rng, 64 // bc.group, ctx - bc.new_tokens, cfg.vocab_size)
            contenders = {"kv_cache": lambda: bench_kv_cache(params_m, cfg, prompts, bc.new_tokens, bc.group, mesh)[0]}
            contenders["kv_cache"]()  # compile
            if hf_model is not None:
                contenders["hf"] = lambda: bench_hf(hf_model, prompts, bc.new_tokens, bc.group)[0]
            rounds = time_cell(contenders, bc.repeats)
            ratios = [o / h for o, h in zip(rounds["kv_cache"], rounds.get("hf", []))]
            group_cells.append({"batch": 64, "group": bc.group, "context": ctx, "kv_cache": _median(rounds["kv_cache"]),
                                "hf": _median(rounds.get("hf", [])), "speedup_vs_hf": _median(ratios),
                                "speedup_vs_hf_spread": _spread(ratios)})
            xhf = "-" if not ratios else f"{_median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})"
            common.say(f"{f'{64 // bc.group}x{bc.group}':>5} {ctx:>7} | {_fmt(group_cells[-1]['kv_cache']):>14} "
                       f"{'-':>10} {'-':>14} {_fmt(group_cells[-1]['hf']):>10} | {'-':>10} {xhf:>17} {'-':>11}")
        common.say(f"(rows {64 // bc.group}x{bc.group}: {64 // bc.group} prompts x {bc.group} samples at temperature 1; "
                   f"HF with num_return_sequences={bc.group})")
    if tmp is not None:
        tmp.cleanup()
    peaks.append(peak_matmul_flops())
    peak = max(peaks)
    for c in cells:
        c["flops_fraction"] = c["flops_fraction"] / peak

    def pick(batch, key, context=bc.headline_context):
        for c in cells:
            if c["batch"] == batch and c["context"] == context:
                return c[key]
        return None

    load_end = os.getloadavg()[0]
    summary = {
        "tokens_per_s_b1": pick(1, "kv_cache"),
        "tokens_per_s_b64": pick(64, "kv_cache"),
        "speedup_vs_nocache_512": pick(1, "speedup_vs_nocache", 512),
        "speedup_vs_hf_b1": pick(1, "speedup_vs_hf"),
        "speedup_vs_hf_b64": pick(64, "speedup_vs_hf"),
        "speedup_vs_hf_b1_spread": pick(1, "speedup_vs_hf_spread"),
        "speedup_vs_hf_b64_spread": pick(64, "speedup_vs_hf_spread"),
        "flops_fraction_b64": pick(64, "flops_fraction"),
        "peak_gflops": peak / 1e9,
        "headline_context": bc.headline_context,
        "new_tokens": bc.new_tokens,
        "repeats": bc.repeats, "devices": jax.device_count(),
        "hf_threads": bc.hf_threads or None,
        "n_params": n_params,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "bf16_tokens_per_s_b64": pick(64, "bf16"),
        "group": bc.group,
        "speedup_vs_hf_group": next((c["speedup_vs_hf"] for c in group_cells if c["context"] == bc.headline_context),
                                    None),
        "group_cells": group_cells,
        **bf16,
        "cells": cells,
    }
    common.say(f"peak float32 matmul {peak / 1e9:.1f} GFLOP/s (best of the runs before and after the table); "
               f"load average {load_start:.2f} at start, {load_end:.2f} at end")
    targets = [("kv cache >= 10x no cache at 512 (batch 1)", summary["speedup_vs_nocache_512"], 10.0)]
    for b in (1, 64):
        for ctx in (512, 1024):
            targets.append((f"kv cache >= 2x transformers at batch {b}, context {ctx}",
                            pick(b, "speedup_vs_hf", ctx), 2.0))
    targets.append(("batch 64 at >= 20% of the matmul peak", summary["flops_fraction_b64"], 0.2))
    for name, got, want in targets:
        verdict = "not measured" if got is None else ("met" if got >= want else "MISSED")
        common.say(f"target: {name}: {verdict}" + ("" if got is None else f" ({got:.2f})"))
    summary["targets_met"] = all(got is not None and got >= want for _, got, want in targets)
    return summary


def define_flags() -> None:
    flags.DEFINE_list("batch_sizes", ["1", "64"], "batch sizes")
    flags.DEFINE_list("contexts", ["128", "256", "512", "1024"], "window lengths at the last token")
    flags.DEFINE_integer("new_tokens", 32, "tokens decoded per measurement")
    flags.DEFINE_integer("nocache_tokens", 8, "tokens decoded by the (slow) no-cache baseline")
    flags.DEFINE_integer("nocache_max_batch", 1, "run the no-cache baseline only up to this batch size")
    flags.DEFINE_integer("headline_context", 512, "context of the tokens_per_s / speedup_vs_hf numbers")
    flags.DEFINE_bool("hf", True, "also time transformers generate on the same weights")
    flags.DEFINE_integer("hf_threads", 0, "torch threads for transformers (0 = torch's default)")
    flags.DEFINE_integer("repeats", 3, "interleaved timing rounds per cell (medians and min..max reported)")
    flags.DEFINE_bool("bf16", False, "also time our engine with bfloat16 weights and KV cache and report "
                      "its logit difference to float32")
    flags.DEFINE_enum("arch", "llama", ["llama", "qwen2"], "model family shape (both export to HF)")
    flags.DEFINE_integer("vocab_size", 4096, "vocabulary size")
    flags.DEFINE_integer("d_model", 256, "model width")
    flags.DEFINE_integer("n_layers", 4, "layers")
    flags.DEFINE_integer("n_heads", 4, "query heads")
    flags.DEFINE_integer("n_kv_heads", 2, "key/value heads")
    flags.DEFINE_integer("d_ff", 768, "MLP width")
    flags.DEFINE_integer("seed", 0, "seed for weights and prompts")
    flags.DEFINE_integer("group", 8, "also time batch 64 as 64/G prompts x G samples (RL's shape) vs HF "
                         "num_return_sequences (1 = skip)")


def _ints(values, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{flag} must be a comma-separated list of integers, got {values}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    F = flags.FLAGS
    bc = BenchConfig(batch_sizes=_ints(F.batch_sizes, "batch_sizes"), contexts=_ints(F.contexts, "contexts"),
                     new_tokens=F.new_tokens, nocache_tokens=F.nocache_tokens, nocache_max_batch=F.nocache_max_batch,
                     headline_context=F.headline_context, hf=F.hf, hf_threads=F.hf_threads, repeats=F.repeats,
                     bf16=F.bf16, arch=F.arch,
                     vocab_size=F.vocab_size, d_model=F.d_model, n_layers=F.n_layers, n_heads=F.n_heads,
                     n_kv_heads=F.n_kv_heads, d_ff=F.d_ff, seed=F.seed, group=F.group)
    t0 = time.time()
    summary = run(bc)
    summary["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x),
          flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(common.cli(main))
