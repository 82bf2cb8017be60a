"""Shared plumbing for the experiment scripts: common flags, metrics logging, progress lines,
PNG plots, and loading a run directory (tokenizer + model config + orbax checkpoints).

A run directory (`--out_dir`) holds::

    tokenizer.zipchat.json   the tokenizer (core.tokenizer.save)
    model_config.json        core.model.ModelConfig as JSON
    config.json              the options the run was started with (--config=RUN/config.json reruns it)
    checkpoints/<step>/      orbax checkpoints (core.checkpoint)
    metrics.jsonl            one JSON object per train step
    evals.jsonl              one JSON object per evaluation
    plots/*.png, samples.txt, report.md
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
import unicodedata
from typing import Any, Iterable, Mapping, Optional, Sequence

from absl import flags

TOKENIZER_FILE = "tokenizer.zipchat.json"
MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "config.json"  # the options that reproduce the run (experiments/options.py)
LEGACY_RUN_CONFIG_FILE = "run_config.json"  # its name before 2026-12
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVALS_FILE = "evals.jsonl"


# ----------------------------------------------------------------------------- flags


def define_common_flags(default_preset: str = "tiny", default_out_dir: Optional[str] = None) -> None:
    """--preset, --mesh, --out_dir, --seed. Idempotent, so scripts that import each other agree."""
    if "preset" in flags.FLAGS:
        return
    flags.DEFINE_string("preset", default_preset, "model size preset (core.model.PRESETS)")
    flags.DEFINE_string("mesh", "data:-1", "device mesh, e.g. 'data:2,fsdp:2,tensor:2'; -1 = the rest")
    flags.DEFINE_string("out_dir", default_out_dir, "run directory: checkpoints, metrics, plots")
    flags.DEFINE_integer("seed", 0, "seed for params, data order and sampling")


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def use_cpu_cores_as_devices(n: int = 0) -> int:
    """Makes XLA:CPU expose n host devices; 0 = auto: one per core, rounded down to a power of
    two and capped at 8 (the presets' batch sizes are powers of two, and every data-parallel
    batch must divide by the device count). Returns the CPU device count in effect.

    Why: XLA:CPU runs a batched matmul whose items are small (decode attention: a [2 x 64] x
    [64 x S] product per row and kv head) on one thread, so batch-64 decode left a core idle for
    most of its step. With one device per core and the rows split over them (the scripts' default
    mesh, data:-1), each core decodes its own rows (core.sampling runs one loop per device) and
    trains on its share of the batch. Measured on the 2-core machine (README): decode at batch 64
    1.5x faster, an RL step 1.17x, pretraining the same or slightly faster, identical losses.
    Must run before jax's backends start; a count already forced through XLA_FLAGS (the tests'
    8 fake devices) wins."""
    import jax

    if n < 0:
        raise ValueError(f"--cpu_devices must be >= 0 (0 = one per core, up to 8), got {n}")
    want = n if n > 0 else 1 << (min(cpu_cores(), 8).bit_length() - 1)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", want)
        except RuntimeError:  # a backend already started (a script used jax at import): keep it
            pass
    return len(jax.devices("cpu"))


_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def reexec_with_tuned_malloc() -> None:
    """Re-runs this process (same interpreter, same command line) with glibc's malloc backing
    large blocks by transparent huge pages, unless that is already so; returns where it does not.

    Why: XLA:CPU (and PyTorch's CPU allocator) get every large step buffer from mmap, so each
    step page-faults its buffers in afresh, 4 KiB at a time. Measured in the main job: 175M minor
    page faults and a fifth of its CPU time in the kernel; with the tunable, a 80-step `tiny`
    pretraining run went from 9.0M faults and 28.8 s of system time to 0.21M and 16.4 s, same
    losses. glibc reads tunables only at process start, hence the exec; nothing has run yet when
    `cli` calls this (before jax starts). Skipped off glibc Linux, where transparent huge pages
    are off, when ZIPCHAT_MALLOC_TUNED is set (the re-run itself), and with --notune_malloc.
    """
    import platform

    tun = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tun or os.environ.get("ZIPCHAT_MALLOC_TUNED"):
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return
    if "[never]" in thp:
        return
    env = dict(os.environ, ZIPCHAT_MALLOC_TUNED="1", GLIBC_TUNABLES=":".join(x for x in (tun, _MALLOC_TUNABLE) if x))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


class _DropReadOnlyNotice:
    """orbax warns 'Given directory is read only' on every read-only checkpoint manager, i.e. on
    every model load for sampling, chat or evaluation: expected, and noise for a user."""

    def filter(self, record) -> bool:
        return "Given directory is read only" not in record.getMessage()


def quiet_logging() -> None:
    """Keeps absl INFO chatter (orbax logs every checkpoint write) out of the progress output."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for handler in [absl_logging.get_absl_handler(), *logging.getLogger().handlers]:
        handler.addFilter(_DropReadOnlyNotice())
    logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


def require_out_dir(out_dir: Optional[str], flag: str = "--out_dir") -> pathlib.Path:
    if not out_dir:
        raise ValueError(f"{flag} is required")
    return pathlib.Path(out_dir)


# ----------------------------------------------------------------------------- JSONL metrics


def read_jsonl(path) -> list[dict]:
    """All records of a JSONL file ([] if it does not exist); a torn last line is skipped."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a process killed mid-write leaves one partial line at the end
    return out


def truncate_jsonl(path, max_step: int) -> None:
    """Keeps only records with step <= max_step: after a resume from `max_step`, the steps the
    killed run logged past its last checkpoint are redone and must not appear twice."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= max_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


class MetricsLogger:
    """Appends one JSON object per `log` call to a JSONL file, flushed at once (so a killed run
    loses at most the line being written). Only process 0 writes."""

    def __init__(self, path, enabled: bool = True):
        self.path = pathlib.Path(path)
        self.enabled = enabled
        self._f = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: Mapping[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- progress and MFU

# Dense peak FLOP/s per device (bf16 for accelerators), by a substring of jax's device_kind.
_PEAK_FLOPS = (
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12),
    ("v3", 123e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12),
    ("a10", 125e12), ("4090", 165e12), ("3090", 71e12),
)
# A CPU core with two AVX2 FMA units at ~3 GHz: 2 units x 8 fp32 lanes x 2 flops x 3e9.
_CPU_CORE_FLOPS = 96e9


def peak_flops_total(devices: Sequence[Any]) -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together, description). CPU devices (real or fake) share
    the host's cores, so their peak is the host's, however many devices jax shows."""
    if not devices:
        raise ValueError("no devices")
    d = devices[0]
    if d.platform == "cpu":
        cores = cpu_cores()
        return cores * _CPU_CORE_FLOPS, f"cpu x{cores} cores (estimated peak)"
    kind = str(getattr(d, "device_kind", "")).lower()
    for key, flops in _PEAK_FLOPS:
        if key in kind:
            return flops * len(devices), f"{len(devices)} x {d.device_kind}"
    return float("nan"), f"{len(devices)} x {d.device_kind} (unknown peak)"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """Throughput, MFU and ETA from wall-clock step times; formats one progress line.

    The first step (compilation) and steps right after a pause (evals, saves) are excluded from
    the rate via `pause()`, so tokens/s reflects training alone.
    """

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float,
                 peak_flops: float, start_step: int = 0, window: int = 20):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.start_step = start_step
        self.window = window
        self._times: list[float] = []  # seconds per step, most recent last
        self._last: Optional[float] = None
        self.t0 = time.time()

    def pause(self) -> None:
        """Call after non-training work: the next step's time is not counted."""
        self._last = None

    def tick(self) -> Optional[float]:
        """Call once per finished step; returns this step's seconds (None if not timed)."""
        now = time.time()
        dt = None if self._last is None else now - self._last
        if dt is not None:
            self._times = (self._times + [dt])[-self.window:]
        self._last = now
        return dt

    @property
    def step_time(self) -> float:
        return sum(self._times) / len(self._times) if self._times else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time if self._times else float("nan")

    @property
    def mfu(self) -> float:
        return self.tokens_per_s * self.flops_per_token / self.peak_flops

    def eta(self, step: int) -> float:
        return (self.total_steps - step) * self.step_time

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        """'step 120/600 | loss 3.2140 | lr 1.20e-03 | gnorm 0.830 | 12.3k tok/s | MFU 4.1% | ETA 2m13s'."""
        parts = [f"step {step}/{self.total_steps}"]
        if "loss" in metrics:
            parts.append(f"loss {float(metrics['loss']):.4f}")
        if "lr" in metrics:
            parts.append(f"lr {float(metrics['lr']):.2e}")
        if "grad_norm" in metrics:
            parts.append(f"gnorm {float(metrics['grad_norm']):.3f}")
        tps = self.tokens_per_s
        parts.append(f"{_si(tps)} tok/s" if math.isfinite(tps) else "- tok/s")
        mfu = self.mfu
        parts.append(f"MFU {100 * mfu:.1f}%" if math.isfinite(mfu) else "MFU -")
        parts.append(f"ETA {format_duration(self.eta(step))}")
        return " | ".join(parts)


_BIDI = {"\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"}


def visible(text: str) -> str:
    """`text` for the terminal: control characters (but newline and tab) and bidirectional
    overrides shown as escapes (ESC -> \\x1b, U+202E -> \\u202e); everything else unchanged."""
    if text.isprintable() and "\x7f" not in text:  # the common case, in C
        return text
    out = []
    for ch in text:
        if ch in "\n\t" or not (unicodedata.category(ch) == "Cc" or ch in _BIDI):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


def say(*args, **kwargs) -> None:
    """print() on process 0 only, flushed (progress must show in CI logs and pipes)."""
    import jax

    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()


# ----------------------------------------------------------------------------- plots


def plot_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
                title: str = "", xlabel: str = "step", ylabel: str = "", logy: bool = False) -> pathlib.Path:
    """Writes one PNG with a line per series: {label: (xs, ys)}. Empty series are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, (xs, ys) in series.items():
        if len(xs):
            ax.plot(list(xs), list(ys), label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metric(records: Iterable[Mapping[str, Any]], key: str, path, *, x: str = "step",
                title: str = "", smooth: int = 1) -> Optional[pathlib.Path]:
    """Plots `key` against `x` from JSONL records (records without `key` skipped); optional
    trailing moving average over `smooth` points. Returns None when there is nothing to plot."""
    pts = [(float(r[x]), float(r[key])) for r in records if key in r and x in r
           and isinstance(r[key], (int, float))]
    if not pts:
        return None
    xs, ys = zip(*pts)
    series = {key: (xs, ys)}
    if smooth > 1 and len(ys) > smooth:
        avg = [sum(ys[max(0, i - smooth + 1): i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))]
        series[f"{key} (avg {smooth})"] = (xs, avg)
    return plot_curves(series, path, title=title or key, ylabel=key)


# ----------------------------------------------------------------------------- run directories


def model_config_to_json(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def model_config_from_json(d: Mapping[str, Any]):
    from core import model as model_lib

    from core import hf

    hf.check_model_config_json(d, "model config")
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple(d["rope_scaling"])
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"model config has unknown field(s) {unknown}")
    return model_lib.ModelConfig(**d)


def save_json(path, obj: Any) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_json(path, what: str = "file") -> Any:
    from core import hf

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return hf.read_json_object(path)  # bounded size and depth; a JSON object
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def load_run_config(out_dir) -> dict:
    """A run directory's saved options (config.json, or run_config.json of older runs)."""
    out_dir = pathlib.Path(out_dir)
    path = out_dir / RUN_CONFIG_FILE
    if not path.exists() and (out_dir / LEGACY_RUN_CONFIG_FILE).exists():
        path = out_dir / LEGACY_RUN_CONFIG_FILE
    return load_json(path, "run config")


def world_spec(run_dir) -> Optional[str]:
    """The `synthetic:...` data spec of the world a run was trained on: its config.json's
    world_data or data, else its base run's (config.json "base", followed down the chain);
    None for runs on other data, Hugging Face checkpoints and directories without a config."""
    run_dir = pathlib.Path(run_dir)
    if is_hf_checkpoint(run_dir) or not (run_dir / RUN_CONFIG_FILE).is_file() and \
            not (run_dir / LEGACY_RUN_CONFIG_FILE).is_file():
        return None
    cfg = load_run_config(run_dir)
    spec = cfg.get("world_data") or cfg.get("data")
    if isinstance(spec, str) and spec.startswith("synthetic"):
        return spec
    return world_spec(cfg["base"]) if cfg.get("base") else None


def load_model_config(out_dir):
    """The ModelConfig a run was trained with (out_dir/model_config.json)."""
    out_dir = pathlib.Path(out_dir)
    return model_config_from_json(load_json(out_dir / MODEL_CONFIG_FILE, "model config"))


def load_tokenizer(out_dir_or_file):
    """Tokenizer from a run directory, a tokenizer directory or a tokenizer file."""
    from core import tokenizer as tok_lib

    p = pathlib.Path(out_dir_or_file)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path not found: {p}")
    return tok_lib.load(p)


def tokenizer_sha256(tokenizer) -> str:
    """A fingerprint of a tokenizer's vocabulary, merges, pattern and special tokens; a run
    records it (config.json) so that a tokenizer swapped in later is caught at load."""
    import hashlib

    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()


def check_tokenizer_belongs(out_dir, tokenizer) -> None:
    """ValueError when out_dir's config.json records another tokenizer than the one in it (a
    re-run that replaced tokenizer.zipchat.json, a file copied from another run)."""
    path = pathlib.Path(out_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return
    want = load_json(path, "run config").get("tokenizer_sha256")
    if want and want != tokenizer_sha256(tokenizer):
        raise ValueError(f"{pathlib.Path(out_dir) / TOKENIZER_FILE} is not the tokenizer this model was trained "
                         f"with (its fingerprint differs from {path}'s tokenizer_sha256); the run directory's "
                         f"parts do not belong together")


def load_model(out_dir, *, mesh=None, step: Optional[int] = None):
    """Loads (tokenizer, cfg, params, step) from a run directory, params only (no optimizer state).

    Args:
      out_dir: a run directory written by experiments/pretrain.py (or any script with the same
        layout), or a Hugging Face checkpoint directory (step 0).
      mesh: target mesh for the params (default: all devices on a 'data' axis: replicated).
      step: checkpoint step (default: the latest complete one).
    """
    from core import checkpoint as ck
    from core import model as model_lib
    from core import sharding as sharding_lib

    out_dir = pathlib.Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {out_dir}")
    if is_hf_checkpoint(out_dir):
        if step not in (None, 0):
            raise ValueError(f"--step={step}: {out_dir} is a Hugging Face checkpoint, which has one state (step 0)")
        return _load_hf_dir(out_dir, mesh)
    cfg = load_model_config(out_dir)
    tokenizer = load_tokenizer(out_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer in {out_dir} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}: they do not belong together")
    check_tokenizer_belongs(out_dir, tokenizer)
    mesh = mesh if mesh is not None else sharding_lib.make_mesh("data:-1")
    shardings = sharding_lib.model_shardings(cfg, mesh)
    target = {"params": ck.abstract_state(model_lib.param_shapes(cfg), shardings)}
    with ck.make_manager(out_dir / CHECKPOINT_DIR, read_only=True) as mngr:
        step = ck.latest_step(mngr) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {out_dir / CHECKPOINT_DIR}")
        state, _, _ = ck.restore(mngr, target, step=step, with_data=False, partial=True,
                                 expected_meta={"model_config": model_config_to_json(cfg)})
    return tokenizer, cfg, state["params"], step


# Stages whose output is a chat model (config.json "stage"; experiments/sft.py writes "sft").
CHAT_STAGES = frozenset({"sft", "rl", "rlhf", "dpo", "honesty"})
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 may save the template
HF_GENERATION_CONFIG = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample, chat with or fine-tune (`load_for_inference`).

    tokenizer, template (core.chat.ChatTemplate, None when the tokenizer has no chat format),
    cfg, params, step (0 for a Hugging Face checkpoint);
    stage: what made it: config.json's "stage" ('pretrain' when absent), or 'hf';
    kind: 'chat-tuned' or 'base';
    why: how kind was decided, one phrase (shown in the chat banner);
    path: the directory.
    """

    tokenizer: Any
    template: Any
    cfg: Any
    params: Any
    step: int
    stage: str
    kind: str
    why: str
    path: str

    @property
    def chat_tuned(self) -> bool:
        return self.kind == "chat-tuned"


def is_hf_checkpoint(path) -> bool:
    """A Hugging Face checkpoint directory (config.json + safetensors), not a zipchat run."""
    p = pathlib.Path(path)
    return (p / "config.json").is_file() and not (p / MODEL_CONFIG_FILE).is_file() and (
        (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file())


def _load_hf_dir(path: pathlib.Path, mesh):
    """(tokenizer, cfg, params, 0) from a Hugging Face checkpoint directory."""
    from core import hf
    from core import sharding as sharding_lib

    if not any((path / n).is_file() for n in ("tokenizer.json", TOKENIZER_FILE)):
        raise FileNotFoundError(f"{path} is a Hugging Face checkpoint without tokenizer.json")
    tokenizer = load_tokenizer(path)
    params, cfg = hf.load_checkpoint(path, mesh=mesh if mesh is not None else sharding_lib.make_mesh("data:-1"))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer in {path} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}: they do not belong together")
    return tokenizer, cfg, params, 0


def load_hf_tokenizer_config(path) -> Optional[dict]:
    """A directory's tokenizer_config.json with `chat_template` filled from chat_template.jinja
    when the template lives there; None without tokenizer_config.json."""
    path = pathlib.Path(path)
    if not (path / HF_TOKENIZER_CONFIG).is_file():
        return None
    config = load_json(path / HF_TOKENIZER_CONFIG, "tokenizer config")
    if not isinstance(config, dict):
        raise ValueError(f"{path / HF_TOKENIZER_CONFIG}: expected a JSON object")
    if not config.get("chat_template") and (path / HF_CHAT_TEMPLATE_FILE).is_file():
        config["chat_template"] = (path / HF_CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return config


def load_template(path, tokenizer):
    """The chat template of a run or checkpoint directory: the Hugging Face Jinja template when the
    directory has a tokenizer_config.json with one (HF checkpoints, and runs fine-tuned from them,
    which copy that file), else zipchat's; None when the tokenizer has neither format's tokens."""
    from core import chat as chat_lib

    path = pathlib.Path(path)
    config = load_hf_tokenizer_config(path)
    if config is not None and config.get("chat_template"):
        gen = path / HF_GENERATION_CONFIG
        return chat_lib.hf_template(tokenizer, config, name=path.name or str(path),
                                    generation_config=load_json(gen, "generation config") if gen.is_file() else None)
    try:
        return chat_lib.zipchat_template(tokenizer)
    except KeyError:
        return None


def checkpoint_kind(path, template) -> tuple[str, str, str]:
    """(stage, kind, why) of a run or checkpoint directory: kind is 'chat-tuned' or 'base'.

    A zipchat run is chat-tuned when its config.json says "stage" is one of CHAT_STAGES (SFT
    writes "sft"); a run without a stage is a pretraining run. A Hugging Face checkpoint carries
    no such record; Instruct releases (Qwen2.5-*-Instruct, Llama-3.*-Instruct) end generation with
    their end-of-turn token, base releases with end-of-text, so eos_token == the template's
    end-of-turn token is read as chat-tuned.
    """
    path = pathlib.Path(path)
    if is_hf_checkpoint(path):
        eot = getattr(template, "end_of_turn", None)
        if template is not None and eot is not None and eot in template.eos_ids:
            return "hf", "chat-tuned", "Hugging Face checkpoint whose eos_token is its end-of-turn token"
        return "hf", "base", "Hugging Face checkpoint whose eos_token is not an end-of-turn token"
    try:
        stage = str(load_run_config(path).get("stage") or "pretrain")
    except FileNotFoundError:
        stage = "pretrain"
    if stage in CHAT_STAGES:
        return stage, "chat-tuned", f'config.json stage "{stage}"'
    return stage, "base", f'config.json stage "{stage}"'


INFERENCE_DTYPES = ("float32", "bfloat16")  # --dtype of sample and chat (core.sampling.for_inference)


def check_inference_dtype(dtype: str) -> None:
    """One-line error for a --dtype that inference does not support (before any loading)."""
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")


def load_for_inference(path, *, mesh=None, step: Optional[int] = None, dtype: str = "float32") -> LoadedModel:
    """A zipchat run directory or a Hugging Face checkpoint directory (config.json, safetensors,
    tokenizer.json, tokenizer_config.json) -> LoadedModel: what sample, chat, evaluate and the
    post-training stages need, with the chat template and whether the model is chat-tuned.
    dtype 'bfloat16' gives bfloat16 weights and KV cache (core.sampling.for_inference: for
    accelerators; slower than float32 on XLA:CPU)."""
    check_inference_dtype(dtype)
    path = pathlib.Path(path)
    tokenizer, cfg, params, step = load_model(path, mesh=mesh, step=step)
    if dtype != "float32":
        from core import sampling

        params, cfg = sampling.for_inference(params, cfg, dtype)
    template = load_template(path, tokenizer)
    stage, kind, why = checkpoint_kind(path, template)
    return LoadedModel(tokenizer=tokenizer, template=template, cfg=cfg, params=params, step=int(step),
                       stage=stage, kind=kind, why=why, path=str(path))


# ----------------------------------------------------------------------------- sampling


def sample_texts(params, cfg, tokenizer, prompts: Sequence[str], *, n_samples: int = 1,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, mesh=None, stop_at_eot: bool = True, template=None) -> list[list[str]]:
    """Continuations of text prompts through the inference engine (core/sampling.py).

    Each prompt is encoded after a BOS (<|endoftext|>, which also opens every training document;
    the template's bos_ids when it has some, e.g. Llama 3's <|begin_of_text|>); generation stops
    at the next <|endoftext|> (or the template's eos) when stop_at_eot.

    Returns:
      [len(prompts)][n_samples] decoded continuations (prompt not included, stop token dropped).
    """
    res = sample_tokens(params, cfg, tokenizer, prompts, n_samples=n_samples, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, mesh=mesh,
                        stop_at_eot=stop_at_eot, template=template)
    return [[tokenizer.decode(ids) for ids in row] for row in res]


def sample_tokens(params, cfg, tokenizer, prompts: Sequence[Any], *, n_samples: int = 1,
                  max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, mesh=None, stop_at_eot: bool = True,
                  keep_stop: bool = False, template=None) -> list[list[list[int]]]:
    """Like `sample_texts` but returns token ids: [prompt][sample] -> list of new ids.

    A prompt is a str (encoded after a BOS) or a sequence of token ids (used as is). The stop
    token (<|endoftext|>, or one of the template's eos_ids) is dropped from the result unless keep_stop.
    """
    import jax

    from core import sampling

    eot = tokenizer.eot_id
    bos = list(template.bos_ids) if template is not None and template.bos_ids else [eot]
    stops = tuple(dict.fromkeys([*(template.eos_ids if template is not None else ()), eot]))
    ids = [bos + tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    longest = max(len(p) for p in ids)
    if longest >= cfg.max_seq_len:
        raise ValueError(f"a prompt has {longest} tokens; the model's max_seq_len is {cfg.max_seq_len}")
    max_new_tokens = max(1, min(max_new_tokens, cfg.max_seq_len - longest))
    scfg = sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                   max_new_tokens=max_new_tokens, stop_ids=stops if stop_at_eot else ())
    res = sampling.generate(params, cfg, ids, scfg, jax.random.PRNGKey(seed), n_samples=n_samples, mesh=mesh)
    out: list[list[list[int]]] = [[] for _ in prompts]
    for r in range(len(res.lengths)):
        toks = res.row_tokens(r)
        if stop_at_eot and not keep_stop and toks and toks[-1] in stops:
            toks = toks[:-1]
        out[int(res.prompt_index[r])].append(toks)
    return out


# ----------------------------------------------------------------------------- entry points


def cli(main):
    """Wraps a script's absl `main` so that a user error (a ValueError or FileNotFoundError: bad
    flag, missing file, mismatched run directory) prints one line, `error: ...`, and exits with
    status 2 instead of a traceback; `--traceback` shows the traceback. Also gives every script
    --cpu_devices (`use_cpu_cores_as_devices`), applied before `main` starts jax, and first
    re-runs the process with huge-page malloc (--tune_malloc, `reexec_with_tuned_malloc`)."""
    if "traceback" not in flags.FLAGS:
        flags.DEFINE_bool("traceback", False, "on a user error, show the Python traceback too")
    if "tune_malloc" not in flags.FLAGS:
        flags.DEFINE_bool("tune_malloc", True, "re-run the script with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 "
                          "(large buffers on huge pages: far fewer page faults; see common.reexec_with_tuned_malloc)")
    if "cpu_devices" not in flags.FLAGS:
        flags.DEFINE_integer("cpu_devices", 0, "XLA:CPU host devices the default mesh (data:-1) splits rows over: "
                             "0 = one per core (a power of two, at most 8), 1 = a single device; ignored on "
                             "GPU/TPU and where XLA_FLAGS already forces a count")

    def wrapped(argv):
        if flags.FLAGS.tune_malloc:
            reexec_with_tuned_malloc()
        try:
            use_cpu_cores_as_devices(flags.FLAGS.cpu_devices)
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            if flags.FLAGS.traceback:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapped
