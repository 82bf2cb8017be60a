"""Chat with a trained checkpoint in the terminal.

    python -m experiments.chat --out_dir=runs/sft
    python -m experiments.chat --out_dir=runs/sft --system="You answer in one sentence."
    python -m experiments.chat --out_dir=runs/sft --preset_file=presets/tutor.json
    python -m experiments.chat --out_dir=runs/sft --prompt="What is 17 * 23?"      # for scripts
    python -m experiments.chat --out_dir=path/to/Qwen2.5-0.5B-Instruct              # a Hugging Face checkpoint

--out_dir is a zipchat run directory or a Hugging Face checkpoint directory (config.json,
safetensors, tokenizer.json, tokenizer_config.json), chatted with in its own template (zipchat's,
or the checkpoint's Jinja chat template; tools need zipchat's tool tokens). The banner says
whether the model is chat-tuned (a run whose config.json has "stage": "sft", or a later stage) or
a base model, which only continues the conversation as text.

Replies stream token by token; tool calls (calculator, python) run as the model makes them and
show inline as `[calculator: 17*23 -> 391]`. After each reply a status line shows the tokens in
context and the decode speed.

Commands (interactive mode):
  /new              start a new chat (the context is wiped; memories and preset are kept)
  /remember TEXT    store TEXT in the memory bank; every new chat starts with the memories
  /memory           list the memories;  /forget N  deletes memory N
  /system TEXT      set the system prompt (custom instructions) and start a new chat
  /help, /quit      (Ctrl-D quits too)

Memory bank: a JSON file (--memory_file) {"memories": ["...", ...]}, prepended to every new chat
in the system message. Chats running at once may share it: every change locks the file, re-reads
it, merges, and replaces it atomically (a symlink stays a symlink; other keys are kept). A preset (--preset_file), like a custom GPT, is a JSON file
  {"name": "tutor", "instructions": "You are a patient math tutor...",
   "examples": [{"user": "What is 2+2?", "assistant": "2 + 2 = 4."}, ...]}
whose instructions join the system message and whose examples become the chat's first turns.

Non-interactive mode: each --prompt (repeatable: one conversation, turn by turn) prints the
reply on stdout (tool calls inline as above); the status lines go to stderr.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence, TextIO

from absl import app, flags

from experiments import common

HELP = __doc__[__doc__.index("Commands"): __doc__.index("Memory bank")].rstrip()


# ----------------------------------------------------------------------------- memory and presets


def clean_text(text: str) -> str:
    """User or file text made safe to encode and store: lone surrogates (from a JSON "\\ud800"
    escape or undecodable terminal input) become U+FFFD, as tiktoken does."""
    from core import tokenizer as tok_lib

    return tok_lib.normalize_text(text)


def _read_json_file(path: pathlib.Path, flag: str):
    """Parsed JSON of a user file; ValueError naming the flag and file for every way it is bad."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{flag} {path} is not valid JSON: nested too deeply") from None


class MemoryBank:
    """Memories in a JSON file {"memories": [str, ...], ...other keys kept...}.

    Safe for several chats on one file: every change takes an exclusive lock (a `.lock` file next
    to the real file), re-reads the file, applies the change to what is there now (so memories
    another chat added are kept), and replaces the resolved file atomically (a symlinked memory
    file keeps its link; the file keeps its permissions). Keys other than "memories" are kept.
    """

    def __init__(self, path):
        self.path = pathlib.Path(os.path.expanduser(str(path)))
        self.items: list[str] = self._read()[1]

    @property
    def target(self) -> pathlib.Path:
        """The file actually written: the symlink's target when `path` is one."""
        return pathlib.Path(os.path.realpath(self.path))

    def _read(self) -> tuple[dict, list[str]]:
        """(whole JSON object, memories) from the file now; ({}, []) when there is none."""
        if not self.path.exists():
            return {}, []
        data = _read_json_file(self.path, "--memory_file")
        items = data.get("memories", []) if isinstance(data, dict) else None
        if not isinstance(items, list) or not all(isinstance(m, str) for m in items):
            raise ValueError(f"--memory_file {self.path}: expected {{\"memories\": [str, ...]}}")
        return data, [clean_text(m) for m in items]

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        target = self.target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(str(target) + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _update(self, change: Callable[[list[str]], list[str]]) -> None:
        """Under the lock: re-read, apply `change` to the current memories, write atomically."""
        with self._locked():
            data, items = self._read()
            items = change(items)
            self._write(dict(data, memories=items))
            self.items = items

    def _write(self, data: dict) -> None:
        target = self.target
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix="." + target.name + ".", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if target.exists():
                os.chmod(tmp, target.stat().st_mode & 0o7777)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def add(self, text: str) -> None:
        text = " ".join(clean_text(text).split())
        if not text:
            raise ValueError("nothing to remember: /remember TEXT")
        self._update(lambda items: items + [text])

    def forget(self, index: int) -> str:
        """Forgets memory `index` (1-based, as last listed); it is found by text in the file as it
        is now, so another chat's additions or removals do not shift what is forgotten."""
        if not 1 <= index <= len(self.items):
            raise ValueError(f"no memory {index}; there are {len(self.items)}")
        gone = self.items[index - 1]

        def without(items: list[str]) -> list[str]:
            if gone not in items:
                raise ValueError(f"memory {index} ({gone!r}) was already removed by another chat")
            at = items.index(gone)
            return items[:at] + items[at + 1:]

        try:
            self._update(without)
        except ValueError:
            self.items = self._read()[1]
            raise
        return gone


@dataclasses.dataclass(frozen=True)
class Preset:
    """Custom instructions plus few-shot (user, assistant) examples."""

    name: str = ""
    instructions: str = ""
    examples: tuple[tuple[str, str], ...] = ()


def load_preset(path) -> Preset:
    """Reads a preset JSON file (see the module docstring); ValueError naming the file if malformed."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"--preset_file {p} does not exist")
    data = _read_json_file(p, "--preset_file")
    if not isinstance(data, dict):
        raise ValueError(f"--preset_file {p}: expected a JSON object with 'instructions' and 'examples'")
    raw_examples = data.get("examples", [])
    if not isinstance(raw_examples, list):
        raise ValueError(f"--preset_file {p}: 'examples' must be a list of {{\"user\": str, \"assistant\": str}}")
    examples = []
    for i, ex in enumerate(raw_examples):
        if not (isinstance(ex, dict) and isinstance(ex.get("user"), str) and isinstance(ex.get("assistant"), str)):
            raise ValueError(f"--preset_file {p}: example {i} must be {{\"user\": str, \"assistant\": str}}")
        examples.append((clean_text(ex["user"]), clean_text(ex["assistant"])))
    instructions = data.get("instructions", "")
    if not isinstance(instructions, str):
        raise ValueError(f"--preset_file {p}: 'instructions' must be a string")
    name = data.get("name", p.stem)
    if not isinstance(name, str):
        raise ValueError(f"--preset_file {p}: 'name' must be a string")
    return Preset(name=clean_text(name), instructions=clean_text(instructions), examples=tuple(examples))


def opening_messages(system: str, preset: Preset, memories: Sequence[str]) -> list[dict]:
    """The messages every new chat starts with: one system message (system prompt, preset
    instructions, memories), then the preset's few-shot turns."""
    parts = [s.strip() for s in (system, preset.instructions) if s and s.strip()]
    if memories:
        parts.append("Things to remember about the user:\n" + "\n".join(f"- {m}" for m in memories))
    messages = [{"role": "system", "content": "\n\n".join(parts)}] if parts else []
    for user, assistant in preset.examples:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


# ----------------------------------------------------------------------------- streaming display

# Shown escaped: every control character (C0, DEL, C1) but newline and tab, and the invisible
# bidirectional overrides; model text and tool output could otherwise clear the screen, hide
# text, rewrite lines or write the clipboard (OSC 52) through escape sequences.
visible = common.visible  # control characters escaped for the terminal


def display_map(template) -> dict[int, str]:
    """How the template's special ids show on screen: tool calls as `[name: input -> output]`,
    stop tokens as nothing (other special ids are dropped by the printer too)."""
    show = {i: "" for i in template.stop_ids}
    p = template.tools
    if p is not None:
        show.update({p.output_start: " -> ", p.output_end: "]"})
        show.update({i: f"[{name}: " for name, i in p.start.items()})
        show.update({i: "" for i in p.end.values()})
    return show


class StreamPrinter:
    """Prints generated ids as they arrive: text through an incremental UTF-8 decoder, tool calls
    as `[name: input -> output]`, stop tokens not at all."""

    def __init__(self, tokenizer, out: TextIO, template=None):
        from core import chat as chat_lib

        self.tok, self.out = tokenizer, out
        # Streaming rate: tokens after the first delivery over the time since it (the first
        # chunk carries the compile of a new shape, which is not decode speed).
        self.t_first: Optional[float] = None
        self.t_last = 0.0
        self.n_after_first = 0
        self.show = display_map(template if template is not None else chat_lib.zipchat_template(tokenizer))
        self.decoder = tokenizer.stream_decoder()

    def push(self, ids: Sequence[int]) -> None:
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        else:
            self.n_after_first += len(ids)
            self.t_last = now
        text = []
        for i in ids:
            if i in self.show or self.tok.is_special(i):
                text.append(self.decoder.flush())
                text.append(self.show.get(i, ""))
            else:
                text.append(self.decoder.push(i))
        self.out.write(visible("".join(text)))
        self.out.flush()

    def tokens_per_s(self) -> Optional[float]:
        """Decode rate seen by the reader; None when everything came in one chunk."""
        if self.t_first is None or self.n_after_first == 0 or self.t_last <= self.t_first:
            return None
        return self.n_after_first / (self.t_last - self.t_first)

    def finish(self) -> None:
        self.out.write(visible(self.decoder.flush()) + "\n")
        self.out.flush()


# ----------------------------------------------------------------------------- the session


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    out_dir: str
    system: str = ""
    preset_file: Optional[str] = None
    memory_file: str = "~/.zipchat/memory.json"
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    min_p: float = 0.0
    max_new_tokens: int = 256
    tools: tuple[str, ...] = ("calculator", "python")
    seed: int = 0
    step: Optional[int] = None
    mesh: str = "data:-1"
    chunk_size: int = 8
    dtype: str = "float32"

    def __post_init__(self):
        from core import tools as tools_lib

        common.check_inference_dtype(self.dtype)
        unknown = sorted(set(self.tools) - set(tools_lib.TOOL_NAMES))
        if unknown:
            raise ValueError(f"--tools: unknown tool(s) {unknown}; choose from {tools_lib.TOOL_NAMES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk_size must be >= 1, got {self.chunk_size}")


class ChatSession:
    """One conversation with a loaded model; `ask` runs a turn, `command` a slash command."""

    def __init__(self, loaded, cfg: ChatConfig, out: TextIO = sys.stdout, status: TextIO = sys.stderr):
        """`loaded`: a common.LoadedModel (its template and base/chat-tuned kind are used), or a
        (tokenizer, model_cfg, params, step) tuple, chatted with in zipchat's template."""
        from core import chat as chat_lib
        from core import sampling
        from core import tools as tools_lib

        if isinstance(loaded, common.LoadedModel):
            self.tok, self.model_cfg, self.params, self.step = loaded.tokenizer, loaded.cfg, loaded.params, loaded.step
            self.template, self.loaded = loaded.template, loaded
            if self.template is None:
                raise ValueError(f"{loaded.path}: the tokenizer has no chat format (neither zipchat's template "
                                 f"tokens nor a chat_template in tokenizer_config.json)")
        else:
            self.tok, self.model_cfg, self.params, self.step = loaded
            self.template, self.loaded = chat_lib.zipchat_template(self.tok), None
        self.cfg, self.out, self.status = cfg, out, status
        self.memory = MemoryBank(cfg.memory_file)
        self.preset = load_preset(cfg.preset_file) if cfg.preset_file else Preset()
        self.system = clean_text(cfg.system)
        # A template without tool tokens (a Hugging Face one) cannot call tools: they are off.
        names = cfg.tools if self.template.tools is not None else ()
        registry = self._tool_registry(names)
        self.tools = {name: (lambda text, n=name: tools_lib.run_tool(n, text, registry)) for name in names}
        # a tool that is off is banned, so the model never opens a call nothing would answer
        banned = tuple(i for n, i in (self.template.tools.start.items() if self.template.tools else ())
                       if n not in self.tools)
        self.sampling_cfg = sampling.SamplingConfig(
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
            max_new_tokens=cfg.max_new_tokens, stop_ids=self.template.stop_ids, banned_ids=banned)
        self.turn = 0
        self.new()

    def _tool_registry(self, names) -> dict:
        """core/tools' callables; with search on, searching the synthetic world's documents
        through the assistant evaluation's tools (the index SFT's search replies were made from)."""
        from core import tools as tools_lib

        if "search" not in names:
            return tools_lib.make_tools()
        spec = common.world_spec(self.loaded.path) if self.loaded is not None else None
        if spec is None:
            raise ValueError("--tools=search needs a run trained on the synthetic world (its documents are the "
                             "search index); leave search out of --tools for this model")
        from data import readers
        from experiments import assistant_eval

        return assistant_eval.default_tools(readers.open_source(spec).world)

    def banner(self) -> str:
        """The first line of a chat: what the model is (base or chat-tuned, and why), its
        template and tools, the memories."""
        name = f" ({self.preset.name})" if self.preset.name else ""
        tools = ", ".join(self.tools) or ("off (the template has no tool tokens)" if self.cfg.tools else "off")
        about = f"template {self.template.name}, tools {tools}, {len(self.memory.items)} memories"
        ld = self.loaded
        if ld is None:
            return f"zipchat{name}: checkpoint step {self.step}, {about}. /help for commands."
        if ld.chat_tuned:
            return f"zipchat{name}: chat-tuned model ({ld.why}), step {self.step}, {about}. /help for commands."
        return (f"zipchat{name}: BASE model, not chat-tuned ({ld.why}), step {self.step}, {about}. It continues "
                f"the conversation as text and may ramble until --max_new_tokens; experiments/sft.py makes an "
                f"assistant of it. /help for commands.")

    def new(self) -> None:
        self.messages = opening_messages(self.system, self.preset, self.memory.items)
        self.n_fixed = len(self.messages)  # never dropped to make room

    def _fit(self, messages: list[dict]) -> tuple[list[int], int, int]:
        """Prompt ids, max new tokens and the number of old turns dropped to fit max_seq_len."""
        limit = self.model_cfg.max_seq_len
        dropped = 0
        while True:
            ids = self.template.render_for_completion(messages)
            room = limit - len(ids)
            if room >= min(self.cfg.max_new_tokens, 32) or len(messages) <= self.n_fixed + 1:
                break
            # Drop the oldest turn after the fixed opening (user + its reply together).
            cut = 2 if len(messages) > self.n_fixed + 2 else 1
            messages = messages[: self.n_fixed] + messages[self.n_fixed + cut:]
            dropped += cut
        if room < 1:
            raise ValueError(f"the message does not fit the model's context: {len(ids)} prompt tokens, "
                             f"max_seq_len {limit}")
        return ids, min(self.cfg.max_new_tokens, room), dropped

    def ask(self, text: str) -> dict:
        """Runs one user turn: streams the reply to `out`, appends it; returns the turn's stats."""
        import jax

        from core import sampling

        text = clean_text(text)
        messages = self.messages + [{"role": "user", "content": text}]
        ids, max_new, dropped = self._fit(messages)
        # applied only once the reply is complete: a cancelled reply leaves the chat as it was
        kept = self.messages[: self.n_fixed] + self.messages[self.n_fixed + dropped:]
        printer = StreamPrinter(self.tok, self.out, self.template)
        res = sampling.generate(
            self.params, self.model_cfg, [ids], dataclasses.replace(self.sampling_cfg, max_new_tokens=max_new),
            jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), self.turn), tools=self.tools or None,
            template=self.template, chunk_size=self.cfg.chunk_size, on_tokens=lambda new: printer.push(new[0]))
        printer.finish()
        gen = res.row_tokens(0)
        reply = self.template.parse_assistant(gen)
        self.messages = kept + [{"role": "user", "content": text}, reply]
        self.turn += 1
        stats = {"context_tokens": len(ids) + len(gen), "max_seq_len": self.model_cfg.max_seq_len,
                 "new_tokens": len(gen), "tokens_per_s": printer.tokens_per_s() or len(gen) / max(res.decode_s, 1e-9),
                 "finish_reason": res.finish_reason[0], "tool_calls": res.tool_calls[0],
                 "dropped_messages": dropped, "reply": reply}
        note = f", {dropped} old messages dropped to fit" if dropped else ""
        self.status.write(f"[{stats['context_tokens']}/{stats['max_seq_len']} tokens in context | "
                          f"{len(gen)} new at {stats['tokens_per_s']:.1f} tok/s | {res.finish_reason[0]}{note}]\n")
        self.status.flush()
        return stats

    def command(self, line: str) -> bool:
        """Handles a /command; returns False when the session should end."""
        name, _, arg = clean_text(line).strip().partition(" ")
        arg = arg.strip()
        say = lambda s: (self.out.write(visible(s) + "\n"), self.out.flush())  # noqa: E731
        if name in ("/quit", "/exit"):
            return False
        if name == "/new":
            self.new()
            say("(new chat)")
        elif name == "/remember":
            try:
                self.memory.add(arg)
                say(f"(remembered; {len(self.memory.items)} memories, used from the next /new)")
            except (ValueError, OSError) as e:  # a bad or unwritable file must not end the chat
                say(f"({e})")
        elif name == "/memory":
            say("\n".join(f"{i + 1}. {m}" for i, m in enumerate(self.memory.items)) or "(no memories)")
        elif name == "/forget":
            try:
                say(f"(forgot: {self.memory.forget(int(arg))})")
            except (ValueError, OSError) as e:
                say(f"({e or 'usage: /forget N'})")
        elif name == "/system":
            self.system = arg
            self.new()
            say("(system prompt set; new chat)")
        elif name == "/help":
            say(HELP)
        else:
            say(f"(unknown command {name}; /help lists them)")
        return True


def interactive(session: ChatSession, read: Callable[[str], str] = input) -> None:
    """The read-eval-print loop until /quit or end of input (Ctrl-D).

    Nothing a user types ends the chat with a traceback: Ctrl-C at the prompt gives a new prompt,
    Ctrl-C during a reply cancels that reply (the conversation stays as it was before the
    message), and a message the context cannot hold is refused with the reason.
    """
    session.out.write(visible(session.banner()) + "\n")  # a preset name is file text
    while True:
        try:
            line = read("you> ")
        except EOFError:
            session.out.write("\n")
            return
        except KeyboardInterrupt:
            session.out.write("\n(Ctrl-D or /quit ends the chat)\n")
            session.out.flush()
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        session.out.write("assistant> ")
        session.out.flush()
        try:
            session.ask(line)
        except KeyboardInterrupt:
            session.out.write("\n(reply cancelled; the conversation is as before that message)\n")
        except ValueError as e:
            session.out.write(f"\n({e}; nothing was sent: shorten the message or /new)\n")
        session.out.flush()


# ----------------------------------------------------------------------------- entry point


def define_flags() -> None:
    common.define_common_flags()
    flags.DEFINE_multi_string("prompt", [], "non-interactive: answer these user messages in order and exit")
    flags.DEFINE_string("system", "", "system prompt (custom instructions)")
    flags.DEFINE_string("preset_file", None, "JSON preset: instructions + few-shot examples")
    flags.DEFINE_string("memory_file", "~/.zipchat/memory.json", "JSON memory bank (/remember)")
    flags.DEFINE_float("temperature", 0.7, "0 = greedy")
    flags.DEFINE_integer("top_k", 50, "0 = off")
    flags.DEFINE_float("top_p", 0.95, "1 = off")
    flags.DEFINE_float("min_p", 0.0, "0 = off")
    flags.DEFINE_integer("max_new_tokens", 256, "longest reply")
    flags.DEFINE_list("tools", ["calculator", "python"], "tools the model may call (python, calculator, search)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_integer("chunk_size", 8, "decode steps between screen updates")
    flags.DEFINE_enum("dtype", "float32", list(common.INFERENCE_DTYPES), "weights and KV cache for sampling (bfloat16 is "
                      "for accelerators; python -m experiments.bench_decode --bf16 reports its logit difference)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    F = flags.FLAGS
    out_dir = common.require_out_dir(F.out_dir)
    cfg = ChatConfig(out_dir=str(out_dir), system=F.system, preset_file=F.preset_file, memory_file=F.memory_file,
                     temperature=F.temperature, top_k=F.top_k, top_p=F.top_p, min_p=F.min_p,
                     max_new_tokens=F.max_new_tokens, tools=tuple(t for t in F.tools if t), seed=F.seed,
                     step=F.step, mesh=F.mesh, chunk_size=F.chunk_size, dtype=F.dtype)
    from core import sharding as sharding_lib

    loaded = common.load_for_inference(out_dir, mesh=sharding_lib.make_mesh(cfg.mesh), step=cfg.step, dtype=cfg.dtype)
    session = ChatSession(loaded, cfg)
    if F.prompt:
        session.status.write(visible(session.banner()) + "\n")  # stdout carries only the replies
        for text in F.prompt:
            session.ask(text)
        return
    interactive(session)


if __name__ == "__main__":
    define_flags()
    app.run(common.cli(main))
