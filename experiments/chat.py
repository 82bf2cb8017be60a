"""Chat with a trained checkpoint in the terminal.

    python -m experiments.chat --out_dir=runs/sft
    python -m experiments.chat --out_dir=runs/sft --system="You answer in one sentence."
    python -m experiments.chat --out_dir=runs/sft --preset_file=presets/tutor.json
    python -m experiments.chat --out_dir=runs/sft --prompt="What is 17 * 23?"      # for scripts

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
in the system message. A preset (--preset_file), like a custom GPT, is a JSON file
  {"name": "tutor", "instructions": "You are a patient math tutor...",
   "examples": [{"user": "What is 2+2?", "assistant": "2 + 2 = 4."}, ...]}
whose instructions join the system message and whose examples become the chat's first turns.

Non-interactive mode: each --prompt (repeatable: one conversation, turn by turn) prints the
reply on stdout (tool calls inline as above); the status lines go to stderr.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence, TextIO

from absl import app, flags

from experiments import common

HELP = __doc__[__doc__.index("Commands"): __doc__.index("Memory bank")].rstrip()


# ----------------------------------------------------------------------------- memory and presets


class MemoryBank:
    """Memories in a JSON file {"memories": [str, ...]}, written atomically on every change."""

    def __init__(self, path):
        self.path = pathlib.Path(os.path.expanduser(str(path)))
        self.items: list[str] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"--memory_file {self.path} is not valid JSON: {e}") from None
            items = data.get("memories") if isinstance(data, dict) else None
            if not isinstance(items, list) or not all(isinstance(m, str) for m in items):
                raise ValueError(f"--memory_file {self.path}: expected {{\"memories\": [str, ...]}}")
            self.items = items

    def add(self, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            raise ValueError("nothing to remember: /remember TEXT")
        self.items.append(text)
        self._save()

    def forget(self, index: int) -> str:
        if not 1 <= index <= len(self.items):
            raise ValueError(f"no memory {index}; there are {len(self.items)}")
        gone = self.items.pop(index - 1)
        self._save()
        return gone

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"memories": self.items}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


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
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--preset_file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--preset_file {p}: expected a JSON object with 'instructions' and 'examples'")
    examples = []
    for i, ex in enumerate(data.get("examples", [])):
        if not (isinstance(ex, dict) and isinstance(ex.get("user"), str) and isinstance(ex.get("assistant"), str)):
            raise ValueError(f"--preset_file {p}: example {i} must be {{\"user\": str, \"assistant\": str}}")
        examples.append((ex["user"], ex["assistant"]))
    instructions = data.get("instructions", "")
    if not isinstance(instructions, str):
        raise ValueError(f"--preset_file {p}: 'instructions' must be a string")
    return Preset(name=str(data.get("name", p.stem)), instructions=instructions, examples=tuple(examples))


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


class StreamPrinter:
    """Prints generated ids as they arrive: text through an incremental UTF-8 decoder, tool calls
    as `[name: input -> output]`, stop tokens not at all."""

    def __init__(self, tokenizer, out: TextIO):
        from core import chat as chat_lib

        self.tok, self.out = tokenizer, out
        # Streaming rate: tokens after the first delivery over the time since it (the first
        # chunk carries the compile of a new shape, which is not decode speed).
        self.t_first: Optional[float] = None
        self.t_last = 0.0
        self.n_after_first = 0
        t = chat_lib.chat_tokens(tokenizer)
        self.show = {t.output_start: " -> ", t.output_end: "]", t.im_end: "", t.bos: ""}
        self.show.update({i: f"[{name}: " for name, i in t.tool_start.items()})
        self.show.update({i: "" for i in t.tool_end.values()})
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
        self.out.write("".join(text))
        self.out.flush()

    def tokens_per_s(self) -> Optional[float]:
        """Decode rate seen by the reader; None when everything came in one chunk."""
        if self.t_first is None or self.n_after_first == 0 or self.t_last <= self.t_first:
            return None
        return self.n_after_first / (self.t_last - self.t_first)

    def finish(self) -> None:
        self.out.write(self.decoder.flush() + "\n")
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

    def __post_init__(self):
        from core import tools as tools_lib

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
        from core import chat as chat_lib
        from core import sampling
        from core import tools as tools_lib

        self.tok, self.model_cfg, self.params, self.step = loaded
        self.cfg, self.out, self.status = cfg, out, status
        self.memory = MemoryBank(cfg.memory_file)
        self.preset = load_preset(cfg.preset_file) if cfg.preset_file else Preset()
        self.system = cfg.system
        registry = tools_lib.make_tools()
        self.tools = {name: (lambda text, n=name: tools_lib.run_tool(n, text, registry)) for name in cfg.tools}
        self.sampling_cfg = sampling.SamplingConfig(
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
            max_new_tokens=cfg.max_new_tokens, stop_ids=chat_lib.assistant_stop_ids(self.tok))
        self.turn = 0
        self.new()

    def new(self) -> None:
        self.messages = opening_messages(self.system, self.preset, self.memory.items)
        self.n_fixed = len(self.messages)  # never dropped to make room

    def _fit(self, messages: list[dict]) -> tuple[list[int], int, int]:
        """Prompt ids, max new tokens and the number of old turns dropped to fit max_seq_len."""
        from core import chat as chat_lib

        limit = self.model_cfg.max_seq_len
        dropped = 0
        while True:
            ids = chat_lib.render_for_completion(self.tok, messages)
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

        from core import chat as chat_lib
        from core import sampling

        messages = self.messages + [{"role": "user", "content": text}]
        ids, max_new, dropped = self._fit(messages)
        if dropped:
            self.messages = self.messages[: self.n_fixed] + self.messages[self.n_fixed + dropped:]
        printer = StreamPrinter(self.tok, self.out)
        res = sampling.generate(
            self.params, self.model_cfg, [ids], dataclasses.replace(self.sampling_cfg, max_new_tokens=max_new),
            jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), self.turn), tools=self.tools or None,
            tokenizer=self.tok, chunk_size=self.cfg.chunk_size, on_tokens=lambda new: printer.push(new[0]))
        printer.finish()
        gen = res.row_tokens(0)
        reply = chat_lib.parse_assistant(self.tok, gen)
        self.messages = self.messages + [{"role": "user", "content": text}, reply]
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
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        say = lambda s: (self.out.write(s + "\n"), self.out.flush())  # noqa: E731
        if name in ("/quit", "/exit"):
            return False
        if name == "/new":
            self.new()
            say("(new chat)")
        elif name == "/remember":
            try:
                self.memory.add(arg)
                say(f"(remembered; {len(self.memory.items)} memories, used from the next /new)")
            except ValueError as e:
                say(f"({e})")
        elif name == "/memory":
            say("\n".join(f"{i + 1}. {m}" for i, m in enumerate(self.memory.items)) or "(no memories)")
        elif name == "/forget":
            try:
                say(f"(forgot: {self.memory.forget(int(arg))})")
            except ValueError as e:
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
    """The read-eval-print loop until /quit or end of input."""
    name = f" ({session.preset.name})" if session.preset.name else ""
    session.out.write(f"zipchat{name}: checkpoint step {session.step}, {len(session.memory.items)} memories. "
                      f"/help for commands.\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            session.out.write("\n")
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        session.out.write("assistant> ")
        session.ask(line)


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.quiet_logging()
    F = flags.FLAGS
    out_dir = common.require_out_dir(F.out_dir)
    cfg = ChatConfig(out_dir=str(out_dir), system=F.system, preset_file=F.preset_file, memory_file=F.memory_file,
                     temperature=F.temperature, top_k=F.top_k, top_p=F.top_p, min_p=F.min_p,
                     max_new_tokens=F.max_new_tokens, tools=tuple(t for t in F.tools if t), seed=F.seed,
                     step=F.step, mesh=F.mesh, chunk_size=F.chunk_size)
    from core import sharding as sharding_lib

    loaded = common.load_model(out_dir, mesh=sharding_lib.make_mesh(cfg.mesh), step=cfg.step)
    session = ChatSession(loaded, cfg)
    if F.prompt:
        for text in F.prompt:
            session.ask(text)
        return
    interactive(session)


if __name__ == "__main__":
    define_flags()
    app.run(main)
