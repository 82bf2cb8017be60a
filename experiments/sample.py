"""Completes prompts with a trained model (through the inference engine, core/sampling.py).

    python -m experiments.sample --out_dir=runs/tiny --prompt="Letiam Waiconhusk" --n_samples=3
    python -m experiments.sample --out_dir=runs/tiny --prompts_file=prompts.txt --temperature=0.7 --top_k=50
    python -m experiments.sample --out_dir=path/to/Qwen2.5-0.5B --prompt="The capital of France is"

--out_dir is a zipchat run directory or a Hugging Face checkpoint directory (config.json,
safetensors, tokenizer.json, tokenizer_config.json). Each prompt is fed after the BOS every
training document starts with (<|endoftext|>; a Hugging Face tokenizer's bos_token when it has
one, e.g. Llama 3's <|begin_of_text|>), so the model continues it as the start of a document; a
sample ends at the next end-of-text token or after --max_new_tokens.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Sequence

from absl import app, flags

from experiments import common


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    out_dir: str
    prompts: tuple[str, ...]
    n_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    step: Optional[int] = None
    mesh: str = "data:-1"
    dtype: str = "float32"

    def __post_init__(self):
        common.check_inference_dtype(self.dtype)
        if not self.prompts:
            raise ValueError("give at least one --prompt (or --prompts_file)")
        if self.n_samples < 1:
            raise ValueError(f"--n_samples must be >= 1, got {self.n_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")


def run(cfg: SampleConfig, loaded=None, verbose: bool = True) -> list[list[str]]:
    """Samples cfg.n_samples continuations of every prompt; returns [prompt][sample] texts.

    `loaded`: optional common.LoadedModel (common.load_for_inference), or a (tokenizer,
    model_cfg, params, step) tuple from common.load_model, to reuse a model already in memory.
    """
    from core import sharding as sharding_lib

    mesh = sharding_lib.make_mesh(cfg.mesh)
    loaded = loaded or common.load_for_inference(cfg.out_dir, mesh=mesh, step=cfg.step, dtype=cfg.dtype)
    if isinstance(loaded, common.LoadedModel):
        tokenizer, model_cfg, params, step, template = (loaded.tokenizer, loaded.cfg, loaded.params, loaded.step,
                                                         loaded.template)
        kind = f" | {loaded.kind} ({loaded.stage})"
    else:
        (tokenizer, model_cfg, params, step), template, kind = loaded, None, ""
    outs = common.sample_texts(params, model_cfg, tokenizer, list(cfg.prompts), n_samples=cfg.n_samples,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, mesh=mesh, template=template)
    if verbose:
        knobs = f"temperature {cfg.temperature}, top_k {cfg.top_k or 'off'}, top_p {cfg.top_p}"
        common.say(f"checkpoint {cfg.out_dir} step {step}{kind} | {knobs}")
        for p, samples in zip(cfg.prompts, outs):
            for i, s in enumerate(samples):
                common.say(f"--- prompt {p!r}, sample {i + 1}/{len(samples)}")
                common.say(common.visible(p + s))
    return outs


def define_flags() -> None:
    common.define_common_flags()
    flags.DEFINE_multi_string("prompt", [], "prompt text (repeatable)")
    flags.DEFINE_string("prompts_file", None, "file with one prompt per line")
    flags.DEFINE_integer("n_samples", 1, "samples per prompt")
    flags.DEFINE_float("temperature", 1.0, "0 = greedy")
    flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = off)")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
    flags.DEFINE_integer("max_new_tokens", 64, "tokens per sample")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_enum("dtype", "float32", list(common.INFERENCE_DTYPES), "weights and KV cache for sampling (bfloat16 is "
                      "for accelerators; python -m experiments.bench_decode --bf16 reports its logit difference)")


def _read_prompts(prompts: Sequence[str], prompts_file: Optional[str]) -> tuple[str, ...]:
    # A literal backslash-n in a prompt stands for a newline (shells make real ones awkward).
    out = [p.replace("\\n", "\n") for p in prompts]
    if prompts_file:
        p = pathlib.Path(prompts_file)
        if not p.is_file():
            raise ValueError(f"--prompts_file: {p} does not exist")
        out += [line.rstrip("\n").replace("\\n", "\n") for line in p.read_text().splitlines() if line.strip()]
    return tuple(out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    F = flags.FLAGS
    common.require_out_dir(F.out_dir)
    run(SampleConfig(out_dir=F.out_dir, prompts=_read_prompts(F.prompt, F.prompts_file), n_samples=F.n_samples,
                     temperature=F.temperature, top_k=F.top_k, top_p=F.top_p, max_new_tokens=F.max_new_tokens,
                     seed=F.seed, step=F.step, mesh=F.mesh, dtype=F.dtype))


if __name__ == "__main__":
    define_flags()
    app.run(common.cli(main))
