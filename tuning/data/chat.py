"""Chat rows → training samples in which every assistant turn is trained exactly as the model generates
it, in exactly the context the chat template gives it at inference. Every path that renders chat data
uses this module: data files (``--training_data_path``), data-config handlers, ``tuning preview`` and
``--do_dataprocessing_only``.

The rule (docs/data.md, "Chat data"), for each trained assistant turn k of ``messages``:

- its **context** is ``render(messages[:k], add_generation_prompt=True)`` (with the row's ``tools``,
  ``documents`` and template arguments): what the model is given at inference;
- its **completion** is what follows that context in ``render(messages[:k+1])``, the rendering in which
  message k is the last one (reasoning, tool calls, content), through the first stop token
  (``generation_config.eos_token_id`` and the tokenizer's EOS) and nothing after it;
- turns whose context + completion appear, at the same place, in a later turn's sample are trained in
  that sample; a template that renders history differently once a turn follows (Qwen3 drops earlier
  reasoning, gpt-oss ends only the last turn with ``<|return|>``, Mistral moves the system prompt) gets
  more samples, the fewest that keep every turn's context exact.

Everything is found on characters, then checked on tokens: a turn whose context or completion does not
end on a token boundary of its sample (a token merged across the seam) gets a sample of its own, made of
the context's tokens followed by the completion's, the sequence the model sees and produces at
inference. ``{% generation %}`` templates say themselves which characters are trained.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from tuning.compat import transformers as hf
from tuning.config import DataArgs
from tuning.data import formats
from tuning.data.sandbox import template_errors
from tuning.data.tokenize import (
    IGNORE_INDEX,
    NOTHING_TRAINED,
    OK,
    Span,
    check_invariants,
    require_offsets,
)
from tuning.errors import UserError, excerpt

TrainOn = Literal["responses", "last_response", "all"]
TRAIN_ON: tuple[str, ...] = ("responses", "last_response", "all")
# Characters the template may render per conversation to find its turns' contexts and completions
# (two renders per trained turn: quadratic in the number of turns). About 1M tokens.
DEFAULT_RENDER_BUDGET = 4_000_000
NO_ASSISTANT = "no_assistant_turn"
# Column next to input_ids/labels: [part, parts, turns over the render budget] of the sample's
# conversation; counted into DataStats and dropped before training (kept for ``tuning preview``).
SAMPLE_INFO = "chat_sample"
# Column next to input_ids/labels: one byte per token saying what the token is (the data audit's role and
# turn-position breakdown, tuning/data/audit.py); truncated with the sample, dropped before training.
TOKEN_ROLES = "token_roles"
ROLE_CODES = {"template": 0, "system": 1, "user": 2, "tool": 3, "assistant": 4}
POSITION_CODES = {"first": 1 << 3, "middle": 2 << 3, "last": 3 << 3, "only": 4 << 3}
REASONING_BIT, TOOL_CALL_BIT = 1 << 6, 1 << 7
# A message's reasoning goes by these names; transformers (5.24) gives a template all of them, since
# Qwen3 reads reasoning_content and gpt-oss reads thinking. We do the same, whatever its version.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# ShareGPT ``from`` values → roles (LLaMA-Factory's function_call/observation included).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "function_call": "assistant",
}
# Content no message holds (a private-use character): where a turn's rendering first depends on it.
_PROBE = "\ue000"
CHAT_TEMPLATE = "the chat template"  # how errors name it
# A template marks the characters it trains itself with {% generation %} ... {% endgeneration %}.
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class ChatSettings:
    """The job's chat options, the same for every path (built once per job by the data stage:
    ``tuning.data.prepare.encoding_context``). The stop tokens have no default: settings that forgot
    them would train every turn past the model's end of turn."""

    stop_token_ids: tuple[int, ...]
    train_on: TrainOn = "responses"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    render_budget: int = DEFAULT_RENDER_BUDGET
    keep_sample_info: bool = False  # ``tuning preview`` shows which samples one conversation became
    # Where a template writes no end-of-turn after an assistant message (LLaVA-1.5), the stop token the
    # model emits at inference (this text) is appended to the turn and trained; the separator whitespace
    # the template writes instead is not. Set by the image-text path (docs/vision.md).
    append_stop: str | None = None


def settings_from_args(
    args: DataArgs, stop_token_ids: Sequence[int], *, keep_sample_info: bool = False
) -> ChatSettings:
    """The job's chat settings: its flags and the model's stop tokens."""
    return ChatSettings(
        stop_token_ids=tuple(stop_token_ids),
        train_on=args.train_on,
        template_kwargs=dict(args.chat_template_kwargs or {}),
        render_budget=args.chat_render_budget,
        keep_sample_info=keep_sample_info,
    )


def job_chat_template(args: DataArgs, data_config_template: str | None = None) -> str | None:
    """The chat template the job trains with, and that its saved tokenizer carries: a data config's
    ``chat_template``, else ``--chat_template``, else ``--chat_template_path``'s; None: the tokenizer's
    own. Decided here only (``tuning.data.prepare.encoding_context`` calls it once per job)."""
    if data_config_template:
        return data_config_template
    if args.chat_template:
        return args.chat_template
    return read_chat_template(args.chat_template_path) if args.chat_template_path else None


def read_chat_template(path: str) -> str:
    """``--chat_template_path``: a template file, or a tokenizer folder's template (its
    ``chat_template.jinja`` or the ``chat_template`` of its ``tokenizer_config.json``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if p.is_dir():
        if (p / "chat_template.jinja").is_file():
            return (p / "chat_template.jinja").read_text(encoding="utf-8")
        config = p / "tokenizer_config.json"
        template = (
            json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
        )
        if isinstance(template, str):
            return template
        raise UserError(
            f"--chat_template_path {path}: the folder holds no chat_template.jinja or chat_template"
        )
    raise UserError(f"--chat_template_path {path} does not exist; pass a .jinja file or a tokenizer folder")


@dataclass
class Conversation:
    """One row's conversation and what its template needs besides the messages."""

    messages: list[dict[str, Any]]
    first_trainable: int = 0  # messages before this index are context only (a prompt)
    tools: list | None = None
    documents: list | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


# --- rows → conversations ------------------------------------------------------------------------


def strip_none(value: Any) -> Any:
    """``value`` without null entries in its mappings, recursively. Arrow gives every row of a column the
    union of the keys seen in any row, missing ones as null (``"tool_calls": null``, a tool schema's
    absent property), and templates test keys with ``in``: a null is treated as absent, as transformers
    does for a message's top-level keys."""
    if isinstance(value, Mapping):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [strip_none(v) for v in value]
    return value


def _json_value(value: Any, name: str) -> Any:
    if isinstance(value, str):  # tools and documents are often stored as JSON text to dodge Arrow's schema
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(
                f"column '{name}' holds text that is not JSON ({e.msg}): {excerpt(value)}"
            ) from None
    return value


def normalize_messages(value: Any, column: str) -> list[dict[str, Any]]:
    """A row's messages as a list of ``{role, ...}`` dicts: nulls dropped, ShareGPT ``from``/``value``
    turned into ``role``/``content``, reasoning given under every name templates read."""
    value = _json_value(value, column)
    if not isinstance(value, list) or not value:
        raise UserError(
            f"column '{column}' must hold a non-empty list of messages ({{role, content}} or ShareGPT "
            f"{{from, value}}), found {type(value).__name__}: {excerpt(value)}"
        )
    messages = []
    for message in value:
        if not isinstance(message, Mapping):
            raise UserError(f"column '{column}': a message is not an object: {excerpt(message)}")
        message = strip_none(message)
        if "role" not in message and "from" in message:
            message = _from_sharegpt(message, column)
        if not isinstance(message.get("role"), str):
            raise UserError(f"column '{column}': a message has no role: {excerpt(message)}")
        reasoning = next((message[f] for f in REASONING_FIELDS if message.get(f) is not None), None)
        if reasoning is not None:
            message = {**message, "thinking": reasoning, "reasoning_content": reasoning}
        messages.append(message)
    return messages


def _from_sharegpt(message: dict[str, Any], column: str) -> dict[str, Any]:
    source = str(message.pop("from"))
    role = SHAREGPT_ROLES.get(source.lower())
    if role is None:
        raise UserError(
            f"column '{column}': unknown ShareGPT speaker 'from: {source}'; known: {', '.join(SHAREGPT_ROLES)}"
        )
    content = message.pop("value", "")
    if source.lower() == "function_call":  # the call as JSON {"name", "arguments"} → a tool call
        call = _json_value(content, f"{column} (function_call)")
        if not isinstance(call, Mapping) or "name" not in call:
            raise UserError(
                f"column '{column}': a function_call's value is not {{name, arguments}}: {excerpt(call)}"
            )
        return {
            **message,
            "role": role,
            "content": "",
            "tool_calls": [{"type": "function", "function": call}],
        }
    return {**message, "role": role, "content": content}


def conversation_from_row(
    row: Mapping[str, Any], messages: list[dict[str, Any]], settings: ChatSettings, first_trainable: int = 0
) -> Conversation:
    """A conversation with the row's ``tools``, ``documents`` and ``chat_template_kwargs`` columns."""
    kwargs = dict(settings.template_kwargs)
    row_kwargs = _json_value(row.get("chat_template_kwargs"), "chat_template_kwargs")
    if isinstance(row_kwargs, Mapping):
        kwargs.update(strip_none(row_kwargs))
    tools = strip_none(_json_value(row.get("tools"), "tools"))
    documents = strip_none(_json_value(row.get("documents"), "documents"))
    return Conversation(messages, first_trainable, tools or None, documents or None, kwargs)


def conversations_from_rows(
    rows: list[Mapping[str, Any]], column: str, settings: ChatSettings
) -> list[Conversation]:
    """Rows whose ``column`` holds a conversation (messages, ShareGPT included) → conversations."""
    return [conversation_from_row(r, normalize_messages(r[column], column), settings) for r in rows]


def conversations_of_batch(
    batch: dict[str, list], fmt: str, args: DataArgs, settings: ChatSettings, templated: bool
) -> list[Conversation] | None:
    """The batch's rows as conversations when they are chat data, else None: ``messages``/``conversations``
    (ShareGPT included), prompt/completion given as lists of messages (the prompt is context), and alpaca
    rows when the job has a chat template (``templated``: the instruction, then the input, as the user's
    turn)."""
    messages = fmt == "prompt_completion" and batch["prompt"] and not isinstance(batch["prompt"][0], str)
    chat_alpaca = fmt == "alpaca" and templated
    if not (fmt == "chat" or messages or chat_alpaca):
        return None  # a text format: formats.render_batch reads the rows
    rows = formats.rows_of(batch)
    if fmt == "chat":
        return conversations_from_rows(rows, formats.conversation_column(args, list(batch)), settings)
    if messages:
        out = []
        for r in rows:
            prompt = normalize_messages(r["prompt"], "prompt")
            completion = normalize_messages(r["completion"], "completion")
            out.append(conversation_from_row(r, prompt + completion, settings, len(prompt)))
        return out
    out = []
    for r in rows:  # alpaca with a chat template: the instruction (and input) as the user's turn
        system = [{"role": "system", "content": r["system"]}] if r.get("system") else []
        user = {"role": "user", "content": formats.alpaca_user_message(r)}
        assistant = {"role": "assistant", "content": formats.require_text(r["output"], "output")}
        out.append(conversation_from_row(r, [*system, user, assistant], settings, len(system) + 1))
    return out


# --- the template ----------------------------------------------------------------------------------


class ChatTemplate:
    """``render(messages, conversation, generation_prompt)`` with the chat template, as
    ``apply_chat_template(..., tokenize=False)`` renders it (the tokenizer's special tokens as
    variables, the conversation's template arguments over them).

    Locating turns renders a conversation twice per trained turn, and ``apply_chat_template`` spends
    several times the template's own time per call copying and checking its inputs, so the messages
    are normalised once per row (:func:`normalize_messages`) and rendered with the compiled, sandboxed
    template transformers itself caches and uses."""

    def __init__(self, tokenizer: Any, template: Any = None) -> None:
        self.tokenizer = tokenizer
        self.source = template or getattr(tokenizer, "chat_template", None)
        if self.source is None:
            raise UserError(
                f"chat data needs a chat template, and tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
                "has none; pass --chat_template (a Jinja string) or use a tokenizer that ships one"
            )
        self.specials = dict(tokenizer.special_tokens_map)

    def text(self, tools: Any = None) -> str:
        if isinstance(self.source, str):
            return self.source
        # a dict of named templates: transformers' choice, "tool_use" when tools are given
        return self.source["tool_use" if tools and "tool_use" in self.source else "default"]

    def marks_generation(self, tools: Any = None) -> bool:
        return bool(_GENERATION_TAG.search(self.text(tools)))

    def render(self, messages: Any, conversation: Conversation, generation_prompt: bool = False) -> str:
        """The template's rendering; its failures (a sandbox refusal, its own ``raise_exception`` on a
        conversation it does not accept) are one-line user errors naming the conversation."""
        with template_errors(CHAT_TEMPLATE, compiling=True):
            compiled = hf.compile_jinja_template(self.text(conversation.tools))
        with template_errors(CHAT_TEMPLATE, messages):
            return compiled.render(
                messages=messages,
                tools=conversation.tools,
                documents=conversation.documents,
                add_generation_prompt=generation_prompt,
                **{**self.specials, **conversation.kwargs},
            )

    def generation_spans(self, conversation: Conversation) -> tuple[str, list[Span]]:
        # transformers computes the character spans of {% generation %} blocks while rendering (the
        # machinery of return_assistant_tokens_mask); using them keeps our offset-based masking.
        from transformers.utils.chat_template_utils import render_jinja_template

        template = self.text(conversation.tools)
        with template_errors(CHAT_TEMPLATE, compiling=True):
            hf.compile_jinja_template(template)  # cached: render_jinja_template reuses it
        with template_errors(CHAT_TEMPLATE, conversation.messages):
            rendered, indices = render_jinja_template(
                conversations=[conversation.messages],
                tools=conversation.tools,
                documents=conversation.documents,
                chat_template=template,
                return_assistant_tokens_mask=True,
                **{**self.specials, **conversation.kwargs},
            )
        return rendered[0], [(int(a), int(b)) for a, b in indices[0] if b > a]


def stop_strings(tokenizer: Any, stop_token_ids: Sequence[int]) -> tuple[str, ...]:
    """The texts of the stop tokens: the tokenizer's EOS and the given ids that are added tokens (only
    those have a fixed text in a rendering)."""
    added = tokenizer.added_tokens_decoder
    texts = {added[i].content for i in stop_token_ids if i in added}
    if tokenizer.eos_token:
        texts.add(tokenizer.eos_token)
    return tuple(sorted(texts, key=len, reverse=True))  # longer first: a token wins over one it contains


@lru_cache(maxsize=32)
def _stop_pattern(stops: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, stops))) if stops else None


# --- characters: contexts, completions and the samples they share ---------------------------------


@dataclass
class ChatSample:
    """A training text and the character spans ``(context end, completion end)`` of its trained turns.

    ``checked`` samples (the turn rule) have their boundaries verified on tokens; whole-text and
    ``{% generation %}`` samples are trained as marked."""

    text: str
    turns: list[Span]
    checked: bool = True
    # (start, end, code) character regions painted in order onto the tokens: TOKEN_ROLES
    regions: list[tuple[int, int, int]] = field(default_factory=list)


def turn_completion(
    context: str, rendered: str, stops: Sequence[str], probe: Callable[[], str] | None = None
) -> str:
    """What the model generates after ``context``: the rest of ``rendered`` (the rendering that ends with
    the turn) after the context, through the first stop token.

    When ``rendered`` does not start with the context, the template rewrote the history when the turn
    was appended (Mistral v0.3 attaches the system prompt to the last user message only). The context
    then ends where the longest suffix of its diverging part reappears in ``rendered`` before the turn's
    own content: ``probe()`` renders the same turn with other content, and the turn's content can start
    no earlier than where the two renderings first differ."""
    start = _common_prefix_length(context, rendered)
    if start < len(context) and probe is not None:
        start = _resync(context, rendered, start, _common_prefix_length(rendered, probe()))
    completion = rendered[start:]
    pattern = _stop_pattern(tuple(stops))
    found = pattern.search(completion) if pattern else None
    return completion[: found.end()] if found else completion


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _resync(context: str, rendered: str, start: int, limit: int) -> int:
    tail, rest = context[start:], rendered[start:limit]
    lo, hi = 0, len(tail)  # the longest n with tail[-n:] in rest (if n fits, every shorter one does)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tail[-mid:] in rest:
            lo = mid
        else:
            hi = mid - 1
    return start + rest.find(tail[-lo:]) + lo if lo else start


def conversation_samples(
    conversation: Conversation, template: ChatTemplate, settings: ChatSettings, stops: Sequence[str]
) -> tuple[list[ChatSample], int]:
    """The samples of one conversation and how many trained turns the render budget left out.

    Turns are taken first to last; a turn whose sample (context + completion) starts with the sample
    built so far takes it over, since every turn in that one then sits at the same place in its own;
    otherwise the turn starts a new sample. Equal to the fewest samples whenever the samples that contain
    each other form chains, which is what templates do (and never less exact otherwise)."""
    messages = conversation.messages
    if settings.train_on == "all":
        text = template.render(messages, conversation)
        return [ChatSample(text, [(0, len(text))], False, _content_regions(text, messages))], 0
    trainable = [
        i
        for i, m in enumerate(messages)
        if i >= conversation.first_trainable and m.get("role") == "assistant"
    ]
    if settings.train_on == "last_response":
        trainable = trainable[-1:]
    if not trainable:
        return [], 0
    # {% generation %} marks (LLaVA-1.5's) leave the stop token out: the turn rule below appends it
    if template.marks_generation(conversation.tools) and settings.append_stop is None:
        sample = _generation_sample(conversation, template, settings)
        sample.regions = _content_regions(sample.text, messages)
        return [sample], 0
    samples: list[ChatSample] = []
    last: list[int] = []  # each sample's last trained message
    rendered = 0
    for n, k in enumerate(trainable):
        if rendered > settings.render_budget:
            break
        context = template.render(messages[:k], conversation, True)
        full = template.render(messages[: k + 1], conversation)
        rendered += len(context) + len(full)
        probe = partial(template.render, [*messages[:k], {**messages[k], "content": _PROBE}], conversation)
        completion = turn_completion(context, full, stops, probe)
        if settings.append_stop and not completion.endswith(tuple(stops)):
            completion = completion.rstrip() + settings.append_stop
        if not completion:
            raise UserError(
                f"the chat template renders nothing for assistant message {k} of a conversation "
                f"(roles {[m.get('role') for m in messages]}); check the message's fields"
            )
        text = context + completion
        turn = (len(context), len(text))
        regions = _turn_regions(turn, text, messages[k], _position(n, len(trainable)))
        if samples and text.startswith(samples[-1].text):
            samples[-1] = ChatSample(text, [*samples[-1].turns, turn], True, [*samples[-1].regions, *regions])
            last[-1] = k
        else:
            samples.append(ChatSample(text, [turn], True, regions))
            last.append(k)
    for sample, k in zip(samples, last, strict=True):  # the context's messages, under the trained turns
        sample.regions = _content_regions(sample.text[: sample.turns[-1][0]], messages[:k]) + sample.regions
    return samples, len(trainable) - len([t for s in samples for t in s.turns])


def _position(n: int, turns: int) -> int:
    if turns == 1:
        return POSITION_CODES["only"]
    return POSITION_CODES["first" if n == 0 else "last" if n == turns - 1 else "middle"]


def _content_regions(text: str, messages: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, int]]:
    """Where each message's text content sits in a rendering, with its role's code: found in order (a
    template that moves a message, as Mistral does with the system prompt, is searched from the start)."""
    out, cursor = [], 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or not content:
            continue
        code = ROLE_CODES.get(m.get("role"), 0)
        at = text.find(content, cursor)
        if at >= 0:
            cursor = at + len(content)
        else:
            at = text.find(content)
        if at >= 0:
            out.append((at, at + len(content), code))
    return out


def _turn_regions(
    turn: Span, text: str, message: Mapping[str, Any], position: int
) -> list[tuple[int, int, int]]:
    """A trained turn's completion: assistant at its position; its reasoning marked; the rest of a turn
    that calls tools (outside its content and reasoning) marked as the tool call."""
    start, end = turn
    assistant = ROLE_CODES["assistant"] | position
    calls = TOOL_CALL_BIT if message.get("tool_calls") else 0
    out = [(start, end, assistant | calls)]
    for value, bit in ((message.get("content"), 0), (message.get("reasoning_content"), REASONING_BIT)):
        value = value.strip() if isinstance(value, str) else ""
        at = text.find(value, start, end) if value else -1
        if at >= 0:
            out.append((at, at + len(value), assistant | bit))
    return out


def _generation_sample(
    conversation: Conversation, template: ChatTemplate, settings: ChatSettings
) -> ChatSample:
    text, spans = template.generation_spans(conversation)
    if conversation.first_trainable:  # a prompt's own assistant turns are context
        prompt = template.render(conversation.messages[: conversation.first_trainable], conversation, True)
        prompt_end = _common_prefix_length(prompt, text)
        spans = [s for s in spans if s[0] >= prompt_end]
    if settings.train_on == "last_response":
        spans = spans[-1:]
    return ChatSample(text, spans, checked=False)


# --- tokens -----------------------------------------------------------------------------------------


@dataclass
class _Encoded:
    ids: list[int]
    labels: list[int]
    order: int  # the sample's last trained character: samples of a conversation in turn order
    roles: bytes = b""  # TOKEN_ROLES


_start = itemgetter(0)


def token_roles(offsets: Sequence[Sequence[int]], regions: Sequence[tuple[int, int, int]]) -> bytes:
    """One code per token (:data:`TOKEN_ROLES`): each region painted, in order, onto the tokens that start
    inside it; a token outside every region is template text (0). Bisection over the regions, not a pass
    in Python over the tokens: the audit must cost little next to tokenizing."""
    codes = bytearray(len(offsets))
    for a, b, code in regions:
        i, j = bisect_left(offsets, a, key=_start), bisect_left(offsets, b, key=_start)
        if j > i:
            codes[i:j] = bytes((code,)) * (j - i)
    return bytes(codes)


def mask_and_check(offsets: Sequence[Sequence[int]], turns: Sequence[Span]) -> tuple[list[bool], set[int]]:
    """One pass over the tokens: which carry loss (cover a character of a turn's completion), and which
    turns have a token straddling their context end or completion end."""
    mask = [False] * len(offsets)
    broken: set[int] = set()
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(turns) and s >= turns[j][1]:
            j += 1
        if j == len(turns):
            break
        a, b = turns[j]
        if e > s and e > a:
            mask[t] = True
        if s < a < e or s < b < e:
            broken.add(j)
    return mask, broken


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` tokenized as the continuation of a sequence: after a newline that is then removed, so a
    SentencePiece tokenizer adds no word-start space (transformers' own trick for chat pieces)."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer("\n" + text, add_special_tokens=False)["input_ids"]
    if ids[: len(newline)] == newline:
        return ids[len(newline) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_samples(tokenizer: Any, samples: list[ChatSample]) -> list[list[_Encoded]]:
    """Each sample's token ids and labels, after the token-level check; a sample can come back as several
    when one of its earlier turns has a token merged across its boundary (that turn is moved to a sample
    of its own)."""
    out: list[list[_Encoded]] = [[] for _ in samples]
    pending = list(enumerate(samples))
    while pending:
        enc = tokenizer([s.text for _, s in pending], add_special_tokens=False, return_offsets_mapping=True)
        again = []
        for (index, sample), ids, offsets in zip(
            pending, enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            mask, broken = mask_and_check(offsets, sample.turns)
            if sample.checked and len(sample.turns) - 1 in broken:
                # the last turn's context ends inside a token: the context's tokens, then the completion's
                ids, offsets = _split_at_context(tokenizer, sample)
                mask, broken = mask_and_check(offsets, sample.turns)
            if sample.checked and broken:  # an earlier turn merged across a seam: a sample of its own
                again += [
                    (
                        index,
                        ChatSample(
                            sample.text[: sample.turns[j][1]], [sample.turns[j]], True, sample.regions
                        ),
                    )
                    for j in broken
                ]
                mask = mask_and_check(offsets, [t for j, t in enumerate(sample.turns) if j not in broken])[0]
            out[index].append(_labelled(ids, mask, sample, token_roles(offsets, sample.regions)))
        pending = again
    for encoded in out:
        encoded.sort(key=lambda e: e.order)
    return out


def _split_at_context(tokenizer: Any, sample: ChatSample) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and offsets of the last turn's context tokenized alone, then its completion as a continuation
    (each completion token is given the completion's whole range: all of them are trained)."""
    start, end = sample.turns[-1]
    context = tokenizer(sample.text[:start], add_special_tokens=False, return_offsets_mapping=True)
    completion = continuation_ids(tokenizer, sample.text[start:end])
    ids = list(context["input_ids"]) + completion
    return ids, list(context["offset_mapping"]) + [(start, end)] * len(completion)


def _labelled(ids: list[int], mask: list[bool], sample: ChatSample, roles: bytes) -> _Encoded:
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return _Encoded(list(ids), labels, sample.turns[-1][1] if sample.turns else 0, roles)


# --- a batch of rows --------------------------------------------------------------------------------


def encode_conversations(
    conversations: list[Conversation],
    tokenizer: Any,
    chat_template: Any,
    settings: ChatSettings,
    max_len: int,
) -> tuple[dict[str, list], list[int]]:
    """Conversations → ``input_ids``, ``labels``, ``status``, ``truncated``, ``trained_lost`` (trained
    tokens cut by truncation), :data:`SAMPLE_INFO` and :data:`TOKEN_ROLES` columns, one row per sample, and the index of the conversation each sample came from. A conversation
    without a trained assistant turn gives one empty row with status ``no_assistant_turn``."""
    require_offsets(tokenizer)
    template = ChatTemplate(tokenizer, chat_template)
    stops = stop_strings(tokenizer, settings.stop_token_ids)
    per_conversation = [conversation_samples(c, template, settings, stops) for c in conversations]
    flat = [s for samples, _ in per_conversation for s in samples]
    encoded = iter(encode_samples(tokenizer, flat))
    out: dict[str, list] = {k: [] for k in (*_COLUMNS, SAMPLE_INFO, TOKEN_ROLES)}
    rows: list[int] = []
    for row, (samples, over_budget) in enumerate(per_conversation):
        parts = [e for _ in samples for e in next(encoded)]
        if not parts:
            _append(out, ([], [], NO_ASSISTANT, False, 0, [0, 1, over_budget], b""))
            rows.append(row)
            continue
        for i, part in enumerate(parts):
            truncated = len(part.ids) > max_len
            ids, labels = part.ids[:max_len], part.labels[:max_len]
            lost = len(part.labels) - max_len - part.labels[max_len:].count(IGNORE_INDEX) if truncated else 0
            check_invariants(ids, labels, eos_id=None, complete=False)
            status = OK if len(labels) > labels.count(IGNORE_INDEX) else NOTHING_TRAINED
            info = [i, len(parts), over_budget if i == 0 else 0]
            _append(out, (ids, labels, status, truncated, lost, info, part.roles[:max_len]))
            rows.append(row)
    return out, rows


_COLUMNS = ("input_ids", "labels", "status", "truncated", "trained_lost")


def _append(out: dict[str, list], values: tuple) -> None:
    for key, value in zip((*_COLUMNS, SAMPLE_INFO, TOKEN_ROLES), values, strict=True):
        out[key].append(value)
