"""Chat masking on the chat templates of the model families people tune.

For every family and conversation, the trained runs of the samples we build, and the tokens before each
run, must equal the rule computed here from ``apply_chat_template`` alone (never from our masking
code): the context of assistant turn k is ``apply_chat_template(messages[:k], add_generation_prompt=True)``
tokenized as at inference, and its trained tokens are what follows that context in the rendering where
message k is the last one, through the first stop token of the model's ``generation_config``.

Real tokenizers come from ``../shared/real-tokenizers`` (skipped with the reason when absent); other
families (Gemma 3, Granite 3.1, Phi-3) are verbatim copies of their public templates
(``tests/chat_templates/``) on a synthetic tokenizer that carries their special tokens. A new family is
one more :class:`Family` entry. Llama 3.2, gpt-oss and Granite put today's date in the rendering: the
date is frozen for both sides.
"""

from __future__ import annotations

import datetime as real_datetime
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, run_cli, write_jsonl

from tuning.config.args import DataArgs
from tuning.data import chat
from tuning.data.handlers.chat import tokenize_and_apply_chat_template_with_masking
from tuning.data.handlers.templates import apply_tokenizer_chat_template
from tuning.data.handlers.tokenizing import tokenize
from tuning.data.prepare import EncodingContext, process_batch
from tuning.data.tokenize import IGNORE_INDEX, tokenize_batch

REAL = REPO.parent / "shared" / "real-tokenizers"
TEMPLATES = Path(__file__).parent / "chat_templates"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


@dataclass
class Family:
    """A model family: how to load its tokenizer, its stop tokens, the name its template gives a message's
    reasoning, and, where its template renders the history differently once an assistant turn follows,
    ``history(messages)``: the messages whose generation-prompt rendering is then the history."""

    name: str
    load: Callable[[], Any]
    stop_ids: Callable[[Any], list[int]]
    reasoning: str | None = None
    tool_call_id: str | None = None  # Mistral needs 9-character tool call ids
    history: Callable[[list[dict]], list[dict]] | None = None
    samples: dict[str, int] = field(default_factory=dict)  # conversation → the fewest exact samples
    tools: bool = True


def real_tokenizer(name: str) -> Callable[[], Any]:
    def load() -> Any:
        if not (REAL / name).is_dir():
            pytest.skip(f"real tokenizer folder {REAL / name} is absent (see ../shared/real-tokenizers)")
        return _load_real(name)

    return load


@cache
def _load_real(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL / name)


def real_stop_ids(name: str) -> Callable[[Any], list[int]]:
    def ids(tokenizer: Any) -> list[int]:
        eos = json.loads((REAL / name / "generation_config.json").read_text())["eos_token_id"]
        return [eos] if isinstance(eos, int) else list(eos)

    return ids


def synthetic(template: str, bos: str | None, eos: str, specials: list[str], adds_bos: bool) -> Any:
    """The tiny char-level tokenizer with a family's special tokens and template; ``adds_bos``: the
    tokenizer itself adds BOS (Gemma's does), so only a path that tokenizes without special tokens
    avoids a second one."""
    from tokenizers import processors

    from tuning.testing.tiny_model import build_tokenizer

    tok = build_tokenizer()
    tokens = {"eos_token": eos, "additional_special_tokens": specials}
    if bos:
        tokens["bos_token"] = bos
    tok.add_special_tokens(tokens, replace_extra_special_tokens=False)
    bos_id = tok.convert_tokens_to_ids(bos) if bos else None
    single = f"{bos} $A" if adds_bos else "$A"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(bos, bos_id)] if adds_bos else []
    )
    tok.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    return tok


def named_ids(*names: str) -> Callable[[Any], list[int]]:
    return lambda tokenizer: [tokenizer.convert_tokens_to_ids(n) for n in names]


def mistral_history(messages: list[dict]) -> list[dict]:
    # v0.3 puts the system prompt before the last user message only, and drops it when an assistant turn ends
    # the conversation: the history before a trained turn is rendered without it
    return [m for m in messages if m["role"] != "system"]


def gpt_oss_history(messages: list[dict]) -> list[dict]:
    # a tool call's analysis is rendered only while no final answer follows it
    return [{k: v for k, v in m.items() if not (k == "thinking" and "tool_calls" in m)} for m in messages]


FAMILIES = [
    Family(
        "qwen3",
        real_tokenizer("qwen3"),
        real_stop_ids("qwen3"),
        reasoning="reasoning_content",
        # the turn being generated always gets a <think> block, earlier turns before the last user
        # query lose theirs: each exchange is a sample of its own, a tool loop's turns too unless the
        # tool call carries reasoning
        samples={"basic": 2, "echo": 2, "tool": 2, "reasoning": 2, "tool_reasoning": 1},
    ),
    Family(
        "llama3.2",
        real_tokenizer("llama3.2"),
        real_stop_ids("llama3.2"),
        samples={"basic": 1, "echo": 1, "tool": 1},
    ),
    Family(
        "gpt-oss",
        real_tokenizer("gpt-oss"),
        real_stop_ids("gpt-oss"),
        reasoning="thinking",
        history=gpt_oss_history,
        # the last turn ends <|return|>, earlier ones <|end|>; a tool call keeps its analysis until the
        # final answer, and the final answer's context keeps it too
        samples={"basic": 2, "echo": 2, "tool": 1, "reasoning": 2, "tool_reasoning": 1},
    ),
    Family(
        "mistral-v0.3",
        real_tokenizer("mistral-v0.3"),
        real_stop_ids("mistral-v0.3"),
        tool_call_id="abc123def",
        history=mistral_history,
        samples={"basic": 2, "echo": 1, "tool": 1},
    ),
    Family(
        "gemma3",
        lambda: synthetic(
            "gemma3.jinja", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], adds_bos=True
        ),
        named_ids("<eos>", "<end_of_turn>"),
        samples={"basic": 1, "echo": 1},
        tools=False,
    ),
    Family(
        "granite3.1",
        lambda: synthetic(
            "granite3_1.jinja",
            None,
            "<|end_of_text|>",
            ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"],
            adds_bos=False,
        ),
        named_ids("<|end_of_text|>"),
        samples={"basic": 1, "echo": 1, "tool": 1},
    ),
    Family(
        "phi3",
        lambda: synthetic(
            "phi3.jinja",
            "<s>",
            "<|endoftext|>",
            ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
            False,
        ),
        named_ids("<|endoftext|>", "<|end|>"),
        samples={"basic": 1, "echo": 1},
        tools=False,
    ),
]


def conversations(family: Family) -> dict[str, tuple[list[dict], list | None]]:
    """Conversations with a system prompt, two assistant turns, an assistant echoing the user verbatim,
    reasoning, and a tool call with its response (tools in context)."""
    basic = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    echo = [
        {"role": "user", "content": "Say exactly: the sky is green"},
        {"role": "assistant", "content": "Say exactly: the sky is green"},
        {"role": "user", "content": "Again, the sky is green"},
        {"role": "assistant", "content": "the sky is green"},
    ]
    out: dict[str, tuple[list[dict], list | None]] = {"basic": (basic, None), "echo": (echo, None)}
    if family.tools:
        call: dict[str, Any] = {
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
        response: dict[str, Any] = {"role": "tool", "name": "get_weather", "content": "22 C and sunny"}
        if family.tool_call_id:
            call["id"] = response["tool_call_id"] = family.tool_call_id
        tool_turn = {"role": "assistant", "content": "", "tool_calls": [call]}
        final = {"role": "assistant", "content": "It is 22 C and sunny in Paris."}
        out["tool"] = (
            [{"role": "user", "content": "Weather in Paris?"}, tool_turn, response, final],
            [WEATHER_TOOL],
        )
        if family.reasoning:
            thinking_call = {
                "role": "assistant",
                "tool_calls": [call],
                family.reasoning: "I need the weather.",
            }
            final_thinking = {**final, family.reasoning: "The tool says 22 C."}
            out["tool_reasoning"] = (
                [{"role": "user", "content": "Weather in Paris?"}, thinking_call, response, final_thinking],
                [WEATHER_TOOL],
            )
    if family.reasoning:
        r = family.reasoning
        out["reasoning"] = (
            [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4.", r: "2 plus 2 makes 4."},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6.", r: "3 plus 3 makes 6."},
            ],
            None,
        )
    return out


CASES = [(f, c) for f in FAMILIES for c in f.samples]


@pytest.fixture(autouse=True)
def frozen_date(monkeypatch):
    """Templates that print today's date (strftime_now) see 26 Jul 2024 on both sides of a comparison."""
    import transformers.utils.chat_template_utils as ctu

    class Frozen(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 7, 26, 12, 0, 0)

    monkeypatch.setattr(ctu, "datetime", Frozen)


# --- the rule, computed from apply_chat_template alone --------------------------------------------------


def stop_texts(tokenizer: Any, family: Family) -> list[str]:
    ids = [*family.stop_ids(tokenizer), tokenizer.eos_token_id]
    return [tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None]


def expected_turns(tokenizer: Any, family: Family, messages: list[dict], tools: list | None) -> list[tuple]:
    """(context ids, trained ids) of every assistant turn, by the rule."""
    render = tokenizer.apply_chat_template
    stops = stop_texts(tokenizer, family)
    turns = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = render(messages[:k], tools=tools, add_generation_prompt=True, tokenize=False)
        full = render(messages[: k + 1], tools=tools, tokenize=False)
        if not full.startswith(context):  # the family's documented history rewrite
            assert family.history is not None, f"{family.name}: history rewritten at turn {k}"
            history = render(
                family.history(messages[:k]), tools=tools, add_generation_prompt=True, tokenize=False
            )
            assert full.startswith(history)
            completion = full[len(history) :]
        else:
            completion = full[len(context) :]
        end = min((completion.find(s) + len(s) for s in stops if s in completion), default=len(completion))
        completion = completion[:end]
        # the context as the model gets it at inference: apply_chat_template(..., tokenize=True)
        context_ids = render(messages[:k], tools=tools, add_generation_prompt=True, return_dict=False)
        assert context_ids == tokenizer(context, add_special_tokens=False)["input_ids"]
        sample_ids = tokenizer(context + completion, add_special_tokens=False)["input_ids"]
        assert sample_ids[: len(context_ids)] == context_ids, "tokens merge across the seam here"
        turns.append((context_ids, sample_ids[len(context_ids) :]))
    return turns


def trained_runs(out: dict) -> list[tuple]:
    """(tokens before the run, the run) for every run of trained tokens in every sample."""
    runs = []
    for ids, labels in zip(out["input_ids"], out["labels"], strict=True):
        assert labels[-1] != IGNORE_INDEX, "a sample ends with its last trained turn's stop token"
        start = None
        for i, label in enumerate([*labels, IGNORE_INDEX]):
            if label != IGNORE_INDEX and start is None:
                start = i
            elif label == IGNORE_INDEX and start is not None:
                assert labels[start:i] == ids[start:i]
                runs.append((ids[:start], ids[start:i]))
                start = None
    return runs


def settings(family: Family, tokenizer: Any, **kwargs: Any) -> chat.ChatSettings:
    return chat.ChatSettings(stop_token_ids=tuple(family.stop_ids(tokenizer)), **kwargs)


# --- every family, every conversation, every path -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), CASES, ids=[f"{f.name}-{c}" for f, c in CASES])
def test_trained_runs_and_contexts_follow_the_rule(family, name):
    tokenizer = family.load()
    messages, tools = conversations(family)[name]
    expected = expected_turns(tokenizer, family, messages, tools)
    batch = {"messages": [messages], "tools": [tools]}
    chat_settings = settings(family, tokenizer)
    # the data-file path (--training_data_path) and the data-config handler give the same samples
    ctx = EncodingContext(DataArgs(), tokenizer, 10**6, chat_settings)
    cli = process_batch(batch, fmt="chat", ctx=ctx)
    handler = tokenize_and_apply_chat_template_with_masking(
        batch, tokenizer=tokenizer, chat_template=None, chat_settings=chat_settings
    )
    assert trained_runs(cli) == expected
    assert handler["input_ids"] == cli["input_ids"] and handler["labels"] == cli["labels"]
    assert len(cli["input_ids"]) == family.samples[name]
    assert cli["chat_sample"] == [[i, len(cli["input_ids"]), 0] for i in range(len(cli["input_ids"]))]
    bos = tokenizer.bos_token_id
    for ids in cli["input_ids"]:
        assert ids[:2] != [bos, bos], "doubled BOS"


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("llama3.2", "mistral-v0.3", "gemma3")])
def test_rendered_chat_text_gets_no_second_bos(family):
    """apply_tokenizer_chat_template → text → tokenize (the data-config render-only path) with templates
    that write their own BOS: it is kept, the tokenizer's is not added again."""
    tokenizer = family.load()
    messages, _ = conversations(family)["basic"]
    text = apply_tokenizer_chat_template(
        {"messages": [messages]},
        tokenizer=tokenizer,
        chat_template=None,
        chat_settings=chat.ChatSettings(()),
        conversation_column_name="messages",
    )["formatted_chat_data"]
    assert text == [tokenizer.apply_chat_template(messages, tokenize=False)]
    assert text[0].startswith(tokenizer.bos_token)
    ids = tokenize_batch(tokenizer, text, [[(0, len(text[0]))]], max_len=10**6)["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids[:-1] == tokenizer(text[0], add_special_tokens=False)["input_ids"][: len(ids) - 1]
    handler_ids = tokenize({"text": text}, tokenizer=tokenizer)["input_ids"][0]  # the `tokenize` handler
    assert handler_ids == tokenizer(text[0], add_special_tokens=False)["input_ids"]


# --- literal checks: what each family's trained text looks like -------------------------------------


def decoded_runs(tokenizer: Any, out: dict) -> list[str]:
    return [tokenizer.decode(run) for _, run in trained_runs(out)]


def run_cli_path(family: Family, name: str, **kwargs: Any) -> tuple[Any, dict]:
    tokenizer = family.load()
    messages, tools = conversations(family)[name]
    out = process_batch(
        {"messages": [messages], "tools": [tools]},
        fmt="chat",
        ctx=EncodingContext(DataArgs(), tokenizer, 10**6, settings(family, tokenizer, **kwargs)),
    )
    return tokenizer, out


FAMILY = {f.name: f for f in FAMILIES}


def test_mistral_trains_the_answer_not_the_users_words():
    # the bug this module exists for: the user's words were trained because the system prompt moves
    tokenizer, out = run_cli_path(FAMILY["mistral-v0.3"], "basic")
    assert tokenizer.decode(out["input_ids"][0]) == "<s>[INST] Be brief.\n\nWhat is 2+2?[/INST] 4.</s>"
    assert decoded_runs(tokenizer, out) == ["4.</s>", "6.</s>"]
    assert tokenizer.convert_ids_to_tokens(trained_runs(out)[0][1]) == ["▁", "4", ".", "</s>"]


@pytest.mark.slow
def test_literal_trained_text_per_family():
    tok, out = run_cli_path(FAMILY["qwen3"], "reasoning")
    assert decoded_runs(tok, out) == [
        "<think>\n2 plus 2 makes 4.\n</think>\n\n4.<|im_end|>",
        "<think>\n3 plus 3 makes 6.\n</think>\n\n6.<|im_end|>",
    ]
    assert tok.decode(out["input_ids"][1]).endswith(
        "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n3 plus 3 makes 6.\n</think>\n\n6.<|im_end|>"
    )
    tok, out = run_cli_path(FAMILY["gpt-oss"], "tool_reasoning")
    assert decoded_runs(tok, out) == [
        "<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        "<|channel|>analysis<|message|>The tool says 22 C.<|end|><|start|>assistant<|channel|>final"
        "<|message|>It is 22 C and sunny in Paris.<|return|>",
    ]
    tok, out = run_cli_path(FAMILY["llama3.2"], "tool")
    assert decoded_runs(tok, out) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 22 C and sunny in Paris.<|eot_id|>",
    ]
    text = tok.decode(out["input_ids"][0])
    assert text.count("<|begin_of_text|>") == 1 and "Today Date: 26 Jul 2024" in text
    assert '"name": "get_weather"' in text.split("Weather in Paris?")[0]  # the tool schema is in context


@pytest.mark.slow
def test_qwen3_with_thinking_disabled_trains_the_answer_after_the_empty_think_block():
    """enable_thinking=False puts an empty think block in the generation prompt: the context ends with it
    and the answer follows, the row's reasoning left out as the model is never asked for it."""
    tokenizer, out = run_cli_path(FAMILY["qwen3"], "reasoning", template_kwargs={"enable_thinking": False})
    assert decoded_runs(tokenizer, out) == ["4.<|im_end|>", "6.<|im_end|>"]
    for context, _ in trained_runs(out):
        assert tokenizer.decode(context).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    messages, _ = conversations(FAMILY["qwen3"])["reasoning"]
    inference = tokenizer.apply_chat_template(
        messages[:1], add_generation_prompt=True, enable_thinking=False, return_dict=False
    )
    assert trained_runs(out)[0][0] == inference


@pytest.mark.slow
def test_last_response_and_whole_text_options():
    family = FAMILY["qwen3"]
    tokenizer, last = run_cli_path(family, "basic", train_on="last_response")
    messages, _ = conversations(family)["basic"]
    assert trained_runs(last) == expected_turns(tokenizer, family, messages, None)[-1:]
    tokenizer, whole = run_cli_path(family, "basic", train_on="all")
    assert whole["input_ids"] == [tokenizer.apply_chat_template(messages, return_dict=False)]
    assert whole["labels"] == whole["input_ids"]


@pytest.mark.slow
def test_generation_marked_template_is_trained_as_marked():
    """TRL's Phi-3 training template marks assistant text (content, <|end|>, the newline after it and the
    final EOS) itself: those characters are trained, in one sample."""
    tokenizer = FAMILY["phi3"].load()
    template = (TEMPLATES / "phi3_training.jinja").read_text(encoding="utf-8")
    messages, _ = conversations(FAMILY["phi3"])["basic"]
    out = tokenize_and_apply_chat_template_with_masking(
        {"messages": [messages]},
        tokenizer=tokenizer,
        chat_template=template,
        chat_settings=chat.ChatSettings(()),
    )
    assert decoded_runs(tokenizer, out) == ["4.<|end|>\n", "6.<|end|>\n<|endoftext|>"]


# --- end to end: the real CLI on a tiny Qwen3 with the real tokenizer ----------------------------------


def qwen3_reasoning_rows() -> list[dict]:
    rows = []
    for i in range(8):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a careful calculator."},
                    {"role": "user", "content": f"What is {i}+{i}?"},
                    {
                        "role": "assistant",
                        "reasoning_content": f"{i} plus {i} is {2 * i}.",
                        "content": f"{2 * i}.",
                    },
                    {"role": "user", "content": f"And {i}*{i}?"},
                    {
                        "role": "assistant",
                        "reasoning_content": f"{i} times {i} is {i * i}.",
                        "content": f"{i * i}.",
                    },
                ]
            }
        )
    for city in ("Paris", "Rome"):  # a tool loop whose call carries reasoning: one sample, tools in context
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Weather in {city}?"},
                    {
                        "role": "assistant",
                        "content": "",
                        "reasoning_content": "Call the tool.",
                        "tool_calls": [call],
                    },
                    {"role": "tool", "content": "22 C"},
                    {
                        "role": "assistant",
                        "content": f"It is 22 C in {city}.",
                        "reasoning_content": "It answered.",
                    },
                ],
                "tools": [WEATHER_TOOL],
            }
        )
    return rows


@pytest.mark.slow
def test_qwen3_multi_turn_reasoning_trains_end_to_end(tmp_path):
    from transformers import AutoTokenizer

    from tuning.testing.tiny_qwen3 import write_tiny_qwen3
    from tuning.train import read_training_logs

    FAMILY["qwen3"].load()  # skips when the folder is absent
    source = REAL / "qwen3"
    model = write_tiny_qwen3(source, tmp_path / "tiny-qwen3")
    data = write_jsonl(tmp_path / "chat.jsonl", qwen3_reasoning_rows())
    out = tmp_path / "out"
    args = [
        "--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(out),
        "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--torch_dtype", "float32", "--logging_steps", "1", "--save_model_dir", str(out / "final"),
    ]  # fmt: skip
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "(chat): 18 samples from 10 of 10 rows kept (8 conversations split into 16 samples)" in result.stderr
    )
    losses = [r["value"] for r in read_training_logs(out)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    saved = AutoTokenizer.from_pretrained(out / "final")
    assert saved.chat_template == AutoTokenizer.from_pretrained(source).chat_template  # the model's own


@pytest.mark.slow
def test_dataprocessing_only_from_a_tokenizer_folder_writes_the_split_samples(tmp_path):
    """A folder of real tokenizer files and config.json (no weights) is enough to write the processed
    samples; the shards hold exactly the samples the rule gives, one row per sample."""
    import datasets

    from tuning import sft_trainer

    family = FAMILY["qwen3"]
    tokenizer = family.load()
    rows = qwen3_reasoning_rows()
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(REAL / "qwen3"), "--training_data_path", str(data), "--output_dir", str(out),
        "--do_dataprocessing_only",
    ]  # fmt: skip
    assert sft_trainer.main(argv) == 0
    train = datasets.load_dataset("parquet", data_files=str(out / "train" / "*.parquet"), split="train")
    assert train.column_names == ["input_ids", "labels"] and len(train) == 18
    expected = [t for r in rows for t in expected_turns(tokenizer, family, r["messages"], r.get("tools"))]
    assert trained_runs({"input_ids": train["input_ids"], "labels": train["labels"]}) == expected
