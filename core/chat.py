"""Conversations <-> tokens: the one place that knows chat templates and the tool-call tokens.

A chat template is an object (`ChatTemplate`) that sampling, chat, SFT and RL receive; nothing
else spells a special token. Two kinds:

- `zipchat_template(tok)`: zipchat's own format, defined in this module (below).
- `hf_template(tok, tokenizer_config)`: a Hugging Face checkpoint's Jinja chat template (ChatML as
  in Qwen2.5, Llama 3's header tokens, ...), rendered exactly as transformers'
  `apply_chat_template(..., sanitize_control_tokens=True)` renders it, so an imported model is
  fine-tuned, sampled and RL-trained in its native format (see "Hugging Face templates" below).

Every template has `render(messages, add_generation_prompt=False) -> (ids, mask)`,
`render_for_completion(messages) -> ids`, `parse_assistant(ids) -> message`, `stop_ids` (where an
assistant turn ends), `bos_ids` / `eos_ids` (around a plain document, for base-model sampling) and
`tools` (a `ToolProtocol`, or None for templates without tool tokens).

zipchat's template (every message, any role):

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
checked against fixed lists. Hugging Face templates get the same guarantee (see there).
"""
from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import json
import re
from typing import Any, Mapping, Sequence

# ----------------------------------------------------------------------------------------------
# zipchat's special tokens: defined here once (core/tokenizer.SPECIAL_TOKENS and core/tools'
# TOOL_TOKENS are these names; ids always come from a tokenizer).

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_SEP = "<|im_sep|>"
IM_END = "<|im_end|>"
OUTPUT_START = "<|output_start|>"
OUTPUT_END = "<|output_end|>"
TOOL_NAMES: tuple[str, ...] = ("python", "calculator", "search")


def tool_token_names(tool: str) -> tuple[str, str]:
    """The start and end token names of a tool in zipchat's protocol: <|{tool}_start|>, <|{tool}_end|>."""
    return f"<|{tool}_start|>", f"<|{tool}_end|>"


TOOL_TOKENS: dict[str, tuple[str, str]] = {name: tool_token_names(name) for name in TOOL_NAMES}
START_TOKEN_TO_TOOL: dict[str, str] = {start: name for name, (start, _) in TOOL_TOKENS.items()}
END_TOKEN_TO_TOOL: dict[str, str] = {end: name for name, (_, end) in TOOL_TOKENS.items()}
# Every special token zipchat's tokenizers reserve, in id order (core/tokenizer.SPECIAL_TOKENS).
SPECIAL_TOKENS: tuple[str, ...] = (BOS, IM_START, IM_SEP, IM_END,
                                   *(name for pair in TOOL_TOKENS.values() for name in pair),
                                   OUTPUT_START, OUTPUT_END)

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
PART_TYPES: tuple[str, ...] = ("text", "tool_call", "tool_output")

Message = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# The tool protocol


@dataclasses.dataclass(frozen=True, eq=False)
class ToolProtocol:
    """How tools live in the token stream: the model writes `start[tool] input end[tool]`; the
    engine runs the tool and feeds `output_start output output_end` (never trained on).

    Attributes:
      tokenizer: encodes tool inputs and outputs, decodes calls.
      start, end: tool name -> id of its start / end token.
      output_start, output_end: ids around a tool's output.
    """

    tokenizer: Any
    start: Mapping[str, int]
    end: Mapping[str, int]
    output_start: int
    output_end: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.start)

    @property
    def start_to_tool(self) -> dict[int, str]:
        return {i: name for name, i in self.start.items()}

    def end_to_tool(self, names: Sequence[str] | None = None) -> dict[int, tuple[str, int]]:
        """{end id: (tool name, start id)} for `names` (default: all), what the engine watches for.

        Raises:
          ValueError: a tool the protocol has no tokens for.
        """
        names = self.names if names is None else tuple(names)
        missing = [n for n in names if n not in self.start]
        if missing:
            raise ValueError(f"tool(s) {missing}: the chat template has no start/end tokens for them; "
                             f"it has {list(self.names)}")
        return {int(self.end[n]): (n, int(self.start[n])) for n in names}

    def render_call(self, tool: str, text: str) -> list[int]:
        """start[tool] text end[tool] as ids (what the model writes to call a tool)."""
        if tool not in self.start:
            raise ValueError(f"tool {tool!r} is not one of {list(self.names)}")
        return [self.start[tool], *self.tokenizer.encode(text), self.end[tool]]

    def render_output(self, text: str, limit: int | None = None) -> list[int]:
        """output_start text output_end as ids; with `limit`, the text is cut so that all of it,
        delimiters included, fits `limit` tokens (what the engine force-feeds after a call)."""
        body = self.tokenizer.encode(text)
        if limit is not None:
            body = body[: max(limit - 2, 0)]
        return [self.output_start, *body, self.output_end]


def tool_protocol(tok, names: Sequence[str] = TOOL_NAMES) -> ToolProtocol:
    """zipchat's tool protocol for the tools `names` in `tok`.

    Raises:
      ValueError: naming the tool whose <|name_start|>/<|name_end|> tokens `tok` lacks, or the
        missing output delimiters.
    """
    start, end = {}, {}
    for name in names:
        s, e = tool_token_names(name)
        try:
            start[name], end[name] = tok.special_id(s), tok.special_id(e)
        except (KeyError, ValueError):
            raise ValueError(f"tool {name!r}: the tokenizer has no {s}/{e} tokens") from None
    try:
        out_start, out_end = tok.special_id(OUTPUT_START), tok.special_id(OUTPUT_END)
    except (KeyError, ValueError):
        raise ValueError(f"the tokenizer has no {OUTPUT_START}/{OUTPUT_END} tokens for tool outputs") from None
    return ToolProtocol(tok, start, end, out_start, out_end)


# ----------------------------------------------------------------------------------------------
# Templates


@dataclasses.dataclass(frozen=True, eq=False)
class ChatTemplate:
    """A chat format over one tokenizer (see the module docstring). Subclasses implement
    `render` and `parse_assistant`.

    Attributes:
      name: 'zipchat', or where a Hugging Face template came from.
      tokenizer: the tokenizer whose ids the template produces.
      stop_ids: ids that end an assistant turn during sampling (end-of-turn, end-of-text).
      bos_ids: ids a plain document starts with (base-model sampling); may be empty.
      eos_ids: ids that end a plain document.
      tools: the tool protocol, or None when the format has no tool tokens.
    """

    name: str
    tokenizer: Any
    stop_ids: tuple[int, ...]
    bos_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    tools: ToolProtocol | None

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] = 1 when ids[i] is a token the assistant produced (its text, tool
        calls and end-of-turn token); 0 for headers, other roles and tool outputs. With
        add_generation_prompt the next assistant header follows (mask 0)."""
        raise NotImplementedError

    def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The rendered conversation as text (special tokens spelled out), for logs and reports."""
        return self.tokenizer.decode(self.render(messages, add_generation_prompt=add_generation_prompt)[0])

    def render_for_completion(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids for sampling the next assistant reply. The caller removes a trailing
        assistant message (e.g. an RL reference answer) if it has one."""
        return self.render(messages, add_generation_prompt=True)[0]

    def parse_assistant(self, ids: Sequence[int]) -> Message:
        """Generated ids (after the assistant header) -> an assistant message in canonical form,
        read up to the first stop id."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class ZipchatTemplate(ChatTemplate):
    """zipchat's own template (the module docstring); the module-level functions do the work."""

    def render(self, messages, *, add_generation_prompt=False):
        ids, mask = render_conversation(self.tokenizer, messages)
        if add_generation_prompt:
            header = _header(self.tokenizer, "assistant")
            ids, mask = ids + header, mask + [0] * len(header)
        return ids, mask

    def parse_assistant(self, ids):
        return parse_assistant(self.tokenizer, ids)


def zipchat_template(tok) -> ZipchatTemplate:
    """zipchat's template over `tok`; KeyError naming the first template token `tok` lacks."""
    t = chat_tokens(tok)
    return ZipchatTemplate(name="zipchat", tokenizer=tok, stop_ids=(t.im_end, t.bos), bos_ids=(t.bos,),
                           eos_ids=(t.bos,), tools=tool_protocol(tok))


# ----------------------------------------------------------------------------------------------
# zipchat's template: ids


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


def _header(tok, role: str) -> list[int]:
    """<|im_start|>role<|im_sep|> as ids."""
    return [tok.special_id(IM_START), *tok.encode(role), tok.special_id(IM_SEP)]


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
    return tool_protocol(tok, (tool,)).render_call(tool, text)


def render_tool_output(tok, text: str) -> list[int]:
    """<|output_start|> text <|output_end|> as ids (what the engine force-feeds after a call)."""
    return tool_protocol(tok, ()).render_output(text)


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


# ----------------------------------------------------------------------------------------------
# Hugging Face templates
#
# Rendering: the template text from tokenizer_config.json runs in the Jinja environment
# transformers builds (sandboxed, trim_blocks, lstrip_blocks, loop controls, `{% generation %}`,
# a tojson that does not escape HTML, raise_exception, strftime_now), with the tokenizer's special
# tokens as variables (bos_token, eos_token, ...), and the rendered text is encoded with special
# tokens recognised. As with transformers' `sanitize_control_tokens=True`, a special token spelled
# inside a message is wrapped in private-use markers before rendering and encoded as plain text,
# so no message can inject one.
#
# Loss mask: a token is the assistant's when it overlaps an assistant span of the rendered text.
# With `{% generation %}` blocks in the template, the spans are those blocks (exactly
# transformers' `return_assistant_tokens_mask`). Without them (every released template), assistant
# message i spans from the end of render(messages[:i], add_generation_prompt=True) to the end of
# render(messages[:i + 1]), cut after its last stop token (so ChatML's "\n" after <|im_end|>,
# which the model never samples, is 0). Limits: this needs a template whose renders of shorter
# conversations are prefixes of longer ones (ValueError otherwise, naming the message; templates
# that rewrite earlier turns, e.g. by dropping old reasoning, need `{% generation %}` blocks), and
# a token that straddles a span edge counts as the assistant's.
#
# Other limits: every added token of tokenizer.json is a special token here, so an added token
# that transformers would not count as a control token (neither special nor spelled in the
# template) is encoded as text when typed in a message; added tokens' lstrip/rstrip flags are not
# applied (Qwen2.5 and Llama 3 set none); `parse_assistant` drops special ids from the reply, and
# tool calls written in a template's own text format (Qwen's <tool_call> JSON) stay plain text.

_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"  # private-use: never in a vocabulary
_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TRACKING: contextvars.ContextVar = contextvars.ContextVar("zipchat_generation_spans", default=None)


@functools.lru_cache(maxsize=32)
def _compile_jinja(source: str):
    """The template compiled in transformers' environment (see above); ValueError on bad syntax."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Chat templates come from checkpoints: untrusted code, and older Jinja has sandbox escapes.
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (found {jinja2.__version__}): pip install -U jinja2")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the block's character span."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_span", []), [], [], body).set_lineno(lineno)

        def _span(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:  # (blocks rendered so far, spans)
                start = sum(len(b) for b in tracking[0])
                tracking[1].append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def _token_text(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def template_source(tokenizer_config: Mapping[str, Any]) -> str:
    """The Jinja text of a tokenizer_config.json's `chat_template` (a string, or a list of
    {"name", "template"} from which 'default' is taken).

    Raises:
      ValueError: no chat template.
    """
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source.strip():
        raise ValueError("tokenizer_config.json has no chat_template (a base model's tokenizer may ship none)")
    return source


@dataclasses.dataclass(frozen=True, eq=False)
class JinjaTemplate(ChatTemplate):
    """A Hugging Face chat template (see "Hugging Face templates" above); built by `hf_template`.

    Attributes (besides ChatTemplate's):
      source: the Jinja text.
      variables: the special tokens' text the template sees (bos_token, eos_token, ...).
      end_of_turn: the id that closes an assistant message (None if the template writes none).
    """

    source: str
    variables: Mapping[str, str]
    end_of_turn: int | None

    def _messages(self, messages: Sequence[Message]) -> list[Message]:
        """Validated messages with plain-text content (the form Jinja templates read)."""
        if isinstance(messages, (str, dict)):
            raise ValueError("messages must be a list of message dicts")
        out = []
        for i, m in enumerate(messages):
            parts = message_parts(m, i)
            if any(p["type"] != "text" for p in parts):
                raise ValueError(f"message {i}: the chat template {self.name!r} has no tool-call tokens; "
                                 f"tool_call/tool_output parts need zipchat's template")
            # Keys set to None are dropped, as transformers does (templates test presence).
            out.append({**{k: v for k, v in m.items() if v is not None}, "content": "".join(p["text"] for p in parts)})
        return out

    def _render_text(self, messages: list[Message], add_generation_prompt: bool, spans: list | None = None) -> str:
        """The rendered text with marked control tokens; `spans` collects `{% generation %}` spans."""
        import jinja2

        compiled = _compile_jinja(self.source)
        kwargs = dict(self.variables, messages=messages, tools=None, documents=None,
                      add_generation_prompt=add_generation_prompt)
        try:
            if spans is None:
                return compiled.render(**kwargs)
            blocks: list[str] = []
            token = _TRACKING.set((blocks, spans))
            try:
                for block in compiled.generate(**kwargs):
                    blocks.append(block)
            finally:
                _TRACKING.reset(token)
            return "".join(blocks)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template {self.name!r}: {e}") from None

    def _marked(self, messages: list[Message]) -> list[Message]:
        """Messages whose special tokens are wrapped in markers (so they encode as plain text)."""
        specials = sorted(self.tokenizer.special_tokens, key=len, reverse=True)
        if not specials:
            return messages
        pattern = re.compile("|".join(map(re.escape, specials)))

        def mark(v):
            if isinstance(v, str):
                v = v.replace(_MARK_START, "").replace(_MARK_END, "")
                return pattern.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, v)
            if isinstance(v, dict):
                return {k: mark(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [mark(x) for x in v]
            return v

        return [mark(m) for m in messages]

    def _encode(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """Ids of rendered (marked) text and each token's [start, end) as byte offsets in the text."""
        tok = self.tokenizer
        ids: list[int] = []
        starts: list[int] = []
        ends: list[int] = []

        def emit(piece_ids, at_char):
            at = len(text[:at_char].encode("utf-8"))
            for i in piece_ids:
                ids.append(i)
                starts.append(at)
                at += len(tok.id_to_bytes(i))
                ends.append(at)

        pos = 0
        marked = re.compile(f"{_MARK_START}(.*?){_MARK_END}|[{_MARK_START}{_MARK_END}]", re.S)
        for m in marked.finditer(text):
            emit(tok.encode_with_special_tokens(text[pos:m.start()]), pos)
            if m.group(1):
                emit(tok.encode(m.group(1)), m.start(1))
            pos = m.end()
        emit(tok.encode_with_special_tokens(text[pos:]), pos)
        return ids, starts, ends

    def _assistant_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant messages by the prefix method (see above)."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render_text(messages[:i], True)
            through = self._render_text(messages[: i + 1], False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(f"chat template {self.name!r} is not prefix-stable at message {i} (rendering "
                                 f"more messages changes earlier text), so its assistant tokens cannot be "
                                 f"found; add {{% generation %}} blocks to the template")
            spans.append((len(before), len(through)))
        return spans

    def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The rendered conversation as text (what `apply_chat_template(tokenize=False)` gives)."""
        return self._render_text(self._messages(messages), add_generation_prompt)

    def render(self, messages, *, add_generation_prompt=False):
        messages = self._marked(self._messages(messages))
        generation_blocks = bool(_GENERATION_TAG.search(self.source))
        spans: list[tuple[int, int]] = []
        text = self._render_text(messages, add_generation_prompt, spans if generation_blocks else None)
        if not generation_blocks:
            spans = self._assistant_spans(messages, text)
        ids, starts, ends = self._encode(text)
        to_byte = lambda c: len(text[:c].encode("utf-8"))  # noqa: E731
        mask = [0] * len(ids)
        for s, e in spans:
            s, e = to_byte(s), to_byte(e)
            inside = [j for j in range(len(ids)) if ends[j] > s and starts[j] < e]
            if not generation_blocks:
                # Whatever follows the last stop token (ChatML's "\n") is never sampled.
                stops = [j for j in inside if ids[j] in self.stop_ids]
                inside = [j for j in inside if not stops or j <= stops[-1]]
            for j in inside:
                mask[j] = 1
        return ids, mask

    def parse_assistant(self, ids):
        out = []
        for i in ids:
            i = int(i)
            if i in self.stop_ids:
                break
            if not self.tokenizer.is_special(i):
                out.append(i)
        return {"role": "assistant", "content": self.tokenizer.decode(out)}


def hf_template(tok, tokenizer_config: Mapping[str, Any], *, name: str = "hf",
                generation_config: Mapping[str, Any] | None = None) -> JinjaTemplate:
    """A Hugging Face checkpoint's chat template over `tok` (its tokenizer.json, loaded by
    core.tokenizer.load).

    Args:
      tok: the checkpoint's tokenizer.
      tokenizer_config: the parsed tokenizer_config.json (with `chat_template`; a separate
        chat_template.jinja file is read by the caller into that key).
      name: shown in errors and banners (e.g. the checkpoint directory).
      generation_config: the parsed generation_config.json, if any: its eos_token_id(s) join the
        stop ids.
    Returns:
      a JinjaTemplate; stop ids are the template's end-of-turn token (found by rendering a probe
      conversation) plus the tokenizer's eos token and generation_config's eos ids; no tools.
    Raises:
      ValueError: no chat template, bad Jinja syntax, or a special token the tokenizer lacks.
    """
    source = template_source(tokenizer_config)
    _compile_jinja(source)
    variables = {k: _token_text(tokenizer_config.get(k)) for k in _TOKEN_KEYS}
    variables = {k: v for k, v in variables.items() if v is not None}
    extra = tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list):
        variables["additional_special_tokens"] = [_token_text(t) for t in extra if _token_text(t)]

    def token_id(key):
        text = variables.get(key)
        if text is None:
            return None
        if text not in tok.special_tokens:
            raise ValueError(f"tokenizer_config.json: {key} {text!r} is not a special token of the tokenizer")
        return tok.special_tokens[text]

    bos, eos = token_id("bos_token"), token_id("eos_token")
    gen_eos = (generation_config or {}).get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    probe = JinjaTemplate(name=name, tokenizer=tok, stop_ids=(), bos_ids=(), eos_ids=(), tools=None,
                          source=source, variables=variables, end_of_turn=None)
    eot = _end_of_turn(probe)
    stops = tuple(dict.fromkeys(int(i) for i in (eot, eos, *gen_eos) if i is not None))
    return dataclasses.replace(probe, stop_ids=stops, bos_ids=() if bos is None else (bos,),
                               eos_ids=() if eos is None else (eos,), end_of_turn=eot)


def _end_of_turn(template: JinjaTemplate) -> int | None:
    """The first special id the template writes after an assistant message's text (None if the
    probe conversation does not render or nothing special follows)."""
    user = {"role": "user", "content": "Hi"}
    reply = {"role": "assistant", "content": "Hello"}
    try:
        before = template._render_text([user], True)
        through = template._render_text([user, reply], False)
    except ValueError:
        return None
    if not through.startswith(before):
        return None
    after = through[len(before):]
    cut = after.find(reply["content"])
    if cut < 0:
        return None
    ids = template.tokenizer.encode_with_special_tokens(after[cut + len(reply["content"]):])
    return next((i for i in ids if template.tokenizer.is_special(i)), None)
