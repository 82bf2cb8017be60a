"""Conversations <-> tokens: the one place that knows the chat template and the tool-call tokens.

Template (every message, any role):

    <|im_start|>{role}<|im_sep|>{content}<|im_end|>

A conversation is `<|endoftext|>` (BOS) followed by its messages. Roles: system, user,
assistant, tool. An assistant message may interleave text with tool calls and tool outputs:

    <|im_start|>assistant<|im_sep|>Let me compute.<|calculator_start|>2**10<|calculator_end|>
    <|output_start|>1024<|output_end|>It is 1024.<|im_end|>

A message is a dict `{"role": str, "content": str | list[part]}` where a part is one of
    {"type": "text", "text": str}
    {"type": "tool_call", "tool": "python" | "calculator" | "search", "text": str}
    {"type": "tool_output", "text": str}
(tool parts only in assistant messages). A plain str content is one text part.

Loss mask: 1 exactly on the tokens the assistant produces itself: its text, its tool calls (start
token, code, end token) and its closing <|im_end|>. Everything else is 0: the BOS, every
<|im_start|>role<|im_sep|> header, all system/user/tool messages, and tool outputs including
<|output_start|>/<|output_end|> (the engine force-feeds those). The mask is aligned with the ids:
mask[i] says whether ids[i] is a training target, so next-token training uses inputs ids[:-1],
targets ids[1:] and mask[1:].

No content can inject a special token: content is encoded with `tok.encode`, which never yields a
special id ("<|im_end|>" typed in a message is ordinary text), and roles and tool names are
checked against fixed lists.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from core.tools import OUTPUT_END, OUTPUT_START, TOOL_TOKENS

IM_START = "<|im_start|>"
IM_SEP = "<|im_sep|>"
IM_END = "<|im_end|>"
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
PART_TYPES: tuple[str, ...] = ("text", "tool_call", "tool_output")

Message = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """Ids of the template and tool tokens in one tokenizer.

    Attributes:
      bos: <|endoftext|>, also the beginning of a conversation.
      im_start, im_sep, im_end: message delimiters.
      output_start, output_end: around a tool's output.
      tool_start, tool_end: tool name -> id of its start / end token.
      start_to_tool: start id -> tool name (what the sampling engine watches for).
    """

    bos: int
    im_start: int
    im_sep: int
    im_end: int
    output_start: int
    output_end: int
    tool_start: dict[str, int]
    tool_end: dict[str, int]
    start_to_tool: dict[int, str]

    @property
    def template_ids(self) -> frozenset[int]:
        """Every special id the template and the tool protocol use."""
        return frozenset([self.bos, self.im_start, self.im_sep, self.im_end, self.output_start,
                          self.output_end, *self.tool_start.values(), *self.tool_end.values()])


def chat_tokens(tok) -> ChatTokens:
    """The template's special ids in `tok`; KeyError naming the token when one is missing."""
    im_start, im_sep, im_end = (tok.special_id(n) for n in (IM_START, IM_SEP, IM_END))
    tool_start = {name: tok.special_id(start) for name, (start, _) in TOOL_TOKENS.items()}
    tool_end = {name: tok.special_id(end) for name, (_, end) in TOOL_TOKENS.items()}
    return ChatTokens(
        bos=tok.eot_id, im_start=im_start, im_sep=im_sep, im_end=im_end,
        output_start=tok.special_id(OUTPUT_START), output_end=tok.special_id(OUTPUT_END),
        tool_start=tool_start, tool_end=tool_end, start_to_tool={i: name for name, i in tool_start.items()})


def assistant_stop_ids(tok) -> tuple[int, ...]:
    """Ids that end an assistant turn during sampling: <|im_end|> and <|endoftext|>."""
    t = chat_tokens(tok)
    return (t.im_end, t.bos)


# ----------------------------------------------------------------------------------------------
# Validation and the canonical form


def message_parts(message: Message, index: int = 0) -> list[dict[str, str]]:
    """The message's content as a list of validated parts.

    Args:
      message: {"role", "content"}.
      index: position in the conversation, for error messages.
    Raises:
      ValueError: unknown role or part type, tool parts outside an assistant message, unknown
        tool, non-string text.
    """
    if not isinstance(message, dict):
        raise ValueError(f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"message {index}: role {role!r} is not one of {ROLES}")
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message {index}: content must be a str or a list of parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        where = f"message {index} ({role}) part {j}"
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            raise ValueError(f"{where}: expected a dict with 'type' in {PART_TYPES}, got {part!r:.80}")
        kind = part["type"]
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a str, got {type(text).__name__}")
        if kind != "text" and role != "assistant":
            raise ValueError(f"{where}: {kind} parts are only allowed in assistant messages")
        if kind == "tool_call":
            if part.get("tool") not in TOOL_TOKENS:
                raise ValueError(f"{where}: tool {part.get('tool')!r} is not one of {tuple(TOOL_TOKENS)}")
            parts.append({"type": kind, "tool": part["tool"], "text": text})
        else:
            parts.append({"type": kind, "text": text})
    return parts


def normalize_message(message: Message) -> Message:
    """Canonical form: empty text parts dropped, adjacent text parts merged, and content a plain
    str when only text remains. `parse_*` return this form, so parse(render(m)) == normalize(m)."""
    merged: list[dict[str, str]] = []
    for part in message_parts(message):
        if part["type"] == "text":
            if not part["text"]:
                continue
            if merged and merged[-1]["type"] == "text":
                merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
                continue
        merged.append(part)
    if all(p["type"] == "text" for p in merged):
        return {"role": message["role"], "content": "".join(p["text"] for p in merged)}
    return {"role": message["role"], "content": merged}


# ----------------------------------------------------------------------------------------------
# Rendering


def render_tool_call(tok, tool: str, text: str) -> list[int]:
    """<|{tool}_start|> text <|{tool}_end|> as ids (what the model writes to call a tool)."""
    if tool not in TOOL_TOKENS:
        raise ValueError(f"tool {tool!r} is not one of {tuple(TOOL_TOKENS)}")
    start, end = TOOL_TOKENS[tool]
    return [tok.special_id(start), *tok.encode(text), tok.special_id(end)]


def render_tool_output(tok, text: str) -> list[int]:
    """<|output_start|> text <|output_end|> as ids (what the engine force-feeds after a call)."""
    return [tok.special_id(OUTPUT_START), *tok.encode(text), tok.special_id(OUTPUT_END)]


def render_message(tok, message: Message, index: int = 0) -> tuple[list[int], list[int]]:
    """One message as (ids, mask); see the module docstring for the mask rule."""
    parts = message_parts(message, index)
    t = chat_tokens(tok)
    role = message["role"]
    trained = 1 if role == "assistant" else 0
    ids = [t.im_start, *tok.encode(role), t.im_sep]
    mask = [0] * len(ids)
    for part in parts:
        if part["type"] == "text":
            piece = tok.encode(part["text"])
            piece_mask = [trained] * len(piece)
        elif part["type"] == "tool_call":
            piece = render_tool_call(tok, part["tool"], part["text"])
            piece_mask = [1] * len(piece)
        else:
            piece = render_tool_output(tok, part["text"])
            piece_mask = [0] * len(piece)
        ids += piece
        mask += piece_mask
    ids.append(t.im_end)
    mask.append(trained)
    return ids, mask


def render_conversation(tok, messages: Sequence[Message], *, bos: bool = True,
                        max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """A conversation as (ids, mask), for supervised fine-tuning.

    Args:
      tok: core.tokenizer.Tokenizer (needs the template's special tokens).
      messages: list of messages.
      bos: start with <|endoftext|>.
      max_tokens: cut both lists to this length (None: no cut).
    Returns:
      ids [T] and mask [T] (0/1 ints), mask[i] = 1 when ids[i] is an assistant-produced token.
    """
    if isinstance(messages, (str, dict)):
        raise ValueError("messages must be a list of message dicts")
    ids: list[int] = [tok.eot_id] if bos else []
    mask: list[int] = [0] * len(ids)
    for i, message in enumerate(messages):
        m_ids, m_mask = render_message(tok, message, i)
        ids += m_ids
        mask += m_mask
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tok, messages: Sequence[Message], *, bos: bool = True) -> list[int]:
    """Prompt ids for sampling a reply: the conversation, then <|im_start|>assistant<|im_sep|>.

    The caller removes a trailing assistant message (e.g. an RL reference answer) if it has one.
    """
    ids, _ = render_conversation(tok, messages, bos=bos)
    t = chat_tokens(tok)
    return ids + [t.im_start, *tok.encode("assistant"), t.im_sep]


# ----------------------------------------------------------------------------------------------
# Parsing


def parse_assistant(tok, ids: Sequence[int]) -> Message:
    """Generated ids (after the assistant header) -> an assistant message in canonical form.

    Reads up to the first <|im_end|> or <|endoftext|> (or the end of `ids`). Lenient with what a
    model may produce: a tool call or output left open at the end is closed there, a call
    interrupted by <|output_start|> is closed by it, and stray template tokens are dropped.
    """
    return {"role": "assistant", "content": _parse_content(tok, ids, chat_tokens(tok))[0]}


def _parse_content(tok, ids: Sequence[int], t: ChatTokens) -> tuple[str | list, int]:
    """Parses message content; returns (canonical content, index just past the stopping token)."""
    parts: list[dict[str, str]] = []
    run: list[int] = []
    mode, tool = "text", None  # mode: text | call | output

    def close():
        if mode == "text":
            parts.append({"type": "text", "text": tok.decode(run)})
        elif mode == "call":
            parts.append({"type": "tool_call", "tool": tool, "text": tok.decode(run)})
        else:
            parts.append({"type": "tool_output", "text": tok.decode(run)})
        run.clear()

    i = 0
    for i, token in enumerate(ids):
        token = int(token)
        if token in (t.im_end, t.bos):
            close()
            break
        if mode == "text" and token in t.start_to_tool:
            close()
            mode, tool = "call", t.start_to_tool[token]
        elif mode != "output" and token == t.output_start:
            close()
            mode = "output"
        elif mode == "call" and token == t.tool_end[tool]:
            close()
            mode = "text"
        elif mode == "output" and token == t.output_end:
            close()
            mode = "text"
        elif tok.is_special(token):
            continue  # stray template token: not content
        else:
            run.append(token)
    else:
        close()
        i = len(ids) - 1
    message = normalize_message({"role": "assistant", "content": parts})
    return message["content"], i + 1


def parse_conversation(tok, ids: Sequence[int]) -> list[Message]:
    """Rendered conversation ids -> messages in canonical form (inverse of render_conversation).

    A leading BOS is skipped. A last message without <|im_end|> is returned as far as it goes.
    Raises:
      ValueError: the ids do not follow the template (naming the position).
    """
    t = chat_tokens(tok)
    ids = [int(x) for x in ids]
    pos = 1 if ids and ids[0] == t.bos else 0
    messages: list[Message] = []
    while pos < len(ids):
        if ids[pos] != t.im_start:
            raise ValueError(f"position {pos}: expected <|im_start|>, got id {ids[pos]}")
        try:
            sep = ids.index(t.im_sep, pos + 1)
        except ValueError:
            raise ValueError(f"position {pos}: message header without <|im_sep|>") from None
        role = tok.decode(ids[pos + 1:sep])
        if role not in ROLES:
            raise ValueError(f"position {pos}: unknown role {role!r}")
        content, used = _parse_content(tok, ids[sep + 1:], t)
        if role != "assistant" and not isinstance(content, str):
            raise ValueError(f"position {pos}: tool tokens inside a {role} message")
        messages.append({"role": role, "content": content})
        pos = sep + 1 + used
    return messages
