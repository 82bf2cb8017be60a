"""experiments/chat.py: a tiny run directory (tokenizer trained here + random model saved through
core/checkpoint.py), the non-interactive CLI, and the interactive commands driven in-process."""
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from core import chat as chat_lib
from core import checkpoint as ck
from core import model as model_lib
from core import sampling
from core import tokenizer as tok_lib
from experiments import chat as chat_cli
from experiments import common

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = ("The cat sat on the mat. The dog ate the bone. What is two plus two? Two plus two is four. "
        "Hello there, how are you today? I am fine, thank you. ") * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory laid out like experiments/pretrain.py writes it, with random weights."""
    out = tmp_path_factory.mktemp("chat_run")
    tok = tok_lib.train_bpe([TEXT], vocab_size=300)
    cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                max_seq_len=256, zero_init_out=False, init_std=0.5)
    params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    tok.save(out / common.TOKENIZER_FILE)
    common.save_json(out / common.MODEL_CONFIG_FILE, common.model_config_to_json(cfg))
    with ck.make_manager(out / common.CHECKPOINT_DIR, async_save=False) as mngr:
        ck.save(mngr, 7, {"params": params}, meta={"model_config": common.model_config_to_json(cfg)})
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    return common.load_model(run_dir)


def _expected_reply(loaded, messages, seed=0, turn=0, max_new=24):
    """What the engine itself produces for this conversation (greedy, tools off: their call tokens
    banned, as the CLI bans a tool it does not serve): the CLI must match it."""
    tok, cfg, params, _ = loaded
    ids = chat_lib.render_for_completion(tok, messages)
    sc = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new, stop_ids=chat_lib.assistant_stop_ids(tok),
                                 banned_ids=tuple(chat_lib.chat_tokens(tok).tool_start.values()))
    res = sampling.generate(params, cfg, [ids], sc, jax.random.fold_in(jax.random.PRNGKey(seed), turn))
    return res.row_tokens(0)


def test_prompt_mode_answers_from_checkpoint(run_dir, loaded, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")
    cmd = [sys.executable, "-m", "experiments.chat", f"--out_dir={run_dir}", "--prompt=What is two plus two?",
           "--temperature=0", "--max_new_tokens=24", "--tools=", f"--memory_file={tmp_path / 'mem.json'}",
           "--system=Be brief."]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want_ids = _expected_reply(loaded, [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is two plus two?"}])
    assert want_ids, "the model produced nothing"
    shown = io.StringIO()
    printer = chat_cli.StreamPrinter(loaded[0], shown)
    printer.push(want_ids)
    printer.finish()
    assert proc.stdout == shown.getvalue(), (proc.stdout, shown.getvalue())
    assert "tokens in context" in proc.stderr and "tok/s" in proc.stderr


def _session(loaded, tmp_path, **kw):
    cfg = chat_cli.ChatConfig(out_dir="unused", temperature=0.0, max_new_tokens=24, tools=(),
                              memory_file=str(tmp_path / "memory.json"), **kw)
    out, status = io.StringIO(), io.StringIO()
    return chat_cli.ChatSession(loaded, cfg, out=out, status=status), out, status


def test_memory_new_and_context(loaded, tmp_path):
    session, out, status = _session(loaded, tmp_path, system="Be kind.")
    lines = iter(["/remember my name is Ada", "/remember I like cats", "/memory", "hello", "/new", "hi", "/quit",
                  "never read"])
    chat_cli.interactive(session, read=lambda _: next(lines))
    mem = json.loads((tmp_path / "memory.json").read_text())
    assert mem == {"memories": ["my name is Ada", "I like cats"]}
    assert "1. my name is Ada\n2. I like cats" in out.getvalue()
    # Memories join the system message of the *new* chat; the first chat had none yet.
    system = session.messages[0]
    assert system["role"] == "system"
    assert system["content"] == "Be kind.\n\nThings to remember about the user:\n- my name is Ada\n- I like cats"
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]  # /new wiped "hello"
    assert session.messages[1]["content"] == "hi"
    # The reply is the engine's greedy answer for exactly that conversation (turn 1 of the session).
    want = _expected_reply(loaded, session.messages[:2], turn=1)
    assert session.messages[2] == chat_lib.parse_assistant(loaded[0], want)
    assert status.getvalue().count("tokens in context") == 2
    # A fresh session reads the bank back from the file and forgets on request.
    session2, out2, _ = _session(loaded, tmp_path)
    assert session2.memory.items == ["my name is Ada", "I like cats"]
    session2.command("/forget 1")
    assert json.loads((tmp_path / "memory.json").read_text()) == {"memories": ["I like cats"]}


def test_preset_few_shot_and_context_trimming(loaded, tmp_path):
    preset = tmp_path / "tutor.json"
    preset.write_text(json.dumps({"name": "tutor", "instructions": "You teach.",
                                  "examples": [{"user": "2+2?", "assistant": "4."}]}))
    session, out, status = _session(loaded, tmp_path, preset_file=str(preset))
    assert session.messages == [{"role": "system", "content": "You teach."}, {"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4."}]
    # Long turns overflow the 256-token context: old turns are dropped, the preset never is.
    for i in range(4):
        stats = session.ask("The cat sat on the mat. " * 6 + f"turn {i}")
        assert stats["context_tokens"] <= 256
    assert session.messages[:3][0]["content"] == "You teach." and session.messages[1]["content"] == "2+2?"
    assert "old messages dropped" in status.getvalue()
    assert session.messages[-2]["content"].endswith("turn 3")
    with pytest.raises(ValueError, match="does not fit"):
        session.ask("cat " * 400)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"examples": [{"user": "x"}]}))
    with pytest.raises(ValueError, match="preset_file"):
        chat_cli.load_preset(bad)


def test_tool_calls_show_inline(loaded, tmp_path):
    """The printer renders a calculator call and its output the way the engine feeds them."""
    tok = loaded[0]
    out = io.StringIO()
    printer = chat_cli.StreamPrinter(tok, out)
    ids = (tok.encode("Let me see.") + chat_lib.render_tool_call(tok, "calculator", "17*23")
           + chat_lib.render_tool_output(tok, "391") + tok.encode(" It is 391.") + [tok.special_id("<|im_end|>")])
    for i in range(0, len(ids), 3):  # chunks, as generate's on_tokens delivers them
        printer.push(ids[i:i + 3])
    printer.finish()
    assert out.getvalue() == "Let me see.[calculator: 17*23 -> 391] It is 391.\n"


def test_session_runs_a_calculator_call(loaded, tmp_path):
    """A scripted model (bigram table) that answers every question with <calc>2+3</calc>: the
    session runs core/tools' calculator, streams the call and its output, and stores the reply
    as tool_call + tool_output parts."""
    from tests.test_sampling import bigram_model

    tok = loaded[0]
    t = chat_lib.chat_tokens(tok)
    call = [t.im_sep, t.tool_start["calculator"], *tok.encode("2+3"), t.tool_end["calculator"]]
    assert len(call) == 6, "2+3 should be three tokens"
    nxt = dict(zip(call, call[1:]))
    nxt[t.output_end] = t.im_end
    cfg, params = bigram_model(nxt, tok.vocab_size)
    cfg_chat = chat_cli.ChatConfig(out_dir="unused", temperature=0.0, max_new_tokens=24, tools=("calculator",),
                                   memory_file=str(tmp_path / "memory.json"))
    out, status = io.StringIO(), io.StringIO()
    session = chat_cli.ChatSession((tok, cfg, params, 0), cfg_chat, out=out, status=status)
    stats = session.ask("What is 2+3?")
    assert out.getvalue() == "[calculator: 2+3 -> 5]\n"
    assert stats["tool_calls"] == [{"name": "calculator", "input": "2+3", "output": "5", "position": 4}]
    assert stats["finish_reason"] == "stop"
    assert session.messages[-1] == {"role": "assistant", "content": [
        {"type": "tool_call", "tool": "calculator", "text": "2+3"}, {"type": "tool_output", "text": "5"}]}


def test_tools_off_are_banned_and_search_needs_the_world(loaded, tmp_path):
    """A tool the session does not serve cannot be called (its start token is banned); search
    (the synthetic world's documents) is refused for a model that has no world."""
    session, _, _ = _session(loaded, tmp_path)
    t = chat_lib.chat_tokens(loaded[0])
    assert set(session.sampling_cfg.banned_ids) == set(t.tool_start.values())
    cfg = chat_cli.ChatConfig(out_dir="unused", temperature=0.0, max_new_tokens=4, tools=("calculator",),
                              memory_file=str(tmp_path / "memory.json"))
    banned = chat_cli.ChatSession(loaded, cfg, out=io.StringIO(), status=io.StringIO()).sampling_cfg.banned_ids
    assert t.tool_start["calculator"] not in banned and t.tool_start["search"] in banned
    cfg = dataclasses.replace(cfg, tools=("search",))
    with pytest.raises(ValueError, match="synthetic world"):
        chat_cli.ChatSession(loaded, cfg, out=io.StringIO(), status=io.StringIO())


# ----------------------------------------------------------------------------- Hugging Face checkpoints, banner


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Two Hugging Face checkpoint directories with the same random Qwen2-shaped weights and a
    ChatML tokenizer (core/hf.py save_checkpoint + tokenizer.json + tokenizer_config.json): an
    "instruct" one (eos_token <|im_end|>, its end-of-turn token) and a "base" one (eos_token
    <|endoftext|>)."""
    from core import hf
    from tests import test_chat_template as tct

    tok_hf = tct.train_hf_tokenizer()
    cfg = model_lib.ModelConfig(vocab_size=tok_hf.get_vocab_size(), d_model=32, n_layers=2, n_heads=2,
                                n_kv_heads=1, d_ff=64, max_seq_len=256, qkv_bias=True, zero_init_out=False,
                                init_std=0.5)
    params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.PRNGKey(3), cfg)
    out = {}
    for name, eos in (("instruct", "<|im_end|>"), ("base", "<|endoftext|>")):
        d = tmp_path_factory.mktemp(f"hf_{name}")
        hf.save_checkpoint(params, cfg, d)
        tct.write_tokenizer_files(d, tok_hf, tct.QWEN25, {"eos_token": eos, "pad_token": "<|endoftext|>"})
        out[name] = d
    return out


def test_load_for_inference_reads_hf_checkpoints(hf_dirs):
    from core import hf

    ld = common.load_for_inference(hf_dirs["instruct"])
    params, cfg = hf.load_checkpoint(hf_dirs["instruct"])
    assert ld.cfg == cfg and ld.step == 0 and ld.stage == "hf"
    for a, b in zip(jax.tree_util.tree_leaves(ld.params), jax.tree_util.tree_leaves(params)):
        assert (a == b).all()
    assert ld.template.name == hf_dirs["instruct"].name and ld.template.tools is None
    assert ld.template.stop_ids[0] == ld.tokenizer.special_id("<|im_end|>")
    assert (ld.kind, common.load_for_inference(hf_dirs["base"]).kind) == ("chat-tuned", "base")
    # load_model (evaluate.py's loader) accepts the directory too.
    assert common.load_model(hf_dirs["base"])[1] == cfg


def test_sample_and_chat_accept_an_hf_checkpoint(hf_dirs, tmp_path):
    """`sample` and `chat --out_dir=<HF dir>` (which once failed with 'model config not found')
    answer in the checkpoint's own template, exactly what the engine gives in-process."""
    from experiments import sample as sample_cli

    ld = common.load_for_inference(hf_dirs["instruct"])
    tpl = ld.template
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")
    cmd = [sys.executable, "-m", "experiments.chat", f"--out_dir={hf_dirs['instruct']}", "--prompt=Hello there",
           "--temperature=0", "--max_new_tokens=12", f"--memory_file={tmp_path / 'mem.json'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = tpl.render_for_completion([{"role": "user", "content": "Hello there"}])
    sc = sampling.SamplingConfig(temperature=0.0, max_new_tokens=12, stop_ids=tpl.stop_ids)
    want = sampling.generate(ld.params, ld.cfg, [ids], sc, jax.random.fold_in(jax.random.PRNGKey(0), 0)).row_tokens(0)
    shown = io.StringIO()
    printer = chat_cli.StreamPrinter(ld.tokenizer, shown, tpl)
    printer.push(want)
    printer.finish()
    assert proc.stdout == shown.getvalue()
    assert "chat-tuned model" in proc.stderr and "tools off (the template has no tool tokens)" in proc.stderr
    # Qwen's template adds its default system prompt: the prompt really is the checkpoint's format.
    assert ld.tokenizer.decode(ids).startswith("<|im_start|>system\nYou are Qwen")

    texts = sample_cli.run(sample_cli.SampleConfig(out_dir=str(hf_dirs["base"]), prompts=("The cat",),
                                                   temperature=0.0, max_new_tokens=6), verbose=False)
    base = common.load_for_inference(hf_dirs["base"])
    assert texts == common.sample_texts(base.params, base.cfg, base.tokenizer, ["The cat"], max_new_tokens=6,
                                        temperature=0.0, template=base.template)


def test_banner_says_base_or_chat_tuned(run_dir, hf_dirs, tmp_path):
    def banner(loaded):
        session, out, _ = _session(loaded, tmp_path)
        chat_cli.interactive(session, read=lambda _: "/quit")
        return out.getvalue().splitlines()[0]

    base = banner(common.load_for_inference(run_dir))
    assert "BASE model, not chat-tuned" in base and "step 7" in base and "experiments/sft.py" in base
    # What experiments/sft.py writes into its run directory's config.json marks it chat-tuned.
    sft_dir = tmp_path / "sft_run"
    sft_dir.mkdir()
    for item in run_dir.iterdir():
        (sft_dir / item.name).symlink_to(item)
    common.save_json(sft_dir / common.RUN_CONFIG_FILE, {"stage": "sft"})
    tuned = banner(common.load_for_inference(sft_dir))
    assert tuned.startswith("zipchat: chat-tuned model") and 'stage "sft"' in tuned and "template zipchat" in tuned
    assert "BASE model" in banner(common.load_for_inference(hf_dirs["base"]))
    assert "chat-tuned model" in banner(common.load_for_inference(hf_dirs["instruct"]))


def test_run_fine_tuned_from_hf_keeps_its_template(run_dir, tmp_path):
    """A run directory that carries a tokenizer_config.json with a chat template (experiments/sft.py
    copies it from a Hugging Face --init) is chatted with in that template, not zipchat's."""
    from core import chat as core_chat
    from tests import test_chat_template as tct

    d = tmp_path / "sft_from_hf"
    d.mkdir()
    for item in run_dir.iterdir():
        (d / item.name).symlink_to(item)
    common.save_json(d / common.RUN_CONFIG_FILE, {"stage": "sft"})
    common.save_json(d / "tokenizer_config.json", {"chat_template": tct.CHATML, "eos_token": "<|im_end|>"})
    ld = common.load_for_inference(d)
    assert isinstance(ld.template, core_chat.JinjaTemplate) and ld.chat_tuned
    session, _, _ = _session(ld, tmp_path)
    prompt = ld.template.render_for_completion([{"role": "user", "content": "hi"}])
    assert ld.tokenizer.decode(prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    sc = sampling.SamplingConfig(temperature=0.0, max_new_tokens=24, stop_ids=ld.template.stop_ids)
    want = sampling.generate(ld.params, ld.cfg, [prompt], sc, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    stats = session.ask("hi")
    assert stats["reply"] == ld.template.parse_assistant(want.row_tokens(0))


def test_run_without_chat_tokens_samples_but_cannot_chat(tmp_path):
    """A run whose tokenizer has no template tokens has no template: sample works (BOS
    <|endoftext|>), chat refuses with one line naming the directory."""
    from experiments import sample as sample_cli

    out = tmp_path / "bare_run"
    tok = tok_lib.train_bpe([TEXT], vocab_size=280, special_tokens=("<|endoftext|>",))
    cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                max_seq_len=64)
    params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    tok.save(out / common.TOKENIZER_FILE)
    common.save_json(out / common.MODEL_CONFIG_FILE, common.model_config_to_json(cfg))
    with ck.make_manager(out / common.CHECKPOINT_DIR, async_save=False) as mngr:
        ck.save(mngr, 1, {"params": params}, meta={"model_config": common.model_config_to_json(cfg)})
    ld = common.load_for_inference(out)
    assert ld.template is None and ld.kind == "base"
    texts = sample_cli.run(sample_cli.SampleConfig(out_dir=str(out), prompts=("The cat",), temperature=0.0,
                                                   max_new_tokens=4), loaded=ld, verbose=False)
    assert len(texts) == 1 and len(texts[0]) == 1
    with pytest.raises(ValueError, match="no chat format"):
        _session(ld, tmp_path)


def test_dtype_flag_loads_bfloat16_weights_and_cache(run_dir, loaded):
    """--dtype=bfloat16 (sample, chat; common.load_for_inference): bfloat16 weights and cache
    (their logit tolerance is tests/test_sampling.py's); an unknown dtype is a user error."""
    import jax.numpy as jnp

    from experiments import sample as sample_cli

    bf = common.load_for_inference(run_dir, dtype="bfloat16")
    assert bf.cfg.compute_dtype == "bfloat16" and loaded[1].compute_dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(bf.params)} == {jnp.dtype("bfloat16")}
    texts = sample_cli.run(sample_cli.SampleConfig(out_dir=str(run_dir), prompts=("hello",), temperature=0.0,
                                                   max_new_tokens=4, dtype="bfloat16"), verbose=False)
    assert len(texts) == 1 and isinstance(texts[0][0], str)
    for bad in (lambda: sample_cli.SampleConfig(out_dir=str(run_dir), prompts=("x",), dtype="float16"),
                lambda: chat_cli.ChatConfig(out_dir=str(run_dir), dtype="int8"),
                lambda: common.load_for_inference(run_dir, dtype="float64")):
        with pytest.raises(ValueError, match="--dtype must be float32 or bfloat16"):
            bad()
