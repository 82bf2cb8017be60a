"""experiments/chat.py against a careless user and hostile text: escape sequences never reach the
terminal, the memory bank never loses a memory (locks, merges, keeps unknown keys, atomic writes
to the resolved path), bad memory/preset files get clear errors, lone surrogates are normalised,
and neither Ctrl-C nor a message longer than the context ends the chat."""
import io
import json
import os
import threading

import jax
import pytest

from core import chat as chat_lib
from core import model as model_lib
from core import sampling
from core import tokenizer as tok_lib
from experiments import chat as chat_cli

TEXT = ("The cat sat on the mat. The dog ate the bone. Hello there, how are you today? ") * 20


# ----------------------------------------------------------------------------- terminal


@pytest.mark.parametrize("raw, shown", [
    ("clear\x1b[2Jscreen", "clear\\x1b[2Jscreen"),
    ("\x1b]52;c;ZXZpbA==\x07", "\\x1b]52;c;ZXZpbA==\\x07"),   # clipboard write (OSC 52)
    ("hid\x1b[8mden", "hid\\x1b[8mden"),
    ("over\rwrite", "over\\x0dwrite"),
    ("del\x7f c1\x9b", "del\\x7f c1\\x9b"),
    ("rtl \u202eevil", "rtl \\u202eevil"),
    ("lines\nand\ttabs stay", "lines\nand\ttabs stay"),
    ("unicode ok: caf\u00e9 \u4e2d\u6587 \U0001f600", "unicode ok: caf\u00e9 \u4e2d\u6587 \U0001f600"),
])
def test_visible_escapes_control_characters(raw, shown):
    assert chat_cli.visible(raw) == shown


@pytest.fixture(scope="module")
def tok():
    return tok_lib.train_bpe([TEXT], vocab_size=300)


def test_stream_printer_escapes_model_text_and_tool_output(tok):
    out = io.StringIO()
    printer = chat_cli.StreamPrinter(tok, out)
    ids = (tok.encode("a\x1b[2J") + chat_lib.render_tool_call(tok, "calculator", "1\x1b]52;c;x\x07")
           + chat_lib.render_tool_output(tok, "\x1b[31mred") + tok.encode(" done\r"))
    for i in range(0, len(ids), 2):
        printer.push(ids[i:i + 2])
    printer.finish()
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert text == "a\\x1b[2J[calculator: 1\\x1b]52;c;x\\x07 -> \\x1b[31mred] done\\x0d\n"


# ----------------------------------------------------------------------------- memory bank


def test_memory_bank_keeps_unknown_keys_and_permissions(tmp_path):
    path = tmp_path / "memory.json"
    path.write_text(json.dumps({"memories": ["old"], "owner": "ada", "settings": {"v": 2}}))
    os.chmod(path, 0o600)
    bank = chat_cli.MemoryBank(path)
    bank.add("new one")
    assert json.loads(path.read_text()) == {"memories": ["old", "new one"], "owner": "ada", "settings": {"v": 2}}
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.json", "memory.json.lock"]  # no temp files


def test_two_chats_on_one_file_keep_each_others_memories(tmp_path):
    path = tmp_path / "memory.json"
    a, b = chat_cli.MemoryBank(path), chat_cli.MemoryBank(path)
    a.add("from a")
    b.add("from b")  # b never saw a's memory: it must re-read, not overwrite
    assert json.loads(path.read_text())["memories"] == ["from a", "from b"]
    assert a.items == ["from a"]
    assert a.forget(1) == "from a"  # by text, in the file as it is now
    assert json.loads(path.read_text())["memories"] == ["from b"]
    b.items = ["from a", "from b"]  # what b listed before a removed "from a"
    with pytest.raises(ValueError, match="already removed by another chat"):
        b.forget(1)
    assert b.items == ["from b"]  # re-read, so the next /memory shows the truth
    assert b.forget(1) == "from b"
    assert json.loads(path.read_text())["memories"] == []


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "memory.json"
    banks = [chat_cli.MemoryBank(path) for _ in range(6)]
    errors = []

    def work(i, bank):
        try:
            for j in range(15):
                bank.add(f"memory {i}-{j}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, bank)) for i, bank in enumerate(banks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    saved = json.loads(path.read_text())["memories"]
    assert sorted(saved) == sorted(f"memory {i}-{j}" for i in range(6) for j in range(15))


def test_symlinked_memory_file_stays_a_symlink(tmp_path):
    real = tmp_path / "store" / "real.json"
    real.parent.mkdir()
    real.write_text(json.dumps({"memories": []}))
    link = tmp_path / "memory.json"
    link.symlink_to(real)
    chat_cli.MemoryBank(link).add("kept behind the link")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text())["memories"] == ["kept behind the link"]


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"memories": "x"}', "expected"),
    (b'{"memories": [1]}', "expected"),
])
def test_bad_memory_file_is_a_clear_error(tmp_path, content, fragment):
    path = tmp_path / "memory.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        chat_cli.MemoryBank(path)
    assert "--memory_file" in str(info.value) and str(path) in str(info.value) and fragment in str(info.value)


def test_lone_surrogates_in_memories_are_normalised(tmp_path):
    path = tmp_path / "memory.json"
    path.write_text('{"memories": ["bad \\ud800 one"]}')  # a JSON escape: valid JSON, invalid text
    bank = chat_cli.MemoryBank(path)
    assert bank.items == ["bad \ufffd one"]
    bank.add("also \udcff bad")
    saved = json.loads(path.read_bytes().decode("utf-8"))["memories"]
    assert saved == ["bad \ufffd one", "also \ufffd bad"]
    messages = chat_cli.opening_messages("", chat_cli.Preset(), bank.items)
    tok = tok_lib.train_bpe([TEXT], vocab_size=300)
    assert chat_lib.zipchat_template(tok).render_for_completion(messages)  # renders without error


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("data, fragment", [
    ({"examples": {"user": "x", "assistant": "y"}}, "'examples' must be a list"),
    ({"examples": [{"user": 1, "assistant": "y"}]}, "example 0"),
    ({"instructions": ["x"]}, "'instructions' must be a string"),
    ({"name": 3}, "'name' must be a string"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_preset_files_are_clear_errors(tmp_path, data, fragment):
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        chat_cli.load_preset(path)
    assert "--preset_file" in str(info.value) and str(path) in str(info.value) and fragment in str(info.value)


def test_preset_invalid_utf8_and_surrogates(tmp_path):
    path = tmp_path / "preset.json"
    path.write_bytes(b'{"instructions": "\xff"}')
    with pytest.raises(ValueError, match="not valid UTF-8"):
        chat_cli.load_preset(path)
    path.write_text('{"instructions": "be \\udc80 nice", "examples": [{"user": "\\ud800", "assistant": "ok"}]}')
    preset = chat_cli.load_preset(path)
    assert preset.instructions == "be \ufffd nice" and preset.examples == (("\ufffd", "ok"),)


# ----------------------------------------------------------------------------- Ctrl-C and long messages


@pytest.fixture(scope="module")
def session_parts(tok):
    cfg = model_lib.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                max_seq_len=128, zero_init_out=False, init_std=0.5)
    params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    return tok, cfg, params


def _session(session_parts, tmp_path):
    tok, cfg, params = session_parts
    config = chat_cli.ChatConfig(out_dir="unused", temperature=0.0, max_new_tokens=8, tools=(),
                                 memory_file=str(tmp_path / "memory.json"))
    out, status = io.StringIO(), io.StringIO()
    return chat_cli.ChatSession((tok, cfg, params, 0), config, out=out, status=status), out


def _lines(*items):
    """A read() that returns each item, raising it when it is an exception; EOF at the end."""
    it = iter(items)

    def read(_prompt):
        item = next(it, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item
    return read


def test_long_message_is_refused_and_the_chat_goes_on(session_parts, tmp_path):
    session, out = _session(session_parts, tmp_path)
    chat_cli.interactive(session, _lines("hello", "cat " * 500, "/remember survived", "bye"))
    text = out.getvalue()
    assert "does not fit" in text and "nothing was sent" in text
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello", "bye"]
    assert session.memory.items == ["survived"]


def test_ctrl_c_at_the_prompt_and_during_a_reply(session_parts, tmp_path, monkeypatch):
    session, out = _session(session_parts, tmp_path)
    real_generate = sampling.generate
    calls = []

    def interrupted(*args, on_tokens=None, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second reply: some tokens shown, then Ctrl-C
            on_tokens([[5, 6]])
            raise KeyboardInterrupt
        return real_generate(*args, on_tokens=on_tokens, **kwargs)

    monkeypatch.setattr(sampling, "generate", interrupted)
    chat_cli.interactive(session, _lines(KeyboardInterrupt(), "hello", "cancel me", "again"))
    text = out.getvalue()
    assert "(Ctrl-D or /quit ends the chat)" in text and "(reply cancelled" in text
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["hello", "again"]  # the cancelled turn left nothing behind
    assert len(calls) == 3


def test_lone_surrogates_in_system_message_and_commands(session_parts, tmp_path):
    tok, cfg, params = session_parts
    config = chat_cli.ChatConfig(out_dir="unused", temperature=0.0, max_new_tokens=4, tools=(),
                                 memory_file=str(tmp_path / "memory.json"), system="sys \ud800")
    out = io.StringIO()
    session = chat_cli.ChatSession((tok, cfg, params, 0), config, out=out, status=io.StringIO())
    chat_cli.interactive(session, _lines("/remember me \udcff", "hi \ud83d", "/system new \udc00 one"))
    assert session.memory.items == ["me \ufffd"]
    assert session.system == "new \ufffd one"
    text = json.dumps(session.messages, ensure_ascii=False)
    text.encode("utf-8")  # nothing unencodable was stored


def test_banner_with_a_hostile_preset_name_is_escaped(session_parts, tmp_path):
    tok, cfg, params = session_parts
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"name": "evil\x1b[2J", "instructions": "x"}))
    config = chat_cli.ChatConfig(out_dir="unused", temperature=0.0, max_new_tokens=4, tools=(),
                                 memory_file=str(tmp_path / "memory.json"), preset_file=str(preset))
    out = io.StringIO()
    session = chat_cli.ChatSession((tok, cfg, params, 0), config, out=out, status=io.StringIO())
    chat_cli.interactive(session, _lines())
    assert "\x1b" not in out.getvalue() and "evil\\x1b[2J" in out.getvalue()
